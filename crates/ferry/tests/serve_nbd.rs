//! `ferry serve --nbd-socket / --nbd-listen`: every ticket exported over NBD under its ticket id,
//! exercised with real clients (nbdcopy, nbdinfo, qemu-img, `ferry copy`, ferry's client
//! library) against the real `ferry serve` binary: reads and maps of a sparse image, multi-conn
//! writes, read-only tickets, refusals of unknown, expired and deleted tickets at NBD_OPT_GO, an
//! empty export list, DELETE under a connected client, OPTIONS' `nbd_url`, and TCP with and
//! without TLS.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use testutil::outcome::{Outcome, run_outcome};
use testutil::{FerryServe, Layout, MapExtent};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Bound on every helper program (nbdinfo, nbdcopy, qemu-img, curl, `ferry ticket`).
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn tool(name: &str) -> Command {
    Command::new(testutil::require_binary(name))
}

fn outcome(cmd: &mut Command) -> Outcome {
    run_outcome(cmd, TOOL_TIMEOUT)
}

/// A running `ferry serve` with a control socket.
struct Serve {
    serve: FerryServe,
    control: String,
}

impl Serve {
    /// Starts `ferry serve ARGS --control-socket DIR/control.sock` and waits (bounded) for its
    /// ready file.
    fn start(dir: &Path, args: &[&str]) -> Serve {
        let control = dir.join("control.sock").display().to_string();
        let mut all = args.to_vec();
        all.extend(["--control-socket", &control]);
        let bin = Path::new(env!("CARGO_BIN_EXE_ferry"));
        Serve {
            serve: FerryServe::start(bin, dir, &all),
            control,
        }
    }

    fn ready(&self) -> &serde_json::Value {
        self.serve.ready()
    }

    fn log(&self) -> String {
        self.serve.log()
    }

    /// Runs `ferry ticket --control-socket … ARGS`.
    fn ticket(&self, args: &[&str]) -> Outcome {
        outcome(
            ferry()
                .arg("ticket")
                .args(["--control-socket", &self.control])
                .args(args),
        )
    }

    /// `ferry ticket add --uuid ID --url file://PATH --size SIZE --ops OPS`.
    fn add(&self, id: &str, path: &Path, size: u64, ops: &str) {
        let url = format!("file://{}", path.display());
        let size = size.to_string();
        let out = self.ticket(&[
            "add", "--uuid", id, "--url", &url, "--size", &size, "--ops", ops,
        ]);
        out.expect_success();
    }

    /// The ticket's info document (`ferry ticket show ID`).
    fn show(&self, id: &str) -> serde_json::Value {
        let out = self.ticket(&["show", id]);
        serde_json::from_str(out.expect_success()).unwrap()
    }

    fn transferred(&self, id: &str) -> u64 {
        let info = self.show(id);
        info["transferred"]
            .as_u64()
            .unwrap_or_else(|| panic!("no transferred in {info}"))
    }

    /// `nbd+unix:///ID?socket=…` for the NBD socket.
    fn unix_uri(&self, id: &str) -> String {
        format!(
            "nbd+unix:///{id}?socket={}",
            self.ready()["nbd_socket"].as_str().expect("nbd_socket")
        )
    }

    fn port(&self) -> u16 {
        self.serve.port()
    }
}

/// `ferry serve --listen 127.0.0.1:0 --no-tls --nbd-socket DIR/nbd.sock`.
fn serve_unix(dir: &Path) -> Serve {
    let sock = dir.join("nbd.sock").display().to_string();
    let srv = Serve::start(
        dir,
        &["--listen", "127.0.0.1:0", "--no-tls", "--nbd-socket", &sock],
    );
    assert_eq!(srv.ready()["nbd_socket"], sock.as_str());
    srv
}

/// A sparse raw image: data, explicit zeros and holes, all 64 KiB aligned.
fn sample_layout() -> Layout {
    Layout::new()
        .data(256 * KIB, 1)
        .hole(512 * KIB)
        .zero(128 * KIB)
        .data(64 * KIB, 2)
        .hole(MIB)
        .data(192 * KIB, 3)
        .zero(64 * KIB)
        .hole(832 * KIB)
}

