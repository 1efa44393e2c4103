//! A small HTTP/1.1 server for the cases no real server produces on demand: an old imageio
//! daemon (OPTIONS answered with 405, no extents, no zero, no flush), plain web servers with
//! and without Range support, a server that cuts a connection in the middle of a request, and
//! one that refuses writes with an error message.
//!
//! It serves one in-memory image at any path, keeps a log of the requests it saw (with the
//! offset each one addressed and whether its body was all zeroes), and stops its accept loop
//! when dropped. Connections are keep-alive, one thread each, with a read timeout so a stuck
//! client cannot keep a thread forever.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the server behaves.
#[derive(Clone, Default)]
pub struct Behaviour {
    /// Answer OPTIONS with 405 (an old imageio daemon); otherwise with 200 and a text body
    /// that is not an imageio document (a plain web server).
    pub options_405: bool,
    /// Honour `Range` on GET (206); otherwise always answer 200 with the whole image.
    pub ranges: bool,
    /// Accept PUTs (`Content-Range: bytes A-B/*`, and an empty `?flush=y` PUT as a flush).
    pub writable: bool,
    /// Answer every PUT with this status and message (after reading its body).
    pub put_error: Option<(u16, String)>,
}

/// What a request asked for, as the log keeps it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// First byte addressed: from `Range` (GET) or `Content-Range` (PUT).
    pub offset: Option<u64>,
    /// Bytes addressed (range length, or the PUT body's length).
    pub length: u64,
    /// The body held only zero bytes (and at least one byte).
    pub zero_body: bool,
    /// The status answered (0 when the connection was cut instead).
    pub status: u16,
}

type Matcher = Box<dyn FnMut(&Seen) -> bool + Send>;

/// Where a cut connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Right after the request's head: no answer, the request body left unread.
    BeforeAnswer,
    /// In the middle of the answer: a GET's head and half its body, then the end.
    MidBody,
}

struct State {
    image: Vec<u8>,
    log: Vec<Seen>,
    /// Cut the connection at the first request this returns true for; used once.
    cut: Option<(Cut, Matcher)>,
}

