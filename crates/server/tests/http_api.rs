//! The data API's HTTP behaviour against curl and raw sockets: every row of the reference's
//! error table, Range/Content-Range handling, HEAD, chunked bodies, Expect: 100-continue,
//! keep-alive, connection close on 403, CORS, and hostile ticket ids.

mod common;

use common::{Raw, TestServer, curl, data_file};

const MIB: u64 = 1 << 20;

fn rw_server(size: u64) -> (TestServer, std::path::PathBuf, Vec<u8>) {
    let srv = TestServer::start();
    let path = srv.dir.path().join("disk.raw");
    let data = data_file(&path, size, 3 * MIB as usize + 17, 1);
    srv.file_ticket("rw", &path, size, &["read", "write"]);
    srv.file_ticket("ro", &path, size, &["read"]);
    (srv, path, data)
}

#[test]
fn options_reports_features_limits_and_size() {
    let (srv, _, _) = rw_server(8 * MIB);
    let r = curl(&["-X", "OPTIONS", &srv.url("rw")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("allow").unwrap(), "OPTIONS,GET,PUT,PATCH");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v["features"],
        serde_json::json!(["checksum", "extents", "flush", "zero"])
    );
    assert_eq!(v["max_readers"], 8);
    assert_eq!(v["max_writers"], 8);
    assert_eq!(v["size"], 8 * MIB);
    assert_eq!(
        v["unix_socket"],
        srv.local_socket().display().to_string().as_str()
    );
    assert!(v["min_block_size"].as_u64().unwrap() >= 1);

    let r = curl(&["-X", "OPTIONS", &srv.url("ro")]);
    assert_eq!(r.header("allow").unwrap(), "OPTIONS,GET");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["features"], serde_json::json!(["checksum", "extents"]));

    let r = curl(&["-X", "OPTIONS", &srv.url("*")]);
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v.get("max_readers").is_none());

    // A CORS preflight gets PATCH in the allowed methods.
    let r = curl(&[
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://engine",
        "-H",
        "Access-Control-Request-Method: PATCH",
        &srv.url("rw"),
    ]);
    assert_eq!(r.header("access-control-allow-origin").unwrap(), "*");
    assert_eq!(
        r.header("access-control-allow-methods").unwrap(),
        "OPTIONS,GET,PUT,PATCH"
    );
    assert_eq!(r.header("access-control-max-age").unwrap(), "86400");
}

#[test]
fn get_whole_image_and_ranges() {
    let size = 8 * MIB;
    let (srv, _, data) = rw_server(size);
    let r = curl(&[&srv.url("ro")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as u64, size);
    assert_eq!(&r.body[..data.len()], &data[..]);
    assert!(r.body[data.len()..].iter().all(|b| *b == 0));
    assert_eq!(
        r.header("content-type").unwrap(),
        "application/octet-stream"
    );
    assert!(r.header("content-range").is_none());

    let r = curl(&["-r", "1000-1999", &srv.url("ro")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[1000..2000]);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes 1000-1999/{size}")
    );
    let r = curl(&["-r", &format!("{}-", size - 10), &srv.url("ro")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body.len(), 10);
}

#[test]
fn bad_ranges_are_416_never_500() {
    let size = 4 * MIB;
    let srv = TestServer::start();
    let path = srv.dir.path().join("small.raw");
    data_file(&path, 2 * MIB, 1000, 2);
    // The ticket allows more than the backend holds.
    srv.file_ticket("t", &path, size, &["read"]);
    let range = |r: &str| curl(&["-H", &format!("Range: {r}"), &srv.url("t")]);

    let r = range("bytes=-5");
    assert_eq!(r.status, 416);
    assert_eq!(r.text(), "suffix-byte-range-spec not supported yet\n");
    let r = range("bytes=0-1,5-6");
    assert_eq!(r.status, 416);
    assert_eq!(
        r.text(),
        "Cannot satisfy range 'bytes=0-1,5-6', invalid range or multiple ranges\n"
    );
    assert_eq!(range("bytes=9-1").status, 416);
    for junk in [
        "bytes=-",
        "bytes=x-y",
        "pages=1-2",
        "bytes=99999999999999999999999-",
    ] {
        let r = range(junk);
        assert_eq!(r.status, 416, "{junk}: {}", r.text());
    }
    let r = range(&format!("bytes=0-{size}"));
    assert_eq!(r.status, 416);
    assert_eq!(r.text(), "Requested range out of allowed range\n");
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{size}")
    );
    let r = range(&format!("bytes=0-{}", 3 * MIB));
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{}", 2 * MIB)
    );
    assert!(r.text().starts_with("Requested more bytes than available"));
    // The server is still fine.
    assert_eq!(range("bytes=0-9").status, 206);
}

