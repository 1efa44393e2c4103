//! Starting and stopping `ferry serve`: binding the listeners (remote data service on TCP with
//! or without TLS, local data service on a Unix socket, control service on a Unix socket or
//! TCP), the accept loops, and the expired-ticket reaper.
//!
//! A Unix socket path starting with `@` names a socket in Linux's abstract namespace (the
//! reference's local service uses `\0/org/ovirt/imageio`).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

use crate::conn::{ConnCtx, Handler, serve};
use crate::control::ControlApi;
use crate::data::{DataApi, Tuning};
use crate::store::TicketStore;

/// Where the control service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlListen {
    Unix(String),
    Tcp(String),
}

/// Everything `ferry serve` needs to start, validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `ADDR:PORT` of the remote data service; port 0 picks a free port.
    pub listen: String,
    /// Certificate chain and key (PEM) for TLS; `None` serves plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub local_socket: Option<String>,
    pub control: Option<ControlListen>,
    /// Timeout of a connection until it sends an authorized request (also the TLS handshake).
    pub auth_timeout: Duration,
    /// How long DELETE waits for a cancelled ticket's operations.
    pub remove_timeout: Duration,
    /// An expired idle ticket is removed this long after it expired.
    pub reap_grace: Duration,
    pub reap_interval: Duration,
    pub tuning: Tuning,
    /// Export every ticket over NBD on this unix socket (never TLS).
    pub nbd_socket: Option<PathBuf>,
    /// Export every ticket over NBD on this TCP address (TLS when `tls` is set).
    pub nbd_listen: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "[::]:54322".to_string(),
            tls: None,
            local_socket: None,
            control: None,
            auth_timeout: Duration::from_secs(60),
            remove_timeout: Duration::from_secs(60),
            reap_grace: Duration::from_secs(600),
            reap_interval: Duration::from_secs(10),
            tuning: Tuning::default(),
            nbd_socket: None,
            nbd_listen: None,
        }
    }
}

/// A running server. Dropping it stops accepting (connections in progress finish on their
/// own) and removes the socket files it created.
pub struct Server {
    store: Arc<TicketStore>,
    remote: SocketAddr,
    local: Option<String>,
    control: Option<String>,
    tasks: Vec<JoinHandle<()>>,
    socket_files: Vec<PathBuf>,
    /// Connections accepted so far by the remote, local and control services.
    accepted: Arc<[AtomicU64; 3]>,
    /// Where tickets are exported over NBD: the unix socket and the TCP address.
    nbd_socket: Option<PathBuf>,
    nbd_listen: Option<SocketAddr>,
}

/// Index of each service in `Server::accepted`.
fn service_index(service: &str) -> usize {
    match service {
        "remote" => 0,
        "local" => 1,
        _ => 2,
    }
}

