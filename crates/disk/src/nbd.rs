//! NBD exports as endpoints, over ferry's own pipelined client. Capabilities come straight from
//! the handshake: block sizes, read-only, WRITE_ZEROES, FAST_ZERO, FLUSH, multi-conn, and
//! `base:allocation` for extents.
//!
//! Requests that fail on the way are retried under [`crate::retry`]: a connection that broke
//! (or went silent) is made again — a new handshake on the same URI and export, checked to
//! have the same size and flags, else the copy stops with `Changed` — and the request is sent
//! again (reads and writes at an offset are idempotent). A server restarted on the same socket
//! or port thus continues the copy. EIO reported by the server is retried the same bounded
//! number of times, on the same connection (network storage blips).

use std::future::Future;
use std::sync::RwLock;

use bytes::Bytes;
use nbd::client::ZeroFlags;
use nbd::proto::consts::*;
use nbd::{Client, ConnectOptions};

use crate::endpoint::{BoxFut, Caps, DiskError, Endpoint, ErrorKind, Op, zero_bytes};
use crate::extents::Extent;
use crate::retry::{Backoff, RetryPolicy};

/// Request size nbdcopy uses for NBD, and a good default for pipelining.
pub const DEFAULT_NBD_REQUEST: u64 = 256 << 10;

/// The dirty bitmap context the connection negotiated, if any.
fn dirty_context(client: &Client) -> Option<String> {
    client
        .info()
        .contexts
        .iter()
        .map(|(name, _)| name.clone())
        .find(|name| name.starts_with(CONTEXT_DIRTY_BITMAP_PREFIX))
}

pub struct NbdEndpoint {
    name: String,
    /// The connections in use, and how many times they were made again.
    client: RwLock<(u64, Client)>,
    caps: Caps,
    /// How to connect again: the options and connection count of the first connection.
    reconnect: Option<(ConnectOptions, usize)>,
    /// Serialises reconnects, so requests that broke together reconnect once; holds the error
    /// of the generation whose reconnect gave up, which every request of it then reports.
    reconnecting: tokio::sync::Mutex<Option<(u64, DiskError)>>,
    retry: RetryPolicy,
}

impl NbdEndpoint {
    /// Connects up to `connections` times (more than one only with CAN_MULTI_CONN), asking for
    /// `base:allocation` when `extents` is wanted.
    pub async fn connect(
        name: &str,
        opts: &ConnectOptions,
        connections: usize,
        extents: bool,
    ) -> Result<Self, DiskError> {
        let mut opts = opts.clone();
        if extents
            && !opts
                .settings
                .meta_contexts
                .iter()
                .any(|c| c == CONTEXT_BASE_ALLOCATION)
        {
            opts.settings
                .meta_contexts
                .push(CONTEXT_BASE_ALLOCATION.into());
        }
        let client = Client::connect(&opts, connections.max(1))
            .await
            .map_err(|e| DiskError::from_nbd(name, Op::Open, &e))?;
        let mut ep = Self::from_client(name, client, extents);
        ep.reconnect = Some((opts, connections.max(1)));
        Ok(ep)
    }

