//! What the server serves: the [`Export`] trait (one image) and the [`Exports`] trait (which
//! names exist). Implementations live outside this crate (files, tickets); the server only
//! speaks the protocol.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::proto::BlockSize;
use crate::proto::consts::*;

pub type ExportFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, ExportError>> + Send + 'a>>;

/// A failed export operation: the NBD error value to send, and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    pub errno: u32,
    pub message: String,
}

impl ExportError {
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        ExportError {
            errno,
            message: message.into(),
        }
    }

    /// Maps a host I/O error onto the NBD error values the spec allows.
    pub fn from_io(err: &std::io::Error) -> Self {
        let errno = match err.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => EPERM,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
            Some(libc::EINVAL) => EINVAL,
            Some(libc::ENOMEM) => ENOMEM,
            Some(libc::EOPNOTSUPP) => ENOTSUP,
            Some(libc::ESHUTDOWN) => ESHUTDOWN,
            _ => EIO,
        };
        ExportError::new(errno, crate::error::io_reason(err))
    }
}

/// A piece of a read: bytes, or a run that reads as zeroes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadPiece {
    Data(Bytes),
    Hole(u64),
}

impl ReadPiece {
    pub fn len(&self) -> u64 {
        match self {
            ReadPiece::Data(b) => b.len() as u64,
            ReadPiece::Hole(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What an export supports beyond reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportCaps {
    pub read_only: bool,
    pub flush: bool,
    pub trim: bool,
    pub zero: bool,
    /// Zeroing is fast (never falls back to writing), so FAST_ZERO can be honoured.
    pub fast_zero: bool,
    pub cache: bool,
    /// A flush on any connection covers writes on all of them.
    pub multi_conn: bool,
    /// `extents` knows holes and zeroes (`base:allocation` is offered).
    pub extents: bool,
    pub block_size: BlockSize,
}

/// One image the server can serve. Every method may be called concurrently.
pub trait Export: Send + Sync {
    fn size(&self) -> u64;
    fn caps(&self) -> ExportCaps;
    fn description(&self) -> String {
        String::new()
    }
    /// Reads [offset, offset+len) as pieces in order that cover it exactly.
    fn read(&self, offset: u64, len: u64) -> ExportFut<'_, Vec<ReadPiece>>;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> ExportFut<'_, ()>;
    /// Zeroes; `punch` allows deallocating; `fast` asks to fail with ENOTSUP unless fast.
    fn write_zeroes(&self, offset: u64, len: u64, punch: bool, fast: bool) -> ExportFut<'_, ()>;
    fn trim(&self, offset: u64, len: u64) -> ExportFut<'_, ()>;
    fn flush(&self) -> ExportFut<'_, ()>;
    fn cache(&self, _offset: u64, _len: u64) -> ExportFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// `base:allocation` status of [offset, offset+len): (length, STATE_HOLE|STATE_ZERO flags)
    /// runs in order, covering at least the first byte.
    fn extents(&self, offset: u64, len: u64) -> ExportFut<'_, Vec<(u64, u32)>>;
    /// Called when a client has been refused for good or the export is going away; a ticket
    /// uses it to stop in-flight work. The default does nothing.
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// The set of exports a server offers.
pub trait Exports: Send + Sync {
    /// The export called `name`, if it exists and may be served now.
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Names (and descriptions) revealed to NBD_OPT_LIST. May be empty to reveal nothing.
    fn list(&self) -> Vec<(String, String)>;
}

/// A server with exactly one export, under one name.
pub struct SingleExport {
    pub name: String,
    pub export: Arc<dyn Export>,
}

impl Exports for SingleExport {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        (name == self.name).then(|| self.export.clone())
    }

    fn list(&self) -> Vec<(String, String)> {
        vec![(self.name.clone(), self.export.description())]
    }
}
