//! Connections to the HTTP server: TCP (with rustls when the URL is https) or a Unix socket
//! (path or abstract name), each an HTTP/1.1 connection driven by its own task; and the pool
//! that hands them out, one request at a time, reusing keep-alive connections. Every
//! connection has deadlines: one for connecting (TCP and TLS), and one for any read or write
//! that waits while the connection moves no byte either way, so a server that goes silent
//! fails the request instead of holding the copy forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::ReqBody;

/// How long a connection may take to open, and how long a read or write may wait without a
/// byte moving (an idle keep-alive connection that hits it is closed and replaced later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub connect: Duration,
    pub io: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            connect: Duration::from_secs(10),
            io: Duration::from_secs(60),
        }
    }
}

/// Where connections go.
#[derive(Clone)]
pub enum Transport {
    Tcp {
        authority: String,
        tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    },
    /// A Unix socket; a leading NUL names an abstract socket.
    Unix(String),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tcp { authority, tls } => {
                write!(
                    f,
                    "tcp {authority}{}",
                    if tls.is_some() { " tls" } else { "" }
                )
            }
            Transport::Unix(name) => write!(f, "unix {}", name.replace('\0', "@")),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Transport {
    /// Opens one HTTP/1.1 connection; its driver runs on a task of its own.
    pub async fn connect(&self, deadlines: Deadlines) -> io::Result<SendRequest<ReqBody>> {
        let stream = tokio::time::timeout(deadlines.connect, self.open_stream())
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting timed out after {} s",
                        deadlines.connect.as_secs_f64()
                    ),
                )
            })??;
        let stream = Idle::new(stream, deadlines.io);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .writev(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("http connection ended: {e}");
            }
        });
        Ok(sender)
    }

    async fn open_stream(&self) -> io::Result<Box<dyn Io>> {
        match self {
            Transport::Tcp { authority, tls } => {
                let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
                tcp.set_nodelay(true)?;
                match tls {
                    None => Ok(Box::new(tcp)),
                    Some((config, name)) => {
                        let connector = tokio_rustls::TlsConnector::from(config.clone());
                        let tls = connector.connect(name.clone(), tcp).await?;
                        Ok(Box::new(tls))
                    }
                }
            }
            Transport::Unix(name) => {
                let stream = match name.strip_prefix('\0') {
                    Some(abstract_name) => {
                        use std::os::linux::net::SocketAddrExt;
                        let addr = std::os::unix::net::SocketAddr::from_abstract_name(
                            abstract_name.as_bytes(),
                        )?;
                        let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
                        s.set_nonblocking(true)?;
                        tokio::net::UnixStream::from_std(s)?
                    }
                    None => tokio::net::UnixStream::connect(name).await?,
                };
                Ok(Box::new(stream))
            }
        }
    }
}

/// A stream that fails a pending read or write once the connection has moved no byte, either
/// way, for the deadline. Reads and writes share one clock: a long upload body keeps a
/// connection alive while its answer is not due yet, and an idle keep-alive connection in the
/// pool simply times out and is replaced. (Separate read and write timeouts, as generic
/// wrappers offer, would fail a slow PUT whose server rightly says nothing until the end.)
struct Idle<S> {
    inner: S,
    deadline: Duration,
    last: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Idle<S> {
    fn new(inner: S, deadline: Duration) -> Idle<S> {
        let last = Instant::now();
        Idle {
            inner,
            deadline,
            last,
            timer: Box::pin(tokio::time::sleep_until((last + deadline).into())),
        }
    }

    /// After a pending operation: an error once the connection was idle past the deadline,
    /// else the timer is set to wake the task when it would be.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let due = self.last + self.deadline;
        if Instant::now() >= due {
            return Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "timed out: the server moved no byte for {} s",
                    self.deadline.as_secs_f64()
                ),
            ));
        }
        if self.timer.deadline() != due.into() {
            self.timer.as_mut().reset(due.into());
        }
        // The timer never fires before `due`, so a second look finds it passed.
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => self.check(cx),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.check(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.last = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.check(cx).map(Err),
        }
    }

    // Vectored writes pass through: without them hyper copies every body byte into its own
    // buffer before writing ("flatten"), a pass over the whole upload for nothing.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.last = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.check(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.check(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Up to `size` connections, each carrying one request at a time.
pub struct Pool {
    transport: Mutex<Transport>,
    deadlines: Deadlines,
    idle: Mutex<Vec<SendRequest<ReqBody>>>,
    slots: Arc<Semaphore>,
    size: std::sync::atomic::AtomicUsize,
}

/// A connection lent by the pool. Give it back with [`Lease::release`] once its response is
/// fully read; dropping it instead closes the connection (its state is unknown).
pub struct Lease {
    pub sender: SendRequest<ReqBody>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(transport: Transport, size: usize, deadlines: Deadlines) -> Arc<Pool> {
        let size = size.max(1);
        Arc::new(Pool {
            transport: Mutex::new(transport),
            deadlines,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(size)),
            size: size.into(),
        })
    }

    pub fn size(&self) -> usize {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Allows up to `size` connections from now on (never fewer than before): the pool opened
    /// for probing the server grows to what the server allows.
    pub fn grow_to(&self, size: usize) {
        let before = self
            .size
            .fetch_max(size, std::sync::atomic::Ordering::Relaxed);
        if size > before {
            self.slots.add_permits(size - before);
        }
    }

    pub fn transport(&self) -> Transport {
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends later connections elsewhere (the server's Unix socket); idle ones are dropped.
    pub fn set_transport(&self, transport: Transport) {
        *self.transport.lock().unwrap_or_else(|p| p.into_inner()) = transport;
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Adds an already open connection (the one used to probe the server).
    pub fn put_idle(&self, sender: SendRequest<ReqBody>) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sender);
    }

    /// A connection ready for a request: an idle one still open, else a new one. A keep-alive
    /// connection the server closed while idle is noticed here and replaced.
    pub async fn get(self: &Arc<Self>) -> io::Result<Lease> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("connection pool closed"))?;
        loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(mut sender) = idle else { break };
            if sender.is_closed() {
                continue;
            }
            if sender.ready().await.is_ok() {
                return Ok(Lease {
                    sender,
                    pool: self.clone(),
                    _permit: permit,
                });
            }
        }
        let sender = self.transport().connect(self.deadlines).await?;
        Ok(Lease {
            sender,
            pool: self.clone(),
            _permit: permit,
        })
    }

    /// Connections open and idle now (each is flushed at the end of an upload).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Drops every idle connection.
    pub fn close(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Lease {
    pub fn release(self) {
        if !self.sender.is_closed() {
            self.pool.put_idle(self.sender);
        }
    }
}
