//! `ferry copy` with HTTP endpoints (issue 5): uploads from NBD sources (qemu-nbd on raw and
//! qcow2, nbdkit) to the real ovirt-imageio daemon and to `ferry serve`, with file and nbd
//! tickets; downloads the other way into files and NBD servers; TLS with a CA file, without
//! one, and with `--insecure`; the server's Unix socket; and a hand-written HTTP server for what
//! real servers do not do on demand (no OPTIONS, no zero/flush, no Range, a connection cut in
//! the middle of a request, a refused PUT). Every copy is checked byte for byte.
//!
//! Destinations start filled with 0xEE ("garbage") where the test must prove that zero runs
//! were really zeroed, and sparse where it must prove that zero runs the server already reads
//! as zero are handled too; either way the content must equal the source's.

mod common;
mod fake_http;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use fake_http::{Behaviour, Cut, FakeServer, Seen};
use testutil::fault_proxy::{Direction, Fault};
use testutil::imageio::{ImageioServer, ServerOptions};
use testutil::{Certs, Layout, Nbdkit, Peer, QemuNbd};

/// Byte the "garbage" destinations are filled with.
const GARBAGE: u8 = 0xEE;

/// How the destination image starts.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// Every byte 0xEE and allocated: zero runs must be written.
    Garbage,
    /// A sparse file reading as zero: zero runs may be skipped.
    Sparse,
}

/// What stores a ticket's image.
#[derive(Debug, Clone, Copy)]
enum Backend {
    /// A `file://` ticket on the image file.
    File,
    /// An `nbd:unix:` ticket on qemu-nbd (`--shared=8`) serving the image file.
    Nbd,
}

fn make_image(path: &Path, size: u64, start: Start) {
    match start {
        Start::Garbage => std::fs::write(path, vec![GARBAGE; size as usize]).unwrap(),
        Start::Sparse => std::fs::File::create(path).unwrap().set_len(size).unwrap(),
    }
}

/// Installs ticket `id` on `server` for the image at `path`; returns qemu-nbd for an nbd
/// ticket (keep it until the copy is checked).
fn install(
    server: &ImageioServer,
    id: &str,
    path: &Path,
    size: u64,
    backend: Backend,
    ops: &[&str],
    read_only_nbd: bool,
) -> Option<Peer> {
    match backend {
        Backend::File => {
            server.file_ticket(id, path, size, ops);
            None
        }
        Backend::Nbd => {
            let mut q = QemuNbd::new(path).shared(8);
            if read_only_nbd {
                q = q.read_only();
            }
            let peer = q.start();
            server.nbd_ticket(id, peer.socket().expect("a unix socket"), size, ops);
            Some(peer)
        }
    }
}

/// Panics with ferry's and the server's output unless the run succeeded.
fn expect_ok(run: &Run, server: &ImageioServer) {
    assert!(
        run.status.success(),
        "{} failed ({}):\nstderr: {}\nserver log:\n{}",
        run.line,
        run.status,
        run.stderr,
        server.log()
    );
    run.assert_no_panic();
}

/// `ferry copy EXTRA… SRC DST` with warnings logged.
fn copy(extra: &[&str], src: &str, dst: &str) -> Run {
    let mut args: Vec<&str> = vec!["copy"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[src, dst]);
    ferry(args).env("RUST_LOG", "warn").run()
}

/// Uploads `src` (any ferry source) into a new ticket `id` and checks the stored image.
#[allow(clippy::too_many_arguments)]
fn upload(
    server: &ImageioServer,
    dir: &Path,
    id: &str,
    src: &str,
    expected: &[u8],
    backend: Backend,
    start: Start,
    extra: &[&str],
) -> Run {
    let size = expected.len() as u64;
    let dst = dir.join(format!("{id}.raw"));
    make_image(&dst, size, start);
    let _nbd = install(server, id, &dst, size, backend, &["write"], false);
    let run = copy(extra, src, &server.url(id));
    expect_ok(&run, server);
    let got = std::fs::read(&dst).unwrap();
    assert_same_bytes(
        &got,
        expected,
        &format!(
            "{:?} {id} ({backend:?}, {start:?}) after upload",
            server.kind()
        ),
    );
    run
}

/// Downloads ticket `id` (serving `src_file`) into a new local file and checks it.
fn download_to_file(
    server: &ImageioServer,
    dir: &Path,
    id: &str,
    src_file: &Path,
    expected: &[u8],
    backend: Backend,
    extra: &[&str],
) -> Run {
    let _nbd = install(
        server,
        id,
        src_file,
        expected.len() as u64,
        backend,
        &["read"],
        true,
    );
    let out = dir.join(format!("{id}-out.raw"));
    let run = copy(extra, &server.url(id), out.to_str().unwrap());
    expect_ok(&run, server);
    assert_same_bytes(
        &std::fs::read(&out).unwrap(),
        expected,
        &format!("{:?} {id} ({backend:?}) downloaded", server.kind()),
    );
    run
}

