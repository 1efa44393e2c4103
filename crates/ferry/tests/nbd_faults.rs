//! `ferry copy` against real NBD servers that fail under it: connections broken, stalled or
//! slowed by a proxy on a Unix socket, qemu-nbd killed and started again, EIO on a share of
//! requests, and a destination that runs out of space and is then given more. Every copy that
//! is meant to complete is checked byte for byte against its source.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use testutil::fault_proxy::{Address, Fault, FaultProxy, Faults};
use testutil::{Nbdkit, QemuNbd};

/// Past this, a copy counts as hung (and is killed).
const HANG_BOUND: Duration = Duration::from_secs(60);

/// The bytes nbdkit's `pattern` plugin serves: every 8-byte word holds its own offset.
fn pattern_bytes(size: u64) -> Vec<u8> {
    (0..size / 8).flat_map(|w| (w * 8).to_be_bytes()).collect()
}

/// `nbd+unix:///?socket=PATH`: the default export on the proxy's socket.
fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

fn kill(pid: i32) {
    // SAFETY: kill(2) on a peer this test started and has not reaped.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// A file holding nbdkit's pattern, as qemu-nbd serves it.
fn pattern_file(dir: &Path, size: u64) -> std::path::PathBuf {
    let path = dir.join("pattern.raw");
    std::fs::write(&path, pattern_bytes(size)).unwrap();
    path
}

/// Connections between ferry and qemu-nbd that break at pseudo-random points — requests or
/// replies cut, connections gone silent — as the source and as the destination: each broken
/// connection is made again, what was in flight is sent again, and the copy is whole.
#[test]
fn copies_through_randomly_broken_nbd_connections_complete() {
    let dir = testutil::temp_dir();
    let size = 24u64 << 20;
    let src = pattern_file(dir.path(), size);
    let expected = pattern_bytes(size);
    // As the source: replies carry the data.
    let server = QemuNbd::new(&src).read_only().shared(8).start();
    let proxy_socket = dir.path().join("src-proxy.sock");
    let target = Address::Unix(server.socket().unwrap().to_path_buf());
    let proxy = FaultProxy::start_unix(
        &proxy_socket,
        target,
        Faults::random(0xbeef, 8, 4 << 10, 6 << 20, true),
    );
    let out = dir.path().join("out.raw");
    let run = ferry([
        "copy",
        "--timeout",
        "2",
        &unix_uri(&proxy_socket),
        out.to_str().unwrap(),
    ])
    .timeout(HANG_BOUND)
    .run();
    let stderr = run.expect_ok();
    assert!(
        proxy.cuts() + proxy.stalls() >= 1,
        "no connection broke: {stderr}"
    );
    assert_same_bytes(&std::fs::read(&out).unwrap(), &expected, "from the source");
    drop((proxy, server));

    // As the destination: requests carry the data.
    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst)
        .and_then(|f| f.set_len(size))
        .unwrap();
    let server = QemuNbd::new(&dst).shared(8).start();
    let proxy_socket = dir.path().join("dst-proxy.sock");
    let target = Address::Unix(server.socket().unwrap().to_path_buf());
    let proxy = FaultProxy::start_unix(
        &proxy_socket,
        target,
        Faults::random(0xcafe, 8, 6 << 20, 2 << 10, true),
    );
    let run = ferry([
        "copy",
        "--timeout",
        "2",
        src.to_str().unwrap(),
        &unix_uri(&proxy_socket),
    ])
    .timeout(HANG_BOUND)
    .run();
    let stderr = run.expect_ok();
    assert!(
        proxy.cuts() + proxy.stalls() >= 1,
        "no connection broke: {stderr}"
    );
    drop((proxy, server));
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &expected,
        "into the destination",
    );
}

