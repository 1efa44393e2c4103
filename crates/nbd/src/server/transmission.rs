//! The server's transmission phase: a reader parses requests and checks them against the
//! export (bounds, alignment, flags, read-only), each request runs as its own task within the
//! connection's in-flight limits, and a writer sends replies in completion order.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::handshake::{BASE_ALLOCATION_ID, Session};
use super::{Export, ExportError, ReadPiece, ServerConfig};
use crate::error::{Error, Result};
use crate::proto::consts::*;
use crate::proto::{Chunk, Descriptor, HeaderMode, ReplyHeader, Request};

/// Most descriptors sent in one block-status chunk (the spec's SHOULD).
const MAX_DESCRIPTORS: usize = 1 << 20;

/// One reply, as the byte pieces to write in order.
type Frame = Vec<Bytes>;

/// A reply on its way to the writer, with the request's in-flight permits: they are released
/// only once the reply has been handed to the socket, so a client that stops reading replies
/// stops the server from taking more requests instead of letting replies pile up.
type Outgoing = (Frame, (OwnedSemaphorePermit, OwnedSemaphorePermit));

pub async fn serve(session: Session, config: &ServerConfig) -> Result<()> {
    let Session {
        stream,
        export,
        mode,
        base_allocation,
        flags,
    } = session;
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let mut writer = tokio::spawn(write_loop(wr, rx));
    let slots = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let budget_total = config.max_in_flight_bytes.clamp(1, u32::MAX as u64) as u32;
    let budget = Arc::new(Semaphore::new(budget_total as usize));
    let ctx = Arc::new(Ctx {
        export,
        mode,
        base_allocation,
        flags,
        tx,
    });
    let mut writer_ended = false;
    let result = tokio::select! {
        r = read_loop(&mut rd, &ctx, &slots, &budget, budget_total) => r,
        // The writer only ends first when sending failed or stalled: no reply can reach the
        // client any more, so stop taking requests and close.
        w = &mut writer => {
            writer_ended = true;
            Err(match w {
                Ok(Err(e)) => Error::io("sending replies", e),
                _ => Error::Closed("the reply writer stopped".into()),
            })
        }
    };
    // Let requests in flight finish and their replies go out, then close.
    let _ = slots.acquire_many(config.max_in_flight.max(1) as u32).await;
    drop(ctx);
    if !writer_ended {
        let _ = writer.await;
    }
    result
}

struct Ctx {
    export: Arc<dyn Export>,
    mode: HeaderMode,
    base_allocation: bool,
    flags: u16,
    tx: mpsc::UnboundedSender<Outgoing>,
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    ctx: &Arc<Ctx>,
    slots: &Arc<Semaphore>,
    budget: &Arc<Semaphore>,
    budget_total: u32,
) -> Result<()> {
    let max_payload = u64::from(ctx.export.caps().block_size.maximum);
    loop {
        let mut header = [0u8; EXTENDED_REQUEST_LEN];
        let len = ctx.mode.request_len();
        match rd.read_exact(&mut header[..len]).await {
            Ok(_) => {}
            // A client that just closes (without DISC) is done too.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(Error::io("reading a request", e)),
        }
        let req = Request::decode(&header[..len], ctx.mode)?;
        if ctx.export.is_cancelled() {
            // The export was withdrawn (a deleted ticket): end the connection instead of
            // answering every further request with an error.
            return Err(Error::Closed("the export was cancelled".into()));
        }
        tracing::trace!(
            command = command_name(req.command),
            flags = req.flags,
            offset = req.offset,
            length = req.length,
            "request"
        );
        if req.command == CMD_DISC {
            return Ok(());
        }
        let payload_len = req.payload_len(ctx.mode);
        if payload_len > max_payload {
            // The spec lets a server hard-disconnect rather than swallow a huge payload.
            return Err(Error::Protocol(format!(
                "request carries {payload_len} bytes, over the {max_payload}-byte maximum"
            )));
        }
        let cost = if req.command == CMD_READ {
            req.length.min(max_payload)
        } else {
            payload_len
        }
        .min(u64::from(budget_total)) as u32;
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let bytes = budget
            .clone()
            .acquire_many_owned(cost)
            .await
            .expect("never closed");
        let payload = if payload_len > 0 {
            let mut buf = bufpool::get(payload_len as usize);
            rd.read_exact(&mut buf)
                .await
                .map_err(|e| Error::io("reading a write payload", e))?;
            Some(buf.freeze())
        } else {
            None
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let frame = handle(&ctx, req, payload).await;
            // If the writer is gone the permits are dropped with the reply.
            let _ = ctx.tx.send((frame, (slot, bytes)));
        });
    }
}

