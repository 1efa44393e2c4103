//! The scheduler: shared work cursor, per-worker pipelines, first-error-stops, final flush.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use disk::sink::next_done;
use disk::{
    Budget, DiskError, Endpoint, ErrorKind, Extent, Permit, Segment, Sink, SinkOptions,
    StreamReader,
};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;

use crate::journal::RangeSet;
use crate::plan::{Step, needs_zeroing, plan};
use crate::sparse;
use crate::{
    Cancel, CopyError, CopyOptions, DestinationZero, Job, Progress, Resume, SourceObserver, Stats,
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
    /// Source reads and destination requests (writes and zeroes) completed.
    read_requests: AtomicU64,
    write_requests: AtomicU64,
    /// Resuming: what an earlier run completed (not copied again), and where progress goes.
    resume: Option<Resume>,
    /// Ranges complete on the destination (acknowledged, or needing no work), for the journal.
    completed: Mutex<RangeSet>,
    /// Bytes added to `completed` so far.
    completed_bytes: AtomicU64,
    /// The workers are done: the checkpointer stops.
    finished: AtomicBool,
    /// `--bwlimit`: data read from the source waits for it before each read is issued.
    limit: Option<Arc<bwlimit::Limiter>>,
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

    /// [start, end) holds what the source holds (for the journal).
    fn complete(&self, start: u64, end: u64) {
        if self.resume.is_none() || start >= end {
            return;
        }
        self.completed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(start, end);
        self.completed_bytes
            .fetch_add(end - start, Ordering::Relaxed);
    }

    /// Makes what is complete durable (a destination flush), then records it in the journal.
    /// Ranges completed during the flush wait for the next checkpoint.
    async fn checkpoint(&self) -> Result<(), CopyError> {
        let Some(resume) = &self.resume else {
            return Ok(());
        };
        let snapshot = self
            .completed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.dst.flush().await?;
        resume.journal.write(&snapshot)?;
        Ok(())
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
    let (src, dst, observer, resume, limit) =
        (job.src, job.dst, job.observer, job.resume, job.limit);
    // Resuming into what an earlier run wrote: the destination holds data, like the previous
    // copy of an incremental one.
    let resumed = resume.as_ref().is_some_and(|r| !r.done.is_empty());
    let dst_caps = dst.caps().clone();
    if opts.incremental && !src.caps().dirty {
        return Err(CopyError::NoDirtyExtents(src.name().to_string()));
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
    } else if opts.incremental || resumed {
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
        read_requests: AtomicU64::new(0),
        write_requests: AtomicU64::new(0),
        completed: Mutex::new(resume.as_ref().map(|r| r.done.clone()).unwrap_or_default()),
        completed_bytes: AtomicU64::new(0),
        resume,
        finished: AtomicBool::new(false),
        limit,
    });
    let checkpointer = shared.resume.is_some().then(|| {
        let shared = shared.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            checkpoints(&shared).await
        }))
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let shared = shared.clone();
        // Workers log in the copy's span (its endpoints), like the caller.
        tasks.spawn(tracing::Instrument::in_current_span(async move {
            Worker::new(&shared).run().await
        }));
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            shared.fail(CopyError::Worker(e.to_string()));
        }
    }
    shared.finished.store(true, Ordering::Relaxed);
    if let Some(task) = checkpointer {
        let _ = task.await;
    }
    if shared.resume.is_some() && shared.stopped() {
        // Interrupted or failed: what completed is kept for the next run, if the destination
        // can still make it durable.
        if let Err(e) = shared.checkpoint().await {
            tracing::warn!("the last checkpoint of the journal failed: {e}");
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
    if shared.opts.flush || shared.resume.is_some() {
        shared.progress.set_phase(crate::progress::Phase::Flush);
        shared.dst.flush().await?;
    }
    if let Some(resume) = &shared.resume {
        resume.journal.finish()?;
    }
    Ok(Stats {
        size,
        bytes_read: shared.read.load(Ordering::Relaxed),
        bytes_written: shared.written.load(Ordering::Relaxed),
        bytes_zeroed: shared.zeroed.load(Ordering::Relaxed),
        bytes_skipped: shared.skipped.load(Ordering::Relaxed),
        read_requests: shared.read_requests.load(Ordering::Relaxed),
        write_requests: shared.write_requests.load(Ordering::Relaxed),
        workers,
        destination_zero: how,
        elapsed: started.elapsed(),
    })
}

/// A step of a work range in the pipeline's FIFO: a read, or a zero range that passes through
/// in its turn so the sink sees every segment in offset order.
struct Landed {
    offset: u64,
    len: u64,
    permit: Permit,
    /// `Ok(None)` for a zero step.
    got: Result<Option<Bytes>, DiskError>,
}

type StepFut<'a> = Pin<Box<dyn Future<Output = Landed> + Send + 'a>>;

/// A run of zeroes not yet handed to the sink: neighbouring zero blocks (also across reads)
/// become one segment.
struct ZeroRun {
    offset: u64,
    len: u64,
    permit: Permit,
}

/// One pipeline: steps in FIFO order, their segments to the sink, within the pipeline's budget.
struct Worker<'a> {
    shared: &'a Shared,
    src: &'a dyn Endpoint,
    dst: &'a dyn Endpoint,
    budget: Budget,
    steps: FuturesOrdered<StepFut<'a>>,
    sink: Box<dyn Sink + 'a>,
    zero_run: Option<ZeroRun>,
    /// Destination extents of the current work range, when asked for.
    dst_map: Vec<Extent>,
    /// Reads each data run of the source as one request (HTTP ranged GET).
    reader: Option<Box<dyn StreamReader>>,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Arc<Shared>) -> Self {
        let opts = &shared.opts;
        let budget = Budget::new(opts.queue_bytes.max(opts.src_request), opts.requests);
        let window = budget
            .bytes_limit()
            .min(opts.requests.max(1) as u64 * opts.src_request.max(1));
        let sink = shared.dst.sink(&SinkOptions {
            request: opts.dst_request.max(1),
            allocate: opts.allocated,
            window,
        });
        Worker {
            shared,
            src: &*shared.src,
            dst: &*shared.dst,
            budget,
            steps: FuturesOrdered::new(),
            sink,
            zero_run: None,
            dst_map: Vec::new(),
            reader: shared.src.stream_reader(),
        }
    }

    /// Work queued, held back or in flight.
    fn busy(&self) -> bool {
        !self.steps.is_empty() || !self.sink.is_empty() || self.zero_run.is_some()
    }

    async fn run(mut self) {
        if let Err(e) = self.copy_ranges().await {
            self.shared.fail(e);
        }
        // Drain: writes and zeroes in flight finish (or fail) before the worker ends, so the
        // destination is left in a known state. After a stop, steps still in flight would only
        // feed writes nobody wants: they are dropped (their replies discarded), so stopping is
        // prompt, and the sink drops what it held back.
        loop {
            if self.shared.stopped() {
                self.steps = FuturesOrdered::new();
                self.zero_run = None;
                self.reader = None;
                self.sink.cancel();
            }
            if !self.busy() {
                break;
            }
            if let Err(e) = self.complete_one().await {
                self.shared.fail(e);
            }
        }
    }

    async fn copy_ranges(&mut self) -> Result<(), CopyError> {
        let shared = self.shared;
        while let Some((start, end)) = shared.next_range() {
            // A resumed copy does only what the journal does not record as done.
            let todo = match &shared.resume {
                Some(resume) => {
                    let gaps = resume.done.gaps(start, end);
                    let left: u64 = gaps.iter().map(|(s, e)| e - s).sum();
                    shared
                        .skipped
                        .fetch_add(end - start - left, Ordering::Relaxed);
                    shared.progress.add(end - start - left);
                    gaps
                }
                None => vec![(start, end)],
            };
            for (s, t) in todo {
                if shared.stopped() {
                    return Ok(());
                }
                if shared.opts.incremental {
                    self.copy_dirty(s, t).await?;
                } else {
                    self.copy_range(s, t).await?;
                }
            }
        }
        Ok(())
    }

    /// Incremental: only what changed since the checkpoint is copied; clean ranges are left as
    /// they are on the destination.
    async fn copy_dirty(&mut self, start: u64, end: u64) -> Result<(), CopyError> {
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
                self.shared.complete(s, t);
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
            // Zero blocks found in steps still in flight are checked against the map of
            // their own range: let them land before the map is replaced.
            while !self.steps.is_empty() {
                if self.shared.stopped() {
                    return Ok(());
                }
                self.complete_one().await?;
            }
            self.flush_zero();
            // A stream's work range may reach past the destination's end; data there is
            // refused when it arrives, so only the destination's own range is asked about.
            let dst_len = self
                .dst
                .caps()
                .size
                .map_or(len, |size| size.saturating_sub(start).min(len));
            let dst = self.dst;
            self.dst_map = if dst_len == 0 {
                Vec::new()
            } else {
                self.drive(dst.extents(start, dst_len)).await??
            };
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
            let need = match step {
                Step::Read { len, .. } => len,
                Step::Zero { .. } => 0,
            };
            let permit = loop {
                if self.shared.stopped() {
                    return Ok(());
                }
                if self.steps.len() < src_depth
                    && self.sink.in_flight() < dst_depth
                    && let Some(permit) = self.budget.try_take(need)
                {
                    break permit;
                }
                self.complete_one().await?;
            };
            match step {
                Step::Read { offset, len } => {
                    if offset >= self.shared.end.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(limit) = self.shared.limit.clone() {
                        // Only data read counts: holes and zero extents are never read. A
                        // stop does not wait for a slow limit.
                        let cancel = self.shared.cancel.clone();
                        self.drive(async move {
                            tokio::select! {
                                _ = limit.acquire(len) => {}
                                _ = cancel.woken() => {}
                            }
                        })
                        .await?;
                        if self.shared.stopped() {
                            return Ok(());
                        }
                    }
                    let read = match self.reader.as_mut() {
                        Some(reader) => {
                            if read_runs.front().is_some_and(|r| r.0 == offset) {
                                let (run_start, run_len) = read_runs.pop_front().expect("front");
                                reader.begin(run_start, run_len);
                            }
                            reader.read(len)
                        }
                        None => self.src.read(offset, len),
                    };
                    self.steps.push_back(Box::pin(async move {
                        let got = read.await.map(Some);
                        Landed {
                            offset,
                            len,
                            permit,
                            got,
                        }
                    }));
                }
                Step::Zero { offset, len } => {
                    if let Some(observer) = &self.shared.observer {
                        observer.zero(offset, len);
                    }
                    self.steps.push_back(Box::pin(std::future::ready(Landed {
                        offset,
                        len,
                        permit,
                        got: Ok(None),
                    })));
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
            while self.busy() && !self.shared.stopped() {
                self.complete_one().await?;
            }
        }
        loop {
            if !self.busy() {
                return Ok(fut.await);
            }
            tokio::select! {
                biased;
                out = &mut fut => return Ok(out),
                done = self.complete_one() => done?,
            }
        }
    }

    /// Waits for the next completion: the oldest step (FIFO) or any destination request.
    async fn complete_one(&mut self) -> Result<(), CopyError> {
        if self.steps.is_empty() {
            // Nothing more will arrive until something completes: what is held back goes now.
            if self.shared.stopped() {
                self.zero_run = None;
                self.sink.cancel();
            } else {
                self.flush_zero();
                self.sink.idle();
            }
            if self.sink.is_empty() {
                // The held-back work dissolved (a zero run the destination already holds):
                // there is nothing to wait for.
                return Ok(());
            }
        }
        // Registered before the check, so a stop between the check and the wait still wakes us.
        let woken = self.shared.cancel.woken();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let stopping = self.shared.stopped();
        let sink_busy = !self.sink.is_empty();
        tokio::select! {
            // A stop wakes the worker (unless already stopping, when it drains writes).
            _ = &mut woken, if !stopping => Ok(()),
            Some(landed) = self.steps.next(), if !self.steps.is_empty() => self.land(landed),
            Some(done) = next_done(&mut *self.sink), if sink_busy => {
                let done = done?;
                let shared = self.shared;
                let (start, end) = done.range();
                shared.complete(start, end);
                shared.written.fetch_add(done.written, Ordering::Relaxed);
                shared.zeroed.fetch_add(done.zeroed, Ordering::Relaxed);
                shared.write_requests.fetch_add(1, Ordering::Relaxed);
                shared.progress.add(done.written + done.zeroed);
                Ok(())
            }
            else => Ok(()),
        }
    }

    /// Turns a landed step into segments for the sink.
    fn land(&mut self, landed: Landed) -> Result<(), CopyError> {
        let Landed {
            offset,
            len,
            mut permit,
            got,
        } = landed;
        let data = match got {
            Err(e) => return Err(e.into()),
            Ok(None) => {
                self.zero(offset, len, permit);
                return Ok(());
            }
            Ok(Some(data)) => data,
        };
        if self.shared.stopped() {
            return Ok(());
        }
        let got = data.len() as u64;
        self.shared.read.fetch_add(got, Ordering::Relaxed);
        self.shared.read_requests.fetch_add(1, Ordering::Relaxed);
        if got < len {
            if self.src.caps().size.is_some() {
                return Err(DiskError::new(
                    self.src.name(),
                    disk::Op::Read,
                    ErrorKind::Protocol,
                    format!("short read: {got} of {len} bytes"),
                )
                .at(offset, len)
                .into());
            }
            // A stream ended here.
            self.shared.end.fetch_min(offset + got, Ordering::Relaxed);
        }
        // Budget bytes of the read beyond what arrived are released now.
        permit.release_bytes(len - got);
        if let Some(observer) = &self.shared.observer {
            observer.data(offset, &data);
        }
        let opts = &self.shared.opts;
        let block = if opts.allocated { 0 } else { opts.sparse };
        let pieces = sparse::split(&data, offset, block as usize);
        let last = pieces.len().saturating_sub(1);
        for (i, piece) in pieces.into_iter().enumerate() {
            let at = offset + piece.start as u64;
            let n = piece.len as u64;
            // The last piece keeps the rest of the permit, its request slot included.
            let mut share = if i == last {
                std::mem::take(&mut permit)
            } else {
                permit.split_bytes(n)
            };
            if piece.zero {
                // Zeroes need no memory: their bytes are released now.
                share.release_bytes(n);
                self.zero(at, n, share);
            } else {
                self.flush_zero();
                let chunk = data.slice(piece.start..piece.start + piece.len);
                self.sink.push(Segment::data(at, chunk, share));
            }
        }
        Ok(())
    }

    /// [offset, offset+len) must read as zeroes: joins the pending zero run, or starts one.
    fn zero(&mut self, offset: u64, len: u64, permit: Permit) {
        if len == 0 {
            return;
        }
        if self.shared.dst_zero {
            self.shared.skipped.fetch_add(len, Ordering::Relaxed);
            self.shared.progress.add(len);
            self.shared.complete(offset, offset + len);
            return;
        }
        match &mut self.zero_run {
            // The run keeps its first permit; later ones are released, so a long zero run
            // never holds many request slots.
            Some(run) if run.offset + run.len == offset => run.len += len,
            _ => {
                self.flush_zero();
                self.zero_run = Some(ZeroRun {
                    offset,
                    len,
                    permit,
                });
            }
        }
    }

    /// Hands the pending zero run to the sink, less what the destination already reads as zero.
    fn flush_zero(&mut self) {
        let Some(run) = self.zero_run.take() else {
            return;
        };
        let shared = self.shared;
        let parts = if shared.dst_extents {
            needs_zeroing(run.offset, run.len, &self.dst_map)
        } else {
            vec![(run.offset, run.len)]
        };
        let work: u64 = parts.iter().map(|(_, l)| l).sum();
        shared.skipped.fetch_add(run.len - work, Ordering::Relaxed);
        shared.progress.add(run.len - work);
        // What the destination already holds as zero is complete now.
        let mut pos = run.offset;
        for &(at, n) in &parts {
            shared.complete(pos, at);
            pos = at + n;
        }
        shared.complete(pos, run.offset + run.len);
        let mut permit = Some(run.permit);
        for (at, n) in parts {
            let share = permit.take().unwrap_or_default();
            self.sink.push(Segment::zero(at, n, share));
        }
    }
}

/// A checkpoint at least every this often, so a crash costs little to redo...
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// ...or after this much progress, whichever comes first.
const CHECKPOINT_BYTES: u64 = 64 << 20;

/// Writes the journal's checkpoints while the workers copy; a checkpoint that fails stops the
/// copy (progress that cannot be recorded is not worth continuing blind).
async fn checkpoints(shared: &Shared) {
    let mut last = (Instant::now(), 0u64);
    while !shared.finished.load(Ordering::Relaxed) && !shared.stopped() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let bytes = shared.completed_bytes.load(Ordering::Relaxed);
        if last.0.elapsed() < CHECKPOINT_EVERY && bytes - last.1 < CHECKPOINT_BYTES {
            continue;
        }
        if let Err(e) = shared.checkpoint().await {
            shared.fail(e);
            return;
        }
        last = (Instant::now(), bytes);
    }
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
        return Err(CopyError::IncompleteExtents {
            endpoint: name.to_string(),
            start,
            covered: pos,
            end,
        });
    }
    Ok(())
}