/// Downloads ticket `id` (serving `src_file`) into qemu-nbd on a garbage-filled file.
fn download_to_nbd(
    server: &ImageioServer,
    dir: &Path,
    id: &str,
    src_file: &Path,
    expected: &[u8],
    backend: Backend,
) -> Run {
    let size = expected.len() as u64;
    let _src = install(server, id, src_file, size, backend, &["read"], true);
    let dst = dir.join(format!("{id}-nbd-out.raw"));
    make_image(&dst, size, Start::Garbage);
    let peer = QemuNbd::new(&dst).shared(8).start();
    let run = copy(&[], &server.url(id), &peer.nbd_uri());
    expect_ok(&run, server);
    drop(peer);
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        expected,
        &format!("{:?} {id} ({backend:?}) downloaded to NBD", server.kind()),
    );
    run
}

/// The `-v` line describing the HTTP server on `side` ("source" or "destination").
fn server_line<'a>(stderr: &'a str, side: &str) -> &'a str {
    let prefix = format!("ferry: {side} server: ");
    stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {side} server line with -v:\n{stderr}"))
}

/// The sample image (data, zeroes written as data, holes) as a file, with its bytes.
fn sample(dir: &Path) -> (PathBuf, Vec<u8>) {
    let (path, layout) = make_sample(dir, "sample.raw");
    (path, layout.expected())
}

/// nbdkit's `data` plugin: text and byte patterns at a few offsets in 16 MiB of holes.
fn nbdkit_data_source() -> (Peer, Vec<u8>) {
    let size = 16 * MIB as usize;
    let peer = Nbdkit::new("data")
        .arg(
            "data=@1048576 ( \"ferry!\" )*100000 @6291456 ( 0xa5 0x5a 1 2 )*65536 \
             @12582912 ( 7 )*4096",
        )
        .arg(&format!("size={size}"))
        .read_only()
        .start();
    let mut expected = vec![0u8; size];
    let text = b"ferry!".repeat(100_000);
    expected[MIB as usize..MIB as usize + text.len()].copy_from_slice(&text);
    let pattern = [0xa5u8, 0x5a, 1, 2].repeat(65536);
    expected[6 * MIB as usize..6 * MIB as usize + pattern.len()].copy_from_slice(&pattern);
    expected[12 * MIB as usize..12 * MIB as usize + 4096].fill(7);
    (peer, expected)
}

// ---------------------------------------------------------------- the ovirt-imageio daemon

#[test]
fn upload_nbd_sources_to_the_imageio_daemon() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let daemon = ImageioServer::daemon(&ServerOptions {
        local_socket: true,
        ..Default::default()
    });
    let (raw, expected) = sample(d);
    let qemu = QemuNbd::new(&raw).read_only().shared(8).start();
    let src = qemu.nbd_uri();

    let run = upload(
        &daemon,
        d,
        "raw-file",
        &src,
        &expected,
        Backend::File,
        Start::Garbage,
        &["-v"],
    );
    // The daemon advertises its local socket and ferry runs on the same host: data goes there.
    let line = server_line(&run.stderr, "destination");
    let local = daemon.local_socket().unwrap().display().to_string();
    assert!(line.contains("imageio"), "{line}");
    assert!(line.contains(&format!("via unix {local}")), "{line}");
    upload(
        &daemon,
        d,
        "raw-nbd",
        &src,
        &expected,
        Backend::Nbd,
        Start::Garbage,
        &[],
    );
    upload(
        &daemon,
        d,
        "raw-nbd-sparse",
        &src,
        &expected,
        Backend::Nbd,
        Start::Sparse,
        &[],
    );

    let (nbdkit, nbdkit_expected) = nbdkit_data_source();
    for (id, backend, start) in [
        ("nbdkit-file", Backend::File, Start::Sparse),
        ("nbdkit-nbd", Backend::Nbd, Start::Garbage),
    ] {
        upload(
            &daemon,
            d,
            id,
            &nbdkit.nbd_uri(),
            &nbdkit_expected,
            backend,
            start,
            &[],
        );
    }

    let qcow2 = d.join("sample.qcow2");
    testutil::image::convert_to_qcow2(&raw, &qcow2);
    let qemu_qcow2 = QemuNbd::new(&qcow2).format("qcow2").read_only().start();
    for (id, backend) in [("qcow2-file", Backend::File), ("qcow2-nbd", Backend::Nbd)] {
        upload(
            &daemon,
            d,
            id,
            &qemu_qcow2.nbd_uri(),
            &expected,
            backend,
            Start::Garbage,
            &[],
        );
    }
}

#[test]
fn download_from_the_imageio_daemon() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let daemon = ImageioServer::daemon(&ServerOptions::default());
    let (raw, expected) = sample(d);
    let run = download_to_file(
        &daemon,
        d,
        "down-file",
        &raw,
        &expected,
        Backend::File,
        &["-v"],
    );
    let line = server_line(&run.stderr, "source");
    assert!(
        line.contains(&format!("via tcp 127.0.0.1:{}", daemon.port())),
        "without a local socket, data goes over TCP: {line}"
    );
    download_to_file(&daemon, d, "down-nbd", &raw, &expected, Backend::Nbd, &[]);
    download_to_nbd(
        &daemon,
        d,
        "down-file-to-nbd",
        &raw,
        &expected,
        Backend::File,
    );
    download_to_nbd(&daemon, d, "down-nbd-to-nbd", &raw, &expected, Backend::Nbd);
}

