//! Block checksums of disk images, computed in parallel and without reading what is known to
//! be zero.
//!
//! Two constructions, each matching its reference bit for bit:
//!
//! - [`Kind::Imageio`]: ovirt-imageio's `/checksum`, `H(H(b0) ‖ H(b1) ‖ … ‖ H(bn−1))` over
//!   `block_size` blocks (blake2b with a 32-byte digest and 4 MiB blocks by default);
//! - [`Kind::Blkhash`]: nbdcopy's `--blkhash`, the same block digests followed by the image
//!   size as a 64-bit little-endian number before the final hash (sha256, 64 KiB by default).
//!
//! In both, the last block is hashed at its real length (never padded), and a full block known
//! to be zero contributes the precomputed digest of a zero block, which is what hashing it
//! would give: the value depends only on the image's bytes and the [`Spec`].
//!
//! This crate owns the constructions ([`Spec`], [`Algorithm`]), the parallel, order-free
//! [`Hasher`] that bytes and zero ranges are fed to, a sequential [`reference`] implementation
//! the tests compare against, and (feature `endpoint`) checksumming a whole
//! `disk::Endpoint` from its extents. It never does I/O outside that module.

mod algorithm;
mod hasher;
pub mod reference;
mod spec;
mod zero;

#[cfg(feature = "endpoint")]
pub mod endpoint;

pub use algorithm::Algorithm;
pub use hasher::{Hasher, HasherOptions};
pub use spec::{Kind, Spec};
pub use zero::is_zero;

/// A finished checksum: the digest bytes, shown as lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Digest(Vec<u8>);

impl Digest {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        let mut s = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// Why a checksum could not be set up or finished.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("unsupported algorithm '{0}'")]
    UnknownAlgorithm(String),
    #[error("{0}")]
    BadSpec(String),
    /// The same bytes were fed twice.
    #[error("bytes at offset {offset} length {length} were fed more than once")]
    Overlap { offset: u64, length: u64 },
    /// Bytes were fed beyond the image's size.
    #[error("bytes at offset {offset} length {length} lie beyond the image size {size}")]
    BeyondEnd { offset: u64, length: u64, size: u64 },
    /// `finish` found bytes that were never fed.
    #[error("the checksum is incomplete: nothing was fed for the block at offset {offset}")]
    Incomplete { offset: u64 },
    #[error("the checksum was already finished")]
    Finished,
}

impl Error {
    /// What kind of failure this is: a bad spec is the caller's request; the rest are bugs of
    /// whoever fed the hasher.
    pub fn kind(&self) -> errkind::ErrorKind {
        match self {
            Error::UnknownAlgorithm(_) | Error::BadSpec(_) => errkind::ErrorKind::InvalidRequest,
            _ => errkind::ErrorKind::Other,
        }
    }
}
