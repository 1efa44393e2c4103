//! One HTTP connection: hyper's HTTP/1.1 server over any byte stream, with the per-connection
//! state the handlers need ([`ConnCtx`]: tickets bound, timeout in force, byte counters), an
//! inactivity timeout enforced at the socket ([`TimedIo`]), and one log line of statistics
//! when the connection ends.
//!
//! The timeout rules: a connection that makes no progress for the timeout in force is closed —
//! 60 s (configurable) until a request is authorized, then the ticket's `inactivity_timeout`.
//! Reads waiting while a handler works are not timed (hyper watches for EOF then, and a long
//! zero or flush is not inactivity); handlers time their own body reads. Writes are always
//! timed, so a client that stops reading a download is dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{HeaderValue, SERVER};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::metrics::Metrics;
use crate::respond::Body;
use crate::store::{Binding, Ticket};

/// The `server` header of every response.
pub const SERVER_NAME: &str = concat!("ferry/", env!("CARGO_PKG_VERSION"));

/// Largest request head hyper buffers; longer request lines or headers are refused.
const MAX_HEAD: usize = 64 << 10;
/// hyper's read buffer grows to this: upload bodies arrive in frames this large, so fewer
/// reads and fewer, larger backend writes. (hyper also takes it as the header limit, which
/// stays bounded per connection.)
const READ_BUFFER: usize = 1 << 20;

/// Per-connection state shared by the socket wrapper and the request handlers.
pub struct ConnCtx {
    pub id: u64,
    pub service: &'static str,
    pub peer: String,
    timeout_ms: AtomicU64,
    busy: AtomicUsize,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    requests: AtomicU64,
    bindings: Mutex<HashMap<String, (Arc<Ticket>, Binding)>>,
    started: Instant,
    /// The server's metrics: requests, connections and errors are counted there.
    pub metrics: Arc<Metrics>,
}

impl ConnCtx {
    pub fn new(
        id: u64,
        service: &'static str,
        peer: String,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(ConnCtx {
            id,
            service,
            peer,
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            busy: AtomicUsize::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bindings: Mutex::new(HashMap::new()),
            started: Instant::now(),
            metrics,
        })
    }

    /// Bytes received and sent on the socket so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// How long the connection has been open.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Counts a failed request and keeps it for the status page.
    pub fn failed(&self, ticket: Option<&str>, error: &crate::respond::HttpError) {
        self.metrics.error(
            self.service,
            ticket,
            error.status.as_u16(),
            &error.kind(),
            &error.message,
        );
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Marks the connection busy (handler running, download streaming) until the guard drops.
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard { ctx: self.clone() }
    }

