//! The real `ferry serve` binary as a child process: started with the caller's flags and a
//! `--ready-file`, waited for (bounded) until it writes that file, and killed and reaped when
//! dropped. The one launcher of `ferry serve` the tests share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long `ferry serve` may take to write its ready file, and to obey SIGTERM.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A running `ferry serve`.
pub struct FerryServe {
    child: Option<Child>,
    ready: serde_json::Value,
    log: PathBuf,
}

impl FerryServe {
    /// Starts `ferry serve ARGS` (the binary at `bin`) with `--ready-file DIR/ready.json`,
    /// `RUST_LOG=info` and its output in `DIR/serve.log`, and waits for the ready file.
    pub fn start(bin: &Path, dir: &Path, args: &[&str]) -> FerryServe {
        let mut cmd = Command::new(bin);
        cmd.arg("serve").args(args);
        FerryServe::start_command(cmd, dir)
    }

    /// Like [`FerryServe::start`], for a command already holding `serve` and its flags.
    pub fn start_command(mut cmd: Command, dir: &Path) -> FerryServe {
        // A test that stops a server with a request still hanging must not wait for the
        // default 30 s drain.
        if !cmd.get_args().any(|a| a == "--drain-timeout") {
            cmd.args(["--drain-timeout", "5"]);
        }
        let ready = dir.join("ready.json");
        let log = dir.join("serve.log");
        cmd.arg("--ready-file").arg(&ready).env("RUST_LOG", "info");
        let child = crate::imageio::spawn(&mut cmd, &log);
        let mut serve = FerryServe {
            child: Some(child),
            ready: serde_json::Value::Null,
            log,
        };
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(v) = serde_json::from_str(&text)
            {
                serve.ready = v;
                return serve;
            }
            if let Some(status) = serve.exited() {
                panic!("ferry serve exited ({status}):\n{}", serve.log());
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "ferry serve wrote no ready file within {TIMEOUT:?}: {cmd:?}\n{}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the ready file says (`remote`, `local`, `control`, `nbd_socket`, `nbd_listen`).
    pub fn ready(&self) -> &serde_json::Value {
        &self.ready
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The data service's TCP port (from the ready file's `remote`).
    pub fn port(&self) -> u16 {
        let remote = self.ready["remote"]
            .as_str()
            .expect("remote in the ready file");
        remote.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// The server's exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// The server's process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions; the child is not yet reaped, so
        // its pid cannot have been reused.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Sends SIGTERM and returns the exit status; panics if the server ignores it.
    pub fn stop(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        // SAFETY: kill(2) has no memory-safety preconditions; the child is not yet reaped, so
        // its pid cannot have been reused.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if start.elapsed() > TIMEOUT {
                let _ = child.kill();
                panic!("ferry serve ignored SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The child process, for a caller that manages its end itself.
    pub(crate) fn into_child(mut self) -> Child {
        self.child.take().expect("running")
    }
}

impl Drop for FerryServe {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
