//! The parallel, order-free checksum: callers feed byte ranges ([`Hasher::data`]) and zero
//! ranges ([`Hasher::zero`]) in any order, from any number of threads; [`Hasher::finish`] gives
//! the digest. The result depends only on the image's bytes, never on how they were split,
//! ordered, declared zero, or how many threads hashed them.
//!
//! How: a range is cut at block boundaries. Whole blocks of data go to a thread pool in jobs of
//! about [`JOB_BYTES`]; whole zero blocks need no hashing and become a run of the precomputed
//! zero digest; pieces of blocks wait (as cheap `Bytes` slices, never copies) until their block
//! is complete and are then hashed in offset order. Finished block digests are kept in a map by
//! block index and fed to the outer hash as soon as the blocks before them are in, so memory
//! holds only digests of blocks that ran ahead. A data block that turns out all zero is
//! recognised by a scan and given the zero digest too.
//!
//! The pool is rayon's global one unless [`HasherOptions::pool`] names another: one pool sized
//! to the machine serves every hasher of the process (a server answering several checksum
//! requests, a copy and its verification), so hashing never oversubscribes the cores, and work
//! stealing keeps every core busy when block sizes or feeding rates differ.

use std::collections::{BTreeMap, HashMap};

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;

use crate::algorithm::{Algorithm, State as HashState};
use crate::zero::{feed_zeros, is_zero};
use crate::{Digest, Error, Kind, Spec};

/// Bytes of whole blocks handed to the pool as one job: small enough that one caller's large
/// range spreads over all cores, large enough that small blocks (64 KiB) are not one task each.
const JOB_BYTES: u64 = 1 << 20;

/// How a [`Hasher`] runs.
#[derive(Clone, Default)]
pub struct HasherOptions {
    /// Bytes waiting to be hashed above which [`Hasher::data`] blocks until the pool catches
    /// up; 0 means the default (64 MiB, at least four blocks).
    pub max_pending: u64,
    /// The pool that hashes; `None` is rayon's global pool (one thread per core).
    pub pool: Option<Arc<rayon::ThreadPool>>,
}

/// A checksum being computed. Share it (`Arc<Hasher>`) between the threads that feed it.
pub struct Hasher {
    shared: Arc<Shared>,
    pool: Option<Arc<rayon::ThreadPool>>,
}

struct Shared {
    spec: Spec,
    zero_digest: Arc<[u8]>,
    max_pending: u64,
    state: Mutex<State>,
    /// Signalled when a job finishes (pending bytes fall, `finish` may proceed).
    changed: Condvar,
}

struct State {
    /// The image size, once known.
    size: Option<u64>,
    /// One past the highest byte fed.
    end: u64,
    /// Blocks fed in pieces, by index, until complete.
    partial: BTreeMap<u64, Partial>,
    /// Digest runs that are done but wait for earlier blocks, by first block index.
    ready: BTreeMap<u64, Run>,
    /// Index of the first block not yet fed to `outer`.
    next: u64,
    /// `None` once finished.
    outer: Option<HashState>,
    /// Bytes handed to the pool and not hashed yet.
    pending: u64,
    jobs: usize,
    error: Option<Error>,
    /// Digest size of the algorithm, to count the blocks of a run.
    dlen: usize,
}

enum Run {
    /// Consecutive block digests, concatenated.
    Digests(Vec<u8>),
    /// This many consecutive full zero blocks.
    Zero(u64),
}

#[derive(Default)]
struct Partial {
    filled: u64,
    pieces: Vec<(u64, Piece)>,
}

enum Piece {
    Data(Bytes),
    Zero(u64),
}

/// Consecutive complete blocks to hash, starting at block `first`.
struct Job {
    first: u64,
    blocks: Vec<Block>,
    bytes: u64,
}

struct Block {
    len: u64,
    pieces: Vec<Piece>,
}

impl Hasher {
    /// A hasher for an image whose size is found at [`finish`](Self::finish) (the end of the
    /// last range fed) or given by [`set_size`](Self::set_size).
    pub fn new(spec: Spec) -> Hasher {
        Hasher::with_options(spec, None, HasherOptions::default())
    }

    /// A hasher for an image of `size` bytes.
    pub fn with_size(spec: Spec, size: u64) -> Hasher {
        Hasher::with_options(spec, Some(size), HasherOptions::default())
    }

