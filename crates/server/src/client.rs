//! A client for the control API, for `ferry ticket` and tests: one HTTP/1.1 request per call
//! over a Unix socket (`@name` = abstract) or TCP. Answers come back as status and body; the
//! caller decides what an error status means.

use std::io;
use std::time::Duration;

use bytes::Bytes;
pub use http::Method;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::server::ControlListen;

/// How long one control request may take (DELETE may wait for running operations).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// One answer of the control service.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    /// The body as text, without the trailing newline error bodies carry.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim_end().to_string()
    }
}

/// Sends `method path` with an optional JSON body to the control service at `addr`.
pub async fn request(
    addr: &ControlListen,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> io::Result<Reply> {
    let fut = async {
        match addr {
            ControlListen::Unix(name) => {
                let stream = match name.strip_prefix('@') {
                    Some(abs) => {
                        use std::os::linux::net::SocketAddrExt;
                        let a = std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())?;
                        let s = std::os::unix::net::UnixStream::connect_addr(&a)?;
                        s.set_nonblocking(true)?;
                        tokio::net::UnixStream::from_std(s)?
                    }
                    None => tokio::net::UnixStream::connect(name).await?,
                };
                send(stream, method, path, body).await
            }
            ControlListen::Tcp(host) => {
                let stream = tokio::net::TcpStream::connect(host).await?;
                send(stream, method, path, body).await
            }
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "control request timed out"))?
}

async fn send<S>(stream: S, method: Method, path: &str, body: Option<Vec<u8>>) -> io::Result<Reply>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let other = |e: hyper::Error| io::Error::other(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(other)?;
    let driver = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost");
    if body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(other)?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(other)?.to_bytes();
    driver.abort();
    Ok(Reply { status, body })
}