/// The base:allocation map the layout's file should have: holes are hole+zero (3), the rest
/// is data (0).
fn expected_map(layout: &Layout) -> Vec<MapExtent> {
    let mut out = Vec::new();
    let mut at = 0;
    for (offset, length) in layout.allocated() {
        if offset > at {
            out.push(MapExtent {
                offset: at,
                length: offset - at,
                flags: 3,
            });
        }
        out.push(MapExtent {
            offset,
            length,
            flags: 0,
        });
        at = offset + length;
    }
    if at < layout.size() {
        out.push(MapExtent {
            offset: at,
            length: layout.size() - at,
            flags: 3,
        });
    }
    testutil::tools::merge(&out)
}

/// `nbdinfo --can WHAT URI`: Some(true) / Some(false), panicking on any other outcome.
fn nbdinfo_can(what: &str, uri: &str) -> bool {
    let out = outcome(tool("nbdinfo").args(["--can", what, uri]));
    match out.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("nbdinfo --can {what} {uri}: {out:?}"),
    }
}

/// `nbdinfo --size URI`.
fn nbdinfo_size(uri: &str) -> u64 {
    let out = outcome(tool("nbdinfo").args(["--size", uri]));
    out.expect_success().trim().parse().unwrap()
}

fn nbdcopy(args: &[&str]) -> Outcome {
    outcome(tool("nbdcopy").args(args))
}

fn curl(args: &[&str]) -> (String, Vec<u8>) {
    let out: Output = {
        let o = outcome(tool("curl").args(["-s", "-w", "\n%{http_code}"]).args(args));
        Output {
            status: o.status,
            stdout: o.stdout.into_bytes(),
            stderr: o.stderr.into_bytes(),
        }
    };
    let mut body = out.stdout;
    let split = body.iter().rposition(|b| *b == b'\n').unwrap();
    let code = String::from_utf8_lossy(&body[split + 1..]).to_string();
    body.truncate(split);
    (code, body)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One connection with ferry's own NBD client; the handshake and every request are bounded.
fn connect(rt: &tokio::runtime::Runtime, uri: &str) -> nbd::client::Client {
    let uri: nbd::uri::NbdUri = uri.parse().unwrap();
    let mut opts = nbd::client::ConnectOptions::from_uri(&uri);
    opts.settings.timeout = Duration::from_secs(10);
    rt.block_on(nbd::client::Client::connect(&opts, 1))
        .expect("connecting")
}

fn sized_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

#[test]
fn read_ticket_with_nbdcopy_ferry_copy_and_map() {
    let dir = testutil::temp_dir();
    let layout = sample_layout();
    let disk = dir.path().join("disk.raw");
    let size = testutil::make_sparse_image(&disk, &layout);
    let srv = serve_unix(dir.path());
    srv.add("r1", &disk, size, "read");
    let uri = srv.unix_uri("r1");
    let expected = layout.expected();
    assert_eq!(srv.transferred("r1"), 0);

    assert_eq!(nbdinfo_size(&uri), size);
    // nbdcopy reads it.
    let out = dir.path().join("nbdcopy.out");
    nbdcopy(&[&uri, &out.display().to_string()]).expect_success();
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "nbdcopy copy differs"
    );
    // ferry copy reads it.
    let out2 = dir.path().join("ferry.out");
    outcome(ferry().arg("copy").arg(&uri).arg(&out2)).expect_success();
    assert!(
        std::fs::read(&out2).unwrap() == expected,
        "ferry copy differs"
    );
    // The map over NBD is the file's: holes where the file has holes.
    let map = testutil::tools::merge(&testutil::tools::nbdinfo_map(&uri, None));
    assert_eq!(map, expected_map(&layout));
    // Reads count as the ticket's progress.
    assert!(srv.transferred("r1") > 0, "{}", srv.show("r1"));
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
}