#[test]
fn tls_to_the_daemon_needs_the_ca_file_or_insecure() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let certs = Certs::generate();
    // No local socket: every byte goes through TLS.
    let daemon = ImageioServer::daemon(&ServerOptions {
        tls: Some(&certs),
        local_socket: false,
    });
    let (raw, expected) = sample(d);
    let ca = certs.ca_cert().display().to_string();
    let run = upload(
        &daemon,
        d,
        "tls-ca",
        raw.to_str().unwrap(),
        &expected,
        Backend::File,
        Start::Garbage,
        &["--cafile", &ca, "-v"],
    );
    let line = server_line(&run.stderr, "destination");
    assert!(line.contains(" tls"), "{line}");
    download_to_file(
        &daemon,
        d,
        "tls-ca-down",
        &raw,
        &expected,
        Backend::Nbd,
        &["--cafile", &ca],
    );

    // The system's CAs do not know the test CA.
    let dst = d.join("tls-no-ca.raw");
    make_image(&dst, expected.len() as u64, Start::Garbage);
    daemon.file_ticket("tls-no-ca", &dst, expected.len() as u64, &["write"]);
    let url = daemon.url("tls-no-ca");
    let run = copy(&[], raw.to_str().unwrap(), &url);
    let stderr = run.expect_code(1);
    assert!(stderr.contains(&url), "the error names the URL: {stderr}");
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the error says the certificate is the problem: {stderr}"
    );
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        vec![GARBAGE; expected.len()],
        "nothing may be written through an unverified connection"
    );

    upload(
        &daemon,
        d,
        "tls-insecure",
        raw.to_str().unwrap(),
        &expected,
        Backend::Nbd,
        Start::Garbage,
        &["--insecure"],
    );
}

// ---------------------------------------------------------------- ferry serve

#[test]
fn upload_and_download_with_ferry_serve() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let serve = ImageioServer::ferry_serve(
        Path::new(ferry_bin()),
        &ServerOptions {
            local_socket: true,
            ..Default::default()
        },
    );
    let (raw, expected) = sample(d);
    let qemu = QemuNbd::new(&raw).read_only().shared(8).start();
    let src = qemu.nbd_uri();
    let local = serve.local_socket().unwrap().display().to_string();

    let run = upload(
        &serve,
        d,
        "serve-file",
        &src,
        &expected,
        Backend::File,
        Start::Garbage,
        &["-v"],
    );
    let line = server_line(&run.stderr, "destination");
    assert!(line.contains(&format!("via unix {local}")), "{line}");
    let run = upload(
        &serve,
        d,
        "serve-nbd",
        &src,
        &expected,
        Backend::Nbd,
        Start::Sparse,
        &["-v", "--no-unix-socket"],
    );
    let line = server_line(&run.stderr, "destination");
    assert!(
        line.contains(&format!("via tcp 127.0.0.1:{}", serve.port())),
        "--no-unix-socket keeps data on TCP: {line}"
    );
    let (nbdkit, nbdkit_expected) = nbdkit_data_source();
    upload(
        &serve,
        d,
        "serve-nbdkit",
        &nbdkit.nbd_uri(),
        &nbdkit_expected,
        Backend::Nbd,
        Start::Garbage,
        &["-C", "2"],
    );

    let run = download_to_file(
        &serve,
        d,
        "serve-down-file",
        &raw,
        &expected,
        Backend::File,
        &["-v"],
    );
    let line = server_line(&run.stderr, "source");
    assert!(line.contains(&format!("via unix {local}")), "{line}");
    download_to_file(
        &serve,
        d,
        "serve-down-nbd",
        &raw,
        &expected,
        Backend::Nbd,
        &["--no-unix-socket"],
    );
    download_to_nbd(
        &serve,
        d,
        "serve-down-to-nbd",
        &raw,
        &expected,
        Backend::File,
    );
}

#[test]
fn ferry_serve_over_tls_with_a_ca_file() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let certs = Certs::generate();
    let serve = ImageioServer::ferry_serve(
        Path::new(ferry_bin()),
        &ServerOptions {
            tls: Some(&certs),
            local_socket: true,
        },
    );
    let (raw, expected) = sample(d);
    let qemu = QemuNbd::new(&raw).read_only().shared(8).start();
    let ca = certs.ca_cert().display().to_string();
    let local = serve.local_socket().unwrap().display().to_string();

    let run = upload(
        &serve,
        d,
        "tls-tcp",
        &qemu.nbd_uri(),
        &expected,
        Backend::File,
        Start::Garbage,
        &["--cafile", &ca, "-v", "--no-unix-socket"],
    );
    let line = server_line(&run.stderr, "destination");
    assert!(
        line.contains(&format!("via tcp 127.0.0.1:{} tls", serve.port())),
        "{line}"
    );
    // The probe is verified over TLS; the data then moves to the server's local socket.
    let run = upload(
        &serve,
        d,
        "tls-unix",
        &qemu.nbd_uri(),
        &expected,
        Backend::Nbd,
        Start::Garbage,
        &["--cafile", &ca, "-v"],
    );
    let line = server_line(&run.stderr, "destination");
    assert!(line.contains(&format!("via unix {local}")), "{line}");
    download_to_file(
        &serve,
        d,
        "tls-down",
        &raw,
        &expected,
        Backend::File,
        &["--cafile", &ca, "--no-unix-socket"],
    );

    let url = serve.url("tls-tcp");
    let run = copy(
        &["--no-unix-socket"],
        &url,
        d.join("x.raw").to_str().unwrap(),
    );
    let stderr = run.expect_code(1);
    assert!(stderr.contains(&url), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
}

