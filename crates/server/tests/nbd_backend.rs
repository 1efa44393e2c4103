//! NBD tickets beyond the happy path: byte-granular requests on an export that only takes 4 KiB
//! blocks (read-modify-write at the edges), and zero extents with holes from qemu-nbd's
//! `qemu:allocation-depth` context.

mod common;

use common::{TestServer, curl};

const MIB: u64 = 1 << 20;

#[test]
fn unaligned_requests_on_a_block_aligned_export() {
    let nbdkit = testutil::Nbdkit::new("memory")
        .arg("size=1M")
        .filter("blocksize-policy")
        .args(&["blocksize-minimum=4096", "blocksize-error-policy=error"])
        .start();
    let sock = nbdkit.socket().unwrap().display().to_string();
    let srv = TestServer::start();
    srv.add_ticket(serde_json::json!({
        "uuid": "n", "size": MIB, "ops": ["write"], "timeout": 300,
        "url": format!("nbd:unix:{sock}"),
    }));
    let r = curl(&["-X", "OPTIONS", &srv.url("n")]);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["min_block_size"], 4096, "{v}");

    let mut expected = vec![0u8; MIB as usize];
    let payload = testutil::pseudo_random(5, 10_000);
    let src = srv.dir.path().join("p.bin");
    std::fs::write(&src, &payload).unwrap();
    // Spans a partial head block, two whole blocks and a partial tail block.
    let at = 100;
    let r = curl(&[
        "-T",
        &src.display().to_string(),
        "-H",
        &format!("Content-Range: bytes {at}-{}/*", at + payload.len() - 1),
        &srv.url("n"),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    expected[at..at + payload.len()].copy_from_slice(&payload);
    // Inside one block.
    std::fs::write(&src, b"xyz").unwrap();
    let r = curl(&[
        "-T",
        &src.display().to_string(),
        "-H",
        "Content-Range: bytes 20000-20002/*",
        &srv.url("n"),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    expected[20000..20003].copy_from_slice(b"xyz");

    let r = curl(&["-r", "50-12345", &srv.url("n")]);
    assert_eq!(r.status, 206, "{}", r.text());
    assert!(r.body == expected[50..12346], "unaligned read");

    let r = curl(&[
        "-X",
        "PATCH",
        "--data-binary",
        r#"{"op": "zero", "offset": 10, "size": 9000}"#,
        &srv.url("n"),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    expected[10..9010].fill(0);
    let r = curl(&[&srv.url("n")]);
    assert_eq!(r.status, 200);
    assert!(
        r.body == expected,
        "whole image after unaligned writes and zero"
    );
}

#[test]
fn extents_report_unallocated_qcow2_clusters_as_holes() {
    let dir = testutil::temp_dir();
    let qcow2 = dir.path().join("d.qcow2");
    let img = testutil::require_binary("qemu-img");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&img)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let q = qcow2.display().to_string();
    run(&["create", "-q", "-f", "qcow2", &q, "8M"]);
    let io = testutil::require_binary("qemu-io");
    for cmd in ["write -P 1 2M 64k", "write -z 4M 1M"] {
        let out = std::process::Command::new(&io)
            .args(["-f", "qcow2", "-c", cmd, &q])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let qemu = testutil::QemuNbd::new(&qcow2)
        .format("qcow2")
        .read_only()
        .allocation_depth()
        .start();
    let sock = qemu.socket().unwrap().display().to_string();
    let srv = TestServer::start();
    srv.add_ticket(serde_json::json!({
        "uuid": "q", "size": 8 * MIB, "ops": ["read"], "timeout": 300,
        "url": format!("nbd:unix:{sock}"),
    }));
    let r = curl(&[&format!("{}/extents", srv.url("q"))]);
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!([
            {"start": 0, "length": 2 * MIB, "zero": true, "hole": true},
            {"start": 2 * MIB, "length": 64 << 10, "zero": false, "hole": false},
            {"start": 2 * MIB + (64 << 10), "length": 2 * MIB - (64 << 10), "zero": true, "hole": true},
            {"start": 4 * MIB, "length": MIB, "zero": true, "hole": false},
            {"start": 5 * MIB, "length": 3 * MIB, "zero": true, "hole": true},
        ])
    );
    // A read-only ticket opens a read-only export fine, and a write ticket is refused there.
    srv.add_ticket(serde_json::json!({
        "uuid": "w", "size": 8 * MIB, "ops": ["write"], "timeout": 300,
        "url": format!("nbd:unix:{sock}"),
    }));
    let r = curl(&["-X", "OPTIONS", &srv.url("w")]);
    assert_eq!(r.status, 500);
}
