//! The request layer every HTTP endpoint call goes through: the connection pool's shared
//! state, retries under the endpoints' one rule ([`disk::retry`]), and the errors of a request
//! ([`Fail`]), which name the endpoint, the operation and the range, and classify the failure
//! into an [`ErrorKind`].
//!
//! Nothing here knows about runs or extents; `endpoint` and `stream` build on it, and neither
//! imports the other.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use disk::retry::{Backoff, RetryPolicy};
use disk::{DiskError, ErrorKind, Op};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::ReqBody;
use crate::transport::{Lease, Pool};

/// Error bodies longer than this are cut in messages.
const MAX_MESSAGE: usize = 300;

/// Where a failure happened: builds the [`DiskError`]s of one request.
#[derive(Debug, Clone)]
pub(crate) struct Fail {
    name: String,
    op: Op,
    range: Option<(u64, u64)>,
}

impl Fail {
    pub fn new(name: &str, op: Op) -> Fail {
        Fail {
            name: name.to_string(),
            op,
            range: None,
        }
    }

    pub fn at(mut self, offset: u64, len: u64) -> Fail {
        self.range = Some((offset, len));
        self
    }

    pub fn because(&self, kind: ErrorKind, cause: impl Into<String>) -> DiskError {
        let e = DiskError::new(&self.name, self.op, kind, cause);
        match self.range {
            Some((offset, len)) => e.at(offset, len),
            None => e,
        }
    }

    /// The server answered something this client cannot use.
    pub fn protocol(&self, cause: impl Into<String>) -> DiskError {
        self.because(ErrorKind::Protocol, cause)
    }

    /// A request that hyper failed (the connection, mostly).
    pub fn hyper(&self, e: &hyper::Error) -> DiskError {
        let reason = hyper_reason(e);
        let mut err = self.because(hyper_kind(e), reason.clone());
        err.source = Some(Arc::new(HyperError(reason)));
        err
    }

    /// A connection that could not be made.
    pub fn connect(&self, e: &std::io::Error) -> DiskError {
        let mut err = self.because(ErrorKind::from_io(e), format!("cannot connect: {e}"));
        err.errno = e.raw_os_error();
        err
    }
}

/// hyper's errors are not `Clone`; their text is kept as the source.
#[derive(Debug)]
struct HyperError(String);

impl std::fmt::Display for HyperError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HyperError {}

/// State the endpoint shares with the tasks of its streamed runs.
pub(crate) struct Shared {
    pub name: String,
    pub host: String,
    /// The image's path (and the URL's query, if any).
    pub target: String,
    pub pool: Arc<Pool>,
    pub retry: RetryPolicy,
}

impl Shared {
    /// The image's target with `query` added.
    pub fn target_with(&self, query: &str) -> String {
        let sep = if self.target.contains('?') { '&' } else { '?' };
        format!("{}{sep}{query}", self.target)
    }

    /// Sends a ranged GET (or a plain one for `None`) and checks the answer covers the range.
    pub async fn get_range(
        &self,
        range: Option<(u64, u64)>,
        fail: &Fail,
    ) -> Result<(Response<Incoming>, Lease), DiskError> {
        let make = || {
            let mut req = Request::get(self.target.as_str()).header(header::HOST, &self.host);
            if let Some((offset, len)) = range {
                req = req.header(
                    header::RANGE,
                    format!("bytes={}-{}", offset, offset + len - 1),
                );
            }
            req.body(ReqBody::Empty).expect("valid request")
        };
        let (resp, lease) = self.send(make, fail).await?;
        let status = resp.status();
        match (status, range) {
            (StatusCode::PARTIAL_CONTENT, Some((offset, len))) => {
                match content_range(resp.headers()) {
                    Some((first, last, _)) if first == offset && last + 1 == offset + len => {}
                    other => {
                        return Err(fail.protocol(format!(
                            "the server answered the range with {other:?} instead"
                        )));
                    }
                }
            }
            (StatusCode::OK, None) => {}
            (s, _) if s.is_success() => {
                return Err(fail.protocol(format!(
                    "unexpected HTTP {s} to a ranged GET (does the server honour Range?)"
                )));
            }
            _ => return Err(status_error(resp, fail).await),
        }
        Ok((resp, lease))
    }