#[test]
fn progress_json_for_an_http_destination() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let serve = ImageioServer::ferry_serve(Path::new(ferry_bin()), &ServerOptions::default());
    let (raw, expected) = sample(d);
    let run = upload(
        &serve,
        d,
        "progress",
        raw.to_str().unwrap(),
        &expected,
        Backend::File,
        Start::Garbage,
        &["--progress=json"],
    );
    let size = expected.len() as u64;
    let reports: Vec<serde_json::Value> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(!reports.is_empty(), "no JSON lines:\n{}", run.stderr);
    let mut last = 0;
    for r in &reports {
        let transferred = r["transferred"].as_u64().unwrap_or_else(|| panic!("{r}"));
        assert_eq!(r["size"].as_u64(), Some(size), "{r}");
        assert!(transferred >= last && transferred <= size, "{r}");
        last = transferred;
    }
    assert_eq!(last, size, "the last report is 100%:\n{}", run.stderr);
}

/// A pipe into an imageio URL: the source's size is learned only at its end, so every run is
/// sent once its data has been read, and the copy is flushed at the end. Garbage in the
/// destination proves the zero runs found in the stream were written too.
#[test]
fn stdin_pipe_to_ferry_serve_and_the_daemon() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let serve = ImageioServer::ferry_serve(Path::new(ferry_bin()), &ServerOptions::default());
    let daemon = ImageioServer::daemon(&ServerOptions::default());
    let (_, expected) = sample(d);
    let size = expected.len() as u64;
    for (name, server) in [("serve", &serve), ("daemon", &daemon)] {
        let id = format!("pipe-{name}");
        let dst = d.join(format!("{id}.raw"));
        make_image(&dst, size, Start::Garbage);
        install(server, &id, &dst, size, Backend::File, &["write"], false);
        let run = ferry(["copy", "-", &server.url(&id)])
            .env("RUST_LOG", "warn")
            .stdin_bytes(expected.clone())
            .run();
        expect_ok(&run, server);
        assert_same_bytes(&std::fs::read(&dst).unwrap(), &expected, name);
    }
}

// ---------------------------------------------------------------- errors

#[test]
fn errors_from_imageio_servers_name_the_status_and_the_cause() {
    let dir = testutil::temp_dir();
    let d = dir.path();
    let (raw, expected) = sample(d);
    let size = expected.len() as u64;
    let raw_arg = raw.to_str().unwrap();
    let daemon = ImageioServer::daemon(&ServerOptions::default());
    let serve = ImageioServer::ferry_serve(Path::new(ferry_bin()), &ServerOptions::default());
    for server in [&daemon, &serve] {
        let kind = server.kind();
        // No such ticket, both directions: 403 and the server's reason.
        let url = server.url("no-such-ticket");
        for (src, dst) in [
            (raw_arg.to_string(), url.clone()),
            (url.clone(), d.join("never.raw").display().to_string()),
        ] {
            let run = copy(&[], &src, &dst);
            let stderr = run.expect_code(1);
            assert!(stderr.contains("403"), "{kind:?}: {stderr}");
            assert!(stderr.contains("No such ticket"), "{kind:?}: {stderr}");
        }

        // A ticket that only allows reading cannot be a destination.
        let ro = d.join(format!("{kind:?}-ro.raw"));
        make_image(&ro, size, Start::Garbage);
        server.file_ticket("read-only", &ro, size, &["read"]);
        let run = copy(&[], raw_arg, &server.url("read-only"));
        let stderr = run.expect_code(1);
        assert!(stderr.contains("read-only"), "{kind:?}: {stderr}");
        assert_eq!(std::fs::read(&ro).unwrap(), vec![GARBAGE; size as usize]);

        // A destination smaller than the source.
        let small = d.join(format!("{kind:?}-small.raw"));
        make_image(&small, size / 2, Start::Garbage);
        server.file_ticket("small", &small, size / 2, &["write"]);
        let run = copy(&[], raw_arg, &server.url("small"));
        let stderr = run.expect_code(1);
        assert!(
            stderr.contains(&format!(
                "destination size ({}) is smaller than source size ({size})",
                size / 2
            )),
            "{kind:?}: {stderr}"
        );
        assert_eq!(
            std::fs::read(&small).unwrap(),
            vec![GARBAGE; size as usize / 2]
        );
    }
}

// ---------------------------------------------------------------- a hand-written server

/// An old imageio daemon: /images/ URL, OPTIONS → 405, Range and PUT only.
fn old_daemon(image: Vec<u8>) -> FakeServer {
    FakeServer::start(
        image,
        Behaviour {
            options_405: true,
            ranges: true,
            writable: true,
            put_error: None,
        },
    )
}

