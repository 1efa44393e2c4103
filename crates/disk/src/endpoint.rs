//! The endpoint abstraction every copy runs through: capabilities reported once at open
//! ([`Caps`]), and asynchronous read, write, zero, extents and flush. Implementations live in
//! sibling modules (file, nbd, pipe, null); the copy engine only sees `Arc<dyn Endpoint>`.
//!
//! Errors always name the endpoint, the operation, and the byte range ([`DiskError`]).

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::extents::Extent;
pub use bufpool::zero_bytes;
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
    /// Requests may be issued from several tasks at once and complete in any order.
    pub concurrent: bool,
    /// Bytes must be read or written strictly in order (pipes).
    pub sequential: bool,
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
    /// The whole endpoint is known to read as zeroes (a fresh or truncated file, `null:`).
    pub known_zero: bool,
    /// Writes are best sent as one long request per data run ([`Endpoint::stream_writer`]):
    /// an HTTP server takes a run as one PUT instead of a request per piece.
    pub stream_writes: bool,
    /// Data runs are best read as one long request ([`Endpoint::stream_reader`]).
    pub stream_reads: bool,
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
            concurrent: true,
            sequential: false,
            min_block: 1,
            preferred_block: 4096,
            max_request: 32 << 20,
            default_request: 256 << 10,
            queue_depth: 64,
            known_zero: false,
            stream_writes: false,
            stream_reads: false,
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

/// A failed endpoint operation: which endpoint, what, where, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} {endpoint}{} failed: {cause}", op.phrase(), range_text(*offset, *length))]
pub struct DiskError {
    pub endpoint: String,
    pub op: Op,
    pub offset: Option<u64>,
    pub length: Option<u64>,
    pub cause: String,
    /// The OS or NBD error number, when there is one.
    pub errno: Option<i32>,
}

fn range_text(offset: Option<u64>, length: Option<u64>) -> String {
    match (offset, length) {
        (Some(o), Some(l)) => format!(" at offset {o} length {l}"),
        (Some(o), None) => format!(" at offset {o}"),
        _ => String::new(),
    }
}

impl DiskError {
    pub fn new(endpoint: &str, op: Op, cause: impl Into<String>) -> Self {
        DiskError {
            endpoint: endpoint.to_string(),
            op,
            offset: None,
            length: None,
            cause: cause.into(),
            errno: None,
        }
    }

    pub fn at(mut self, offset: u64, length: u64) -> Self {
        self.offset = Some(offset);
        self.length = Some(length);
        self
    }

    pub fn from_io(endpoint: &str, op: Op, err: &std::io::Error) -> Self {
        let mut e = DiskError::new(endpoint, op, io_reason(err));
        e.errno = err.raw_os_error();
        e
    }

    pub fn from_nbd(endpoint: &str, op: Op, err: &nbd::Error) -> Self {
        let mut e = DiskError::new(endpoint, op, err.reason());
        e.errno = err.errno().map(|n| n as i32);
        e
    }
}

/// A pipeline's streaming writer, from [`Endpoint::stream_writer`]: each run of the
/// destination is written as one long request, runs one after another in the order begun.
/// `begin` opens a run; `push` queues its next piece at once (so call order is stream order)
/// and resolves when the piece has been sent, or, for a run's last piece, when the run is done.
/// Pieces must cover each run exactly.
pub trait StreamWriter: Send + Sync {
    fn begin(&mut self, offset: u64, len: u64);
    fn push(&mut self, data: Bytes) -> BoxFut<'static, ()>;
}

/// A pipeline's streaming reader, from [`Endpoint::stream_reader`]: each run of the source is
/// read as one long request, in the order begun. `read` queues a request for the next `len`
/// bytes of the current run at once, in call order.
pub trait StreamReader: Send + Sync {
    fn begin(&mut self, offset: u64, len: u64);
    fn read(&mut self, len: u64) -> BoxFut<'static, Bytes>;
}

/// One side of a copy. All methods may be called concurrently when `caps().concurrent`.
pub trait Endpoint: Send + Sync {
    /// How the user named it (URI or path), for messages.
    fn name(&self) -> &str;
    fn caps(&self) -> &Caps;
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
    /// A streaming writer for one pipeline when `caps().stream_writes`. Runs of one writer
    /// never wait on each other's connection, so pipelines cannot starve one another.
    fn stream_writer(&self) -> Option<Box<dyn StreamWriter>> {
        None
    }
    /// A streaming reader for one pipeline when `caps().stream_reads`.
    fn stream_reader(&self) -> Option<Box<dyn StreamReader>> {
        None
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
    }
}
