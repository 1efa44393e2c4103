//! `ferry copy --dst-format qcow2` with an incremental copy (`--incremental`/`--bitmap`)
//! writes into the guest view of the existing qcow2 destination: only what changed is copied,
//! and the image afterwards passes `qemu-img check` with no leaks and equals the source.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

use testutil::tools::{qemu_img, qemu_io};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn check_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", s(image)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors") && !text.contains("leaked"),
        "qemu-img check {}: {text}",
        image.display()
    );
}

fn identical(a: &Path, b: &Path) {
    let out = qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s(a), s(b)]);
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn a_bitmap_copy_writes_into_the_existing_qcow2_backup() {
    let dir = testutil::temp_dir();
    let image = dir.path().join("disk.qcow2");
    let backup = dir.path().join("backup.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "64M"]);
    qemu_io(
        &image,
        "qcow2",
        &["write -P 0xaa 0 32M", "write -P 0xab 50M 1M"],
    );
    // The full copy makes a new image, as without --incremental.
    ferry([
        "copy",
        "--src-format",
        "qcow2",
        "--dst-format",
        "qcow2",
        s(&image),
        s(&backup),
    ])
    .run()
    .expect_ok();
    identical(&image, &backup);
    qemu_img(&["bitmap", "--add", s(&image), "b0"]);
    qemu_io(
        &image,
        "qcow2",
        &[
            "write -P 0xbb 1M 64k",
            "write -P 0xbc 3000k 5k",
            "write -z 4M 1M",
            "write -z 50M 1M",
            "write -P 0xcc 40M 128k",
        ],
    );
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(&backup).unwrap().ino();
    let stderr = ferry([
        "copy",
        "-v",
        "--src-format",
        "qcow2",
        "--bitmap",
        "b0",
        "--dst-format",
        "qcow2",
        s(&image),
        s(&backup),
    ])
    .run()
    .expect_ok()
    .to_string();
    // Only the clusters the bitmap marks are read (64 KiB granularity).
    assert!(stderr.contains("read 256.0 KiB"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&backup).unwrap().ino(),
        inode,
        "written in place"
    );
    check_clean(&backup);
    identical(&image, &backup);
}

#[test]
fn an_incremental_copy_into_a_qcow2_destination_needs_an_existing_image() {
    let dir = testutil::temp_dir();
    let image = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "1M"]);
    qemu_img(&["bitmap", "--add", s(&image), "b0"]);
    let raw = dir.path().join("previous.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    for dst in [raw.clone(), dir.path().join("missing.qcow2")] {
        let args = [
            "copy",
            "--src-format",
            "qcow2",
            "--bitmap",
            "b0",
            "--dst-format",
            "qcow2",
            s(&image),
            s(&dst),
        ];
        let err = ferry(args).run().expect_code(2).to_string();
        assert!(err.contains("existing qcow2 image"), "{err}");
    }
    let err = ferry([
        "copy",
        "--src-format",
        "qcow2",
        "--bitmap",
        "b0",
        "--dst-format",
        "qcow2",
        "--cluster-size",
        "4096",
        s(&image),
        s(&dir.path().join("x.qcow2")),
    ])
    .run()
    .expect_code(2)
    .to_string();
    assert!(err.contains("--cluster-size"), "{err}");
}
