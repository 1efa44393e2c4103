//! Streamed runs. An upload run is one `PUT` whose body is the run's pieces as the copy engine
//! read them (no copy into one buffer); a download run is one ranged `GET` whose body is cut into
//! the pieces the engine asks for. Each run owns one pooled connection while it lasts, so the
//! request size on the wire is decoupled from the source's and destination's request sizes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use disk::{BoxFut, DiskError, ErrorKind, Op, Permit, StreamReader};
use http::{Request, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot};

use crate::body::ReqBody;
use crate::compress::{self, Policy};
use crate::request::{Fail, Shared};
use crate::transport::Lease;
use disk::retry::Backoff;

/// One pipeline's uploads: runs are sent one after another by one task, each as one PUT.
/// A run's pieces are kept until the server has answered, so a run whose connection broke (or
/// that a server failed with a 5xx) goes again whole, under the one retry policy.
pub struct RunWriter {
    runs: mpsc::UnboundedSender<PutRun>,
    /// Set when the copy stops: runs not yet started are dropped instead of sent.
    abandoned: Arc<AtomicBool>,
    fail: Fail,
}

struct PutRun {
    offset: u64,
    pieces: Vec<Bytes>,
    /// The run's budget: released once its body is with the connection.
    budget: Permit,
    done: oneshot::Sender<Result<(), DiskError>>,
}

impl RunWriter {
    pub(crate) fn new(shared: Arc<Shared>, compression: Option<Arc<Policy>>) -> RunWriter {
        let fail = Fail::new(&shared.name, Op::Write);
        let abandoned = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::unbounded_channel::<PutRun>();
        let stop = abandoned.clone();
        // Runs are sent in the span of the copy that created the stream.
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            while let Some(run) = rx.recv().await {
                let len: u64 = run.pieces.iter().map(|p| p.len() as u64).sum();
                let result = if stop.load(Ordering::Relaxed) {
                    Err(Fail::new(&shared.name, Op::Write)
                        .at(run.offset, len)
                        .because(ErrorKind::Cancelled, "upload abandoned"))
                } else {
                    put_run(
                        &shared,
                        compression.as_deref(),
                        run.offset,
                        len,
                        &run.pieces,
                        run.budget,
                    )
                    .await
                };
                if let Err(e) = &result {
                    tracing::debug!("{e}");
                }
                let _ = run.done.send(result);
            }
        }));
        RunWriter {
            runs: tx,
            abandoned,
            fail,
        }
    }

    /// Queues `pieces`, contiguous from `offset`, as one PUT sent after the runs queued before
    /// it; resolves when the server has answered it. `budget` is released as soon as the body
    /// is with the connection: the pieces are kept beyond it (one run per pipeline) until the
    /// answer, to be sent again if need be.
    pub(crate) fn send(
        &self,
        offset: u64,
        pieces: Vec<Bytes>,
        budget: Permit,
    ) -> BoxFut<'static, ()> {
        let (done, answer) = oneshot::channel();
        let len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let lost = self
            .fail
            .clone()
            .at(offset, len)
            .because(ErrorKind::Cancelled, "upload abandoned");
        // A send fails only when the task is gone (runtime shutdown): the answer says so.
        let _ = self.runs.send(PutRun {
            offset,
            pieces,
            budget,
            done,
        });
        Box::pin(async move { answer.await.unwrap_or(Err(lost)) })
    }

    /// Runs queued and not yet started are dropped (the copy stopped); the one on the wire
    /// finishes, so the destination is left in a known state.
    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }
}