/// Cuts the first request `hit` accepts, as `how` says; the cell gets the offset it was at.
fn cut_first(
    server: &FakeServer,
    how: Cut,
    hit: impl Fn(&Seen) -> bool + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<Option<u64>>> {
    let cut = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = cut.clone();
    server.cut_when(how, move |r| {
        let matched = hit(r);
        if matched {
            *seen.lock().unwrap() = r.offset;
        }
        matched
    });
    cut
}

fn in_hole(layout: &Layout, offset: u64) -> bool {
    layout.placed().any(|(at, s)| {
        matches!(s, testutil::Segment::Hole(_)) && at <= offset && offset < at + s.len()
    })
}

#[test]
fn an_old_daemon_without_options_zero_or_flush_gets_puts_of_zeroes() {
    let dir = testutil::temp_dir();
    let (raw, layout) = make_sample(dir.path(), "sample.raw");
    let expected = layout.expected();
    let server = old_daemon(vec![GARBAGE; expected.len()]);
    let run = copy(&["-v"], raw.to_str().unwrap(), &server.url("/images/old"));
    let stderr = run.expect_ok();
    assert_same_bytes(&server.image(), &expected, "old daemon's image");
    let line = server_line(stderr, "destination");
    assert!(line.contains("features= "), "no features learned: {line}");
    let log = server.log();
    assert_eq!(log[0].method, "OPTIONS");
    assert_eq!(log[0].status, 405);
    assert!(
        log.iter().all(|r| r.method != "PATCH"),
        "a server without the zero and flush features got PATCH: {log:?}"
    );
    // Every hole was written as a PUT of zeroes (the garbage there is gone, checked above;
    // here: by PUTs that carried zeroes, not by something else).
    let zero_puts: Vec<_> = log
        .iter()
        .filter(|r| r.method == "PUT" && r.zero_body)
        .collect();
    for (at, s) in layout.placed() {
        if let testutil::Segment::Hole(len) = s {
            let covered: u64 = zero_puts
                .iter()
                .filter_map(|r| {
                    let o = r.offset?;
                    let start = o.max(at);
                    let end = (o + r.length).min(at + len);
                    (start < end).then(|| end - start)
                })
                .sum();
            assert_eq!(
                covered, len,
                "hole at {at} not covered by zero PUTs: {log:?}"
            );
        }
    }
    // Without the flush feature the end is an empty PUT with flush=y.
    let last = log.last().unwrap();
    assert!(
        last.method == "PUT" && last.target.contains("flush=y") && last.length == 0,
        "last request {last:?}"
    );
    assert!(
        log.iter()
            .filter(|r| r.method == "PUT" && r.length > 0)
            .all(|r| r.target.contains("flush=n")),
        "{log:?}"
    );
}

#[test]
fn a_streamed_put_cut_off_goes_again_from_the_data_kept() {
    let dir = testutil::temp_dir();
    let (raw, layout) = make_sample(dir.path(), "sample.raw");
    let size = layout.size() as usize;
    let server = old_daemon(vec![GARBAGE; size]);
    // A data run's PUT, cut after its head: the run's pieces are kept until the server
    // answers, so it is sent again whole on a fresh connection.
    let cut = cut_first(&server, Cut::BeforeAnswer, {
        let layout = layout.clone();
        move |r: &Seen| {
            r.method == "PUT"
                && r.length > 0
                && r.offset.is_some_and(|o| o > 0 && !in_hole(&layout, o))
        }
    });
    let run = copy(&[], raw.to_str().unwrap(), &server.url("/images/cut"));
    let stderr = run.expect_ok();
    let offset = cut.lock().unwrap().expect("a data PUT was cut");
    let warn = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("retrying (1 of 10)"))
        .unwrap_or_else(|| panic!("no retry warning: {stderr}"));
    assert!(
        warn.contains(&format!("at offset {offset} ")),
        "the retry names the cut run's offset {offset}: {warn}"
    );
    assert_same_bytes(
        &server.image(),
        &layout.expected(),
        "image after a PUT sent again",
    );
}

/// `--retries 0`: the same cut fails the copy, naming the offset, without a retry.
#[test]
fn without_retries_a_cut_put_fails_naming_its_offset() {
    let dir = testutil::temp_dir();
    let (raw, layout) = make_sample(dir.path(), "sample.raw");
    let server = old_daemon(vec![GARBAGE; layout.size() as usize]);
    let cut = cut_first(&server, Cut::BeforeAnswer, {
        let layout = layout.clone();
        move |r: &Seen| {
            r.method == "PUT"
                && r.length > 0
                && r.offset.is_some_and(|o| o > 0 && !in_hole(&layout, o))
        }
    });
    let run = copy(
        &["--retries", "0"],
        raw.to_str().unwrap(),
        &server.url("/images/cut"),
    );
    let stderr = run.expect_code(1);
    cut.lock().unwrap().expect("a data PUT was cut");
    // The first request the cut broke is reported (the run, or a request that shared its
    // connection), with its offset, and nothing was retried.
    assert!(
        stderr.contains(&format!("{} at offset ", server.url("/images/cut"))),
        "the error names the request and its offset: {stderr}"
    );
    assert!(!stderr.contains("retrying"), "{stderr}");
}