#[test]
fn write_ticket_with_nbdcopy_multi_conn_and_qemu_img() {
    let dir = testutil::temp_dir();
    let layout = sample_layout();
    let src = dir.path().join("src.raw");
    let size = testutil::make_sparse_image(&src, &layout);
    let dst = dir.path().join("dst.raw");
    // The destination starts with garbage everywhere, so zero runs and holes must be written.
    std::fs::write(&dst, testutil::pseudo_random(99, size as usize)).unwrap();
    let srv = serve_unix(dir.path());
    srv.add("w1", &dst, size, "write");
    let uri = srv.unix_uri("w1");
    assert!(nbdinfo_can("write", &uri));
    assert!(nbdinfo_can("multi-conn", &uri));
    assert_eq!(srv.transferred("w1"), 0);

    nbdcopy(&[
        "-C",
        "4",
        "-T",
        "4",
        "--flush",
        &src.display().to_string(),
        &uri,
    ])
    .expect_success();
    assert!(
        std::fs::read(&dst).unwrap() == layout.expected(),
        "nbdcopy -C 4 wrote something else"
    );
    let after_nbdcopy = srv.transferred("w1");
    assert!(after_nbdcopy > 0, "{}", srv.show("w1"));

    // qemu-img convert -n over the same ticket, with other contents.
    let other = Layout::new()
        .hole(128 * KIB)
        .data(MIB, 7)
        .zero(256 * KIB)
        .data(size - MIB - 384 * KIB, 8);
    let src2 = dir.path().join("src2.raw");
    assert_eq!(testutil::make_sparse_image(&src2, &other), size);
    outcome(tool("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &src2.display().to_string(),
        &uri,
    ]))
    .expect_success();
    assert!(
        std::fs::read(&dst).unwrap() == other.expected(),
        "qemu-img convert wrote something else"
    );
    let after_qemu = srv.transferred("w1");
    assert!(after_qemu >= after_nbdcopy);
    // Once the clients are gone, their connections are no longer counted.
    let start = Instant::now();
    while srv.show("w1")["connections"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "NBD connections still counted: {}",
            srv.show("w1")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
}

#[test]
fn transferred_grows_with_each_nbd_write() {
    let dir = testutil::temp_dir();
    let dst = dir.path().join("dst.raw");
    sized_file(&dst, 4 * MIB);
    let piece = dir.path().join("piece.raw");
    std::fs::write(&piece, testutil::pseudo_random(5, MIB as usize)).unwrap();
    let srv = serve_unix(dir.path());
    srv.add("w", &dst, 4 * MIB, "write");
    assert!(nbdinfo_can("write", &srv.unix_uri("w")));
    let mut last = srv.transferred("w");
    assert_eq!(last, 0);
    // Each round writes another MiB through qemu's raw driver with an offset onto the ticket,
    // so the union of written ranges must grow every time.
    for i in 0..3u64 {
        let target = format!(
            "driver=raw,offset={},size={MIB},file.driver=nbd,file.path={},file.export=w",
            i * MIB,
            srv.ready()["nbd_socket"].as_str().unwrap()
        );
        outcome(tool("qemu-img").args([
            "convert",
            "-n",
            "-f",
            "raw",
            "--target-image-opts",
            &piece.display().to_string(),
            &target,
        ]))
        .expect_success();
        let now = srv.transferred("w");
        assert!(now > last, "transferred did not grow: {last} -> {now}");
        last = now;
    }
    let data = std::fs::read(&dst).unwrap();
    let piece = std::fs::read(&piece).unwrap();
    for i in 0..3 {
        assert!(data[i * MIB as usize..(i + 1) * MIB as usize] == piece[..]);
    }
    assert!(data[3 * MIB as usize..].iter().all(|b| *b == 0));
}

