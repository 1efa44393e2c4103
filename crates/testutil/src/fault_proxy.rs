//! A proxy between a client under test and a real server that misbehaves on purpose, so that
//! retry and deadline paths run against real peers: it cuts a connection after a chosen
//! number of bytes in either direction (a reset mid-body, or a truncated response), stalls it
//! (the connection stays open and goes silent), or delays everything it forwards. It listens
//! on TCP or a Unix socket and forwards to either. Each connection is two pump threads;
//! everything stops when the proxy is dropped or its connections close, so a test can never
//! leave it running.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which way bytes flow through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the server (requests, upload bodies).
    ToServer,
    /// From the server to the client (replies, download bodies).
    ToClient,
}

/// What happens to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Both sides are shut down once `after` bytes went `dir` (a reset; towards the client,
    /// a truncated response).
    Cut { dir: Direction, after: u64 },
    /// Nothing more goes `dir` once `after` bytes went that way; the connection stays open
    /// and silent until the client gives up on it.
    Stall { dir: Direction, after: u64 },
    /// Every chunk is held this long before it is forwarded, both ways.
    Delay(Duration),
}

/// Which connections misbehave, and how.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// `(n, fault)`: the n-th connection (0-based, in accept order) gets `fault`.
    pub connection: Vec<(usize, Fault)>,
    /// Every other connection gets this.
    pub every: Option<Fault>,
}

impl Faults {
    /// The first `count` connections are cut after `after` bytes from the client.
    pub fn cut_first(count: usize, after: u64) -> Faults {
        let cut = Fault::Cut {
            dir: Direction::ToServer,
            after,
        };
        Faults {
            connection: (0..count).map(|n| (n, cut)).collect(),
            every: None,
        }
    }

    /// Every connection gets `fault`.
    pub fn every(fault: Fault) -> Faults {
        Faults {
            connection: Vec::new(),
            every: Some(fault),
        }
    }

    /// The first `count` connections break at pseudo-random points (from `seed`), in random
    /// directions: after at most `to_server` bytes from the client, or `to_client` bytes from
    /// the server (size them to what each direction carries). Cuts and stalls are mixed when
    /// `stall` is set.
    pub fn random(seed: u64, count: usize, to_server: u64, to_client: u64, stall: bool) -> Faults {
        let mut state = seed | 1;
        let mut next = move || {
            // xorshift64: reproducible from the seed, good enough to scatter break points.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let connection = (0..count)
            .map(|n| {
                let (dir, max) = if next() % 2 == 0 {
                    (Direction::ToServer, to_server)
                } else {
                    (Direction::ToClient, to_client)
                };
                let after = 1 + next() % max.max(1);
                let fault = if stall && next() % 3 == 0 {
                    Fault::Stall { dir, after }
                } else {
                    Fault::Cut { dir, after }
                };
                (n, fault)
            })
            .collect();
        Faults {
            connection,
            every: None,
        }
    }

    fn for_connection(&self, n: usize) -> Option<Fault> {
        self.connection
            .iter()
            .find(|(i, _)| *i == n)
            .map(|(_, f)| *f)
            .or(self.every)
    }
}

/// Where the proxy forwards to, or listens on.
#[derive(Debug, Clone)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// One connected stream of either family.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn connect(to: &Address) -> std::io::Result<Conn> {
        Ok(match to {
            Address::Tcp(addr) => Conn::Tcp(TcpStream::connect(addr)?),
            Address::Unix(path) => Conn::Unix(UnixStream::connect(path)?),
        })
    }

    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Conn> {
        let conn = match self {
            Listener::Tcp(l) => Conn::Tcp(l.accept()?.0),
            Listener::Unix(l) => Conn::Unix(l.accept()?.0),
        };
        match &conn {
            Conn::Tcp(s) => s.set_nonblocking(false)?,
            Conn::Unix(s) => s.set_nonblocking(false)?,
        }
        Ok(conn)
    }
}

/// Counters shared by the accept thread, the pumps and the test.
#[derive(Default)]
struct Counters {
    stop: AtomicBool,
    accepted: AtomicUsize,
    cuts: AtomicUsize,
    stalls: AtomicUsize,
}

