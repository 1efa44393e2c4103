//! A builder for `nbd-server` peers (the reference server, 3.24 here: simple replies only, no
//! block status).
//!
//! nbd-server is configured through a file with a `[generic]` section and one section per
//! export (the section name is the export name). With `-d` it serves a single client and exits,
//! so the harness lets it daemonize instead (`-p PIDFILE`) and stops the daemon and its
//! per-client children by pid on drop. It listens on `unixsock` in the peer's private directory
//! (or on a free loopback TCP port).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::peer::{Endpoint, Peer};

/// Options for one nbd-server export.
#[derive(Debug, Clone)]
pub struct NbdServer {
    image: PathBuf,
    export: String,
    read_only: bool,
    flush: bool,
    fua: bool,
    trim: bool,
    tcp: bool,
    tls_dir: Option<PathBuf>,
    extra_exports: Vec<(String, PathBuf)>,
}

impl NbdServer {
    /// Serves `image` (an absolute or relative path; it is made absolute) as export `disk`.
    pub fn new(image: &Path) -> Self {
        NbdServer {
            image: absolute(image),
            export: "disk".to_owned(),
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            tcp: false,
            tls_dir: None,
            extra_exports: Vec::new(),
        }
    }

    /// The export (section) name.
    pub fn export_name(mut self, name: &str) -> Self {
        self.export = name.to_owned();
        self
    }

    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Turns off the flush, fua and trim options (all on by default).
    pub fn no_flush_fua_trim(mut self) -> Self {
        self.flush = false;
        self.fua = false;
        self.trim = false;
        self
    }

    /// Listen on a free loopback TCP port instead of a Unix socket.
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// Mandatory TLS for every export with the certificates in `dir`.
    pub fn tls(mut self, dir: &Path) -> Self {
        self.tls_dir = Some(dir.to_path_buf());
        self
    }

    /// Another export (writable, same options) named `name` serving `image`.
    pub fn extra_export(mut self, name: &str, image: &Path) -> Self {
        self.extra_exports.push((name.to_owned(), absolute(image)));
        self
    }

    /// The configuration file text for `endpoint`.
    fn config(&self, endpoint: &Endpoint) -> String {
        let mut c = String::from("[generic]\nallowlist = true\nmax_threads = 8\n");
        match endpoint {
            Endpoint::Unix(path) => writeln!(c, "unixsock = {}", path.display()).unwrap(),
            Endpoint::Tcp { host, port } => {
                writeln!(c, "listenaddr = {host}\nport = {port}").unwrap()
            }
        }
        if let Some(dir) = &self.tls_dir {
            let d = dir.display();
            writeln!(
                c,
                "certfile = {d}/server-cert.pem\nkeyfile = {d}/server-key.pem\n\
                 cacertfile = {d}/ca-cert.pem\nforce_tls = true"
            )
            .unwrap();
        }
        let exports = std::iter::once((&self.export, &self.image))
            .chain(self.extra_exports.iter().map(|(n, p)| (n, p)));
        for (name, image) in exports {
            writeln!(c, "\n[{name}]\nexportname = {}", image.display()).unwrap();
            let flags = [
                ("readonly", self.read_only && name == &self.export),
                ("flush", self.flush),
                ("fua", self.fua),
                ("trim", self.trim),
            ];
            for (key, on) in flags {
                writeln!(c, "{key} = {on}").unwrap();
            }
        }
        c
    }

    /// Starts the daemon and waits until it accepts connections.
    pub fn start(self) -> Peer {
        let bin = crate::require_binary("nbd-server");
        let dir = crate::temp_dir();
        let endpoint = if self.tcp {
            Endpoint::free_tcp()
        } else {
            Endpoint::unix_in(dir.path())
        };
        let config = dir.path().join("nbd-server.conf");
        std::fs::write(&config, self.config(&endpoint)).expect("writing nbd-server config");
        let pid_file = dir.path().join("nbd-server.pid");
        let mut cmd = Command::new(bin);
        cmd.arg("-C").arg(&config).arg("-p").arg(&pid_file);
        Peer::spawn_daemon("nbd-server", cmd, dir, endpoint, &self.export, &pid_file)
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
