//! Incremental copies from a qcow2 image's persistent dirty bitmap: `--src-format qcow2
//! --bitmap NAME` reads the bitmap from the image itself, without qemu, and copies only what
//! changed since it was added into the existing previous copy.

mod common;

use common::*;
use std::path::Path;

use testutil::tools::{qemu_img, qemu_io};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn qcow2_bitmap_copies_only_dirty_clusters_into_the_previous_copy() {
    let dir = testutil::temp_dir();
    let image = dir.path().join("disk.qcow2");
    let full = dir.path().join("full.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "64M"]);
    qemu_io(&image, "qcow2", &["write -P 0xaa 0 32M"]);
    ferry(["copy", "--src-format", "qcow2", s(&image), s(&full)])
        .run()
        .expect_ok();
    qemu_img(&["bitmap", "--add", s(&image), "b0"]);
    qemu_io(
        &image,
        "qcow2",
        &[
            "write -P 0xbb 1M 64k",
            "write -z 4M 1M",
            "write -P 0xcc 40M 128k",
        ],
    );

    let stats = dir.path().join("stats.json");
    let run = ferry([
        "copy",
        "-v",
        "--src-format",
        "qcow2",
        "--bitmap",
        "b0",
        "--stats-json",
        s(&stats),
        s(&image),
        s(&full),
    ])
    .run();
    let stderr = run.expect_ok();
    // The data written since the bitmap was added; the zeroed megabyte is zeroed, not read.
    assert!(stderr.contains("read 192.0 KiB"), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(summary["bytes"]["read"], 192 * KIB, "{summary}");

    let expected = dir.path().join("expected.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&image),
        s(&expected),
    ]);
    let got = std::fs::read(&full).unwrap();
    assert_eq!(
        got.len() as u64,
        64 * MIB,
        "the previous copy keeps its size"
    );
    assert_same_bytes(&got, &std::fs::read(&expected).unwrap(), "full.raw");
}

#[test]
fn qcow2_bitmap_refusals() {
    let dir = testutil::temp_dir();
    let image = dir.path().join("disk.qcow2");
    let raw = dir.path().join("disk.raw");
    let dst = dir.path().join("backup.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "8M"]);
    qemu_img(&["bitmap", "--add", s(&image), "b0"]);
    std::fs::write(&raw, vec![1u8; 1 << 20]).unwrap();
    std::fs::write(&dst, vec![0u8; 8 << 20]).unwrap();

    // A bitmap the image does not have: the copy fails naming it, the destination untouched.
    let run = ferry([
        "copy",
        "--src-format",
        "qcow2",
        "--bitmap",
        "nope",
        s(&image),
        s(&dst),
    ])
    .run();
    let code = run.code();
    assert!(matches!(code, Some(1 | 2)), "exit {code:?}: {}", run.stderr);
    assert!(
        run.stderr.contains("'nope'") && run.stderr.contains("disk.qcow2"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 8 << 20);

    // A raw file keeps no bitmaps: a usage error, whether raw is said or probed.
    for format in ["raw", "auto"] {
        let run = ferry([
            "copy",
            "--src-format",
            format,
            "--bitmap",
            "b0",
            s(&raw),
            s(&dst),
        ])
        .run();
        assert!(
            run.expect_code(2).contains("--bitmap"),
            "{format}: {}",
            run.stderr
        );
    }
    // --incremental alone does not say which bitmap.
    let run = ferry([
        "copy",
        "--src-format",
        "qcow2",
        "--incremental",
        s(&image),
        s(&dst),
    ])
    .run();
    assert!(run.expect_code(2).contains("--bitmap"), "{}", run.stderr);
    assert_eq!(std::fs::read(&dst).unwrap(), vec![0u8; 8 << 20]);
}