#[test]
fn a_small_put_cut_off_is_retried() {
    let dir = testutil::temp_dir();
    let (raw, layout) = make_sample(dir.path(), "sample.raw");
    let expected = layout.expected();
    let server = old_daemon(vec![GARBAGE; expected.len()]);
    // A PUT of zeroes (a hole, written as zeroes to a server without the zero feature) has
    // its whole body in memory and is sent again.
    let cut = cut_first(&server, Cut::BeforeAnswer, {
        let layout = layout.clone();
        move |r: &Seen| r.method == "PUT" && r.offset.is_some_and(|o| in_hole(&layout, o))
    });
    let run = copy(&[], raw.to_str().unwrap(), &server.url("/images/retry"));
    let stderr = run.expect_ok();
    assert_same_bytes(&server.image(), &expected, "image after a retried PUT");
    let offset = cut.lock().unwrap().expect("a zero PUT was cut");
    let warn = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("retrying (1 of 10)"))
        .unwrap_or_else(|| panic!("no retry warning: {stderr}"));
    assert!(
        warn.contains(&format!("at offset {offset} ")),
        "the retry names offset {offset}: {warn}"
    );
}

#[test]
fn a_get_cut_off_is_retried() {
    let dir = testutil::temp_dir();
    let expected = sample_layout().expected();
    let server = FakeServer::start(
        expected.clone(),
        Behaviour {
            ranges: true,
            ..Default::default()
        },
    );
    // The first ranged GET past the size probe (bytes=0-0).
    let cut = cut_first(&server, Cut::BeforeAnswer, |r: &Seen| {
        r.method == "GET" && r.offset.is_some_and(|o| o > 0)
    });
    let out = dir.path().join("out.raw");
    let run = copy(&[], &server.url("/disk.raw"), out.to_str().unwrap());
    let stderr = run.expect_ok();
    assert_same_bytes(
        &std::fs::read(&out).unwrap(),
        &expected,
        "after a retried GET",
    );
    let offset = cut.lock().unwrap().expect("a GET was cut");
    let warn = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("retrying (1 of 10)"))
        .unwrap_or_else(|| panic!("no retry warning: {stderr}"));
    assert!(
        warn.contains(&format!("at offset {offset} ")),
        "the retry names offset {offset}: {warn}"
    );
}

#[test]
fn a_plain_http_source_with_range_support() {
    let dir = testutil::temp_dir();
    let expected = sample_layout().expected();
    let server = FakeServer::start(
        expected.clone(),
        Behaviour {
            ranges: true,
            ..Default::default()
        },
    );
    let out = dir.path().join("out.raw");
    let run = copy(&["-v"], &server.url("/disk.raw"), out.to_str().unwrap());
    let stderr = run.expect_ok();
    assert_same_bytes(
        &std::fs::read(&out).unwrap(),
        &expected,
        "plain ranged source",
    );
    let line = server_line(stderr, "source");
    assert!(line.starts_with("ferry: source server: http "), "{line}");
    let log = server.log();
    let gets: Vec<_> = log.iter().filter(|r| r.method == "GET").collect();
    assert!(
        gets.iter().all(|r| r.status == 206),
        "every GET was ranged: {log:?}"
    );
    assert!(
        gets.iter().map(|r| r.length).sum::<u64>() >= expected.len() as u64,
        "{log:?}"
    );
}

#[test]
fn a_plain_http_source_that_ignores_range() {
    let dir = testutil::temp_dir();
    let expected = sample_layout().expected();
    let server = FakeServer::start(expected.clone(), Behaviour::default());
    let out = dir.path().join("out.raw");
    let run = copy(&[], &server.url("/disk.raw"), out.to_str().unwrap());
    run.expect_ok();
    assert_same_bytes(
        &std::fs::read(&out).unwrap(),
        &expected,
        "source without Range",
    );
    let log = server.log();
    assert!(
        log.iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.status == 200),
        "{log:?}"
    );
}

/// A ranged GET cut in the middle of its body is asked for again from the first byte not yet
/// delivered, not from the start of its run, and the copy completes; without retries it
/// fails, naming the run that broke.
#[test]
fn a_get_cut_in_the_middle_of_its_body_resumes_where_it_stopped() {
    let dir = testutil::temp_dir();
    let expected = sample_layout().expected();
    for retries in ["10", "0"] {
        let server = FakeServer::start(
            expected.clone(),
            Behaviour {
                ranges: true,
                ..Default::default()
            },
        );
        let cut = cut_first(&server, Cut::MidBody, |r: &Seen| {
            r.method == "GET" && r.offset.is_some_and(|o| o > 0) && r.length > 64 << 10
        });
        let out = dir.path().join(format!("out-{retries}.raw"));
        let run = copy(
            &["--retries", retries],
            &server.url("/disk.raw"),
            out.to_str().unwrap(),
        );
        let offset = cut.lock().unwrap().expect("a GET was cut");
        let log = server.log();
        let length = log
            .iter()
            .find(|r| r.method == "GET" && r.offset == Some(offset) && r.status == 0)
            .map(|r| r.length)
            .expect("the cut GET is logged");
        if retries == "0" {
            // The error names the piece of the run where the body broke.
            let stderr = run.expect_code(1);
            let named: u64 = stderr
                .split("at offset ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no offset in {stderr}"));
            assert!(
                (offset..offset + length).contains(&named),
                "the error names an offset in the cut run {offset} (+{length}): {stderr}"
            );
            continue;
        }
        run.expect_ok();
        assert_same_bytes(&std::fs::read(&out).unwrap(), &expected, "resumed GET");
        assert!(
            log.iter().any(|r| r.method == "GET"
                && r.offset.is_some_and(|o| o > offset && o < offset + length)),
            "no GET resumed inside the cut run at {offset} (+{length}): {log:?}"
        );
    }
}