    /// How requests that fail on the way are retried (default [`RetryPolicy::default`]).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn from_client(name: &str, client: Client, extents: bool) -> Self {
        let info = client.info();
        let b = info.block_size;
        let min = u64::from(b.minimum);
        let max = (u64::from(b.maximum) / min * min).max(min);
        let caps = Caps {
            size: Some(info.size),
            read_only: info.has_flag(TFLAG_READ_ONLY),
            extents: extents && info.context_id(CONTEXT_BASE_ALLOCATION).is_some(),
            efficient_zero: info.has_flag(TFLAG_SEND_WRITE_ZEROES),
            fast_zero: info.has_flag(TFLAG_SEND_WRITE_ZEROES)
                && info.has_flag(TFLAG_SEND_FAST_ZERO),
            flush: info.has_flag(TFLAG_SEND_FLUSH),
            needs_flush: false,
            sequential: false,
            connections: None,
            min_block: min,
            preferred_block: u64::from(b.preferred),
            max_request: max,
            default_request: DEFAULT_NBD_REQUEST.clamp(min, max),
            queue_depth: 64,
            queue_bytes: None,
            known_zero: false,
            dirty: dirty_context(&client).is_some(),
        };
        NbdEndpoint {
            name: name.to_string(),
            client: RwLock::new((0, client)),
            caps,
            reconnect: None,
            reconnecting: tokio::sync::Mutex::new(None),
            retry: RetryPolicy::default(),
        }
    }

    /// The connections in use now.
    pub fn client(&self) -> Client {
        self.current().1
    }

    fn current(&self) -> (u64, Client) {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn err(&self, op: Op, offset: u64, len: u64, e: &nbd::Error) -> DiskError {
        DiskError::from_nbd(&self.name, op, e).at(offset, len)
    }

    /// Writes `parts` back to back from `offset` as one write, without copying them together
    /// (retried like [`Endpoint::write`]).
    pub async fn write_parts(&self, offset: u64, parts: Vec<Bytes>) -> Result<(), DiskError> {
        let len = parts.iter().map(|p| p.len() as u64).sum();
        self.retrying(Op::Write, offset, len, move |c| {
            let parts = parts.clone();
            async move { c.write_parts(offset, parts, false).await }
        })
        .await
    }

    /// Runs `request` on the current connections, again while its failure is retryable and
    /// the retry policy allows; connections that broke are made again first.
    async fn retrying<T, F, Fut>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        request: F,
    ) -> Result<T, DiskError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = nbd::Result<T>>,
    {
        let mut backoff = Backoff::new(self.retry);
        loop {
            let (generation, client) = self.current();
            let e = match request(client).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let err = self.err(op, offset, len, &e);
            if e.is_fatal() && err.is_retryable() && self.reconnect.is_some() {
                self.connect_again(generation, &mut backoff, err).await?;
                continue;
            }
            if !backoff.again(&err).await {
                return Err(backoff.give_up(err));
            }
        }
    }

    /// Replaces connections of `generation` that broke (`broke` says how) with new ones, once
    /// however many requests broke with them: the first request to get here connects, under
    /// its retry policy, while the others wait for it. The export must be the one the copy
    /// started with.
    async fn connect_again(
        &self,
        generation: u64,
        backoff: &mut Backoff,
        broke: DiskError,
    ) -> Result<(), DiskError> {
        let Some((opts, connections)) = &self.reconnect else {
            return Err(broke);
        };
        let mut gave_up = self.reconnecting.lock().await;
        if let Some((g, err)) = gave_up.as_ref()
            && *g == generation
        {
            return Err(err.clone());
        }
        let mut last = broke;
        loop {
            if self.current().0 != generation {
                return Ok(());
            }
            if !backoff.again(&last).await {
                let err = backoff.give_up(last);
                *gave_up = Some((generation, err.clone()));
                return Err(err);
            }
            let client = match Client::connect(opts, *connections).await {
                Ok(client) => client,
                Err(e) => {
                    // A server on its way back may refuse, or not have its socket yet.
                    let mut err = last.clone();
                    err.cause = format!("{} (connecting again: {})", err.cause, e.reason());
                    if !matches!(
                        e.kind(),
                        ErrorKind::ConnectionLost
                            | ErrorKind::NotFound
                            | ErrorKind::Timeout
                            | ErrorKind::Io
                    ) {
                        err.kind = e.kind();
                    }
                    last = err;
                    continue;
                }
            };
            let (old, new) = (self.client().info().clone(), client.info().clone());
            if (old.size, old.flags) != (new.size, new.flags) {
                return Err(DiskError::new(
                    &self.name,
                    Op::Open,
                    ErrorKind::Changed,
                    format!(
                        "the export changed while the connection was down: size {} flags \
                         {:#x} before, size {} flags {:#x} now",
                        old.size, old.flags, new.size, new.flags
                    ),
                ));
            }
            tracing::warn!("{}: connected again", self.name);
            *self.client.write().unwrap_or_else(|p| p.into_inner()) = (generation + 1, client);
            return Ok(());
        }
    }
}

