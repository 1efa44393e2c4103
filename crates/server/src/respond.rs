//! Response building shared by every service: the body type, error responses in the
//! reference's shape (`text/plain; charset=UTF-8`, message and a newline), JSON in the
//! reference's text form, the rule that a failed request whose body was not read closes the
//! connection, and [`backend_error`], the one place a backend failure becomes a status.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::store::Forbidden;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body: fixed bytes or a stream from a backend.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The body a 500 carries; details go to the log, not to the client.
const INTERNAL_MESSAGE: &str = "Server failed to perform the request, check logs";

/// A request that failed, as the client will see it.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
    /// Close the connection after answering (authorization failures, unread bodies).
    pub close: bool,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Sent as `text/html` (the reference's stock pages) instead of `text/plain`.
    html: bool,
    /// The backend failure behind it, for metrics.
    backend_kind: Option<disk::ErrorKind>,
}

/// The longest request line (method, target and version) the reference reads; longer ones
/// are 414.
pub const MAX_REQUEST_LINE: usize = 4096;

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
            close: false,
            headers: Vec::new(),
            html: false,
            backend_kind: None,
        }
    }

    /// What kind of failure this is, as metrics label it: the backend error's kind
    /// (`no-space`, ...), or the refusal (`forbidden`, `not-found`, `bad-request`, ...).
    pub fn kind(&self) -> String {
        if let Some(k) = self.backend_kind {
            return k.name().to_string();
        }
        match self.status.canonical_reason() {
            Some(r) => r.to_ascii_lowercase().replace(' ', "-"),
            None => format!("http-{}", self.status.as_u16()),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 403, always closing the connection: a client probing tickets gets one try per connection.
    pub fn forbidden(why: &Forbidden) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            format!("You are not allowed to access this resource: {}", why.0),
        )
        .closing()
    }

    /// 416, with `content-range: bytes */TOTAL` when the valid size is known (text, so a
    /// ticket size beyond u64 is echoed exactly).
    pub fn range(message: impl Into<String>, total: Option<&dyn std::fmt::Display>) -> Self {
        let mut e = Self::new(StatusCode::RANGE_NOT_SATISFIABLE, message);
        if let Some(t) = total {
            let value = imageio::wire::ContentRange::unsatisfied(&t.to_string());
            e.headers.push((
                http::header::CONTENT_RANGE,
                HeaderValue::from_str(&value).expect("ascii"),
            ));
        }
        e
    }

    /// 414 for a request line over [`MAX_REQUEST_LINE`], shaped like the reference's (Python's
    /// stock HTML error page), closing.
    pub fn uri_too_long() -> Self {
        let mut e = Self::new(StatusCode::URI_TOO_LONG, "Request-URI Too Long").closing();
        e.html = true;
        e
    }

    /// 500 with the generic text; `detail` is logged.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("request failed: {detail}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, INTERNAL_MESSAGE)
    }

    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    pub fn into_response(self) -> Response<Body> {
        let (text, content_type) = if self.html {
            let code = self.status.as_u16();
            let page = format!(
                "<!DOCTYPE HTML>\n<html lang=\"en\">\n<head><title>Error response</title></head>\n\
                 <body>\n<h1>Error response</h1>\n<p>Error code: {code}</p>\n\
                 <p>Message: {}.</p>\n</body>\n</html>\n",
                self.message
            );
            (page, "text/html;charset=utf-8")
        } else {
            (self.message + "\n", "text/plain; charset=UTF-8")
        };
        let mut resp = Response::new(full(text));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        for (k, v) in self.headers {
            h.insert(k, v);
        }
        if self.close {
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<disk::DiskError> for HttpError {
    fn from(e: disk::DiskError) -> Self {
        backend_error(&e)
    }
}

/// What the client hears about a failed backend operation. This is the only place that
/// decides it.
///
/// ovirt-imageio 2.5 answers every backend failure with `500 Server failed to perform the
/// request, check logs` — no space, a read-only or missing image, a lost NBD connection, an
/// NBD error reply alike — and its clients read 500 as "resend everything since the last
/// flush". A different status for some of them would make a reference client give up (4xx is
/// "do not retry") where it would have recovered, so ferry answers the same and puts the
/// condition in the log, where an operator can act on it. (Unsupported operations that the
/// reference reports as 404 are decided by the handlers that know the operation is optional,
/// e.g. dirty extents.)
pub fn backend_error(e: &disk::DiskError) -> HttpError {
    use disk::ErrorKind as K;
    let status = match e.kind() {
        // Each kind answers what the reference answers for the same condition: 500. Named
        // one by one so the choice per kind is visible; kinds added later (the enum is
        // non-exhaustive) get the same.
        K::NoSpace
        | K::ReadOnly
        | K::PermissionDenied
        | K::NotFound
        | K::Unsupported
        | K::InvalidRequest
        | K::ConnectionLost
        | K::Timeout
        | K::Protocol
        | K::Io
        | K::Server
        | K::Changed
        | K::Cancelled
        | K::VerifyMismatch
        | K::Other
        | _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tracing::error!(kind = ?e.kind(), status = status.as_u16(), "backend failed: {e}");
    let mut error = HttpError::new(status, INTERNAL_MESSAGE);
    error.backend_kind = Some(e.kind());
    error
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty_body() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A bodiless response. `content-length: 0` is explicit because the reference always sends
/// it (hyper would leave it out).
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

/// A JSON response, in the reference's text form.
pub fn json(value: &impl serde::Serialize) -> Response<Body> {
    json_text(imageio::wire::to_json(value))
}

/// A JSON response from already serialized text.
pub fn json_text(text: String) -> Response<Body> {
    let mut resp = Response::new(full(text));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Marks a response so the connection closes after it.
pub fn close_after(resp: &mut Response<Body>) {
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_failures_answer_like_the_reference() {
        for errno in [
            libc::ENOSPC,
            libc::EROFS,
            libc::ENOENT,
            libc::EACCES,
            libc::EIO,
        ] {
            let e = disk::DiskError::new(
                "file:///x",
                disk::Op::Write,
                disk::ErrorKind::from_errno(errno),
                "failed",
            );
            let h = backend_error(&e);
            assert_eq!(h.status, StatusCode::INTERNAL_SERVER_ERROR, "errno {errno}");
            assert_eq!(h.message, INTERNAL_MESSAGE);
            assert!(!h.close);
        }
    }
}