#[test]
fn read_only_ticket_refuses_writes() {
    let dir = testutil::temp_dir();
    let disk = dir.path().join("disk.raw");
    let original = testutil::pseudo_random(3, MIB as usize);
    std::fs::write(&disk, &original).unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, testutil::pseudo_random(4, MIB as usize)).unwrap();
    let srv = serve_unix(dir.path());
    srv.add("ro", &disk, MIB, "read");
    let uri = srv.unix_uri("ro");
    assert!(nbdinfo_can("read", &uri));
    assert!(!nbdinfo_can("write", &uri));
    nbdcopy(&[&src.display().to_string(), &uri]).expect_failure();
    outcome(tool("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &src.display().to_string(),
        &uri,
    ]))
    .expect_failure();
    outcome(ferry().arg("copy").arg(&src).arg(&uri)).expect_failure();
    // ferry's client, which sends what it is told: writes, zeroes and trims fail with an error
    // (never a disconnect) and reads keep working on the same connection.
    let rt = runtime();
    let client = connect(&rt, &uri);
    let write = rt.block_on(client.write(0, bytes::Bytes::from(vec![1u8; 4096]), false));
    assert!(write.is_err(), "write to a read-only ticket succeeded");
    let zero = rt.block_on(client.write_zeroes(0, 4096, Default::default()));
    assert!(zero.is_err(), "zero on a read-only ticket succeeded");
    let trim = rt.block_on(client.trim(0, 4096, false));
    assert!(trim.is_err(), "trim on a read-only ticket succeeded");
    let got = rt.block_on(client.read(0, 4096)).expect("read");
    assert!(got[..] == original[..4096]);
    rt.block_on(client.disconnect());
    assert!(std::fs::read(&disk).unwrap() == original, "image changed");
    // Still readable.
    let out = dir.path().join("out.raw");
    nbdcopy(&[&uri, &out.display().to_string()]).expect_success();
    assert!(std::fs::read(&out).unwrap() == original);
}

#[test]
fn unknown_expired_and_deleted_tickets_are_refused_and_list_is_empty() {
    let dir = testutil::temp_dir();
    let disk = dir.path().join("disk.raw");
    sized_file(&disk, MIB);
    let srv = serve_unix(dir.path());
    for id in ["live-ticket", "expired-ticket", "deleted-ticket"] {
        srv.add(id, &disk, MIB, "read,write");
    }
    for id in ["live-ticket", "expired-ticket", "deleted-ticket"] {
        assert_eq!(nbdinfo_size(&srv.unix_uri(id)), MIB);
    }
    srv.ticket(&["mod", "expired-ticket", "--timeout", "0"])
        .expect_success();
    srv.ticket(&["del", "deleted-ticket"]).expect_success();
    let out = srv.ticket(&["show", "deleted-ticket"]);
    assert_eq!(out.code(), Some(1), "{out:?}");

    for id in ["unknown-ticket", "expired-ticket", "deleted-ticket"] {
        let out = outcome(tool("nbdinfo").arg(srv.unix_uri(id)));
        let err = out.expect_failure();
        assert!(
            err.contains("opt_go") || err.contains("OPT_GO"),
            "{id}: not refused at NBD_OPT_GO: {err}"
        );
        assert!(
            err.contains(id),
            "{id}: error does not name the export: {err}"
        );
        // ferry's own client is refused too.
        outcome(
            ferry()
                .arg("copy")
                .arg(srv.unix_uri(id))
                .arg(dir.path().join("x.raw")),
        )
        .expect_failure();
    }
    // The live ticket still works.
    assert_eq!(nbdinfo_size(&srv.unix_uri("live-ticket")), MIB);

    // LIST reveals nothing.
    let sock = srv.ready()["nbd_socket"].as_str().unwrap().to_string();
    let list_uri = format!("nbd+unix://?socket={sock}");
    let out = outcome(tool("nbdinfo").args(["--list", "--json", &list_uri]));
    let v: serde_json::Value = serde_json::from_str(out.expect_success()).unwrap();
    assert_eq!(v["exports"], serde_json::json!([]), "{v}");
    assert!(!out.stderr.contains("ticket"), "LIST leaked ids: {out:?}");
    let out = outcome(tool("nbdinfo").args(["--list", &list_uri]));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(!text.contains("ticket"), "LIST leaked ids: {text}");
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
}

