//! Policy: what the user asked for ([`Settings`], nbdcopy's options with its defaults) and both
//! endpoints' capabilities resolve into the engine's [`CopyOptions`] here, in one place, so the
//! command line, `demo` and the server copy with the same rules. [`run`] is the whole job:
//! resolve, copy, flush, and hash or verify what was copied.

use std::sync::Arc;

use disk::{Caps, Endpoint};

use crate::journal::{Identity, Journal, JournalError};
use crate::verify::{self, Verified};
use crate::{Cancel, CopyError, CopyOptions, Job, Progress, Resume, SourceObserver, Stats};

/// What the user asked for. `None` and zero mean "the endpoints' defaults".
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Largest read (else the source's default request size).
    pub src_request: Option<u64>,
    /// Largest write (else the destination's default, at least the read size).
    pub dst_request: Option<u64>,
    /// Requests in flight per pipeline.
    pub requests: usize,
    /// Connections to each multi-conn server: also the most pipelines.
    pub connections: usize,
    /// CPUs the copy may keep busy (0: all of them); pipelines beyond it only add memory.
    pub threads: usize,
    /// Bytes in flight per pipeline (else the endpoints' preference, else
    /// [`DEFAULT_QUEUE_BYTES`]).
    pub queue_bytes: Option<u64>,
    /// Zero-detection block size of data read (0: off).
    pub sparse: u64,
    pub allocated: bool,
    pub destination_is_zero: bool,
    /// Flush the destination at the end (always done where writes need it to be durable).
    pub flush: bool,
    /// Use the source's extents.
    pub extents: bool,
    pub incremental: bool,
    /// One request at a time, one pipeline.
    pub synchronous: bool,
    /// Hash the source while copying and compare with the destination's checksum.
    pub verify: bool,
    /// Also compute this block hash of the data copied (nbdcopy's `--blkhash`).
    pub blkhash: Option<blkhash::Spec>,
    /// Keep a resume journal here: what it records as done is not copied again, and it is
    /// removed when the copy completes.
    pub journal: Option<std::path::PathBuf>,
    /// Bandwidth limit: data bytes read from the source per second, changeable while the copy
    /// runs ([`bwlimit::Limiter::set_rate`]).
    pub bwlimit: Option<RateLimit>,
}

/// A shared, live-adjustable limiter; settings compare equal when they share the same one.
#[derive(Debug, Clone)]
pub struct RateLimit(pub Arc<bwlimit::Limiter>);

