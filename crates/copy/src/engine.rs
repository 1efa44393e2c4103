//! The scheduler: shared work cursor, per-worker pipelines, first-error-stops, final flush.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use disk::{DiskError, Endpoint, Extent, StreamReader, StreamWriter};
use futures_util::StreamExt;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};

use crate::plan::{Step, needs_zeroing, plan};
use crate::sparse;
use crate::{
    Cancel, CopyError, CopyOptions, DestinationZero, Job, Progress, SourceObserver, Stats,
};

/// Source offset not yet known to be past the end (streams learn their size by reading).
const UNKNOWN_END: u64 = u64::MAX;

struct Shared {
    src: Arc<dyn Endpoint>,
    dst: Arc<dyn Endpoint>,
    observer: Option<Arc<dyn SourceObserver>>,
    opts: CopyOptions,
    progress: Arc<Progress>,
    cancel: Cancel,
    /// Next unassigned source offset.
    cursor: AtomicU64,
    /// End of the source: its size, or where a stream ended once found.
    end: AtomicU64,
    work_size: u64,
    /// Destination ranges need no zeroing at all.
    dst_zero: bool,
    /// Ask the destination's extents which zero ranges need work.
    dst_extents: bool,
    first_error: Mutex<Option<CopyError>>,
    read: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
    skipped: AtomicU64,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.cancel.is_cancelled()
            || self
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }

    fn fail(&self, err: CopyError) {
        {
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(err);
            }
        }
        self.cancel.wake();
    }

    fn next_range(&self) -> Option<(u64, u64)> {
        let start = self.cursor.fetch_add(self.work_size, Ordering::Relaxed);
        let end = self.end.load(Ordering::Relaxed);
        if start >= end {
            return None;
        }
        Some((start, start.saturating_add(self.work_size).min(end)))
    }
}

