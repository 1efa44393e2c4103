//! `/images/{id}/checksum` and `/checksum/algorithms` against the real ovirt-imageio 2.5.1
//! daemon: the same image behind the same qemu-nbd server (nbd tickets) and as a file ticket,
//! several algorithms and block sizes, every answer compared whole (algorithm, block size,
//! checksum) and with the blkhash reference over the image's bytes. Parameter errors get the
//! daemon's status codes, and a failed authorization closes the connection.

mod common;

use common::{TestServer, curl};
use testutil::imageio::{ImageioServer, ServerOptions};

const MIB: u64 = 1 << 20;

/// Data, explicit zeroes and holes with boundaries inside blocks; the size is not a multiple
/// of any block size, so the last block is short.
fn layout() -> testutil::Layout {
    testutil::Layout::new()
        .data(3 * MIB + 4096, 1)
        .hole(5 * MIB)
        .zero(2 * MIB + 8192)
        .data(MIB + 4096, 2)
        .hole(9 * MIB - 12288)
        .data(64 << 10, 3)
        .hole(3 * MIB + 12288)
}

fn checksum_doc(url: &str) -> serde_json::Value {
    let r = curl(&[url]);
    assert_eq!(r.status, 200, "{url}: {}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json"),
        "{url}"
    );
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{url}: {e}: {}", r.text()))
}

/// (query, algorithm name for the reference, block size)
const CASES: &[(&str, &str, u64)] = &[
    ("", "blake2b", 4 * MIB),
    ("?block_size=1048576", "blake2b", MIB),
    ("?algorithm=sha1", "sha1", 4 * MIB),
    ("?algorithm=sha256&block_size=16777216", "sha256", 16 * MIB),
    ("?algorithm=md5&block_size=1060864", "md5", MIB + 12288),
    (
        "?algorithm=sha3_512&block_size=2097152",
        "sha3_512",
        2 * MIB,
    ),
    ("?algorithm=blake2s", "blake2s", 4 * MIB),
];

#[test]
fn same_checksums_as_the_imageio_daemon() {
    let dir = testutil::temp_dir();
    let path = dir.path().join("img.raw");
    let layout = layout();
    let size = testutil::make_sparse_image(&path, &layout);
    let image = layout.expected();
    let qemu = testutil::QemuNbd::new(&path).read_only().shared(8).start();
    let sock = qemu.socket().unwrap().to_path_buf();

    let daemon = ImageioServer::daemon(&ServerOptions::default());
    daemon.nbd_ticket("nbd", &sock, size, &["read"]);
    daemon.file_ticket("file", &path, size, &["read"]);
    let ferry = TestServer::start();
    for (id, url) in [
        ("nbd", format!("nbd:unix:{}", sock.display())),
        ("file", format!("file://{}", path.display())),
    ] {
        ferry.add_ticket(serde_json::json!({
            "uuid": id, "size": size, "ops": ["read"], "timeout": 300, "url": url,
        }));
    }

    for id in ["nbd", "file"] {
        for (query, alg, block) in CASES {
            let theirs = checksum_doc(&format!("{}/checksum{query}", daemon.url(id)));
            let ours = checksum_doc(&format!("{}/checksum{query}", ferry.url(id)));
            assert_eq!(ours, theirs, "{id} ticket, query {query:?}");
            let spec = blkhash::Spec::new(
                blkhash::Kind::Imageio,
                Some(alg.parse().unwrap()),
                Some(*block),
            )
            .unwrap();
            let reference = blkhash::reference::checksum(&spec, &image).to_hex();
            assert_eq!(ours["checksum"], reference.as_str(), "{id} {query:?}");
        }
    }
}

