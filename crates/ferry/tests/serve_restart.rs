//! Uploads that outlive their server: `ferry serve` (with a ticket store) and the
//! ovirt-imageio daemon (its ticket added again, as an orchestrator would) killed with SIGKILL
//! in the middle of an upload and started again: `ferry copy` retries until the server is
//! back, and the image arrives whole.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use testutil::FerryServe;
use testutil::Nbdkit;
use testutil::fault_proxy::{Address, FaultProxy, Faults};
use testutil::imageio::{ImageioServer, ServerOptions, ticket_json};

const SIZE: u64 = 32 << 20;
const HANG_BOUND: Duration = Duration::from_secs(90);
/// How long a killed server stays away: longer than ferry takes to read the next PUT run from
/// the slow source, so that a request meets the dead server.
const DOWN: Duration = Duration::from_millis(2500);

/// The bytes nbdkit's `pattern` plugin serves: every 8-byte word holds its own offset.
fn pattern_bytes(size: u64) -> Vec<u8> {
    (0..size / 8).flat_map(|w| (w * 8).to_be_bytes()).collect()
}

/// A pattern source whose reads are served one at a time, 400 ms each, so that the upload
/// takes several seconds.
fn slow_source() -> testutil::Peer {
    Nbdkit::new("pattern")
        .filter("noparallel")
        .filter("delay")
        .args(&[
            &format!("size={SIZE}"),
            "delay-read=400ms",
            "serialize=requests",
        ])
        .read_only()
        .start()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ferry serve` on `port` keeping its tickets in `store`, its files in `dir`.
fn serve(dir: &Path, port: u16, store: &Path) -> FerryServe {
    std::fs::create_dir_all(dir).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let control = dir.join("control.sock");
    FerryServe::start(
        Path::new(ferry_bin()),
        dir,
        &[
            "--listen",
            &listen,
            "--no-tls",
            "--control-socket",
            control.to_str().unwrap(),
            "--ticket-store",
            store.to_str().unwrap(),
        ],
    )
}

/// PUT /tickets/ID on a control socket, with curl.
fn add_ticket(control: &Path, ticket: &serde_json::Value) {
    let id = ticket["uuid"].as_str().unwrap();
    let out = Command::new("curl")
        .args(["-sS", "-f", "-X", "PUT", "--unix-socket"])
        .arg(control)
        .args(["--data-binary", &ticket.to_string()])
        .arg(format!("http://localhost/tickets/{id}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_upload_continues_across_a_ferry_serve_restart_with_a_ticket_store() {
    let dir = testutil::temp_dir();
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0xEE; SIZE as usize]).unwrap();
    let store = dir.path().join("tickets");
    let port = free_port();
    let first = serve(&dir.path().join("a"), port, &store);
    let url = format!("file://{}", dst.display());
    add_ticket(
        &dir.path().join("a/control.sock"),
        &ticket_json("kept", &url, SIZE, &["write"]),
    );
    let source = slow_source();
    let running = ferry([
        "copy",
        "--no-unix-socket",
        &source.nbd_uri(),
        &format!("http://127.0.0.1:{port}/images/kept"),
    ])
    .env("RUST_LOG", "warn")
    .spawn();
    std::thread::sleep(Duration::from_millis(2200));
    // SIGKILL: nothing is saved on the way out.
    drop(first);
    std::thread::sleep(DOWN);
    let second = serve(&dir.path().join("b"), port, &store);
    assert!(second.log().contains("ticket restored"), "{}", second.log());
    let run = running.wait(HANG_BOUND);
    let stderr = run.expect_ok();
    assert!(stderr.contains("retrying"), "{stderr}");
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &pattern_bytes(SIZE),
        "upload across a restart",
    );
    // A removed ticket is gone from the store too.
    let out = Command::new("curl")
        .args(["-sS", "-f", "-X", "DELETE", "--unix-socket"])
        .arg(dir.path().join("b/control.sock"))
        .arg("http://localhost/tickets/kept")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
}

/// The daemon forgets its tickets when it dies; an orchestrator adds the ticket again to the
/// new daemon. A proxy in front keeps the address ferry uses (the new daemon listens on a
/// new port) and sends new connections to the new daemon once its ticket is in place.
#[test]
fn an_upload_continues_across_an_imageio_daemon_restart() {
    let dir = testutil::temp_dir();
    let dst = dir.path().join("dst.raw");
    std::fs::write(&dst, vec![0xEE; SIZE as usize]).unwrap();
    let first = ImageioServer::daemon(&ServerOptions::default());
    first.file_ticket("again", &dst, SIZE, &["write"]);
    let target =
        |s: &ImageioServer| Address::Tcp(format!("127.0.0.1:{}", s.port()).parse().unwrap());
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", first.port()).parse().unwrap(),
        Faults::default(),
    );
    let source = slow_source();
    let running = ferry([
        "copy",
        "--no-unix-socket",
        &source.nbd_uri(),
        &format!("http://127.0.0.1:{}/images/again", proxy.port()),
    ])
    .env("RUST_LOG", "warn")
    .spawn();
    std::thread::sleep(Duration::from_millis(2200));
    drop(first);
    std::thread::sleep(DOWN);
    let second = ImageioServer::daemon(&ServerOptions::default());
    second.file_ticket("again", &dst, SIZE, &["write"]);
    proxy.set_target(target(&second));
    let run = running.wait(HANG_BOUND);
    let stderr = run.expect_ok();
    assert!(
        stderr.contains("retrying"),
        "{stderr} {:?} {} connections\n{}",
        run.elapsed,
        proxy.connections(),
        second.log()
    );
    drop(second);
    assert_same_bytes(
        &std::fs::read(&dst).unwrap(),
        &pattern_bytes(SIZE),
        "upload across a daemon restart",
    );
}
