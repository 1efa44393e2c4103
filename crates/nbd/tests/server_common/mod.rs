//! Shared pieces of the in-process server tests: a small in-memory [`Export`] with a hole map,
//! knobs to slow reads down and to refuse fast zeroing, counters of what the server asked of
//! it; a server on a private Unix socket (for ferry's own client); and a raw client that speaks
//! the protocol byte by byte over a socket pair, so tests can see every reply chunk and send
//! what no well-behaved client would.

#![allow(dead_code)]

mod raw;
pub use raw::*;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nbd::proto::consts::*;
use nbd::proto::{BlockSize, HeaderMode};
use nbd::server::{
    Export, ExportCaps, ExportError, ExportFut, Exports, Listener, ReadPiece, ServerConfig,
    SingleExport,
};
use nbd::uri::Transport;
use nbd::{Client, ConnectOptions, Connection, Error, Reply};
use tokio::net::UnixStream;

/// Every test body runs under this guard, so a hang fails the test.
pub const GUARD: Duration = Duration::from_secs(30);
/// Longest wait for one expected message from the server.
pub const STEP: Duration = Duration::from_secs(5);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Allocation granularity of [`MemExport`]'s hole map.
pub const GRAIN: u64 = 4096;

/// Runs `fut`, failing the test if it takes longer than [`GUARD`].
pub async fn guarded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("test body did not finish within {GUARD:?}"))
}

/// Deterministic bytes for a test image.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

/// Capabilities of a writable export that supports everything, with `min` as the minimum
/// block size and 2 MiB as the maximum payload (half the sample image).
pub fn full_caps(min: u32) -> ExportCaps {
    ExportCaps {
        read_only: false,
        flush: true,
        trim: true,
        zero: true,
        fast_zero: true,
        cache: true,
        multi_conn: true,
        extents: true,
        block_size: BlockSize {
            minimum: min,
            preferred: 4096,
            maximum: 2 * MIB as u32,
        },
    }
}

/// The image itself: bytes and which grains are allocated (an unallocated grain reads as
/// zeroes and is reported as a hole).
pub struct MemState {
    pub data: Vec<u8>,
    pub allocated: Vec<bool>,
}

/// An in-memory export. All methods may run concurrently; the counters say what the server
/// asked for.
pub struct MemExport {
    pub state: Mutex<MemState>,
    pub caps: Mutex<ExportCaps>,
    /// Reads starting at one of these offsets sleep this long first.
    pub slow_reads: Mutex<Vec<(u64, Duration)>>,
    /// Every read sleeps this long first.
    pub read_delay: Mutex<Duration>,
    /// Whether zeroing is fast right now: when false, a FAST_ZERO request fails with ENOTSUP.
    pub zero_is_fast: AtomicBool,
    /// When set, reads return slices of this buffer (no copies) instead of the image; used
    /// where a test issues far more reads than memory should hold.
    pub shared_read: Mutex<Option<Bytes>>,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub zeroes: AtomicU64,
    pub trims: AtomicU64,
    pub flushes: AtomicU64,
    pub caches: AtomicU64,
    pub extent_calls: AtomicU64,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

impl MemExport {
    /// An image of `size` bytes, all holes.
    pub fn new(size: u64, caps: ExportCaps) -> Self {
        let grains = size.div_ceil(GRAIN) as usize;
        MemExport {
            state: Mutex::new(MemState {
                data: vec![0; size as usize],
                allocated: vec![false; grains],
            }),
            caps: Mutex::new(caps),
            slow_reads: Mutex::new(Vec::new()),
            read_delay: Mutex::new(Duration::ZERO),
            zero_is_fast: AtomicBool::new(true),
            shared_read: Mutex::new(None),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            caches: AtomicU64::new(0),
            extent_calls: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    /// Writes `bytes` at `offset` directly (allocating), for setting up an image.
    pub fn fill(&self, offset: u64, bytes: &[u8]) {
        let mut st = self.state.lock().unwrap();
        let at = offset as usize;
        st.data[at..at + bytes.len()].copy_from_slice(bytes);
        mark(&mut st.allocated, offset, bytes.len() as u64, true, false);
    }

    /// A copy of the whole image.
    pub fn snapshot(&self) -> Vec<u8> {
        self.state.lock().unwrap().data.clone()
    }

    /// Allocation runs of the whole image as (offset, length, allocated).
    pub fn runs(&self) -> Vec<(u64, u64, bool)> {
        let st = self.state.lock().unwrap();
        let size = st.data.len() as u64;
        runs_of(&st.allocated, 0, size, size)
    }

    pub fn set_caps(&self, f: impl FnOnce(&mut ExportCaps)) {
        f(&mut self.caps.lock().unwrap());
    }

    fn size_now(&self) -> u64 {
        self.state.lock().unwrap().data.len() as u64
    }
}

/// Marks the grains of [offset, offset+len) allocated (`alloc`) or not. With `whole_only`,
/// only grains lying wholly inside the range change.
fn mark(allocated: &mut [bool], offset: u64, len: u64, alloc: bool, whole_only: bool) {
    if len == 0 {
        return;
    }
    let end = offset + len;
    let (first, last) = if whole_only {
        (offset.div_ceil(GRAIN), end / GRAIN)
    } else {
        (offset / GRAIN, end.div_ceil(GRAIN))
    };
    for g in first..last {
        if let Some(a) = allocated.get_mut(g as usize) {
            *a = alloc;
        }
    }
}

/// Runs of equal allocation from `offset`, covering at least [offset, end) and continuing to
/// the natural end of the last run (capped at `size`).
fn runs_of(allocated: &[bool], offset: u64, end: u64, size: u64) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    while pos < size {
        let g = (pos / GRAIN) as usize;
        let alloc = allocated[g];
        let next = ((pos / GRAIN) + 1) * GRAIN;
        let next = next.min(size);
        match out.last_mut() {
            Some(last) if last.2 == alloc => last.1 += next - pos,
            _ => {
                if pos >= end {
                    break;
                }
                out.push((pos, next - pos, alloc));
            }
        }
        pos = next;
    }
    out
}

struct InFlight<'a>(&'a MemExport);

impl<'a> InFlight<'a> {
    fn enter(e: &'a MemExport) -> Self {
        let now = e.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        e.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(e)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size_now()
    }