impl Server {
    /// Binds every listener and starts serving `store`'s tickets.
    pub async fn start(cfg: ServerConfig, store: Arc<TicketStore>) -> io::Result<Server> {
        let ids = Arc::new(AtomicU64::new(1));
        let accepted: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let mut tasks = Vec::new();
        let mut socket_files = Vec::new();

        let tls = match &cfg.tls {
            Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(
                nbd::server::tls_server_config(cert, key)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
            )),
            None => None,
        };
        let remote_listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("listening on {}: {e}", cfg.listen)))?;
        let remote = remote_listener.local_addr()?;

        let (local_listener, unix_socket) = match &cfg.local_socket {
            Some(name) => {
                let (l, file) = bind_unix(name, 0o660)?;
                socket_files.extend(file);
                (Some(l), Some(advertised(name)))
            }
            None => (None, None),
        };
        // NBD export of every ticket, bound first so OPTIONS can say where it is.
        let nbd_config = |tls: bool| {
            let mut c = nbd::server::ServerConfig::default();
            if tls && let Some((cert, key)) = &cfg.tls {
                c.tls = nbd::server::tls_server_config(cert, key).ok();
            }
            Arc::new(c)
        };
        let nbd_exports: Arc<dyn nbd::server::Exports> =
            Arc::new(crate::nbd_export::TicketExports {
                store: store.clone(),
            });
        let mut nbd_url = None;
        let mut nbd_listen = None;
        if let Some(path) = &cfg.nbd_socket {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path).map_err(|e| {
                io::Error::new(e.kind(), format!("listening on {}: {e}", path.display()))
            })?;
            socket_files.push(path.clone());
            nbd_url = Some(NbdUrl {
                prefix: "nbd+unix:///".into(),
                suffix: format!("?socket={}", path.display()),
            });
            tasks.push(tokio::spawn(nbd::server::serve(
                nbd::server::Listener::Unix(l),
                nbd_exports.clone(),
                nbd_config(false),
            )));
        }
        if let Some(addr) = &cfg.nbd_listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("listening on {addr}: {e}")))?;
            let bound = l.local_addr()?;
            let scheme = if cfg.tls.is_some() { "nbds" } else { "nbd" };
            // Remote clients need the TCP address more than a local socket path.
            nbd_url = Some(NbdUrl {
                prefix: format!("{scheme}://{bound}/"),
                suffix: String::new(),
            });
            nbd_listen = Some(bound);
            tasks.push(tokio::spawn(nbd::server::serve(
                nbd::server::Listener::Tcp(l),
                nbd_exports.clone(),
                nbd_config(true),
            )));
        }
        let data = |serves_info: bool| -> Arc<dyn Handler> {
            Arc::new(DataApi {
                store: store.clone(),
                unix_socket: unix_socket.clone(),
                serves_info,
                tuning: cfg.tuning,
                nbd_url: nbd_url.clone(),
            })
        };
        tasks.push(tokio::spawn(accept_tcp(
            remote_listener,
            tls,
            data(true),
            "remote",
            cfg.auth_timeout,
            ids.clone(),
            accepted.clone(),
        )));
        if let Some(l) = local_listener {
            tasks.push(tokio::spawn(accept_unix(
                l,
                data(false),
                "local",
                cfg.auth_timeout,
                ids.clone(),
                accepted.clone(),
            )));
        }

        let control_api: Arc<dyn Handler> = Arc::new(ControlApi {
            store: store.clone(),
            remove_timeout: cfg.remove_timeout,
        });
        let control = match &cfg.control {
            Some(ControlListen::Unix(name)) => {
                let (l, file) = bind_unix(name, 0o660)?;
                socket_files.extend(file);
                tasks.push(tokio::spawn(accept_unix(
                    l,
                    control_api,
                    "control",
                    cfg.auth_timeout,
                    ids.clone(),
                    accepted.clone(),
                )));
                Some(name.clone())
            }
            Some(ControlListen::Tcp(addr)) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("listening on {addr}: {e}")))?;
                let bound = l.local_addr()?.to_string();
                tasks.push(tokio::spawn(accept_tcp(
                    l,
                    None,
                    control_api,
                    "control",
                    cfg.auth_timeout,
                    ids.clone(),
                    accepted.clone(),
                )));
                Some(bound)
            }
            None => None,
        };

        let reaper_store = store.clone();
        let (grace, every) = (cfg.reap_grace, cfg.reap_interval);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            loop {
                tick.tick().await;
                reaper_store.reap(grace);
            }
        }));

        tracing::info!(%remote, tls = cfg.tls.is_some(), local = ?cfg.local_socket,
            control = ?control, "serving");
        Ok(Server {
            store,
            remote,
            local: cfg.local_socket.clone(),
            control,
            tasks,
            socket_files,
            accepted,
            nbd_socket: cfg.nbd_socket.clone(),
            nbd_listen,
        })
    }

    /// Connections the service ("remote", "local" or "control") has accepted so far.
    pub fn accepted(&self, service: &str) -> u64 {
        self.accepted[service_index(service)].load(Ordering::Relaxed)
    }

    pub fn store(&self) -> &Arc<TicketStore> {
        &self.store
    }

    /// The address the remote data service listens on.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The ready-file document: `{"remote": ADDR, "local": PATH, "control": PATH-or-ADDR}`.
    pub fn ready(&self) -> serde_json::Value {
        serde_json::json!({
            "remote": self.remote.to_string(),
            "local": self.local,
            "control": self.control,
            "nbd_socket": self.nbd_socket,
            "nbd_listen": self.nbd_listen.map(|a| a.to_string()),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for f in &self.socket_files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The name clients connect to: the path, or `\0name` for `@name`.
fn advertised(name: &str) -> String {
    match name.strip_prefix('@') {
        Some(abs) => format!("\0{abs}"),
        None => name.to_string(),
    }
}

/// Binds a Unix socket (`@name` = abstract). Returns the file to remove on shutdown.
fn bind_unix(name: &str, mode: u32) -> io::Result<(UnixListener, Option<PathBuf>)> {
    let with_name = |e: io::Error| io::Error::new(e.kind(), format!("listening on {name}: {e}"));
    if let Some(abs) = name.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())?;
        let l = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(with_name)?;
        l.set_nonblocking(true)?;
        return Ok((UnixListener::from_std(l)?, None));
    }
    let path = PathBuf::from(name);
    // A socket left by a previous run would make bind fail; anything else is not ours.
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(&path);
        }
    }
    let l = UnixListener::bind(&path).map_err(with_name)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok((l, Some(path)))
}

async fn accept_tcp(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Arc<dyn Handler>,
    service: &'static str,
    auth_timeout: Duration,
    ids: Arc<AtomicU64>,
    accepted: Arc<[AtomicU64; 3]>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!(service, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        accepted[service_index(service)].fetch_add(1, Ordering::Relaxed);
        let ctx = ConnCtx::new(id, service, peer.to_string(), auth_timeout);
        let handler = handler.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            tracing::debug!(conn = id, service, %peer, "connection accepted");
            match tls {
                None => serve(stream, ctx, handler).await,
                Some(acceptor) => {
                    match tokio::time::timeout(auth_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve(s, ctx, handler).await,
                        Ok(Err(e)) => tracing::info!(conn = id, %peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::info!(conn = id, %peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn accept_unix(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    service: &'static str,
    auth_timeout: Duration,
    ids: Arc<AtomicU64>,
    accepted: Arc<[AtomicU64; 3]>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(service, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        accepted[service_index(service)].fetch_add(1, Ordering::Relaxed);
        let ctx = ConnCtx::new(id, service, "unix".to_string(), auth_timeout);
        let handler = handler.clone();
        tokio::spawn(async move { serve(stream, ctx, handler).await });
    }
}

/// How OPTIONS tells clients where a ticket's NBD export is: `prefix + ticket id + suffix`.
#[derive(Debug, Clone)]
pub struct NbdUrl {
    pub prefix: String,
    pub suffix: String,
}

impl NbdUrl {
    pub fn for_ticket(&self, id: &str) -> String {
        let mut path = String::new();
        for b in id.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                path.push(b as char);
            } else {
                path.push_str(&format!("%{b:02X}"));
            }
        }
        format!("{}{path}{}", self.prefix, self.suffix)
    }
}