    /// Sends a request built by `make`, again on a fresh connection when the connection breaks
    /// before an answer (a keep-alive connection the server closed, a reset).
    pub async fn send(
        &self,
        make: impl Fn() -> Request<ReqBody>,
        fail: &Fail,
    ) -> Result<(Response<Incoming>, Lease), DiskError> {
        let mut backoff = Backoff::new(self.retry);
        loop {
            let err = match self.pool.get().await {
                Err(e) => fail.connect(&e),
                Ok(mut lease) => match lease.sender.send_request(make()).await {
                    Ok(resp) => return Ok((resp, lease)),
                    Err(e) => fail.hyper(&e),
                },
            };
            if !backoff.again(&err).await {
                return Err(backoff.give_up(err));
            }
        }
    }

    /// A request with a small answer: sends it (with retries, also after a 5xx answer), reads
    /// the body, checks for 2xx. Only for requests that may be repeated.
    pub async fn call(
        &self,
        make: impl Fn() -> Request<ReqBody>,
        fail: &Fail,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), DiskError> {
        let mut backoff = Backoff::new(self.retry);
        loop {
            let (resp, lease) = self.send(&make, fail).await?;
            // A server error (5xx) may pass, and so may a connection that broke while the
            // answer was read: the request is sent again. 4xx answers are final.
            let err = if resp.status().is_success() {
                let (parts, body) = resp.into_parts();
                match body.collect().await {
                    Ok(body) => {
                        lease.release();
                        return Ok((parts.status, parts.headers, body.to_bytes()));
                    }
                    Err(e) => fail.hyper(&e),
                }
            } else {
                status_error(resp, fail).await
            };
            if !backoff.again(&err).await {
                return Err(backoff.give_up(err));
            }
        }
    }

    pub fn request(&self, method: Method, target: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, &self.host)
    }
}

/// An error for a non-2xx answer: the status and the server's message.
pub(crate) async fn status_error(resp: Response<Incoming>, fail: &Fail) -> DiskError {
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(5), async {
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                text.extend_from_slice(&data);
            }
            if text.len() > MAX_MESSAGE {
                break;
            }
        }
        text
    })
    .await
    .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&body).trim().to_string();
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    let kind = ErrorKind::from_http_status(status.as_u16());
    let mut err = if message.is_empty() {
        fail.because(kind, format!("HTTP {status}"))
    } else {
        fail.because(kind, format!("HTTP {status}: {message}"))
    };
    err.status = Some(status.as_u16());
    err
}

/// A hyper error with its cause chain, for messages.
pub(crate) fn hyper_reason(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The kind of a hyper failure: a connection that broke before an answer is `ConnectionLost`
/// (and may be sent again), an I/O error has its own kind, the rest is the peer's protocol.
fn hyper_kind(e: &hyper::Error) -> ErrorKind {
    if e.is_closed() || e.is_incomplete_message() || e.is_canceled() {
        return ErrorKind::ConnectionLost;
    }
    if e.is_timeout() {
        return ErrorKind::Timeout;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return ErrorKind::from_io(io);
        }
        source = s.source();
    }
    ErrorKind::Protocol
}

/// `Content-Range: bytes FIRST-LAST/TOTAL` (TOTAL may be `*`); `bytes */TOTAL` gives
/// `(0, 0, Some(TOTAL))` only through [`content_range_total`].
pub(crate) fn content_range(headers: &http::HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let r = crate::wire::ContentRange::parse_lenient(v)?;
    Some((r.first, r.last?, r.total))
}

pub(crate) fn content_range_total(headers: &http::HeaderMap) -> Option<u64> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    crate::wire::ContentRange::parse_lenient(v)?.total
}