/// Copies `job.src` to `job.dst`. `progress` is advanced as work completes; `cancel` stops it.
pub async fn copy(
    job: Job,
    opts: CopyOptions,
    progress: Arc<Progress>,
    cancel: Cancel,
) -> Result<Stats, CopyError> {
    let started = Instant::now();
    let (src, dst, observer) = (job.src, job.dst, job.observer);
    let dst_caps = dst.caps().clone();
    if opts.incremental && !src.caps().dirty {
        return Err(CopyError::Broken(format!(
            "{}: an incremental copy needs the source's dirty extents (an NBD dirty bitmap, \
             or an imageio ticket with dirty extents)",
            src.name()
        )));
    }
    if dst_caps.read_only {
        return Err(CopyError::ReadOnly(dst.name().to_string()));
    }
    let src_size = src.caps().size;
    if let (Some(s), Some(d)) = (src_size, dst_caps.size)
        && s > d
    {
        return Err(CopyError::DestinationTooSmall { src: s, dst: d });
    }
    // Streams (and endpoints that need strict order) get one worker; its pipeline still keeps
    // many requests queued.
    let sequential = src.caps().sequential || dst_caps.sequential;
    let workers = if sequential { 1 } else { opts.workers.max(1) };
    let work_size = match src_size {
        // Small images: ranges small enough that every worker gets some.
        Some(size) => {
            let share = size.div_ceil(workers as u64 * 4);
            let unit = opts.src_request.max(1);
            share
                .div_ceil(unit)
                .max(1)
                .saturating_mul(unit)
                .min(opts.work_size.max(unit))
        }
        None => opts.work_size,
    };

    let (dst_zero, how) = if opts.destination_is_zero {
        (true, DestinationZero::Asserted)
    } else if opts.allocated || dst_caps.sequential {
        (false, DestinationZero::Unknown)
    } else if opts.incremental {
        // The destination holds the previous copy: nothing about it may be assumed, and it
        // must never be zeroed as a whole.
        if dst_caps.extents {
            (false, DestinationZero::Extents)
        } else {
            (false, DestinationZero::Unknown)
        }
    } else if dst_caps.known_zero {
        (true, DestinationZero::Known)
    } else if dst_caps.extents {
        // The destination can say where it already reads as zero: zero only the rest, rather
        // than zeroing everything up front (which may allocate on servers that cannot punch).
        (false, DestinationZero::Extents)
    } else if let Some(size) = src_size.filter(|s| *s > 0 && dst_caps.fast_zero) {
        if dst.fast_zero(0, size).await? {
            (true, DestinationZero::FastZeroed)
        } else {
            (false, DestinationZero::Unknown)
        }
    } else {
        (false, DestinationZero::Unknown)
    };
    tracing::debug!(?how, workers, work_size, "copy starts");

    let shared = Arc::new(Shared {
        src,
        dst,
        observer,
        opts,
        progress,
        cancel,
        cursor: AtomicU64::new(0),
        end: AtomicU64::new(src_size.unwrap_or(UNKNOWN_END)),
        work_size,
        dst_zero,
        dst_extents: how == DestinationZero::Extents,
        first_error: Mutex::new(None),
        read: AtomicU64::new(0),
        written: AtomicU64::new(0),
        zeroed: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let shared = shared.clone();
        tasks.spawn(async move { Worker::new(&shared).run().await });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            shared.fail(CopyError::Broken(format!("a copy worker failed: {e}")));
        }
    }
    if let Some(err) = shared
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(err);
    }
    if shared.cancel.is_cancelled() {
        return Err(CopyError::Cancelled);
    }
    let size = shared.end.load(Ordering::Relaxed);
    if src_size.is_none() {
        shared.dst.set_size(size).await?;
        shared.progress.set_size(size.max(1));
    }
    if shared.opts.flush {
        shared.dst.flush().await?;
    }
    Ok(Stats {
        size,
        bytes_read: shared.read.load(Ordering::Relaxed),
        bytes_written: shared.written.load(Ordering::Relaxed),
        bytes_zeroed: shared.zeroed.load(Ordering::Relaxed),
        bytes_skipped: shared.skipped.load(Ordering::Relaxed),
        workers,
        destination_zero: how,
        elapsed: started.elapsed(),
    })
}

type ReadFut<'a> = Pin<Box<dyn Future<Output = (u64, u64, Result<Bytes, DiskError>)> + Send + 'a>>;
/// A destination operation; resolves to the budget bytes it releases.
type WriteFut<'a> = Pin<Box<dyn Future<Output = Result<u64, DiskError>> + Send + 'a>>;

