//! The copy engine. It plans work from the source's extents, reads data in the source's request
//! size with many requests in flight, keeps completed reads in FIFO order, detects zero blocks
//! in what it read, and writes data, zeroes holes (or skips them where the destination already
//! reads as zero) in the destination's request size. Memory is bounded by per-worker queue
//! limits whatever the image size. The first error stops the copy; work in flight is drained
//! and the error names the endpoint, operation, offset and length.

pub mod data_ranges;
mod engine;
pub mod journal;
pub mod plan;
pub mod progress;
pub mod settings;
pub mod verify;
/// Zero detection lives with the endpoints (the server uses it too); re-exported here.
pub use disk::sparse;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use disk::{DiskError, Endpoint, ErrorKind};

pub use engine::copy;
pub use progress::Progress;
pub use settings::{Report, Settings, run};

/// nbdcopy's work-range size: the unit workers take from the shared cursor.
pub const DEFAULT_WORK_SIZE: u64 = 128 << 20;

/// Resolved settings of one copy, from [`CopyOptions::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// Largest read from the source.
    pub src_request: u64,
    /// Largest write to the destination.
    pub dst_request: u64,
    /// Requests in flight per worker (reads, writes and zeroes together).
    pub requests: usize,
    /// Concurrent workers, each with its own pipeline.
    pub workers: usize,
    /// Bytes of data in flight per worker.
    pub queue_bytes: u64,
    /// Zero-detection block size for data read; 0 turns detection off.
    pub sparse: u64,
    /// Keep every zero range allocated on the destination.
    pub allocated: bool,
    /// The user asserts the destination reads as zeroes.
    pub destination_is_zero: bool,
    /// Flush the destination at the end.
    pub flush: bool,
    /// Use the source's extents (off: read everything).
    pub extents: bool,
    pub work_size: u64,
    /// Copy only what the source's dirty extents (a dirty bitmap) mark as changed, into a
    /// destination that already holds the previous copy.
    pub incremental: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            src_request: 256 << 10,
            dst_request: 256 << 10,
            requests: 64,
            workers: 4,
            queue_bytes: 16 << 20,
            sparse: 4096,
            allocated: false,
            destination_is_zero: false,
            flush: false,
            extents: true,
            work_size: DEFAULT_WORK_SIZE,
            incremental: false,
        }
    }
}

/// How the engine learned that destination ranges need no zeroing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationZero {
    /// The user said so (`--destination-is-zero`).
    Asserted,
    /// The endpoint knows it (a freshly truncated file, `null:`).
    Known,
    /// A fast zero of the whole range succeeded (NBD FAST_ZERO).
    FastZeroed,
    /// Checked per work range from the destination's own extents.
    Extents,
    /// Nothing known: every zero range is zeroed.
    Unknown,
}

/// What a finished copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Bytes copied in all (the source size).
    pub size: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Bytes zeroed on the destination with zero requests.
    pub bytes_zeroed: u64,
    /// Zero bytes that needed no work because the destination already read as zero.
    pub bytes_skipped: u64,
    /// Source reads that returned data.
    pub read_requests: u64,
    /// Destination requests (writes and zeroes) acknowledged.
    pub write_requests: u64,
    pub workers: usize,
    pub destination_zero: DestinationZero,
    pub elapsed: Duration,
}

