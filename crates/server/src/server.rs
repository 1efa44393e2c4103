//! Starting and stopping `ferry serve`: binding the listeners (remote data service on TCP with
//! or without TLS, local data service on a Unix socket, control service on a Unix socket or
//! TCP), the accept loops, and the expired-ticket reaper; taking listening sockets from a
//! service manager instead ([`Sockets`]); applying a new configuration while serving
//! ([`Server::reload`]) and draining before exit ([`Server::shutdown`]).
//!
//! A Unix socket path starting with `@` names a socket in Linux's abstract namespace (the
//! reference's local service uses `\0/org/ovirt/imageio`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
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

/// Listening sockets handed over by the service manager (socket activation), by service:
/// `remote`, `local`, `control`, `nbd`. A service with a socket here uses it instead of
/// binding its address.
#[derive(Debug, Default)]
pub struct Sockets(pub HashMap<String, OwnedFd>);

enum Inherited {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Sockets {
    fn take(&mut self, service: &str) -> io::Result<Option<Inherited>> {
        let Some(fd) = self.0.remove(service) else {
            return Ok(None);
        };
        // A Unix listener knows its address family; a TCP one does not pass as one.
        let unix = std::os::unix::net::UnixListener::from(fd);
        if unix.local_addr().is_ok() {
            unix.set_nonblocking(true)?;
            return Ok(Some(Inherited::Unix(unix)));
        }
        let tcp = std::net::TcpListener::from(OwnedFd::from(unix));
        tcp.local_addr().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the socket passed for {service} is neither TCP nor Unix: {e}"),
            )
        })?;
        tcp.set_nonblocking(true)?;
        Ok(Some(Inherited::Tcp(tcp)))
    }

    fn tcp(&mut self, service: &str) -> io::Result<Option<TcpListener>> {
        match self.take(service)? {
            None => Ok(None),
            Some(Inherited::Tcp(l)) => Ok(Some(TcpListener::from_std(l)?)),
            Some(Inherited::Unix(_)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket passed for {service} must be a TCP socket"),
            )),
        }
    }

    fn unix(&mut self, service: &str) -> io::Result<Option<UnixListener>> {
        match self.take(service)? {
            None => Ok(None),
            Some(Inherited::Unix(l)) => Ok(Some(UnixListener::from_std(l)?)),
            Some(Inherited::Tcp(_)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket passed for {service} must be a Unix socket"),
            )),
        }
    }
}

/// A running server. Dropping it stops accepting (connections in progress finish on their
/// own) and removes the socket files it created; [`Server::shutdown`] also waits for them.
pub struct Server {
    store: Arc<TicketStore>,
    cfg: ServerConfig,
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
    /// The certificate of the data service and the NBD export, replaceable by [`Server::reload`].
    cert: Option<Arc<nbd::server::ServerCert>>,
    /// Set to true to stop accepting and end connections once their request is answered.
    shutdown: watch::Sender<bool>,
}

/// Index of each service in `Server::accepted`.
fn service_index(service: &str) -> usize {
    match service {
        "remote" => 0,
        "local" => 1,
        _ => 2,
    }
}

/// What an accept loop needs to serve its connections.
#[derive(Clone)]
struct Accepting {
    service: &'static str,
    handler: Arc<dyn Handler>,
    auth_timeout: Duration,
    ids: Arc<AtomicU64>,
    accepted: Arc<[AtomicU64; 3]>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: watch::Receiver<bool>,
}

impl Accepting {
    fn context(&self, peer: String) -> Arc<ConnCtx> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        self.accepted[service_index(self.service)].fetch_add(1, Ordering::Relaxed);
        ConnCtx::new(
            id,
            self.service,
            peer,
            self.auth_timeout,
            self.metrics.clone(),
        )
    }

    /// Resolves once the server shuts down.
    async fn stopping(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

fn bind_error(what: &str) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("listening on {what}: {e}"))
}

impl Server {
    /// Binds every listener and starts serving `store`'s tickets.
    pub async fn start(cfg: ServerConfig, store: Arc<TicketStore>) -> io::Result<Server> {
        Self::start_with(cfg, store, Sockets::default()).await
    }