impl PartialEq for RateLimit {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for Settings {
    /// nbdcopy's defaults.
    fn default() -> Self {
        Settings {
            src_request: None,
            dst_request: None,
            requests: 64,
            connections: 4,
            threads: 0,
            queue_bytes: None,
            sparse: 4096,
            allocated: false,
            destination_is_zero: false,
            flush: false,
            extents: true,
            incremental: false,
            synchronous: false,
            verify: false,
            blkhash: None,
            journal: None,
            bwlimit: None,
        }
    }
}

/// Bytes in flight per pipeline where neither the user nor an endpoint chooses: nbdcopy's
/// `--queue-size`.
pub const DEFAULT_QUEUE_BYTES: u64 = 16 << 20;

/// The largest request any endpoint is asked to take.
const MAX_REQUEST: u64 = 32 << 20;
/// Zero detection never looks at blocks larger than this, whatever the destination prefers.
const MAX_SPARSE_BLOCK: u64 = 1 << 20;

impl CopyOptions {
    /// The engine's settings for copying between endpoints with these capabilities.
    pub fn resolve(src: &Caps, dst: &Caps, s: &Settings) -> CopyOptions {
        // Per-side request sizes: the user's, else the endpoint's default; never below what
        // the endpoint prefers, never above what it accepts.
        let src_request = s
            .src_request
            .unwrap_or(src.default_request)
            .max(src.preferred_block.min(MAX_REQUEST))
            .min(src.max_request.max(src.min_block));
        let dst_request = s
            .dst_request
            .unwrap_or(dst.default_request.max(src_request))
            .max(dst.preferred_block.min(MAX_REQUEST))
            .min(dst.max_request.max(dst.min_block));
        let cpus = if s.threads > 0 {
            s.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        };
        // Pipelines wait on the network where an endpoint says how many connections it holds:
        // one per connection. Elsewhere, like nbdcopy, as many as connections but no more than
        // CPUs (each pipeline keeps its own queue, so more would only add memory).
        let workers = if s.synchronous || src.sequential || dst.sequential {
            1
        } else {
            match src.connections.into_iter().chain(dst.connections).min() {
                Some(n) => n,
                None => s.connections.min(cpus),
            }
        }
        .max(1);
        CopyOptions {
            src_request,
            dst_request,
            requests: if s.synchronous { 1 } else { s.requests.max(1) },
            workers,
            queue_bytes: s
                .queue_bytes
                .or_else(|| src.queue_bytes.into_iter().chain(dst.queue_bytes).min())
                .unwrap_or(DEFAULT_QUEUE_BYTES)
                .max(src_request),
            sparse: if s.sparse == 0 {
                0
            } else {
                s.sparse.max(dst.preferred_block.min(MAX_SPARSE_BLOCK))
            },
            allocated: s.allocated,
            destination_is_zero: s.destination_is_zero,
            flush: s.flush || dst.needs_flush,
            extents: s.extents,
            work_size: crate::DEFAULT_WORK_SIZE,
            incremental: s.incremental,
        }
    }
}

/// What a finished job did and found.
#[derive(Debug, Clone)]
pub struct Report {
    pub options: CopyOptions,
    pub stats: Stats,
    /// The `--blkhash` digest of the data copied, as hex.
    pub blkhash: Option<String>,
    /// What `--verify` compared.
    pub verified: Option<Verified>,
}

/// Copies `src` to `dst` as `settings` ask: resolves the options, runs the engine (hashing the
/// source on the way when asked), then verifies. The endpoints are not closed.
pub async fn run(
    src: Arc<dyn Endpoint>,
    dst: Arc<dyn Endpoint>,
    settings: &Settings,
    progress: Arc<Progress>,
    cancel: Cancel,
) -> Result<Report, CopyError> {
    let options = CopyOptions::resolve(src.caps(), dst.caps(), settings);
    let resume = match &settings.journal {
        Some(path) => Some(open_journal(path, &src, &dst)?),
        None => None,
    };
    // Hashers fed by the copy itself, so the source is read once. An incremental or resumed
    // copy reads only part of it: its source is checksummed separately.
    let partial = settings.incremental || resume.as_ref().is_some_and(|r| !r.done.is_empty());
    let verify_hasher = (settings.verify && !partial)
        .then(|| Arc::new(blkhash::Hasher::new(blkhash::Spec::imageio())));
    let blkhash_hasher = settings
        .blkhash
        .filter(|_| !partial)
        .map(|spec| Arc::new(blkhash::Hasher::new(spec)));
    let hashers: Vec<Arc<blkhash::Hasher>> = verify_hasher
        .iter()
        .chain(blkhash_hasher.iter())
        .cloned()
        .collect();
    let mut job = Job::new(src.clone(), dst.clone());
    if !hashers.is_empty() {
        job.observer = Some(Arc::new(HashObserver(hashers)));
    }
    job.resume = resume;
    job.limit = settings.bwlimit.as_ref().map(|l| l.0.clone());
    let stats = crate::copy(job, options.clone(), progress.clone(), cancel).await?;
    let blkhash = match (blkhash_hasher, settings.blkhash) {
        (Some(h), _) => Some(verify::digest(
            &h,
            stats.size,
            "computing the --blkhash digest",
        )?),
        // The copy saw only part of the source: its hash comes from reading all of it.
        (None, Some(spec)) => {
            Some(verify::checksum(&src, spec, "computing the --blkhash digest").await?)
        }
        (None, None) => None,
    };
    let verified = if settings.verify {
        progress.set_phase(crate::progress::Phase::Verify);
        Some(verify::verify(&src, &dst, stats.size, verify_hasher.as_deref()).await?)
    } else {
        None
    };
    progress.set_phase(crate::progress::Phase::Done);
    Ok(Report {
        options,
        stats,
        blkhash,
        verified,
    })
}

/// The journal at `path` for these endpoints. Only images of known size that can be written
/// anywhere can be resumed: a stream cannot be read again from where it stopped.
fn open_journal(
    path: &std::path::Path,
    src: &Arc<dyn Endpoint>,
    dst: &Arc<dyn Endpoint>,
) -> Result<Resume, CopyError> {
    for (side, ep) in [("source", src), ("destination", dst)] {
        if ep.caps().size.is_none() || ep.caps().sequential {
            return Err(JournalError::Unsupported {
                path: path.display().to_string(),
                why: format!(
                    "the {side} {} is a stream, which cannot be resumed",
                    ep.name()
                ),
            }
            .into());
        }
    }
    let identity = |ep: &Arc<dyn Endpoint>| Identity {
        name: ep.name().to_string(),
        size: ep.caps().size,
        id: ep.identity(),
    };
    let (journal, done) = Journal::open(path, identity(src), identity(dst))?;
    if !done.is_empty() {
        tracing::info!(
            "resuming from {}: {} bytes already done",
            path.display(),
            done.total()
        );
    }
    Ok(Resume { journal, done })
}

/// Feeds the source's content to the hashers as the copy reads it.
struct HashObserver(Vec<Arc<blkhash::Hasher>>);

impl SourceObserver for HashObserver {
    fn data(&self, offset: u64, data: &bytes::Bytes) {
        for h in &self.0 {
            h.data(offset, data);
        }
    }

