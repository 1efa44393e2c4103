//! nbdcopy's options on `ferry copy`, each checked for its effect where it can be observed:
//! allocated blocks (`--allocated`), bytes a non-zero destination keeps
//! (`--destination-is-zero`), requests an nbdkit log filter records (`--flush`, `--no-extents`,
//! `--synchronous`), and the progress lines (`--progress=FD`, `--progress=json`).

mod common;

use std::fs::File;

use common::*;
use testutil::{Layout, Nbdkit, QemuNbd, Segment};

/// nbdkit serving `path` through the log filter, writing its log to `log`.
fn logged_file_server(path: &std::path::Path, log: &std::path::Path) -> testutil::Peer {
    Nbdkit::new("file")
        .filter("log")
        .arg(&format!("file={}", path.display()))
        .arg(&format!("logfile={}", log.display()))
        .read_only()
        .start()
}

/// nbdkit memory of `size` bytes through the log filter.
fn logged_memory_server(size: u64, log: &std::path::Path) -> testutil::Peer {
    Nbdkit::new("memory")
        .filter("log")
        .arg(&format!("size={size}"))
        .arg(&format!("logfile={}", log.display()))
        .start()
}

#[test]
fn allocated_makes_a_file_destination_fully_allocated() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    ferry([
        "copy",
        "--allocated",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ])
    .run()
    .expect_ok();
    assert_file_matches(&dst, &layout);
    let got = allocated(&dst);
    assert!(
        got >= layout.size(),
        "--allocated left {} allocated of {} bytes",
        got,
        layout.size()
    );
}

#[test]
fn allocated_makes_an_nbd_destination_fully_allocated() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    File::create(&dst)
        .and_then(|f| f.set_len(layout.size()))
        .unwrap();
    // A server that would punch holes for zero requests unless told NO_HOLE.
    let server = QemuNbd::new(&dst).discard().start();
    ferry([
        "copy",
        "--allocated",
        src.to_str().unwrap(),
        &server.nbd_uri(),
    ])
    .run()
    .expect_ok();
    drop(server);
    assert_file_matches(&dst, &layout);
    let got = allocated(&dst);
    assert!(got >= layout.size(), "{got} of {} allocated", layout.size());
}

/// A qemu-nbd export over a file filled with 0xAA, the size of the sample.
fn non_zero_destination(
    dir: &std::path::Path,
    layout: &Layout,
) -> (std::path::PathBuf, testutil::Peer) {
    let dst = dir.join("dst.raw");
    std::fs::write(&dst, vec![0xaau8; layout.size() as usize]).unwrap();
    let server = QemuNbd::new(&dst).start();
    (dst, server)
}

#[test]
fn destination_is_zero_skips_zero_ranges_even_on_a_non_zero_destination() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let (dst, server) = non_zero_destination(dir.path(), &layout);
    ferry([
        "copy",
        "--destination-is-zero",
        src.to_str().unwrap(),
        &server.nbd_uri(),
    ])
    .run()
    .expect_ok();
    drop(server);
    let got = std::fs::read(&dst).unwrap();
    let expected = layout.expected();
    for (offset, segment) in layout.placed() {
        let range = offset as usize..(offset + segment.len()) as usize;
        match segment {
            Segment::Data { .. } => {
                assert_same_bytes(&got[range.clone()], &expected[range], "a data run")
            }
            // The flag promised zeroes, so the old bytes were never touched.
            Segment::Hole(_) | Segment::Zero(_) => assert!(
                got[range.clone()].iter().all(|b| *b == 0xaa),
                "{segment:?} at {range:?} was written despite --destination-is-zero"
            ),
        }
    }
    // The nbdcopy spelling is accepted too.
    let server = QemuNbd::new(&dst).start();
    ferry([
        "copy",
        "--target-is-zero",
        src.to_str().unwrap(),
        &server.nbd_uri(),
    ])
    .run()
    .expect_ok();
}

#[test]
fn without_destination_is_zero_a_non_zero_destination_is_zeroed() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let (dst, server) = non_zero_destination(dir.path(), &layout);
    ferry(["copy", src.to_str().unwrap(), &server.nbd_uri()])
        .run()
        .expect_ok();
    drop(server);
    assert_file_matches(&dst, &layout);
}

#[test]
fn flush_flushes_the_destination_and_only_when_asked() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    for flush in [true, false] {
        let log = dir.path().join(format!("flush-{flush}.log"));
        let server = logged_memory_server(layout.size(), &log);
        let mut args = vec!["copy".to_string()];
        if flush {
            args.push("--flush".into());
        }
        args.push(src.display().to_string());
        args.push(server.nbd_uri());
        ferry(&args).run().expect_ok();
        drop(server);
        let log = read_log(&log);
        let flushes = logged(&log, "Flush");
        if flush {
            assert!(!flushes.is_empty(), "--flush sent no NBD_CMD_FLUSH:\n{log}");
            // The flush comes after the last write.
            let last_line = |op: &str| {
                log.lines()
                    .enumerate()
                    .filter(|(_, l)| l.contains(&format!(" {op} id=")))
                    .map(|(i, _)| i)
                    .last()
                    .unwrap_or(0)
            };
            assert!(last_line("Flush") > last_line("Write"), "{log}");
        } else {
            assert!(flushes.is_empty(), "flushed without --flush:\n{log}");
        }
    }
}

