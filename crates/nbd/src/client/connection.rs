//! One NBD connection in the transmission phase. A writer task sends request headers and
//! payloads in submission order; a reader task parses replies, matches them to requests by
//! cookie, reassembles structured reads straight into the request's buffer, and completes each
//! request through a oneshot channel. Any protocol violation, socket error or stall fails every
//! request in flight with the same error and closes the connection: a misbehaving server gets an
//! error, never a hang or a panic.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{BoxStream, ConnectOptions, Negotiated};
use crate::error::{Error, Result};
use crate::proto::consts::*;
use crate::proto::{
    Chunk, Descriptor, HeaderMode, MAX_METADATA_CHUNK_LEN, OFFSET_DATA_HEADER_LEN, ReplyHeader,
    Request,
};

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Done,
    Data(Bytes),
    /// Block status: descriptors per meta context id, in the order the server sent them.
    Status(Vec<(u32, Vec<Descriptor>)>),
}

struct Pending {
    command: u16,
    offset: u64,
    length: u64,
    /// READ only: the destination buffer (pooled; chunks fill it, holes are zeroed).
    data: Option<bufpool::Buf>,
    /// READ only: ranges already filled (start → end), to reject overlaps.
    filled: BTreeMap<u64, u64>,
    filled_bytes: u64,
    status: Vec<(u32, Vec<Descriptor>)>,
    error: Option<Error>,
    done: oneshot::Sender<Result<Reply>>,
    _slot: OwnedSemaphorePermit,
}

impl Pending {
    fn command_error(&self, errno: u32, message: String, error_offset: Option<u64>) -> Error {
        Error::Command {
            command: self.command,
            offset: self.offset,
            length: self.length,
            errno,
            message,
            error_offset,
        }
    }

    /// Records that [start, start+len) of a READ arrived, checking bounds and overlaps.
    fn fill(&mut self, start: u64, len: u64) -> Result<()> {
        let end = start.checked_add(len).ok_or_else(|| {
            Error::Protocol(format!("read chunk at {start} length {len} overflows"))
        })?;
        if start < self.offset || end > self.offset + self.length {
            return Err(Error::Protocol(format!(
                "read chunk [{start}, {end}) lies outside the request [{}, {})",
                self.offset,
                self.offset + self.length
            )));
        }
        let overlaps_before = self
            .filled
            .range(..=start)
            .next_back()
            .is_some_and(|(_, e)| *e > start);
        let overlaps_after = self.filled.range(start..end).next().is_some();
        if overlaps_before || overlaps_after {
            return Err(Error::Protocol(format!(
                "read chunk [{start}, {end}) overlaps data already received"
            )));
        }
        self.filled.insert(start, end);
        self.filled_bytes += len;
        Ok(())
    }

    fn finish(mut self) {
        let result = if let Some(e) = self.error.take() {
            Err(e)
        } else {
            match self.command {
                CMD_READ if self.filled_bytes != self.length => Err(Error::Protocol(format!(
                    "read at offset {} length {} completed with only {} bytes",
                    self.offset, self.length, self.filled_bytes
                ))),
                CMD_READ => Ok(Reply::Data(self.data.take().unwrap_or_default().freeze())),
                CMD_BLOCK_STATUS if self.status.is_empty() => Err(Error::Protocol(format!(
                    "block status at offset {} completed without a status chunk",
                    self.offset
                ))),
                CMD_BLOCK_STATUS => Ok(Reply::Status(std::mem::take(&mut self.status))),
                _ => Ok(Reply::Done),
            }
        };
        let _ = self.done.send(result);
    }
}

struct State {
    pending: HashMap<u64, Pending>,
    /// Set once the connection is dead; every later request fails with it.
    failed: Option<Error>,
    /// When `pending` last went from empty to non-empty: a stall is only counted from here.
    busy_since: Instant,
}