    fn caps(&self) -> ExportCaps {
        *self.caps.lock().unwrap()
    }

    fn description(&self) -> String {
        "in-memory test export".into()
    }

    fn read(&self, offset: u64, len: u64) -> ExportFut<'_, Vec<ReadPiece>> {
        Box::pin(async move {
            let _guard = InFlight::enter(self);
            self.reads.fetch_add(1, Ordering::SeqCst);
            let mut delay = *self.read_delay.lock().unwrap();
            if let Some((_, d)) = self
                .slow_reads
                .lock()
                .unwrap()
                .iter()
                .find(|(o, _)| *o == offset)
            {
                delay += *d;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some(shared) = self.shared_read.lock().unwrap().clone() {
                let n = (len as usize).min(shared.len());
                let mut pieces = vec![ReadPiece::Data(shared.slice(..n))];
                if (n as u64) < len {
                    pieces.push(ReadPiece::Hole(len - n as u64));
                }
                return Ok(pieces);
            }
            let st = self.state.lock().unwrap();
            let end = offset + len;
            let mut pieces = Vec::new();
            for (start, length, alloc) in runs_of(&st.allocated, offset, end, st.data.len() as u64)
            {
                let a = start.max(offset);
                let b = (start + length).min(end);
                if a >= b {
                    continue;
                }
                if alloc {
                    pieces.push(ReadPiece::Data(Bytes::copy_from_slice(
                        &st.data[a as usize..b as usize],
                    )));
                } else {
                    pieces.push(ReadPiece::Hole(b - a));
                }
            }
            Ok(pieces)
        })
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> ExportFut<'_, ()> {
        Box::pin(async move {
            let _guard = InFlight::enter(self);
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.fill(offset, &data);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool, fast: bool) -> ExportFut<'_, ()> {
        Box::pin(async move {
            if fast && !self.zero_is_fast.load(Ordering::SeqCst) {
                return Err(ExportError::new(ENOTSUP, "zeroing would not be fast"));
            }
            self.zeroes.fetch_add(1, Ordering::SeqCst);
            let mut st = self.state.lock().unwrap();
            st.data[offset as usize..(offset + len) as usize].fill(0);
            if punch {
                mark(&mut st.allocated, offset, len, false, true);
            } else {
                mark(&mut st.allocated, offset, len, true, false);
            }
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u64) -> ExportFut<'_, ()> {
        Box::pin(async move {
            self.trims.fetch_add(1, Ordering::SeqCst);
            let mut st = self.state.lock().unwrap();
            let (first, last) = (offset.div_ceil(GRAIN), (offset + len) / GRAIN);
            for g in first..last {
                let at = (g * GRAIN) as usize;
                st.data[at..at + GRAIN as usize].fill(0);
            }
            mark(&mut st.allocated, offset, len, false, true);
            Ok(())
        })
    }

    fn flush(&self) -> ExportFut<'_, ()> {
        Box::pin(async move {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn cache(&self, _offset: u64, _len: u64) -> ExportFut<'_, ()> {
        Box::pin(async move {
            self.caches.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn extents(&self, offset: u64, len: u64) -> ExportFut<'_, Vec<(u64, u32)>> {
        Box::pin(async move {
            self.extent_calls.fetch_add(1, Ordering::SeqCst);
            let st = self.state.lock().unwrap();
            let size = st.data.len() as u64;
            Ok(runs_of(&st.allocated, offset, offset + len.max(1), size)
                .into_iter()
                .map(|(start, length, alloc)| {
                    let skip = offset.saturating_sub(start);
                    let flags = if alloc { 0 } else { STATE_HOLE | STATE_ZERO };
                    (length - skip, flags)
                })
                .collect())
        })
    }
}

/// A test image: 1 MiB data, 1 MiB hole, 512 KiB data, 1.5 MiB hole (4 MiB in all).
pub fn sample_export(caps: ExportCaps) -> Arc<MemExport> {
    let e = MemExport::new(4 * MIB, caps);
    e.fill(0, &pattern(MIB as usize, 1));
    e.fill(2 * MIB, &pattern(512 * KIB as usize, 2));
    Arc::new(e)
}

/// A server accepting clients on a private Unix socket; stopped on drop.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub name: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// Serves `export` as `name` with `config`.
    pub fn start(export: Arc<dyn Export>, name: &str, config: ServerConfig) -> TestServer {
        let exports: Arc<dyn Exports> = Arc::new(SingleExport {
            name: name.to_owned(),
            export,
        });
        Self::start_exports(exports, name, config)
    }

    pub fn start_exports(exports: Arc<dyn Exports>, name: &str, config: ServerConfig) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferry-server-test-")
            .tempdir()
            .expect("temporary directory");
        let socket = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("binding the socket");
        let task = tokio::spawn(nbd::server::serve(
            Listener::Unix(listener),
            exports,
            Arc::new(config),
        ));
        TestServer {
            dir,
            socket,
            name: name.to_owned(),
            task,
        }
    }

    /// Client options for this server in `mode` (Simple, Structured = compact headers,
    /// Extended), selecting `base:allocation` where possible.
    pub fn opts(&self, mode: HeaderMode) -> ConnectOptions {
        let mut o = ConnectOptions::new(
            Transport::Unix {
                path: self.socket.clone(),
            },
            self.name.clone(),
        );
        o.settings.structured_replies = mode != HeaderMode::Simple;
        o.settings.extended_headers = mode == HeaderMode::Extended;
        if mode != HeaderMode::Simple {
            o.settings.meta_contexts = vec![CONTEXT_BASE_ALLOCATION.to_owned()];
        }
        o.settings.timeout = Duration::from_secs(10);
        o
    }

    /// A raw connection to this server's socket.
    pub async fn raw(&self) -> Raw {
        let s = UnixStream::connect(&self.socket).await.expect("connecting");
        Raw::new(s)
    }
}

pub const ALL_MODES: [HeaderMode; 3] = [
    HeaderMode::Simple,
    HeaderMode::Structured,
    HeaderMode::Extended,
];

pub async fn connect(server: &TestServer, mode: HeaderMode) -> Client {
    let client = Client::connect(&server.opts(mode), 1)
        .await
        .unwrap_or_else(|e| panic!("connecting in {mode:?} mode: {e}"));
    assert_eq!(client.info().mode, mode, "negotiated header mode");
    client
}

pub fn conn(client: &Client) -> Connection {
    client.connections()[0].clone()
}

/// The errno of a failed command; panics on success or any other error.
pub fn errno(result: nbd::Result<Reply>, what: &str) -> u32 {
    match result {
        Err(Error::Command { errno, .. }) => errno,
        Err(other) => panic!("{what}: expected a command error, got {other:?}"),
        Ok(reply) => panic!("{what}: expected an error, got {reply:?}"),
    }
}