/// One pipeline: reads in FIFO order, writes and zeroes unordered, within the worker's budget.
struct Worker<'a> {
    shared: &'a Shared,
    src: &'a dyn Endpoint,
    dst: &'a dyn Endpoint,
    reads: FuturesOrdered<ReadFut<'a>>,
    writes: FuturesUnordered<WriteFut<'a>>,
    ops: usize,
    bytes: u64,
    /// Destination extents of the current work range, when asked for.
    dst_map: Vec<Extent>,
    /// Streams runs of data to the destination as one request each (HTTP PUT).
    writer: Option<Box<dyn StreamWriter>>,
    /// Completed reads (cut into data and zero segments) waiting for the writer: held until
    /// a run of data long enough for one request has gathered, or a zero gap or a break in
    /// contiguity ends the run. Zero blocks are thus never sent inside a request, whose
    /// length must be announced when it starts.
    pending: VecDeque<Segment>,
    /// A run this long is sent without waiting for its end.
    commit: u64,
    /// Reads each data run of the source as one request (HTTP ranged GET).
    reader: Option<Box<dyn StreamReader>>,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Arc<Shared>) -> Self {
        Worker {
            shared,
            src: &*shared.src,
            dst: &*shared.dst,
            reads: FuturesOrdered::new(),
            writes: FuturesUnordered::new(),
            ops: 0,
            bytes: 0,
            dst_map: Vec::new(),
            // Streams of unknown length (pipes) cannot announce a run's length up front.
            writer: shared
                .src
                .caps()
                .size
                .and_then(|_| shared.dst.stream_writer()),
            pending: VecDeque::new(),
            commit: {
                let opts = &shared.opts;
                let budget = opts
                    .queue_bytes
                    .min(opts.requests.max(1) as u64 * opts.src_request.max(1));
                // Half the budget at most, so the next run's reads can gather meanwhile.
                STREAM_COMMIT.min(budget / 2).max(opts.src_request.max(1))
            },
            reader: shared.src.stream_reader(),
        }
    }

    async fn run(mut self) {
        if let Err(e) = self.copy_ranges().await {
            self.shared.fail(e);
        }
        if self.shared.stopped() {
            // An unfinished streamed run is abandoned: its request fails instead of waiting
            // for data that will not come.
            self.writer = None;
            self.reader = None;
            for seg in self.pending.drain(..) {
                if seg.data.is_some() {
                    self.bytes -= seg.len;
                }
            }
        }
        // Drain: writes and zeroes in flight finish (or fail) before the worker ends, so the
        // destination is left in a known state. Reads still in flight after a stop would only
        // feed writes nobody wants: they are dropped (their replies discarded), so stopping is
        // prompt.
        loop {
            if self.shared.stopped() && !self.reads.is_empty() {
                self.ops -= self.reads.len();
                self.reads = FuturesOrdered::new();
            }
            if self.ops == 0 {
                break;
            }
            if let Err(e) = self.complete_one().await {
                self.shared.fail(e);
            }
        }
    }

    async fn copy_ranges(&mut self) -> Result<(), CopyError> {
        let opts = &self.shared.opts;
        while let Some((start, end)) = self.shared.next_range() {
            if self.shared.stopped() {
                return Ok(());
            }
            if !opts.incremental {
                self.copy_range(start, end).await?;
                continue;
            }
            // Incremental: only what changed since the checkpoint is copied; clean ranges are
            // left as they are on the destination.
            let src = self.src;
            let changes = self.drive(src.dirty(start, end - start)).await??;
            let extents: Vec<Extent> = changes.iter().map(|(e, _)| *e).collect();
            check_coverage(self.src.name(), &extents, start, end)?;
            let mut dirty: Vec<(u64, u64)> = Vec::new();
            for (e, is_dirty) in changes {
                let (s, t) = (e.offset.max(start), e.end().min(end));
                if s >= t {
                    continue;
                }
                if !is_dirty {
                    self.shared.skipped.fetch_add(t - s, Ordering::Relaxed);
                    self.shared.progress.add(t - s);
                    continue;
                }
                match dirty.last_mut() {
                    Some(last) if last.1 == s => last.1 = t,
                    _ => dirty.push((s, t)),
                }
            }
            for (s, t) in dirty {
                if self.shared.stopped() {
                    return Ok(());
                }
                self.copy_range(s, t).await?;
            }
        }
        Ok(())
    }

    /// Copies [start, end): plans it from the source's extents and issues its requests.
    async fn copy_range(&mut self, start: u64, end: u64) -> Result<(), CopyError> {
        let opts = &self.shared.opts;
        let len = end - start;
        let extents = if opts.extents && self.src.caps().extents {
            let src = self.src;
            let ext = self.drive(src.extents(start, len)).await??;
            check_coverage(self.src.name(), &ext, start, end)?;
            ext
        } else {
            vec![Extent::data(start, len)]
        };
        if self.shared.dst_extents {
            // Zero blocks found in reads still in flight are checked against the map of
            // their own range: let them land before the map is replaced.
            while !self.reads.is_empty() {
                if self.shared.stopped() {
                    return Ok(());
                }
                self.complete_one().await?;
            }
            self.form_requests(true);
            let dst = self.dst;
            self.dst_map = self.drive(dst.extents(start, len)).await??;
        }
        let zero_align = self.dst.caps().min_block.max(1);
        let src_depth = self.src.caps().queue_depth.max(1);
        let dst_depth = self.dst.caps().queue_depth.max(1);
        let steps = plan(&extents, start, end, opts.src_request.max(1), zero_align);
        let mut read_runs: VecDeque<(u64, u64)> = if self.reader.is_some() {
            data_runs(&steps).into()
        } else {
            VecDeque::new()
        };
        for step in steps {
            if self.shared.stopped() {
                return Ok(());
            }
            let need = match step {
                Step::Read { len, .. } => len,
                Step::Zero { .. } => 0,
            };
            while self.ops > 0
                && (self.ops >= opts.requests.max(1)
                    || self.bytes + need > opts.queue_bytes
                    || self.reads.len() >= src_depth
                    || self.writes.len() >= dst_depth)
            {
                if self.shared.stopped() {
                    return Ok(());
                }
                self.complete_one().await?;
            }
            match step {
                Step::Read { offset, len } => {
                    if offset >= self.shared.end.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(reader) = self.reader.as_mut() {
                        if read_runs.front().is_some_and(|r| r.0 == offset) {
                            let (run_start, run_len) = read_runs.pop_front().expect("front");
                            reader.begin(run_start, run_len);
                        }
                        let piece = reader.read(len);
                        self.reads
                            .push_back(Box::pin(async move { (offset, len, piece.await) }));
                    } else {
                        let src = self.src;
                        self.reads.push_back(Box::pin(async move {
                            (offset, len, src.read(offset, len).await)
                        }));
                    }
                    self.ops += 1;
                    self.bytes += len;
                }
                Step::Zero { offset, len } => {
                    if let Some(observer) = &self.shared.observer {
                        observer.zero(offset, len);
                    }
                    self.zero(offset, len)
                }
            }
        }
        Ok(())
    }

    /// Awaits `fut` while still completing the pipeline's requests. Requests queued on an
    /// endpoint hold its slots once granted (semaphores are fair), so awaiting another call on
    /// the same endpoint without polling them could wait forever.
    async fn drive<T>(
        &mut self,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, CopyError> {
        tokio::pin!(fut);
        if self.shared.opts.requests <= 1 {
            // One request at a time (--synchronous): finish what is queued first.
            while self.ops > 0 && !self.shared.stopped() {
                self.complete_one().await?;
            }
        }
        loop {
            if self.ops == 0 {
                return Ok(fut.await);
            }
            tokio::select! {
                biased;
                out = &mut fut => return Ok(out),
                done = self.complete_one() => done?,
            }
        }
    }

    /// Waits for the next completion: the oldest read (FIFO) or any write.
    async fn complete_one(&mut self) -> Result<(), CopyError> {
        // Registered before the check, so a stop between the check and the wait still wakes us.
        let woken = self.shared.cancel.woken();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let stopping = self.shared.stopped();
        tokio::select! {
            // A stop wakes the worker (unless already stopping, when it drains writes).
            _ = &mut woken, if !stopping => Ok(()),
            Some((offset, len, result)) = self.reads.next(), if !self.reads.is_empty() => {
                self.ops -= 1;
                match result {
                    Ok(data) => self.dispatch(offset, len, data),
                    Err(e) => {
                        self.bytes -= len;
                        Err(e.into())
                    }
                }
            }
            Some(result) = self.writes.next(), if !self.writes.is_empty() => {
                self.ops -= 1;
                let released = result?;
                self.bytes -= released;
                Ok(())
            }
        }
    }

    /// Turns a completed read into writes and zeroes.
    fn dispatch(&mut self, offset: u64, len: u64, data: Bytes) -> Result<(), CopyError> {
        if self.shared.stopped() {
            self.bytes -= len;
            return Ok(());
        }
        let got = data.len() as u64;
        self.shared.read.fetch_add(got, Ordering::Relaxed);
        if got < len {
            if self.src.caps().size.is_some() {
                self.bytes -= len;
                return Err(DiskError::new(
                    self.src.name(),
                    disk::Op::Read,
                    format!("short read: {got} of {len} bytes"),
                )
                .at(offset, len)
                .into());
            }
            // A stream ended here.
            self.shared.end.fetch_min(offset + got, Ordering::Relaxed);
        }
        // Budget bytes of the read beyond what arrived are released now.
        self.bytes -= len - got;
        if let Some(observer) = &self.shared.observer {
            observer.data(offset, &data);
        }
        if self.writer.is_some() {
            self.gather(offset, data);
            return Ok(());
        }
        let opts = &self.shared.opts;
        let pieces = if opts.sparse > 0 && !opts.allocated {
            sparse::split(&data, offset, opts.sparse as usize)
        } else {
            vec![sparse::Piece {
                start: 0,
                len: data.len(),
                zero: false,
            }]
        };
        for piece in pieces {
            let at = offset + piece.start as u64;
            if piece.zero {
                self.bytes -= piece.len as u64;
                self.zero(at, piece.len as u64);
                continue;
            }
            let chunk = data.slice(piece.start..piece.start + piece.len);
            let step = opts.dst_request.max(1) as usize;
            let mut pos = 0;
            while pos < chunk.len() {
                let n = step.min(chunk.len() - pos);
                let slice = chunk.slice(pos..pos + n);
                let (dst, shared) = (self.dst, self.shared);
                let w_at = at + pos as u64;
                self.writes.push(Box::pin(async move {
                    dst.write(w_at, slice).await?;
                    shared.written.fetch_add(n as u64, Ordering::Relaxed);
                    shared.progress.add(n as u64);
                    Ok(n as u64)
                }));
                self.ops += 1;
                pos += n;
            }
        }
        Ok(())
    }

    /// Adds a completed read to the streaming writer's pending segments, then sends what is
    /// ready. Everything is sent once no read is left that could extend a run.
    fn gather(&mut self, offset: u64, data: Bytes) {
        let opts = &self.shared.opts;
        let block = if opts.sparse > 0 && !opts.allocated {
            opts.sparse.max(STREAM_ZERO_BLOCK) as usize
        } else {
            0
        };
        for piece in sparse::split(&data, offset, block) {
            let at = offset + piece.start as u64;
            let len = piece.len as u64;
            if piece.zero {
                // Zeroes need no memory: their budget is released now, and neighbouring zero
                // blocks (also across reads) become one zero request.
                self.bytes -= len;
                if let Some(last) = self.pending.back_mut()
                    && last.data.is_none()
                    && last.offset + last.len == at
                {
                    last.len += len;
                    continue;
                }
            }
            self.pending.push_back(Segment {
                offset: at,
                len,
                data: (!piece.zero).then(|| data.slice(piece.start..piece.start + piece.len)),
            });
        }
        let flush = self.reads.is_empty();
        self.form_requests(flush);
    }

    /// Sends pending segments: zeroes as zero requests, and each run of contiguous data as
    /// one streamed request once it has ended (a zero gap, a break) or reached the commit
    /// size; with `flush`, every run now.
    fn form_requests(&mut self, flush: bool) {
        loop {
            while self.pending.front().is_some_and(|seg| seg.data.is_none()) {
                // A zero run at the end may still grow with the next read.
                if self.pending.len() == 1 && !flush {
                    return;
                }
                let seg = self.pending.pop_front().expect("front");
                self.zero(seg.offset, seg.len);
            }
            let Some(first) = self.pending.front() else {
                return;
            };
            let start = first.offset;
            let mut end = start;
            let mut count = 0;
            let mut ended = false;
            let last = self.pending.len() - 1;
            for (i, seg) in self.pending.iter().enumerate() {
                if seg.offset != end {
                    ended = true;
                    break;
                }
                if seg.data.is_none() {
                    // A long zero run ends the request; a short one between data is sent as
                    // zero bytes, cheaper than two more requests. One at the end may still
                    // grow: wait for the next read unless flushing.
                    if seg.len >= STREAM_MIN_GAP || (i == last && flush) {
                        ended = true;
                        break;
                    }
                    if i == last {
                        break;
                    }
                }
                end += seg.len;
                count += 1;
            }
            if !(ended || flush || end - start >= self.commit) {
                return;
            }
            let writer = self.writer.as_mut().expect("streaming writer");
            writer.begin(start, end - start);
            for seg in self.pending.drain(..count) {
                // Zero bytes come from shared memory: they hold no budget.
                let (data, budget) = match seg.data {
                    Some(data) => (data, seg.len),
                    None => (disk::endpoint::zero_bytes(seg.len as usize), 0),
                };
                let piece = writer.push(data);
                let (n, shared) = (seg.len, self.shared);
                self.writes.push(Box::pin(async move {
                    piece.await?;
                    shared.written.fetch_add(n, Ordering::Relaxed);
                    shared.progress.add(n);
                    Ok(budget)
                }));
                self.ops += 1;
            }
        }
    }

    /// Zeroes [offset, offset+len) on the destination unless it already reads as zero.
    fn zero(&mut self, offset: u64, len: u64) {
        let shared = self.shared;
        if shared.dst_zero {
            shared.skipped.fetch_add(len, Ordering::Relaxed);
            shared.progress.add(len);
            return;
        }
        let parts = if shared.dst_extents {
            needs_zeroing(offset, len, &self.dst_map)
        } else {
            vec![(offset, len)]
        };
        let work: u64 = parts.iter().map(|(_, l)| l).sum();
        shared.skipped.fetch_add(len - work, Ordering::Relaxed);
        shared.progress.add(len - work);
        let allocate = shared.opts.allocated;
        for (at, n) in parts {
            let dst = self.dst;
            self.writes.push(Box::pin(async move {
                dst.zero(at, n, allocate).await?;
                shared.zeroed.fetch_add(n, Ordering::Relaxed);
                shared.progress.add(n);
                Ok(0)
            }));
            self.ops += 1;
        }
    }
}

