//! The write side of the data API: PUT (streamed upload) and PATCH (`zero`, `flush`).
//!
//! A PUT body is never held whole: bytes from the socket fill pooled buffers of at most
//! `chunk` bytes (cut at chunk-aligned offsets), each full buffer becomes one backend write
//! (for NBD, the body's frames are gathered as they came into the same chunk-aligned
//! requests, without a copy: [`crate::gather`]), and at most `depth` writes are in
//! flight, so reading the socket and writing the backend
//! overlap while memory stays bounded. Cancellation stops reading at once, but writes already
//! issued are always awaited: when the ticket's DELETE returns, nothing more reaches the disk.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::header::{CONTENT_LENGTH, CONTENT_RANGE, TRANSFER_ENCODING};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::Value;

use crate::conn::ConnCtx;
use crate::data::DataApi;
use crate::encoding::{self, BodyFail, Encoding};
use crate::gather::Gathered;
use crate::request::{query_pairs, read_small_body, yes_no};
use crate::respond::{Body, HttpError, empty};
use crate::ticket::Access;
use imageio::wire::ContentRange;

/// Zeroing runs in steps of this size: a cancellation point between steps, and no single
/// backend request long enough to hit storage timeouts (iSCSI/LIO).
const ZERO_STEP: u64 = 128 << 20;

/// Backend writes in flight per upload at most, however small.
const MAX_WRITES: usize = 64;
/// Most body frames one backend request gathers; past this many (tiny frames), the request
/// goes out early, at an aligned offset.
const MAX_PARTS: usize = 256;
/// Gathered requests that go out early end on a multiple of this, so O_DIRECT storage behind
/// the export is never written partial blocks.
const EARLY_CUT_ALIGN: u64 = 4096;

/// Zero detection in uploaded data works on aligned blocks of this size.
const ZERO_DETECT_BLOCK: usize = 64 << 10;

/// A backend write or zero of a body piece; it yields the range it completed.
type WriteFut =
    Pin<Box<dyn std::future::Future<Output = Result<(u64, u64), disk::DiskError>> + Send>>;