    /// Binds the connection to `ticket` (counted in its `connections`) and switches to its
    /// inactivity timeout. A re-installed ticket with the same id replaces the old binding.
    pub fn bind(&self, ticket: &Arc<Ticket>) {
        let mut map = self.bindings.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = !map
            .get(ticket.id())
            .is_some_and(|(t, _)| Arc::ptr_eq(t, ticket));
        if fresh {
            map.insert(ticket.id().to_owned(), (ticket.clone(), ticket.bind()));
        }
        let ms = ticket.spec.inactivity_timeout.saturating_mul(1000);
        self.timeout_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Ids of the tickets this connection is bound to, sorted.
    pub fn bound_tickets(&self) -> Vec<String> {
        let map = self.bindings.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<String> = map.keys().cloned().collect();
        ids.sort();
        ids
    }

    fn unbind_all(&self) {
        self.bindings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

pub struct BusyGuard {
    ctx: Arc<ConnCtx>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.ctx.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A service answering requests of one kind (data, control).
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        req: Request<Incoming>,
        ctx: Arc<ConnCtx>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send + '_>>;
}

/// Serves HTTP/1.1 on `io` until the client leaves, an error, or the timeout. Once `shutdown`
/// turns true, the request being served is finished and answered, then the connection closes.
pub async fn serve<S>(
    io: S,
    ctx: Arc<ConnCtx>,
    handler: Arc<dyn Handler>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    ctx.metrics.connection_opened(&ctx);
    let timed = TimedIo::new(io, ctx.clone());
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = svc_ctx.clone();
        let handler = handler.clone();
        async move {
            ctx.requests.fetch_add(1, Ordering::Relaxed);
            let _busy = ctx.busy();
            let began = Instant::now();
            let method = req.method().clone();
            tracing::debug!(conn = ctx.id, method = %req.method(), uri = %req.uri(), "request");
            let mut resp = handler.handle(req, ctx.clone()).await;
            resp.headers_mut()
                .insert(SERVER, HeaderValue::from_static(SERVER_NAME));
            let status = resp.status().as_u16();
            ctx.metrics
                .request(ctx.service, method.as_str(), status, began.elapsed());
            tracing::debug!(conn = ctx.id, status, "response");
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        // Do not read ahead while a handler works: a long zero or flush must not be cut short
        // because the client half-closed, and EOF is seen on the next read anyway.
        .half_close(true)
        .max_buf_size(READ_BUFFER.max(MAX_HEAD))
        .serve_connection(TokioIo::new(timed), svc);
    tokio::pin!(conn);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = shutdown.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                tracing::debug!(conn = ctx.id, "closing after the request in progress");
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    // The tickets the connection served, so its last line belongs to their transfers.
    let ticket = ctx.bound_tickets().join(",");
    ctx.unbind_all();
    ctx.metrics.connection_closed(&ctx);
    let elapsed = started.elapsed().as_secs_f64();
    let bytes_in = ctx.bytes_in.load(Ordering::Relaxed);
    let bytes_out = ctx.bytes_out.load(Ordering::Relaxed);
    let mib_s = |b: u64| b as f64 / (1 << 20) as f64 / elapsed.max(1e-9);
    let requests = ctx.requests.load(Ordering::Relaxed);
    match result {
        Ok(()) => tracing::info!(
            conn = ctx.id, ticket, service = ctx.service, peer = %ctx.peer, requests, bytes_in,
            bytes_out, seconds = elapsed, in_mib_s = mib_s(bytes_in), out_mib_s = mib_s(bytes_out),
            "connection closed"
        ),
        Err(e) => tracing::info!(
            conn = ctx.id, ticket, service = ctx.service, peer = %ctx.peer, requests, bytes_in,
            bytes_out, seconds = elapsed, error = %e, "connection ended with an error"
        ),
    }
}

/// How long a closing connection keeps reading (and discarding) what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// A stream that fails with `TimedOut` when it makes no progress for the connection's timeout.
///
/// Closing lingers: after the server's last byte, the write side is shut down and input is
/// drained for up to [`LINGER`]. Closing a socket with unread input makes the kernel send a
/// reset, which can destroy the error response (a 403 or 416 refusing an upload) before the
/// client reads it.
pub struct TimedIo<S> {
    inner: S,
    ctx: Arc<ConnCtx>,
    last: Instant,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Pin<Box<Sleep>>,
    /// Set once the write side is shut down: drain input until this deadline.
    linger: Option<Pin<Box<Sleep>>>,
}

impl<S> TimedIo<S> {
    pub fn new(inner: S, ctx: Arc<ConnCtx>) -> Self {
        let now = tokio::time::Instant::now();
        TimedIo {
            inner,
            ctx,
            last: Instant::now(),
            read_timer: Box::pin(tokio::time::sleep_until(now)),
            write_timer: Box::pin(tokio::time::sleep_until(now)),
            linger: None,
        }
    }

    /// Ready(Err) once the connection has been idle for the timeout; registers the waker.
    fn expired(
        timer: &mut Pin<Box<Sleep>>,
        last: Instant,
        ctx: &ConnCtx,
        cx: &mut Context<'_>,
    ) -> Poll<io::Error> {
        let deadline = tokio::time::Instant::from_std(last + ctx.timeout());
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::info!(conn = ctx.id, peer = %ctx.peer, timeout = ?ctx.timeout(),
                    "closing inactive connection");
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection inactive for too long",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.last = Instant::now();
                    this.ctx.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.ctx.busy.load(Ordering::Acquire) > 0 {
                    return Poll::Pending;
                }
                Self::expired(&mut this.read_timer, this.last, &this.ctx, cx).map(Err)
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> TimedIo<S> {
    fn after_write(
        &mut self,
        r: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.last = Instant::now();
                    self.ctx.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                Self::expired(&mut self.write_timer, self.last, &self.ctx, cx).map(Err)
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 16 << 10];
        loop {
            if this
                .linger
                .as_mut()
                .expect("set above")
                .as_mut()
                .poll(cx)
                .is_ready()
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                // The client is gone: nothing left to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
