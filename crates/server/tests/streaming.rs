//! Bodies stream: uploading and downloading an image much larger than the server's buffers
//! leaves the (in-process) server's peak memory far below the image size. Alone in its test
//! binary, so no other test's allocations blur the measurement.

mod common;

use common::{TestServer, curl};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 1024 * MIB;
/// Allowed growth of peak RSS: buffers in flight, the buffer pool's cache, hyper's buffers.
const BUDGET: u64 = 128 * MIB;

/// Peak resident set size of this process, from /proc.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kib * 1024
}

#[test]
fn one_gib_upload_and_download_stay_within_a_small_memory_budget() {
    let srv = TestServer::start();
    // Source: markers at the start, middle and end, holes between (cheap to read and write).
    let layout = testutil::Layout::new()
        .data(MIB, 1)
        .hole(SIZE / 2 - MIB)
        .data(MIB, 2)
        .hole(SIZE / 2 - 2 * MIB)
        .data(MIB, 3);
    let src = srv.dir.path().join("src.raw");
    testutil::make_sparse_image(&src, &layout);
    let dst = srv.dir.path().join("dst.raw");
    std::fs::File::create(&dst).unwrap().set_len(SIZE).unwrap();
    srv.file_ticket("big", &dst, SIZE, &["read", "write"]);
    let before = peak_rss();

    let r = curl(&["-T", &src.display().to_string(), &srv.url("big")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let after_upload = peak_rss();
    assert!(
        after_upload - before < BUDGET,
        "peak RSS grew by {} MiB uploading {} MiB",
        (after_upload - before) >> 20,
        SIZE >> 20
    );

    let back = srv.dir.path().join("back.raw");
    let status = std::process::Command::new("curl")
        .args(["-s", "-S", "-o"])
        .arg(&back)
        .arg(srv.url("big"))
        .status()
        .unwrap();
    assert!(status.success());
    let after_download = peak_rss();
    assert!(
        after_download - before < BUDGET,
        "peak RSS grew by {} MiB downloading {} MiB",
        (after_download - before) >> 20,
        SIZE >> 20
    );
    assert_eq!(std::fs::metadata(&back).unwrap().len(), SIZE);
    let check = |path: &std::path::Path| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path).unwrap();
        for (off, seed) in [(0, 1), (SIZE / 2, 2), (SIZE - MIB, 3)] {
            let mut buf = vec![0u8; MIB as usize];
            f.read_exact_at(&mut buf, off).unwrap();
            assert!(
                buf == testutil::pseudo_random(seed, MIB as usize),
                "data at {off}"
            );
        }
    };
    check(&dst);
    check(&back);
}
