//! The one error type of the crate: every failure names the image and, where there is one, the
//! offset in the image file that was being read or found wrong.

use std::io;

/// What went wrong, for callers that decide on it (retry, report, refuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The image file could not be read.
    Io,
    /// The image is not qcow2, or its metadata is inconsistent or out of bounds.
    Corrupt,
    /// A valid image that uses something this reader does not do (encryption, ...).
    Unsupported,
    /// The backing chain cannot be opened (missing file, loop, too deep, not allowed).
    Backing,
    /// The caller asked for something outside the image (a read past its end, no such bitmap).
    InvalidArgument,
    /// A write to an image that was opened read-only.
    ReadOnly,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}{}", at_text(.offset))]
pub struct Qcow2Error {
    /// The image as it was named when opened.
    pub path: String,
    /// Offset in the image file (not the guest view) where the problem was found.
    pub offset: Option<u64>,
    pub kind: ErrorKind,
    pub message: String,
    #[source]
    pub source: Option<io::Error>,
}

fn at_text(offset: &Option<u64>) -> String {
    match offset {
        Some(o) => format!(" (at file offset {o})"),
        None => String::new(),
    }
}

impl Qcow2Error {
    pub(crate) fn new(path: &str, kind: ErrorKind, message: impl Into<String>) -> Self {
        Qcow2Error {
            path: path.to_string(),
            offset: None,
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    pub(crate) fn io(path: &str, offset: Option<u64>, what: &str, err: io::Error) -> Self {
        Qcow2Error {
            path: path.to_string(),
            offset,
            kind: ErrorKind::Io,
            message: format!("{what}: {err}"),
            source: Some(err),
        }
    }

    pub(crate) fn corrupt(path: &str, offset: u64, message: impl Into<String>) -> Self {
        Qcow2Error::new(path, ErrorKind::Corrupt, message).at(offset)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

pub type Result<T> = std::result::Result<T, Qcow2Error>;
