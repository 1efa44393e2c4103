//! The data API (`/images/{ticket_id}[/extents|/checksum]` and `/info/`): routing,
//! authorization, and the read-side handlers (OPTIONS, GET, HEAD, extents). Writes (PUT, PATCH)
//! live in [`crate::upload`], checksums in [`crate::checksum`].
//!
//! Every handler authorizes first, answering 403 and closing the connection on failure, then
//! binds the connection to the ticket (which switches the connection to the ticket's
//! inactivity timeout and opens the shared backend on first use). Downloads stream: the
//! response body is a bounded pipeline of backend reads, never the whole range in memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{
    ALLOW, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderValue, RANGE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use crate::backend::Backend;
use crate::conn::{ConnCtx, Handler};
use crate::range::parse_range;
use crate::request::{cors, query_pairs, query_value};
use crate::respond::{Body, BoxError, HttpError, close_after, empty_body, json, json_text};
use crate::store::{Ticket, TicketStore};
use crate::ticket::Access;

/// The imageio version ferry answers as, for clients that probe `/info/`.
pub const IMAGEIO_VERSION: &str = "2.5.3";

/// I/O sizes and depths of the data path.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Largest single backend read or write, in bytes.
    pub chunk: u64,
    /// Backend requests in flight per HTTP request.
    pub depth: usize,
    /// Largest upload write to an NBD backend. Uploads keep `depth * chunk` bytes in flight
    /// either way; to an NBD server they go in smaller writes, because the server's request
    /// buffer then stays in the CPU cache and in its allocator's free lists: qemu-nbd copies
    /// 4 MiB writes through freshly faulted buffers at about twice the CPU of 256 KiB ones.
    pub nbd_write: u64,
    /// Bytes of image data all transfers together may hold in buffers (read ahead for
    /// downloads, received and not yet written for uploads). Transfers wait for their share in
    /// turn, so the server's memory stays bounded however many run.
    pub memory: u64,
}

/// Default of [`Tuning::memory`]: 128 chunks of 4 MiB.
pub const DEFAULT_BUFFER_MEMORY: u64 = 512 << 20;

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            chunk: 4 << 20,
            depth: 4,
            nbd_write: 256 << 10,
            memory: DEFAULT_BUFFER_MEMORY,
        }
    }
}

pub struct DataApi {
    pub store: Arc<TicketStore>,
    /// The local service's socket, advertised in OPTIONS (`unix_socket`).
    pub unix_socket: Option<String>,
    /// Only the remote service answers `/info/`.
    pub serves_info: bool,
    pub tuning: Tuning,
    /// Where tickets are also served over NBD, advertised in OPTIONS (`nbd_url`).
    pub nbd_url: Option<crate::server::NbdUrl>,
    /// The data path's buffer budget, one permit a byte ([`Tuning::memory`]), shared by the
    /// remote and local services.
    pub memory: Arc<tokio::sync::Semaphore>,
}