/// Most replies gathered into one vectored write, and most bytes.
const GATHER_FRAMES: usize = 32;
const GATHER_BYTES: usize = 8 << 20;

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    // A client that stops reading replies for this long is dropped, so its requests (and the
    // memory they hold) cannot pile up forever.
    let stall = std::time::Duration::from_secs(60);
    let timed = |r: std::result::Result<std::io::Result<()>, _>| {
        r.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    };
    let mut pieces: Vec<Bytes> = Vec::new();
    let mut permits = Vec::new();
    while let Some((frame, held)) = rx.recv().await {
        // Every reply already waiting goes out with this one, headers and data in one
        // writev: no small write for each header, no copy into a buffer.
        let mut bytes: usize = frame.iter().map(Bytes::len).sum();
        pieces.extend(frame);
        permits.push(held);
        while permits.len() < GATHER_FRAMES && bytes < GATHER_BYTES {
            let Ok((frame, held)) = rx.try_recv() else {
                break;
            };
            bytes += frame.iter().map(Bytes::len).sum::<usize>();
            pieces.extend(frame);
            permits.push(held);
        }
        timed(
            tokio::time::timeout(
                stall,
                crate::vectored::write_all_vectored(&mut wr, &mut pieces),
            )
            .await,
        )?;
        timed(tokio::time::timeout(stall, wr.flush()).await)?;
        permits.clear();
    }
    wr.shutdown().await
}

/// Checks a request against the export; the error to send if it is not acceptable.
fn validate(ctx: &Ctx, req: &Request) -> std::result::Result<(), ExportError> {
    let caps = ctx.export.caps();
    let size = ctx.export.size();
    let einval = |m: &str| Err(ExportError::new(EINVAL, m));
    let allowed_flags = match req.command {
        CMD_READ => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
        CMD_FLUSH | CMD_CACHE => CMD_FLAG_FUA,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return einval("unknown command"),
    };
    if req.flags & !allowed_flags != 0 {
        return einval("flag not valid for this command");
    }
    if req.flags & CMD_FLAG_DF != 0 && ctx.mode == HeaderMode::Simple {
        return einval("DF needs structured replies");
    }
    let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && caps.read_only {
        return Err(ExportError::new(EPERM, "the export is read-only"));
    }
    let supported = match req.command {
        CMD_TRIM => caps.trim,
        CMD_WRITE_ZEROES => caps.zero,
        CMD_FLUSH => caps.flush,
        _ => true,
    };
    if !supported {
        return einval("command not supported by this export");
    }
    if req.flags & CMD_FLAG_FAST_ZERO != 0 && !caps.fast_zero {
        // The export says zeroing is not fast: that is exactly what ENOTSUP answers.
        return Err(ExportError::new(
            ENOTSUP,
            "zeroing is not fast on this export",
        ));
    }
    if req.command == CMD_FLUSH {
        return Ok(());
    }
    let end = req.offset.checked_add(req.length);
    if end.is_none_or(|e| e > size) {
        let errno = if writes { ENOSPC } else { EINVAL };
        return Err(ExportError::new(
            errno,
            "request goes past the end of the export",
        ));
    }
    let min = u64::from(caps.block_size.minimum);
    if matches!(
        req.command,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES
    ) && (!req.offset.is_multiple_of(min) || !req.length.is_multiple_of(min))
    {
        return einval("request is not aligned to the minimum block size");
    }
    if req.command == CMD_READ && req.length > u64::from(caps.block_size.maximum) {
        return Err(ExportError::new(
            EOVERFLOW,
            "read longer than the maximum payload",
        ));
    }
    if req.command == CMD_BLOCK_STATUS && !ctx.base_allocation {
        return einval("no meta context was negotiated");
    }
    Ok(())
}