    /// A hasher with explicit options. `spec` should have passed [`Spec::check`]; a zero
    /// block size is a programming error and panics.
    pub fn with_options(spec: Spec, size: Option<u64>, options: HasherOptions) -> Hasher {
        assert!(spec.block_size > 0, "blkhash: block size 0");
        let max_pending = if options.max_pending == 0 {
            (64 << 20).max(4 * spec.block_size)
        } else {
            options.max_pending
        };
        let state = State {
            size,
            end: 0,
            partial: BTreeMap::new(),
            ready: BTreeMap::new(),
            next: 0,
            outer: Some(spec.algorithm.start()),
            pending: 0,
            jobs: 0,
            error: None,
            dlen: spec.algorithm.digest_len(),
        };
        Hasher {
            shared: Arc::new(Shared {
                spec,
                zero_digest: zero_digest(spec.algorithm, spec.block_size),
                max_pending,
                state: Mutex::new(state),
                changed: Condvar::new(),
            }),
            pool: options.pool,
        }
    }

    pub fn spec(&self) -> &Spec {
        &self.shared.spec
    }

    /// Declares the image size (when it was not known at creation). Bytes already fed beyond
    /// it make [`finish`](Self::finish) fail.
    pub fn set_size(&self, size: u64) {
        let mut st = self.shared.lock();
        if st.end > size {
            let end = st.end;
            st.fail(Error::BeyondEnd {
                offset: size,
                length: end - size,
                size,
            });
        }
        st.size = Some(size);
        // The last block may have been waiting only for the size to be complete.
        let spec = self.shared.spec;
        let mut jobs = Vec::new();
        if let Some(last) = spec.blocks(size).checked_sub(1)
            && st
                .partial
                .get(&last)
                .is_some_and(|p| p.filled == st.block_len(&spec, last))
        {
            let p = st.partial.remove(&last).expect("checked");
            let len = p.filled;
            jobs.push(job_of(last, len, p));
        }
        self.dispatch(st, jobs);
    }

    /// `data` is the image's content at `offset`. May be called from any thread, in any order;
    /// blocks (back-pressure) while more than `max_pending` bytes wait for the pool, so call it
    /// from a thread that may block (not a thread of the hashing pool itself, which would
    /// deadlock, and preferably not an async executor's worker).
    pub fn data(&self, offset: u64, data: &Bytes) {
        if data.is_empty() {
            return;
        }
        let mut st = self.shared.lock();
        while st.pending > self.shared.max_pending && st.error.is_none() {
            st = self.shared.changed.wait(st).expect("hasher lock poisoned");
        }
        let jobs = self
            .shared
            .feed(&mut st, offset, data.len() as u64, Some(data));
        self.dispatch(st, jobs);
    }

    /// Like [`data`](Self::data) for a borrowed slice (copied when it is not a whole block).
    pub fn data_slice(&self, offset: u64, data: &[u8]) {
        self.data(offset, &Bytes::copy_from_slice(data));
    }

    /// [offset, offset+len) reads as zeroes; nothing needs to be read or hashed for the full
    /// blocks inside it. Never blocks on the pool.
    pub fn zero(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut st = self.shared.lock();
        let jobs = self.shared.feed(&mut st, offset, len, None);
        self.dispatch(st, jobs);
    }

    /// Waits for the pool to hash what was fed and returns the checksum, or why there is
    /// none: bytes missing, fed twice, or beyond the size. Later calls fail with
    /// [`Error::Finished`].
    pub fn finish(&self) -> Result<Digest, Error> {
        let shared = &self.shared;
        let spec = shared.spec;
        let mut st = shared.lock();
        while st.jobs > 0 {
            st = shared.changed.wait(st).expect("hasher lock poisoned");
        }
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        if st.outer.is_none() {
            return Err(Error::Finished);
        }
        let end = st.end;
        let size = *st.size.get_or_insert(end);
        let blocks = spec.blocks(size);
        if let Some(last) = blocks.checked_sub(1)
            && st
                .partial
                .get(&last)
                .is_some_and(|p| p.filled == st.block_len(&spec, last))
        {
            let p = st.partial.remove(&last).expect("checked");
            let job = job_of(last, p.filled, p);
            let digests = shared.hash_job(&job);
            st.insert_ready(shared, last, Run::Digests(digests));
        }
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        let first_partial = st.partial.keys().next().copied();
        let missing = match first_partial {
            Some(p) => Some(p.min(st.next)),
            None if st.next < blocks => Some(st.next),
            None => None,
        };
        if let Some(block) = missing {
            return Err(Error::Incomplete {
                offset: block * spec.block_size,
            });
        }
        let mut outer = st.outer.take().expect("checked");
        if spec.kind == Kind::Blkhash {
            outer.update(&size.to_le_bytes());
        }
        Ok(Digest(outer.finish()))
    }

