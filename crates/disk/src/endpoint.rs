//! The endpoint abstraction every copy runs through: capabilities reported once at open
//! ([`Caps`]), and asynchronous read, write, zero, extents and flush. Implementations live in
//! sibling modules (file, nbd, pipe, null); the copy engine only sees `Arc<dyn Endpoint>`.
//!
//! Errors always name the endpoint, the operation, and the byte range ([`DiskError`]).

use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;

use bytes::Bytes;

use crate::extents::Extent;
use crate::sink::{RequestSink, Sink, SinkOptions};
pub use bufpool::zero_bytes;
pub use errkind::ErrorKind;
pub use nbd::error::io_reason;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, DiskError>> + Send + 'a>>;

/// What an endpoint can do, as learned when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// Size in bytes; `None` for streams (pipes) whose end is found by reading.
    pub size: Option<u64>,
    pub read_only: bool,
    /// `extents` tells data from zeroes (NBD block status, SEEK_DATA).
    pub extents: bool,
    /// Zeroing without sending zero bytes (WRITE_ZEROES, fallocate, discarding).
    pub efficient_zero: bool,
    /// A zero request can be asked to fail fast instead of falling back to writing.
    pub fast_zero: bool,
    pub flush: bool,
    /// Writes are durable only once flushed (an upload sent with `flush=n`): a copy into it
    /// always ends with a flush, whatever the user asked.
    pub needs_flush: bool,
    /// Bytes must be read or written strictly in order (pipes, a web server that ignores
    /// Range); otherwise requests may be issued from several tasks at once and complete in
    /// any order.
    pub sequential: bool,
    /// Connections this endpoint holds when each is best driven by a pipeline of its own (HTTP:
    /// a pipeline waits on the network, not on a CPU); a copy runs no more pipelines than this.
    pub connections: Option<usize>,
    /// Offsets and lengths must be multiples of this.
    pub min_block: u64,
    /// Requests should be multiples of this.
    pub preferred_block: u64,
    /// Largest single read or write; larger ones are split by the endpoint.
    pub max_request: u64,
    /// Request size to use when the user does not choose one.
    pub default_request: u64,
    /// Requests worth keeping in flight on this endpoint per pipeline: deep for network
    /// endpoints (latency), shallow for local files, where more only costs memory.
    pub queue_depth: usize,
    /// Bytes worth holding per pipeline for this endpoint when the user does not choose
    /// (`--queue-size`); the smaller of the two endpoints' wins, `None` takes the copy's default.
    pub queue_bytes: Option<u64>,
    /// The whole endpoint is known to read as zeroes (a fresh or truncated file, `null:`).
    pub known_zero: bool,
    /// Changed ranges since a checkpoint are known ([`Endpoint::dirty`]): an NBD dirty bitmap,
    /// imageio's dirty context.
    pub dirty: bool,
}

impl Caps {
    /// Defaults for a random-access endpoint with no constraints.
    pub fn random_access(size: u64) -> Caps {
        Caps {
            size: Some(size),
            read_only: false,
            extents: false,
            efficient_zero: false,
            fast_zero: false,
            flush: false,
            needs_flush: false,
            sequential: false,
            connections: None,
            min_block: 1,
            preferred_block: 4096,
            max_request: 32 << 20,
            default_request: 256 << 10,
            queue_depth: 64,
            queue_bytes: None,
            known_zero: false,
            dirty: false,
        }
    }
}

/// The operation that failed, worded for messages ("read from X", "write to X").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Read,
    Write,
    Zero,
    Extents,
    Flush,
    Close,
}

impl Op {
    fn phrase(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::Read => "read from",
            Op::Write => "write to",
            Op::Zero => "zero",
            Op::Extents => "extents of",
            Op::Flush => "flush",
            Op::Close => "close",
        }
    }
}

/// A failed endpoint operation: which endpoint, what, where, why, and what kind of failure
/// it is. The message keeps one shape users and scripts rely on:
/// `{op} {endpoint} at offset {o} length {l} failed: {cause}`.
#[derive(Debug, Clone)]
pub struct DiskError {
    pub endpoint: String,
    pub op: Op,
    pub offset: Option<u64>,
    pub length: Option<u64>,
    /// Why, in words (the tail of the message).
    pub cause: String,
    /// What kind of failure: what callers decide from (retry, status code, exit code).
    pub kind: ErrorKind,
    /// The OS or NBD error number, when there is one.
    pub errno: Option<i32>,
    /// The HTTP status a server answered with, when there is one.
    pub status: Option<u16>,
    /// The error this one wraps, for `source()`.
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}{} failed: {}",
            self.op.phrase(),
            self.endpoint,
            range_text(self.offset, self.length),
            self.cause
        )
    }
}

impl std::error::Error for DiskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

fn range_text(offset: Option<u64>, length: Option<u64>) -> String {
    match (offset, length) {
        (Some(o), Some(l)) => format!(" at offset {o} length {l}"),
        (Some(o), None) => format!(" at offset {o}"),
        _ => String::new(),
    }
}

impl DiskError {
    pub fn new(endpoint: &str, op: Op, kind: ErrorKind, cause: impl Into<String>) -> Self {
        DiskError {
            endpoint: endpoint.to_string(),
            op,
            offset: None,
            length: None,
            cause: cause.into(),
            kind,
            errno: None,
            status: None,
            source: None,
        }
    }