pub struct FaultProxy {
    listen: Address,
    target: Arc<Mutex<Address>>,
    counters: Arc<Counters>,
    accept: Option<std::thread::JoinHandle<()>>,
    /// Streams of open connections, shut down when the proxy is dropped.
    open: Arc<Mutex<Vec<Conn>>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr, faults: Faults) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        FaultProxy::run(
            Listener::Tcp(listener),
            Address::Tcp(addr),
            Address::Tcp(target),
            faults,
        )
    }

    /// Listens on the Unix socket `path` and forwards every connection to `target`.
    pub fn start_unix(path: &Path, target: Address, faults: Faults) -> FaultProxy {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the proxy socket");
        FaultProxy::run(
            Listener::Unix(listener),
            Address::Unix(path.to_path_buf()),
            target,
            faults,
        )
    }

    fn run(listener: Listener, listen: Address, target: Address, faults: Faults) -> FaultProxy {
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
        .expect("nonblocking accept");
        let counters = Arc::new(Counters::default());
        let open: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let target = Arc::new(Mutex::new(target));
        let accept = {
            let (counters, open, target) = (counters.clone(), open.clone(), target.clone());
            std::thread::spawn(move || {
                while !counters.stop.load(Ordering::Relaxed) {
                    let client = match listener.accept() {
                        Ok(s) => s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(_) => break,
                    };
                    let n = counters.accepted.fetch_add(1, Ordering::Relaxed);
                    let to = target.lock().unwrap().clone();
                    let Ok(server) = Conn::connect(&to) else {
                        continue;
                    };
                    if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                        open.lock().unwrap().extend([c, s]);
                    }
                    pump(client, server, faults.for_connection(n), counters.clone());
                }
            })
        };
        FaultProxy {
            listen,
            target,
            counters,
            accept: Some(accept),
            open,
        }
    }

    /// The TCP port the proxy listens on (panics for a Unix-socket proxy).
    pub fn port(&self) -> u16 {
        match &self.listen {
            Address::Tcp(addr) => addr.port(),
            Address::Unix(path) => panic!("the proxy listens on {}", path.display()),
        }
    }

    /// Sends connections accepted from now on to `target` (a server that moved, as behind a
    /// load balancer).
    pub fn set_target(&self, target: Address) {
        *self.target.lock().unwrap() = target;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.counters.cuts.load(Ordering::Relaxed)
    }

    /// Connections stalled so far.
    pub fn stalls(&self) -> usize {
        self.counters.stalls.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.counters.stop.store(true, Ordering::Relaxed);
        for s in self.open.lock().unwrap().drain(..) {
            s.shutdown();
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Address::Unix(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Copies both directions of one connection, misbehaving as `fault` says.
fn pump(client: Conn, server: Conn, fault: Option<Fault>, counters: Arc<Counters>) {
    let (Ok(c_read), Ok(s_write)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let upstream = {
        let counters = counters.clone();
        std::thread::spawn(move || forward(c_read, s_write, Direction::ToServer, fault, &counters))
    };
    std::thread::spawn(move || {
        forward(server, client, Direction::ToClient, fault, &counters);
        let _ = upstream.join();
    });
}

/// Forwards `from` to `to` until either closes, then shuts both down (which ends the other
/// direction too). A stall forwards nothing more until the connection ends.
fn forward(
    mut from: Conn,
    mut to: Conn,
    dir: Direction,
    fault: Option<Fault>,
    counters: &Counters,
) {
    let (limit, stall, delay) = match fault {
        Some(Fault::Cut { dir: d, after }) if d == dir => (Some(after), false, None),
        Some(Fault::Stall { dir: d, after }) if d == dir => (Some(after), true, None),
        Some(Fault::Delay(t)) => (None, false, Some(t)),
        _ => (None, false, None),
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    loop {
        let room = limit.map_or(buf.len() as u64, |l| (l - sent).min(buf.len() as u64));
        if room == 0 {
            if stall {
                // Swallow what comes, so the sender's close is noticed and ends the connection.
                counters.stalls.fetch_add(1, Ordering::Relaxed);
                while let Ok(1..) = from.read(&mut buf) {}
            } else {
                counters.cuts.fetch_add(1, Ordering::Relaxed);
            }
            break;
        }
        match from.read(&mut buf[..room as usize]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(t) = delay {
                    std::thread::sleep(t);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n as u64;
            }
        }
    }
    from.shutdown();
    to.shutdown();
}