async fn handle(ctx: &Ctx, req: Request, payload: Option<Bytes>) -> Frame {
    if let Err(e) = validate(ctx, &req) {
        tracing::debug!(
            command = command_name(req.command),
            offset = req.offset,
            length = req.length,
            flags = req.flags,
            "refused: {}",
            e.message
        );
        return error_frame(ctx, &req, &e);
    }
    let export = ctx.export.as_ref();
    let fua = req.flags & CMD_FLAG_FUA != 0 && ctx.flags & TFLAG_SEND_FUA != 0;
    let result = match req.command {
        CMD_READ => match export.read(req.offset, req.length).await {
            Ok(pieces) => return read_frame(ctx, &req, pieces),
            Err(e) => Err(e),
        },
        CMD_WRITE => {
            export
                .write(req.offset, payload.unwrap_or_default(), fua)
                .await
        }
        CMD_FLUSH => export.flush().await,
        CMD_TRIM => match export.trim(req.offset, req.length).await {
            Ok(()) if fua => export.flush().await,
            other => other,
        },
        CMD_WRITE_ZEROES => {
            let punch = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            match export
                .write_zeroes(req.offset, req.length, punch, fast)
                .await
            {
                Ok(()) if fua => export.flush().await,
                other => other,
            }
        }
        CMD_CACHE => export.cache(req.offset, req.length).await,
        CMD_BLOCK_STATUS => match export.extents(req.offset, req.length).await {
            Ok(runs) => return status_frame(ctx, &req, runs),
            Err(e) => Err(e),
        },
        _ => Err(ExportError::new(EINVAL, "unknown command")),
    };
    match result {
        Ok(()) => done_frame(ctx, &req),
        Err(e) => {
            tracing::debug!(
                command = command_name(req.command),
                offset = req.offset,
                length = req.length,
                "failed: {}",
                e.message
            );
            error_frame(ctx, &req, &e)
        }
    }
}

fn chunk_header(ctx: &Ctx, req: &Request, flags: u16, chunk_type: u16, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(EXTENDED_REPLY_LEN + 16);
    ReplyHeader::encode_chunk(
        ctx.mode, flags, chunk_type, req.cookie, req.offset, len, &mut out,
    );
    out
}

fn done_frame(ctx: &Ctx, req: &Request) -> Frame {
    let mut out = Vec::with_capacity(EXTENDED_REPLY_LEN);
    if ctx.mode == HeaderMode::Extended {
        ReplyHeader::encode_chunk(
            ctx.mode,
            REPLY_FLAG_DONE,
            CHUNK_NONE,
            req.cookie,
            req.offset,
            0,
            &mut out,
        );
    } else {
        ReplyHeader::encode_simple(0, req.cookie, &mut out);
    }
    vec![Bytes::from(out)]
}

fn error_frame(ctx: &Ctx, req: &Request, err: &ExportError) -> Frame {
    if ctx.mode == HeaderMode::Simple {
        let mut out = Vec::with_capacity(SIMPLE_REPLY_LEN);
        ReplyHeader::encode_simple(err.errno, req.cookie, &mut out);
        return vec![Bytes::from(out)];
    }
    let mut payload = Vec::new();
    let message: String = err.message.chars().take(1024).collect();
    let chunk_type = Chunk::Error {
        error: err.errno,
        message,
    }
    .encode_payload(false, &mut payload);
    let mut out = chunk_header(ctx, req, REPLY_FLAG_DONE, chunk_type, payload.len() as u64);
    out.extend_from_slice(&payload);
    vec![Bytes::from(out)]
}

