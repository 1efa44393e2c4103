//! The control API end to end: ticket lifecycle and error messages, expiry (sliding, PATCHed,
//! reaped), ticket info counters, and DELETE cancelling in-flight transfers (204 when they
//! stop, 409 when a backend write outlives the deadline).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Raw, TestServer, curl, data_file};
use server::ControlListen;
use server::client::{Method, Reply, request};

const MIB: u64 = 1 << 20;

fn control(srv: &TestServer, method: Method, path: &str, body: Option<&str>) -> Reply {
    let addr = ControlListen::Unix(srv.control_socket().display().to_string());
    srv.rt
        .block_on(request(
            &addr,
            method,
            path,
            body.map(|b| b.as_bytes().to_vec()),
        ))
        .expect("control request")
}

fn info(srv: &TestServer, id: &str) -> serde_json::Value {
    let r = control(srv, Method::GET, &format!("/tickets/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

fn ticket_doc(id: &str, url: &str, timeout: u64) -> String {
    serde_json::json!({
        "uuid": id, "size": 4 * MIB, "ops": ["write"], "timeout": timeout,
        "url": url, "transfer_id": format!("tx-{id}"), "filename": "disk.raw",
    })
    .to_string()
}

/// Polls `cond` every 10 ms for up to 10 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ticket_lifecycle_and_errors() {
    let srv = TestServer::start();
    let path = srv.dir.path().join("d.raw");
    data_file(&path, 4 * MIB, 100, 1);
    let url = format!("file://{}", path.display());

    let r = control(
        &srv,
        Method::PUT,
        "/tickets/t1",
        Some(&ticket_doc("t1", &url, 300)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body.is_empty());
    let v = info(&srv, "t1");
    assert_eq!(v["uuid"], "t1");
    assert_eq!(v["active"], false);
    assert_eq!(v["canceled"], false);
    assert_eq!(v["connections"], 0);
    assert_eq!(v["ops"], serde_json::json!(["write"]));
    assert_eq!(v["transfer_id"], "tx-t1");
    assert_eq!(v["filename"], "disk.raw");
    assert_eq!(v["transferred"], 0);
    assert_eq!(v["inactivity_timeout"], 60);
    assert_eq!(v["sparse"], false);
    assert_eq!(v["dirty"], false);
    let expires = v["expires"].as_u64().unwrap();
    assert!(expires > 0);
    // Key order and separators are the reference's (Python's json.dumps).
    let text = control(&srv, Method::GET, "/tickets/t1", None).text();
    assert!(
        text.starts_with(r#"{"active": false, "canceled": false, "connections": 0, "expires": "#),
        "{text}"
    );

    let cases: &[(&str, u16, &str)] = &[
        ("{", 400, "Ticket is not in a json format: "),
        (
            r#"{"uuid": "t1", "ops": ["read"], "timeout": 1, "url": "file:///x"}"#,
            400,
            "Invalid ticket: Required ticket parameter is missing: size",
        ),
        (
            r#"{"uuid": "t1", "size": 1, "ops": ["read"], "timeout": 1, "url": "s3://bucket/x"}"#,
            400,
            "Invalid ticket: Invalid value for 'url': \"s3://bucket/x\": Unsupported url scheme: s3",
        ),
        (
            r#"{"uuid": "other", "size": 1, "ops": ["read"], "timeout": 1, "url": "file:///x"}"#,
            400,
            "Invalid ticket: ticket id in the path",
        ),
    ];
    for (body, status, text) in cases {
        let r = control(&srv, Method::PUT, "/tickets/t1", Some(body));
        assert_eq!(r.status, *status, "{body}: {}", r.text());
        assert!(r.text().starts_with(text), "{body}: {}", r.text());
    }

    let r = control(&srv, Method::GET, "/tickets/nope", None);
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "No such ticket 'nope'");
    let r = control(&srv, Method::PATCH, "/tickets/t1", Some("{}"));
    assert_eq!(r.status, 400);
    assert_eq!(r.text(), "Missing required value for 'timeout'");
    let r = control(
        &srv,
        Method::PATCH,
        "/tickets/nope",
        Some(r#"{"timeout": 5}"#),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "No such ticket: nope");
    let r = control(
        &srv,
        Method::PATCH,
        "/tickets/t1",
        Some(r#"{"timeout": 5}"#),
    );
    assert_eq!(r.status, 200);
    assert!(info(&srv, "t1")["expires"].as_u64().unwrap() < expires);

    control(
        &srv,
        Method::PUT,
        "/tickets/t2",
        Some(&ticket_doc("t2", &url, 300)),
    );
    let list: serde_json::Value =
        serde_json::from_slice(&control(&srv, Method::GET, "/tickets/", None).body).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["uuid"], "t1");

    assert_eq!(
        control(&srv, Method::DELETE, "/tickets/t1", None).status,
        204
    );
    assert_eq!(
        control(&srv, Method::DELETE, "/tickets/t1", None).status,
        204
    );
    assert_eq!(control(&srv, Method::GET, "/tickets/t1", None).status, 404);
    assert_eq!(control(&srv, Method::DELETE, "/tickets/", None).status, 204);
    assert_eq!(control(&srv, Method::GET, "/tickets/t2", None).status, 404);
    assert_eq!(control(&srv, Method::GET, "/other", None).status, 404);
}

#[test]
fn expiry_slides_with_activity_and_patch_revives() {
    let srv = TestServer::start();
    let path = srv.dir.path().join("d.raw");
    data_file(&path, 4 * MIB, 100, 1);
    let url = format!("file://{}", path.display());
    control(
        &srv,
        Method::PUT,
        "/tickets/e",
        Some(&ticket_doc("e", &url, 2)),
    );
    // Requests every 0.5 s keep a 2 s ticket alive well past 2 s.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        let r = curl(&["-r", "0-0", &srv.url("e")]);
        assert_eq!(r.status, 206, "{}", r.text());
    }
    std::thread::sleep(Duration::from_millis(2200));
    let r = curl(&["-r", "0-0", &srv.url("e")]);
    assert_eq!(r.status, 403);
    assert_eq!(
        r.text(),
        "You are not allowed to access this resource: Transfer=tx-e expired\n"
    );
    let r = control(
        &srv,
        Method::PATCH,
        "/tickets/e",
        Some(r#"{"timeout": 100}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(curl(&["-r", "0-0", &srv.url("e")]).status, 206);
}

#[test]
fn info_counts_connections_and_transferred() {
    let srv = TestServer::start();
    let path = srv.dir.path().join("d.raw");
    data_file(&path, 4 * MIB, 100, 1);
    let url = format!("file://{}", path.display());
    control(
        &srv,
        Method::PUT,
        "/tickets/c",
        Some(&ticket_doc("c", &url, 300)),
    );
    let mut raw = Raw::connect(srv.port);
    raw.send(b"OPTIONS /images/c HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(raw.response().0, 200);
    assert_eq!(info(&srv, "c")["connections"], 1);
    raw.send(b"PUT /images/c?flush=n HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n");
    raw.send(&[1u8; 1000]);
    assert_eq!(raw.response().0, 200);
    raw.send(
        b"PUT /images/c HTTP/1.1\r\nHost: x\r\nContent-Range: bytes 500-1499/*\r\n\
          Content-Length: 1000\r\n\r\n",
    );
    raw.send(&[2u8; 1000]);
    assert_eq!(raw.response().0, 200);
    let v = info(&srv, "c");
    assert_eq!(v["transferred"], 1500);
    assert_eq!(v["active"], false);
    drop(raw);
    wait_until("the connection to unbind", || {
        info(&srv, "c")["connections"] == 0
    });
}

/// A client that disconnects in the middle of a PUT body: what arrived is on disk, and the
/// ticket's `transferred` counts exactly the bytes its backend writes completed — no more
/// (nothing half-reported), whatever order the pieces completed in.
#[test]
fn a_put_cut_mid_body_reports_exactly_what_was_written() {
    let srv = TestServer::start();
    let path = srv.dir.path().join("d.raw");
    let size = 16 * MIB;
    std::fs::write(&path, vec![0xEEu8; size as usize]).unwrap();
    let url = format!("file://{}", path.display());
    control(
        &srv,
        Method::PUT,
        "/tickets/cut",
        Some(&ticket_doc("cut", &url, 300)),
    );
    let sent = 5 * MIB + 12345;
    let mut raw = Raw::connect(srv.port);
    raw.send(
        format!("PUT /images/cut?flush=n HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n")
            .as_bytes(),
    );
    raw.send(&vec![0x11u8; sent as usize]);
    drop(raw);
    wait_until("the cut PUT to end", || {
        info(&srv, "cut")["active"] == false
    });
    let on_disk = std::fs::read(&path).unwrap();
    let written = on_disk.iter().filter(|&&b| b == 0x11).count() as u64;
    assert!(
        on_disk[..written as usize].iter().all(|&b| b == 0x11),
        "what was written is the start of the body"
    );
    assert!(written <= sent, "{written} bytes written of {sent} sent");
    assert_eq!(info(&srv, "cut")["transferred"], written);
}

#[test]
fn reaper_removes_expired_tickets() {
    let srv = TestServer::start_with(|c| {
        c.reap_grace = Duration::ZERO;
        c.reap_interval = Duration::from_millis(50);
    });
    control(
        &srv,
        Method::PUT,
        "/tickets/r",
        Some(&ticket_doc("r", "file:///nonexistent", 1)),
    );
    control(
        &srv,
        Method::PUT,
        "/tickets/k",
        Some(&ticket_doc("k", "file:///nonexistent", 300)),
    );
    wait_until("the reaper", || {
        control(&srv, Method::GET, "/tickets/r", None).status == 404
    });
    assert_eq!(control(&srv, Method::GET, "/tickets/k", None).status, 200);
}

#[test]
fn delete_interrupts_a_slow_upload() {
    let srv = TestServer::start();
    let path = srv.dir.path().join("d.raw");
    data_file(&path, 4 * MIB, 0, 1);
    let url = format!("file://{}", path.display());
    control(
        &srv,
        Method::PUT,
        "/tickets/s",
        Some(&ticket_doc("s", &url, 300)),
    );
    let src = srv.dir.path().join("src.bin");
    std::fs::write(&src, vec![9u8; 4 * MIB as usize]).unwrap();
    // 4 MiB at 256 KiB/s: 16 s if nothing stops it.
    let upload = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--limit-rate",
            "256K",
            "-T",
        ])
        .arg(&src)
        .arg(srv.url("s"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the upload to start", || info(&srv, "s")["active"] == true);
    let start = Instant::now();
    let r = control(&srv, Method::DELETE, "/tickets/s", None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let out = upload.wait_with_output().unwrap();
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert_ne!(code, "200", "the upload must fail");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(control(&srv, Method::GET, "/tickets/s", None).status, 404);
    // The canceled upload did not finish writing.
    let disk = std::fs::read(&path).unwrap();
    assert!(disk.iter().filter(|b| **b == 9).count() < 4 * MIB as usize);
}

#[test]
fn delete_answers_409_while_a_backend_write_is_stuck() {
    let nbdkit = testutil::Nbdkit::new("memory")
        .arg("size=16M")
        .filter("delay")
        .arg("wdelay=3")
        .start();
    let sock = nbdkit.socket().unwrap().display().to_string();
    let srv = TestServer::start_with(|c| c.remove_timeout = Duration::from_millis(300));
    let url = format!("nbd:unix:{sock}");
    control(
        &srv,
        Method::PUT,
        "/tickets/n",
        Some(&ticket_doc("n", &url, 300)),
    );
    let src = srv.dir.path().join("src.bin");
    std::fs::write(&src, vec![5u8; MIB as usize]).unwrap();
    let upload = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-T"])
        .arg(&src)
        .arg(format!("{}?flush=n", srv.url("n")))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the upload to start", || info(&srv, "n")["active"] == true);
    // The PUT is active once its headers are in; its 1 MiB body then reaches the backend in
    // milliseconds, and the backend write it starts takes 3 s. Deleting before the write began
    // would cancel a request that is only reading its body (204, not the stuck write).
    std::thread::sleep(Duration::from_millis(500));
    let r = control(&srv, Method::DELETE, "/tickets/n", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.text(), "Timeout cancelling transfer tx-n");
    // Cancelled: new requests are refused while the write finishes.
    let r = curl(&["-r", "0-0", &srv.url("n")]);
    assert_eq!(r.status, 403);
    assert!(
        r.text().ends_with("Transfer=tx-n was canceled\n"),
        "{}",
        r.text()
    );
    let out = upload.wait_with_output().unwrap();
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");
    // Once the write is done, DELETE succeeds.
    let r = control(&srv, Method::DELETE, "/tickets/n", None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(control(&srv, Method::GET, "/tickets/n", None).status, 404);
}
