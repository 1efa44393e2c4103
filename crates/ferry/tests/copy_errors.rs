//! How `ferry copy` fails: the documented exit code (1 for a failed copy, 2 for usage), a
//! message naming the endpoint (and operation, offset and length where there is one), never a
//! panic, and never a hang: every run has a deadline, and the tests that break a copy midway
//! (a server killed, Ctrl-C) also bound how long ferry takes to stop.

mod common;

use std::time::Duration;

use common::*;
use testutil::tools::nbdcopy_read;
use testutil::{Nbdkit, QemuNbd};

/// How long ferry may take to exit once its copy is broken (server killed, SIGINT). The slowed
/// copies below would need at least three times longer to finish.
const STOP_BOUND: Duration = Duration::from_secs(5);
/// Past this, a broken copy counts as hung (and is killed).
const HANG_BOUND: Duration = Duration::from_secs(40);

/// A 64 MiB source that serves 4 MB/s (nbdkit's rate is in bits): a copy of it takes 16 s.
fn slow_source() -> testutil::Peer {
    Nbdkit::new("pattern")
        .filter("rate")
        .args(&["size=64M", "rate=32M"])
        .start()
}

#[test]
fn enospc_names_the_write_that_failed() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let server = Nbdkit::new("memory")
        .filter("error")
        .arg(&format!("size={}", layout.size()))
        .args(&["error-pwrite=ENOSPC", "error-pwrite-rate=100%"])
        .start();
    let uri = server.nbd_uri();
    let run = ferry(["copy", src.to_str().unwrap(), &uri]).run();
    let stderr = run.expect_code(1);
    for part in [
        &format!("write to {uri} at offset "),
        " length ",
        "No space left on device (ENOSPC)",
    ] {
        assert!(stderr.contains(part), "missing {part:?} in:\n{stderr}");
    }
    assert!(stderr.starts_with("ferry: "), "{stderr}");
}

#[test]
fn source_larger_than_destination_is_refused_naming_both_sizes() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let small = 4 * MIB;
    let server = Nbdkit::new("memory").arg(&format!("size={small}")).start();
    let uri = server.nbd_uri();
    let run = ferry(["copy", src.to_str().unwrap(), &uri]).run();
    let stderr = run.expect_code(1);
    assert!(
        stderr.contains(&layout.size().to_string()) && stderr.contains(&small.to_string()),
        "the message should name both sizes ({} and {small}):\n{stderr}",
        layout.size()
    );
    // Refused before anything was written.
    let back = nbdcopy_read(&uri, dir.path());
    assert!(
        back.iter().all(|b| *b == 0),
        "the destination was written to"
    );
}

#[test]
fn smaller_source_into_larger_destination_is_allowed() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let server = Nbdkit::new("memory")
        .arg(&format!("size={}", layout.size() + 3 * MIB))
        .start();
    let uri = server.nbd_uri();
    ferry(["copy", src.to_str().unwrap(), &uri])
        .run()
        .expect_ok();
    let back = nbdcopy_read(&uri, dir.path());
    let n = layout.size() as usize;
    assert_same_bytes(&back[..n], &layout.expected(), "the copied part");
    assert!(back[n..].iter().all(|b| *b == 0), "the tail changed");
}

#[test]
fn unreachable_unix_socket_fails_naming_the_uri() {
    let dir = testutil::temp_dir();
    let (src, _) = make_sample(dir.path(), "src.raw");
    let uri = format!(
        "nbd+unix:///?socket={}",
        dir.path().join("nobody-listens.sock").display()
    );
    for (a, b) in [
        (src.to_str().unwrap(), uri.as_str()),
        (uri.as_str(), "null:"),
    ] {
        let run = ferry(["copy", a, b]).run();
        assert!(run.expect_code(1).contains(&uri), "{}", run.stderr);
    }
}

#[test]
fn unreachable_tcp_server_fails_naming_the_uri() {
    let testutil::Endpoint::Tcp { host, port } = testutil::Endpoint::free_tcp() else {
        unreachable!("free_tcp gives a TCP endpoint");
    };
    let uri = format!("nbd://{host}:{port}/");
    let run = ferry(["copy", &uri, "null:"]).run();
    assert!(run.expect_code(1).contains(&uri), "{}", run.stderr);
}

