//! `ferry info` and `ferry map` on imageio URLs, and incremental downloads from the
//! ovirt-imageio daemon's dirty extents: what the daemon says about a ticket must agree with
//! what its NBD backend says directly.

mod common;

use common::*;
use testutil::QemuNbd;
use testutil::imageio::{ImageioServer, ServerOptions, ticket_json};

#[test]
fn info_and_map_of_a_daemon_ticket_agree_with_its_nbd_backend() {
    let daemon = ImageioServer::daemon(&ServerOptions::default());
    let dir = testutil::temp_dir();
    let (raw, layout) = make_sample(dir.path(), "sample.raw");
    let size = layout.size();
    let nbd = QemuNbd::new(&raw).read_only().shared(8).start();
    daemon.nbd_ticket("info", nbd.socket().unwrap(), size, &["read"]);
    let url = daemon.url("info");

    let text = ferry(["info", &url]).run();
    let text = text.expect_ok().to_string() + &text.stdout_text();
    assert!(text.contains("protocol: imageio"), "{text}");
    assert!(text.contains(&format!("size: {size} ")), "{text}");
    assert!(text.contains("writable: false"), "{text}");
    let json = ferry(["info", "--json", &url]).run();
    json.expect_ok();
    let doc: serde_json::Value = serde_json::from_str(&json.stdout_text()).unwrap();
    assert_eq!(doc["size"], size);
    assert_eq!(doc["protocol"], "imageio");
    let features: Vec<&str> = doc["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(features, ["checksum", "extents"], "a read-only ticket");
    assert_eq!(doc["max_readers"], 8);

    // The daemon's zero extents against qemu-nbd's own base:allocation: the same data/zero
    // layout (the daemon reports raw holes as zero, not hole, so compare the zero bit).
    let zero_ranges = |stdout: String| -> Vec<(u64, u64, bool)> {
        let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for r in rows {
            let (o, l) = (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap());
            let zero = r["type"].as_u64().unwrap() & 2 != 0;
            match out.last_mut() {
                Some(last) if last.2 == zero && last.0 + last.1 == o => last.1 += l,
                _ => out.push((o, l, zero)),
            }
        }
        out
    };
    let via_http = ferry(["map", "--json", &url]).run();
    via_http.expect_ok();
    let via_nbd = ferry(["map", "--json", &nbd.nbd_uri()]).run();
    via_nbd.expect_ok();
    let http_map = zero_ranges(via_http.stdout_text());
    assert_eq!(http_map, zero_ranges(via_nbd.stdout_text()));
    assert_eq!(http_map.last().map(|e| e.0 + e.1), Some(size));
    assert!(http_map.iter().any(|e| e.2) && http_map.iter().any(|e| !e.2));

    // An unknown ticket: exit 1 naming the server's refusal.
    let run = ferry(["info", &daemon.url("nope")]).run();
    assert!(run.expect_code(1).contains("403"), "{}", run.stderr);
}

#[test]
fn incremental_download_from_the_daemon_dirty_extents() {
    let daemon = ImageioServer::daemon(&ServerOptions::default());
    let dir = testutil::temp_dir();
    let (image, backup) = checkpointed_qcow2(
        dir.path(),
        "16M",
        &["write -P 0xaa 0 8M"],
        &["write -P 0xbb 3M 128k", "write -z 5M 1M"],
    );
    let backup_s = backup.to_str().unwrap();
    let nbd = QemuNbd::new(&image)
        .format("qcow2")
        .read_only()
        .shared(8)
        .arg("-B")
        .arg("b0")
        .start();
    let mut ticket = ticket_json(
        "inc",
        &format!("nbd:unix:{}", nbd.socket().unwrap().display()),
        16 * MIB,
        &["read"],
    );
    ticket["dirty"] = serde_json::Value::Bool(true);
    daemon.add_ticket(&ticket);
    let url = daemon.url("inc");

    let map = ferry(["map", "--json", "--context", "dirty", &url]).run();
    map.expect_ok();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&map.stdout_text()).unwrap();
    let dirty: Vec<(u64, u64)> = rows
        .iter()
        .filter(|r| r["type"] == 1)
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, vec![(3 * MIB, 128 << 10), (5 * MIB, MIB)]);

    let run = ferry(["copy", "-v", "--incremental", &url, backup_s]).run();
    let stderr = run.expect_ok();
    assert!(stderr.contains("read 128.0 KiB"), "{stderr}");
    let got = std::fs::read(&backup).unwrap();
    let all = |range: std::ops::Range<u64>, byte: u8| {
        got[range.start as usize..range.end as usize]
            .iter()
            .all(|b| *b == byte)
    };
    assert!(all(3 * MIB..3 * MIB + (128 << 10), 0xbb));
    assert!(all(5 * MIB..6 * MIB, 0));
    assert!(all(0..3 * MIB, 0xaa) && all(6 * MIB..8 * MIB, 0xaa));
    assert!(all(8 * MIB..16 * MIB, 0));

    // Without dirty extents on the ticket the daemon refuses, and the copy says so.
    let plain = ticket_json(
        "plain",
        &format!("nbd:unix:{}", nbd.socket().unwrap().display()),
        16 * MIB,
        &["read"],
    );
    daemon.add_ticket(&plain);
    let run = ferry(["copy", "--incremental", &daemon.url("plain"), backup_s]).run();
    let stderr = run.expect_code(1);
    assert!(
        stderr.contains("404") && stderr.contains("dirty"),
        "{stderr}"
    );
}