#[test]
fn nbd_activity_slides_the_expiry_and_an_idle_connection_expires() {
    let dir = testutil::temp_dir();
    let disk = dir.path().join("disk.raw");
    let data = testutil::pseudo_random(15, 64 * KIB as usize);
    std::fs::write(&disk, &data).unwrap();
    let srv = serve_unix(dir.path());
    let url = format!("file://{}", disk.display());
    srv.ticket(&[
        "add",
        "--uuid",
        "short",
        "--url",
        &url,
        "--size",
        "65536",
        "--ops",
        "read",
        "--timeout",
        "1",
    ])
    .expect_success();
    let rt = runtime();
    let client = connect(&rt, &srv.unix_uri("short"));
    // Requests every 200 ms for 2 s keep a 1 s ticket alive.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let got = rt
            .block_on(client.read(0, 4096))
            .unwrap_or_else(|e| panic!("read at {:?}: {e}", start.elapsed()));
        assert!(got[..] == data[..4096]);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Idle past the window: the next request fails, and new connections are refused.
    std::thread::sleep(Duration::from_millis(1500));
    let read = rt.block_on(client.read(0, 4096));
    assert!(read.is_err(), "read on an expired ticket succeeded");
    rt.block_on(client.disconnect());
    let out = outcome(tool("nbdinfo").arg(srv.unix_uri("short")));
    assert!(out.expect_failure().contains("short"), "{out:?}");
}

#[test]
fn delete_while_connected_fails_the_next_request() {
    let dir = testutil::temp_dir();
    let disk = dir.path().join("disk.raw");
    let data = testutil::pseudo_random(11, MIB as usize);
    std::fs::write(&disk, &data).unwrap();
    let srv = serve_unix(dir.path());
    srv.add("doomed", &disk, MIB, "read,write");
    let rt = runtime();
    let client = connect(&rt, &srv.unix_uri("doomed"));
    let got = rt.block_on(client.read(0, 64 * KIB)).expect("first read");
    assert!(got[..] == data[..64 * KIB as usize]);
    assert_eq!(srv.show("doomed")["connections"], 1);

    // DELETE with the client connected but idle: it does not wait for the connection.
    let start = Instant::now();
    srv.ticket(&["del", "doomed"]).expect_success();
    assert!(start.elapsed() < Duration::from_secs(10));
    let out = srv.ticket(&["show", "doomed"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("404"), "{out:?}");

    // The next read and write on the open connection fail.
    let read = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), client.read(0, 4096)).await
    });
    assert!(
        matches!(read, Ok(Err(_))),
        "read after DELETE: {:?}",
        read.map(|r| r.map(|b| b.len()))
    );
    let write = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            client.write(0, bytes::Bytes::from(vec![0u8; 4096]), false),
        )
        .await
    });
    assert!(matches!(write, Ok(Err(_))), "write after DELETE: {write:?}");
    rt.block_on(client.disconnect());
    assert!(std::fs::read(&disk).unwrap() == data, "image changed");
    // A new connection is refused.
    outcome(tool("nbdinfo").arg(srv.unix_uri("doomed"))).expect_failure();
}