/// A buffer that holds its share of the memory budget until the last user drops it (for a
/// download frame: once hyper has written it).
struct Budgeted {
    data: Bytes,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl DataApi {
    /// Waits for `n` bytes of the buffer budget (all of it if `n` is more; none for 0).
    pub(crate) async fn reserve(
        memory: &Arc<tokio::sync::Semaphore>,
        total: u64,
        n: u64,
    ) -> tokio::sync::OwnedSemaphorePermit {
        let n = n.min(total.clamp(1, u32::MAX as u64)) as u32;
        memory
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the budget is never closed")
    }
}

/// What OPTIONS answers to a CORS preflight: the reference's `OPTIONS,GET,PUT` plus PATCH,
/// which browsers need for zero and flush.
const CORS_OPTIONS_METHODS: &str = "OPTIONS,GET,PUT,PATCH";

enum Route<'a> {
    Image(&'a str),
    Extents(&'a str),
    Checksum(&'a str),
    /// `/images/{anything}/checksum/algorithms`: no ticket involved.
    ChecksumAlgorithms,
    Info,
    Unknown,
}

fn route(path: &str) -> Route<'_> {
    if path == "/info/" {
        return Route::Info;
    }
    let Some(rest) = path.strip_prefix("/images/") else {
        return Route::Unknown;
    };
    match rest.split_once('/') {
        None => Route::Image(rest),
        Some((id, "extents")) => Route::Extents(id),
        Some((id, "checksum")) => Route::Checksum(id),
        Some((_, "checksum/algorithms")) => Route::ChecksumAlgorithms,
        // Typos and unknown sub-resources are 404, not "no such ticket".
        Some(_) => Route::Unknown,
    }
}

/// Methods the router knows; others are 405 "Invalid method".
fn known_method(m: &Method) -> bool {
    [
        Method::GET,
        Method::PUT,
        Method::PATCH,
        Method::POST,
        Method::DELETE,
        Method::OPTIONS,
        Method::HEAD,
    ]
    .contains(m)
}

impl Handler for DataApi {
    fn handle(
        &self,
        req: Request<Incoming>,
        ctx: Arc<ConnCtx>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send + '_>> {
        // Every line logged for a request on a ticket names it, whatever logs it.
        let ticket = match route(req.uri().path()) {
            Route::Image(id) | Route::Extents(id) | Route::Checksum(id) => {
                Some(crate::request::decode(id))
            }
            _ => None,
        };
        let span = match &ticket {
            Some(t) => {
                tracing::info_span!("transfer", ticket = %t, conn = ctx.id, peer = %ctx.peer)
            }
            None => tracing::info_span!("request", conn = ctx.id, peer = %ctx.peer),
        };
        Box::pin(tracing::Instrument::instrument(
            async move {
                let mut close = false;
                // CORS headers go on every answer of the resources browsers use, errors included.
                let cors_methods = cors_methods(req.method(), req.uri().path());
                let cors_request = cors_methods.map(|_| cors_headers(req.headers()));
                let result = self.dispatch(req, &ctx, &mut close).await;
                let mut resp = match result {
                    Ok(r) => r,
                    Err(e) => {
                        ctx.failed(ticket.as_deref(), &e);
                        if e.status.is_server_error() {
                            tracing::warn!(
                                conn = ctx.id,
                                status = e.status.as_u16(),
                                "{}",
                                e.message
                            );
                        } else {
                            tracing::info!(
                                conn = ctx.id,
                                status = e.status.as_u16(),
                                "{}",
                                e.message
                            );
                        }
                        e.into_response()
                    }
                };
                if close {
                    close_after(&mut resp);
                }
                if let (Some(methods), Some(h)) = (cors_methods, cors_request) {
                    cors(&h, resp.headers_mut(), methods);
                }
                resp
            },
            span,
        ))
    }
}

/// The CORS methods answered for `method` on `path`, or `None` where the data API sends no
/// CORS headers (extents, checksums: the reference's choice; browsers do not use them).
fn cors_methods(method: &Method, path: &str) -> Option<&'static str> {
    match (route(path), method) {
        (Route::Image(_), &Method::OPTIONS) => Some(CORS_OPTIONS_METHODS),
        (Route::Image(_), &Method::GET | &Method::PUT | &Method::PATCH) => Some("*"),
        (Route::Info, &Method::GET) => Some("*"),
        _ => None,
    }
}

/// The request headers CORS answers depend on.
fn cors_headers(req: &http::HeaderMap) -> http::HeaderMap {
    let mut out = http::HeaderMap::new();
    for name in [
        http::header::ORIGIN,
        http::header::ACCESS_CONTROL_REQUEST_HEADERS,
        http::header::ACCESS_CONTROL_REQUEST_METHOD,
    ] {
        if let Some(v) = req.get(&name) {
            out.insert(name, v.clone());
        }
    }
    out
}

impl DataApi {
    async fn dispatch(
        &self,
        req: Request<Incoming>,
        ctx: &Arc<ConnCtx>,
        close: &mut bool,
    ) -> Result<Response<Body>, HttpError> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        // "METHOD TARGET HTTP/1.1\r\n", as the reference measures it.
        let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if method.as_str().len() + target_len + 11 > crate::respond::MAX_REQUEST_LINE {
            return Err(HttpError::uri_too_long());
        }
        // An answer that leaves a request body unread closes the connection, or the body
        // would be parsed as the next request.
        let unread = crate::request::has_body(req.headers());
        let reject = |e: HttpError| if unread { e.closing() } else { e };
        if !known_method(&method) {
            return Err(reject(HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("Invalid method '{method}'"),
            )));
        }
        let not_defined = || {
            reject(HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("Method '{method}' not defined for '{path}'"),
            ))
        };
        match route(&path) {
            Route::Info if self.serves_info => match method {
                Method::GET | Method::HEAD => Ok(json(&imageio::wire::Info {
                    version: IMAGEIO_VERSION.to_string(),
                    server: Some(crate::conn::SERVER_NAME.to_string()),
                })),
                _ => Err(not_defined()),
            },
            Route::Image(raw_id) => {
                let id = crate::request::decode(raw_id);
                if id.is_empty() {
                    return Err(reject(HttpError::bad_request("Ticket id is required")));
                }
                let q = query_pairs(req.uri());
                // Only `close=y` means anything; other values are ignored, as the reference
                // does (browsers' upload pages send what they like).
                *close = query_value(&q, "close") == Some("y");
                match method {
                    Method::OPTIONS => self.options(&id, ctx).await,
                    Method::GET | Method::HEAD => self.get(&req, &id, ctx).await,
                    Method::PUT => crate::upload::put(self, req, &id, ctx).await,
                    Method::PATCH => crate::upload::patch(self, req, &id, ctx).await,
                    _ => Err(not_defined()),
                }
            }
            Route::Extents(raw_id) => {
                let id = crate::request::decode(raw_id);
                match method {
                    Method::GET | Method::HEAD => self.extents(&req, &id, ctx).await,
                    _ => Err(not_defined()),
                }
            }
            Route::Checksum(raw_id) => {
                let id = crate::request::decode(raw_id);
                match method {
                    Method::GET => crate::checksum::image_checksum(self, &req, &id, ctx).await,
                    _ => Err(not_defined()),
                }
            }
            Route::ChecksumAlgorithms => match method {
                Method::GET => Ok(crate::checksum::algorithms()),
                _ => Err(not_defined()),
            },
            _ => Err(reject(HttpError::not_found(format!(
                "No handler for '{path}'"
            )))),
        }
    }

    /// Authorizes `access` on ticket `id`, binds the connection and opens the backend.
    pub(crate) async fn open(
        &self,
        id: &str,
        access: Access,
        ctx: &ConnCtx,
    ) -> Result<(Arc<Ticket>, Arc<Backend>), HttpError> {
        let ticket = self
            .store
            .authorize(id, access)
            .map_err(|f| HttpError::forbidden(&f))?;
        ctx.bind(&ticket);
        let backend = ticket
            .backend(async |spec| Backend::open(spec).await)
            .await?;
        Ok((ticket, backend))
    }

    async fn options(&self, id: &str, ctx: &ConnCtx) -> Result<Response<Body>, HttpError> {
        const ALL: &str = "OPTIONS,GET,PUT,PATCH";
        // The reference's fixed order.
        const RW: &[&str] = &["checksum", "extents", "flush", "zero"];
        let mut doc = imageio::wire::Options {
            unix_socket: self.unix_socket.clone(),
            features: RW.iter().map(|f| f.to_string()).collect(),
            // PUT takes zstd bodies (crate::upload): ferry's own key, which imageio's clients
            // ignore.
            ferry_encodings: vec![imageio::compress::ZSTD.to_string()],
            ..imageio::wire::Options::default()
        };
        let allow = if id == "*" {
            ALL
        } else {
            let (ticket, backend) = self.open(id, Access::Read, ctx).await?;
            ticket.touch();
            let write = ticket.spec.allows(Access::Write);
            if !write {
                doc.features.truncate(2);
                doc.ferry_encodings.clear();
            }
            doc.max_readers = Some(backend.max_readers);
            doc.max_writers = Some(backend.max_writers);
            doc.size = Some(ticket.spec.size.min(backend.size));
            doc.min_block_size = Some(backend.min_block());
            doc.preferred_block_size = Some(backend.preferred_block());
            doc.max_block_size = Some(backend.max_request());
            doc.nbd_url = self.nbd_url.as_ref().map(|u| u.for_ticket(id));
            if write { ALL } else { "OPTIONS,GET" }
        };
        let mut resp = json(&doc);
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
        Ok(resp)
    }

    async fn get(
        &self,
        req: &Request<Incoming>,
        id: &str,
        ctx: &Arc<ConnCtx>,
    ) -> Result<Response<Body>, HttpError> {
        // A bad Range is refused before authorization, as the reference does.
        let range = match req.headers().get(RANGE) {
            None => None,
            Some(h) => {
                let text = h.to_str().unwrap_or("<non-ascii>");
                Some(parse_range(text).map_err(|e| HttpError::range(e.0, None))?)
            }
        };
        let (ticket, backend) = self.open(id, Access::Read, ctx).await?;
        let ticket_size = ticket.spec.size;
        let total = &ticket.spec.size_text;
        let available = ticket_size.min(backend.size);
        let (offset, length, partial) = match range {
            None => (0, available, false),
            Some(r) => {
                let last = r.last.unwrap_or(available.max(1) - 1);
                if last >= ticket_size || r.first >= ticket_size {
                    return Err(HttpError::range(
                        "Requested range out of allowed range",
                        Some(total),
                    ));
                }
                if last >= available || r.first >= available {
                    return Err(HttpError::range(
                        format!(
                            "Requested more bytes than available: {} > {available}",
                            last + 1
                        ),
                        Some(&available),
                    ));
                }
                (r.first, last - r.first + 1, true)
            }
        };
        let mut resp = if req.method() == Method::HEAD {
            Response::new(empty_body())
        } else {
            let op = ticket.begin(offset).map_err(|f| HttpError::forbidden(&f))?;
            Response::new(download(backend, self, op, ctx.busy(), offset, length))
        };
        if partial {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
        let h = resp.headers_mut();
        h.insert(CONTENT_LENGTH, HeaderValue::from(length));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let disposition = match &ticket.spec.filename {
            Some(f) => HeaderValue::from_str(&format!("attachment; filename={f}"))
                .unwrap_or(HeaderValue::from_static("attachment")),
            None => HeaderValue::from_static("attachment"),
        };
        h.insert(CONTENT_DISPOSITION, disposition);
        if partial {
            let range = imageio::wire::ContentRange::format(offset, offset + length - 1, total);
            h.insert(CONTENT_RANGE, HeaderValue::from_str(&range).expect("ascii"));
        }
        Ok(resp)
    }

    async fn extents(
        &self,
        req: &Request<Incoming>,
        id: &str,
        ctx: &ConnCtx,
    ) -> Result<Response<Body>, HttpError> {
        let (ticket, backend) = self.open(id, Access::Read, ctx).await?;
        let q = query_pairs(req.uri());
        let dirty = match query_value(&q, "context").unwrap_or("zero") {
            "zero" => false,
            "dirty" if !ticket.spec.dirty => {
                return Err(HttpError::not_found(
                    "Ticket does not support dirty extents",
                ));
            }
            "dirty" => true,
            other => {
                return Err(HttpError::bad_request(format!(
                    "Unsupported value '{other}' for 'context', expecting one of ['dirty', 'zero']"
                )));
            }
        };
        let available = ticket.spec.size.min(backend.size);
        let number = |key: &str| -> Result<Option<u64>, HttpError> {
            query_value(&q, key)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        HttpError::bad_request(format!("Invalid value for '{key}': '{v}'"))
                    })
                })
                .transpose()
        };
        let start = number("start")?.unwrap_or(0);
        let length = match number("length")? {
            Some(l) => l,
            None => available.saturating_sub(start),
        };
        if start.checked_add(length).is_none_or(|end| end > available) {
            return Err(HttpError::range(
                "Requested range out of allowed range",
                Some(&available),
            ));
        }
        let text = if dirty {
            match backend.dirty_extents(start, length).await? {
                Some(items) => imageio::wire::to_json(&items),
                None => {
                    return Err(HttpError::not_found(
                        "Operation not supported: dirty extents need an NBD backend with a \
                         dirty bitmap",
                    ));
                }
            }
        } else {
            imageio::wire::to_json(&backend.extents(start, length).await?)
        };
        // Counting extents as activity keeps a client that maps a huge image from expiring.
        ticket.touch();
        Ok(json_text(text))
    }
}

