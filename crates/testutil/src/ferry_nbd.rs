//! `ferry nbd-server` as a test peer: the real binary (tests pass its path, e.g.
//! `env!("CARGO_BIN_EXE_ferry")`) serving an image on a Unix socket in a private temporary
//! directory (or a free loopback TCP port), started with `--ready-file` and considered ready
//! only once that file appears. Its log (stdout and stderr) stays in the directory. Dropping the
//! peer sends SIGTERM, then SIGKILL, and reaps the process; `PR_SET_PDEATHSIG` takes it down
//! with a test process that dies without unwinding.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::peer::{Endpoint, START_TIMEOUT};

/// How long the server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Options for one `ferry nbd-server`.
#[derive(Debug, Clone)]
pub struct FerryNbd {
    bin: PathBuf,
    image: PathBuf,
    read_only: bool,
    export_name: Option<String>,
    tls: Option<(PathBuf, PathBuf)>,
    tcp: bool,
    env: Vec<(String, String)>,
    extra: Vec<String>,
}

impl FerryNbd {
    /// `bin nbd-server image`, on a Unix socket, writable, export name "".
    pub fn new(bin: &Path, image: &Path) -> Self {
        FerryNbd {
            bin: bin.to_path_buf(),
            image: image.to_path_buf(),
            read_only: false,
            export_name: None,
            tls: None,
            tcp: false,
            env: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// `--read-only`.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// `--export-name NAME`.
    pub fn export_name(mut self, name: &str) -> Self {
        self.export_name = Some(name.to_owned());
        self
    }

    /// `--tls-cert CERT --tls-key KEY`: TLS becomes mandatory.
    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Mandatory TLS with the server certificate of a [`crate::Certs`] directory.
    pub fn tls_from(self, certs: &crate::Certs) -> Self {
        let dir = certs.dir();
        self.tls(&dir.join("server-cert.pem"), &dir.join("server-key.pem"))
    }

    /// `--listen 127.0.0.1:0` instead of a Unix socket.
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// An environment variable for the server (e.g. `RUST_LOG`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Any other argument, placed after the image.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_owned());
        self
    }

    /// The command line `start` runs, for a socket in `dir` and a ready file `ready`.
    fn command(&self, dir: &Path, ready: &Path) -> (Command, Option<PathBuf>) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("nbd-server").arg(&self.image);
        let socket = if self.tcp {
            cmd.args(["--listen", "127.0.0.1:0"]);
            None
        } else {
            let path = dir.join("nbd.sock");
            cmd.arg("--socket").arg(&path);
            Some(path)
        };
        cmd.arg("--ready-file").arg(ready);
        if self.read_only {
            cmd.arg("--read-only");
        }
        if let Some(name) = &self.export_name {
            cmd.arg("--export-name").arg(name);
        }
        if let Some((cert, key)) = &self.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        cmd.args(&self.extra);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        (cmd, socket)
    }

    /// Starts the server and waits until it has written its ready file.
    pub fn start(self) -> FerryNbdPeer {
        let dir = crate::temp_dir();
        let ready = dir.path().join("ready.json");
        let log = dir.path().join("server.log");
        let (mut cmd, socket) = self.command(dir.path(), &ready);
        let line = format!("{cmd:?}");
        let out = std::fs::File::create(&log).expect("creating the server log");
        let err = out.try_clone().expect("duplicating the log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {line}: {e}"));
        let mut peer = FerryNbdPeer {
            child: Some(child),
            endpoint: Endpoint::Unix(socket.clone().unwrap_or_default()),
            export: self.export_name.clone().unwrap_or_default(),
            ready: Value::Null,
            log,
            dir,
        };
        peer.ready = peer.wait_ready(&ready, &line);
        if socket.is_none() {
            let listen = peer.ready["listen"]
                .as_str()
                .unwrap_or_else(|| panic!("ready file without \"listen\": {}", peer.ready));
            let (host, port) = listen
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("bad listen address {listen}"));
            peer.endpoint = Endpoint::Tcp {
                host: host.to_owned(),
                port: port.parse().expect("port number"),
            };
        }
        peer
    }
}

/// A running `ferry nbd-server`.
pub struct FerryNbdPeer {
    child: Option<Child>,
    endpoint: Endpoint,
    export: String,
    ready: Value,
    log: PathBuf,
    // Last, so the directory outlives the process when dropping.
    dir: TempDir,
}

impl FerryNbdPeer {
    /// Polls for the ready file; panics with the log if the server exits or takes too long.
    fn wait_ready(&mut self, ready: &Path, line: &str) -> Value {
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(ready)
                && let Ok(value) = serde_json::from_str::<Value>(&text)
            {
                return value;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "ferry nbd-server exited ({status}) before it was ready\ncommand: {line}\nlog:\n{}",
                    self.log()
                );
            }
            if start.elapsed() > START_TIMEOUT {
                panic!(
                    "ferry nbd-server wrote no ready file within {START_TIMEOUT:?}\ncommand: {line}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the server wrote to its ready file.
    pub fn ready(&self) -> &Value {
        &self.ready
    }

    /// The URI from the ready file.
    pub fn ready_uri(&self) -> String {
        self.ready["uri"]
            .as_str()
            .unwrap_or_else(|| panic!("ready file without \"uri\": {}", self.ready))
            .to_owned()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The Unix socket, if the server listens on one.
    pub fn socket(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Unix(path) => Some(path),
            Endpoint::Tcp { .. } => None,
        }
    }

    /// The export name it serves.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The server's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `nbd+unix:///EXPORT?socket=PATH` (or `nbd://HOST:PORT/EXPORT`).
    pub fn nbd_uri(&self) -> String {
        self.uri_with("nbd", &self.export, &[])
    }

    /// A URI with `scheme` (`nbd`/`nbds`; `+unix` is added for sockets), `export` and extra
    /// query parameters (percent-encoded here).
    pub fn uri_with(&self, scheme: &str, export: &str, query: &[(&str, &str)]) -> String {
        let mut params = Vec::new();
        let mut uri = match &self.endpoint {
            Endpoint::Unix(path) => {
                params.push(format!("socket={}", encode(&path.to_string_lossy())));
                format!("{scheme}+unix:///{}", encode(export))
            }
            Endpoint::Tcp { host, port } => format!("{scheme}://{host}:{port}/{}", encode(export)),
        };
        params.extend(query.iter().map(|(k, v)| format!("{k}={}", encode(v))));
        if !params.is_empty() {
            uri.push('?');
            uri.push_str(&params.join("&"));
        }
        uri
    }

    /// What the server printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` at least `count` times; false on timeout.
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for FerryNbdPeer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `/`.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
