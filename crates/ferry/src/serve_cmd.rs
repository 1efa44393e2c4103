//! `ferry serve`: the imageio-compatible transfer server. Merges the TOML config file with the
//! flags (flags win), loads start-up tickets, starts [`server::Server`] (on sockets a service
//! manager passed, if any), writes the ready file, tells systemd it is ready, and runs until
//! SIGTERM or Ctrl-C: then it drains (stops accepting, finishes the requests in progress, up
//! to the drain timeout). SIGHUP reads the configuration again and applies the TLS certificate
//! and the bandwidth limits while transfers run. `--check-config` validates and exits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use server::config::FileConfig;
use server::{ControlListen, Server, ServerConfig, TicketSpec, TicketStore};

use crate::{Failure, usage};

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML file with the same settings as the flags, plus timeouts and I/O sizes.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Address of the data service (port 0 picks a free port). Default [::]:54322.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// PEM certificate chain for the data service (TLS 1.2 or later).
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "no_tls"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        conflicts_with = "no_tls"
    )]
    pub tls_key: Option<PathBuf>,
    /// Serve the data service over plain HTTP.
    #[arg(long)]
    pub no_tls: bool,
    /// Also serve the data service, without TLS, on this Unix socket (`@NAME` = abstract).
    #[arg(long, value_name = "PATH")]
    pub local_socket: Option<String>,
    /// Serve the control (ticket) API on this Unix socket (`@NAME` = abstract).
    #[arg(long, value_name = "PATH", conflicts_with = "control_listen")]
    pub control_socket: Option<String>,
    /// Serve the control (ticket) API on this TCP address; keep it on loopback.
    #[arg(long, value_name = "ADDR:PORT")]
    pub control_listen: Option<String>,
    /// Also export every ticket over NBD on this Unix socket, under its ticket id.
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,
    /// Also export every ticket over NBD on this TCP address (TLS when the data service has
    /// it), under its ticket id.
    #[arg(long, value_name = "ADDR:PORT")]
    pub nbd_listen: Option<String>,
    /// Install this ticket (imageio ticket JSON) at start-up; may be repeated.
    #[arg(long = "ticket", value_name = "FILE.json")]
    pub tickets: Vec<PathBuf>,
    /// Keep every ticket in this directory and install them again at start-up, so a
    /// restarted server serves the same tickets (imageio forgets them).
    #[arg(long, value_name = "DIR")]
    pub ticket_store: Option<PathBuf>,
    /// Once listening, write {"remote": ADDR, "local": PATH, "control": PATH-or-ADDR,
    /// "nbd_socket": PATH, "nbd_listen": ADDR} here.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Bandwidth limit of all transfers together, bytes per second (100M, 1G; 0: none),
    /// shared in equal parts between the transfers running. Counts image data sent and
    /// received (GET and PUT bodies).
    #[arg(long, value_name = "RATE", value_parser = bwlimit::parse_rate)]
    pub bwlimit: Option<u64>,
    /// Bandwidth limit of each ticket's transfers, bytes per second, unless its ticket
    /// document sets its own ("bwlimit": bytes per second).
    #[arg(long, value_name = "RATE", value_parser = bwlimit::parse_rate)]
    pub ticket_bwlimit: Option<u64>,
    /// On SIGTERM or Ctrl-C, how long requests in progress may take to finish before the
    /// server exits anyway (seconds; default 30).
    #[arg(long, value_name = "SECONDS")]
    pub drain_timeout: Option<f64>,
    /// Check the configuration (file, flags, certificate, tickets) and exit: 0 when it is
    /// usable, 2 with the reason when not. Prints the settings in force.
    #[arg(long)]
    pub check_config: bool,
}

/// Default of `--drain-timeout`.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The data service's bandwidth limits: flags, else the file.
fn limits(args: &ServeArgs, file: &FileConfig) -> Result<server::store::Limits, Failure> {
    let rate = |flag: Option<u64>, key: &Option<server::config::Rate>| match flag {
        Some(r) => Ok(r),
        None => key.as_ref().map_or(Ok(0), |r| r.bytes()).map_err(usage),
    };
    Ok(server::store::Limits::new(
        rate(args.bwlimit, &file.bwlimit)?,
        rate(args.ticket_bwlimit, &file.ticket_bwlimit)?,
    ))
}

/// What `ferry serve` starts from besides the server configuration.
struct Start {
    tickets: Vec<PathBuf>,
    ticket_store: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    drain_timeout: Duration,
    /// The bandwidth limits as numbers (global, per ticket), for reloads.
    rates: (u64, u64),
}

