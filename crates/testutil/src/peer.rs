//! A running NBD server process owned by a test.
//!
//! Every peer gets a private temporary directory holding its Unix socket (or it listens on a
//! free loopback TCP port), its log (stdout and stderr) and any configuration file. Starting
//! waits until the socket answers with the NBD greeting, failing with the server's log if it
//! died or never answered. Dropping the peer terminates the process (SIGTERM, then SIGKILL),
//! reaps it and removes the directory. Children are also started with `PR_SET_PDEATHSIG`, so a
//! test process that dies without unwinding takes its servers with it (the signal follows the
//! thread that started the peer, which is the test's own thread in practice).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a server may take to exit after SIGTERM before it is killed (nbdkit waits for
/// connected clients, which a failed test may not have closed).
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a peer listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl Endpoint {
    /// A Unix socket path inside `dir`.
    pub fn unix_in(dir: &Path) -> Endpoint {
        Endpoint::Unix(dir.join("nbd.sock"))
    }

    /// A loopback TCP port that was free a moment ago.
    pub fn free_tcp() -> Endpoint {
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).expect("binding a loopback port");
        let port = listener.local_addr().expect("local address").port();
        Endpoint::Tcp {
            host: "127.0.0.1".to_owned(),
            port,
        }
    }
}

enum Process {
    /// Our child; reaped on drop.
    Child(Child),
    /// A server that daemonized itself (nbd-server); known by the pid it wrote.
    Daemon(i32),
}

/// A running server. See the module documentation.
pub struct Peer {
    name: String,
    process: Option<Process>,
    endpoint: Endpoint,
    export: String,
    log: PathBuf,
    // Last, so the directory outlives the process when dropping.
    dir: TempDir,
}

