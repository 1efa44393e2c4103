//! A builder for `nbdkit` peers: any plugin with its arguments, any filters, on a private Unix
//! socket (or loopback TCP), in the foreground with `--exit-with-parent`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::peer::{Endpoint, Peer};

/// Options for one nbdkit server.
#[derive(Debug, Clone)]
pub struct Nbdkit {
    plugin: String,
    args: Vec<String>,
    filters: Vec<String>,
    read_only: bool,
    tls_dir: Option<(PathBuf, bool)>,
    tcp: bool,
    export: String,
    /// Listen on this socket instead of a fresh private one (a server restarted in place).
    socket: Option<PathBuf>,
}

impl Nbdkit {
    /// nbdkit running `plugin` (e.g. `memory`, `pattern`, `sparse-random`, `null`).
    pub fn new(plugin: &str) -> Self {
        Nbdkit {
            plugin: plugin.to_owned(),
            args: Vec::new(),
            filters: Vec::new(),
            read_only: false,
            tls_dir: None,
            tcp: false,
            export: String::new(),
            socket: None,
        }
    }

    /// Listens on `path` (whose directory the caller keeps), so that a server started again
    /// later has the same URI.
    pub fn unix_socket(mut self, path: &Path) -> Self {
        self.socket = Some(path.to_path_buf());
        self
    }

    /// A plugin or filter parameter, e.g. `size=64M` or `error-pread-rate=100%`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Several parameters at once.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// `--filter=NAME`; filters stack in the order given (first = outermost).
    pub fn filter(mut self, name: &str) -> Self {
        self.filters.push(name.to_owned());
        self
    }

    /// `--readonly`.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// `--tls=require` with the certificates in `dir`; `verify_clients` adds
    /// `--tls-verify-peer`.
    pub fn tls(mut self, dir: &Path, verify_clients: bool) -> Self {
        self.tls_dir = Some((dir.to_path_buf(), verify_clients));
        self
    }

    /// Listen on a free loopback TCP port instead of a Unix socket.
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// The export name [`Peer::nbd_uri`] uses (nbdkit serves any name unless a filter says
    /// otherwise).
    pub fn export_name(mut self, name: &str) -> Self {
        self.export = name.to_owned();
        self
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(self) -> Peer {
        let bin = crate::require_binary("nbdkit");
        let dir = crate::temp_dir();
        let endpoint = if self.tcp {
            Endpoint::free_tcp()
        } else if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
            Endpoint::Unix(path.clone())
        } else {
            Endpoint::unix_in(dir.path())
        };
        let mut cmd = Command::new(bin);
        cmd.args(["--foreground", "--exit-with-parent"]);
        match &endpoint {
            Endpoint::Unix(path) => {
                cmd.arg("--unix").arg(path);
            }
            Endpoint::Tcp { host, port } => {
                cmd.arg(format!("--ipaddr={host}"))
                    .arg(format!("--port={port}"));
            }
        }
        if self.read_only {
            cmd.arg("--readonly");
        }
        if let Some((tls_dir, verify)) = &self.tls_dir {
            cmd.arg("--tls=require")
                .arg(format!("--tls-certificates={}", tls_dir.display()));
            if *verify {
                cmd.arg("--tls-verify-peer");
            }
        }
        for f in &self.filters {
            cmd.arg(format!("--filter={f}"));
        }
        cmd.arg(&self.plugin);
        cmd.args(&self.args);
        Peer::spawn("nbdkit", cmd, dir, endpoint, &self.export)
    }
}