/// Flags and file merged into a server configuration and what it starts with.
fn plan(args: ServeArgs) -> Result<(ServerConfig, server::store::Limits, Start), Failure> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(usage)?,
        None => FileConfig::default(),
    };
    let limits = limits(&args, &file)?;
    let rates = (limits.global.rate(), limits.per_ticket());
    let drain_timeout = match args.drain_timeout.or(file.drain_timeout) {
        None => DRAIN_TIMEOUT,
        Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
        Some(_) => return Err(usage("drain_timeout: expecting a number of seconds >= 0")),
    };
    let mut cfg = ServerConfig::default();
    if let Some(l) = args.listen.or(file.listen) {
        cfg.listen = l;
    }
    let no_tls = args.no_tls || (args.tls_cert.is_none() && file.no_tls == Some(true));
    let cert = args.tls_cert.or(file.tls_cert);
    let key = args.tls_key.or(file.tls_key);
    cfg.tls = match (no_tls, cert, key) {
        (true, _, _) => None,
        (false, Some(c), Some(k)) => Some((c, k)),
        (false, None, None) => {
            return Err(usage(
                "the data service needs --tls-cert and --tls-key, or --no-tls",
            ));
        }
        _ => return Err(usage("--tls-cert and --tls-key go together")),
    };
    cfg.local_socket = args.local_socket.or(file.local_socket);
    cfg.nbd_socket = args.nbd_socket.or(file.nbd_socket);
    cfg.nbd_listen = args.nbd_listen.or(file.nbd_listen);
    cfg.control = match (
        args.control_socket.or(file.control_socket),
        args.control_listen.or(file.control_listen),
    ) {
        (Some(_), Some(_)) => {
            return Err(usage("choose one of control_socket and control_listen"));
        }
        (Some(p), None) => Some(ControlListen::Unix(p)),
        (None, Some(a)) => Some(ControlListen::Tcp(a)),
        (None, None) => None,
    };
    let secs = |v: Option<f64>, default: Duration| v.map_or(default, Duration::from_secs_f64);
    cfg.auth_timeout = secs(file.auth_timeout, cfg.auth_timeout);
    cfg.remove_timeout = secs(file.remove_timeout, cfg.remove_timeout);
    cfg.reap_grace = secs(file.reap_grace, cfg.reap_grace);
    cfg.reap_interval = secs(file.reap_interval, cfg.reap_interval);
    if let Some(b) = file.buffer_size {
        cfg.tuning.chunk = b;
    }
    if let Some(d) = file.queue_depth {
        cfg.tuning.depth = d;
    }
    if let Some(w) = file.nbd_write_size {
        cfg.tuning.nbd_write = w;
    }
    if let Some(m) = &file.buffer_memory {
        cfg.tuning.memory = m.bytes().map_err(usage)?;
    }
    let mut tickets = file.tickets;
    tickets.extend(args.tickets);
    let start = Start {
        tickets,
        ticket_store: args.ticket_store.or(file.ticket_store),
        ready_file: args.ready_file.or(file.ready_file),
        drain_timeout,
        rates,
    };
    Ok((cfg, limits, start))
}

/// The listening sockets a service manager passed (LISTEN_FDS, named by LISTEN_FDNAMES as
/// the `.socket` unit's `FileDescriptorName=`): `remote`, `local`, `control`, `nbd`. One
/// socket without a known name is the remote data service.
fn activated_sockets() -> Result<server::server::Sockets, Failure> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let passed: Vec<(i32, String)> = sd_notify::listen_fds_with_names(true)
        .context("reading the sockets passed by the service manager")?
        .collect();
    let known = ["remote", "local", "control", "nbd"];
    let only = passed.len() == 1;
    let mut sockets = std::collections::HashMap::new();
    for (fd, name) in passed {
        // SAFETY: the activation protocol hands these descriptors to this process, once;
        // nothing else in it owns them.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let service = if known.contains(&name.as_str()) {
            name
        } else if only {
            "remote".to_string()
        } else {
            return Err(usage(format!(
                "a socket passed by the service manager is named '{name}'; name them \
                 remote, local, control or nbd (FileDescriptorName=)"
            )));
        };
        sockets.insert(service, owned);
    }
    Ok(server::server::Sockets(sockets))
}

