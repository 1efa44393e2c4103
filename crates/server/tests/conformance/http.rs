//! A deliberately small HTTP/1.1 client over a TCP or Unix socket: it writes the request bytes
//! exactly as the corpus spells them (so malformed, missing and duplicated headers reach the
//! server untouched) and reads one response, skipping `100 Continue`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// How long one response may take; the corpus holds only small requests.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a service listens.
#[derive(Debug, Clone)]
pub enum Addr {
    Tcp(u16),
    Unix(PathBuf),
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Sock::Tcp(s) => s,
            Sock::Unix(s) => s,
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Write),
            Sock::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// One response as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct Response {
    pub status: u16,
    /// Names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The server said it closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A connection that reconnects on demand after the server closed it.
pub struct Conn {
    addr: Addr,
    sock: Option<Sock>,
}

impl Conn {
    pub fn new(addr: Addr) -> Conn {
        Conn { addr, sock: None }
    }

    fn connect(&mut self) -> &mut Sock {
        if self.sock.is_none() {
            let sock = match &self.addr {
                Addr::Tcp(port) => {
                    let s = TcpStream::connect(("127.0.0.1", *port)).expect("connecting");
                    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
                    s.set_nodelay(true).unwrap();
                    Sock::Tcp(s)
                }
                Addr::Unix(path) => {
                    let s = UnixStream::connect(path).expect("connecting");
                    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
                    Sock::Unix(s)
                }
            };
            self.sock = Some(sock);
        }
        self.sock.as_mut().unwrap()
    }

    /// Sends `bytes` and reads the answer. `half_close` shuts the write side after sending
    /// (a client that sends a short body and stops). A connection the server ends without
    /// any answer reads as status 0.
    pub fn exchange(&mut self, bytes: &[u8], half_close: bool) -> Response {
        let sock = self.connect();
        if sock.stream().write_all(bytes).is_err() {
            self.sock = None;
            return Response::default();
        }
        if half_close {
            sock.shutdown_write();
        }
        let resp = read_response(sock.stream());
        if half_close || resp.status == 0 || resp.closes() {
            self.sock = None;
        }
        resp
    }
}

fn read_response(s: &mut dyn ReadWrite) -> Response {
    loop {
        let Some(head) = read_head(s) else {
            return Response::default();
        };
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        if status == 100 {
            continue;
        }
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"));
        if chunked {
            resp.body = read_chunked(s);
        } else if let Some(n) = resp.header("content-length").and_then(|v| v.parse().ok()) {
            let mut body = vec![0u8; n];
            let mut got = 0;
            while got < n {
                match s.read(&mut body[got..]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k,
                }
            }
            body.truncate(got);
            resp.body = body;
        }
        return resp;
    }
}

fn read_head(s: &mut dyn ReadWrite) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&buf[..buf.len() - 4]).into_owned())
}

fn read_line(s: &mut dyn ReadWrite) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).trim().to_owned()
}

fn read_chunked(s: &mut dyn ReadWrite) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = read_line(s);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or(""), 16).unwrap_or(0);
        if size == 0 {
            read_line(s);
            return out;
        }
        let start = out.len();
        out.resize(start + size, 0);
        if s.read_exact(&mut out[start..]).is_err() {
            return out;
        }
        read_line(s);
    }
}