/// A streamed run is sent once this much of it has been read, without waiting for its end.
const STREAM_COMMIT: u64 = 8 << 20;
/// Zero blocks inside streamed data are found at this granularity: smaller zero blocks stay
/// in the data, since every gap ends a request.
const STREAM_ZERO_BLOCK: u64 = 64 << 10;

/// Zero runs inside streamed data shorter than this are sent as zero bytes: a shorter gap would
/// cost two requests (a zero request and a new PUT) to save less than it costs to send.
const STREAM_MIN_GAP: u64 = 256 << 10;

/// A piece of a completed read waiting for the streaming writer; `data` is `None` for zeroes.
struct Segment {
    offset: u64,
    len: u64,
    data: Option<Bytes>,
}

/// Contiguous runs of reads in a plan: each is read as one request where sources stream.
fn data_runs(steps: &[Step]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut joinable = false;
    for step in steps {
        match *step {
            Step::Read { offset, len } => match runs.last_mut() {
                Some(run) if joinable && run.0 + run.1 == offset => run.1 += len,
                _ => {
                    runs.push((offset, len));
                    joinable = true;
                }
            },
            Step::Zero { .. } => joinable = false,
        }
    }
    runs
}

/// Extents must cover the work range exactly; a server that says less is broken.
fn check_coverage(name: &str, extents: &[Extent], start: u64, end: u64) -> Result<(), CopyError> {
    let mut pos = start;
    for e in extents {
        if e.offset != pos || e.length == 0 {
            break;
        }
        pos = e.end();
    }
    if pos < end {
        return Err(CopyError::Broken(format!(
            "{name}: extents cover only [{start}, {pos}) of [{start}, {end}); \
             try --no-extents as a workaround"
        )));
    }
    Ok(())
}
