//! Test harness for the server: an in-process `ferry serve` on a free loopback port (its own
//! tokio runtime, so test bodies can block on curl and python), helpers to install tickets,
//! run curl, and speak raw HTTP/1.1 on a socket.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use server::{ControlListen, Server, ServerConfig, TicketSpec, TicketStore};

pub struct TestServer {
    pub server: Option<Server>,
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub tls: bool,
}

impl TestServer {
    /// Plain HTTP, local socket and control socket in a private directory.
    pub fn start() -> TestServer {
        Self::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = testutil::temp_dir();
        let mut cfg = ServerConfig {
            listen: "127.0.0.1:0".into(),
            local_socket: Some(dir.path().join("local.sock").display().to_string()),
            control: Some(ControlListen::Unix(
                dir.path().join("control.sock").display().to_string(),
            )),
            ..ServerConfig::default()
        };
        tweak(&mut cfg);
        let tls = cfg.tls.is_some();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = rt
            .block_on(Server::start(cfg, Arc::new(TicketStore::new())))
            .expect("server starts");
        let port = server.remote_addr().port();
        TestServer {
            server: Some(server),
            rt,
            dir,
            port,
            tls,
        }
    }

    pub fn store(&self) -> &Arc<TicketStore> {
        self.server.as_ref().unwrap().store()
    }

    pub fn url(&self, id: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://localhost:{}/images/{id}", self.port)
    }

    pub fn base(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn local_socket(&self) -> PathBuf {
        self.dir.path().join("local.sock")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Installs a ticket directly in the store.
    pub fn add_ticket(&self, doc: serde_json::Value) {
        let spec = TicketSpec::from_json(doc.to_string().as_bytes()).expect("valid ticket");
        self.store().add(spec);
    }

    /// A read-write file ticket for `path` with size `size`.
    pub fn file_ticket(&self, id: &str, path: &Path, size: u64, ops: &[&str]) {
        self.add_ticket(serde_json::json!({
            "uuid": id, "size": size, "ops": ops, "timeout": 300,
            "url": format!("file://{}", path.display()),
        }));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let server = self.server.take();
        self.rt.block_on(async move { drop(server) });
    }
}

/// What curl saw.
#[derive(Debug)]
pub struct CurlResult {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl CurlResult {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().rev().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Runs curl with `args` (the URL among them), capturing status, headers and body.
pub fn curl(args: &[&str]) -> CurlResult {
    let dir = testutil::temp_dir();
    let body = dir.path().join("body");
    let headers = dir.path().join("headers");
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "60", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("running curl");
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    CurlResult {
        status,
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// A raw HTTP/1.1 connection for what curl hides (keep-alive, close, pipelining).
pub struct Raw {
    pub sock: TcpStream,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw { sock }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    /// Reads one response (head and content-length body): (status, head, body).
    pub fn response(&mut self) -> (u16, String, Vec<u8>) {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            match self.sock.read(&mut byte) {
                Ok(1) => buf.push(byte[0]),
                other => panic!("connection ended in a response head: {other:?} after {buf:?}"),
            }
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let status = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.sock.read_exact(&mut body).unwrap();
        (status, head, body)
    }

    /// True if the server closed the connection (EOF within the read timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.sock.read(&mut b), Ok(0) | Err(_))
    }
}

/// A file of `size` bytes: pseudo-random data in the first `data` bytes, then a hole.
pub fn data_file(path: &Path, size: u64, data: usize, seed: u64) -> Vec<u8> {
    let bytes = testutil::pseudo_random(seed, data);
    std::fs::write(path, &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(size).unwrap();
    bytes
}
