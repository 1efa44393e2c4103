//! Streamed runs. An upload run is one `PUT` whose body is fed piece by piece as the copy
//! engine's reads complete (in order); a download run is one ranged `GET` whose body is cut into
//! the pieces the engine asks for. Each run owns one pooled connection while it lasts, so the
//! request size on the wire is decoupled from the source's and destination's request sizes.

use std::sync::Arc;

use bytes::Bytes;
use disk::{BoxFut, DiskError, ErrorKind, Op, StreamReader};
use http::{Request, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot, watch};

use crate::body::{ReqBody, RunState, RunWatch, StreamBody};
use crate::request::{Backoff, Fail, Shared, status_error};

/// One pipeline's uploads: runs are sent one after another by one task, each as one PUT.
pub struct RunWriter {
    runs: mpsc::UnboundedSender<PutRun>,
    current: Option<OpenRun>,
    fail: Fail,
}

struct PutRun {
    offset: u64,
    len: u64,
    body: StreamBody,
    state: RunWatch,
}

/// The run being pushed to.
struct OpenRun {
    pieces: mpsc::UnboundedSender<Bytes>,
    state: RunWatch,
    /// Absolute offset after the last piece pushed.
    pushed: u64,
    end: u64,
}

impl RunWriter {
    pub(crate) fn new(shared: Arc<Shared>) -> RunWriter {
        let name = shared.name.clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<PutRun>();
        tokio::spawn(async move {
            while let Some(run) = rx.recv().await {
                let result = put_run(&shared, run.offset, run.len, run.body, &run.state).await;
                if let Err(e) = &result {
                    tracing::debug!("{e}");
                }
                run.state.send_modify(|s| s.outcome = Some(result));
            }
        });
        RunWriter {
            runs: tx,
            current: None,
            fail: Fail::new(&name, Op::Write),
        }
    }
}

impl RunWriter {
    /// Opens a run of `len` bytes at `offset`: one PUT, fed by the pushes that follow.
    pub(crate) fn begin(&mut self, offset: u64, len: u64) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state: RunWatch = Arc::new(watch::Sender::new(RunState {
            handed: offset,
            outcome: None,
        }));
        let body = StreamBody {
            pieces: rx,
            remaining: len,
            state: state.clone(),
        };
        // A send fails only when the task is gone (runtime shutdown); pushes then report it.
        let _ = self.runs.send(PutRun {
            offset,
            len,
            body,
            state: state.clone(),
        });
        self.current = Some(OpenRun {
            pieces: tx,
            state,
            pushed: offset,
            end: offset + len,
        });
    }

    /// Queues the run's next piece at once (call order is stream order); resolves when the
    /// piece has been sent or, for the run's last piece, when the run is done.
    pub(crate) fn push(&mut self, data: Bytes) -> BoxFut<'static, ()> {
        let Some(run) = self.current.as_mut() else {
            let err = self
                .fail
                .because(ErrorKind::InvalidRequest, "data pushed outside a run");
            return Box::pin(async move { Err(err) });
        };
        run.pushed += data.len() as u64;
        let end = run.pushed;
        let last = end >= run.end;
        // A send fails only when the request is already over; its outcome says why.
        let _ = run.pieces.send(data);
        let mut state = run.state.subscribe();
        if last {
            self.current = None;
        }
        let abandoned = self.fail.because(ErrorKind::Cancelled, "upload abandoned");
        Box::pin(async move {
            let seen = state
                .wait_for(|s| s.outcome.is_some() || (!last && s.handed >= end))
                .await
                .map(|s| s.clone());
            match seen {
                Ok(s) if !last && s.handed >= end => Ok(()),
                Ok(s) => s.outcome.unwrap_or(Ok(())),
                Err(_) => Err(abandoned),
            }
        })
    }
}

async fn put_run(
    shared: &Shared,
    offset: u64,
    len: u64,
    body: StreamBody,
    state: &RunWatch,
) -> Result<(), DiskError> {
    let fail = Fail::new(&shared.name, Op::Write).at(offset, len);
    let mut req = Request::put(shared.target_with("flush=n"))
        .header(header::HOST, &shared.host)
        .header(header::CONTENT_LENGTH, len)
        .header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/*", offset, offset + len - 1),
        )
        .body(ReqBody::Stream(body))
        .map_err(|e| fail.because(ErrorKind::InvalidRequest, e.to_string()))?;
    let mut backoff = Backoff::default();
    let (resp, lease) = loop {
        let mut lease = match shared.pool.get().await {
            Ok(lease) => lease,
            Err(e) => {
                let err = fail.connect(&e);
                if backoff.again(&err).await {
                    continue;
                }
                return Err(err);
            }
        };
        match lease.sender.try_send_request(req).await {
            Ok(resp) => break (resp, lease),
            Err(mut e) => {
                let err = fail.hyper(e.error());
                // A request hyper hands back was never sent (a keep-alive connection the
                // server had just closed): its body is intact and it can go again. One whose
                // body started streaming cannot.
                let untouched = state.borrow().handed == offset;
                match e.take_message() {
                    Some(back) if untouched && backoff.again(&err).await => req = back,
                    _ => return Err(err),
                }
            }
        }
    };
    if !resp.status().is_success() {
        return Err(status_error(resp, &fail).await);
    }
    resp.into_body()
        .collect()
        .await
        .map_err(|e| fail.hyper(&e))?;
    lease.release();
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
        tokio::spawn(async move {
            while let Some(run) = rx.recv().await {
                get_run(&shared, run.offset, run.len, run.whole, run.wants).await;
            }
        });
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

async fn get_run(
    shared: &Shared,
    offset: u64,
    len: u64,
    whole: bool,
    mut wants: mpsc::UnboundedReceiver<Want>,
) {
    let fail = Fail::new(&shared.name, Op::Read).at(offset, len);
    let opened = async {
        let range = (!whole).then_some((offset, len));
        shared.get_range(range, &fail).await
    }
    .await;
    let (resp, lease) = match opened {
        Ok(x) => x,
        Err(e) => {
            while let Some((_, reply)) = wants.recv().await {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let mut body = resp.into_body();
    let mut pending = Bytes::new();
    let mut pos = offset;
    let end = offset + len;
    while let Some((n, reply)) = wants.recv().await {
        let result = fill(&mut body, &mut pending, n, pos, end, &fail).await;
        let failed = result.is_err();
        if failed {
            let err = result.as_ref().err().cloned();
            let _ = reply.send(result);
            // Later pieces cannot be served either.
            while let Some((_, reply)) = wants.recv().await {
                let _ = reply.send(Err(err.clone().expect("error")));
            }
            return;
        }
        if reply.send(result).is_err() {
            // The copy stopped and no longer wants this run: drop the connection mid-body.
            return;
        }
        pos += n;
    }
    if pos == end && pending.is_empty() && body.frame().await.is_none() {
        lease.release();
    }
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