    /// Unlocks and hands `jobs` to the pool.
    fn dispatch(&self, mut st: MutexGuard<'_, State>, jobs: Vec<Job>) {
        for j in &jobs {
            st.pending += j.bytes;
            st.jobs += 1;
        }
        drop(st);
        for job in jobs {
            let shared = self.shared.clone();
            let task = move || shared.complete(job);
            match &self.pool {
                Some(pool) => pool.spawn(task),
                None => rayon::spawn(task),
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("hasher lock poisoned")
    }

    /// Records [offset, offset+len) (data when `data` is given, else zeroes) and returns the
    /// jobs of blocks it completed. Runs of full zero blocks are recorded directly.
    fn feed(&self, st: &mut State, offset: u64, len: u64, data: Option<&Bytes>) -> Vec<Job> {
        let spec = self.spec;
        let bs = spec.block_size;
        let mut jobs: Vec<Job> = Vec::new();
        if st.outer.is_none() {
            st.fail(Error::Finished);
            return jobs;
        }
        let Some(end) = offset.checked_add(len) else {
            st.fail(Error::BeyondEnd {
                offset,
                length: len,
                size: u64::MAX,
            });
            return jobs;
        };
        if let Some(size) = st.size
            && end > size
        {
            st.fail(Error::BeyondEnd {
                offset,
                length: len,
                size,
            });
            return jobs;
        }
        st.end = st.end.max(end);
        let piece = |from: u64, n: u64| match data {
            Some(b) => {
                let a = (from - offset) as usize;
                Piece::Data(b.slice(a..a + n as usize))
            }
            None => Piece::Zero(n),
        };
        // A run of full zero blocks being collected: (first index, count).
        let mut zeros: Option<(u64, u64)> = None;
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let start = idx * bs;
            let blen = st.block_len(&spec, idx);
            let n = end.min(start + blen) - pos;
            let whole = pos == start && n == blen;
            if whole && st.partial.contains_key(&idx) {
                st.fail(Error::Overlap {
                    offset: pos,
                    length: n,
                });
                return jobs;
            }
            if whole && data.is_none() && blen == bs {
                zeros = match zeros {
                    Some((first, count)) if first + count == idx => Some((first, count + 1)),
                    other => {
                        if let Some((first, count)) = other {
                            st.insert_ready(self, first, Run::Zero(count));
                        }
                        Some((idx, 1))
                    }
                };
            } else if whole {
                let block = Block {
                    len: blen,
                    pieces: vec![piece(pos, n)],
                };
                match jobs.last_mut() {
                    Some(j) if j.first + j.blocks.len() as u64 == idx && j.bytes < JOB_BYTES => {
                        j.blocks.push(block);
                        j.bytes += blen;
                    }
                    _ => jobs.push(Job {
                        first: idx,
                        blocks: vec![block],
                        bytes: blen,
                    }),
                }
            } else {
                if st.claimed(idx) {
                    st.fail(Error::Overlap {
                        offset: pos,
                        length: n,
                    });
                    return jobs;
                }
                let p = st.partial.entry(idx).or_default();
                p.filled += n;
                p.pieces.push((pos - start, piece(pos, n)));
                if p.filled > blen {
                    st.fail(Error::Overlap {
                        offset: pos,
                        length: n,
                    });
                    return jobs;
                }
                if p.filled == blen {
                    let p = st.partial.remove(&idx).expect("just filled");
                    jobs.push(job_of(idx, blen, p));
                }
            }
            pos += n;
        }
        if let Some((first, count)) = zeros {
            st.insert_ready(self, first, Run::Zero(count));
        }
        jobs
    }

    /// Runs on the pool: hashes a job and records its digests.
    fn complete(&self, job: Job) {
        let digests = self.hash_job(&job);
        let mut st = self.lock();
        st.pending -= job.bytes;
        st.jobs -= 1;
        st.insert_ready(self, job.first, Run::Digests(digests));
        drop(st);
        self.changed.notify_all();
    }

    fn hash_job(&self, job: &Job) -> Vec<u8> {
        let alg = self.spec.algorithm;
        let mut out = Vec::with_capacity(job.blocks.len() * alg.digest_len());
        for block in &job.blocks {
            let all_zero = block.pieces.iter().all(|p| match p {
                Piece::Data(b) => is_zero(b),
                Piece::Zero(_) => true,
            });
            if all_zero && block.len == self.spec.block_size {
                out.extend_from_slice(&self.zero_digest);
                continue;
            }
            let mut h = alg.start();
            for p in &block.pieces {
                match p {
                    Piece::Data(b) => h.update(b),
                    Piece::Zero(n) => feed_zeros(*n, |z| h.update(z)),
                }
            }
            out.extend_from_slice(&h.finish());
        }
        out
    }
}

impl State {
    fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Length of block `idx`: a full block unless it is the short last one of a known size.
    fn block_len(&self, spec: &Spec, idx: u64) -> u64 {
        let start = idx * spec.block_size;
        match self.size {
            Some(size) => spec.block_size.min(size.saturating_sub(start)),
            None => spec.block_size,
        }
    }