/// Why a copy failed. `kind()` tells callers what kind of failure it is.
#[non_exhaustive]
#[derive(Debug, Clone, thiserror::Error)]
pub enum CopyError {
    /// An endpoint operation failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("destination size ({dst}) is smaller than source size ({src})")]
    DestinationTooSmall { src: u64, dst: u64 },
    #[error("{0}: the destination is read-only, cannot write to it")]
    ReadOnly(String),
    /// An incremental copy from a source that cannot say what changed.
    #[error(
        "{0}: an incremental copy needs the source's dirty extents (an NBD dirty bitmap, \
         or an imageio ticket with dirty extents)"
    )]
    NoDirtyExtents(String),
    /// The source's extents left part of a range undescribed: a broken server.
    #[error(
        "{endpoint}: extents cover only [{start}, {covered}) of [{start}, {end}); \
         try --no-extents as a workaround"
    )]
    IncompleteExtents {
        endpoint: String,
        start: u64,
        covered: u64,
        end: u64,
    },
    /// `--verify` found the destination differs from the source.
    #[error("{0}")]
    VerifyMismatch(Box<verify::Mismatch>),
    /// Hashing the copied data, or checksumming an endpoint to verify it, failed.
    #[error("{what}: {source}")]
    Checksum {
        what: &'static str,
        #[source]
        source: Box<blkhash::endpoint::EndpointError>,
    },
    /// The resume journal cannot be used or written.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// A worker task panicked (a bug): the copy stops.
    #[error("a copy worker failed: {0}")]
    Worker(String),
    #[error("copy interrupted")]
    Cancelled,
}

impl CopyError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CopyError::Disk(e) => e.kind(),
            CopyError::DestinationTooSmall { .. } => ErrorKind::NoSpace,
            CopyError::ReadOnly(_) => ErrorKind::ReadOnly,
            CopyError::NoDirtyExtents(_) => ErrorKind::Unsupported,
            CopyError::IncompleteExtents { .. } => ErrorKind::Protocol,
            CopyError::VerifyMismatch { .. } => ErrorKind::VerifyMismatch,
            CopyError::Checksum { source, .. } => source.kind(),
            CopyError::Journal(e) => e.kind(),
            CopyError::Worker(_) => ErrorKind::Other,
            CopyError::Cancelled => ErrorKind::Cancelled,
        }
    }
}

/// Stops a running copy from outside (Ctrl-C): no new work is issued, work in flight drains,
/// and the copy returns [`CopyError::Cancelled`].
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<CancelInner>);

#[derive(Debug, Default)]
struct CancelInner {
    cancelled: AtomicBool,
    /// Wakes workers blocked on slow requests so they notice a stop at once.
    wake: tokio::sync::Notify,
}

impl Cancel {
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        self.wake();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Wakes every worker waiting in [`Cancel::woken`] (after a cancel or a failure).
    pub(crate) fn wake(&self) {
        self.0.wake.notify_waiters();
    }

    pub(crate) fn woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.wake.notified()
    }
}

/// A copy's two endpoints.
pub struct Job {
    pub src: Arc<dyn Endpoint>,
    pub dst: Arc<dyn Endpoint>,
    /// Sees the source's content as it is read (to hash it on the way); `None` for most copies.
    pub observer: Option<Arc<dyn SourceObserver>>,
    /// Record progress in a journal, skipping what it recorded before.
    pub resume: Option<Resume>,
    /// A bandwidth limit on the data read from the source (each byte copied counts once).
    pub limit: Option<Arc<bwlimit::Limiter>>,
}

/// A copy that keeps a journal: what an earlier run completed is not copied again, and
/// checkpoints record what this one completes.
#[derive(Debug)]
pub struct Resume {
    pub journal: journal::Journal,
    /// What the journal recorded when the copy started.
    pub done: journal::RangeSet,
}

impl Job {
    pub fn new(src: Arc<dyn Endpoint>, dst: Arc<dyn Endpoint>) -> Job {
        Job {
            src,
            dst,
            observer: None,
            resume: None,
            limit: None,
        }
    }
}

/// Sees the source's content as the copy learns it, so it can be hashed without a second
/// read (`copy --verify`, `--blkhash`). Calls come from several workers, in no particular
/// order, and together cover the source exactly once when the copy succeeds.
pub trait SourceObserver: Send + Sync {
    /// `data` was read from the source at `offset`.
    fn data(&self, offset: u64, data: &bytes::Bytes);
    /// [offset, offset+len) reads as zeroes according to the source's extents (not read).
    fn zero(&self, offset: u64, len: u64);
}
