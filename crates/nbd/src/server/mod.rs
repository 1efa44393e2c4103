//! The async NBD server: the handshake (fixed newstyle, STARTTLS, structured replies, extended
//! headers, meta contexts, INFO/GO and EXPORT_NAME) and the transmission phase (requests run
//! concurrently, replies go out in completion order). It serves any [`Exports`]; it never
//! panics or hangs on a hostile client: malformed input ends that client's connection, and the
//! handshake is bounded in time and memory.

mod export;
mod handshake;
mod transmission;

use std::sync::Arc;
use std::time::Duration;

pub use export::{Export, ExportCaps, ExportError, ExportFut, Exports, ReadPiece, SingleExport};

use crate::client::BoxStream;
use crate::error::Result;

/// Server settings shared by every connection.
#[derive(Clone)]
pub struct ServerConfig {
    /// When set, TLS is mandatory: every option but STARTTLS and ABORT gets TLS_REQD first.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A client that has not finished the handshake by then is dropped (qemu-nbd uses 10 s).
    pub handshake_timeout: Duration,
    /// Requests handled at once per connection.
    pub max_in_flight: usize,
    /// Payload bytes (writes received, reads being sent) in flight per connection.
    pub max_in_flight_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            max_in_flight: 64,
            max_in_flight_bytes: 64 << 20,
        }
    }
}

/// Serves one client connection to completion.
pub async fn serve_connection(
    stream: BoxStream,
    exports: Arc<dyn Exports>,
    config: Arc<ServerConfig>,
) -> Result<()> {
    let timeout = config.handshake_timeout;
    let negotiated = match tokio::time::timeout(
        timeout,
        handshake::negotiate(stream, exports.as_ref(), &config),
    )
    .await
    {
        Ok(result) => result?,
        Err(_) => {
            return Err(crate::Error::Timeout(format!(
                "client did not finish the handshake within {} s",
                timeout.as_secs_f64()
            )));
        }
    };
    match negotiated {
        Some(session) => {
            tracing::debug!(headers = ?session.mode, "NBD transmission phase");
            transmission::serve(session, &config).await
        }
        None => Ok(()),
    }
}

/// Loads a PEM certificate chain and key into a rustls server configuration (TLS 1.2+).
pub fn tls_server_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>> {
    ServerCert::load(cert, key)?.config()
}

/// A server's certificate and key, replaceable while it serves: configurations built by
/// [`ServerCert::config`] ask it for the key at every handshake, so after
/// [`ServerCert::reload`] new connections get the new certificate and connections already
/// established keep the one they negotiated.
#[derive(Debug)]
pub struct ServerCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ServerCert {
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<ServerCert>> {
        Ok(Arc::new(ServerCert {
            current: std::sync::RwLock::new(Arc::new(certified_key(cert, key)?)),
        }))
    }

    /// Reads `cert` and `key` again; on any error the certificate in use stays.
    pub fn reload(&self, cert: &std::path::Path, key: &std::path::Path) -> Result<()> {
        let fresh = Arc::new(certified_key(cert, key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// A TLS 1.2+ server configuration serving this certificate.
    pub fn config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| crate::Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(Arc::new(config))
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The chain and key of two PEM files, checked to belong together.
fn certified_key(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::sign::CertifiedKey> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |e: String| crate::Error::Tls(e);
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| tls(format!("reading certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(tls(format!("no certificate in {}", cert.display())));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| tls(format!("reading key {}: {e}", key.display())))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key_der, &provider)
        .map_err(|e| tls(format!("certificate and key: {e}")))
}

/// A listening socket the server accepts clients on.
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(BoxStream, String)> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), "unix socket client".into()))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Box::new(s), peer.to_string()))
            }
        }
    }
}

/// Accepts clients forever, each served on its own task; one client's failure never affects
/// another's.
pub async fn serve(listener: Listener, exports: Arc<dyn Exports>, config: Arc<ServerConfig>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                tracing::warn!("accepting an NBD client failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tracing::debug!(%peer, "NBD client connected");
        let (exports, config) = (exports.clone(), config.clone());
        tokio::spawn(async move {
            match serve_connection(stream, exports, config).await {
                Ok(()) => tracing::debug!(%peer, "NBD client done"),
                Err(e) => tracing::info!(%peer, "NBD client dropped: {e}"),
            }
        });
    }
}
