//! Request helpers shared by the services: query strings, `y|n` flags, CORS headers, and
//! reading small JSON bodies with a size limit and a timeout.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http::header::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::respond::HttpError;

/// Largest JSON body accepted (tickets, PATCH operations).
pub const MAX_JSON_BODY: usize = 64 << 10;

/// True if the request declares a body (a non-zero `Content-Length`, or chunked framing).
pub fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// Decoded `key=value` pairs of the query string, in order.
pub fn query_pairs(uri: &http::Uri) -> Vec<(String, String)> {
    let Some(q) = uri.query() else {
        return Vec::new();
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decodes (and `+` as space, as forms do), lossily.
pub fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

pub fn query_value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A `y|n` query flag (`flush=`, `close=`); 400 with the reference's message otherwise.
pub fn yes_no(pairs: &[(String, String)], key: &str, default: bool) -> Result<bool, HttpError> {
    match query_value(pairs, key) {
        None => Ok(default),
        Some("y") => Ok(true),
        Some("n") => Ok(false),
        Some(other) => Err(HttpError::bad_request(format!(
            "Unsupported value '{other}' for '{key}', expecting one of ['n', 'y']"
        ))),
    }
}

/// CORS headers for GET/PUT/PATCH/OPTIONS on images and GET /info/: added only when the
/// matching request header is present. `methods` is what OPTIONS answers to a preflight.
pub fn cors(req: &HeaderMap, resp: &mut HeaderMap, methods: &'static str) {
    let mut added = false;
    if req.contains_key(http::header::ORIGIN) {
        resp.insert(
            http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        added = true;
    }
    if req.contains_key(http::header::ACCESS_CONTROL_REQUEST_HEADERS) {
        resp.insert(
            http::header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("*"),
        );
        added = true;
    }
    if req.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD) {
        resp.insert(
            http::header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        added = true;
    }
    if added {
        resp.insert(
            http::header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
    }
}

/// Reads a whole small body. Too large → 413 (closing: the rest is unread); a client that
/// stops sending for `timeout` or breaks the framing → 400 (closing).
pub async fn read_small_body(body: Incoming, timeout: Duration) -> Result<Bytes, HttpError> {
    let mut body = body;
    let mut out = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => {
                return Err(HttpError::bad_request("Timeout reading request body").closing());
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(
                    HttpError::bad_request(format!("Error reading request body: {e}")).closing(),
                );
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_JSON_BODY {
                return Err(HttpError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("Request body larger than {MAX_JSON_BODY} bytes"),
                )
                .closing());
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn query_parsing_and_flags() {
        let req = Request::get("/images/x?flush=n&close=y&a%20b=c+d&flush=y")
            .body(())
            .unwrap();
        let q = query_pairs(req.uri());
        assert_eq!(query_value(&q, "a b"), Some("c d"));
        assert!(yes_no(&q, "flush", false).unwrap());
        assert!(yes_no(&q, "close", false).unwrap());
        assert!(!yes_no(&q, "missing", false).unwrap());
        let req = Request::get("/x?flush=maybe").body(()).unwrap();
        let e = yes_no(&query_pairs(req.uri()), "flush", true).unwrap_err();
        assert_eq!(
            e.message,
            "Unsupported value 'maybe' for 'flush', expecting one of ['n', 'y']"
        );
    }

    #[test]
    fn cors_only_when_asked() {
        let mut resp = HeaderMap::new();
        cors(&HeaderMap::new(), &mut resp, "*");
        assert!(resp.is_empty());
        let mut req = HeaderMap::new();
        req.insert(http::header::ORIGIN, HeaderValue::from_static("https://e"));
        req.insert(
            http::header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("PATCH"),
        );
        cors(&req, &mut resp, "OPTIONS,GET,PUT,PATCH");
        assert_eq!(resp["access-control-allow-origin"], "*");
        assert_eq!(
            resp["access-control-allow-methods"],
            "OPTIONS,GET,PUT,PATCH"
        );
        assert_eq!(resp["access-control-max-age"], "86400");
    }
}
