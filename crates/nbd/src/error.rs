//! The client's error type. It is `Clone` because one broken connection fails every request in
//! flight on it, and each waiter gets its own copy.

use std::sync::Arc;

pub use errkind::ErrorKind;

use crate::proto::DecodeError;
use crate::proto::consts::{self, command_name, errno_name, option_name, reply_error_name};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A socket or file operation failed; `context` says which.
    #[error("{context}: {}", io_reason(source))]
    Io {
        context: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The server broke the protocol; the connection is dropped.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused an option during the handshake.
    #[error("server refused {}: {}{}", option_name(*.option), reply_error_name(*.code), message_suffix(.message))]
    OptionRefused {
        option: u32,
        code: u32,
        message: String,
    },
    /// The server failed one command; the connection stays usable.
    #[error("{} at offset {offset} length {length} failed: {}{}", command_name(*.command), errno_text(*.errno), error_detail(.message, *.error_offset))]
    Command {
        command: u16,
        offset: u64,
        length: u64,
        errno: u32,
        message: String,
        error_offset: Option<u64>,
    },
    /// The caller asked for something this export or connection cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// The caller passed an invalid argument (unaligned, out of range, too long).
    #[error("{0}")]
    InvalidArgument(String),
    /// The server went silent.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The connection is closed (by us or the server) and can carry no more requests.
    #[error("connection closed: {0}")]
    Closed(String),
    /// TLS could not be set up or negotiated.
    #[error("TLS: {0}")]
    Tls(String),
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    }
}

fn errno_text(errno: u32) -> String {
    let (name, text) = errno_name(errno);
    format!("{text} ({name})")
}

fn error_detail(message: &str, error_offset: Option<u64>) -> String {
    let mut s = String::new();
    if let Some(off) = error_offset {
        s.push_str(&format!(" at byte {off}"));
    }
    if !message.is_empty() {
        s.push_str(&format!(": server says {message:?}"));
    }
    s
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// The NBD error value of a failed command, if this is one.
    pub fn errno(&self) -> Option<u32> {
        match self {
            Error::Command { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Why it failed, without the command and range (callers that name the operation
    /// themselves use this): for a failed command e.g. `No space left on device (ENOSPC)`.
    pub fn reason(&self) -> String {
        match self {
            Error::Command {
                errno,
                message,
                error_offset,
                ..
            } => format!(
                "{}{}",
                errno_text(*errno),
                error_detail(message, *error_offset)
            ),
            other => other.to_string(),
        }
    }

    /// True if the connection can no longer be used.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Error::Command { .. } | Error::Unsupported(_) | Error::InvalidArgument(_)
        )
    }

    /// True if the server broke the protocol.
    pub fn is_protocol(&self) -> bool {
        matches!(self, Error::Protocol(_))
    }

    /// What kind of failure this is, for callers deciding whether to retry.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => ErrorKind::from_io(source),
            Error::Protocol(_) => ErrorKind::Protocol,
            Error::OptionRefused { code, .. } => match *code {
                consts::REP_ERR_UNKNOWN => ErrorKind::NotFound,
                consts::REP_ERR_POLICY | consts::REP_ERR_TLS_REQD => ErrorKind::PermissionDenied,
                consts::REP_ERR_UNSUP => ErrorKind::Unsupported,
                consts::REP_ERR_INVALID | consts::REP_ERR_TOO_BIG => ErrorKind::InvalidRequest,
                consts::REP_ERR_SHUTDOWN => ErrorKind::ConnectionLost,
                _ => ErrorKind::Other,
            },
            // NBD's error values are Linux's errno values.
            Error::Command { errno, .. } => ErrorKind::from_errno(*errno as i32),
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::InvalidArgument(_) => ErrorKind::InvalidRequest,
            Error::Timeout(_) => ErrorKind::Timeout,
            Error::Closed(_) => ErrorKind::ConnectionLost,
            Error::Tls(_) => ErrorKind::Protocol,
        }
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::Protocol(e.to_string())
    }
}

/// `No space left on device (ENOSPC)` rather than std's `(os error 28)`.
pub fn io_reason(err: &std::io::Error) -> String {
    let Some(code) = err.raw_os_error() else {
        return err.to_string();
    };
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EPIPE => "EPIPE",
        libc::EDQUOT => "EDQUOT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        _ => return err.to_string(),
    };
    let text = err.to_string();
    let text = text
        .strip_suffix(&format!(" (os error {code})"))
        .unwrap_or(&text);
    format!("{text} ({name})")
}