/// qemu-nbd killed (SIGKILL) and started again on the same socket in the middle of a copy, as
/// the source and as the destination: ferry connects again and the copy completes. A proxy
/// that delays every chunk slows the copy down enough to break it midway.
#[test]
fn qemu_nbd_restarted_mid_copy_is_connected_again() {
    let dir = testutil::temp_dir();
    let size = 32u64 << 20;
    let src = pattern_file(dir.path(), size);
    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst)
        .and_then(|f| f.set_len(size))
        .unwrap();
    let (src_socket, dst_socket) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let source = || {
        QemuNbd::new(&src)
            .read_only()
            .unix_socket(&src_socket)
            .start()
    };
    let destination = || QemuNbd::new(&dst).unix_socket(&dst_socket).start();
    let (src_server, dst_server) = (source(), destination());
    let slow = || Faults::every(Fault::Delay(Duration::from_millis(8)));
    let src_proxy = dir.path().join("src-proxy.sock");
    let dst_proxy = dir.path().join("dst-proxy.sock");
    let _p1 = FaultProxy::start_unix(&src_proxy, Address::Unix(src_socket.clone()), slow());
    let _p2 = FaultProxy::start_unix(&dst_proxy, Address::Unix(dst_socket.clone()), slow());
    let running = ferry(["copy", &unix_uri(&src_proxy), &unix_uri(&dst_proxy)]).spawn();
    std::thread::sleep(Duration::from_millis(700));
    kill(dst_server.pid());
    drop(dst_server);
    std::thread::sleep(Duration::from_millis(300));
    let dst_server = destination();
    std::thread::sleep(Duration::from_millis(500));
    kill(src_server.pid());
    drop(src_server);
    std::thread::sleep(Duration::from_millis(300));
    let src_server = source();
    let run = running.wait(HANG_BOUND);
    let stderr = run.expect_ok();
    assert!(stderr.contains("connected again"), "{stderr}");
    drop((src_server, dst_server));
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &pattern_bytes(size),
        "copy across qemu-nbd restarts",
    );
}

/// nbdkit's `error` filter failing 1 % of all requests with EIO, on the source and on the
/// destination: each failed request is retried and the copy completes.
#[test]
fn eio_on_one_percent_of_requests_is_retried() {
    let dir = testutil::temp_dir();
    let size = 32u64 << 20;
    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst)
        .and_then(|f| f.set_len(size))
        .unwrap();
    let source = Nbdkit::new("pattern")
        .filter("error")
        .args(&[&format!("size={size}"), "error=EIO", "error-rate=1%"])
        .start();
    let destination = Nbdkit::new("file")
        .filter("error")
        .args(&[dst.to_str().unwrap(), "error=EIO", "error-rate=1%"])
        .start();
    // Small requests, so that 1 % of them is many failures.
    let run = ferry([
        "copy",
        "--request-size",
        "64K",
        &source.nbd_uri(),
        &destination.nbd_uri(),
    ])
    .env("RUST_LOG", "warn")
    .timeout(HANG_BOUND)
    .run();
    let stderr = run.expect_ok();
    assert!(stderr.contains("retrying"), "no request failed: {stderr}");
    assert!(stderr.contains("Input/output error"), "{stderr}");
    drop((source, destination));
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &pattern_bytes(size),
        "copy with 1 % EIO",
    );
}

/// A tmpfs of the test's own, removed when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "ferry-test"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remounting the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A destination file system that fills up: the copy fails naming the write and its offset
/// and keeps its journal; once space is freed, the same command copies only the rest.
#[test]
fn enospc_fails_naming_the_offset_and_resume_completes_once_space_is_freed() {
    let dir = testutil::temp_dir();
    let Some(fs) = Tmpfs::mount(&dir.path().join("small"), "4m") else {
        // Mounting needs root; where it is not available there is no small file system.
        // SAFETY: geteuid(2) has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_ne!(euid, 0, "root could not mount a tmpfs");
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let size = 16u64 << 20;
    let source = Nbdkit::new("pattern")
        .arg(&format!("size={size}"))
        .read_only()
        .start();
    let dst = fs.0.join("dst.raw");
    let journal = dir.path().join("copy.journal");
    let args = [
        "copy",
        "-v",
        "--resume",
        journal.to_str().unwrap(),
        &source.nbd_uri(),
        dst.to_str().unwrap(),
    ];
    let run = ferry(args).timeout(HANG_BOUND).run();
    let stderr = run.expect_code(1);
    assert!(
        stderr.contains(&format!("write to {} at offset ", dst.display())),
        "{stderr}"
    );
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(journal.exists(), "a failed copy keeps its journal");

    fs.resize("32m");
    let run = ferry(args).timeout(HANG_BOUND).run();
    let stderr = run.expect_ok().to_string();
    assert!(!journal.exists(), "a completed copy removes its journal");
    let summary = stderr
        .lines()
        .find(|l| l.contains("ferry: copied"))
        .unwrap_or_else(|| panic!("no summary: {stderr}"));
    assert!(
        !summary.contains("skipped 0 B"),
        "the resumed copy wrote everything again: {summary}"
    );
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &pattern_bytes(size),
        "copy resumed after ENOSPC",
    );
}