    pub fn at(mut self, offset: u64, length: u64) -> Self {
        self.offset = Some(offset);
        self.length = Some(length);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// May the operation be sent again? Decided from the kind alone ([`ErrorKind::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    pub fn from_io(endpoint: &str, op: Op, err: &std::io::Error) -> Self {
        let mut e = DiskError::new(endpoint, op, ErrorKind::from_io(err), io_reason(err));
        e.errno = err.raw_os_error();
        e.source = Some(Arc::new(std::io::Error::new(err.kind(), err.to_string())));
        e
    }

    pub fn from_nbd(endpoint: &str, op: Op, err: &nbd::Error) -> Self {
        let mut e = DiskError::new(endpoint, op, err.kind(), err.reason());
        e.errno = err.errno().map(|n| n as i32);
        e.source = Some(Arc::new(err.clone()));
        e
    }

    /// The same failure reported under another endpoint name (a wrapper that names itself).
    pub fn renamed(mut self, endpoint: &str) -> Self {
        self.endpoint = endpoint.to_string();
        self
    }
}

/// A pipeline's streaming reader, from [`Endpoint::stream_reader`]: each run of the source is
/// read as one long request, in the order begun. `read` queues a request for the next `len`
/// bytes of the current run at once, in call order.
pub trait StreamReader: Send + Sync {
    fn begin(&mut self, offset: u64, len: u64);
    fn read(&mut self, len: u64) -> BoxFut<'static, Bytes>;
}

/// Lets a trait default method hand `self` on as `&dyn Endpoint` (implemented for every
/// endpoint; nothing to do by hand).
pub trait AsEndpoint {
    fn as_endpoint(&self) -> &dyn Endpoint;
}

impl<T: Endpoint + Sized> AsEndpoint for T {
    fn as_endpoint(&self) -> &dyn Endpoint {
        self
    }
}

/// One side of a copy. All methods may be called concurrently unless `caps().sequential`.
pub trait Endpoint: Send + Sync + AsEndpoint {
    /// How the user named it (URI or path), for messages.
    fn name(&self) -> &str;
    fn caps(&self) -> &Caps;
    /// What tells this endpoint from another of the same name and size (a file's device and
    /// inode): a resume journal is refused when it changed. Empty when name and size suffice.
    fn identity(&self) -> String {
        String::new()
    }
    /// Reads `len` bytes at `offset`. Streams return fewer bytes only at their end.
    fn read(&self, offset: u64, len: u64) -> BoxFut<'_, Bytes>;
    fn write(&self, offset: u64, data: Bytes) -> BoxFut<'_, ()>;
    /// Makes [offset, offset+len) read as zeroes; `allocate` keeps it allocated.
    fn zero(&self, offset: u64, len: u64, allocate: bool) -> BoxFut<'_, ()>;
    /// Tries to make [offset, offset+len) read as zeroes quickly. Ok(false) when the endpoint
    /// cannot do it fast, in which case nothing changed.
    fn fast_zero(&self, _offset: u64, _len: u64) -> BoxFut<'_, bool> {
        Box::pin(async { Ok(false) })
    }
    /// Extents covering [offset, offset+len) exactly. Without extent support: one data extent.
    fn extents(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<Extent>> {
        Box::pin(async move { Ok(vec![Extent::data(offset, len)]) })
    }
    fn flush(&self) -> BoxFut<'_, ()>;
    /// Which parts of [offset, offset+len) changed since a checkpoint, covering it exactly in
    /// order: each extent with `true` when dirty. Needs `caps().dirty`.
    fn dirty(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<(Extent, bool)>> {
        Box::pin(async move {
            Err(DiskError::new(
                self.name(),
                Op::Extents,
                ErrorKind::Unsupported,
                "no dirty bitmap: incremental copies need one",
            )
            .at(offset, len))
        })
    }
    /// Sets the final size of a destination whose size was unknown when it was opened (a
    /// stream was copied into it). Endpoints of fixed size ignore it.
    fn set_size(&self, _size: u64) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// The writer of one copy pipeline: turns the engine's ordered segments into requests.
    /// By default each data segment becomes writes and each zero segment a zero request.
    fn sink(&self, opts: &SinkOptions) -> Box<dyn Sink + '_> {
        Box::new(RequestSink::new(self.as_endpoint(), opts))
    }
    /// A streaming reader for one pipeline, for sources that read a data run best as one long
    /// request (an HTTP ranged GET); `None` reads piece by piece with [`Endpoint::read`].
    fn stream_reader(&self) -> Option<Box<dyn StreamReader>> {
        None
    }
    /// The checksum the endpoint's own server computes (imageio's `/checksum`), as hex, when
    /// it offers one for this algorithm and block size: a verification then reads nothing back.
    fn server_checksum(&self, _algorithm: &str, _block_size: u64) -> BoxFut<'_, Option<String>> {
        Box::pin(async { Ok(None) })
    }
    /// Releases the endpoint (soft disconnect, child process stop). Idempotent.
    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Releases the endpoint after a failure or interruption without waiting for work still in
    /// flight (whose results nobody wants). Defaults to `close`.
    fn abort(&self) -> BoxFut<'_, ()> {
        self.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_endpoint_operation_and_range() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = DiskError::from_io("nbd+unix:///?socket=/run/x.sock", Op::Write, &io)
            .at(1048576, 262144);
        assert_eq!(
            e.to_string(),
            "write to nbd+unix:///?socket=/run/x.sock at offset 1048576 length 262144 failed: \
             No space left on device (ENOSPC)"
        );
        assert_eq!(e.errno, Some(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert!(!e.is_retryable());
        assert!(std::error::Error::source(&e).is_some());
    }
}