pub(crate) async fn put(
    api: &DataApi,
    req: Request<Incoming>,
    id: &str,
    ctx: &Arc<ConnCtx>,
) -> Result<Response<Body>, HttpError> {
    // Errors before the body is read close the connection: the unread body must never be
    // parsed as the next request.
    let (parts, body) = req.into_parts();
    let q = query_pairs(&parts.uri);
    let headers = &parts.headers;
    let chunked = headers.get(TRANSFER_ENCODING).is_some_and(|v| {
        v.to_str()
            .is_ok_and(|s| s.to_ascii_lowercase().contains("chunked"))
    });
    let content_length = match headers.get(CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    HttpError::bad_request(format!("Invalid Content-Length {v:?}")).closing()
                })?,
        ),
        None if chunked => None,
        // Without Content-Length or chunked framing the body is empty: nothing is left unread.
        None => {
            return Err(HttpError::bad_request("Content-Length header is required"));
        }
    };
    let range = match headers.get(CONTENT_RANGE) {
        Some(v) => {
            let text = v.to_str().unwrap_or("<non-ascii>");
            Some(ContentRange::parse(text).map_err(|m| HttpError::bad_request(m.0).closing())?)
        }
        None => None,
    };
    let offset = range.as_ref().map_or(0, |r| r.first);
    // A compressed body's Content-Length is its size on the wire; what it writes is the
    // range Content-Range names, which it must decode to exactly.
    let encoding = encoding::of(headers).map_err(HttpError::closing)?;
    let content_length = match encoding {
        Encoding::Identity => content_length,
        Encoding::Zstd => match range.as_ref().and_then(|r| r.last) {
            Some(last) => Some(last - offset + 1),
            None => {
                return Err(HttpError::bad_request(
                    "Content-Encoding: zstd needs a Content-Range with its last byte \
                     (bytes FIRST-LAST/*)",
                )
                .closing());
            }
        },
    };
    // Checked in the reference's order: framing, Content-Range, flush, then the ticket.
    let flush = yes_no(&q, "flush", true).map_err(HttpError::closing)?;
    let (ticket, backend) = api
        .open(id, Access::Write, ctx)
        .await
        .map_err(HttpError::closing)?;
    let ticket_size = ticket.spec.size;
    let available = ticket_size.min(backend.size);
    if let Some(len) = content_length {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > ticket_size) {
            return Err(HttpError::range(
                "Requested range out of allowed range",
                Some(&ticket.spec.size_text),
            )
            .closing());
        }
        if end.is_none_or(|e| e > available) {
            return Err(HttpError::range(
                format!(
                    "Requested more bytes than available: {} > {available}",
                    offset + len
                ),
                Some(&available),
            )
            .closing());
        }
    } else if offset > available {
        return Err(
            HttpError::range("Requested range out of allowed range", Some(&available)).closing(),
        );
    }
    let limit = match content_length {
        Some(len) => offset + len,
        None => available,
    };
    let op = ticket.begin(offset).map_err(|f| HttpError::forbidden(&f))?;
    let started = std::time::Instant::now();
    let mut body = encoding::Source::new(body, encoding, limit - offset)
        .map_err(|m| HttpError::internal(m).closing())?;

    let chunk = api.tuning.chunk.min(backend.max_request()).max(1);
    // Bytes received but not yet written, whatever their requests' sizes.
    let mut in_flight: u64 = 0;
    // Only NBD takes writes of parts without a copy; a file gets them copied into chunk
    // buffers. Exports with a minimum block size keep the chunk buffers too: their unaligned
    // edges are read-modify-write cycles (crate::aligned), done on whole chunks.
    let zero_copy = backend.is_nbd() && backend.min_block() == 1;
    let depth = api.tuning.depth.max(1);
    // Gathered requests to NBD are cut at multiples of this; the bytes in flight stay
    // `depth * chunk` (MAX_WRITES bounds the count).
    let nbd_write = chunk.min(api.tuning.nbd_write).max(EARLY_CUT_ALIGN);
    let mut writes: FuturesUnordered<WriteFut> = FuturesUnordered::new();
    // The buffer being filled: its absolute offset, the buffer, and bytes in it; or, without
    // a copy, the frames gathered for the next request.
    let mut pos = offset;
    let mut buf: Option<ChunkBuf> = None;
    let mut gathered = Gathered::new(offset);
    let mut received: u64 = 0;
    let mut failure: Option<HttpError> = None;
    let mut body_done = false;
    // Bytes of the last frame waiting for the ticket's bandwidth limit: no more of the body is
    // read until they are granted, so the client is slowed by TCP's own flow control.
    let mut throttle: Option<
        Pin<Box<dyn std::future::Future<Output = tokio::sync::OwnedSemaphorePermit> + Send>>,
    > = None;
    // The buffer budget held for this upload's buffers: received bytes not yet written and the
    // chunk being filled.
    let mut budget = Held::default();

    // Zero blocks in the body are zeroed rather than written where that is cheaper or wanted:
    // clients that stream whole data runs (imageio's own client) send the zeroes inside them
    // as bytes. An NBD export takes WRITE_ZEROES for far less than the data, and a sparse
    // ticket stays sparse. A non-sparse file is written as sent: many small zeroed ranges
    // would fragment its extents and cost more than sequential writes.
    let allocate = !ticket.spec.sparse;
    let detect = if ticket.spec.sparse || backend.is_nbd() {
        ZERO_DETECT_BLOCK
    } else {
        0
    };
    // Gathered frames go out in requests cut at chunk-aligned offsets, their zero blocks
    // found across the frames' edges.
    let submit_gathered = |writes: &mut FuturesUnordered<WriteFut>, run: Gathered| {
        for piece in run.pieces(detect as u64) {
            let backend = backend.clone();
            let (at, n) = (piece.at, piece.len);
            if piece.zero {
                writes.push(Box::pin(async move {
                    backend.zero(at, n, allocate).await.map(|()| (at, n))
                }));
            } else {
                let parts = run.slice(at, n);
                writes.push(Box::pin(async move {
                    backend.write_parts(at, parts).await.map(|()| (at, n))
                }));
            }
        }
    };
    let submit = |writes: &mut FuturesUnordered<WriteFut>, at: u64, data: Bytes| {
        for piece in disk::sparse::split(&data, at, detect) {
            let backend = backend.clone();
            let piece_at = at + piece.start as u64;
            let n = piece.len as u64;
            if piece.zero {
                writes.push(Box::pin(async move {
                    backend
                        .zero(piece_at, n, allocate)
                        .await
                        .map(|()| (piece_at, n))
                }));
            } else {
                let slice = data.slice(piece.start..piece.start + piece.len);
                writes.push(Box::pin(async move {
                    backend.write(piece_at, slice).await.map(|()| (piece_at, n))
                }));
            }
        }
    };

    while !body_done || !writes.is_empty() {
        if failure.is_some() && writes.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(done) = writes.next(), if !writes.is_empty() => match done {
                Ok((at, n)) => {
                    // Counted once the backend completed it, at its own offset: pieces
                    // complete out of order, and a failed upload reports only what was
                    // written.
                    in_flight -= n;
                    budget.release(n);
                    op.completed(at, n)
                }
                Err(e) => {
                    if failure.is_none() {
                        failure = Some(HttpError::from(e).closing());
                    }
                    body_done = true;
                }
            },
            granted = async { throttle.as_mut().expect("checked").await }, if throttle.is_some() => {
                throttle = None;
                budget.add(granted);
            }
            _ = ticket.cancelled(), if !body_done => {
                failure = Some(HttpError::forbidden(&crate::store::Forbidden(format!(
                    "Transfer={} was canceled", ticket.label()))));
                body_done = true;
            }
            frame = tokio::time::timeout(ctx.timeout(), body.next()),
                if !body_done && throttle.is_none() && in_flight < depth as u64 * chunk
                    && writes.len() < MAX_WRITES =>
            {
                let data = match frame {
                    Err(_) => {
                        failure = Some(HttpError::bad_request(format!(
                            "Timeout reading request body: {received} bytes received"
                        )).closing());
                        body_done = true;
                        continue;
                    }
                    Ok(None) => {
                        body_done = true;
                        if let Some(b) = buf.take() {
                            budget.release(b.unfilled());
                            let at = b.at;
                            submit(&mut writes, at, b.freeze());
                        }
                        let rest = gathered.split_to(u64::MAX);
                        submit_gathered(&mut writes, rest);
                        continue;
                    }
                    Ok(Some(Err(BodyFail::Decode(message)))) => {
                        // Bytes that do not decode to what was declared: nothing more is
                        // written, not even the chunk being filled.
                        if let Some(b) = buf.take() {
                            budget.release(b.size as u64);
                            in_flight -= b.filled as u64;
                        }
                        let dropped = gathered.split_to(u64::MAX);
                        budget.release(dropped.len);
                        in_flight -= dropped.len;
                        failure = Some(HttpError::bad_request(message).closing());
                        body_done = true;
                        continue;
                    }
                    Ok(Some(Err(BodyFail::Transport(e)))) => {
                        // What did arrive is written, as the reference does: the client
                        // resends the failed range either way.
                        if let Some(b) = buf.take() {
                            budget.release(b.unfilled());
                            let at = b.at;
                            submit(&mut writes, at, b.freeze());
                        }
                        let rest = gathered.split_to(u64::MAX);
                        submit_gathered(&mut writes, rest);
                        let expected = content_length.map_or("?".to_string(), |l| l.to_string());
                        failure = Some(HttpError::bad_request(format!(
                            "Requested {expected} bytes, available {received} bytes ({e})"
                        )).closing());
                        body_done = true;
                        continue;
                    }
                    Ok(Some(Ok(d))) => d,
                };
                received += data.len() as u64;
                let n = data.len() as u64;
                // No more of the body is read until what this frame costs fits in the budget:
                // its bytes, plus any chunk buffer it made us allocate, less what it copied
                // into buffers already paid for.
                let throttle_for = |charge: u64| {
                    let flow = ticket.flow.clone();
                    let metrics = api.store.metrics.clone();
                    let (memory, total) = (api.memory.clone(), api.tuning.memory);
                    Box::pin(async move {
                        let permit = DataApi::reserve(&memory, total, charge).await;
                        let waiting = std::time::Instant::now();
                        flow.acquire(n).await;
                        crate::metrics::count_wait(&metrics, waiting);
                        permit
                    }) as Pin<Box<dyn std::future::Future<Output = _> + Send>>
                };
                if offset + received > limit {
                    failure = Some(HttpError::range(
                        "Requested range out of allowed range", Some(&available)).closing());
                    body_done = true;
                    continue;
                }
                in_flight += data.len() as u64;
                // Frames for an NBD backend are kept as they are, not copied into a chunk
                // buffer (a pass over every byte uploaded): each full chunk goes out as one
                // request carrying the pieces of the frames it spans.
                if zero_copy {
                    gathered.push(data);
                    pos += n;
                    loop {
                        let boundary = (gathered.at / nbd_write + 1) * nbd_write;
                        let cut = if gathered.end() >= boundary {
                            boundary
                        } else if gathered.parts.len() >= MAX_PARTS {
                            gathered.end() / EARLY_CUT_ALIGN * EARLY_CUT_ALIGN
                        } else {
                            break;
                        };
                        if cut <= gathered.at {
                            break;
                        }
                        let run = gathered.split_to(cut);
                        submit_gathered(&mut writes, run);
                    }
                    throttle = Some(throttle_for(n));
                    continue;
                }
                let mut charge = n;
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let b = buf.get_or_insert_with(|| {
                        let next = (pos / chunk + 1) * chunk;
                        let b = ChunkBuf::new(pos, (next.min(limit) - pos) as usize);
                        charge += b.size as u64;
                        b
                    });
                    let k = b.fill(rest);
                    charge -= k as u64;
                    rest = &rest[k..];
                    pos += k as u64;
                    if b.is_full() {
                        let b = buf.take().expect("just filled");
                        let at = b.at;
                        submit(&mut writes, at, b.freeze());
                    }
                }
                throttle = Some(throttle_for(charge));
            }
        }
    }
    api.store
        .metrics
        .upload_wire(encoding.name(), body.wire_bytes());
    // Every issued write has completed here; the operation may end. A ticket deleted while
    // the last writes ran still fails the upload: the client must not think it landed.
    if failure.is_none() && ticket.is_canceled() {
        failure = Some(HttpError::forbidden(&crate::store::Forbidden(format!(
            "Transfer={} was canceled",
            ticket.label()
        ))));
    }
    if let Some(e) = failure {
        drop(op);
        return Err(e);
    }
    if let Some(len) = content_length
        && received != len
    {
        return Err(HttpError::bad_request(format!(
            "Requested {len} bytes, available {received} bytes"
        )));
    }
    if flush {
        backend.ep.flush().await?;
    }
    drop(op);
    tracing::info!(
        offset,
        length = received,
        wire = body.wire_bytes(),
        encoding = encoding.name(),
        flush,
        seconds = started.elapsed().as_secs_f64(),
        "upload done"
    );
    Ok(empty(StatusCode::OK))
}

