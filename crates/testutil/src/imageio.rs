//! imageio transfer servers as test peers: the real ovirt-imageio daemon (from the venv that
//! `scripts/imageio-venv` makes) and `ferry serve`, both behind one handle.
//!
//! Each server gets a private temporary directory holding its configuration, log, control
//! socket and (optionally) its local data socket, listens on a free loopback port (port 0; the
//! daemon names the port in its log, ferry in its ready file), and is killed and reaped on
//! drop. Tickets are installed through the control socket with `PUT /tickets/ID`, the way the
//! oVirt engine does it, so both servers are driven by the same code.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::tls::Certs;

/// How long a server may take to start listening (the daemon is a Python program).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The venv python with ovirt-imageio, made by `scripts/imageio-venv` when missing.
pub fn imageio_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv-imageio/bin/python");
    if python.exists() {
        return python;
    }
    let out = Command::new(root.join("scripts/imageio-venv"))
        .output()
        .expect("running scripts/imageio-venv");
    assert!(
        out.status.success(),
        "scripts/imageio-venv failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// How to start a server.
#[derive(Default)]
pub struct ServerOptions<'a> {
    /// Serve the data service over TLS with this directory's `server-cert.pem` and
    /// `server-key.pem`; plain HTTP otherwise.
    pub tls: Option<&'a Certs>,
    /// Also serve data on a Unix socket in the server's directory (advertised in OPTIONS as
    /// `unix_socket`).
    pub local_socket: bool,
}

/// Which program serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Daemon,
    FerryServe,
}

/// A running imageio-compatible server. See the module documentation.
pub struct ImageioServer {
    kind: Kind,
    child: Option<Child>,
    port: u16,
    tls: bool,
    control: PathBuf,
    local: Option<PathBuf>,
    log: PathBuf,
    // Last, so the directory outlives the process when dropping.
    dir: TempDir,
}