    /// Like [`Server::start`], using the listening `sockets` passed by a service manager where
    /// it has them.
    pub async fn start_with(
        cfg: ServerConfig,
        store: Arc<TicketStore>,
        mut sockets: Sockets,
    ) -> io::Result<Server> {
        let ids = Arc::new(AtomicU64::new(1));
        let accepted: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut socket_files = Vec::new();
        let accepting = |service: &'static str, handler: Arc<dyn Handler>| Accepting {
            service,
            handler,
            auth_timeout: cfg.auth_timeout,
            ids: ids.clone(),
            accepted: accepted.clone(),
            metrics: store.metrics.clone(),
            shutdown: shutdown_rx.clone(),
        };

        let invalid = |e: nbd::Error| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
        let cert = match &cfg.tls {
            Some((cert, key)) => Some(nbd::server::ServerCert::load(cert, key).map_err(invalid)?),
            None => None,
        };
        let tls_config = match &cert {
            Some(c) => Some(c.config().map_err(invalid)?),
            None => None,
        };
        let tls = tls_config
            .as_ref()
            .map(|c| tokio_rustls::TlsAcceptor::from(c.clone()));
        let remote_listener = match sockets.tcp("remote")? {
            Some(l) => l,
            None => TcpListener::bind(&cfg.listen)
                .await
                .map_err(bind_error(&cfg.listen))?,
        };
        let remote = remote_listener.local_addr()?;

        let (local_listener, unix_socket) = match &cfg.local_socket {
            Some(name) => {
                let l = match sockets.unix("local")? {
                    Some(l) => l,
                    None => {
                        let (l, file) = bind_unix(name, 0o660)?;
                        socket_files.extend(file);
                        l
                    }
                };
                (Some(l), Some(advertised(name)))
            }
            None => (None, None),
        };
        // NBD export of every ticket, bound first so OPTIONS can say where it is.
        let nbd_config = |tls: bool| {
            let mut c = nbd::server::ServerConfig::default();
            if tls {
                c.tls = tls_config.clone();
            }
            Arc::new(c)
        };
        let nbd_exports: Arc<dyn nbd::server::Exports> =
            Arc::new(crate::nbd_export::TicketExports {
                store: store.clone(),
            });
        let mut nbd_url = None;
        let mut nbd_listen = None;
        let mut nbd_inherited = sockets.take("nbd")?;
        if let Some(path) = &cfg.nbd_socket {
            let l = match nbd_inherited.take() {
                Some(Inherited::Unix(l)) => UnixListener::from_std(l)?,
                other => {
                    nbd_inherited = other;
                    let _ = std::fs::remove_file(path);
                    let l = UnixListener::bind(path)
                        .map_err(bind_error(&path.display().to_string()))?;
                    socket_files.push(path.clone());
                    l
                }
            };
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
            let l = match nbd_inherited.take() {
                Some(Inherited::Tcp(l)) => TcpListener::from_std(l)?,
                _ => TcpListener::bind(addr).await.map_err(bind_error(addr))?,
            };
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
        let memory = Arc::new(tokio::sync::Semaphore::new(
            cfg.tuning
                .memory
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS as u64) as usize,
        ));
        let data = |serves_info: bool| -> Arc<dyn Handler> {
            Arc::new(DataApi {
                store: store.clone(),
                unix_socket: unix_socket.clone(),
                serves_info,
                tuning: cfg.tuning,
                nbd_url: nbd_url.clone(),
                memory: memory.clone(),
            })
        };
        tasks.push(tokio::spawn(accept_tcp(
            remote_listener,
            tls,
            accepting("remote", data(true)),
        )));
        if let Some(l) = local_listener {
            tasks.push(tokio::spawn(accept_unix(
                l,
                accepting("local", data(false)),
            )));
        }

