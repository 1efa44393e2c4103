//! Why an endpoint could not be opened: the user's words were wrong (nothing was tried), or
//! opening what they name failed.

use disk::{DiskError, ErrorKind};

/// An endpoint that could not be opened.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A word that looks like an NBD URI but is not a valid one.
    #[error(transparent)]
    NbdUri(#[from] nbd::uri::UriError),
    /// A word that looks like an http(s) URL but is not a valid one.
    #[error(transparent)]
    HttpUrl(#[from] imageio::url::UrlError),
    /// The spec cannot be used this way, or the options do not fit it (`null:` as a source,
    /// TLS flags with a plain `nbd://` URI).
    #[error("{0}")]
    Usage(String),
    /// Opening the endpoint failed.
    #[error(transparent)]
    Open(#[from] DiskError),
}

impl Error {
    /// What kind of failure this is: the words' mistakes are invalid requests.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Open(e) => e.kind(),
            _ => ErrorKind::InvalidRequest,
        }
    }

    /// The user's words are wrong (a command line reports these as usage errors); anything
    /// else failed while opening.
    pub fn is_usage(&self) -> bool {
        !matches!(self, Error::Open(_))
    }
}
