//! `kill -9` of `ferry copy --resume` at about 10 %, 50 % and 90 % of a copy into a file, into
//! qemu-nbd and into an imageio ticket (`ferry serve`), then the same command again: the
//! result equals the source, and the bytes read again — counted by nbdkit's `log` filter on
//! the source — are at most one checkpoint interval of progress plus what was in flight.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use testutil::imageio::{ImageioServer, ServerOptions};
use testutil::{Nbdkit, QemuNbd};

const SIZE: u64 = 48 << 20;
/// The delay of each read while the copy is to be killed: with reads served one at a time,
/// 1 MiB every 160 ms is 6.5 MB/s, steady (the rate filter would start with a burst), so the
/// copy takes about 8 s and checkpoints come before it is killed at 50 and 90 %.
const SLOW_READ: &str = "160ms";
/// Bytes in flight per pipeline (`--queue-size`), and pipelines at most (one per core here,
/// and at most as many as the machine has; two bounds what a 2-core machine runs).
const QUEUE: u64 = 4 << 20;
/// Checkpoints come at least this often.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
const HANG_BOUND: Duration = Duration::from_secs(60);

/// The bytes nbdkit's `pattern` plugin serves: every 8-byte word holds its own offset.
fn pattern_bytes(size: u64) -> Vec<u8> {
    (0..size / 8).flat_map(|w| (w * 8).to_be_bytes()).collect()
}

/// Bytes the log filter saw read (`Read … count=0x…` request lines).
fn bytes_read(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(" Read id=") && !l.contains("...Read"))
        .filter_map(|l| l.split("count=0x").nth(1))
        .filter_map(|c| u64::from_str_radix(c.split_whitespace().next()?, 16).ok())
        .sum()
}

/// The last `N/100` line of a progress file.
fn percent(progress: &Path) -> u64 {
    std::fs::read_to_string(progress)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.strip_suffix("/100")?.trim().parse().ok())
        .unwrap_or(0)
}

/// The pattern source on a fixed socket (so the URI the journal names stays the same), each
/// read delayed by `delay` and served one at a time, logging its requests to `log`.
fn source(socket: &Path, log: &Path, delay: &str) -> testutil::Peer {
    Nbdkit::new("pattern")
        .unix_socket(socket)
        .filter("log")
        .filter("noparallel")
        .filter("delay")
        .args(&[
            &format!("size={SIZE}"),
            &format!("delay-read={delay}"),
            "serialize=requests",
            &format!("logfile={}", log.display()),
        ])
        .read_only()
        .start()
}

/// Kills `ferry copy --resume` into `dst` at about `at` percent, runs it again, and checks
/// the result (read back by `read_back`) and how much was read twice.
fn kill_and_resume(dir: &Path, at: u64, dst: &str, read_back: &dyn Fn() -> Vec<u8>) {
    let socket = dir.join(format!("src-{at}.sock"));
    let (log1, log2) = (
        dir.join(format!("run1-{at}.log")),
        dir.join(format!("run2-{at}.log")),
    );
    let journal = dir.join(format!("copy-{at}.journal"));
    let progress = dir.join(format!("progress-{at}"));
    let server = source(&socket, &log1, SLOW_READ);
    let uri = server.nbd_uri();
    let j = journal.to_str().unwrap().to_string();
    let queue = QUEUE.to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["copy", "--queue-size", &queue, "--resume", &j]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend([uri.clone(), dst.to_string()]);
        a
    };
    let started = Instant::now();
    let mut running = ferry(args(&["--progress=3"]))
        .fd3(std::fs::File::create(&progress).unwrap())
        .spawn();
    assert!(
        wait_until(HANG_BOUND, || percent(&progress) >= at
            || !running.is_running()),
        "no progress"
    );
    assert!(running.is_running(), "the copy ended before {at} %");
    running.signal(libc::SIGKILL);
    let elapsed = started.elapsed();
    let killed = running.wait(HANG_BOUND);
    assert_eq!(killed.code(), None, "killed by a signal");
    // Started again in place (nbdkit 1.32 may crash when a client dies with requests in
    // flight), fast now.
    drop(server);
    let first = bytes_read(&log1);
    let server = source(&socket, &log2, "0ms");
    let resumed = ferry(args(&["-v"])).timeout(HANG_BOUND).run();
    resumed.expect_ok();
    drop(server);
    assert!(!journal.exists(), "a completed copy removes its journal");
    assert_same_bytes(
        &read_back(),
        &pattern_bytes(SIZE),
        &format!("killed at {at} % into {dst}, resumed"),
    );
    let again = first + bytes_read(&log2) - SIZE;
    // One checkpoint interval of progress at the rate the first run made, plus the queues.
    let rate = first as f64 / elapsed.as_secs_f64();
    let interval = (rate * CHECKPOINT_EVERY.as_secs_f64() * 1.25) as u64;
    let in_flight = 2 * QUEUE;
    assert!(
        again <= interval + in_flight,
        "killed at {at} % into {dst}: {again} bytes read twice, more than one checkpoint \
         interval ({interval}) plus the queues ({in_flight}); first run read {first}"
    );
    eprintln!(
        "killed at {at} % ({first} bytes read) into {dst}: {again} bytes read again \
         (bound {})",
        interval + in_flight
    );
}

#[test]
fn killed_copies_into_a_file_resume() {
    let dir = testutil::temp_dir();
    for at in [10, 50, 90] {
        let dst: PathBuf = dir.path().join(format!("dst-{at}.raw"));
        let d = dst.clone();
        kill_and_resume(dir.path(), at, dst.to_str().unwrap(), &move || {
            std::fs::read(&d).unwrap()
        });
    }
}

#[test]
fn killed_copies_into_qemu_nbd_resume() {
    let dir = testutil::temp_dir();
    for at in [10, 50, 90] {
        let dst = dir.path().join(format!("dst-{at}.raw"));
        std::fs::File::create(&dst)
            .and_then(|f| f.set_len(SIZE))
            .unwrap();
        let server = QemuNbd::new(&dst).shared(8).start();
        let d = dst.clone();
        kill_and_resume(dir.path(), at, &server.nbd_uri(), &move || {
            std::fs::read(&d).unwrap()
        });
    }
}

#[test]
fn killed_copies_into_an_imageio_ticket_resume() {
    let dir = testutil::temp_dir();
    let serve = ImageioServer::ferry_serve(Path::new(ferry_bin()), &ServerOptions::default());
    for at in [10, 50, 90] {
        let dst = dir.path().join(format!("dst-{at}.raw"));
        std::fs::write(&dst, vec![0xEE; SIZE as usize]).unwrap();
        let id = format!("resume-{at}");
        serve.file_ticket(&id, &dst, SIZE, &["write"]);
        let d = dst.clone();
        kill_and_resume(dir.path(), at, &serve.url(&id), &move || {
            std::fs::read(&d).unwrap()
        });
    }
}
