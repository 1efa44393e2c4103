//! `ferry serve` under load, bounded: 64 concurrent uploads and then 64 concurrent downloads by
//! 64 curl processes, under a global bandwidth limit so the run takes seconds whatever the
//! machine. Every transfer completes with the right bytes, the slowest moves at least half as
//! fast as the median (fair share), and the server's peak memory stays under the documented
//! bound of about 21 MiB per transfer. The full-size comparison with the ovirt-imageio daemon
//! is `bench/load`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testutil::FerryServe;

const MIB: u64 = 1 << 20;
const TRANSFERS: usize = 64;
const SIZE: u64 = 2 * MIB;

/// Peak resident memory of `pid` (VmHWM), bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib << 10
}

/// Runs `clients` to the end; returns each one's rate in bytes per second.
fn rates(clients: Vec<(Child, Instant)>) -> Vec<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    for (mut child, started) in clients {
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "a curl client failed: {status}");
                break Instant::now();
            }
            assert!(Instant::now() < deadline, "a transfer did not finish");
            std::thread::sleep(Duration::from_millis(5));
        };
        out.push(SIZE as f64 / (finished - started).as_secs_f64());
    }
    out
}

fn check_fair(what: &str, mut rates: Vec<f64>) {
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let slowest = rates[0];
    eprintln!(
        "{what}: {} transfers, slowest {:.2} MiB/s, median {:.2} MiB/s, fastest {:.2} MiB/s",
        rates.len(),
        slowest / MIB as f64,
        median / MIB as f64,
        rates[rates.len() - 1] / MIB as f64
    );
    assert!(
        slowest >= 0.5 * median,
        "{what}: the slowest transfer ({slowest:.0} B/s) is under half the median ({median:.0} B/s)"
    );
}

#[test]
fn sixty_four_concurrent_uploads_and_downloads_are_fair_and_bounded() {
    let dir = testutil::temp_dir();
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--no-tls".into(),
        // 64 MiB/s for all: each transfer gets about 1 MiB/s when all run.
        "--bwlimit".into(),
        "64M".into(),
    ];
    for i in 0..TRANSFERS {
        let disk = dir.path().join(format!("disk{i}"));
        std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
        let doc = serde_json::json!({"uuid": format!("t{i}"), "size": SIZE,
            "ops": ["read", "write"], "timeout": 300,
            "url": format!("file://{}", disk.display())});
        let path = dir.path().join(format!("t{i}.json"));
        std::fs::write(&path, doc.to_string()).unwrap();
        args.push("--ticket".into());
        args.push(path.display().to_string());
        testutil::random_file(&dir.path().join(format!("src{i}")), SIZE, i as u64 + 1);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serve = FerryServe::start(Path::new(env!("CARGO_BIN_EXE_ferry")), dir.path(), &args);
    let url = |i: usize| format!("http://127.0.0.1:{}/images/t{i}", serve.port());
    let curl = |extra: &[String], i: usize| {
        let child = Command::new("curl")
            .args(["-sS", "--fail"])
            .args(extra)
            .arg(url(i))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        (child, Instant::now())
    };

    let uploads: Vec<_> = (0..TRANSFERS)
        .map(|i| {
            let src = format!("@{}", dir.path().join(format!("src{i}")).display());
            curl(&["-X".into(), "PUT".into(), "--data-binary".into(), src], i)
        })
        .collect();
    check_fair("uploads", rates(uploads));
    for i in 0..TRANSFERS {
        assert!(
            std::fs::read(dir.path().join(format!("disk{i}"))).unwrap()
                == std::fs::read(dir.path().join(format!("src{i}"))).unwrap(),
            "upload {i} landed whole"
        );
    }

    let downloads: Vec<_> = (0..TRANSFERS)
        .map(|i| {
            let out = dir.path().join(format!("out{i}")).display().to_string();
            curl(&["-o".into(), out], i)
        })
        .collect();
    check_fair("downloads", rates(downloads));
    for i in 0..TRANSFERS {
        assert!(
            std::fs::read(dir.path().join(format!("out{i}"))).unwrap()
                == std::fs::read(dir.path().join(format!("src{i}"))).unwrap(),
            "download {i} is the image"
        );
    }

    // The documented bound is about 21 MiB per transfer of buffers; a transfer smaller than its
    // buffers holds at most its size plus hyper's 1 MiB read buffer. Plus the process itself.
    let peak = peak_rss(serve.pid());
    let per_transfer = (21 * MIB).min(SIZE + 2 * MIB);
    let bound = TRANSFERS as u64 * per_transfer + 64 * MIB;
    eprintln!("ferry serve peak RSS: {} MiB", peak / MIB);
    assert!(
        peak < bound,
        "peak RSS {} MiB over the bound {} MiB",
        peak / MIB,
        bound / MIB
    );
}