async fn put_run(
    shared: &Shared,
    compression: Option<&Policy>,
    offset: u64,
    len: u64,
    pieces: &[Bytes],
    budget: Permit,
) -> Result<(), DiskError> {
    let fail = Fail::new(&shared.name, Op::Write).at(offset, len);
    let started = Instant::now();
    let compressed = compression.is_some_and(Policy::choose);
    // A compressed run's body is kept whole (and resent whole); the pieces' budget goes as
    // soon as it is made.
    let (body, budget) = if compressed {
        let body = compress::compress(pieces)
            .await
            .map_err(|e| fail.because(ErrorKind::Other, format!("compressing a run: {e}")))?;
        drop(budget);
        (Some(body), None)
    } else {
        (None, Some(budget))
    };
    let sent = Arc::new(Mutex::new(budget));
    let make = || {
        let req = Request::put(shared.target_with("flush=n"))
            .header(header::HOST, &shared.host)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/*", offset, offset + len - 1),
            );
        match &body {
            Some(b) => req
                .header(header::CONTENT_LENGTH, b.len())
                .header(header::CONTENT_ENCODING, compress::ZSTD)
                .body(ReqBody::full(b.clone())),
            None => req
                .header(header::CONTENT_LENGTH, len)
                .body(ReqBody::pieces(pieces, &sent)),
        }
        .expect("valid request")
    };
    // `call` sends again (from the pieces kept here) when the connection breaks or the server
    // answers 5xx: a PUT at an offset is idempotent.
    shared.call(make, &fail).await?;
    if let Some(policy) = compression {
        policy.record(compressed, len, started.elapsed());
    }
    Ok(())
}

/// One pipeline's downloads: runs are fetched one after another by one task, each as one
/// ranged GET; queued `read` calls are answered in order from the current run's body.
pub struct RunReader {
    runs: mpsc::UnboundedSender<GetRun>,
    current: Option<mpsc::UnboundedSender<Want>>,
    fail: Fail,
}

struct GetRun {
    offset: u64,
    len: u64,
    /// The server ignores Range: the run is the whole image, fetched without one.
    whole: bool,
    wants: mpsc::UnboundedReceiver<Want>,
}

impl RunReader {
    pub(crate) fn new(shared: Arc<Shared>) -> RunReader {
        let fail = Fail::new(&shared.name, Op::Read);
        let (tx, mut rx) = mpsc::unbounded_channel::<GetRun>();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            while let Some(run) = rx.recv().await {
                get_run(&shared, run.offset, run.len, run.whole, run.wants).await;
            }
        }));
        RunReader {
            runs: tx,
            current: None,
            fail,
        }
    }

    pub(crate) fn begin_whole(&mut self, size: u64) {
        self.begin_run(0, size, true);
    }

    fn begin_run(&mut self, offset: u64, len: u64, whole: bool) {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.runs.send(GetRun {
            offset,
            len,
            whole,
            wants: rx,
        });
        self.current = Some(tx);
    }
}

type Want = (u64, oneshot::Sender<Result<Bytes, DiskError>>);

/// Serves one run's pieces from one GET. A response that breaks mid-body (a reset, a
/// truncated answer, a server gone silent) is asked for again from the first byte not yet
/// handed out, under the retry policy: the pieces already delivered are never read twice.
async fn get_run(
    shared: &Shared,
    offset: u64,
    len: u64,
    whole: bool,
    mut wants: mpsc::UnboundedReceiver<Want>,
) {
    let end = offset + len;
    let mut pos = offset;
    let mut backoff = Backoff::new(shared.retry);
    let mut open = None;
    while let Some((n, reply)) = wants.recv().await {
        let result = loop {
            let (body, pending, _) = match &mut open {
                Some(o) => o,
                None => match open_at(shared, offset, pos, end, whole).await {
                    Ok(o) => open.insert(o),
                    Err(e) => break Err(e),
                },
            };
            let fail = Fail::new(&shared.name, Op::Read).at(pos, n);
            match fill(body, pending, n, pos, end, &fail).await {
                Ok(piece) => break Ok(piece),
                Err(e) => {
                    open = None;
                    if !backoff.again(&e).await {
                        break Err(backoff.give_up(e));
                    }
                }
            }
        };
        let piece = match result {
            Ok(piece) => piece,
            Err(err) => {
                let _ = reply.send(Err(err.clone()));
                // Later pieces cannot be served either.
                while let Some((_, reply)) = wants.recv().await {
                    let _ = reply.send(Err(err.clone()));
                }
                return;
            }
        };
        if reply.send(Ok(piece)).is_err() {
            // The copy stopped and no longer wants this run: drop the connection mid-body.
            return;
        }
        pos += n;
        backoff = Backoff::new(shared.retry);
    }
    if let Some((mut body, pending, lease)) = open
        && pos == end
        && pending.is_empty()
        && body.frame().await.is_none()
    {
        lease.release();
    }
}

/// A GET for the rest of a run, from `pos`: a ranged one, or for a server without ranges the
/// whole image again with the bytes before `pos` skipped.
async fn open_at(
    shared: &Shared,
    offset: u64,
    pos: u64,
    end: u64,
    whole: bool,
) -> Result<(Incoming, Bytes, Lease), DiskError> {
    let fail = Fail::new(&shared.name, Op::Read).at(pos, end - pos);
    let range = (!whole).then_some((pos, end - pos));
    let (resp, lease) = shared.get_range(range, &fail).await?;
    let mut body = resp.into_body();
    let mut pending = Bytes::new();
    if whole && pos > offset {
        let mut skip = pos - offset;
        while skip > 0 {
            match next_data(&mut body, &fail).await? {
                Some(mut frame) => {
                    let take = skip.min(frame.len() as u64);
                    let _ = frame.split_to(take as usize);
                    skip -= take;
                    pending = frame;
                }
                None => return Err(short(pos, 0, (end - pos) as usize, &fail)),
            }
        }
    }
    Ok((body, pending, lease))
}

/// Cuts the next `n` bytes out of the response body into one pooled buffer.
async fn fill(
    body: &mut Incoming,
    pending: &mut Bytes,
    n: u64,
    pos: u64,
    end: u64,
    fail: &Fail,
) -> Result<Bytes, DiskError> {
    if pos + n > end {
        return Err(fail.because(
            ErrorKind::InvalidRequest,
            format!("read of {n} bytes at {pos} is past the run"),
        ));
    }
    let n = n as usize;
    // The whole piece may already be in one frame: no copy.
    if pending.len() >= n {
        return Ok(pending.split_to(n));
    }
    if pending.is_empty() {
        match next_data(body, fail).await? {
            Some(frame) if frame.len() >= n => {
                *pending = frame;
                return Ok(pending.split_to(n));
            }
            Some(frame) => *pending = frame,
            None => return Err(short(pos, 0, n, fail)),
        }
    }
    let mut buf = bufpool::get(n);
    let mut got = 0;
    while got < n {
        if pending.is_empty() {
            match next_data(body, fail).await? {
                Some(frame) => *pending = frame,
                None => return Err(short(pos, got, n, fail)),
            }
        }
        let take = pending.len().min(n - got);
        buf[got..got + take].copy_from_slice(&pending.split_to(take));
        got += take;
    }
    Ok(buf.freeze())
}

fn short(pos: u64, got: usize, n: usize, fail: &Fail) -> DiskError {
    fail.because(
        ErrorKind::ConnectionLost,
        format!("the server's response ended early: {got} of {n} bytes at offset {pos}"),
    )
}

async fn next_data(body: &mut Incoming, fail: &Fail) -> Result<Option<Bytes>, DiskError> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(fail.hyper(&e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    return Ok(Some(data));
                }
            }
        }
    }
}

impl StreamReader for RunReader {
    fn begin(&mut self, offset: u64, len: u64) {
        self.begin_run(offset, len, false);
    }

    fn read(&mut self, len: u64) -> BoxFut<'static, Bytes> {
        let (tx, rx) = oneshot::channel();
        let queued = self
            .current
            .as_ref()
            .is_some_and(|run| run.send((len, tx)).is_ok());
        let fail = self.fail.clone();
        Box::pin(async move {
            if !queued {
                return Err(fail.because(ErrorKind::InvalidRequest, "read outside a run"));
            }
            rx.await
                .unwrap_or_else(|_| Err(fail.because(ErrorKind::Cancelled, "download abandoned")))
        })
    }
}