/// `--check-config`: everything `run` would load, loaded and reported, nothing started.
fn check_config(
    cfg: &ServerConfig,
    limits: &server::store::Limits,
    start: &Start,
) -> Result<(), Failure> {
    if let Some((cert, key)) = &cfg.tls {
        nbd::server::ServerCert::load(cert, key).map_err(usage)?;
    }
    for path in &start.tickets {
        let text = std::fs::read(path)
            .map_err(|e| usage(format!("reading ticket {}: {e}", path.display())))?;
        TicketSpec::from_json(&text).map_err(|e| usage(format!("{}: {e}", path.display())))?;
    }
    if let Some(dir) = &start.ticket_store
        && dir.exists()
    {
        std::fs::read_dir(dir)
            .map_err(|e| usage(format!("ticket store {}: {e}", dir.display())))?;
    }
    use std::net::ToSocketAddrs;
    for (name, addr) in [
        ("listen", Some(&cfg.listen)),
        ("nbd_listen", cfg.nbd_listen.as_ref()),
        (
            "control_listen",
            match &cfg.control {
                Some(ControlListen::Tcp(a)) => Some(a),
                _ => None,
            },
        ),
    ] {
        if let Some(a) = addr {
            a.to_socket_addrs()
                .map_err(|e| usage(format!("{name}: {a}: {e}")))?;
        }
    }
    let settings = serde_json::json!({
        "listen": cfg.listen,
        "tls": cfg.tls.is_some(),
        "local_socket": cfg.local_socket,
        "control": match &cfg.control {
            Some(ControlListen::Unix(p)) => Some(format!("unix:{p}")),
            Some(ControlListen::Tcp(a)) => Some(format!("tcp:{a}")),
            None => None,
        },
        "nbd_socket": cfg.nbd_socket,
        "nbd_listen": cfg.nbd_listen,
        "tickets": start.tickets,
        "ticket_store": start.ticket_store,
        "auth_timeout": cfg.auth_timeout.as_secs_f64(),
        "remove_timeout": cfg.remove_timeout.as_secs_f64(),
        "reap_grace": cfg.reap_grace.as_secs_f64(),
        "drain_timeout": start.drain_timeout.as_secs_f64(),
        "buffer_size": cfg.tuning.chunk,
        "queue_depth": cfg.tuning.depth,
        "nbd_write_size": cfg.tuning.nbd_write,
        "buffer_memory": cfg.tuning.memory,
        "bwlimit": limits.global.rate(),
        "ticket_bwlimit": limits.per_ticket(),
    });
    println!("{settings:#}");
    eprintln!("ferry serve: the configuration is valid");
    Ok(())
}

/// Tells systemd (Type=notify) how the service is; a no-op without NOTIFY_SOCKET.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("notifying the service manager: {e}");
    }
}

/// SIGHUP: the configuration read again and applied to the running server.
fn reload(args: &ServeArgs, server: &mut Server) {
    let result = plan(args.clone())
        .map_err(|f| f.error)
        .and_then(|(cfg, _, start)| {
            let (global, per_ticket) = start.rates;
            Ok(server.reload(&cfg, global, per_ticket)?)
        });
    match result {
        Ok(pending) if pending.is_empty() => tracing::info!("configuration reloaded"),
        Ok(pending) => tracing::warn!(
            "configuration reloaded; changes to {} take effect at the next start",
            pending.join(", ")
        ),
        Err(e) => tracing::error!("configuration not reloaded, the old one stays: {e:#}"),
    }
}

pub async fn run(args: ServeArgs) -> Result<(), Failure> {
    let (cfg, limits, start) = plan(args.clone())?;
    if args.check_config {
        return check_config(&cfg, &limits, &start);
    }
    let ready_file = start.ready_file.clone();
    let drain = start.drain_timeout;
    let store = Arc::new(match &start.ticket_store {
        Some(dir) => {
            TicketStore::persistent_with_limits(dir, limits).context("opening the ticket store")?
        }
        None => TicketStore::with_limits(limits),
    });
    for path in &start.tickets {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let spec =
            TicketSpec::from_json(&text).map_err(|e| usage(format!("{}: {e}", path.display())))?;
        store.add(spec);
    }
    let interrupted = crate::interrupt::interrupted().context("installing the signal handlers")?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the signal handlers")?;
    let sockets = activated_sockets()?;
    let mut server = Server::start_with(cfg, store, sockets).await?;
    if let Some(path) = &ready_file {
        // Write then rename, so a watcher never reads half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, server.ready().to_string())
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    notify(&[sd_notify::NotifyState::Ready]);
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => break,
            _ = hangup.recv() => {
                notify(&[sd_notify::NotifyState::Reloading]);
                reload(&args, &mut server);
                notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        seconds = drain.as_secs_f64(),
        "shutting down: finishing the requests in progress"
    );
    // A second SIGTERM or Ctrl-C ends the wait.
    let again = crate::interrupt::interrupted().context("installing the signal handlers")?;
    tokio::select! {
        left = server.shutdown(drain) => {
            if left > 0 {
                tracing::warn!(connections = left, "drain timeout: ending the connections still open");
            } else {
                tracing::info!("all connections finished");
            }
        }
        _ = again => tracing::warn!("interrupted again: exiting without waiting"),
    }
    Ok(())
}
