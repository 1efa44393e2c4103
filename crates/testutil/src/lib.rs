//! Test harness for ferry: sample disk images and real NBD peers.
//!
//! - [`image`]: deterministic sample images (pseudo-random data, explicit zero runs, holes) and
//!   qcow2 conversions.
//! - [`peer`]: a running server process on a Unix socket in a private temporary directory (or a
//!   free loopback TCP port), killed and reaped on drop; builders for [`QemuNbd`], [`Nbdkit`]
//!   and [`NbdServer`].
//! - [`tls`]: a throwaway X.509 CA, server and client certificate in the layout qemu, nbdkit and
//!   libnbd expect.
//! - [`ferry_nbd`]: the real `ferry nbd-server` binary as a peer, ready once it writes its
//!   `--ready-file`.
//! - [`ferry_serve`]: the real `ferry serve` binary, ready once it writes its `--ready-file`.
//! - [`imageio`]: imageio transfer servers (the ovirt-imageio daemon and `ferry serve`) on
//!   private sockets and free ports, with tickets installed through their control sockets.
//! - [`outcome`]: running a program that may fail and inspecting how it ended.
//! - [`tools`]: running helper programs (qemu-img, qemu-io, nbdinfo, nbdcopy) with a timeout and
//!   parsing their JSON maps.
//!
//! A missing program is a test failure, never a silent skip: [`require_binary`] panics with a
//! message saying what to install.

pub mod fault_proxy;
pub mod ferry_nbd;
pub mod ferry_serve;
pub mod image;
pub mod imageio;
pub mod nbd_server;
pub mod nbdkit;
pub mod outcome;
pub mod peer;
pub mod qemu;
pub mod tls;
pub mod tools;

use std::path::PathBuf;

pub use ferry_serve::FerryServe;
pub use image::{Layout, Segment, make_sparse_image, pseudo_random};
pub use nbd_server::NbdServer;
pub use nbdkit::Nbdkit;
pub use peer::{Endpoint, Peer};
pub use qemu::QemuNbd;
pub use tls::Certs;
pub use tools::MapExtent;

/// Debian package that provides each program the harness runs.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-nbd", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("nbdkit", "nbdkit"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("nbd-server", "nbd-server"),
    ("openssl", "openssl"),
];

/// Finds `name` on `PATH` (or in /usr/sbin and /sbin, where nbd-server may live), or panics
/// with a message naming the package to install. Tests call this instead of skipping.
pub fn require_binary(name: &str) -> PathBuf {
    if let Some(found) = find_binary(name) {
        return found;
    }
    let package = PACKAGES
        .iter()
        .find(|(bin, _)| *bin == name)
        .map_or(name, |(_, pkg)| *pkg);
    panic!(
        "{name} is not installed: install {package} (scripts/test does it); \
         this test needs a real {name} and does not skip without it"
    );
}

/// `name`'s full path if it is an executable on `PATH` or in the sbin directories.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A fresh private temporary directory, removed when dropped.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir()
        .expect("creating a temporary directory")
}

/// Writes `bytes` bytes of incompressible data (xorshift from `seed`) to `path`.
pub fn random_file(path: &std::path::Path, bytes: u64, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; bytes as usize];
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    std::fs::write(path, data).expect("writing random test data");
}
