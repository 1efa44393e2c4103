//! `ferry nbd-server FILE`: serve a raw file or block device over NBD, like qemu-nbd, on a unix
//! socket, a TCP address, or a socket passed by systemd socket activation; with `--format
//! qcow2` (or `auto`), the disk a qcow2 image holds, writable unless `--read-only`, with block
//! status from its tables.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use disk::Endpoint;
use disk::export::EndpointExport;
use disk::file::FileEndpoint;
use endpoints::{Format, Role, Spec};
use nbd::server::{Listener, ServerConfig, SingleExport};

use crate::{Failure, usage};

#[derive(clap::Args, Debug)]
pub struct NbdServerArgs {
    /// Image file or block device to serve.
    pub file: PathBuf,
    /// How FILE is read: `raw` (its bytes, the default), `qcow2` (the disk it holds, backing
    /// files followed; writes go into the image, never its backing files) or `auto` (qcow2 by
    /// its magic, without backing files).
    #[arg(short = 'f', long, value_name = "FORMAT", default_value = "raw", value_parser = crate::copy_cmd::parse_format)]
    pub format: endpoints::Format,
    /// Refuse writes.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Listen on this unix socket.
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,
    /// Listen on this TCP address (port 0 picks a free port). Default 127.0.0.1:10809, unless
    /// a socket is passed by socket activation (LISTEN_FDS).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Name of the export.
    #[arg(long, default_value = "")]
    pub export_name: String,
    /// PEM certificate chain; with --tls-key, TLS becomes mandatory.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Once listening, write {"uri": …, "socket"|"listen": …} here.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// O_DIRECT I/O on the file.
    #[arg(long)]
    pub direct: bool,
}

/// The socket systemd-style activation passed us, if any (fd 3, LISTEN_PID = our pid).
fn activated_socket() -> Result<Option<Listener>, Failure> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    if !ours || count == 0 {
        return Ok(None);
    }
    const FD: i32 = 3;
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int into `domain`, whose size `len` describes.
    let r = unsafe {
        libc::getsockopt(
            FD,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(anyhow::anyhow!(
            "LISTEN_FDS is set but fd 3 is not a socket: {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    // SAFETY: the activation protocol hands fd 3 to this process; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(FD) };
    let listener = if domain == libc::AF_UNIX {
        let std = std::os::unix::net::UnixListener::from(fd);
        std.set_nonblocking(true)?;
        Listener::Unix(tokio::net::UnixListener::from_std(std)?)
    } else {
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true)?;
        Listener::Tcp(tokio::net::TcpListener::from_std(std)?)
    };
    // Children must not think the socket is theirs.
    // SAFETY: unsetenv is called before any other thread reads the environment here (the
    // runtime's threads do not touch these variables).
    unsafe {
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_PID");
    }
    Ok(Some(listener))
}

pub async fn run(args: NbdServerArgs) -> Result<(), Failure> {
    let qcow2 = match args.format {
        Format::Raw => false,
        Format::Qcow2 => true,
        Format::Auto => endpoints::looks_like_qcow2(&args.file)?,
    };
    let endpoint: Arc<dyn Endpoint> = if qcow2 && !args.read_only {
        // A probed image is never allowed a backing file, as when it is read.
        let follow_backing = args.format == Format::Qcow2;
        let image =
            disk::qcow2::Qcow2Endpoint::open_rw(&args.file, follow_backing).map_err(|mut e| {
                if !follow_backing && e.cause.contains("backing") {
                    e.cause.push_str(
                        " (a probed image may not name other files; --format qcow2 follows \
                         its backing chain)",
                    );
                }
                e
            })?;
        Arc::new(image)
    } else if qcow2 {
        let opts = endpoints::OpenOptions {
            src_format: args.format,
            direct: args.direct,
            ..endpoints::OpenOptions::default()
        };
        let spec = Spec::Path(args.file.clone());
        crate::endpoint::open(&spec, Role::Source, &opts)
            .await?
            .endpoint
    } else if args.read_only {
        Arc::new(FileEndpoint::open_source(&args.file, args.direct)?)
    } else {
        Arc::new(FileEndpoint::open_existing(&args.file, args.direct)?)
    };
    let export = EndpointExport::new(endpoint.clone(), args.read_only, String::new());
    let exports = Arc::new(SingleExport {
        name: args.export_name.clone(),
        export: Arc::new(export),
    });
    let mut config = ServerConfig::default();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(nbd::server::tls_server_config(cert, key)?);
    }
    let scheme = if config.tls.is_some() { "nbds" } else { "nbd" };
    let export_path = percent_path(&args.export_name);
    let (listener, ready) = if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("listening on {}", path.display()))?;
        let uri = format!("{scheme}+unix:///{export_path}?socket={}", path.display());
        (
            Listener::Unix(l),
            serde_json::json!({"uri": uri, "socket": path}),
        )
    } else if let (None, Some(l)) = (&args.listen, activated_socket()?) {
        (l, serde_json::json!({"activated": true}))
    } else {
        let addr = args.listen.as_deref().unwrap_or("127.0.0.1:10809");
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = l.local_addr()?;
        let uri = format!("{scheme}://{local}/{export_path}");
        (
            Listener::Tcp(l),
            serde_json::json!({"uri": uri, "listen": local.to_string()}),
        )
    };
    if let Some(path) = &args.ready_file {
        // Write then rename, so a watcher never reads half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.export_name.len() > 4096 {
        return Err(usage("--export-name: at most 4096 bytes"));
    }
    let interrupted = crate::interrupt::interrupted().context("installing the signal handlers")?;
    let serve = nbd::server::serve(listener, exports, Arc::new(config));
    tokio::select! {
        _ = serve => {}
        _ = interrupted => {}
    }
    if !args.read_only {
        // Clients that never flushed still get their writes (a qcow2 image's tables included).
        endpoint.flush().await?;
    }
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn percent_path(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