/// The server refuses a data run's PUT (whose body was streamed) with a message: the copy
/// fails with the status, the message and the run's offset.
#[test]
fn a_put_answered_with_500_fails_with_the_status_message_and_offset() {
    let dir = testutil::temp_dir();
    // Data only, so every PUT is a streamed data run (no zero runs).
    let layout = Layout::new().data(3 * MIB, 11);
    let raw = dir.path().join("data.raw");
    testutil::make_sparse_image(&raw, &layout);
    let server = FakeServer::start(
        vec![GARBAGE; layout.size() as usize],
        Behaviour {
            options_405: true,
            ranges: true,
            writable: true,
            put_error: Some((500, "the disk is on fire".into())),
        },
    );
    // A 5xx is retried like a broken connection; one retry keeps the test short.
    let run = copy(
        &["--retries", "1"],
        raw.to_str().unwrap(),
        &server.url("/images/fire"),
    );
    let stderr = run.expect_code(1);
    assert!(stderr.contains("(after 2 attempts)"), "{stderr}");
    assert!(stderr.contains("retrying (1 of 1)"), "{stderr}");
    assert!(
        stderr.contains("HTTP 500 Internal Server Error: the disk is on fire"),
        "{stderr}"
    );
    let refused: Vec<u64> = server
        .log()
        .iter()
        .filter(|r| r.method == "PUT" && r.status == 500)
        .filter_map(|r| r.offset)
        .collect();
    assert!(!refused.is_empty(), "{:?}", server.log());
    assert!(
        refused.iter().any(|o| stderr.contains(&format!(
            "write to {} at offset {o} ",
            server.url("/images/fire")
        ))),
        "the error names the offset of a refused PUT ({refused:?}): {stderr}"
    );
}

// ---------------------------------------------------------------- faults on the wire

/// An upload of the sample into a new ferry serve ticket through a proxy breaking connections
/// as `faults` say: the run, the proxy, the image expected and the ticket's file.
fn upload_through_proxy(
    dir: &Path,
    faults: testutil::fault_proxy::Faults,
    extra: &[&str],
) -> (
    Run,
    testutil::fault_proxy::FaultProxy,
    Vec<u8>,
    PathBuf,
    String,
) {
    let serve = ImageioServer::ferry_serve(Path::new(ferry_bin()), &ServerOptions::default());
    let (raw, expected) = sample(dir);
    let size = expected.len() as u64;
    let dst = dir.join("proxied.raw");
    make_image(&dst, size, Start::Garbage);
    install(
        &serve,
        "proxied",
        &dst,
        size,
        Backend::File,
        &["write"],
        false,
    );
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", serve.port()).parse().unwrap();
    let proxy = testutil::fault_proxy::FaultProxy::start(target, faults);
    let url = format!("http://127.0.0.1:{}/images/proxied", proxy.port());
    let mut args = vec!["--no-unix-socket"];
    args.extend_from_slice(extra);
    let run = copy(&args, raw.to_str().unwrap(), &url);
    if run.status.success() {
        expect_ok(&run, &serve);
    }
    (run, proxy, expected, dst, url)
}

/// Uploads the sample through a proxy that cuts connections in the middle of request bodies:
/// every cut request goes again, and the image arrives whole.
#[test]
fn an_upload_through_connections_cut_mid_body_completes() {
    let dir = testutil::temp_dir();
    // The first four connections break after 512 KiB from ferry. However ferry spreads the
    // 13 MiB over its (at most four) connections, one of them carries more than that.
    let faults = testutil::fault_proxy::Faults::cut_first(4, 512 << 10);
    let (run, proxy, expected, dst, _) = upload_through_proxy(dir.path(), faults, &[]);
    let stderr = run.expect_ok();
    assert!(proxy.cuts() >= 1, "no connection was cut");
    assert!(stderr.contains("retrying (1 of 10)"), "{stderr}");
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &expected,
        "image after cut uploads",
    );
}

/// A peer that cuts every connection: the copy fails after its retries with the documented
/// message and exit code, and does not hang.
#[test]
fn an_upload_through_a_peer_that_cuts_everything_fails_after_its_retries() {
    let dir = testutil::temp_dir();
    let faults = testutil::fault_proxy::Faults::every(Fault::Cut {
        dir: Direction::ToServer,
        after: 0,
    });
    let (run, proxy, _, _, url) = upload_through_proxy(dir.path(), faults, &["--retries", "2"]);
    let stderr = run.expect_code(1);
    assert!(stderr.contains(&format!("open {url} failed")), "{stderr}");
    assert!(stderr.contains("(after 3 attempts)"), "{stderr}");
    assert!(
        proxy.connections() >= 3,
        "{} connections",
        proxy.connections()
    );
}