struct Shared {
    state: Mutex<State>,
    next_cookie: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere must not wedge every other request: the state stays consistent
        // because each critical section is a single insert/remove.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, cookie: u64) -> Result<Pending> {
        self.lock()
            .pending
            .remove(&cookie)
            .ok_or_else(|| Error::Protocol(format!("reply for unknown cookie {cookie:#x}")))
    }

    fn put_back(&self, cookie: u64, pending: Pending) {
        self.lock().pending.insert(cookie, pending);
    }

    fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    /// How much longer an idle reader may wait: `timeout` when nothing is in flight, what is
    /// left of it since the connection became busy otherwise, None once that is used up.
    fn idle_wait(&self, timeout: Duration) -> Option<Duration> {
        let state = self.lock();
        if state.pending.is_empty() {
            return Some(timeout);
        }
        timeout
            .checked_sub(state.busy_since.elapsed())
            .filter(|left| !left.is_zero())
    }

    /// Marks the connection dead and fails every request in flight.
    fn fail_all(&self, err: Error) {
        let drained: Vec<Pending> = {
            let mut state = self.lock();
            if state.failed.is_none() {
                state.failed = Some(err.clone());
            }
            state.pending.drain().map(|(_, p)| p).collect()
        };
        for p in drained {
            let _ = p.done.send(Err(err.clone()));
        }
    }
}

enum Outgoing {
    Request {
        header: [u8; EXTENDED_REQUEST_LEN],
        header_len: usize,
        /// The request's data, in pieces sent back to back (empty: none).
        payload: Vec<Bytes>,
    },
    /// Send NBD_CMD_DISC and close; the sender, if any, learns when that is done.
    Disconnect(Option<oneshot::Sender<()>>),
}

struct Inner {
    shared: Arc<Shared>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    slots: Arc<Semaphore>,
    /// Total number of slots: holding all of them means nothing is in flight.
    capacity: u32,
    info: Negotiated,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A soft disconnect: the server finishes what is in flight, then closes.
        let _ = self.outgoing.send(Outgoing::Disconnect(None));
    }
}

/// A connected export. Cheap to clone; all clones share the socket. Dropping the last clone
/// sends NBD_CMD_DISC.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

/// A request that was sent; await [`PendingReply::wait`] for its outcome. Dropping it does not
/// cancel the request, it only discards the reply.
pub struct PendingReply {
    rx: oneshot::Receiver<Result<Reply>>,
    shared: Arc<Shared>,
}

impl PendingReply {
    pub async fn wait(self) -> Result<Reply> {
        match self.rx.await {
            Ok(result) => result,
            Err(_) => Err(self
                .shared
                .lock()
                .failed
                .clone()
                .unwrap_or_else(|| Error::Closed("the reply was lost".into()))),
        }
    }
}

/// Flags for [`Connection::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Keep the range allocated (NBD_CMD_FLAG_NO_HOLE).
    pub no_hole: bool,
    /// Fail with ENOTSUP unless zeroing is fast (NBD_CMD_FLAG_FAST_ZERO).
    pub fast: bool,
    pub fua: bool,
}

