//! `ferry serve --bwlimit` and ticket limits with real `ferry copy` clients: two uploads under
//! a global limit get equal shares however many connections each uses, and a ticket's own
//! `"bwlimit"` paces its download.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use testutil::FerryServe;

const MIB: u64 = 1 << 20;

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// `mib` MiB of incompressible data.
fn image(path: &Path, mib: u64, seed: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut x = seed | 1;
    let mut block = vec![0u8; MIB as usize];
    for _ in 0..mib {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
}

/// A ticket file for `disk` (created empty when missing), with `extra` keys.
fn ticket(dir: &Path, id: &str, disk: &Path, size: u64, extra: serde_json::Value) -> PathBuf {
    if !disk.exists() {
        std::fs::File::create(disk).unwrap().set_len(size).unwrap();
    }
    let mut doc = serde_json::json!({"uuid": id, "size": size, "ops": ["read", "write"],
        "timeout": 300, "url": format!("file://{}", disk.display())});
    doc.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let path = dir.join(format!("{id}.json"));
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

/// Waits for `child` (at most `limit`) and returns when it finished.
fn finish(child: &mut Child, limit: Duration, what: &str) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{what}: {status}");
            return Instant::now();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_uploads_share_a_global_limit_equally() {
    let dir = testutil::temp_dir();
    let size = 32 * MIB;
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--no-tls".into(),
        "--bwlimit".into(),
        "8M".into(),
    ];
    let mut sources = Vec::new();
    for (i, id) in ["greedy", "modest"].iter().enumerate() {
        let src = dir.path().join(format!("{id}.src"));
        image(&src, size / MIB, 7 + i as u64);
        let t = ticket(
            dir.path(),
            id,
            &dir.path().join(format!("{id}.raw")),
            size,
            serde_json::json!({}),
        );
        args.extend(["--ticket".to_string(), t.display().to_string()]);
        sources.push(src);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let srv = FerryServe::start(Path::new(env!("CARGO_BIN_EXE_ferry")), dir.path(), &args);
    let port = srv.port();
    let url = |id: &str| format!("http://127.0.0.1:{port}/images/{id}");
    let started = Instant::now();
    // The greedy client uses four connections and large requests; the other one connection.
    let mut greedy = ferry()
        .args(["copy", "-C", "4", "--request-size", "8M"])
        .arg(&sources[0])
        .arg(url("greedy"))
        .spawn()
        .unwrap();
    let mut modest = ferry()
        .args(["copy", "-C", "1"])
        .arg(&sources[1])
        .arg(url("modest"))
        .spawn()
        .unwrap();
    let limit = Duration::from_secs(40);
    let g = finish(&mut greedy, limit, "the greedy upload") - started;
    let m = finish(&mut modest, limit, "the modest upload") - started;
    let (g, m) = (g.as_secs_f64(), m.as_secs_f64());
    // Equal shares of 8 MiB/s: both finish 32 MiB after about 8 s, together.
    let ratio = g / m;
    assert!(
        (0.85..1.15).contains(&ratio),
        "greedy took {g:.2} s, modest {m:.2} s: shares differ by more than 15 %"
    );
    let aggregate = 2.0 * size as f64 / MIB as f64 / g.max(m);
    assert!(
        aggregate < 8.0 * 1.05,
        "{aggregate:.2} MiB/s over the 8 MiB/s limit"
    );
    for (i, id) in ["greedy", "modest"].iter().enumerate() {
        let got = std::fs::read(dir.path().join(format!("{id}.raw"))).unwrap();
        assert!(
            got == std::fs::read(&sources[i]).unwrap(),
            "{id}: wrong data"
        );
    }
}

#[test]
fn a_tickets_own_limit_paces_its_download() {
    let dir = testutil::temp_dir();
    let disk = dir.path().join("disk.raw");
    image(&disk, 20, 3);
    let t = ticket(
        dir.path(),
        "down",
        &disk,
        20 * MIB,
        serde_json::json!({"bwlimit": 4 * MIB}),
    );
    let srv = FerryServe::start(
        Path::new(env!("CARGO_BIN_EXE_ferry")),
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            // The ticket's own limit wins over the default.
            "--ticket-bwlimit",
            "64M",
            "--ticket",
            t.to_str().unwrap(),
        ],
    );
    let out = dir.path().join("out.raw");
    let started = Instant::now();
    let mut child = ferry()
        .arg("copy")
        .arg(format!("http://127.0.0.1:{}/images/down", srv.port()))
        .arg(&out)
        .spawn()
        .unwrap();
    let secs =
        (finish(&mut child, Duration::from_secs(30), "the download") - started).as_secs_f64();
    let rate = 20.0 / secs;
    assert!(
        (rate - 4.0).abs() <= 0.1 * 4.0,
        "20 MiB in {secs:.2} s: {rate:.2} MiB/s, want 4 MiB/s"
    );
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&disk).unwrap());
}