pub struct FakeServer {
    port: u16,
    behaviour: Arc<Behaviour>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Serves `image` on a free loopback port.
    pub fn start(image: Vec<u8>, behaviour: Behaviour) -> FakeServer {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("binding a loopback port");
        let port = listener.local_addr().expect("local address").port();
        // Non-blocking accepts, so the loop notices `stop` when the test ends.
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let behaviour = Arc::new(behaviour);
        let state = Arc::new(Mutex::new(State {
            image,
            log: Vec::new(),
            cut: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (behaviour, state, stop) = (behaviour.clone(), state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((sock, _)) => {
                            let (behaviour, state) = (behaviour.clone(), state.clone());
                            std::thread::spawn(move || serve(sock, &behaviour, &state));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("accept failed: {e}"),
                    }
                }
            })
        };
        FakeServer {
            port,
            behaviour,
            state,
            stop,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Cuts the connection of the first request `matcher` accepts (once), where `how` says.
    pub fn cut_when(&self, how: Cut, matcher: impl FnMut(&Seen) -> bool + Send + 'static) {
        self.lock().cut = Some((how, Box::new(matcher)));
    }

    /// The image as written so far.
    pub fn image(&self) -> Vec<u8> {
        self.lock().image.clone()
    }

    /// Every request seen so far, in arrival order.
    pub fn log(&self) -> Vec<Seen> {
        self.lock().log.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// One connection: requests until the client closes it (or the server cuts it).
fn serve(sock: TcpStream, behaviour: &Behaviour, state: &Mutex<State>) {
    sock.set_nonblocking(false).expect("a blocking socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout");
    let mut reader = BufReader::new(sock.try_clone().expect("cloning the socket"));
    let mut out = sock;
    loop {
        let Some((method, target, headers)) = read_head(&mut reader) else {
            return;
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let body_len: u64 = header("content-length").map_or(0, |v| v.parse().expect("length"));
        let (offset, length) = match method.as_str() {
            "GET" => match header("range").and_then(parse_range) {
                Some((first, last)) => (Some(first), last + 1 - first),
                None => (None, 0),
            },
            "PUT" => (
                header("content-range").and_then(parse_content_range),
                body_len,
            ),
            _ => (None, body_len),
        };
        let mut seen = Seen {
            method: method.clone(),
            target: target.clone(),
            offset,
            length,
            zero_body: false,
            status: 0,
        };
        let cut = {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            let hit = st.cut.as_mut().is_some_and(|(_, m)| m(&seen));
            if hit {
                st.log.push(seen.clone());
                st.cut.take().map(|(how, _)| how)
            } else {
                None
            }
        };
        if cut == Some(Cut::BeforeAnswer) {
            // Closing with the request body unread makes the kernel reset the connection:
            // the client sees its request break with no answer.
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
        let mut body = vec![0u8; body_len as usize];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        seen.zero_body = !body.is_empty() && body.iter().all(|b| *b == 0);
        let (status, extra, payload) = answer(behaviour, state, &method, &headers, &seen, body);
        if cut == Some(Cut::MidBody) {
            // The whole answer is announced, half of it arrives, then the connection ends.
            let head = format!(
                "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\n{extra}\r\n",
                reason(status),
                payload.len()
            );
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(&payload[..payload.len() / 2]);
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
        seen.status = status;
        state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log
            .push(seen);
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\n{extra}\r\n",
            reason(status),
            payload.len()
        );
        // A client that stops reading (a whole-image GET it abandoned) ends the connection.
        if out.write_all(head.as_bytes()).is_err() || out.write_all(&payload).is_err() {
            return;
        }
    }
}

/// The status, extra header lines and body for one request.
fn answer(
    behaviour: &Behaviour,
    state: &Mutex<State>,
    method: &str,
    headers: &[(String, String)],
    seen: &Seen,
    body: Vec<u8>,
) -> (u16, String, Vec<u8>) {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let size = st.image.len() as u64;
    match method {
        "OPTIONS" if behaviour.options_405 => (405, String::new(), b"not allowed".to_vec()),
        "OPTIONS" => (
            200,
            "Allow: GET, HEAD, OPTIONS\r\n".into(),
            b"a plain web server".to_vec(),
        ),
        "GET" => {
            let range = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("range"))
                .and_then(|(_, v)| parse_range(v));
            match range {
                Some((first, last)) if behaviour.ranges => {
                    if first >= size {
                        return (
                            416,
                            format!("Content-Range: bytes */{size}\r\n"),
                            Vec::new(),
                        );
                    }
                    let last = last.min(size - 1);
                    (
                        206,
                        format!("Content-Range: bytes {first}-{last}/{size}\r\n"),
                        st.image[first as usize..=last as usize].to_vec(),
                    )
                }
                _ => (200, String::new(), st.image.clone()),
            }
        }
        "PUT" if behaviour.writable => {
            if let Some((status, message)) = &behaviour.put_error {
                return (*status, String::new(), message.clone().into_bytes());
            }
            match seen.offset {
                Some(offset) if offset + body.len() as u64 <= size => {
                    let at = offset as usize;
                    st.image[at..at + body.len()].copy_from_slice(&body);
                    (200, String::new(), Vec::new())
                }
                Some(_) => (416, String::new(), b"write past the end".to_vec()),
                // An empty PUT with flush=y is how old clients flush.
                None if body.is_empty() => (200, String::new(), Vec::new()),
                None => (400, String::new(), b"a PUT needs Content-Range".to_vec()),
            }
        }
        _ => (405, String::new(), b"method not allowed".to_vec()),
    }
}

/// A request's method, target and headers.
type Head = (String, String, Vec<(String, String)>);

/// Reads a request line and headers; None at a clean end of the connection.
fn read_head(reader: &mut impl BufRead) -> Option<Head> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut words = line.split_whitespace();
    let method = words.next()?.to_string();
    let target = words.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Some((method, target, headers))
}

/// `bytes=FIRST-LAST` (the only form ferry sends).
fn parse_range(v: &str) -> Option<(u64, u64)> {
    let (first, last) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// The first byte of `bytes FIRST-LAST/TOTAL`.
fn parse_content_range(v: &str) -> Option<u64> {
    let range = v.trim().strip_prefix("bytes ")?.split_once('/')?.0;
    range.split_once('-')?.0.parse().ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        _ => "Whatever",
    }
}