/// Downloads a ferry serve ticket holding the sample through a proxy misbehaving as `faults`
/// say, into a new file: the run, the proxy, the image expected and the file written.
fn download_through_proxy(
    dir: &Path,
    faults: testutil::fault_proxy::Faults,
    extra: &[&str],
) -> (Run, testutil::fault_proxy::FaultProxy, Vec<u8>, PathBuf) {
    let serve = ImageioServer::ferry_serve(Path::new(ferry_bin()), &ServerOptions::default());
    let (raw, expected) = sample(dir);
    install(
        &serve,
        "down",
        &raw,
        expected.len() as u64,
        Backend::File,
        &["read"],
        false,
    );
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", serve.port()).parse().unwrap();
    let proxy = testutil::fault_proxy::FaultProxy::start(target, faults);
    let url = format!("http://127.0.0.1:{}/images/down", proxy.port());
    let out = dir.join("down.raw");
    let mut args = vec!["--no-unix-socket"];
    args.extend_from_slice(extra);
    let run = ferry(
        ["copy"]
            .iter()
            .chain(&args)
            .chain(&[url.as_str(), out.to_str().unwrap()]),
    )
    .env("RUST_LOG", "warn")
    .timeout(Duration::from_secs(120))
    .run();
    if run.status.success() {
        expect_ok(&run, &serve);
    }
    (run, proxy, expected, out)
}

/// Connections that break at pseudo-random points — requests cut mid-body, answers truncated,
/// connections that go silent — on an upload: every broken request goes again (a silent one
/// once `--timeout` passes), and the image arrives whole.
#[test]
fn an_upload_through_connections_broken_at_random_points_completes() {
    let dir = testutil::temp_dir();
    let faults = testutil::fault_proxy::Faults::random(0x5eed, 6, 2 << 20, 600, true);
    let (run, proxy, expected, dst, _) =
        upload_through_proxy(dir.path(), faults, &["--timeout", "2"]);
    let stderr = run.expect_ok();
    assert!(
        proxy.cuts() + proxy.stalls() >= 1,
        "no connection broke: {stderr}"
    );
    assert!(stderr.contains("retrying (1 of 10)"), "{stderr}");
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &expected,
        "image after randomly broken uploads",
    );
}

/// Downloads whose responses are truncated mid-body, or stall, at pseudo-random points: the
/// broken GETs go again and the file is whole.
#[test]
fn a_download_through_truncated_and_stalled_responses_completes() {
    let dir = testutil::temp_dir();
    let mut faults = testutil::fault_proxy::Faults::random(0xd0d0, 6, 600, 2 << 20, true);
    // Make sure a response body is truncated (cut towards the client mid-GET).
    faults.connection[0].1 = Fault::Cut {
        dir: Direction::ToClient,
        after: 300 << 10,
    };
    let (run, proxy, expected, out) =
        download_through_proxy(dir.path(), faults, &["--timeout", "2"]);
    let stderr = run.expect_ok();
    assert!(proxy.cuts() >= 1, "no response was truncated: {stderr}");
    assert_same_bytes(
        &std::fs::read(&out).unwrap(),
        &expected,
        "image after broken downloads",
    );
}

/// A link that adds latency to everything is slow, not broken.
#[test]
fn a_delayed_link_completes_without_retries() {
    let dir = testutil::temp_dir();
    let faults = testutil::fault_proxy::Faults::every(Fault::Delay(Duration::from_millis(2)));
    let (run, proxy, expected, dst, _) = upload_through_proxy(dir.path(), faults, &[]);
    let stderr = run.expect_ok();
    assert!(proxy.connections() >= 1);
    assert!(!stderr.contains("retrying"), "{stderr}");
    assert_same_bytes(&std::fs::read(&dst).unwrap(), &expected, "delayed upload");
}

/// A server that accepts every connection and then says nothing: each request fails at
/// `--timeout`, is retried, and the copy fails with the documented exit code and message —
/// it never hangs.
#[test]
fn a_server_that_goes_silent_fails_at_the_deadline() {
    let dir = testutil::temp_dir();
    let faults = testutil::fault_proxy::Faults::every(Fault::Stall {
        dir: Direction::ToClient,
        after: 0,
    });
    let started = std::time::Instant::now();
    let (run, proxy, _, _, url) =
        upload_through_proxy(dir.path(), faults, &["--timeout", "1", "--retries", "1"]);
    let stderr = run.expect_code(1);
    assert!(stderr.contains(&format!("open {url} failed")), "{stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(stderr.contains("(after 2 attempts)"), "{stderr}");
    assert!(proxy.stalls() >= 2, "{} stalls", proxy.stalls());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

/// A link so slow that one PUT's body takes longer than `--timeout` to send: bytes keep moving,
/// so nothing times out while the server rightly says nothing until the body has arrived.
#[test]
fn a_put_slower_than_the_timeout_completes_while_bytes_move() {
    let dir = testutil::temp_dir();
    // 64 KiB every 25 ms: an 8 MiB PUT takes over 3 s against a 1 s timeout.
    let faults = testutil::fault_proxy::Faults::every(Fault::Delay(Duration::from_millis(25)));
    let (run, _proxy, expected, dst, _) =
        upload_through_proxy(dir.path(), faults, &["--timeout", "1", "-C", "1"]);
    let stderr = run.expect_ok();
    assert!(!stderr.contains("retrying"), "{stderr}");
    assert_same_bytes(&std::fs::read(&dst).unwrap(), &expected, "slow upload");
}
