//! The sans-IO NBD codec: every message of the handshake and transmission phases as plain
//! encode/decode functions over byte slices. No sockets, no async, no `unsafe`: the client, the
//! server and the fuzz targets all sit on top of this module.

pub mod consts;
mod cursor;
pub mod handshake;
pub mod transmission;

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} truncated: needs {need} bytes, {have} present")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{0}")]
    Invalid(String),
}

pub use handshake::*;
pub use transmission::*;
