//! A builder for `qemu-nbd` peers. The server always runs `--persistent` so it survives
//! several clients in a row; `--shared N` lets N clients in at once (and, for N ≠ 1, makes
//! qemu-nbd advertise CAN_MULTI_CONN).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::peer::{Endpoint, Peer};

/// Options for one `qemu-nbd` export.
#[derive(Debug, Clone)]
pub struct QemuNbd {
    image: PathBuf,
    format: String,
    read_only: bool,
    shared: Option<u32>,
    allocation_depth: bool,
    bitmaps: Vec<String>,
    export: String,
    description: Option<String>,
    tls_dir: Option<(PathBuf, bool)>,
    tcp: bool,
    discard: bool,
    extra: Vec<String>,
    /// Listen on this socket instead of a fresh private one (a server restarted in place).
    socket: Option<PathBuf>,
}

impl QemuNbd {
    /// Serves `image` (format `raw` unless [`QemuNbd::format`] says otherwise).
    pub fn new(image: &Path) -> Self {
        QemuNbd {
            image: image.to_path_buf(),
            format: "raw".to_owned(),
            read_only: false,
            shared: None,
            allocation_depth: false,
            bitmaps: Vec::new(),
            export: String::new(),
            description: None,
            tls_dir: None,
            tcp: false,
            discard: false,
            extra: Vec::new(),
            socket: None,
        }
    }

    /// Listens on `path` (whose directory the caller keeps), so that a server started again
    /// later has the same URI.
    pub fn unix_socket(mut self, path: &Path) -> Self {
        self.socket = Some(path.to_path_buf());
        self
    }

    /// `raw` or `qcow2` (`-f`).
    pub fn format(mut self, format: &str) -> Self {
        self.format = format.to_owned();
        self
    }

    /// `--read-only`.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// `--shared=N` (0 = unlimited).
    pub fn shared(mut self, n: u32) -> Self {
        self.shared = Some(n);
        self
    }

    /// `--allocation-depth`: offers the `qemu:allocation-depth` context.
    pub fn allocation_depth(mut self) -> Self {
        self.allocation_depth = true;
        self
    }

    /// `--bitmap=NAME`: offers `qemu:dirty-bitmap:NAME`.
    pub fn bitmap(mut self, name: &str) -> Self {
        self.bitmaps.push(name.to_owned());
        self
    }

    /// `--export-name=NAME` (default: the empty name).
    pub fn export_name(mut self, name: &str) -> Self {
        self.export = name.to_owned();
        self
    }

    /// `--description=TEXT`.
    pub fn description(mut self, text: &str) -> Self {
        self.description = Some(text.to_owned());
        self
    }

    /// Mandatory TLS with the X.509 credentials in `dir` (`ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem`); `verify_clients` makes the server demand a client certificate signed
    /// by the CA.
    pub fn tls(mut self, dir: &Path, verify_clients: bool) -> Self {
        self.tls_dir = Some((dir.to_path_buf(), verify_clients));
        self
    }

    /// Listen on a free loopback TCP port instead of a Unix socket.
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// `--discard=unmap`: trims and zero writes without NO_HOLE punch holes.
    pub fn discard(mut self) -> Self {
        self.discard = true;
        self
    }

    /// Any other argument, placed before the image name.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_owned());
        self
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(self) -> Peer {
        let bin = crate::require_binary("qemu-nbd");
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
        cmd.arg("--persistent");
        cmd.arg(format!("--format={}", self.format));
        match &endpoint {
            Endpoint::Unix(path) => {
                cmd.arg("--socket").arg(path);
            }
            Endpoint::Tcp { host, port } => {
                cmd.arg(format!("--bind={host}"))
                    .arg(format!("--port={port}"));
            }
        }
        if self.read_only {
            cmd.arg("--read-only");
        }
        if let Some(n) = self.shared {
            cmd.arg(format!("--shared={n}"));
        }
        if self.allocation_depth {
            cmd.arg("--allocation-depth");
        }
        for b in &self.bitmaps {
            cmd.arg(format!("--bitmap={b}"));
        }
        cmd.arg(format!("--export-name={}", self.export));
        if let Some(d) = &self.description {
            cmd.arg(format!("--description={d}"));
        }
        if let Some((tls_dir, verify)) = &self.tls_dir {
            let verify = if *verify { "on" } else { "off" };
            // qemu's option syntax escapes commas by doubling them.
            let dir = tls_dir.to_string_lossy().replace(',', ",,");
            cmd.arg("--object").arg(format!(
                "tls-creds-x509,id=tls0,dir={dir},endpoint=server,verify-peer={verify}"
            ));
            cmd.arg("--tls-creds=tls0");
        }
        if self.discard {
            cmd.arg("--discard=unmap");
        }
        cmd.args(&self.extra);
        cmd.arg(&self.image);
        Peer::spawn("qemu-nbd", cmd, dir, endpoint, &self.export)
    }
}
