//! PUT bodies sent with `Content-Encoding: zstd` (ferry's extension, advertised in OPTIONS as
//! `ferry_encodings`), sent with curl: a good body lands decoded and counts its compressed
//! size on the wire; corrupt, truncated, too long and too short bodies are 400 and leave the
//! image as it was; an encoding the server does not know is 415.

mod common;

use std::path::Path;

use common::{CurlResult, TestServer, curl, data_file};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

fn server() -> (TestServer, std::path::PathBuf, Vec<u8>) {
    let srv = TestServer::start();
    let path = srv.dir.path().join("disk.raw");
    let data = data_file(&path, SIZE, MIB as usize, 5);
    srv.file_ticket("rw", &path, SIZE, &["read", "write"]);
    srv.file_ticket("ro", &path, SIZE, &["read"]);
    (srv, path, data)
}

/// Text-like data: compresses several times over.
fn compressible(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0u64;
    while out.len() < n {
        out.extend_from_slice(
            format!("line {i} of a log file, value {}\n", i * 7919 % 1000).as_bytes(),
        );
        i += 1;
    }
    out.truncate(n);
    out
}

fn put(srv: &TestServer, dir: &Path, body: &[u8], headers: &[&str]) -> CurlResult {
    let file = dir.join("body");
    std::fs::write(&file, body).unwrap();
    let mut args: Vec<String> = vec![
        "-X".into(),
        "PUT".into(),
        "--data-binary".into(),
        format!("@{}", file.display()),
        "-H".into(),
        "Content-Type:".into(),
    ];
    for h in headers {
        args.push("-H".into());
        args.push(h.to_string());
    }
    args.push(format!("{}?flush=y", srv.url("rw")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(&args)
}

/// One zstd frame with a content checksum, as ferry's client sends them: without one, a
/// corrupted body can decode to other bytes of the right length.
fn zstd(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_checksum(true).unwrap();
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn metric(srv: &TestServer, name: &str) -> u64 {
    let text = srv.store().metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn options_offer_zstd_to_writers_only() {
    let (srv, _, _) = server();
    let r = curl(&["-X", "OPTIONS", &srv.url("rw")]);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["ferry_encodings"], serde_json::json!(["zstd"]));
    let r = curl(&["-X", "OPTIONS", &srv.url("ro")]);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v.get("ferry_encodings").is_none(), "{v}");
}

#[test]
fn a_zstd_body_lands_decoded_and_is_counted_compressed() {
    let (srv, path, mut expected) = server();
    expected.resize(SIZE as usize, 0);
    let dir = testutil::temp_dir();
    // Two frames back to back, across the server's chunk boundary.
    let at = 3 * MIB + 4096;
    let a = compressible(3 * MIB as usize);
    let b = testutil::pseudo_random(9, MIB as usize + 100);
    let mut body = zstd(&a);
    body.extend_from_slice(&zstd(&b));
    let len = (a.len() + b.len()) as u64;
    let r = put(
        &srv,
        dir.path(),
        &body,
        &[
            "Content-Encoding: zstd",
            &format!("Content-Range: bytes {at}-{}/*", at + len - 1),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    expected[at as usize..at as usize + a.len()].copy_from_slice(&a);
    expected[at as usize + a.len()..(at + len) as usize].copy_from_slice(&b);
    let got = std::fs::read(&path).unwrap();
    assert!(got == expected, "the image differs from what was sent");
    let wire = metric(&srv, "ferry_upload_wire_bytes_total{encoding=\"zstd\"}");
    assert_eq!(wire, body.len() as u64);
    assert!(wire < len / 2, "{wire} bytes on the wire for {len}");
    let written = metric(&srv, "ferry_bytes_total{op=\"write\"}")
        + metric(&srv, "ferry_bytes_total{op=\"zero\"}");
    assert_eq!(written, len, "{}", srv.store().metrics.encode());
}

#[test]
fn bad_zstd_bodies_are_refused_and_write_nothing() {
    let (srv, path, mut expected) = server();
    expected.resize(SIZE as usize, 0);
    let dir = testutil::temp_dir();
    let data = compressible(2 * MIB as usize);
    let good = zstd(&data);
    let range = |n: u64| format!("Content-Range: bytes 4096-{}/*", 4096 + n - 1);
    let n = data.len() as u64;
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "not zstd at all",
            b"this is not a zstd stream".repeat(100),
            range(n),
        ),
        ("cut short", good[..good.len() / 2].to_vec(), range(n)),
        (
            "corrupt in the middle",
            {
                let mut g = good.clone();
                let mid = g.len() / 2;
                for b in &mut g[mid..mid + 64] {
                    *b ^= 0x5a;
                }
                g
            },
            range(n),
        ),
        // A body decoding to more than declared: a small body cannot make the server write
        // (or decode) past its range.
        (
            "longer than declared",
            zstd(&vec![0x41; 64 * MIB as usize]),
            range(n),
        ),
        ("shorter than declared", good.clone(), range(n + 1)),
    ];
    for (what, body, range) in cases {
        let r = put(&srv, dir.path(), &body, &["Content-Encoding: zstd", &range]);
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert!(r.text().contains("zstd"), "{what}: {}", r.text());
        let got = std::fs::read(&path).unwrap();
        assert!(got == expected, "{what}: the image changed");
    }
    // Without the range's end there is no length to decode to.
    let r = put(
        &srv,
        dir.path(),
        &good,
        &["Content-Encoding: zstd", "Content-Range: bytes 0-*/*"],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = put(&srv, dir.path(), &good, &["Content-Encoding: zstd"]);
    assert_eq!(r.status, 400, "{}", r.text());
    // The same body, declared right, lands.
    let r = put(
        &srv,
        dir.path(),
        &good,
        &["Content-Encoding: zstd", &range(n)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    expected[4096..4096 + data.len()].copy_from_slice(&data);
    assert!(std::fs::read(&path).unwrap() == expected);
}

#[test]
fn an_unknown_encoding_is_415_and_not_written_as_data() {
    let (srv, path, expected) = server();
    let dir = testutil::temp_dir();
    let body = b"\x1f\x8b compressed bytes that must not land".to_vec();
    let range = format!("Content-Range: bytes 0-{}/*", body.len() - 1);
    for enc in ["gzip", "zstd, br", "x-unknown"] {
        let r = put(
            &srv,
            dir.path(),
            &body,
            &[&format!("Content-Encoding: {enc}"), &range],
        );
        assert_eq!(r.status, 415, "{enc}: {}", r.text());
    }
    let got = std::fs::read(&path).unwrap();
    assert!(got[..expected.len()] == expected[..], "the image changed");
    // identity is no encoding at all.
    let r = put(
        &srv,
        dir.path(),
        &body,
        &["Content-Encoding: identity", &range],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&std::fs::read(&path).unwrap()[..body.len()], &body[..]);
}
