//! `--verify`: the source's checksum (hashed while it was copied, or read again after an
//! incremental copy) against the destination's (its server's own `/checksum` when it offers
//! one, else read back), both by imageio's construction. A difference is a
//! [`CopyError::VerifyMismatch`], never retried.

use std::sync::Arc;

use disk::Endpoint;

use crate::CopyError;

/// What a verification compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The checksum used, e.g. `imageio blake2b/4194304`.
    pub checksum: String,
    /// The digest both sides have, as hex.
    pub digest: String,
    /// How the destination's digest was learned.
    pub how: &'static str,
}

/// What a failed verification found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "verification failed: the destination {dst} differs from the source {src} \
     ({checksum}: source {src_digest}, destination {dst_digest} by {how})"
)]
pub struct Mismatch {
    pub src: String,
    pub dst: String,
    /// The checksum compared, e.g. `imageio blake2b/4194304`.
    pub checksum: String,
    pub src_digest: String,
    pub dst_digest: String,
    /// How the destination's digest was learned: read back, or its server's checksum.
    pub how: String,
}

/// The finished digest of a hasher fed by the copy.
pub(crate) fn digest(
    h: &blkhash::Hasher,
    size: u64,
    what: &'static str,
) -> Result<String, CopyError> {
    h.set_size(size);
    h.finish()
        .map(|d| d.to_hex())
        .map_err(|e| CopyError::Checksum {
            what,
            source: Box::new(e.into()),
        })
}

/// The checksum of all of `ep` by `spec`, read from it.
pub(crate) async fn checksum(
    ep: &Arc<dyn Endpoint>,
    spec: blkhash::Spec,
    what: &'static str,
) -> Result<String, CopyError> {
    let read_opts = blkhash::endpoint::ReadOptions::default();
    blkhash::endpoint::checksum(ep.clone(), spec, &read_opts)
        .await
        .map(|d| d.to_hex())
        .map_err(|e| CopyError::Checksum {
            what,
            source: Box::new(e),
        })
}

pub(crate) async fn verify(
    src: &Arc<dyn Endpoint>,
    dst: &Arc<dyn Endpoint>,
    size: u64,
    hashed: Option<&blkhash::Hasher>,
) -> Result<Verified, CopyError> {
    let spec = blkhash::Spec::imageio();
    let src_digest = match hashed {
        Some(h) => digest(h, size, "hashing the source")?,
        None => checksum(src, spec, "checksumming the source").await?,
    };
    let algorithm = spec.algorithm.to_string();
    let (dst_digest, how) = match dst.server_checksum(&algorithm, spec.block_size).await? {
        Some(hex) => (hex, "the server's checksum"),
        None => (
            checksum(dst, spec, "checksumming the destination").await?,
            "read back",
        ),
    };
    let checksum = format!(
        "{} {}/{}",
        spec.kind.name(),
        spec.algorithm,
        spec.block_size
    );
    if dst_digest != src_digest {
        return Err(CopyError::VerifyMismatch(Box::new(Mismatch {
            src: src.name().to_string(),
            dst: dst.name().to_string(),
            checksum,
            src_digest,
            dst_digest,
            how: how.to_string(),
        })));
    }
    Ok(Verified {
        checksum,
        digest: src_digest,
        how,
    })
}
