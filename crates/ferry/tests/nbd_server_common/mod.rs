//! Shared pieces of the `ferry nbd-server` tests: the binary under test, sample images, the
//! file's real allocation map (SEEK_DATA/SEEK_HOLE, independent of ferry), and running ferry,
//! nbdinfo, nbdcopy and qemu-img with timeouts.

#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testutil::ferry_nbd::{FerryNbd, FerryNbdPeer};
use testutil::outcome::{Outcome, run_outcome};
use testutil::{Layout, MapExtent};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
/// How long any one client command may run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// The log line the server prints (at debug level) for each client connection.
pub const CONNECTED: &str = "NBD client connected";

/// The `ferry` binary built for these tests.
pub fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// A `ferry nbd-server` builder for `image`, logging connections at debug level.
pub fn server(image: &Path) -> FerryNbd {
    FerryNbd::new(&ferry_bin(), image)
        .env("RUST_LOG", "nbd::server=debug")
        .env("NO_COLOR", "1")
}

/// An 8 MiB image: data, holes, zeroes written as data, a lone 4 KiB block, a tail hole.
pub fn layout() -> Layout {
    Layout::new()
        .data(MIB, 1)
        .hole(2 * MIB)
        .zero(512 * KIB)
        .data(768 * KIB, 2)
        .hole(MIB)
        .data(4 * KIB, 3)
        .hole(MIB - 4 * KIB)
        .data(MIB, 4)
        .hole(MIB + 256 * KIB)
        .zero(256 * KIB)
}

/// Writes `layout` as a sparse raw image `name` in `dir`.
pub fn image(dir: &Path, name: &str, layout: &Layout) -> PathBuf {
    let path = dir.join(name);
    testutil::make_sparse_image(&path, layout);
    path
}

/// A fully allocated file of `size` bytes of a pattern unlike any image: a copy into it must
/// overwrite every byte, zeroes included.
pub fn garbage_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 0x80).collect();
    std::fs::write(&path, bytes).expect("writing the destination file");
    path
}

/// The file's allocation as (offset, length, is_data) runs, from SEEK_DATA/SEEK_HOLE.
pub fn file_map(path: &Path) -> Vec<(u64, u64, bool)> {
    let file = std::fs::File::open(path).expect("opening the image");
    let size = file.metadata().unwrap().len();
    let fd = file.as_raw_fd();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |offset: u64, length: u64, data: bool| {
        if length == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == offset => last.1 += length,
            _ => out.push((offset, length, data)),
        }
    };
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            push(pos, size - pos, false);
            break;
        }
        let data = data as u64;
        push(pos, data - pos, false);
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        assert!(hole >= 0, "SEEK_HOLE failed");
        let hole = (hole as u64).min(size);
        push(data, hole - data, true);
        pos = hole;
    }
    out
}

/// Checks an NBD map against the file: the HOLE bit exactly where the file has holes, and
/// ZERO only where the bytes really are zero.
pub fn assert_map_matches_file(map: &[MapExtent], path: &Path, expected: &[u8], who: &str) {
    let map = testutil::tools::merge(map);
    let total: u64 = map.iter().map(|e| e.length).sum();
    assert_eq!(
        total,
        expected.len() as u64,
        "{who}: map does not cover the image"
    );
    let holes: Vec<(u64, u64, bool)> = {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for e in &map {
            let data = e.flags & 1 == 0;
            match out.last_mut() {
                Some(last) if last.2 == data && last.0 + last.1 == e.offset => last.1 += e.length,
                _ => out.push((e.offset, e.length, data)),
            }
        }
        out
    };
    assert_eq!(
        holes,
        file_map(path),
        "{who}: HOLE bits differ from the file's holes\nmap: {map:?}"
    );
    for e in &map {
        if e.flags & 2 != 0 {
            let range = e.offset as usize..(e.offset + e.length) as usize;
            assert!(
                expected[range].iter().all(|b| *b == 0),
                "{who}: extent {e:?} says zero but holds data"
            );
        }
    }
}

/// Runs `ferry ARGS`.
pub fn ferry(args: &[&str]) -> Outcome {
    run_outcome(Command::new(ferry_bin()).args(args), TOOL_TIMEOUT)
}

/// Runs any program with the standard timeout.
pub fn run(program: &str, args: &[&str]) -> Outcome {
    let bin = testutil::require_binary(program);
    run_outcome(Command::new(bin).args(args), TOOL_TIMEOUT)
}

/// `nbdinfo --can|--is WHAT URI`: Some(true) for exit 0, Some(false) for exit 2.
pub fn nbdinfo_flag(kind: &str, what: &str, uri: &str) -> bool {
    let out = run("nbdinfo", &[kind, what, uri]);
    match out.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("nbdinfo {kind} {what} failed: {out:?}"),
    }
}

/// Asserts that two files hold the same bytes.
pub fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

/// Asserts that `path` holds `expected`.
pub fn assert_contents(path: &Path, expected: &[u8]) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len(), expected.len(), "{} size", path.display());
    if let Some(i) = got.iter().zip(expected).position(|(p, q)| p != q) {
        panic!(
            "{} differs from the expected image at byte {i}",
            path.display()
        );
    }
}

/// How many client connections the server has accepted so far.
pub fn connections(peer: &FerryNbdPeer) -> usize {
    peer.log().matches(CONNECTED).count()
}

/// Processes whose command line mentions `needle` (to find leftover servers).
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}
