//! The one vocabulary of failure kinds every ferry crate classifies its errors into, and the one
//! place that decides whether a failure may be retried.
//!
//! Each library crate keeps its own error type (with its context, `source()` chain, errno or
//! HTTP status) and answers `kind()` with an [`ErrorKind`]; callers decide from the kind, never
//! from message text. The mapping from OS and NBD error numbers lives here too, so a file, an
//! NBD server and an HTTP server reporting the same condition get the same kind.

#![forbid(unsafe_code)]

/// What went wrong, as far as a caller deciding "retry, report or give up" needs to know.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The connection broke or could not be made (reset, refused, closed by the peer).
    ConnectionLost,
    /// The peer did not answer in time.
    Timeout,
    /// The peer broke its protocol (a malformed or unexpected reply).
    Protocol,
    /// The destination is full (ENOSPC, EDQUOT, EFBIG).
    NoSpace,
    /// The target cannot be written (EROFS, a read-only export or ticket).
    ReadOnly,
    /// Not allowed (EPERM, EACCES, HTTP 401/403).
    PermissionDenied,
    /// What was named does not exist (ENOENT, HTTP 404, an unknown export).
    NotFound,
    /// The request itself is wrong (EINVAL, out of range, HTTP 4xx): sending it again fails again.
    InvalidRequest,
    /// The peer cannot do this (EOPNOTSUPP, a missing feature).
    Unsupported,
    /// The image changed under the operation (its size or identity differ from what was seen).
    Changed,
    /// The user or a signal stopped the operation.
    Cancelled,
    /// A verification found the destination differs from the source.
    VerifyMismatch,
    /// An I/O error of the storage itself (EIO), as reported by a peer or the OS.
    Io,
    /// The peer failed for a reason of its own (HTTP 5xx without more detail).
    Server,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// May the same request be sent again with a chance of success? True for failures of the
    /// path between us and the storage (connections, timeouts, server hiccups, EIO blips);
    /// never for conditions that sending again cannot change (no space, read-only, permission,
    /// invalid request, a changed image, a verification mismatch, a cancel).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::ConnectionLost | ErrorKind::Timeout | ErrorKind::Io | ErrorKind::Server
        )
    }

    /// The kind of an OS (or NBD, whose values are Linux's) error number.
    pub fn from_errno(errno: i32) -> ErrorKind {
        match errno {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ErrorKind::NoSpace,
            libc::EROFS => ErrorKind::ReadOnly,
            libc::EPERM | libc::EACCES => ErrorKind::PermissionDenied,
            libc::ENOENT | libc::ENXIO | libc::ENODEV => ErrorKind::NotFound,
            libc::EINVAL | libc::EOVERFLOW | libc::EISDIR | libc::EBADF => {
                ErrorKind::InvalidRequest
            }
            libc::EOPNOTSUPP | libc::ENOSYS => ErrorKind::Unsupported,
            libc::ECONNRESET
            | libc::ECONNREFUSED
            | libc::ECONNABORTED
            | libc::EPIPE
            | libc::ENOTCONN
            | libc::ESHUTDOWN
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ENETDOWN => ErrorKind::ConnectionLost,
            libc::ETIMEDOUT => ErrorKind::Timeout,
            libc::EIO => ErrorKind::Io,
            libc::EINTR | libc::EAGAIN => ErrorKind::Other,
            _ => ErrorKind::Other,
        }
    }

    /// The kind of a standard I/O error: its errno when it has one, else its `io::ErrorKind`.
    pub fn from_io(err: &std::io::Error) -> ErrorKind {
        if let Some(errno) = err.raw_os_error() {
            return ErrorKind::from_errno(errno);
        }
        use std::io::ErrorKind as Io;
        match err.kind() {
            Io::ConnectionReset
            | Io::ConnectionRefused
            | Io::ConnectionAborted
            | Io::NotConnected
            | Io::BrokenPipe
            | Io::UnexpectedEof => ErrorKind::ConnectionLost,
            Io::TimedOut => ErrorKind::Timeout,
            Io::NotFound => ErrorKind::NotFound,
            Io::PermissionDenied => ErrorKind::PermissionDenied,
            Io::InvalidInput => ErrorKind::InvalidRequest,
            Io::InvalidData => ErrorKind::Protocol,
            Io::Unsupported => ErrorKind::Unsupported,
            Io::StorageFull | Io::QuotaExceeded | Io::FileTooLarge => ErrorKind::NoSpace,
            Io::ReadOnlyFilesystem => ErrorKind::ReadOnly,
            _ => ErrorKind::Other,
        }
    }

    /// The kind of an HTTP status a server answered with (only meaningful for errors).
    pub fn from_http_status(status: u16) -> ErrorKind {
        match status {
            401 | 403 => ErrorKind::PermissionDenied,
            404 | 410 => ErrorKind::NotFound,
            408 => ErrorKind::Timeout,
            413 | 507 => ErrorKind::NoSpace,
            405 | 501 => ErrorKind::Unsupported,
            400..=499 => ErrorKind::InvalidRequest,
            503 | 504 => ErrorKind::Timeout,
            500..=599 => ErrorKind::Server,
            _ => ErrorKind::Other,
        }
    }

    /// A short lower-case name, for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ConnectionLost => "connection-lost",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Protocol => "protocol",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::PermissionDenied => "permission-denied",
            ErrorKind::NotFound => "not-found",
            ErrorKind::InvalidRequest => "invalid-request",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Changed => "changed",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::VerifyMismatch => "verify-mismatch",
            ErrorKind::Io => "io",
            ErrorKind::Server => "server",
            ErrorKind::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_that_cannot_change_are_never_retried() {
        for errno in [
            libc::ENOSPC,
            libc::EDQUOT,
            libc::EROFS,
            libc::EPERM,
            libc::EACCES,
            libc::EINVAL,
        ] {
            assert!(
                !ErrorKind::from_errno(errno).is_retryable(),
                "errno {errno}"
            );
        }
        for kind in [
            ErrorKind::Changed,
            ErrorKind::VerifyMismatch,
            ErrorKind::Cancelled,
            ErrorKind::InvalidRequest,
        ] {
            assert!(!kind.is_retryable(), "{kind}");
        }
    }

    #[test]
    fn broken_paths_are_retried() {
        for errno in [libc::ECONNRESET, libc::EPIPE, libc::ETIMEDOUT, libc::EIO] {
            assert!(ErrorKind::from_errno(errno).is_retryable(), "errno {errno}");
        }
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(ErrorKind::from_io(&eof), ErrorKind::ConnectionLost);
        assert!(ErrorKind::from_http_status(503).is_retryable());
        assert!(ErrorKind::from_http_status(500).is_retryable());
        assert!(!ErrorKind::from_http_status(400).is_retryable());
        assert!(!ErrorKind::from_http_status(403).is_retryable());
    }

    #[test]
    fn the_same_condition_gets_the_same_kind_from_every_source() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(ErrorKind::from_io(&io), ErrorKind::NoSpace);
        assert_eq!(ErrorKind::from_errno(libc::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(ErrorKind::from_http_status(404), ErrorKind::NotFound);
        let nf = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(ErrorKind::from_io(&nf), ErrorKind::NotFound);
    }
}