#[test]
fn missing_source_file_fails_naming_it() {
    let dir = testutil::temp_dir();
    let missing = dir.path().join("no-such-image.raw");
    let run = ferry(["copy", missing.to_str().unwrap(), "null:"]).run();
    assert!(
        run.expect_code(1).contains(missing.to_str().unwrap()),
        "{}",
        run.stderr
    );
}

#[test]
fn malformed_uris_are_usage_errors() {
    let dir = testutil::temp_dir();
    let (src, _) = make_sample(dir.path(), "src.raw");
    for uri in [
        "nbd://host:notaport/",
        "nbd+unix:///",
        "nbd+unix:///?socket=",
        "nbd://[::1/",
        "nbds+unix://somehost/?socket=/tmp/x.sock",
    ] {
        for (a, b) in [(src.to_str().unwrap(), uri), (uri, "null:")] {
            let run = ferry(["copy", a, b]).run();
            assert!(
                run.expect_code(2).contains(uri),
                "the message should name {uri}:\n{}",
                run.stderr
            );
        }
    }
}

#[test]
fn bad_sizes_and_counts_are_usage_errors() {
    let dir = testutil::temp_dir();
    let (src, _) = make_sample(dir.path(), "src.raw");
    let src = src.to_str().unwrap();
    let power = "must be a power of 2 within 4096-33554432";
    let cases: &[(&[&str], &str)] = &[
        (&["--request-size=1000"], power),
        (&["--request-size=3000"], power),
        (&["--request-size=2048"], power),
        (&["--request-size=0"], power),
        (&["--request-size=64M"], power),
        (&["--request-size", "1000"], power),
        (&["--src-request-size=5000"], power),
        (&["--dst-request-size=100"], power),
        (&["--request-size=abc"], "abc"),
        (&["-S", "100"], "must be a power of 2 and >= 512"),
        (&["--sparse=3000"], "must be a power of 2 and >= 512"),
        (&["-R", "0"], "0"),
        (&["-C", "0"], "0"),
        (&["--progress=x"], "--progress"),
    ];
    for (flags, message) in cases {
        let mut args = vec!["copy"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[src, "null:"]);
        let run = ferry(&args).run();
        assert!(
            run.expect_code(2).contains(message),
            "{flags:?}: expected {message:?} in:\n{}",
            run.stderr
        );
    }
    // null: is a destination only.
    ferry(["copy", "null:", "null:"]).run().expect_code(2);
}

/// Starts a copy, checks it is still running after `after`, then runs `break_it`, and returns
/// how the copy ended (within [`HANG_BOUND`]).
fn break_midway(copy: Ferry, after: Duration, break_it: impl FnOnce(&Running)) -> Run {
    let mut running = copy.spawn();
    std::thread::sleep(after);
    assert!(
        running.is_running(),
        "the slowed copy finished before it could be broken"
    );
    break_it(&running);
    running.wait(HANG_BOUND)
}

fn kill(pid: i32) {
    // SAFETY: kill(2) on a peer this test started and has not reaped.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[test]
fn source_server_killed_midway_fails_after_its_retries_naming_it() {
    let server = slow_source();
    let uri = server.nbd_uri();
    let run = break_midway(
        ferry(["copy", "--retries=2", &uri, "null:"]),
        Duration::from_secs(1),
        |_| kill(server.pid()),
    );
    let stderr = run.expect_code(1);
    // The source dies under a read or under a block-status query, whichever was in flight.
    assert!(
        stderr.contains(&format!("read from {uri} at offset"))
            || stderr.contains(&format!("extents of {uri} at offset")),
        "{stderr}"
    );
    assert!(stderr.contains("(after 3 attempts)"), "{stderr}");
    assert!(
        run.elapsed <= STOP_BOUND,
        "took {:?} to stop after the source died: {stderr}",
        run.elapsed
    );
}

#[test]
fn destination_server_killed_midway_fails_after_its_retries_naming_it() {
    let dir = testutil::temp_dir();
    let source = slow_source();
    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst)
        .and_then(|f| f.set_len(64 * MIB))
        .unwrap();
    let destination = QemuNbd::new(&dst).start();
    let uri = destination.nbd_uri();
    let run = break_midway(
        ferry(["copy", "--retries=2", &source.nbd_uri(), &uri]),
        Duration::from_secs(1),
        |_| kill(destination.pid()),
    );
    let stderr = run.expect_code(1);
    assert!(
        stderr.contains(&uri),
        "the message should name {uri}:\n{stderr}"
    );
    assert!(
        run.elapsed <= STOP_BOUND,
        "took {:?} to stop after the destination died (the rest of the copy needs ~15 s)",
        run.elapsed
    );
}