    fn zero(&self, offset: u64, len: u64) {
        for h in &self.0 {
            h.zero(offset, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nbd_like(size: u64) -> Caps {
        let mut c = Caps::random_access(size);
        c.default_request = 256 << 10;
        c
    }

    #[test]
    fn request_sizes_follow_the_user_then_the_endpoint_within_its_limits() {
        let src = nbd_like(1 << 30);
        let mut dst = nbd_like(1 << 30);
        dst.max_request = 1 << 20;
        let o = CopyOptions::resolve(&src, &dst, &Settings::default());
        assert_eq!((o.src_request, o.dst_request), (256 << 10, 256 << 10));
        let s = Settings {
            src_request: Some(4 << 20),
            ..Settings::default()
        };
        let o = CopyOptions::resolve(&src, &dst, &s);
        assert_eq!(o.src_request, 4 << 20);
        assert_eq!(
            o.dst_request,
            1 << 20,
            "capped by the destination's maximum"
        );
        assert!(o.queue_bytes >= o.src_request);
    }

    #[test]
    fn queue_follows_the_user_then_the_smaller_endpoint_preference_then_nbdcopy() {
        let src = nbd_like(1 << 30);
        let mut dst = nbd_like(1 << 30);
        let o = CopyOptions::resolve(&src, &dst, &Settings::default());
        assert_eq!(o.queue_bytes, DEFAULT_QUEUE_BYTES);
        dst.queue_bytes = Some(2 << 20);
        let o = CopyOptions::resolve(&src, &dst, &Settings::default());
        assert_eq!(o.queue_bytes, 2 << 20, "the destination's preference");
        let mut small_src = src.clone();
        small_src.queue_bytes = Some(1 << 20);
        let o = CopyOptions::resolve(&small_src, &dst, &Settings::default());
        assert_eq!(o.queue_bytes, 1 << 20, "the smaller of the two");
        let user = Settings {
            queue_bytes: Some(32 << 20),
            ..Settings::default()
        };
        let o = CopyOptions::resolve(&src, &dst, &user);
        assert_eq!(o.queue_bytes, 32 << 20, "the user's choice wins");
        let tiny = Settings {
            queue_bytes: Some(4096),
            src_request: Some(1 << 20),
            ..Settings::default()
        };
        let o = CopyOptions::resolve(&src, &dst, &tiny);
        assert_eq!(o.queue_bytes, 1 << 20, "never below one read");
    }

    #[test]
    fn pipelines_follow_connections_streams_and_cpus() {
        let src = nbd_like(1 << 30);
        let mut http = nbd_like(1 << 30);
        http.connections = Some(2);
        http.needs_flush = true;
        let many = Settings {
            connections: 8,
            threads: 16,
            ..Settings::default()
        };
        let o = CopyOptions::resolve(&src, &http, &many);
        assert_eq!(o.workers, 2, "one pipeline per HTTP connection");
        assert!(o.flush, "uploads are flushed whatever the user asked");
        assert_eq!(CopyOptions::resolve(&src, &src, &many).workers, 8);
        let cpus = Settings {
            threads: 3,
            ..many.clone()
        };
        assert_eq!(CopyOptions::resolve(&src, &src, &cpus).workers, 3);
        let mut pipe = nbd_like(0);
        pipe.sequential = true;
        assert_eq!(CopyOptions::resolve(&pipe, &src, &many).workers, 1);
        let sync = Settings {
            synchronous: true,
            ..many
        };
        let o = CopyOptions::resolve(&src, &src, &sync);
        assert_eq!((o.workers, o.requests), (1, 1));
    }

    #[test]
    fn sparse_blocks_are_at_least_the_destinations_preferred_block() {
        let src = nbd_like(1 << 30);
        let mut dst = nbd_like(1 << 30);
        dst.preferred_block = 64 << 10;
        let o = CopyOptions::resolve(&src, &dst, &Settings::default());
        assert_eq!(o.sparse, 64 << 10);
        let off = Settings {
            sparse: 0,
            ..Settings::default()
        };
        assert_eq!(CopyOptions::resolve(&src, &dst, &off).sparse, 0);
    }
}
