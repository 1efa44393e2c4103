//! What `ferry copy` reports about itself: the `--stats-json` summary (bytes by kind, requests,
//! retries, seconds per phase, rates) of a successful and of a failed copy, and the
//! `--progress=json` lines (phase, bytes done and total, percent, rate, ETA, retries).

mod common;

use common::*;
use testutil::Nbdkit;

fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("reading the stats file");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn stats_json_counts_bytes_requests_and_phases() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    let stats = dir.path().join("stats.json");
    ferry([
        "copy",
        "--flush",
        "--verify",
        "--stats-json",
        stats.to_str().unwrap(),
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ])
    .run()
    .expect_ok();
    assert_file_matches(&dst, &layout);
    let v = read_json(&stats);
    assert_eq!(v["result"], "ok", "{v:#}");
    assert!(v["error"].is_null(), "{v:#}");
    assert_eq!(v["source"], src.to_str().unwrap());
    assert_eq!(v["size"], layout.size(), "{v:#}");
    let bytes = &v["bytes"];
    let n = |key: &str| {
        bytes[key]
            .as_u64()
            .unwrap_or_else(|| panic!("bytes.{key}: {v:#}"))
    };
    // Only the data runs are written; zeroes (written or holes) are zeroed or skipped.
    assert_eq!(n("data"), data_bytes(&layout), "{v:#}");
    assert_eq!(n("data") + n("zero") + n("skipped"), layout.size(), "{v:#}");
    assert_eq!(n("done"), layout.size(), "{v:#}");
    assert!(n("read") >= n("data"), "{v:#}");
    let reads = v["requests"]["read"].as_u64().unwrap();
    let writes = v["requests"]["write"].as_u64().unwrap();
    // At most 256 KiB a request by default: at least that many requests for the data.
    assert!(reads >= data_bytes(&layout) / (256 * KIB), "{v:#}");
    assert!(writes >= 1, "{v:#}");
    assert_eq!(v["retries"], 0);
    let s = |key: &str| {
        v["seconds"][key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {v:#}"))
    };
    for phase in ["copy", "flush", "verify"] {
        assert!(s(phase) > 0.0, "no time in {phase}: {v:#}");
    }
    assert!((s("total") - s("copy") - s("flush") - s("verify")).abs() < 1e-6);
    let rate = v["rates"]["copy"].as_f64().unwrap();
    assert!(
        (rate - layout.size() as f64 / s("copy")).abs() < 1.0,
        "{v:#}"
    );
    assert!(v["rates"]["total"].as_f64().unwrap() < rate, "{v:#}");
    assert!(v["verified"]["digest"].is_string(), "{v:#}");
}

#[test]
fn stats_json_of_a_failed_copy_says_why() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let server = Nbdkit::new("memory")
        .filter("error")
        .arg(&format!("size={}", layout.size()))
        .args(&["error-pwrite=ENOSPC", "error-pwrite-rate=100%"])
        .start();
    let stats = dir.path().join("stats.json");
    let uri = server.nbd_uri();
    ferry([
        "copy",
        "--stats-json",
        stats.to_str().unwrap(),
        src.to_str().unwrap(),
        &uri,
    ])
    .run()
    .expect_code(1);
    let v = read_json(&stats);
    assert_eq!(v["result"], "failed", "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("ENOSPC"), "{v:#}");
    assert_eq!(v["destination"], uri.as_str());
    assert!(v["bytes"]["data"].is_null(), "{v:#}");
}

#[test]
fn progress_json_lines_have_phase_rate_and_eta() {
    // 16 MiB at 4 MB/s (nbdkit's rate is in bits), after a burst of about 8 MiB the filter
    // lets through at once: about two seconds, several lines.
    let server = Nbdkit::new("pattern")
        .filter("rate")
        .args(&["size=16M", "rate=32M"])
        .start();
    let dir = testutil::temp_dir();
    let dst = dir.path().join("dst.raw");
    let run = ferry([
        "copy",
        "--progress=json",
        // One connection: nbdkit's rate filter limits each connection's requests.
        "-C",
        "1",
        &server.nbd_uri(),
        dst.to_str().unwrap(),
    ])
    .run();
    let stderr = run.expect_ok();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(lines.len() >= 3, "{stderr}");
    let keys = [
        "transferred",
        "size",
        "elapsed",
        "phase",
        "percent",
        "rate",
        "eta",
        "retries",
    ];
    for v in &lines {
        for key in keys {
            assert!(v.get(key).is_some(), "{key} missing: {v}");
        }
        assert_eq!(v["size"], 16 * MIB, "{v}");
    }
    // The last line written part-way through the copy. (A periodic line can fall on the very
    // end of the copy, saying "copy" at 100 % or already "done", so it is not always the one
    // before the final line.)
    let middle = lines
        .iter()
        .rev()
        .find(|v| {
            v["phase"] == "copy"
                && v["transferred"]
                    .as_u64()
                    .is_some_and(|t| t > 0 && t < 16 * MIB)
        })
        .unwrap_or_else(|| panic!("no line written while copying: {stderr}"));
    assert_eq!(middle["phase"], "copy", "{stderr}");
    let (done, rate) = (
        middle["transferred"].as_u64().unwrap(),
        middle["rate"].as_f64().unwrap(),
    );
    assert!(done > 0 && done < 16 * MIB && rate > 0.0, "{stderr}");
    let eta = middle["eta"].as_f64().expect("an ETA while copying");
    assert!(
        (eta - (16 * MIB - done) as f64 / rate).abs() < 0.01,
        "{middle}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["phase"], "done", "{stderr}");
    assert_eq!(last["percent"], 100);
    assert_eq!(last["transferred"], 16 * MIB);
    // Bytes done never go back.
    for pair in lines.windows(2) {
        assert!(pair[0]["transferred"].as_u64() <= pair[1]["transferred"].as_u64());
    }
}