fn read_frame(ctx: &Ctx, req: &Request, pieces: Vec<ReadPiece>) -> Frame {
    let total: u64 = pieces.iter().map(|p| p.len()).sum();
    if total != req.length {
        return error_frame(
            ctx,
            req,
            &ExportError::new(
                EIO,
                format!("export returned {total} of {} bytes", req.length),
            ),
        );
    }
    if ctx.mode == HeaderMode::Simple {
        let mut out = Vec::with_capacity(SIMPLE_REPLY_LEN);
        ReplyHeader::encode_simple(0, req.cookie, &mut out);
        let mut frame = vec![Bytes::from(out)];
        frame.extend(pieces.into_iter().map(piece_bytes));
        return frame;
    }
    // DF asks for a single data chunk; otherwise holes become OFFSET_HOLE chunks.
    let pieces: Vec<ReadPiece> = if req.flags & CMD_FLAG_DF != 0 && pieces.len() > 1 {
        let mut buf = bufpool::get(req.length as usize);
        let mut at = 0;
        for p in pieces {
            let n = p.len() as usize;
            match p {
                ReadPiece::Data(b) => buf[at..at + n].copy_from_slice(&b),
                ReadPiece::Hole(_) => buf[at..at + n].fill(0),
            }
            at += n;
        }
        vec![ReadPiece::Data(buf.freeze())]
    } else {
        pieces.into_iter().filter(|p| !p.is_empty()).collect()
    };
    let mut frame = Vec::with_capacity(pieces.len() * 2);
    let last = pieces.len().saturating_sub(1);
    let mut offset = req.offset;
    for (i, p) in pieces.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        match p {
            ReadPiece::Data(data) => {
                let mut head =
                    chunk_header(ctx, req, flags, CHUNK_OFFSET_DATA, 8 + data.len() as u64);
                head.extend_from_slice(&offset.to_be_bytes());
                offset += data.len() as u64;
                frame.push(Bytes::from(head));
                frame.push(data);
            }
            ReadPiece::Hole(n) => {
                let mut head = chunk_header(ctx, req, flags, CHUNK_OFFSET_HOLE, 12);
                head.extend_from_slice(&offset.to_be_bytes());
                head.extend_from_slice(&(n as u32).to_be_bytes());
                offset += n;
                frame.push(Bytes::from(head));
            }
        }
    }
    if frame.is_empty() {
        return done_frame(ctx, req);
    }
    frame
}

fn piece_bytes(p: ReadPiece) -> Bytes {
    match p {
        ReadPiece::Data(b) => b,
        ReadPiece::Hole(n) => bufpool::zero_bytes(n as usize),
    }
}

fn status_frame(ctx: &Ctx, req: &Request, runs: Vec<(u64, u32)>) -> Frame {
    let min = u64::from(ctx.export.caps().block_size.minimum).max(1);
    // Compact descriptors carry 32-bit lengths: keep them aligned below 4 GiB.
    let cap = if ctx.mode == HeaderMode::Extended {
        u64::MAX
    } else {
        u64::from(u32::MAX) / min * min
    };
    let end = req.offset + req.length.max(1);
    let mut descriptors = Vec::new();
    let mut pos = req.offset;
    for (len, flags) in runs {
        if pos >= end || descriptors.len() >= MAX_DESCRIPTORS || len == 0 {
            break;
        }
        let len = len.min(cap);
        let flags = u64::from(flags);
        match descriptors.last_mut() {
            Some(Descriptor { length, flags: f }) if *f == flags && *length + len <= cap => {
                *length += len
            }
            _ => descriptors.push(Descriptor { length: len, flags }),
        }
        pos += len;
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            break;
        }
    }
    if descriptors.is_empty() {
        return error_frame(ctx, req, &ExportError::new(EIO, "no extent information"));
    }
    if req.flags & CMD_FLAG_REQ_ONE != 0 {
        descriptors.truncate(1);
        let d = &mut descriptors[0];
        d.length = d.length.min(req.length.max(min));
    }
    let mut payload = Vec::new();
    let chunk_type = Chunk::BlockStatus {
        context: BASE_ALLOCATION_ID,
        descriptors,
    }
    .encode_payload(ctx.mode == HeaderMode::Extended, &mut payload);
    let mut out = chunk_header(ctx, req, REPLY_FLAG_DONE, chunk_type, payload.len() as u64);
    out.extend_from_slice(&payload);
    vec![Bytes::from(out)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Takes at most `step` bytes per write, across slices, as a full socket buffer does.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        calls: usize,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            self.calls += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut left = self.step;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                self.out.extend_from_slice(&b[..take]);
                left -= take;
                n += take;
            }
            self.calls += 1;
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn vectored_writes_resume_inside_a_piece_and_skip_empty_ones() {
        let sizes = [3usize, 0, 100, 1, 0, 0, 4096, 7];
        let mut pieces: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8 + 1; n]))
            .collect();
        let want: Vec<u8> = pieces.iter().flat_map(|b| b.to_vec()).collect();
        let mut wr = Trickle {
            out: Vec::new(),
            step: 10,
            calls: 0,
        };
        crate::vectored::write_all_vectored(&mut wr, &mut pieces)
            .await
            .unwrap();
        assert_eq!(wr.out, want);
        assert!(pieces.is_empty());
        // Each call but the last was filled: the slices were gathered, not written one by one.
        assert_eq!(wr.calls, want.len().div_ceil(10));
    }
}