#[test]
fn no_extents_reads_the_whole_image_without_block_status() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    for no_extents in [true, false] {
        let log = dir.path().join(format!("no-extents-{no_extents}.log"));
        let server = logged_file_server(&src, &log);
        let dst = dir.path().join(format!("dst-{no_extents}.raw"));
        let mut args = vec!["copy".to_string(), "-v".into()];
        if no_extents {
            args.push("--no-extents".into());
        }
        args.push(server.nbd_uri());
        args.push(dst.display().to_string());
        let run = ferry(&args).run();
        let stderr = run.expect_ok().to_string();
        drop(server);
        assert_file_matches(&dst, &layout);
        // Zero detection in what was read still keeps the copy sparse.
        assert_sparse(&dst, &layout);
        let log = read_log(&log);
        let read: u64 = logged(&log, "Read").iter().map(|r| r.count).sum();
        let extents = logged(&log, "Extents");
        if no_extents {
            assert!(
                extents.is_empty(),
                "--no-extents asked for block status:\n{log}"
            );
            assert_eq!(read, layout.size(), "--no-extents should read everything");
            assert!(stderr.contains("read 13.0 MiB"), "{stderr}");
        } else {
            assert!(!extents.is_empty(), "no block status without --no-extents");
            assert!(
                read < layout.size() - 4 * MIB,
                "read {read} of {} bytes despite the holes",
                layout.size()
            );
        }
    }
}

#[test]
fn synchronous_runs_one_request_at_a_time() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let log = dir.path().join("sync.log");
    let server = logged_file_server(&src, &log);
    let dst = dir.path().join("dst.raw");
    let run = ferry([
        "copy",
        "-v",
        "--synchronous",
        "--request-size=64k",
        &server.nbd_uri(),
        dst.to_str().unwrap(),
    ])
    .run();
    let stderr = run.expect_ok().to_string();
    drop(server);
    assert!(
        stderr.contains("pipelines=1 requests=1") && stderr.contains("synchronous=true"),
        "{stderr}"
    );
    assert_file_matches(&dst, &layout);
    // The server never saw two requests outstanding, on one connection.
    let log = read_log(&log);
    let mut outstanding = 0usize;
    let mut most = 0usize;
    let mut connections = std::collections::BTreeSet::new();
    for line in log.lines() {
        let Some(rest) = line.split_once(" connection=").map(|(_, r)| r) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let conn = words.next().unwrap_or("");
        let op = words.next().unwrap_or("");
        if op == "Connect" {
            connections.insert(conn.to_string());
        } else if op.starts_with("...") {
            outstanding = outstanding.saturating_sub(1);
        } else if line.ends_with(" ...") {
            outstanding += 1;
            most = most.max(outstanding);
        }
    }
    assert_eq!(connections.len(), 1, "connections: {connections:?}\n{log}");
    assert_eq!(most, 1, "requests overlapped in --synchronous mode:\n{log}");
    assert!(logged(&log, "Read").len() > 8, "{log}");

    // Without it, several pipelines run (the sample is small, but the settings show): as
    // many as connections, capped by threads (-T; one per CPU by default, like nbdcopy).
    let run = ferry(["copy", "-v", "-T", "4", src.to_str().unwrap(), "null:"]).run();
    assert!(
        run.expect_ok().contains("pipelines=4 requests=64"),
        "{}",
        run.stderr
    );
}

#[test]
fn progress_fd_prints_percent_lines_ending_at_100() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let server = QemuNbd::new(&src).read_only().start();
    let progress = dir.path().join("progress.txt");
    let dst = dir.path().join("dst.raw");
    ferry([
        "copy",
        "--progress=3",
        &server.nbd_uri(),
        dst.to_str().unwrap(),
    ])
    .fd3(File::create(&progress).unwrap())
    .run()
    .expect_ok();
    assert_file_matches(&dst, &layout);
    let text = std::fs::read_to_string(&progress).unwrap();
    assert!(text.ends_with('\n'), "{text:?}");
    let mut last = 0;
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty(), "no progress on fd 3");
    for line in &lines {
        let n: u64 = line
            .strip_suffix("/100")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not an N/100 line: {line:?} in {text:?}"));
        assert!(n <= 100 && n >= last, "{text:?}");
        last = n;
    }
    assert_eq!(lines.last(), Some(&"100/100"), "{text:?}");
}

#[test]
fn progress_fd_that_is_not_open_is_a_usage_error() {
    let dir = testutil::temp_dir();
    let (src, _) = make_sample(dir.path(), "src.raw");
    let run = ferry(["copy", "--progress=97", src.to_str().unwrap(), "null:"]).run();
    assert!(run.expect_code(2).contains("--progress"), "{}", run.stderr);
}

#[test]
fn progress_json_reports_bytes_until_the_size() {
    let dir = testutil::temp_dir();
    let (src, layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    let run = ferry([
        "copy",
        "--progress=json",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ])
    .run();
    let stderr = run.expect_ok();
    assert_file_matches(&dst, &layout);
    let reports: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(!reports.is_empty(), "no JSON lines: {stderr}");
    let mut last = 0;
    for r in &reports {
        let transferred = r["transferred"].as_u64().unwrap_or_else(|| panic!("{r}"));
        assert_eq!(r["size"].as_u64(), Some(layout.size()), "{r}");
        assert!(r["elapsed"].as_f64().is_some_and(|e| e >= 0.0), "{r}");
        assert!(
            transferred >= last && transferred <= layout.size(),
            "{stderr}"
        );
        last = transferred;
    }
    assert_eq!(
        last,
        layout.size(),
        "last report short of the size: {stderr}"
    );
}