#[test]
fn options_reports_a_working_nbd_url() {
    let dir = testutil::temp_dir();
    let disk = dir.path().join("disk.raw");
    let data = testutil::pseudo_random(12, 256 * KIB as usize);
    std::fs::write(&disk, &data).unwrap();
    let srv = serve_unix(dir.path());
    srv.add("opt", &disk, 256 * KIB, "read");
    let (code, body) = curl(&[
        "-X",
        "OPTIONS",
        &format!("http://127.0.0.1:{}/images/opt", srv.port()),
    ]);
    assert_eq!(code, "200", "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let url = v["nbd_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no nbd_url: {v}"));
    assert_eq!(url, srv.unix_uri("opt"));
    assert_eq!(nbdinfo_size(url), 256 * KIB);
    let out = dir.path().join("out.raw");
    nbdcopy(&[url, &out.display().to_string()]).expect_success();
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn nbd_over_tcp_without_tls() {
    let dir = testutil::temp_dir();
    let disk = dir.path().join("disk.raw");
    let data = testutil::pseudo_random(13, 512 * KIB as usize);
    std::fs::write(&disk, &data).unwrap();
    let srv = Serve::start(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--nbd-listen",
            "127.0.0.1:0",
        ],
    );
    srv.add("tcp", &disk, 512 * KIB, "read");
    let addr = srv.ready()["nbd_listen"].as_str().expect("nbd_listen");
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let uri = format!("nbd://{addr}/tcp");
    assert_eq!(nbdinfo_size(&uri), 512 * KIB);
    let out = dir.path().join("out.raw");
    nbdcopy(&[&uri, &out.display().to_string()]).expect_success();
    assert!(std::fs::read(&out).unwrap() == data);
    // OPTIONS points at the TCP export.
    let (code, body) = curl(&[
        "-X",
        "OPTIONS",
        &format!("http://127.0.0.1:{}/images/tcp", srv.port()),
    ]);
    assert_eq!(code, "200");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["nbd_url"], uri.as_str());
}

#[test]
fn nbd_over_tcp_requires_tls_when_the_data_service_has_it() {
    let dir = testutil::temp_dir();
    let certs = testutil::Certs::generate();
    let disk = dir.path().join("disk.raw");
    let data = testutil::pseudo_random(14, 512 * KIB as usize);
    std::fs::write(&disk, &data).unwrap();
    let cert = certs.dir().join("server-cert.pem").display().to_string();
    let key = certs.dir().join("server-key.pem").display().to_string();
    let sock = dir.path().join("nbd.sock").display().to_string();
    let srv = Serve::start(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--nbd-listen",
            "127.0.0.1:0",
            "--nbd-socket",
            &sock,
        ],
    );
    srv.add("secure", &disk, 512 * KIB, "read");
    let addr = srv.ready()["nbd_listen"].as_str().expect("nbd_listen");
    let port = addr.rsplit_once(':').unwrap().1;

    // Plain NBD over TCP is refused: TLS is required.
    // (libnbd reports NBD_REP_ERR_TLS_REQD as ENOTSUP; its debug log has the server's reason.)
    let out = outcome(
        tool("nbdinfo")
            .env("LIBNBD_DEBUG", "1")
            .arg(format!("nbd://{addr}/secure")),
    );
    let err = out.expect_failure();
    assert!(
        err.contains("server error message: TLS is required"),
        "plain NBD not refused for want of TLS: {err}"
    );
    // ferry copy, without TLS, is refused too.
    outcome(
        ferry()
            .arg("copy")
            .arg(format!("nbd://{addr}/secure"))
            .arg(dir.path().join("plain.raw")),
    )
    .expect_failure();

    // nbds:// with the CA works (hostname checked against the certificate's localhost).
    let dir_q = certs.dir().display().to_string();
    let uri = format!("nbds://localhost:{port}/secure?tls-certificates={dir_q}");
    assert_eq!(nbdinfo_size(&uri), 512 * KIB);
    let out = dir.path().join("out.raw");
    nbdcopy(&[&uri, &out.display().to_string()]).expect_success();
    assert!(std::fs::read(&out).unwrap() == data);

    // The Unix socket never uses TLS.
    assert_eq!(nbdinfo_size(&srv.unix_uri("secure")), 512 * KIB);

    // OPTIONS advertises nbds:// on the TCP address; with the CA it works as given.
    let ca = certs.ca_cert().display().to_string();
    let (code, body) = curl(&[
        "--cacert",
        &ca,
        "-X",
        "OPTIONS",
        &format!("https://localhost:{}/images/secure", srv.port()),
    ]);
    assert_eq!(code, "200");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let url = v["nbd_url"].as_str().unwrap();
    assert_eq!(url, format!("nbds://{addr}/secure"));
    assert_eq!(
        nbdinfo_size(&format!("{url}?tls-certificates={dir_q}")),
        512 * KIB
    );
}
