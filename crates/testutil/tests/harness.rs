//! The harness itself: peers start, answer, report failures with their logs, and leave no
//! process or directory behind.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use testutil::{NbdServer, Nbdkit, Peer, QemuNbd, require_binary};

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
        .is_some_and(|zombie| !zombie)
}

fn panic_message(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Drops `peer` and checks its process and directory are gone.
fn assert_cleaned_up(peer: Peer) {
    let pid = peer.pid();
    let dir: PathBuf = peer.dir().to_owned();
    assert!(alive(pid));
    assert!(peer.socket().is_none_or(|s| s.exists()));
    drop(peer);
    let start = Instant::now();
    while alive(pid) && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(pid), "server {pid} survived its Peer");
    assert!(!dir.exists(), "{} survived its Peer", dir.display());
}

#[test]
fn missing_binary_says_what_to_install() {
    let msg = panic_message(|| {
        require_binary("ferry-no-such-tool");
    });
    assert!(
        msg.contains("install ferry-no-such-tool (scripts/test does it)"),
        "{msg}"
    );
    assert!(require_binary("qemu-nbd").is_file());
}

#[test]
fn peers_answer_and_clean_up() {
    let dir = testutil::temp_dir();
    let img = dir.path().join("a.raw");
    testutil::make_sparse_image(&img, &testutil::Layout::new().data(1 << 20, 1));
    let qemu = QemuNbd::new(&img).read_only().start();
    assert!(
        qemu.nbd_uri().starts_with("nbd+unix:///?socket=/"),
        "{}",
        qemu.nbd_uri()
    );
    assert_cleaned_up(qemu);
    let kit = Nbdkit::new("memory").arg("size=1M").tcp().start();
    assert!(
        kit.nbd_uri().starts_with("nbd://127.0.0.1:"),
        "{}",
        kit.nbd_uri()
    );
    assert_cleaned_up(kit);
    let server = NbdServer::new(&img).start();
    assert!(
        server.nbd_uri().starts_with("nbd+unix:///disk?socket="),
        "{}",
        server.nbd_uri()
    );
    assert_cleaned_up(server);
}

#[test]
fn a_server_that_dies_fails_with_its_log() {
    let msg = panic_message(|| {
        QemuNbd::new(std::path::Path::new("/nonexistent/disk.raw")).start();
    });
    assert!(msg.contains("exited"), "{msg}");
    assert!(
        msg.contains("/nonexistent/disk.raw"),
        "the log should name the image: {msg}"
    );
}

#[test]
fn nbd_server_children_are_stopped_too() {
    let dir = testutil::temp_dir();
    let img = dir.path().join("a.raw");
    testutil::make_sparse_image(&img, &testutil::Layout::new().data(4096, 1));
    let server = NbdServer::new(&img).start();
    // Hold a connection so the daemon forks a child for it.
    let mut held = std::os::unix::net::UnixStream::connect(server.socket().unwrap()).unwrap();
    let mut greeting = [0u8; 8];
    std::io::Read::read_exact(&mut held, &mut greeting).unwrap();
    assert_eq!(&greeting, b"NBDMAGIC");
    let daemon = server.pid();
    let children: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|p: &i32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .is_some_and(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok())
                        == Some(daemon)
                })
        })
        .collect();
    assert!(
        !children.is_empty(),
        "nbd-server forked no child for the client"
    );
    assert_cleaned_up(server);
    for c in children {
        assert!(!alive(c), "nbd-server child {c} survived");
    }
}
