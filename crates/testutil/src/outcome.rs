//! Running a program that may fail: unlike [`crate::tools::run`], a non-zero exit is not a
//! panic but an [`Outcome`] to inspect (exit code, stdout, stderr), so tests can check that a
//! client was refused and why. The program is still killed, and the test fails, if it outlives
//! the timeout.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How a finished program ended.
#[derive(Debug)]
pub struct Outcome {
    /// The command line, for messages.
    pub line: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the program's output unless it succeeded; returns stdout.
    pub fn expect_success(&self) -> &str {
        assert!(
            self.success(),
            "{} failed ({}):\nstderr: {}\nstdout: {}",
            self.line,
            self.status,
            self.stderr,
            self.stdout
        );
        &self.stdout
    }

    /// Panics unless the program failed; returns stderr.
    pub fn expect_failure(&self) -> &str {
        assert!(
            !self.success(),
            "{} succeeded but was expected to fail:\nstderr: {}\nstdout: {}",
            self.line,
            self.stderr,
            self.stdout
        );
        &self.stderr
    }
}

/// Runs `cmd` with stdin closed, capturing its output; panics if it runs longer than
/// `timeout` (after killing it) or cannot be started.
pub fn run_outcome(cmd: &mut Command, timeout: Duration) -> Outcome {
    let line = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {line}: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr =
                    String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
                panic!("{line} did not finish within {timeout:?}; stderr: {stderr}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for {line}: {e}"),
        }
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Outcome {
        line,
        status,
        stdout,
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_success_and_failure() {
        let ok = run_outcome(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            Duration::from_secs(10),
        );
        assert_eq!(ok.expect_success(), "out\n");
        assert_eq!(ok.stderr, "err\n");
        let failed = run_outcome(
            Command::new("sh").args(["-c", "echo nope >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert_eq!(failed.code(), Some(3));
        assert_eq!(failed.expect_failure(), "nope\n");
    }

    #[test]
    fn kills_a_program_that_hangs() {
        let hung = std::panic::catch_unwind(|| {
            run_outcome(Command::new("sleep").arg("30"), Duration::from_millis(200))
        });
        assert!(hung.is_err());
    }
}
