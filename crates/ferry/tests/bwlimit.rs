//! `ferry copy --bwlimit` and `--bwlimit-file`: the rate holds over a ten-second copy, holes
//! do not count, and a new limit read on SIGHUP changes the rate of a running copy.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// A file of `data` MiB of incompressible data followed by a `hole` MiB hole.
fn image(path: &Path, data: u64, hole: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; MIB as usize];
    for _ in 0..data {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.seek(SeekFrom::Current((hole * MIB) as i64)).unwrap();
    f.set_len((data + hole) * MIB).unwrap();
}

fn same_content(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_same_bytes(&y, &x, "the copy");
}

#[test]
fn bwlimit_holds_the_rate_and_holes_do_not_count() {
    let dir = testutil::temp_dir();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    // 40 MiB of data at 4 MiB/s: 10 s. The 64 MiB hole is not read, so it costs nothing.
    image(&src, 40, 64);
    let started = Instant::now();
    ferry([
        "copy",
        "--bwlimit",
        "4M",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ])
    .run()
    .expect_ok();
    let secs = started.elapsed().as_secs_f64();
    let rate = 40.0 / secs;
    assert!(
        (rate - 4.0).abs() <= 0.05 * 4.0,
        "copied 40 MiB in {secs:.2} s: {rate:.2} MiB/s, want 4 MiB/s within 5 %"
    );
    same_content(&src, &dst);
}

#[test]
fn bwlimit_file_changes_the_rate_on_sighup() {
    let dir = testutil::temp_dir();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    let limit = dir.path().join("limit");
    image(&src, 30, 0);
    std::fs::write(&limit, "2M\n").unwrap();
    let started = Instant::now();
    let mut child = Command::new(ferry_bin())
        .args(["copy", "--bwlimit-file"])
        .args([&limit, &src, &dst])
        .spawn()
        .unwrap();
    // At 2 MiB/s the copy would take 15 s; after 3 s (6 MiB) the rest, 24 MiB, goes at
    // 8 MiB/s: 3 s more.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(&limit, "8M\n").unwrap();
    // SAFETY: kill sends a signal to the child started above, which has not been reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the copy did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let secs = started.elapsed().as_secs_f64();
    assert!(
        (5.4..6.9).contains(&secs),
        "took {secs:.2} s; 6 s if the new limit applied, 15 s if not"
    );
    same_content(&src, &dst);
}

#[test]
fn bad_bwlimit_values_are_usage_errors() {
    let dir = testutil::temp_dir();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    image(&src, 1, 0);
    let out = ferry([
        "copy",
        "--bwlimit",
        "fast",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ])
    .run();
    out.expect_code(2);
    let limit = dir.path().join("limit");
    std::fs::write(&limit, "lots").unwrap();
    let out = ferry([
        "copy",
        "--bwlimit-file",
        limit.to_str().unwrap(),
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ])
    .run();
    let err = out.expect_code(2).to_string();
    assert!(
        err.contains("--bwlimit-file") && err.contains("100M"),
        "{err}"
    );
}