/// The body of a download: backend reads of at most `chunk` bytes, `depth` in flight, in
/// order. Cancelling the ticket or a read error ends the body with an error, which makes hyper
/// cut the response short and close the connection.
fn download(
    backend: Arc<Backend>,
    api: &DataApi,
    op: crate::store::OpGuard,
    busy: crate::conn::BusyGuard,
    offset: u64,
    length: u64,
) -> Body {
    let (memory, metrics, tuning) = (api.memory.clone(), api.store.metrics.clone(), api.tuning);
    let ticket = op.ticket().clone();
    let flow = ticket.flow.clone();
    let chunk = tuning.chunk.min(backend.max_request()).max(1);
    let pieces = split(offset, length, chunk);
    // The body is polled by the connection after the handler returned: its reads log in the
    // request's span explicitly.
    let span = tracing::Span::current();
    let read_span = span.clone();
    let started = std::time::Instant::now();
    let mut sent: u64 = 0;
    let reads = futures_util::stream::iter(pieces)
        .map(move |(off, len)| {
            let backend = backend.clone();
            let ticket = ticket.clone();
            let flow = flow.clone();
            let metrics = metrics.clone();
            let memory = memory.clone();
            tracing::Instrument::instrument(
                async move {
                    // The read's buffer is budgeted before it exists; pieces of one download
                    // queue in order, so the first is always served first.
                    let permit = tokio::select! {
                        p = DataApi::reserve(&memory, tuning.memory, len) => p,
                        _ = ticket.cancelled() => {
                            return Err(format!("Transfer={} was canceled", ticket.label()).into());
                        }
                    };
                    // Bytes are counted before they are read: the backend is paced too.
                    let waiting = std::time::Instant::now();
                    tokio::select! {
                        _ = flow.acquire(len) => {}
                        _ = ticket.cancelled() => {}
                    }
                    crate::metrics::count_wait(&metrics, waiting);
                    if ticket.is_canceled() {
                        return Err(format!("Transfer={} was canceled", ticket.label()).into());
                    }
                    let data = backend.read(off, len).await.map_err(|e| {
                        tracing::error!("download failed: {e}");
                        metrics.error(
                            "data",
                            Some(ticket.id()),
                            500,
                            e.kind().name(),
                            &e.to_string(),
                        );
                        Box::new(e) as BoxError
                    })?;
                    if data.len() as u64 != len {
                        return Err(
                            format!("short read at offset {off}: {} of {len}", data.len()).into(),
                        );
                    }
                    Ok::<Bytes, BoxError>(Bytes::from_owner(Budgeted {
                        data,
                        _permit: permit,
                    }))
                },
                read_span.clone(),
            )
        })
        .buffered(tuning.depth.max(1))
        .map(move |r| {
            // The guards live as long as the stream: the operation ends when the body does.
            let _ = &busy;
            r.map(|data| {
                op.progress(data.len() as u64);
                sent += data.len() as u64;
                if sent == length {
                    span.in_scope(|| {
                        tracing::info!(
                            offset,
                            length,
                            seconds = started.elapsed().as_secs_f64(),
                            "download done"
                        );
                    });
                }
                Frame::data(data)
            })
        });
    StreamBody::new(reads).boxed_unsync()
}