#[test]
fn algorithms_and_parameter_errors_match_the_daemon() {
    let dir = testutil::temp_dir();
    let path = dir.path().join("img.raw");
    let size = testutil::make_sparse_image(&path, &testutil::Layout::new().data(MIB, 7));
    let daemon = ImageioServer::daemon(&ServerOptions::default());
    daemon.file_ticket("t", &path, size, &["read"]);
    let ferry = TestServer::start();
    ferry.file_ticket("t", &path, size, &["read"]);

    // The list needs no ticket; ferry's holds only names that work, all of them the daemon's.
    let list = |base: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(
            &curl(&[&format!("{base}/no-such-ticket/checksum/algorithms")]).body,
        )
        .unwrap();
        serde_json::from_value(v["algorithms"].clone()).unwrap()
    };
    let ours = list(ferry.url("").trim_end_matches('/'));
    let theirs = list(daemon.url("").trim_end_matches('/'));
    assert!(ours.len() >= 12, "{ours:?}");
    let mut sorted = ours.clone();
    sorted.sort();
    assert_eq!(ours, sorted);
    for name in &ours {
        assert!(
            theirs.contains(name),
            "{name} not in the daemon's {theirs:?}"
        );
        let r = curl(&[&format!("{}/checksum?algorithm={name}", ferry.url("t"))]);
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }

    for (query, message) in [
        (
            "algorithm=nope",
            "Unsupported value 'nope' for 'algorithm', expecting one of ['blake2b'",
        ),
        ("block_size=abc", "Invalid block size: 'abc'"),
        (
            "block_size=524288",
            "Block size out of allowed range: 1048576-16777216",
        ),
        (
            "block_size=33554432",
            "Block size out of allowed range: 1048576-16777216",
        ),
        ("block_size=1049088", "Block size is not aligned to 4096"),
    ] {
        let theirs = curl(&[&format!("{}/checksum?{query}", daemon.url("t"))]);
        let ours = curl(&[&format!("{}/checksum?{query}", ferry.url("t"))]);
        assert_eq!(ours.status, 400, "{query}: {}", ours.text());
        assert_eq!(theirs.status, 400, "daemon {query}: {}", theirs.text());
        assert!(ours.text().starts_with(message), "{query}: {}", ours.text());
    }

    // Unknown ticket: 403 like the daemon, but the connection closes as for every 403.
    let ours = curl(&[&format!("{}/checksum", ferry.url("nope"))]);
    let theirs = curl(&[&format!("{}/checksum", daemon.url("nope"))]);
    assert_eq!((ours.status, theirs.status), (403, 403));
    assert_eq!(ours.header("connection").as_deref(), Some("close"));
    // Only GET.
    let ours = curl(&["-X", "PUT", &format!("{}/checksum", ferry.url("t"))]);
    assert_eq!(ours.status, 405, "{}", ours.text());
}

#[test]
fn zero_extents_are_not_read() {
    // 64 GiB of holes around 1 MiB of data: reading it all would take far longer than the
    // limit below even from the page cache.
    let dir = testutil::temp_dir();
    let path = dir.path().join("sparse.raw");
    let size = 64u64 << 30;
    let data = testutil::pseudo_random(3, MIB as usize);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&data, 40 << 30).unwrap();
    }
    let ferry = TestServer::start();
    ferry.file_ticket("s", &path, size, &["read"]);
    let start = std::time::Instant::now();
    let doc = checksum_doc(&format!("{}/checksum", ferry.url("s")));
    let took = start.elapsed();
    assert!(took.as_secs() < 10, "took {took:?}");

    // The expected value from block digests: all zero blocks except the one holding data.
    let spec = blkhash::Spec::imageio();
    let alg = spec.algorithm;
    let bs = spec.block_size as usize;
    let zero = alg.hash(&vec![0u8; bs]);
    let mut block = vec![0u8; bs];
    block[..data.len()].copy_from_slice(&data);
    let data_block = alg.hash(&block);
    let blocks = (size / spec.block_size) as usize;
    let at = ((40u64 << 30) / spec.block_size) as usize;
    let mut concat = Vec::with_capacity(blocks * zero.len());
    for i in 0..blocks {
        concat.extend_from_slice(if i == at { &data_block } else { &zero });
    }
    let expected: String = alg
        .hash(&concat)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(doc["checksum"], expected.as_str());
}