#[test]
fn ctrl_c_interrupts_a_slow_copy_promptly() {
    let dir = testutil::temp_dir();
    let server = slow_source();
    let dst = dir.path().join("dst.raw");
    let run = break_midway(
        ferry(["copy", &server.nbd_uri(), dst.to_str().unwrap()]),
        Duration::from_secs(1),
        |r| r.signal(libc::SIGINT),
    );
    let stderr = run.expect_code(1);
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        run.elapsed <= STOP_BOUND,
        "took {:?} to stop after SIGINT (the rest of the copy needs ~15 s)",
        run.elapsed
    );
}

#[test]
fn ctrl_c_stops_a_socket_activated_server() {
    let dir = testutil::temp_dir();
    let pidfile = dir.path().join("nbdkit.pid");
    let pidfile_arg = format!("--pidfile={}", pidfile.display());
    // ferry's private socket directory goes here, to check it is removed.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // Few requests in flight, so the interrupted copy has little to drain.
    let copy = ferry([
        "copy",
        "--requests=2",
        "[",
        "nbdkit",
        &pidfile_arg,
        "--filter=rate",
        "pattern",
        "size=64M",
        "rate=32M",
        "]",
        "null:",
    ])
    .env("TMPDIR", &tmp);
    let mut running = copy.spawn();
    assert!(
        wait_until(Duration::from_secs(10), || pidfile.exists()),
        "nbdkit never wrote its pid file"
    );
    std::thread::sleep(Duration::from_millis(700));
    assert!(running.is_running(), "the slowed copy finished too early");
    running.signal(libc::SIGINT);
    let run = running.wait(HANG_BOUND);
    let stderr = run.expect_code(1);
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        !process_with_arg(pidfile_arg.as_ref()),
        "the nbdkit ferry started is still running after ferry exited"
    );
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "ferry left {left:?} behind");
}

/// The bytes nbdkit's `pattern` plugin serves: every 8-byte word holds its own offset.
fn pattern_bytes(size: u64) -> Vec<u8> {
    (0..size / 8).flat_map(|w| (w * 8).to_be_bytes()).collect()
}

/// `kill -9` in the middle of a copy with `--resume`: the same command copies only what the
/// journal does not record, the result equals the source, and the journal is removed.
#[test]
fn a_copy_killed_mid_way_resumes_from_its_journal() {
    let dir = testutil::temp_dir();
    let size = 64u64 << 20;
    // The source listens on a socket of the test's, so that it can be started again in place
    // (nbdkit 1.32 may crash when a client dies with requests in flight): the URI, and so the
    // source the journal names, stays the same.
    let socket = dir.path().join("src.sock");
    let source = |rate: &str| {
        Nbdkit::new("pattern")
            .unix_socket(&socket)
            .filter("rate")
            .args(&[&format!("size={size}"), &format!("rate={rate}")])
            .start()
    };
    // 16 Mbit/s (the rate filter counts bits): the copy would take half a minute; its first
    // checkpoint comes after 2 s.
    let server = source("16M");
    let uri = server.nbd_uri();
    let dst = dir.path().join("dst.raw");
    let journal = dir.path().join("copy.journal");
    let j = journal.to_str().unwrap();
    let d = dst.to_str().unwrap();
    let mut running = ferry(["copy", "--resume", j, &uri, d]).spawn();
    assert!(
        wait_until(Duration::from_secs(20), || journal.exists()),
        "no checkpoint was written"
    );
    assert!(
        running.is_running(),
        "the copy ended before it could be killed"
    );
    running.signal(libc::SIGKILL);
    let killed = running.wait(HANG_BOUND);
    assert_eq!(killed.code(), None, "killed by a signal");
    assert!(journal.exists(), "the journal survives kill -9");
    drop(server);
    let server = source("1G");
    assert_eq!(server.nbd_uri(), uri);
    // --verify after a resume covers the whole image, not only what this run copied.
    let resumed = ferry(["copy", "-v", "--verify", "--resume", j, &uri, d]).run();
    let stderr = resumed.expect_ok().to_string();
    assert!(!journal.exists(), "a completed copy removes its journal");
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &pattern_bytes(size),
        "resumed copy",
    );
    // The resumed run skipped what the journal recorded.
    let copied = stderr
        .lines()
        .find(|l| l.contains("ferry: copied"))
        .unwrap_or_else(|| panic!("no summary: {stderr}"));
    assert!(
        !copied.contains("skipped 0 B"),
        "nothing was skipped: {copied}"
    );
}