impl Connection {
    pub(crate) fn start(stream: BoxStream, info: Negotiated, opts: &ConnectOptions) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                failed: None,
                busy_since: Instant::now(),
            }),
            next_cookie: AtomicU64::new(1),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let capacity = opts
            .settings
            .max_in_flight
            .clamp(1, Semaphore::MAX_PERMITS.min(1 << 20)) as u32;
        let reader = Reader {
            rd: BufReader::with_capacity(64 * 1024, rd),
            shared: shared.clone(),
            mode: info.mode,
            timeout: opts.settings.timeout,
            context_ids: info.contexts.iter().map(|(_, id)| *id).collect(),
        };
        tokio::spawn(reader.run());
        tokio::spawn(write_loop(
            BufWriter::with_capacity(64 * 1024, wr),
            rx,
            shared.clone(),
            info.mode,
            opts.settings.timeout,
        ));
        Connection {
            inner: Arc::new(Inner {
                shared,
                outgoing: tx,
                slots: Arc::new(Semaphore::new(capacity as usize)),
                capacity,
                info,
            }),
        }
    }

    /// What the handshake negotiated.
    pub fn info(&self) -> &Negotiated {
        &self.inner.info
    }

    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Requests currently awaiting replies.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.in_flight()
    }

    /// Sends one request as is (no splitting, no capability checks) and returns its pending
    /// reply. Waits for a free slot when the in-flight cap is reached.
    pub async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<Bytes>,
    ) -> Result<PendingReply> {
        self.submit_parts(
            command,
            flags,
            offset,
            length,
            payload.into_iter().collect(),
        )
        .await
    }

    /// [`Connection::submit`] with the payload in pieces, sent one after another without being
    /// copied together; their lengths must add up to `length`.
    pub async fn submit_parts(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Vec<Bytes>,
    ) -> Result<PendingReply> {
        let carried: usize = payload.iter().map(Bytes::len).sum();
        if !payload.is_empty() && carried as u64 != length {
            return Err(Error::InvalidArgument(format!(
                "{} of {length} bytes carries {carried} bytes of data",
                command_name(command)
            )));
        }
        let inner = &self.inner;
        let slot = inner
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed("connection shut down".into()))?;
        let mode = inner.info.mode;
        if mode != HeaderMode::Extended && length > u64::from(u32::MAX) {
            return Err(Error::InvalidArgument(format!(
                "{} length {length} does not fit a compact request",
                command_name(command)
            )));
        }
        let cookie = inner.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // Recycled, not zeroed: every byte is written by a data chunk or zeroed by a hole chunk
        // before the read may complete (coverage is checked).
        let data = (command == CMD_READ).then(|| bufpool::get(length as usize));
        let pending = Pending {
            command,
            offset,
            length,
            data,
            filled: BTreeMap::new(),
            filled_bytes: 0,
            status: Vec::new(),
            error: None,
            done: tx,
            _slot: slot,
        };
        {
            let mut state = inner.shared.lock();
            if let Some(err) = &state.failed {
                return Err(err.clone());
            }
            if state.pending.is_empty() {
                state.busy_since = Instant::now();
            }
            state.pending.insert(cookie, pending);
        }
        let request = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut header = Vec::with_capacity(EXTENDED_REQUEST_LEN);
        request.encode(mode, &mut header);
        let mut buf = [0u8; EXTENDED_REQUEST_LEN];
        buf[..header.len()].copy_from_slice(&header);
        let msg = Outgoing::Request {
            header: buf,
            header_len: header.len(),
            payload,
        };
        if inner.outgoing.send(msg).is_err() {
            inner
                .shared
                .fail_all(Error::Closed("the connection's writer stopped".into()));
        }
        Ok(PendingReply {
            rx,
            shared: inner.shared.clone(),
        })
    }

    /// Sends a request and waits for its reply.
    pub async fn call(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<Bytes>,
    ) -> Result<Reply> {
        self.submit(command, flags, offset, length, payload)
            .await?
            .wait()
            .await
    }

    /// Soft disconnect: waits for requests in flight, then sends NBD_CMD_DISC and returns once
    /// it is on the wire and the socket is shut down for writing.
    pub async fn disconnect(&self) {
        // Holding every slot means no request is in flight (the available count would not:
        // it excludes the slots of requests still waiting for replies).
        let _ = tokio::time::timeout(
            Duration::from_secs(60),
            self.inner.slots.acquire_many(self.inner.capacity),
        )
        .await;
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.outgoing.send(Outgoing::Disconnect(Some(tx)));
        self.inner.slots.close();
        if sent.is_ok() {
            // The writer's own I/O timeouts bound this; an error drops the sender.
            let _ = rx.await;
        }
    }
}