        let control_api: Arc<dyn Handler> = Arc::new(ControlApi {
            store: store.clone(),
            remove_timeout: cfg.remove_timeout,
        });
        let control = match &cfg.control {
            Some(ControlListen::Unix(name)) => {
                let l = match sockets.unix("control")? {
                    Some(l) => l,
                    None => {
                        let (l, file) = bind_unix(name, 0o660)?;
                        socket_files.extend(file);
                        l
                    }
                };
                tasks.push(tokio::spawn(accept_unix(
                    l,
                    accepting("control", control_api),
                )));
                Some(name.clone())
            }
            Some(ControlListen::Tcp(addr)) => {
                let l = match sockets.tcp("control")? {
                    Some(l) => l,
                    None => TcpListener::bind(addr).await.map_err(bind_error(addr))?,
                };
                let bound = l.local_addr()?.to_string();
                tasks.push(tokio::spawn(accept_tcp(
                    l,
                    None,
                    accepting("control", control_api),
                )));
                Some(bound)
            }
            None => None,
        };
        if let Some(name) = sockets.0.keys().next() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a socket was passed for '{name}', which is not configured"),
            ));
        }

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
            cert,
            shutdown,
            cfg,
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

    /// Applies what can change while serving: the TLS certificate and key (new connections get
    /// them; established ones keep theirs) and the bandwidth limits. Settings that need new
    /// listeners or connections are named in the returned list; they take effect at the next
    /// start. On error (an unreadable certificate) nothing changes.
    pub fn reload(
        &mut self,
        cfg: &ServerConfig,
        global_rate: u64,
        ticket_rate: u64,
    ) -> io::Result<Vec<&'static str>> {
        match (&self.cert, &cfg.tls) {
            (Some(current), Some((cert, key))) => current
                .reload(cert, key)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
            (None, None) => {}
            _ => return Err(io::Error::other("turning TLS on or off needs a restart")),
        }
        self.store.set_limits(global_rate, ticket_rate);
        let old = &self.cfg;
        let mut pending = Vec::new();
        for (name, changed) in [
            ("listen", old.listen != cfg.listen),
            ("local_socket", old.local_socket != cfg.local_socket),
            ("control", old.control != cfg.control),
            ("nbd_socket", old.nbd_socket != cfg.nbd_socket),
            ("nbd_listen", old.nbd_listen != cfg.nbd_listen),
            ("auth_timeout", old.auth_timeout != cfg.auth_timeout),
            ("remove_timeout", old.remove_timeout != cfg.remove_timeout),
            ("reap_grace", old.reap_grace != cfg.reap_grace),
            ("reap_interval", old.reap_interval != cfg.reap_interval),
            ("buffer_size", old.tuning.chunk != cfg.tuning.chunk),
            ("queue_depth", old.tuning.depth != cfg.tuning.depth),
            (
                "nbd_write_size",
                old.tuning.nbd_write != cfg.tuning.nbd_write,
            ),
            ("buffer_memory", old.tuning.memory != cfg.tuning.memory),
        ] {
            if changed {
                pending.push(name);
            }
        }
        let tls = cfg.tls.clone();
        self.cfg.tls = tls;
        Ok(pending)
    }

    /// Stops accepting, lets every connection finish the request it is serving (idle ones
    /// close at once), and waits for them up to `deadline`; then flushes and closes the
    /// tickets' backends. Returns the connections still open at the deadline: they are cut
    /// when the process exits, before their responses, so no client is told that bytes they
    /// still carry were written.
    pub async fn shutdown(mut self, deadline: Duration) -> usize {
        let _ = self.shutdown.send(true);
        let until = tokio::time::Instant::now() + deadline;
        let open = loop {
            let open = self.store.metrics.live_connections().len();
            if open == 0 || tokio::time::Instant::now() >= until {
                break open;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.store.close_backends().await;
        open
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
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

async fn accept_tcp(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, how: Accepting) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = how.stopping() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!(service = how.service, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = how.context(peer.to_string());
        let (handler, shutdown) = (how.handler.clone(), how.shutdown.clone());
        let (tls, auth_timeout, service) = (tls.clone(), how.auth_timeout, how.service);
        tokio::spawn(async move {
            let id = ctx.id;
            tracing::debug!(conn = id, service, %peer, "connection accepted");
            match tls {
                None => serve(stream, ctx, handler, shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(auth_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve(s, ctx, handler, shutdown).await,
                        Ok(Err(e)) => tracing::info!(conn = id, %peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::info!(conn = id, %peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn accept_unix(listener: UnixListener, how: Accepting) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = how.stopping() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(service = how.service, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = how.context("unix".to_string());
        let (handler, shutdown) = (how.handler.clone(), how.shutdown.clone());
        tokio::spawn(async move { serve(stream, ctx, handler, shutdown).await });
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