impl Peer {
    /// Spawns `cmd` (which must stay in the foreground) and waits until it listens.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        dir: TempDir,
        endpoint: Endpoint,
        export: &str,
    ) -> Peer {
        let log = dir.path().join("server.log");
        let child = configure(&mut cmd, &log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        let mut peer = Peer {
            name: name.to_owned(),
            process: Some(Process::Child(child)),
            endpoint,
            export: export.to_owned(),
            log,
            dir,
        };
        peer.wait_ready(&format!("{cmd:?}"));
        peer
    }

    /// Runs `cmd`, which forks a daemon that writes its pid to `pid_file`, and waits until the
    /// daemon listens.
    pub fn spawn_daemon(
        name: &str,
        mut cmd: Command,
        dir: TempDir,
        endpoint: Endpoint,
        export: &str,
        pid_file: &Path,
    ) -> Peer {
        let log = dir.path().join("server.log");
        let line = format!("{cmd:?}");
        let status = configure(&mut cmd, &log)
            .status()
            .unwrap_or_else(|e| panic!("starting {name} ({line}): {e}"));
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{line} failed ({status}): {}", read_log());
        let start = Instant::now();
        let pid = loop {
            let text = std::fs::read_to_string(pid_file).unwrap_or_default();
            if let Ok(pid) = text.trim().parse::<i32>() {
                break pid;
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "{name} wrote no pid to {} ({line}): {}",
                pid_file.display(),
                read_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut peer = Peer {
            name: name.to_owned(),
            process: Some(Process::Daemon(pid)),
            endpoint,
            export: export.to_owned(),
            log,
            dir,
        };
        peer.wait_ready(&line);
        peer
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The Unix socket path, if the peer listens on one.
    pub fn socket(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Unix(path) => Some(path),
            Endpoint::Tcp { .. } => None,
        }
    }

    /// The export tests connect to by default.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The peer's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nbd+unix:///EXPORT?socket=PATH` or `nbd://127.0.0.1:PORT/EXPORT` for the default export.
    pub fn nbd_uri(&self) -> String {
        self.uri_for(&self.export)
    }

    /// Like [`Peer::nbd_uri`] for another export name.
    pub fn uri_for(&self, export: &str) -> String {
        self.uri_with("nbd", export, &[])
    }

    /// A URI with `scheme` (`nbd` or `nbds`; `+unix` is added for Unix sockets), `export`, and
    /// extra query parameters (values are percent-encoded here).
    pub fn uri_with(&self, scheme: &str, export: &str, query: &[(&str, &str)]) -> String {
        let mut params: Vec<String> = Vec::new();
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

    /// The server's process id.
    pub fn pid(&self) -> i32 {
        match self.process.as_ref().expect("running") {
            Process::Child(c) => c.id() as i32,
            Process::Daemon(pid) => *pid,
        }
    }

    /// Polls until the endpoint answers with the NBD greeting; panics with the log otherwise.
    fn wait_ready(&mut self, line: &str) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before accepting connections\ncommand: {line}\nlog:\n{}",
                    self.name,
                    self.log()
                );
            }
            if self.greets() {
                return;
            }
            if start.elapsed() > START_TIMEOUT {
                panic!(
                    "{} did not accept connections within {START_TIMEOUT:?}\ncommand: {line}\nlog:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Some(description) if the server is gone.
    fn exited(&mut self) -> Option<String> {
        match self.process.as_mut()? {
            Process::Child(child) => child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| status.to_string()),
            Process::Daemon(pid) => (!alive(*pid)).then(|| format!("daemon pid {pid} is gone")),
        }
    }

    /// True if a connection gets the 8-byte "NBDMAGIC" greeting.
    fn greets(&self) -> bool {
        let mut buf = [0u8; 8];
        let timeout = Some(Duration::from_secs(2));
        let got = match &self.endpoint {
            Endpoint::Unix(path) => {
                std::os::unix::net::UnixStream::connect(path).and_then(|mut s| {
                    s.set_read_timeout(timeout)?;
                    s.read_exact(&mut buf)
                })
            }
            Endpoint::Tcp { host, port } => std::net::TcpStream::connect((host.as_str(), *port))
                .and_then(|mut s| {
                    s.set_read_timeout(timeout)?;
                    s.read_exact(&mut buf)
                }),
        };
        got.is_ok() && &buf == b"NBDMAGIC"
    }

    fn stop(&mut self) {
        match self.process.take() {
            None => {}
            Some(Process::Child(mut child)) => {
                let pid = child.id() as i32;
                signal(pid, libc::SIGTERM);
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
            Some(Process::Daemon(pid)) => {
                // The daemon forks one process per client; stop those too.
                let mut pids = children_of(pid);
                pids.push(pid);
                for &p in &pids {
                    signal(p, libc::SIGTERM);
                }
                let start = Instant::now();
                while pids.iter().any(|&p| alive(p)) && start.elapsed() < STOP_TIMEOUT {
                    std::thread::sleep(Duration::from_millis(5));
                }
                for &p in pids.iter().filter(|&&p| alive(p)) {
                    signal(p, libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends output to `log`, closes stdin, and asks the kernel to kill the child with its parent.
fn configure<'a>(cmd: &'a mut Command, log: &Path) -> &'a mut Command {
    let out = std::fs::File::create(log).expect("creating the server log");
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
    cmd
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// True if `pid` exists and is not a zombie (a daemon's zombie is not ours to reap).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_field(&stat, 0).is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| stat_field(&stat, 1)?.parse::<i32>().ok())
                == Some(pid)
        })
        .collect()
}

/// Field `n` after the command name in /proc/PID/stat (0 = state, 1 = parent pid).
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(n)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_uri_parts() {
        assert_eq!(encode("/tmp/a b/s.sock"), "/tmp/a%20b/s.sock");
        assert_eq!(encode("x&y=z"), "x%26y%3Dz");
    }

    #[test]
    fn reads_stat_fields() {
        let stat = "42 (a (weird) name) S 7 42 42 0";
        assert_eq!(stat_field(stat, 0), Some("S"));
        assert_eq!(stat_field(stat, 1), Some("7"));
        assert!(alive(std::process::id() as i32));
    }
}