/// One chunk of an upload being filled: `size` bytes for offset `at`, in a pooled buffer whose
/// window starts at an aligned address.
/// The share of the buffer budget an upload holds. Bytes are given back as writes complete,
/// possibly before the permits for them were granted (the grant for a frame arrives after the
/// frame was passed on): what cannot be given back yet is owed and settled on the next grant.
#[derive(Default)]
struct Held {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    owed: u64,
}

impl Held {
    fn add(&mut self, granted: tokio::sync::OwnedSemaphorePermit) {
        match self.permit.as_mut() {
            Some(p) => p.merge(granted),
            None => self.permit = Some(granted),
        }
        self.settle();
    }

    fn release(&mut self, n: u64) {
        self.owed += n;
        self.settle();
    }

    fn settle(&mut self) {
        let Some(p) = self.permit.as_mut() else {
            return;
        };
        let have = p.num_permits() as u64;
        if have <= self.owed {
            self.owed -= have;
            self.permit = None;
        } else if self.owed > 0 {
            drop(p.split(self.owed as usize));
            self.owed = 0;
        }
    }
}

struct ChunkBuf {
    at: u64,
    buf: bufpool::Buf,
    start: usize,
    size: usize,
    filled: usize,
}

impl ChunkBuf {
    fn new(at: u64, size: usize) -> ChunkBuf {
        // An aligned window: O_DIRECT file backends write it without another copy.
        let (buf, start) = disk::direct::aligned_buf(size);
        ChunkBuf {
            at,
            buf,
            start,
            size,
            filled: 0,
        }
    }

