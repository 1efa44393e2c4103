//! Checksumming a whole [`disk::Endpoint`] (feature `endpoint`): what `ferry checksum` and
//! the server's `/checksum` run.
//!
//! The endpoint's extents come first: zero ranges are declared to the [`Hasher`] and never
//! read. Data ranges are read in block-aligned requests, several in flight, and each finished
//! read goes to the hashing pool while the next reads are under way. Memory is bounded by
//! `in_flight × request size` plus the hasher's pending limit, whatever the image size.
//!
//! It only reads; it never writes, flushes or closes the endpoint.

use std::sync::Arc;

use disk::{DiskError, Endpoint, ErrorKind, Extent, Op};

use crate::{Digest, Error, Hasher, Spec};

/// How to read the endpoint.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Bytes per read; 0 picks whole blocks of at least 4 MiB within the endpoint's maximum.
    pub request_size: u64,
    /// Reads in flight at once.
    pub in_flight: usize,
    /// Use the endpoint's extents to skip zero ranges (the result is the same without).
    pub extents: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            request_size: 0,
            in_flight: 8,
            extents: true,
        }
    }
}

/// Why an endpoint's checksum failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Hash(#[from] Error),
}

impl EndpointError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EndpointError::Disk(e) => e.kind(),
            EndpointError::Hash(e) => e.kind(),
        }
    }
}

/// Extents are asked for this much at a time: small enough for any NBD server's 32-bit
/// lengths, large enough that a terabyte of holes is a thousand cheap calls.
const EXTENTS_WINDOW: u64 = 1 << 30;

/// Reads smaller than this cost more in per-request overhead than they save in memory.
const MIN_AUTO_REQUEST: u64 = 4 << 20;

/// What to do with one range.
enum Work {
    Zero(u64, u64),
    Read(u64, u64),
}

/// The checksum of everything `ep` holds, by `spec`.
pub async fn checksum(
    ep: Arc<dyn Endpoint>,
    spec: Spec,
    opts: &ReadOptions,
) -> Result<Digest, EndpointError> {
    let caps = ep.caps().clone();
    let size = caps.size.ok_or_else(|| {
        DiskError::new(
            ep.name(),
            Op::Read,
            ErrorKind::Unsupported,
            "a stream has no size; a checksum needs random access",
        )
    })?;
    let hasher = Arc::new(Hasher::with_size(spec, size));
    let request = request_size(&spec, caps.max_request, opts.request_size);
    let use_extents = opts.extents && caps.extents;

    let in_flight = opts.in_flight.max(1);
    // Each range is its own task: reads complete on any async worker, in any order, and a
    // failure drops the set, which aborts the rest.
    let mut tasks = tokio::task::JoinSet::new();
    let mut pos = 0;
    while pos < size {
        let len = EXTENTS_WINDOW.min(size - pos);
        let extents = if use_extents {
            ep.extents(pos, len).await?
        } else {
            vec![Extent::data(pos, len)]
        };
        for work in work_of(&extents, request) {
            while tasks.len() >= in_flight {
                joined(tasks.join_next().await)?;
            }
            tasks.spawn(run(ep.clone(), hasher.clone(), work));
        }
        pos += len;
    }
    while let Some(r) = tasks.join_next().await {
        joined(Some(r))?;
    }
    let done = hasher.clone();
    Ok(blocking(move || done.finish()).await?)
}

fn joined(
    r: Option<Result<Result<(), EndpointError>, tokio::task::JoinError>>,
) -> Result<(), EndpointError> {
    match r {
        None => Ok(()),
        Some(Ok(r)) => r,
        Some(Err(e)) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn run(ep: Arc<dyn Endpoint>, hasher: Arc<Hasher>, work: Work) -> Result<(), EndpointError> {
    match work {
        Work::Zero(off, len) => {
            // A long zero run can mean millions of digests for the outer hash.
            blocking(move || hasher.zero(off, len)).await;
        }
        Work::Read(off, len) => {
            let data = ep.read(off, len).await?;
            if data.len() as u64 != len {
                return Err(DiskError::new(
                    ep.name(),
                    Op::Read,
                    ErrorKind::Protocol,
                    format!("short read: {} of {len} bytes", data.len()),
                )
                .at(off, len)
                .into());
            }
            // May wait for the pool to catch up: that wait is the back-pressure that bounds
            // memory, and it must not stall the async workers.
            blocking(move || hasher.data(off, &data)).await;
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("hashing task panicked")
}

/// Whole blocks per read when blocks fit in the endpoint's maximum request, so reads never
/// split a block; otherwise the largest request, and blocks are assembled from pieces.
fn request_size(spec: &Spec, max_request: u64, wanted: u64) -> u64 {
    let bs = spec.block_size;
    let base = if wanted > 0 {
        wanted
    } else {
        MIN_AUTO_REQUEST.div_ceil(bs) * bs
    };
    let r = base.min(max_request.max(1));
    if r >= bs { r - r % bs } else { r }
}

/// Zero extents as they are; data extents cut at multiples of `request` (counted from the
/// start of the image, so reads stay block-aligned whatever the extent boundaries).
fn work_of(extents: &[Extent], request: u64) -> Vec<Work> {
    let mut out = Vec::new();
    for e in extents.iter().filter(|e| e.length > 0) {
        if e.zero {
            match out.last_mut() {
                Some(Work::Zero(off, len)) if *off + *len == e.offset => *len += e.length,
                _ => out.push(Work::Zero(e.offset, e.length)),
            }
            continue;
        }
        let end = e.end();
        let mut pos = e.offset;
        while pos < end {
            let next = ((pos / request) + 1) * request;
            let n = next.min(end) - pos;
            out.push(Work::Read(pos, n));
            pos += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_hold_whole_blocks() {
        let spec = Spec::imageio();
        assert_eq!(request_size(&spec, 32 << 20, 0), 4 << 20);
        assert_eq!(request_size(&spec, 6 << 20, 8 << 20), 4 << 20);
        assert_eq!(request_size(&spec, 1 << 20, 0), 1 << 20);
        let small = Spec::blkhash();
        assert_eq!(request_size(&small, 32 << 20, 0), 4 << 20);
        assert_eq!(request_size(&small, 32 << 20, 100 << 10), 64 << 10);
    }

    #[test]
    fn data_is_cut_at_request_multiples_and_zero_runs_merge() {
        let extents = [
            Extent::data(0, 10),
            Extent::hole(10, 5),
            Extent {
                offset: 15,
                length: 3,
                zero: true,
                hole: false,
            },
            Extent::data(18, 9),
        ];
        let got: Vec<(bool, u64, u64)> = work_of(&extents, 8)
            .into_iter()
            .map(|w| match w {
                Work::Zero(o, l) => (true, o, l),
                Work::Read(o, l) => (false, o, l),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (false, 0, 8),
                (false, 8, 2),
                (true, 10, 8),
                (false, 18, 6),
                (false, 24, 3)
            ]
        );
    }
}
