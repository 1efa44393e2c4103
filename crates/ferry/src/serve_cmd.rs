//! `ferry serve`: the imageio-compatible transfer server. Merges the TOML config file with the
//! flags (flags win), loads start-up tickets, starts [`server::Server`], writes the ready file,
//! and runs until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use server::config::FileConfig;
use server::{ControlListen, Server, ServerConfig, TicketSpec, TicketStore};

use crate::{Failure, usage};

#[derive(clap::Args, Debug)]
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
}

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
}

/// Flags and file merged into a server configuration and what it starts with.
fn plan(args: ServeArgs) -> Result<(ServerConfig, server::store::Limits, Start), Failure> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(usage)?,
        None => FileConfig::default(),
    };
    let limits = limits(&args, &file)?;
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
    let mut tickets = file.tickets;
    tickets.extend(args.tickets);
    let start = Start {
        tickets,
        ticket_store: args.ticket_store.or(file.ticket_store),
        ready_file: args.ready_file.or(file.ready_file),
    };
    Ok((cfg, limits, start))
}

pub async fn run(args: ServeArgs) -> Result<(), Failure> {
    let (cfg, limits, start) = plan(args)?;
    let ready_file = start.ready_file;
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
    let server = Server::start(cfg, store).await?;
    if let Some(path) = &ready_file {
        // Write then rename, so a watcher never reads half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, server.ready().to_string())
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    interrupted.await;
    tracing::info!("shutting down");
    drop(server);
    Ok(())
}