#[test]
fn head_sends_headers_without_body_and_keeps_the_connection() {
    let (srv, _, _) = rw_server(4 * MIB);
    let mut raw = Raw::connect(srv.port);
    raw.send(b"HEAD /images/ro HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, head, body) = {
        // A HEAD response announces the length but sends nothing: read the head only.
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        use std::io::Read;
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(raw.sock.read(&mut b).unwrap(), 1);
            buf.push(b[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        (head[9..12].parse::<u16>().unwrap(), head, Vec::<u8>::new())
    };
    assert_eq!(status, 200);
    assert!(
        head.contains(&format!("content-length: {}", 4 * MIB)),
        "{head}"
    );
    assert!(body.is_empty());
    // The next request on the same connection is answered, so no body bytes were sent.
    raw.send(b"GET /images/ro HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\n\r\n");
    let (status, _, body) = raw.response();
    assert_eq!(status, 206);
    assert_eq!(body.len(), 4);
}

#[test]
fn put_with_content_range_flush_and_errors() {
    let size = 8 * MIB;
    let (srv, path, _) = rw_server(size);
    let src = srv.dir.path().join("up.bin");
    let payload = testutil::pseudo_random(9, 5 * MIB as usize + 3);
    std::fs::write(&src, &payload).unwrap();
    let up = src.display().to_string();
    let last = MIB + payload.len() as u64 - 1;
    let r = curl(&[
        "-T",
        &up,
        "-H",
        &format!("Content-Range: bytes {MIB}-{last}/*"),
        &format!("{}?flush=n", srv.url("rw")),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body.is_empty());
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(&disk[MIB as usize..=last as usize], &payload[..]);

    let r = curl(&["-T", &up, &format!("{}?flush=maybe", srv.url("rw"))]);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.text(),
        "Unsupported value 'maybe' for 'flush', expecting one of ['n', 'y']\n"
    );
    let r = curl(&[
        "-T",
        &up,
        "-H",
        "Content-Range: bytes 5-1/*",
        &srv.url("rw"),
    ]);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.text(),
        "Invalid Content-Range 'bytes 5-1/*', first > last\n"
    );
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    let r = curl(&[
        "-T",
        &up,
        "-H",
        &format!("Content-Range: bytes {}-*/*", size - 10),
        &srv.url("rw"),
    ]);
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{size}")
    );
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    // Read-only tickets refuse writes, and close the connection.
    let r = curl(&["-T", &up, &srv.url("ro")]);
    assert_eq!(r.status, 403);
    assert!(r.text().ends_with("forbids write\n"), "{}", r.text());
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    // Nothing was written by the refused requests.
    assert_eq!(std::fs::read(&path).unwrap(), disk);
}

#[test]
fn put_without_length_is_400_and_bad_length_closes() {
    let (srv, _, _) = rw_server(MIB);
    let mut raw = Raw::connect(srv.port);
    raw.send(b"PUT /images/rw HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, body) = raw.response();
    assert_eq!(status, 400);
    assert_eq!(body, b"Content-Length header is required\n");

    let mut raw = Raw::connect(srv.port);
    raw.send(b"PUT /images/rw HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n");
    let (status, _, _) = raw.response();
    assert_eq!(status, 400);
    assert!(raw.closed());
}

#[test]
fn chunked_upload_is_accepted_and_keeps_framing() {
    let (srv, path, _) = rw_server(MIB);
    let mut raw = Raw::connect(srv.port);
    raw.send(
        b"PUT /images/rw?flush=y HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    let (status, _, body) = raw.response();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // The connection continues with the next request, not with leftover chunk bytes.
    raw.send(b"GET /images/rw HTTP/1.1\r\nHost: x\r\nRange: bytes=0-10\r\n\r\n");
    let (status, _, body) = raw.response();
    assert_eq!(status, 206);
    assert_eq!(body, b"hello world");
    assert_eq!(&std::fs::read(&path).unwrap()[..11], b"hello world");

    // curl streams stdin with chunked encoding.
    let src = srv.dir.path().join("c.bin");
    let payload = testutil::pseudo_random(3, 300_000);
    std::fs::write(&src, &payload).unwrap();
    let r = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", src.display()),
        "-X",
        "PUT",
        &srv.url("rw"),
    ]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        &std::fs::read(&path).unwrap()[..payload.len()],
        &payload[..]
    );

    // Chunked data past the ticket's size is refused and the connection closed.
    let mut raw = Raw::connect(srv.port);
    raw.send(
        format!(
            "PUT /images/rw HTTP/1.1\r\nHost: x\r\nContent-Range: bytes {}-*/*\r\n\
             Transfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n0\r\n\r\n",
            MIB - 4
        )
        .as_bytes(),
    );
    let (status, _, _) = raw.response();
    assert_eq!(status, 416);
    assert!(raw.closed());
}