/// Splits [offset, offset+length) at multiples of `chunk`, so every piece after the first is
/// aligned for the backend.
pub(crate) fn split(offset: u64, length: u64, chunk: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let end = offset + length;
    let mut pos = offset;
    while pos < end {
        let next = ((pos / chunk) + 1) * chunk;
        let n = next.min(end) - pos;
        out.push((pos, n));
        pos += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(route("/images/abc"), Route::Image("abc")));
        assert!(matches!(
            route("/images/abc/extents"),
            Route::Extents("abc")
        ));
        assert!(matches!(route("/images/abc/extent"), Route::Unknown));
        assert!(matches!(
            route("/images/abc/checksum"),
            Route::Checksum("abc")
        ));
        assert!(matches!(
            route("/images/*/checksum/algorithms"),
            Route::ChecksumAlgorithms
        ));
        assert!(matches!(route("/images/abc/checksums"), Route::Unknown));
        assert!(matches!(route("/images/a/b/c"), Route::Unknown));
        assert!(matches!(route("/info/"), Route::Info));
        assert!(matches!(route("/info"), Route::Unknown));
        assert!(matches!(route("/tickets/x"), Route::Unknown));
    }

    #[test]
    fn split_aligns_to_chunks() {
        assert_eq!(split(0, 10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(split(3, 6, 4), vec![(3, 1), (4, 4), (8, 1)]);
        assert_eq!(split(5, 0, 4), vec![]);
    }
}
