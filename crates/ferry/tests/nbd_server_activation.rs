//! `[ ferry nbd-server IMAGE ]`: socket activation (LISTEN_FDS/LISTEN_PID, the socket on fd 3)
//! with `ferry copy` and `nbdcopy` starting the server, as a copy source and as a copy
//! destination. The server must not outlive the copy.

mod nbd_server_common;

use std::time::{Duration, Instant};

use nbd_server_common::*;

/// After a copy, no `ferry nbd-server` serving `image` may be left running.
fn assert_no_leftover_server(image: &std::path::Path) {
    let needle = image.to_str().unwrap();
    let start = Instant::now();
    loop {
        let left: Vec<i32> = processes_mentioning(needle)
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| !s.contains(") Z "))
                    .unwrap_or(false)
            })
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "server processes for {needle} still running: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ferry_copy_from_an_activated_server() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let out = dir.path().join("out.raw");
    let bin = ferry_bin();
    let (bin, src_s) = (bin.to_str().unwrap(), src.to_str().unwrap());
    ferry(&[
        "copy",
        "[",
        bin,
        "nbd-server",
        "--read-only",
        src_s,
        "]",
        out.to_str().unwrap(),
    ])
    .expect_success();
    assert_contents(&out, &layout.expected());
    assert_no_leftover_server(&src);
}

#[test]
fn ferry_copy_into_an_activated_server() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let dst = garbage_file(dir.path(), "dst.raw", layout.size());
    let bin = ferry_bin();
    ferry(&[
        "copy",
        src.to_str().unwrap(),
        "[",
        bin.to_str().unwrap(),
        "nbd-server",
        dst.to_str().unwrap(),
        "]",
    ])
    .expect_success();
    assert_same_file(&src, &dst);
    assert_no_leftover_server(&dst);
}

/// nbdcopy's `[ CMD ]` syntax starts servers the systemd way too.
#[test]
fn nbdcopy_with_an_activated_server_both_ways() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let out = dir.path().join("out.raw");
    let bin = ferry_bin();
    let bin = bin.to_str().unwrap();
    run(
        "nbdcopy",
        &[
            "--",
            "[",
            bin,
            "nbd-server",
            "--read-only",
            src.to_str().unwrap(),
            "]",
            out.to_str().unwrap(),
        ],
    )
    .expect_success();
    assert_contents(&out, &layout.expected());
    assert_no_leftover_server(&src);

    let dst = garbage_file(dir.path(), "dst.raw", layout.size());
    run(
        "nbdcopy",
        &[
            "--",
            src.to_str().unwrap(),
            "[",
            bin,
            "nbd-server",
            dst.to_str().unwrap(),
            "]",
        ],
    )
    .expect_success();
    assert_same_file(&src, &dst);
    assert_no_leftover_server(&dst);
}

/// An activated read-only server refuses to be a copy destination.
#[test]
fn activated_read_only_server_refuses_writes() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let dst = garbage_file(dir.path(), "dst.raw", layout.size());
    let before = std::fs::read(&dst).unwrap();
    let bin = ferry_bin();
    let copy = ferry(&[
        "copy",
        src.to_str().unwrap(),
        "[",
        bin.to_str().unwrap(),
        "nbd-server",
        "--read-only",
        dst.to_str().unwrap(),
        "]",
    ]);
    assert!(
        copy.expect_failure().contains("read-only"),
        "{}",
        copy.stderr
    );
    assert!(std::fs::read(&dst).unwrap() == before);
    assert_no_leftover_server(&dst);
}