/// Writes requests in order; flushes whenever the queue runs dry so headers are batched.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
    mode: HeaderMode,
    timeout: Duration,
) {
    let result: std::io::Result<()> = async {
        while let Some(msg) = rx.recv().await {
            let disconnect = match msg {
                Outgoing::Request {
                    header,
                    header_len,
                    payload,
                } => {
                    if payload.is_empty() {
                        io_timeout(timeout, wr.write_all(&header[..header_len])).await?;
                    } else {
                        // The header goes out in the same writev as its data.
                        let mut pieces = Vec::with_capacity(payload.len() + 1);
                        pieces.push(Bytes::copy_from_slice(&header[..header_len]));
                        pieces.extend(payload);
                        io_timeout(
                            timeout,
                            crate::vectored::write_all_vectored(&mut wr, &mut pieces),
                        )
                        .await?;
                    }
                    None
                }
                Outgoing::Disconnect(ack) => {
                    let request = Request {
                        flags: 0,
                        command: CMD_DISC,
                        cookie: 0,
                        offset: 0,
                        length: 0,
                    };
                    let mut header = Vec::new();
                    request.encode(mode, &mut header);
                    io_timeout(timeout, wr.write_all(&header)).await?;
                    Some(ack)
                }
            };
            if disconnect.is_some() || rx.is_empty() {
                io_timeout(timeout, wr.flush()).await?;
            }
            if let Some(ack) = disconnect {
                let _ = io_timeout(timeout, wr.shutdown()).await;
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        shared.fail_all(if e.kind() == std::io::ErrorKind::TimedOut {
            Error::Timeout("the server stopped accepting requests".into())
        } else {
            Error::io("sending a request", e)
        });
    }
}

async fn io_timeout<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Parses replies and completes requests.
struct Reader<R> {
    rd: BufReader<R>,
    shared: Arc<Shared>,
    mode: HeaderMode,
    timeout: Duration,
    context_ids: Vec<u32>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    async fn run(mut self) {
        let err = match self.read_replies().await {
            Ok(()) => Error::Closed("the server closed the connection".into()),
            Err(e) => e,
        };
        if self.shared.in_flight() > 0 {
            tracing::debug!("NBD connection failed: {err}");
        }
        self.shared.fail_all(err);
    }

    /// Fills `buf` completely. While `idle_ok` and nothing is in flight, silence is fine; otherwise
    /// `timeout` without a byte is a stall (for an idle wait, counted from when the first request
    /// went out, not from when the wait began). Uses `read`, which is cancel-safe, under the timeout.
    async fn fill(&mut self, buf: &mut [u8], idle_ok: bool, what: &str) -> Result<bool> {
        let mut got = 0;
        let mut idle_wait = self.timeout;
        while got < buf.len() {
            let wait = if got == 0 && idle_ok {
                idle_wait
            } else {
                self.timeout
            };
            match tokio::time::timeout(wait, self.rd.read(&mut buf[got..])).await {
                Ok(Ok(0)) if got == 0 && idle_ok => return Ok(false),
                Ok(Ok(0)) => {
                    return Err(Error::Closed(format!(
                        "the server closed the connection in the middle of {what}"
                    )));
                }
                Ok(Ok(n)) => got += n,
                Ok(Err(e)) => return Err(Error::io(format!("reading {what}"), e)),
                Err(_) if got == 0 && idle_ok => match self.shared.idle_wait(self.timeout) {
                    Some(left) => idle_wait = left,
                    None => return Err(self.stalled(what)),
                },
                Err(_) => return Err(self.stalled(what)),
            }
        }
        Ok(true)
    }

    fn stalled(&self, what: &str) -> Error {
        Error::Timeout(format!(
            "the server sent nothing for {} s while {} requests were in flight \
             (waiting for {what})",
            self.timeout.as_secs_f64(),
            self.shared.in_flight()
        ))
    }

    async fn read_replies(&mut self) -> Result<()> {
        loop {
            let mut header = [0u8; EXTENDED_REPLY_LEN];
            if !self.fill(&mut header[..4], true, "a reply header").await? {
                let n = self.shared.in_flight();
                return if n == 0 {
                    Ok(())
                } else {
                    Err(Error::Closed(format!(
                        "the server closed the connection with {n} requests in flight"
                    )))
                };
            }
            let len = ReplyHeader::header_len(header[..4].try_into().expect("4 bytes"))?;
            self.fill(&mut header[4..len], false, "a reply header")
                .await?;
            let header = ReplyHeader::decode(&header[..len], self.mode)?;
            let cookie = header.cookie();
            let mut pending = self.shared.take(cookie)?;
            match self.handle(header, &mut pending).await {
                Ok(true) => pending.finish(),
                Ok(false) => self.shared.put_back(cookie, pending),
                Err(e) => {
                    let _ = pending.done.send(Err(e.clone()));
                    return Err(e);
                }
            }
        }
    }

    /// Consumes one reply header and its payload. Returns true when the request is complete.
    async fn handle(&mut self, header: ReplyHeader, p: &mut Pending) -> Result<bool> {
        match header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    p.error = Some(p.command_error(error, String::new(), None));
                } else if p.command == CMD_READ {
                    if self.mode != HeaderMode::Simple {
                        return Err(Error::Protocol(
                            "simple reply to a read after structured replies were negotiated"
                                .into(),
                        ));
                    }
                    let mut data = p.data.take().unwrap_or_default();
                    let ok = self.fill(&mut data, false, "read data").await;
                    p.data = Some(data);
                    ok?;
                    p.fill(p.offset, p.length)?;
                } else if p.command == CMD_BLOCK_STATUS {
                    return Err(Error::Protocol(
                        "simple success reply to block status".into(),
                    ));
                }
                Ok(true)
            }
            ReplyHeader::Chunk {
                flags,
                chunk_type,
                offset,
                length,
                ..
            } => {
                if let Some(echo) = offset
                    && echo != p.offset
                {
                    return Err(Error::Protocol(format!(
                        "reply chunk echoes offset {echo}, request was at {}",
                        p.offset
                    )));
                }
                self.handle_chunk(chunk_type, length, p).await?;
                if chunk_type == CHUNK_NONE && flags & REPLY_FLAG_DONE == 0 {
                    return Err(Error::Protocol("NONE chunk without the DONE flag".into()));
                }
                Ok(flags & REPLY_FLAG_DONE != 0)
            }
        }
    }

    async fn handle_chunk(&mut self, chunk_type: u16, length: u64, p: &mut Pending) -> Result<()> {
        if chunk_type == CHUNK_OFFSET_DATA {
            if p.command != CMD_READ {
                return Err(Error::Protocol(format!(
                    "data chunk in reply to {}",
                    command_name(p.command)
                )));
            }
            if length <= OFFSET_DATA_HEADER_LEN as u64 || length - 8 > p.length {
                return Err(Error::Protocol(format!(
                    "data chunk of {length} bytes for a read of {}",
                    p.length
                )));
            }
            let mut head = [0u8; OFFSET_DATA_HEADER_LEN];
            self.fill(&mut head, false, "a data chunk").await?;
            let start = u64::from_be_bytes(head);
            let data_len = length - OFFSET_DATA_HEADER_LEN as u64;
            p.fill(start, data_len)?;
            let at = (start - p.offset) as usize;
            let mut data = p.data.take().unwrap_or_default();
            let ok = self
                .fill(&mut data[at..at + data_len as usize], false, "read data")
                .await;
            p.data = Some(data);
            ok?;
            return Ok(());
        }
        if length > MAX_METADATA_CHUNK_LEN {
            return Err(Error::Protocol(format!(
                "reply chunk of type {chunk_type} claims {length} bytes, over the limit"
            )));
        }
        let mut payload = vec![0u8; length as usize];
        self.fill(&mut payload, false, "a reply chunk").await?;
        match Chunk::decode(chunk_type, &payload, length)? {
            Chunk::None | Chunk::OffsetData { .. } => {}
            Chunk::OffsetHole { offset, length } => {
                if p.command != CMD_READ {
                    return Err(Error::Protocol(format!(
                        "hole chunk in reply to {}",
                        command_name(p.command)
                    )));
                }
                p.fill(offset, u64::from(length))?;
                let at = (offset - p.offset) as usize;
                if let Some(data) = p.data.as_mut() {
                    data[at..at + length as usize].fill(0);
                }
            }
            Chunk::BlockStatus {
                context,
                descriptors,
            } => {
                let expected = if self.mode == HeaderMode::Extended {
                    CHUNK_BLOCK_STATUS_EXT
                } else {
                    CHUNK_BLOCK_STATUS
                };
                if p.command != CMD_BLOCK_STATUS || chunk_type != expected {
                    return Err(Error::Protocol(format!(
                        "block status chunk of type {chunk_type} in reply to {}",
                        command_name(p.command)
                    )));
                }
                if !self.context_ids.contains(&context) {
                    return Err(Error::Protocol(format!(
                        "block status for meta context id {context}, which was never negotiated"
                    )));
                }
                if descriptors.iter().any(|d| d.length == 0) {
                    return Err(Error::Protocol(
                        "block status descriptor of length 0".into(),
                    ));
                }
                if p.status.iter().any(|(c, _)| *c == context) {
                    return Err(Error::Protocol(format!(
                        "two block status chunks for meta context id {context}"
                    )));
                }
                p.status.push((context, descriptors));
            }
            Chunk::Error { error, message } => {
                if p.error.is_none() {
                    p.error = Some(p.command_error(error, message, None));
                }
            }
            Chunk::ErrorOffset {
                error,
                message,
                offset,
            } => {
                if p.error.is_none() {
                    p.error = Some(p.command_error(error, message, Some(offset)));
                }
            }
            Chunk::UnknownError { chunk_type } => {
                if p.error.is_none() {
                    p.error = Some(p.command_error(
                        EINVAL,
                        format!("unknown error chunk type {chunk_type:#x}"),
                        None,
                    ));
                }
            }
        }
        Ok(())
    }
}