impl Endpoint for NbdEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn caps(&self) -> &Caps {
        &self.caps
    }

    fn read(&self, offset: u64, len: u64) -> BoxFut<'_, Bytes> {
        Box::pin(self.retrying(Op::Read, offset, len, move |c| async move {
            c.read(offset, len).await
        }))
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFut<'_, ()> {
        let len = data.len() as u64;
        Box::pin(self.retrying(Op::Write, offset, len, move |c| {
            let data = data.clone();
            async move { c.write(offset, data, false).await }
        }))
    }

    fn zero(&self, offset: u64, len: u64, allocate: bool) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.caps.efficient_zero {
                let flags = ZeroFlags {
                    no_hole: allocate,
                    ..ZeroFlags::default()
                };
                return self
                    .retrying(Op::Zero, offset, len, move |c| async move {
                        c.write_zeroes(offset, len, flags).await
                    })
                    .await;
            }
            // No WRITE_ZEROES: send zero bytes, pipelined in max-request pieces.
            let step = self.caps.max_request.min(1 << 20);
            let mut writes = Vec::new();
            let mut pos = offset;
            while pos < offset + len {
                let n = step.min(offset + len - pos);
                writes.push(self.retrying(Op::Zero, pos, n, move |c| async move {
                    c.write(pos, zero_bytes(n as usize), false).await
                }));
                pos += n;
            }
            for w in writes {
                w.await?;
            }
            Ok(())
        })
    }

    fn fast_zero(&self, offset: u64, len: u64) -> BoxFut<'_, bool> {
        Box::pin(async move {
            if !self.caps.fast_zero {
                return Ok(false);
            }
            let flags = ZeroFlags {
                fast: true,
                ..ZeroFlags::default()
            };
            match self.client().write_zeroes(offset, len, flags).await {
                Ok(()) => Ok(true),
                Err(e) if e.errno() == Some(ENOTSUP) => Ok(false),
                Err(e) => Err(self.err(Op::Zero, offset, len, &e)),
            }
        })
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<Extent>> {
        Box::pin(async move {
            if !self.caps.extents {
                return Ok(vec![Extent::data(offset, len)]);
            }
            let status = self
                .retrying(Op::Extents, offset, len, move |c| async move {
                    c.block_status(CONTEXT_BASE_ALLOCATION, offset, len).await
                })
                .await?;
            Ok(status
                .into_iter()
                .map(|s| Extent {
                    offset: s.offset,
                    length: s.length,
                    zero: s.flags & u64::from(STATE_ZERO) != 0,
                    hole: s.flags & u64::from(STATE_HOLE) != 0,
                })
                .collect())
        })
    }

    fn dirty(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<(Extent, bool)>> {
        Box::pin(async move {
            let Some(context) = dirty_context(&self.client()) else {
                return Err(DiskError::new(
                    &self.name,
                    Op::Extents,
                    ErrorKind::Unsupported,
                    "no qemu:dirty-bitmap context was negotiated",
                )
                .at(offset, len));
            };
            let status = self
                .retrying(Op::Extents, offset, len, |c| {
                    let context = context.clone();
                    async move { c.block_status(&context, offset, len).await }
                })
                .await?;
            Ok(status
                .into_iter()
                .map(|s| (Extent::data(s.offset, s.length), s.flags & 1 != 0))
                .collect())
        })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if !self.caps.flush {
                return Ok(());
            }
            // A flush after a reconnect covers only the new connections: what the old ones
            // wrote is durable only if the server made it so, which a restarted server did.
            self.retrying(Op::Flush, 0, 0, |c| async move { c.flush().await })
                .await
                .map_err(|mut e| {
                    (e.offset, e.length) = (None, None);
                    e
                })
        })
    }

    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.client().disconnect().await;
            Ok(())
        })
    }

    fn abort(&self) -> BoxFut<'_, ()> {
        // Dropping the last handle sends NBD_CMD_DISC without waiting for replies.
        Box::pin(async { Ok(()) })
    }
}
