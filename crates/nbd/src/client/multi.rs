//! [`Client`]: the export-level API. It validates requests against what the server negotiated
//! (alignment, size, read-only, supported commands), splits requests over the maximum payload,
//! loops block status until a range is covered, and spreads requests over N connections when
//! the server advertises CAN_MULTI_CONN.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use super::connection::ZeroFlags;
use super::{ConnectOptions, Connection, Negotiated, PendingReply, Reply};
use crate::error::{Error, Result};
use crate::proto::HeaderMode;
use crate::proto::consts::*;

/// One extent of a meta context: `flags` is the context's status value (for `base:allocation`,
/// STATE_HOLE | STATE_ZERO bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub offset: u64,
    pub length: u64,
    pub flags: u64,
}

/// Handshake deadline for connections beyond the first.
const EXTRA_CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A connected export over one or more connections.
#[derive(Clone)]
pub struct Client {
    conns: Arc<Vec<Connection>>,
    next: Arc<AtomicUsize>,
}

impl Client {
    /// Connects up to `connections` times. Extra connections are opened only when the server
    /// advertises CAN_MULTI_CONN; otherwise one connection carries every request.
    pub async fn connect(opts: &ConnectOptions, connections: usize) -> Result<Client> {
        let first = opts.connect().await?;
        let mut conns = vec![first];
        if connections > 1 && conns[0].info().has_flag(TFLAG_CAN_MULTI_CONN) {
            // A server may advertise multi-conn yet admit fewer clients (qemu-nbd --shared=N
            // accepts the socket but withholds the greeting): extra connections get a short
            // handshake deadline, and the copy goes on with those that made it.
            let mut extra = opts.clone();
            extra.settings.handshake_timeout = Some(
                opts.settings
                    .handshake_timeout
                    .unwrap_or(opts.settings.timeout)
                    .min(EXTRA_CONNECTION_TIMEOUT),
            );
            let mut tasks = Vec::new();
            for _ in 1..connections {
                let extra = extra.clone();
                tasks.push(tokio::spawn(async move { extra.connect().await }));
            }
            for task in tasks {
                let conn = match task.await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        tracing::info!("extra NBD connection refused, continuing with fewer: {e}");
                        continue;
                    }
                    Err(e) => return Err(Error::Closed(format!("connection task failed: {e}"))),
                };
                if conn.info().size != conns[0].info().size {
                    return Err(Error::Protocol(
                        "the export changed size between connections".into(),
                    ));
                }
                conns.push(conn);
            }
        }
        Ok(Client::from_connections(conns))
    }

    pub fn from_connections(conns: Vec<Connection>) -> Client {
        assert!(!conns.is_empty(), "a client needs a connection");
        Client {
            conns: Arc::new(conns),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn info(&self) -> &Negotiated {
        self.conns[0].info()
    }

    pub fn size(&self) -> u64 {
        self.info().size
    }

    pub fn connections(&self) -> &[Connection] {
        &self.conns
    }

    /// The connection with the fewest requests in flight, ties broken round-robin.
    fn pick(&self) -> &Connection {
        if self.conns.len() == 1 {
            return &self.conns[0];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.conns.len())
            .map(|i| &self.conns[(start + i) % self.conns.len()])
            .min_by_key(|c| c.in_flight())
            .expect("at least one connection")
    }

    fn check_range(&self, op: &str, offset: u64, length: u64, aligned: bool) -> Result<()> {
        let info = self.info();
        let end = offset.checked_add(length);
        if end.is_none_or(|end| end > info.size) {
            return Err(Error::InvalidArgument(format!(
                "{op} at offset {offset} length {length} goes past the end of the export ({} bytes)",
                info.size
            )));
        }
        let min = u64::from(info.block_size.minimum);
        if aligned && (!offset.is_multiple_of(min) || !length.is_multiple_of(min)) {
            return Err(Error::InvalidArgument(format!(
                "{op} at offset {offset} length {length} is not aligned to the export's \
                 minimum block size of {min} bytes"
            )));
        }
        Ok(())
    }

    fn check_writable(&self, op: &str) -> Result<()> {
        if self.info().has_flag(TFLAG_READ_ONLY) {
            return Err(Error::Unsupported(format!("{op}: the export is read-only")));
        }
        Ok(())
    }

    fn require(&self, flag: u16, op: &str) -> Result<()> {
        if self.info().has_flag(flag) {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "{op}: the server does not support it on this export"
            )))
        }
    }

    fn fua_flag(&self, fua: bool) -> Result<u16> {
        if !fua {
            return Ok(0);
        }
        self.require(TFLAG_SEND_FUA, "write with FUA")?;
        Ok(CMD_FLAG_FUA)
    }

    /// Largest piece a READ or WRITE may carry: the maximum payload, aligned to the minimum.
    fn max_payload(&self) -> u64 {
        let b = self.info().block_size;
        let max = u64::from(b.maximum);
        let min = u64::from(b.minimum);
        (max / min * min).max(min)
    }

    /// Largest effect length of a payload-less command.
    fn max_effect(&self) -> u64 {
        let min = u64::from(self.info().block_size.minimum);
        match self.info().mode {
            HeaderMode::Extended => u64::MAX / 2 / min * min,
            _ => u64::from(u32::MAX) / min * min,
        }
    }

    /// Sends `command` over [offset, offset+length) in pieces of at most `max` bytes, pipelined,
    /// and waits for every piece.
    async fn split_call(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        max: u64,
    ) -> Result<()> {
        let mut pending: Vec<PendingReply> = Vec::new();
        for (off, len) in pieces(offset, length, max) {
            pending.push(self.pick().submit(command, flags, off, len, None).await?);
        }
        for p in pending {
            p.wait().await?;
        }
        Ok(())
    }

    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes> {
        self.check_range("read", offset, length, true)?;
        if length == 0 {
            return Ok(Bytes::new());
        }
        let max = self.max_payload();
        if length <= max {
            return match self.pick().call(CMD_READ, 0, offset, length, None).await? {
                Reply::Data(data) => Ok(data),
                other => Err(Error::Protocol(format!("read returned {other:?}"))),
            };
        }
        let mut pending = Vec::new();
        for (off, len) in pieces(offset, length, max) {
            pending.push(self.pick().submit(CMD_READ, 0, off, len, None).await?);
        }
        let mut out = bufpool::get(length as usize);
        let mut at = 0;
        for p in pending {
            match p.wait().await? {
                Reply::Data(data) => {
                    out[at..at + data.len()].copy_from_slice(&data);
                    at += data.len();
                }
                other => return Err(Error::Protocol(format!("read returned {other:?}"))),
            }
        }
        Ok(out.freeze())
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_parts(offset, vec![data], fua).await
    }

    /// Writes `parts`, back to back from `offset`, as if they were one buffer: each request
    /// carries the pieces of them it covers, sent without copying them together.
    pub async fn write_parts(&self, offset: u64, parts: Vec<Bytes>, fua: bool) -> Result<()> {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        self.check_writable("write")?;
        self.check_range("write", offset, total, true)?;
        let flags = self.fua_flag(fua)?;
        let max = self.max_payload();
        let mut parts = parts.into_iter().filter(|p| !p.is_empty());
        let mut current: Option<Bytes> = None;
        let mut pending = Vec::new();
        for (off, len) in pieces(offset, total, max) {
            let mut payload = Vec::new();
            let mut need = len as usize;
            while need > 0 {
                let mut part = match current.take() {
                    Some(p) => p,
                    None => parts.next().expect("the parts add up to the total"),
                };
                if part.len() > need {
                    current = Some(part.split_off(need));
                }
                need -= part.len();
                payload.push(part);
            }
            pending.push(
                self.pick()
                    .submit_parts(CMD_WRITE, flags, off, len, payload)
                    .await?,
            );
        }
        for p in pending {
            p.wait().await?;
        }
        Ok(())
    }

    pub async fn write_zeroes(&self, offset: u64, length: u64, zf: ZeroFlags) -> Result<()> {
        self.check_writable("write zeroes")?;
        self.check_range("write zeroes", offset, length, true)?;
        self.require(TFLAG_SEND_WRITE_ZEROES, "write zeroes")?;
        let mut flags = self.fua_flag(zf.fua)?;
        if zf.no_hole {
            flags |= CMD_FLAG_NO_HOLE;
        }
        if zf.fast {
            self.require(TFLAG_SEND_FAST_ZERO, "fast zero")?;
            flags |= CMD_FLAG_FAST_ZERO;
        }
        self.split_call(CMD_WRITE_ZEROES, flags, offset, length, self.max_effect())
            .await
    }

    pub async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        self.check_writable("trim")?;
        self.check_range("trim", offset, length, true)?;
        self.require(TFLAG_SEND_TRIM, "trim")?;
        let flags = self.fua_flag(fua)?;
        self.split_call(CMD_TRIM, flags, offset, length, self.max_effect())
            .await
    }

    pub async fn cache(&self, offset: u64, length: u64) -> Result<()> {
        self.check_range("cache", offset, length, false)?;
        self.require(TFLAG_SEND_CACHE, "cache")?;
        self.split_call(CMD_CACHE, 0, offset, length, self.max_payload())
            .await
    }

    /// Flushes writes that have completed. With multi-conn one flush covers every connection;
    /// without it there is only one connection.
    pub async fn flush(&self) -> Result<()> {
        self.require(TFLAG_SEND_FLUSH, "flush")?;
        self.conns[0].call(CMD_FLUSH, 0, 0, 0, None).await?;
        Ok(())
    }

    /// One BLOCK_STATUS request; descriptors per context id as the server sent them.
    pub async fn block_status_once(
        &self,
        offset: u64,
        length: u64,
        req_one: bool,
    ) -> Result<Vec<(u32, Vec<crate::proto::Descriptor>)>> {
        if self.info().contexts.is_empty() {
            return Err(Error::Unsupported(
                "block status: no meta context was negotiated".into(),
            ));
        }
        self.check_range("block status", offset, length, false)?;
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        let length = length.min(self.max_effect());
        match self
            .pick()
            .call(CMD_BLOCK_STATUS, flags, offset, length, None)
            .await?
        {
            Reply::Status(status) => Ok(status),
            other => Err(Error::Protocol(format!("block status returned {other:?}"))),
        }
    }

    /// The extents of `context` over [offset, offset+length), looping until the range is
    /// covered; the last extent is clipped and equal neighbours are merged.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<StatusExtent>> {
        let id = self.info().context_id(context).ok_or_else(|| {
            Error::Unsupported(format!(
                "block status: meta context {context:?} was not negotiated"
            ))
        })?;
        self.check_range("block status", offset, length, false)?;
        let end = offset + length;
        let mut extents: Vec<StatusExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let status = self.block_status_once(pos, end - pos, false).await?;
            let descriptors = status
                .into_iter()
                .find(|(c, _)| *c == id)
                .map(|(_, d)| d)
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "block status at offset {pos} has no extents for {context}"
                    ))
                })?;
            let before = pos;
            for d in descriptors {
                if pos >= end {
                    break;
                }
                let len = d.length.min(end - pos);
                match extents.last_mut() {
                    Some(last) if last.flags == d.flags && last.offset + last.length == pos => {
                        last.length += len;
                    }
                    _ => extents.push(StatusExtent {
                        offset: pos,
                        length: len,
                        flags: d.flags,
                    }),
                }
                pos += len;
            }
            if pos == before {
                return Err(Error::Protocol(format!(
                    "block status at offset {pos} made no progress"
                )));
            }
        }
        Ok(extents)
    }

    /// Soft-disconnects every connection.
    pub async fn disconnect(&self) {
        for c in self.conns.iter() {
            c.disconnect().await;
        }
    }
}

/// Splits [offset, offset+length) into pieces of at most `max` bytes.
fn pieces(offset: u64, length: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + length;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let len = (end - pos).min(max);
        let piece = (pos, len);
        pos += len;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn pieces_cover_the_range_without_overlap() {
        let p: Vec<_> = pieces(100, 1000, 300).collect();
        assert_eq!(p, vec![(100, 300), (400, 300), (700, 300), (1000, 100)]);
        assert_eq!(pieces(0, 0, 10).count(), 0);
        assert_eq!(pieces(5, 10, 10).collect::<Vec<_>>(), vec![(5, 10)]);
    }
}
