//! NBD exports as endpoints, over ferry's own pipelined client. Capabilities come straight from
//! the handshake: block sizes, read-only, WRITE_ZEROES, FAST_ZERO, FLUSH, multi-conn, and
//! `base:allocation` for extents.

use bytes::Bytes;
use nbd::client::ZeroFlags;
use nbd::proto::consts::*;
use nbd::{Client, ConnectOptions};

use crate::endpoint::{BoxFut, Caps, DiskError, Endpoint, ErrorKind, Op, zero_bytes};
use crate::extents::Extent;

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
    client: Client,
    caps: Caps,
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
                .meta_contexts
                .iter()
                .any(|c| c == CONTEXT_BASE_ALLOCATION)
        {
            opts.meta_contexts.push(CONTEXT_BASE_ALLOCATION.into());
        }
        let client = Client::connect(&opts, connections.max(1))
            .await
            .map_err(|e| DiskError::from_nbd(name, Op::Open, &e))?;
        Ok(Self::from_client(name, client, extents))
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
            known_zero: false,
            dirty: dirty_context(&client).is_some(),
        };
        NbdEndpoint {
            name: name.to_string(),
            client,
            caps,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn err(&self, op: Op, offset: u64, len: u64, e: &nbd::Error) -> DiskError {
        DiskError::from_nbd(&self.name, op, e).at(offset, len)
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
        Box::pin(async move {
            self.client
                .read(offset, len)
                .await
                .map_err(|e| self.err(Op::Read, offset, len, &e))
        })
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            self.client
                .write(offset, data, false)
                .await
                .map_err(|e| self.err(Op::Write, offset, len, &e))
        })
    }

    fn zero(&self, offset: u64, len: u64, allocate: bool) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.caps.efficient_zero {
                let flags = ZeroFlags {
                    no_hole: allocate,
                    ..ZeroFlags::default()
                };
                return self
                    .client
                    .write_zeroes(offset, len, flags)
                    .await
                    .map_err(|e| self.err(Op::Zero, offset, len, &e));
            }
            // No WRITE_ZEROES: send zero bytes, pipelined in max-request pieces.
            let step = self.caps.max_request.min(1 << 20);
            let mut writes = Vec::new();
            let mut pos = offset;
            while pos < offset + len {
                let n = step.min(offset + len - pos);
                writes.push(self.client.write(pos, zero_bytes(n as usize), false));
                pos += n;
            }
            for w in writes {
                w.await.map_err(|e| self.err(Op::Zero, offset, len, &e))?;
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
            match self.client.write_zeroes(offset, len, flags).await {
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
                .client
                .block_status(CONTEXT_BASE_ALLOCATION, offset, len)
                .await
                .map_err(|e| self.err(Op::Extents, offset, len, &e))?;
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
            let Some(context) = dirty_context(&self.client) else {
                return Err(DiskError::new(
                    &self.name,
                    Op::Extents,
                    ErrorKind::Unsupported,
                    "no qemu:dirty-bitmap context was negotiated",
                )
                .at(offset, len));
            };
            let status = self
                .client
                .block_status(&context, offset, len)
                .await
                .map_err(|e| self.err(Op::Extents, offset, len, &e))?;
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
            self.client
                .flush()
                .await
                .map_err(|e| DiskError::from_nbd(&self.name, Op::Flush, &e))
        })
    }

    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.client.disconnect().await;
            Ok(())
        })
    }

    fn abort(&self) -> BoxFut<'_, ()> {
        // Dropping the last handle sends NBD_CMD_DISC without waiting for replies.
        Box::pin(async { Ok(()) })
    }
}