impl ImageioServer {
    /// The ovirt-imageio daemon with a generated `conf.d/daemon.conf`: no privilege dropping,
    /// no systemd, everything in the private directory.
    pub fn daemon(opts: &ServerOptions) -> ImageioServer {
        let python = imageio_python();
        let dir = crate::temp_dir();
        let d = dir.path();
        let conf = d.join("conf");
        let run_dir = d.join("run");
        std::fs::create_dir_all(conf.join("conf.d")).expect("creating the daemon's conf.d");
        std::fs::create_dir_all(&run_dir).expect("creating the daemon's run dir");
        let control = d.join("control.sock");
        let local = d.join("local.sock");
        let log = d.join("daemon.log");
        let tls = match opts.tls {
            Some(certs) => format!(
                "enable = true\ncert_file = {}\nkey_file = {}\nca_file = {}\n",
                certs.dir().join("server-cert.pem").display(),
                certs.dir().join("server-key.pem").display(),
                certs.ca_cert().display()
            ),
            None => "enable = false\n".to_string(),
        };
        let text = format!(
            "[daemon]\ndrop_privileges = false\nsystemd_enable = false\nrun_dir = {run}\n\n\
             [tls]\n{tls}\n\
             [remote]\nhost = 127.0.0.1\nport = 0\n\n\
             [local]\nenable = {local_on}\nsocket = {local}\n\n\
             [control]\ntransport = unix\nsocket = {control}\n\n\
             [profile]\nfilename = {profile}\n\n\
             [handler_logfile]\nargs = ({log:?},)\n",
            run = run_dir.display(),
            local_on = opts.local_socket,
            local = local.display(),
            control = control.display(),
            profile = run_dir.join("profile").display(),
            log = log.display().to_string(),
        );
        std::fs::write(conf.join("conf.d/daemon.conf"), text).expect("writing daemon.conf");
        let exe = python.with_file_name("ovirt-imageio");
        let mut cmd = Command::new(&python);
        cmd.arg(&exe).arg("-c").arg(&conf);
        // The daemon logs to its log file; its own stdout and stderr (tracebacks before
        // logging starts) go next to it.
        let out = d.join("daemon.out");
        let child = spawn(&mut cmd, &out);
        let mut server = ImageioServer {
            kind: Kind::Daemon,
            child: Some(child),
            port: 0,
            tls: opts.tls.is_some(),
            control,
            local: opts.local_socket.then_some(local),
            log,
            dir,
        };
        let start = Instant::now();
        server.port = loop {
            let text = std::fs::read_to_string(&server.log).unwrap_or_default();
            if let Some(port) = listening_port(&text) {
                break port;
            }
            server.check_alive(start, &format!("{cmd:?}"));
            std::thread::sleep(Duration::from_millis(20));
        };
        while UnixStream::connect(&server.control).is_err() {
            server.check_alive(start, &format!("{cmd:?}"));
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `ferry serve` (the binary at `ferry`) with flags equivalent to [`ImageioServer::daemon`].
    pub fn ferry_serve(ferry: &Path, opts: &ServerOptions) -> ImageioServer {
        let dir = crate::temp_dir();
        let d = dir.path();
        let control = d.join("control.sock");
        let local = d.join("local.sock");
        let mut cmd = Command::new(ferry);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--control-socket"])
            .arg(&control);
        match opts.tls {
            Some(certs) => {
                cmd.arg("--tls-cert")
                    .arg(certs.dir().join("server-cert.pem"))
                    .arg("--tls-key")
                    .arg(certs.dir().join("server-key.pem"));
            }
            None => {
                cmd.arg("--no-tls");
            }
        }
        if opts.local_socket {
            cmd.arg("--local-socket").arg(&local);
        }
        let serve = crate::FerryServe::start_command(cmd, d);
        let port = serve.port();
        ImageioServer {
            kind: Kind::FerryServe,
            child: Some(serve.into_child()),
            port,
            tls: opts.tls.is_some(),
            control,
            local: opts.local_socket.then_some(local),
            log: d.join("serve.log"),
            dir,
        }
    }

    /// Panics with the log if the server exited or is too slow to start.
    fn check_alive(&mut self, start: Instant, line: &str) {
        let child = self.child.as_mut().expect("running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{:?} exited ({status}) before it was ready\ncommand: {line}\nlog:\n{}",
                self.kind,
                self.log()
            );
        }
        assert!(
            start.elapsed() < START_TIMEOUT,
            "{:?} not ready within {START_TIMEOUT:?}\ncommand: {line}\nlog:\n{}",
            self.kind,
            self.log()
        );
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The control socket (`/tickets/...`).
    pub fn control_socket(&self) -> &Path {
        &self.control
    }

    /// The local data socket, when enabled.
    pub fn local_socket(&self) -> Option<&Path> {
        self.local.as_deref()
    }

    /// The transfer URL of ticket `id` (127.0.0.1 matches the test certificate's IP name).
    pub fn url(&self, id: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/images/{id}", self.port)
    }

    /// What the server logged so far (for the daemon, its log file and its own output).
    pub fn log(&self) -> String {
        let mut text = std::fs::read_to_string(&self.log).unwrap_or_default();
        if self.kind == Kind::Daemon {
            text.push_str(
                &std::fs::read_to_string(self.dir().join("daemon.out")).unwrap_or_default(),
            );
        }
        text
    }

    /// Installs a ticket (`PUT /tickets/ID` on the control socket); panics unless the server
    /// accepts it.
    pub fn add_ticket(&self, ticket: &serde_json::Value) {
        let id = ticket["uuid"].as_str().expect("a ticket has a uuid");
        let (status, body) = self.control("PUT", &format!("/tickets/{id}"), &ticket.to_string());
        assert!(
            (200..300).contains(&status),
            "adding ticket {id}: HTTP {status}: {body}\nserver log:\n{}",
            self.log()
        );
    }

    /// A ticket for the raw file at `path`.
    pub fn file_ticket(&self, id: &str, path: &Path, size: u64, ops: &[&str]) {
        self.add_ticket(&ticket_json(
            id,
            &format!("file://{}", path.display()),
            size,
            ops,
        ));
    }

    /// A ticket for the NBD server on the Unix socket `socket` (default export).
    pub fn nbd_ticket(&self, id: &str, socket: &Path, size: u64, ops: &[&str]) {
        self.add_ticket(&ticket_json(
            id,
            &format!("nbd:unix:{}", socket.display()),
            size,
            ops,
        ));
    }

    /// One request on the control socket: (status, body).
    pub fn control(&self, method: &str, target: &str, body: &str) -> (u16, String) {
        let mut sock = UnixStream::connect(&self.control).unwrap_or_else(|e| {
            panic!("connecting to {}: {e}", self.control.display());
        });
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("setting a read timeout");
        let request = format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(request.as_bytes())
            .expect("writing a control request");
        let mut answer = Vec::new();
        // The server closes the connection after the answer (Connection: close).
        let _ = sock.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in the control answer {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string());
        (status, body)
    }
}

impl Drop for ImageioServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An imageio ticket document.
pub fn ticket_json(id: &str, url: &str, size: u64, ops: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "uuid": id,
        "url": url,
        "size": size,
        "ops": ops,
        "timeout": 300,
    })
}

/// Starts `cmd` with its output in `log`, stdin closed, killed with the test process.
pub(crate) fn spawn(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("creating a server log");
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
    cmd.spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// The port in the daemon's "remote.service listening on ('127.0.0.1', PORT)" line.
fn listening_port(log: &str) -> Option<u16> {
    let line = log
        .lines()
        .find(|l| l.contains("remote.service listening on"))?;
    let tail = line.rsplit_once(", ")?.1;
    tail.trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_daemon_port() {
        let log =
            "2025 INFO (MainThread) [services] remote.service listening on ('127.0.0.1', 40123)\n";
        assert_eq!(listening_port(log), Some(40123));
        assert_eq!(listening_port("control.service listening on '/x'"), None);
    }
}