    /// Copies what fits of `data`; returns how much.
    fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.size - self.filled);
        let from = self.start + self.filled;
        self.buf[from..from + n].copy_from_slice(&data[..n]);
        self.filled += n;
        n
    }

    fn is_full(&self) -> bool {
        self.filled == self.size
    }

    /// Room left unfilled, in bytes.
    fn unfilled(&self) -> u64 {
        (self.size - self.filled) as u64
    }

    fn freeze(self) -> Bytes {
        let (start, filled) = (self.start, self.filled);
        self.buf.freeze().slice(start..start + filled)
    }
}

/// A PATCH operation, validated.
#[derive(Debug, PartialEq, Eq)]
enum Patch {
    Zero { offset: u64, size: u64, flush: bool },
    Flush,
}

fn parse_patch(body: &[u8]) -> Result<Patch, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("Invalid JSON message: {e}"))?;
    let Value::Object(m) = v else {
        return Err(format!("Invalid JSON message: expecting an object: {v}"));
    };
    let uint = |key: &str, default: Option<u64>| -> Result<u64, String> {
        match m.get(key) {
            None | Some(Value::Null) => {
                default.ok_or_else(|| format!("Missing required value for '{key}'"))
            }
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(x), _) => Ok(x),
                (None, Some(neg)) => Err(format!("Invalid value {neg} < 0")),
                _ => Err(format!("Integer required for '{key}': {n}")),
            },
            Some(other) => Err(format!("Integer required for '{key}': {other}")),
        }
    };
    match m.get("op") {
        None | Some(Value::Null) => Err("Missing required value for op".to_string()),
        Some(Value::String(op)) if op == "zero" => {
            let size = uint("size", None)?;
            let offset = uint("offset", Some(0))?;
            let flush = match m.get("flush") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => return Err(format!("Boolean required for 'flush': {other}")),
            };
            Ok(Patch::Zero {
                offset,
                size,
                flush,
            })
        }
        Some(Value::String(op)) if op == "flush" => Ok(Patch::Flush),
        Some(other) => {
            let shown = other.as_str().map_or(other.to_string(), str::to_owned);
            Err(format!(
                "Unsupported value '{shown}' for 'op', expecting one of ['flush', 'zero']"
            ))
        }
    }
}