/// A journal is refused when the destination it names was replaced.
#[test]
fn a_journal_is_refused_for_another_destination_file() {
    let dir = testutil::temp_dir();
    let (src, _) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    let journal = dir.path().join("j");
    // A journal left by a copy that ENOSPC stopped: write it by copying into a full export.
    let server = Nbdkit::new("memory")
        .filter("error")
        .arg(&format!("size={}", std::fs::metadata(&src).unwrap().len()))
        .args(&["error-pwrite=ENOSPC", "error-pwrite-rate=100%"])
        .start();
    let j = journal.to_str().unwrap();
    ferry([
        "copy",
        "--resume",
        j,
        src.to_str().unwrap(),
        &server.nbd_uri(),
    ])
    .run()
    .expect_code(1);
    assert!(journal.exists(), "a failed copy keeps its journal");
    std::fs::write(&dst, b"").unwrap();
    let run = ferry([
        "copy",
        "--resume",
        j,
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ])
    .run();
    let stderr = run.expect_code(1);
    assert!(stderr.contains("was written for destination"), "{stderr}");
    assert!(stderr.contains("remove it to copy again"), "{stderr}");
}

/// An NBD server killed and started again on the same socket mid-copy, as the source and as
/// the destination: the copy connects again, sends what was in flight again, and completes.
#[test]
fn nbd_servers_restarted_mid_copy_are_connected_again() {
    let dir = testutil::temp_dir();
    let size = 16u64 << 20;
    let src_socket = dir.path().join("src.sock");
    let dst_socket = dir.path().join("dst.sock");
    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst)
        .and_then(|f| f.set_len(size))
        .unwrap();
    // 32 Mbit/s (the rate filter counts bits): the copy takes about 4 s.
    let source = || {
        Nbdkit::new("pattern")
            .unix_socket(&src_socket)
            .filter("rate")
            .args(&[&format!("size={size}"), "rate=32M"])
            .start()
    };
    let destination = || {
        Nbdkit::new("file")
            .unix_socket(&dst_socket)
            .arg(dst.to_str().unwrap())
            .start()
    };
    let (src, dst_server) = (source(), destination());
    let (src_uri, dst_uri) = (src.nbd_uri(), dst_server.nbd_uri());
    let running = ferry(["copy", &src_uri, &dst_uri]).spawn();
    // Each server dies abruptly (SIGKILL, its socket left behind) and comes back 300 ms later.
    std::thread::sleep(Duration::from_millis(700));
    kill(dst_server.pid());
    drop(dst_server);
    std::thread::sleep(Duration::from_millis(300));
    let dst_server = destination();
    std::thread::sleep(Duration::from_millis(300));
    kill(src.pid());
    drop(src);
    std::thread::sleep(Duration::from_millis(300));
    let src = source();
    let run = running.wait(HANG_BOUND);
    let stderr = run.expect_ok();

    assert!(
        run.elapsed < Duration::from_secs(12),
        "took {:?}: reconnecting should cost about the time the servers were away",
        run.elapsed
    );
    assert!(stderr.contains("connected again"), "{stderr}");
    drop((src, dst_server));
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &pattern_bytes(size),
        "copy across restarts",
    );
}
