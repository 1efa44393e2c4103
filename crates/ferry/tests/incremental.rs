//! Incremental copies: `--bitmap NAME` reads qemu's dirty bitmap through qemu-nbd and copies
//! only what changed since the bitmap was added, into the existing previous copy.

mod common;

use common::*;
use std::path::Path;

use testutil::imageio::{ImageioServer, ServerOptions, ticket_json};
use testutil::tools::qemu_img;

#[test]
fn bitmap_copies_only_dirty_ranges_into_the_previous_copy() {
    let dir = testutil::temp_dir();
    // The full copy, then a checkpoint and changes.
    let (image, dst) = checkpointed_qcow2(
        dir.path(),
        "64M",
        &["write -P 0xaa 0 32M"],
        &[
            "write -P 0xbb 1M 64k",
            "write -z 4M 1M",
            "write -P 0xcc 40M 128k",
        ],
    );
    let (image_s, dst_s) = (image.to_str().unwrap(), dst.to_str().unwrap());
    // A clean range changed on the destination only: an incremental copy must leave it alone,
    // which shows it copied the dirty ranges and nothing else.
    let marker = vec![0xeeu8; 4096];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
        f.write_all_at(&marker, 20 * MIB).unwrap();
    }
    let run = ferry([
        "copy", "-v", "--bitmap", "b0", "[", "qemu-nbd", "-f", "qcow2", "-B", "b0", image_s, "]",
        dst_s,
    ])
    .run();
    let stderr = run.expect_ok();
    assert!(stderr.contains("read 192.0 KiB"), "{stderr}");
    let got = std::fs::read(&dst).unwrap();
    assert_eq!(got.len() as u64, 64 * MIB, "the destination keeps its size");
    let expect_at = |offset: u64, len: u64, byte: u8| {
        let s = &got[offset as usize..(offset + len) as usize];
        assert!(
            s.iter().all(|b| *b == byte),
            "bytes at {offset}+{len} should all be {byte:#x}"
        );
    };
    expect_at(MIB, 64 << 10, 0xbb);
    expect_at(4 * MIB, MIB, 0);
    expect_at(40 * MIB, 128 << 10, 0xcc);
    expect_at(20 * MIB, 4096, 0xee);
    expect_at(0, MIB, 0xaa);
    expect_at(5 * MIB, MIB, 0xaa);
}

#[test]
fn incremental_needs_a_bitmap() {
    let dir = testutil::temp_dir();
    let image = dir.path().join("disk.qcow2");
    let image_s = image.to_str().unwrap();
    let dst = dir.path().join("backup.raw");
    qemu_img(&["create", "-f", "qcow2", image_s, "8M"]);
    std::fs::write(&dst, vec![0u8; 8 << 20]).unwrap();
    // No bitmap named: a usage error before anything is opened.
    let run = ferry([
        "copy",
        "--incremental",
        "[",
        "qemu-nbd",
        "-f",
        "qcow2",
        image_s,
        "]",
        dst.to_str().unwrap(),
    ])
    .run();
    assert!(run.expect_code(2).contains("--bitmap"), "{}", run.stderr);
    // A bitmap the image does not have: the copy fails and says why; the destination is
    // untouched (not truncated).
    let run = ferry([
        "copy",
        "--bitmap",
        "nope",
        "[",
        "qemu-nbd",
        "-f",
        "qcow2",
        image_s,
        "]",
        dst.to_str().unwrap(),
    ])
    .run();
    let stderr = run.expect_code(1);
    assert!(stderr.contains("dirty"), "{stderr}");
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 8 << 20);
}

/// `ferry serve` over qemu-nbd with a dirty bitmap: `/extents?context=dirty` reports the
/// changed ranges, and `ferry copy --incremental URL` applies exactly those.
#[test]
fn incremental_download_from_ferry_serve_dirty_extents() {
    let dir = testutil::temp_dir();
    let (image, dst) = checkpointed_qcow2(
        dir.path(),
        "16M",
        &["write -P 0xaa 0 8M"],
        &["write -P 0xbb 2M 64k", "write -z 6M 1M"],
    );
    let dst_s = dst.to_str().unwrap();
    let nbd = testutil::QemuNbd::new(&image)
        .format("qcow2")
        .read_only()
        .arg("-B")
        .arg("b0")
        .start();
    let serve = ImageioServer::ferry_serve(Path::new(ferry_bin()), &ServerOptions::default());
    let mut ticket = ticket_json(
        "inc",
        &format!("nbd:unix:{}", nbd.socket().unwrap().display()),
        16 * MIB,
        &["read"],
    );
    ticket["dirty"] = serde_json::Value::Bool(true);
    serve.add_ticket(&ticket);
    let url = serve.url("inc");
    let map = ferry(["map", "--json", "--context", "dirty", &url]).run();
    let copy = ferry(["copy", "-v", "--incremental", &url, dst_s]).run();
    let dirty: Vec<serde_json::Value> = serde_json::from_str(&map.stdout_text()).unwrap();
    let dirty: Vec<(u64, u64)> = dirty
        .iter()
        .filter(|e| e["type"] == 1)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, vec![(2 * MIB, 64 << 10), (6 * MIB, MIB)]);
    let stderr = copy.expect_ok();
    assert!(stderr.contains("read 64.0 KiB"), "{stderr}");
    let got = std::fs::read(&dst).unwrap();
    assert!(
        got[2 << 20..(2 << 20) + (64 << 10)]
            .iter()
            .all(|b| *b == 0xbb)
    );
    assert!(got[6 << 20..7 << 20].iter().all(|b| *b == 0));
    assert!(got[0..2 << 20].iter().all(|b| *b == 0xaa));
    assert!(got[7 << 20..8 << 20].iter().all(|b| *b == 0xaa));
}

#[test]
fn incremental_usage_errors_exit_2() {
    let dir = testutil::temp_dir();
    let (src, _layout) = make_sample(dir.path(), "src.raw");
    let src_s = src.to_str().unwrap();
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, b"previous copy").unwrap();
    let dst_s = dst.to_str().unwrap();
    for (args, says) in [
        // A local file has no dirty extents.
        (vec!["--incremental", src_s, dst_s], "dirty extents"),
        // --bitmap names an NBD bitmap; imageio URLs take --incremental.
        (
            vec!["--bitmap", "b0", "http://127.0.0.1:9/images/x", dst_s],
            "--incremental",
        ),
        // The block hash covers the whole source; an incremental copy reads only changes.
        (
            vec!["--blkhash", "--bitmap", "b0", "nbd://127.0.0.1:9", dst_s],
            "--blkhash",
        ),
    ] {
        let mut all = vec!["copy"];
        all.extend(args.iter().copied());
        let run = ferry(all).run();
        assert!(
            run.expect_code(2).contains(says),
            "{args:?}: {}",
            run.stderr
        );
    }
    // Refused before anything was opened: the destination is untouched.
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous copy");
}
