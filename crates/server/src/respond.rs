//! Response building shared by every service: the body type, error responses in the
//! reference's shape (`text/plain; charset=UTF-8`, message and a newline), and the rule that a
//! failed request whose body was not read closes the connection.

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
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
            close: false,
            headers: Vec::new(),
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

    /// 416, with `content-range: bytes */TOTAL` when the valid size is known.
    pub fn range(message: impl Into<String>, total: Option<u64>) -> Self {
        let mut e = Self::new(StatusCode::RANGE_NOT_SATISFIABLE, message);
        if let Some(t) = total {
            e.headers.push((
                http::header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{t}")).expect("ascii"),
            ));
        }
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
        let mut text = self.message;
        text.push('\n');
        let mut resp = Response::new(full(text));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=UTF-8"),
        );
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
        HttpError::internal(e)
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty_body() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A bodiless response (`content-length: 0`).
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = status;
    resp
}

/// A JSON response.
pub fn json(value: &serde_json::Value) -> Response<Body> {
    json_text(value.to_string())
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