pub(crate) async fn patch(
    api: &DataApi,
    req: Request<Incoming>,
    id: &str,
    ctx: &Arc<ConnCtx>,
) -> Result<Response<Body>, HttpError> {
    // Authorize before reading the body, so a refused client cannot make us read anything.
    api.store
        .authorize(id, Access::Write)
        .map_err(|f| HttpError::forbidden(&f))?;
    let body = req.into_body();
    let body = read_small_body(body, ctx.timeout()).await?;
    let patch = parse_patch(&body).map_err(HttpError::bad_request)?;
    let (ticket, backend) = api.open(id, Access::Write, ctx).await?;
    match patch {
        Patch::Zero {
            offset,
            size,
            flush,
        } => {
            let end = offset.checked_add(size);
            if end.is_none_or(|e| e > ticket.spec.size) {
                return Err(HttpError::range(
                    "Requested range out of allowed range",
                    Some(&ticket.spec.size_text),
                ));
            }
            if end.is_none_or(|e| e > backend.size) {
                return Err(HttpError::range(
                    format!(
                        "Requested more bytes than available: {} > {}",
                        offset.saturating_add(size),
                        backend.size
                    ),
                    Some(&backend.size),
                ));
            }
            let op = ticket.begin(offset).map_err(|f| HttpError::forbidden(&f))?;
            let allocate = !ticket.spec.sparse;
            let mut pos = offset;
            while pos < offset + size {
                if ticket.is_canceled() {
                    return Err(HttpError::forbidden(&crate::store::Forbidden(format!(
                        "Transfer={} was canceled",
                        ticket.label()
                    ))));
                }
                let n = ZERO_STEP.min(offset + size - pos);
                backend.zero(pos, n, allocate).await?;
                op.progress(n);
                pos += n;
            }
            if flush {
                backend.ep.flush().await?;
            }
            drop(op);
        }
        Patch::Flush => {
            let op = ticket.begin(0).map_err(|f| HttpError::forbidden(&f))?;
            backend.ep.flush().await?;
            drop(op);
        }
    }
    Ok(empty(StatusCode::OK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_messages() {
        assert_eq!(
            parse_patch(br#"{"op": "zero", "offset": 4096, "size": 8192}"#).unwrap(),
            Patch::Zero {
                offset: 4096,
                size: 8192,
                flush: false
            }
        );
        assert_eq!(
            parse_patch(br#"{"op": "zero", "size": 1, "flush": true}"#).unwrap(),
            Patch::Zero {
                offset: 0,
                size: 1,
                flush: true
            }
        );
        assert_eq!(
            parse_patch(br#"{"op": "flush", "size": "x"}"#).unwrap(),
            Patch::Flush
        );
        let err = |b: &[u8]| parse_patch(b).unwrap_err();
        assert!(err(b"{").starts_with("Invalid JSON message"));
        assert_eq!(err(b"{}"), "Missing required value for op");
        assert_eq!(
            err(br#"{"op": "trim"}"#),
            "Unsupported value 'trim' for 'op', expecting one of ['flush', 'zero']"
        );
        assert_eq!(
            err(br#"{"op": "zero"}"#),
            "Missing required value for 'size'"
        );
        assert_eq!(
            err(br#"{"op": "zero", "size": -1}"#),
            "Invalid value -1 < 0"
        );
        assert!(err(br#"{"op": "zero", "size": "1"}"#).starts_with("Integer required"));
        assert!(err(br#"{"op": "zero", "size": 1.5}"#).starts_with("Integer required"));
        assert!(err(br#"{"op": "zero", "size": 1, "flush": 1}"#).starts_with("Boolean required"));
    }
}

#[cfg(test)]
mod budget_tests {
    use super::Held;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    #[tokio::test]
    async fn bytes_given_back_before_their_grant_are_settled_on_it() {
        let budget = Arc::new(Semaphore::new(100));
        let mut held = Held::default();
        held.add(budget.clone().acquire_many_owned(40).await.unwrap());
        assert_eq!(budget.available_permits(), 60);
        // 50 written back while only 40 were granted: 10 owed.
        held.release(50);
        assert_eq!(budget.available_permits(), 100);
        held.add(budget.clone().acquire_many_owned(30).await.unwrap());
        // The next grant pays the 10 owed first.
        assert_eq!(budget.available_permits(), 80);
        held.release(20);
        assert_eq!(budget.available_permits(), 100);
        held.add(budget.clone().acquire_many_owned(5).await.unwrap());
        drop(held);
        assert_eq!(
            budget.available_permits(),
            100,
            "a dropped upload gives all back"
        );
    }
}
