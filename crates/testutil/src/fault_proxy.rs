//! A TCP proxy between a client under test and a real server that breaks connections on
//! purpose: it cuts chosen connections after a chosen number of bytes from the client (in the
//! middle of a request body, say), or every connection, so that retry paths run against real
//! peers. Each connection is two pump threads; everything stops when the proxy is dropped or
//! its connections close, so a test can never leave it running.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which connections break, and where.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// `(n, bytes)`: the n-th connection (0-based, in accept order) is cut once the client
    /// has sent `bytes` bytes through it.
    pub cut_after: Vec<(usize, u64)>,
    /// Every connection is cut after this many bytes from the client (a peer that never lets
    /// a request through).
    pub cut_all_after: Option<u64>,
}

pub struct FaultProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    cuts: Arc<AtomicUsize>,
    accept: Option<std::thread::JoinHandle<()>>,
    /// Streams of open connections, shut down when the proxy is dropped.
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr, faults: Faults) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking accept");
        let addr = listener.local_addr().expect("proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let cuts = Arc::new(AtomicUsize::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accept = {
            let (stop, accepted, cuts, open) =
                (stop.clone(), accepted.clone(), cuts.clone(), open.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let client = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(_) => break,
                    };
                    let n = accepted.fetch_add(1, Ordering::Relaxed);
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let _ = client.set_nonblocking(false);
                    let limit = faults
                        .cut_after
                        .iter()
                        .find(|(i, _)| *i == n)
                        .map(|(_, b)| *b)
                        .or(faults.cut_all_after);
                    if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                        open.lock().unwrap().extend([c, s]);
                    }
                    pump(client, server, limit, cuts.clone());
                }
            })
        };
        FaultProxy {
            addr,
            stop,
            accepted,
            cuts,
            accept: Some(accept),
            open,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Copies both directions of one connection; the client's side is cut (both streams shut
/// down) once it has sent `limit` bytes.
fn pump(client: TcpStream, server: TcpStream, limit: Option<u64>, cuts: Arc<AtomicUsize>) {
    let (Ok(mut c_read), Ok(mut s_write)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (mut s_read, mut c_write) = (server, client);
    let upstream = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0u64;
        loop {
            let room = limit.map_or(buf.len() as u64, |l| (l - sent).min(buf.len() as u64));
            if room == 0 {
                cuts.fetch_add(1, Ordering::Relaxed);
                break;
            }
            match c_read.read(&mut buf[..room as usize]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                }
            }
        }
        let _ = c_read.shutdown(Shutdown::Both);
        let _ = s_write.shutdown(Shutdown::Both);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s_read, &mut c_write);
        let _ = c_write.shutdown(Shutdown::Both);
        let _ = s_read.shutdown(Shutdown::Both);
        let _ = upstream.join();
    });
}