#[test]
fn expect_100_continue() {
    let (srv, path, _) = rw_server(MIB);
    let mut raw = Raw::connect(srv.port);
    raw.send(
        b"PUT /images/rw HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    );
    let mut interim = [0u8; 25];
    use std::io::Read;
    raw.sock.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    raw.send(b"abcd");
    let (status, _, _) = raw.response();
    assert_eq!(status, 200);
    assert_eq!(&std::fs::read(&path).unwrap()[..4], b"abcd");

    // Refused before the body: no 100, a 403, and the connection closes.
    let mut raw = Raw::connect(srv.port);
    raw.send(
        b"PUT /images/ro HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    );
    let (status, _, _) = raw.response();
    assert_eq!(status, 403);
    assert!(raw.closed());

    // curl uses Expect: 100-continue for large uploads.
    let src = srv.dir.path().join("big.bin");
    std::fs::write(&src, vec![7u8; 900_000]).unwrap();
    let r = curl(&[
        "-H",
        "Expect: 100-continue",
        "-T",
        &src.display().to_string(),
        &srv.url("rw"),
    ]);
    assert_eq!(r.status, 200);
}

#[test]
fn forbidden_closes_the_connection_and_keep_alive_otherwise() {
    let (srv, _, _) = rw_server(MIB);
    let mut raw = Raw::connect(srv.port);
    for _ in 0..3 {
        raw.send(b"GET /images/ro HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\n\r\n");
        assert_eq!(raw.response().0, 206);
    }
    raw.send(b"GET /images/nope HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, head, body) = raw.response();
    assert_eq!(status, 403);
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "You are not allowed to access this resource: No such ticket nope\n"
    );
    assert!(raw.closed());

    // ?close=y closes after a successful response too.
    let mut raw = Raw::connect(srv.port);
    raw.send(b"GET /images/ro?close=y HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\n\r\n");
    assert_eq!(raw.response().0, 206);
    assert!(raw.closed());
}

#[test]
fn patch_zero_and_flush() {
    let (srv, path, data) = rw_server(4 * MIB);
    let patch = |id: &str, body: &str| {
        curl(&[
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
            &srv.url(id),
        ])
    };
    let r = patch(
        "rw",
        r#"{"op": "zero", "offset": 4096, "size": 8192, "flush": true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[4096..12288].iter().all(|b| *b == 0));
    assert_eq!(&disk[..4096], &data[..4096]);
    assert_eq!(&disk[12288..20000], &data[12288..20000]);
    assert_eq!(patch("rw", r#"{"op": "flush"}"#).status, 200);

    let cases = [
        ("{", 400, "Invalid JSON message"),
        ("{}", 400, "Missing required value for op"),
        (
            r#"{"op": "trim"}"#,
            400,
            "Unsupported value 'trim' for 'op', expecting one of ['flush', 'zero']",
        ),
        (
            r#"{"op": "zero"}"#,
            400,
            "Missing required value for 'size'",
        ),
        (r#"{"op": "zero", "size": -1}"#, 400, "Invalid value -1 < 0"),
        (r#"{"op": "zero", "size": "1"}"#, 400, "Integer required"),
        (
            r#"{"op": "zero", "size": 1, "flush": 3}"#,
            400,
            "Boolean required",
        ),
        (
            r#"{"op": "zero", "offset": 4194300, "size": 5}"#,
            416,
            "Requested range out of allowed range",
        ),
    ];
    for (body, status, text) in cases {
        let r = patch("rw", body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.text().starts_with(text), "{body}: {}", r.text());
    }
    let r = patch("ro", r#"{"op": "flush"}"#);
    assert_eq!(r.status, 403);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
}

#[test]
fn extents_from_seek_data_with_optional_range() {
    let srv = TestServer::start();
    let path = srv.dir.path().join("sparse.raw");
    let layout = testutil::Layout::new()
        .data(MIB, 1)
        .hole(2 * MIB)
        .data(MIB, 2);
    testutil::make_sparse_image(&path, &layout);
    srv.file_ticket("t", &path, 4 * MIB, &["read"]);
    let r = curl(&[&format!("{}/extents", srv.url("t"))]);
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!([
            {"start": 0, "length": MIB, "zero": false, "hole": false},
            {"start": MIB, "length": 2 * MIB, "zero": true, "hole": false},
            {"start": 3 * MIB, "length": MIB, "zero": false, "hole": false},
        ])
    );
    // Key order is the reference's.
    assert!(
        r.text().starts_with(r#"[{"start": 0, "length": "#),
        "{}",
        r.text()
    );
    let r = curl(&[&format!(
        "{}/extents?context=zero&start={}&length={}",
        srv.url("t"),
        MIB / 2,
        MIB
    )]);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!([
            {"start": MIB / 2, "length": MIB / 2, "zero": false, "hole": false},
            {"start": MIB, "length": MIB / 2, "zero": true, "hole": false},
        ])
    );
    let r = curl(&[&format!("{}/extents?context=dirty", srv.url("t"))]);
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "Ticket does not support dirty extents\n");
    let r = curl(&[&format!("{}/extents?context=bogus", srv.url("t"))]);
    assert_eq!(r.status, 400);
    let r = curl(&[&format!("{}/extents?start=x", srv.url("t"))]);
    assert_eq!(r.status, 400);
    let r = curl(&[&format!(
        "{}/extents?start={}&length=1",
        srv.url("t"),
        4 * MIB
    )]);
    assert_eq!(r.status, 416);
    // A typo in the sub-resource is 404, not "no such ticket".
    let r = curl(&[&format!("{}/extent", srv.url("t"))]);
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "No handler for '/images/t/extent'\n");
}

#[test]
fn routes_methods_and_info() {
    let (srv, _, _) = rw_server(MIB);
    let r = curl(&[&format!("{}/info/", srv.base())]);
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["version"], "2.5.3");
    assert_eq!(curl(&[&format!("{}/info", srv.base())]).status, 404);
    let r = curl(&["-X", "DELETE", &srv.url("rw")]);
    assert_eq!(r.status, 405);
    assert_eq!(r.text(), "Method 'DELETE' not defined for '/images/rw'\n");
    let r = curl(&["-X", "FOO", &srv.url("rw")]);
    assert_eq!(r.status, 405);
    assert_eq!(r.text(), "Invalid method 'FOO'\n");
    assert_eq!(curl(&[&format!("{}/tickets/rw", srv.base())]).status, 404);
    // The local socket serves images but not /info/.
    let sock = srv.local_socket().display().to_string();
    let r = curl(&["--unix-socket", &sock, "http://x/info/"]);
    assert_eq!(r.status, 404);
    let r = curl(&["--unix-socket", &sock, "-r", "0-0", "http://x/images/rw"]);
    assert_eq!(r.status, 206);
}

#[test]
fn hostile_ticket_ids_are_refused_without_errors() {
    let (srv, _, _) = rw_server(MIB);
    let long = "a".repeat(10_000);
    let ids = [
        "..",
        "%2e%2e",
        "..%2f..%2fetc%2fpasswd",
        "%2Fetc%2Fpasswd",
        "rw%00",
        long.as_str(),
    ];
    for id in ids {
        let r = curl(&["--path-as-is", &srv.url(id)]);
        assert!(
            [400, 403, 404, 414, 431].contains(&r.status),
            "{id}: {} {}",
            r.status,
            r.text()
        );
    }
    for path in [
        "/images/../images/rw/..",
        "/images/rw/../../etc/passwd",
        "/images//x",
    ] {
        let r = curl(&["--path-as-is", &format!("{}{path}", srv.base())]);
        assert!(
            r.status == 403 || r.status == 404 || r.status == 400,
            "{path}: {}",
            r.status
        );
    }
    // Still serving.
    assert_eq!(curl(&["-r", "0-0", &srv.url("rw")]).status, 206);
}

#[test]
fn idle_connections_time_out_before_and_after_authorization() {
    let srv = TestServer::start_with(|c| c.auth_timeout = std::time::Duration::from_millis(300));
    let path = srv.dir.path().join("d.raw");
    data_file(&path, MIB, 10, 1);
    srv.add_ticket(serde_json::json!({
        "uuid": "t", "size": MIB, "ops": ["read"], "timeout": 300,
        "url": format!("file://{}", path.display()), "inactivity_timeout": 3,
    }));
    // Unauthenticated and silent: closed after the short timeout.
    let mut idle = Raw::connect(srv.port);
    let start = std::time::Instant::now();
    assert!(idle.closed());
    assert!(start.elapsed() < std::time::Duration::from_secs(3));

    // Authorized: the ticket's longer timeout applies.
    let mut raw = Raw::connect(srv.port);
    raw.send(b"GET /images/t HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\n\r\n");
    assert_eq!(raw.response().0, 206);
    std::thread::sleep(std::time::Duration::from_millis(1000));
    raw.send(b"GET /images/t HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\n\r\n");
    assert_eq!(raw.response().0, 206);
}