    /// True if block `idx` already has its digest (fed to `outer` or waiting in `ready`).
    fn claimed(&self, idx: u64) -> bool {
        idx < self.next
            || self
                .ready
                .range(..=idx)
                .next_back()
                .is_some_and(|(first, run)| first + run.count(self.dlen) > idx)
    }

    /// Records a run of digests starting at block `first`, then feeds every run that is now
    /// next in order to the outer hash.
    fn insert_ready(&mut self, shared: &Shared, first: u64, run: Run) {
        let dlen = self.dlen;
        let count = run.count(dlen);
        let before = self
            .ready
            .range(..first)
            .next_back()
            .is_some_and(|(f, r)| f + r.count(dlen) > first);
        let after = self
            .ready
            .range(first..)
            .next()
            .is_some_and(|(f, _)| *f < first + count);
        // A piece of a block whose whole digest is now known was fed twice too.
        let pieces = self.partial.range(first..first + count).next().is_some();
        if first < self.next || before || after || pieces {
            self.fail(Error::Overlap {
                offset: first * shared.spec.block_size,
                length: count * shared.spec.block_size,
            });
            return;
        }
        self.ready.insert(first, run);
        while let Some(entry) = self.ready.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            let run = entry.remove();
            let Some(outer) = self.outer.as_mut() else {
                return;
            };
            match run {
                Run::Digests(d) => {
                    outer.update(&d);
                    self.next += (d.len() / dlen) as u64;
                }
                Run::Zero(n) => {
                    feed_repeated(outer, &shared.zero_digest, n);
                    self.next += n;
                }
            }
        }
    }
}

impl Run {
    fn count(&self, digest_len: usize) -> u64 {
        match self {
            Run::Digests(d) => (d.len() / digest_len) as u64,
            Run::Zero(n) => *n,
        }
    }
}

fn job_of(idx: u64, len: u64, mut p: Partial) -> Job {
    p.pieces.sort_by_key(|(off, _)| *off);
    Job {
        first: idx,
        blocks: vec![Block {
            len,
            pieces: p.pieces.into_iter().map(|(_, piece)| piece).collect(),
        }],
        bytes: len,
    }
}

/// Feeds `digest` `count` times, in large updates: a terabyte of holes at 64 KiB blocks is 16
/// million digests, so per-call overhead matters.
fn feed_repeated(outer: &mut HashState, digest: &[u8], count: u64) {
    const BATCH: usize = 2048;
    let batch = digest.repeat(BATCH);
    let mut left = count;
    while left > 0 {
        let n = left.min(BATCH as u64) as usize;
        outer.update(&batch[..n * digest.len()]);
        left -= n as u64;
    }
}

/// H(block_size zero bytes), computed once per (algorithm, block size) in the process: a
/// server answering many checksum requests should not rehash 16 MiB of zeroes for each.
fn zero_digest(alg: Algorithm, block_size: u64) -> Arc<[u8]> {
    type Cache = Mutex<HashMap<(Algorithm, u64), Arc<[u8]>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(d) = cache.lock().expect("cache lock").get(&(alg, block_size)) {
        return d.clone();
    }
    let mut h = alg.start();
    feed_zeros(block_size, |z| h.update(z));
    let d: Arc<[u8]> = h.finish().into();
    cache
        .lock()
        .expect("cache lock")
        .insert((alg, block_size), d.clone());
    d
}
