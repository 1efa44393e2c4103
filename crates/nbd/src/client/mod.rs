//! The async NBD client: connecting (TCP, Unix, abstract Unix, TLS), the handshake, and a
//! pipelined [`Connection`] that keeps many requests in flight and matches replies by cookie.
//! [`Client`] spreads requests over several connections when the server allows multi-conn.

mod connection;
mod handshake;
mod multi;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use connection::{Connection, PendingReply, Reply, ZeroFlags};
pub use handshake::Negotiated;
pub use multi::{Client, StatusExtent};

use crate::error::{Error, Result};
use crate::tls::TlsOptions;
use crate::uri::{NbdUri, Transport};

/// Any byte stream the client can run over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// Default time the client waits for the server to say anything while it is owed an answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default deadline for connecting and the handshake: a server that accepts and then says
/// nothing is given up on (and the connection retried) well before [`DEFAULT_TIMEOUT`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on requests in flight on one connection (nbdcopy's `--requests`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// How a client behaves on any connection, wherever the server is: what to negotiate and how
/// long to wait. Kept apart from the address so a caller can settle them before the server
/// exists (a server started for one copy binds its socket later).
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub structured_replies: bool,
    pub extended_headers: bool,
    /// Meta contexts to select (SET_META_CONTEXT), e.g. `base:allocation`.
    pub meta_contexts: Vec<String>,
    /// Ask the server which meta contexts it offers (LIST_META_CONTEXT).
    pub list_meta_contexts: bool,
    /// Ask for the canonical name and description too.
    pub full_info: bool,
    pub timeout: Duration,
    /// Deadline for connecting and the handshake, when it should differ from `timeout`.
    pub handshake_timeout: Option<Duration>,
    pub max_in_flight: usize,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            structured_replies: true,
            extended_headers: true,
            meta_contexts: Vec::new(),
            list_meta_contexts: false,
            full_info: false,
            timeout: DEFAULT_TIMEOUT,
            handshake_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// How to reach an export and what to negotiate.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub transport: Transport,
    pub export: String,
    /// STARTTLS with these settings; when set, TLS is mandatory.
    pub tls: Option<TlsOptions>,
    pub settings: ClientSettings,
}

impl ConnectOptions {
    pub fn new(transport: Transport, export: impl Into<String>) -> Self {
        ConnectOptions::with_settings(transport, export, ClientSettings::default())
    }

    /// Options for `export` at `transport`, behaving as `settings` say (no TLS).
    pub fn with_settings(
        transport: Transport,
        export: impl Into<String>,
        settings: ClientSettings,
    ) -> Self {
        ConnectOptions {
            transport,
            export: export.into(),
            tls: None,
            settings,
        }
    }

    /// Options for a parsed URI: `nbds` schemes make TLS mandatory, with the URI's TLS parameters.
    pub fn from_uri(uri: &NbdUri) -> Self {
        let mut opts = ConnectOptions::new(uri.transport.clone(), uri.export.clone());
        if uri.tls {
            let name = uri.tls_server_name();
            opts.tls = Some(match &uri.tls_certificates {
                Some(dir) => TlsOptions::from_certificates_dir(dir, name, uri.tls_verify_peer),
                None => TlsOptions {
                    verify_peer: uri.tls_verify_peer,
                    server_name: name,
                    ..TlsOptions::default()
                },
            });
        }
        opts
    }

    /// Opens a connection and runs the handshake up to transmission.
    pub async fn connect(&self) -> Result<Connection> {
        let hs = self.handshake().await?;
        let (stream, negotiated) = hs.negotiate(self).await?;
        Ok(Connection::start(stream, negotiated, self))
    }

    /// Lists the server's exports (NBD_OPT_LIST) as (name, description).
    pub async fn list_exports(&self) -> Result<Vec<(String, String)>> {
        let mut hs = self.handshake().await?;
        let exports = hs.list().await;
        hs.abort().await;
        exports
    }

    async fn handshake(&self) -> Result<handshake::Handshake> {
        let deadline = self
            .settings
            .handshake_timeout
            .unwrap_or(self.settings.timeout);
        let stream = connect_transport(&self.transport, deadline).await?;
        let hs = handshake::Handshake::start(stream, deadline).await?;
        match &self.tls {
            Some(tls) => hs.starttls(tls).await,
            None => Ok(hs),
        }
    }
}

/// Opens the socket a transport names.
pub async fn connect_transport(transport: &Transport, timeout: Duration) -> Result<BoxStream> {
    let what = format!("connecting to {}", describe_transport(transport));
    match transport {
        Transport::Tcp { host, port } => {
            let stream = handshake::with_timeout(timeout, &what, async {
                tokio::net::TcpStream::connect((host.as_str(), *port)).await
            })
            .await?;
            stream
                .set_nodelay(true)
                .map_err(|e| Error::io("setting TCP_NODELAY", e))?;
            Ok(Box::new(stream))
        }
        Transport::Unix { path } => {
            let stream = connect_unix(path).map_err(|e| Error::io(&what, e))?;
            Ok(Box::new(stream))
        }
    }
}

/// Connects a Unix socket; a path starting with NUL names an abstract socket.
fn connect_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let std_stream = if let Some(name) = bytes.strip_prefix(b"\0") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        std::os::unix::net::UnixStream::connect_addr(&addr)?
    } else {
        std::os::unix::net::UnixStream::connect(path)?
    };
    std_stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(std_stream)
}

/// A short human description of where a transport points.
pub fn describe_transport(transport: &Transport) -> String {
    match transport {
        Transport::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
        Transport::Tcp { host, port } => format!("{host}:{port}"),
        Transport::Unix { path } => format!("unix socket {}", path.display()),
    }
}
