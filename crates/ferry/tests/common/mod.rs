//! Shared by the `ferry` CLI integration tests: running the real binary (with a timeout, a
//! stdin, an extra file descriptor, signals), the sample image every copy test uses, and checks
//! of what a copy left behind (bytes, allocated blocks, panics, leftover servers).
//!
//! Nothing here skips a test: a missing peer program fails it (see `testutil::require_binary`).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use testutil::{Layout, Segment};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// How long one ferry run may take before the test kills it and fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Allocation the destination may have beyond the source's data (file system and format
/// metadata); far less than the zero runs and holes of [`sample_layout`].
pub const SPARSE_SLACK: u64 = 256 * KIB;

/// The real binary under test.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// The sample image of the copy tests: 13 MiB of pseudo-random data runs, zeroes written as
/// data (allocated) and holes, every run a multiple of 64 KiB, ending in data so a truncated
/// copy shows.
pub fn sample_layout() -> Layout {
    Layout::new()
        .data(MIB, 1)
        .hole(2 * MIB)
        .zero(MIB)
        .data(512 * KIB, 2)
        .hole(MIB)
        .data(64 * KIB, 3)
        .zero(448 * KIB)
        .hole(3 * MIB)
        .data(2 * MIB, 4)
        .zero(MIB)
        .hole(960 * KIB)
        .data(64 * KIB, 5)
}

/// Bytes of pseudo-random data in `layout` (what a sparse copy must allocate).
pub fn data_bytes(layout: &Layout) -> u64 {
    layout
        .segments()
        .iter()
        .filter(|s| matches!(s, Segment::Data { .. }))
        .map(Segment::len)
        .sum()
}

/// Writes the sample image at `dir/name`; returns its path and layout.
pub fn make_sample(dir: &Path, name: &str) -> (std::path::PathBuf, Layout) {
    let layout = sample_layout();
    let path = dir.join(name);
    testutil::make_sparse_image(&path, &layout);
    (path, layout)
}

/// Bytes the file system allocated for `path` (st_blocks × 512).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

/// Panics unless `actual` equals `expected`, naming the first differing offset (not dumping
/// megabytes).
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at offset {at}: got {:#04x}, expected {:#04x}",
            actual[at], expected[at]
        );
    }
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length differs (contents equal up to the shorter)"
    );
}

/// Panics unless the file at `path` holds exactly `layout`'s bytes.
pub fn assert_file_matches(path: &Path, layout: &Layout) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_same_bytes(&got, &layout.expected(), &path.display().to_string());
}

/// Panics unless the file at `path` allocates no more than `layout`'s data (plus slack): zero
/// runs and holes of the source must not be allocated in a sparse copy.
pub fn assert_sparse(path: &Path, layout: &Layout) {
    let got = allocated(path);
    let data = data_bytes(layout);
    assert!(
        got <= data + SPARSE_SLACK,
        "{} is not sparse: {got} bytes allocated, the source has {data} bytes of data \
         in {} bytes",
        path.display(),
        layout.size()
    );
}

/// Bytes of `extents` (nbdinfo's view) that are not holes.
pub fn allocated_in_map(extents: &[testutil::MapExtent]) -> u64 {
    extents
        .iter()
        .filter(|e| e.flags & 1 == 0)
        .map(|e| e.length)
        .sum()
}

/// True if a live process has `needle` as one of its command-line words.
pub fn process_with_arg(needle: &OsStr) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
                .unwrap_or(false)
        })
        .any(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|w| w == needle.as_encoded_bytes()))
                .unwrap_or(false)
        })
}

/// How a ferry run ended.
#[derive(Debug)]
pub struct Run {
    pub line: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// From spawning (or from [`Running::wait`]'s start) to exit.
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics with the output unless ferry exited 0; returns stderr.
    pub fn expect_ok(&self) -> &str {
        assert!(
            self.status.success(),
            "{} failed ({}):\nstderr: {}",
            self.line,
            self.status,
            self.stderr
        );
        self.assert_no_panic();
        &self.stderr
    }

    /// Panics unless ferry exited with `code` (not a signal, not a panic); returns stderr.
    pub fn expect_code(&self, code: i32) -> &str {
        assert_eq!(
            self.code(),
            Some(code),
            "{} should exit {code}, ended with {}:\nstderr: {}\nstdout: {}",
            self.line,
            self.status,
            self.stderr,
            self.stdout_text()
        );
        self.assert_no_panic();
        &self.stderr
    }

    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"),
            "{} panicked:\n{}",
            self.line,
            self.stderr
        );
    }
}

enum Input {
    Null,
    File(File),
    Bytes(Vec<u8>),
}

/// A ferry command line being prepared.
pub struct Ferry {
    cmd: Command,
    input: Input,
    fd3: Option<File>,
    timeout: Duration,
}

/// `ferry ARGS…`, stdin closed, output captured, [`RUN_TIMEOUT`].
pub fn ferry<I, S>(args: I) -> Ferry
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(ferry_bin());
    cmd.args(args);
    Ferry {
        cmd,
        input: Input::Null,
        fd3: None,
        timeout: RUN_TIMEOUT,
    }
}

impl Ferry {
    /// Standard input read from `file`.
    pub fn stdin_file(mut self, file: File) -> Self {
        self.input = Input::File(file);
        self
    }

    /// Standard input is a pipe that a thread fills with `bytes`, then closes.
    pub fn stdin_bytes(mut self, bytes: Vec<u8>) -> Self {
        self.input = Input::Bytes(bytes);
        self
    }

    /// `file` becomes file descriptor 3 of the child (for `--progress=3`).
    pub fn fd3(mut self, file: File) -> Self {
        self.fd3 = Some(file);
        self
    }

    /// An environment variable for ferry (e.g. `TMPDIR`).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs to completion; panics (after killing ferry) if it outlives the timeout.
    pub fn run(self) -> Run {
        let timeout = self.timeout;
        self.spawn().wait(timeout)
    }

    /// Starts ferry and returns at once.
    pub fn spawn(mut self) -> Running {
        let line = format!("{:?}", self.cmd);
        let stdin = match &self.input {
            Input::Null => Stdio::null(),
            Input::File(f) => Stdio::from(f.try_clone().expect("duplicating the stdin file")),
            Input::Bytes(_) => Stdio::piped(),
        };
        self.cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(file) = &self.fd3 {
            let fd = file.as_raw_fd();
            // SAFETY: dup2 and fcntl are async-signal-safe and only change the child's
            // descriptor table; `fd` stays open in the parent until after spawn.
            unsafe {
                self.cmd.pre_exec(move || {
                    let ok = if fd == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0) >= 0
                    } else {
                        libc::dup2(fd, 3) >= 0
                    };
                    if ok {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {line}: {e}"));
        drop(self.fd3.take());
        let feeder = match std::mem::replace(&mut self.input, Input::Null) {
            Input::Bytes(bytes) => {
                let mut pipe = child.stdin.take().expect("piped stdin");
                // A write error means ferry stopped reading; the test judges its exit.
                Some(std::thread::spawn(move || {
                    let _ = pipe.write_all(&bytes);
                }))
            }
            _ => None,
        };
        let out = reader(child.stdout.take().expect("piped stdout"));
        let err = reader(child.stderr.take().expect("piped stderr"));
        Running {
            child: Some(child),
            out: Some(out),
            err: Some(err),
            feeder,
            line,
            started: Instant::now(),
        }
    }
}

fn reader(mut from: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = from.read_to_end(&mut all);
        all
    })
}

/// A ferry process started by [`Ferry::spawn`]; killed and reaped if dropped unwaited.
pub struct Running {
    child: Option<Child>,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
    feeder: Option<JoinHandle<()>>,
    line: String,
    started: Instant,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// True while ferry has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().expect("running").try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own unreaped child, so the pid cannot have been reused.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Time since ferry was started.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits up to `timeout` for ferry to exit; `elapsed` in the result counts from this call.
    /// Past the timeout ferry is killed and the test fails with its stderr.
    pub fn wait(mut self, timeout: Duration) -> Run {
        let start = Instant::now();
        let mut child = self.child.take().expect("running");
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if start.elapsed() > timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let stderr = self.collect_err();
                    panic!(
                        "{} did not exit within {timeout:?} (killed); stderr:\n{stderr}",
                        self.line
                    );
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("waiting for {}: {e}", self.line),
            }
        };
        let elapsed = start.elapsed();
        if let Some(f) = self.feeder.take() {
            let _ = f.join();
        }
        // Output ends when every holder of the pipes has closed them: a server ferry started
        // and left running would keep them open.
        let stdout = self
            .out
            .take()
            .map(|h| join_bounded(h, &self.line, "stdout"))
            .unwrap_or_default();
        let stderr = self.collect_err();
        Run {
            line: std::mem::take(&mut self.line),
            status,
            stdout,
            stderr,
            elapsed,
        }
    }

    fn collect_err(&mut self) -> String {
        let bytes = self
            .err
            .take()
            .map(|h| join_bounded(h, &self.line, "stderr"))
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// How long a pipe of ferry's may stay open after ferry exited.
const PIPE_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Joins an output reader, failing the test if the pipe stays open (a process ferry started
/// outlived it).
fn join_bounded(handle: JoinHandle<Vec<u8>>, line: &str, what: &str) -> Vec<u8> {
    let start = Instant::now();
    while !handle.is_finished() {
        assert!(
            start.elapsed() < PIPE_CLOSE_TIMEOUT,
            "{line}: its {what} stayed open {PIPE_CLOSE_TIMEOUT:?} after it exited: \
             a process it started is still running"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.join().unwrap_or_default()
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `cond` every 10 ms for up to `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// One request an nbdkit `--filter=log` log shows being issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    pub connection: u64,
    pub id: u64,
    pub offset: u64,
    pub count: u64,
}

/// The `op` requests (`Read`, `Write`, `Zero`, `Extents`, `Flush`…) a log filter recorded, in
/// the order they started.
pub fn logged(log: &str, op: &str) -> Vec<Logged> {
    let mut out = Vec::new();
    for line in log.lines() {
        let mut words = line.split_whitespace().skip(2);
        let Some(connection) = words.next().and_then(|w| w.strip_prefix("connection=")) else {
            continue;
        };
        if words.next() != Some(op) {
            continue;
        }
        let mut req = Logged {
            connection: connection.parse().unwrap_or(0),
            id: 0,
            offset: 0,
            count: 0,
        };
        for w in words {
            let hex = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or(0);
            if let Some(v) = w.strip_prefix("id=") {
                req.id = v.parse().unwrap_or(0);
            } else if let Some(v) = w.strip_prefix("offset=") {
                req.offset = hex(v);
            } else if let Some(v) = w.strip_prefix("count=") {
                req.count = hex(v);
            }
        }
        out.push(req);
    }
    out
}

/// An nbdkit log filter's log, read once the server has stopped.
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// An incremental-copy scene in `dir`: `disk.qcow2` of `size` (qemu-img syntax) written with
/// the qemu-io `base` commands, copied in full by ferry to `backup.raw`, then checkpointed
/// with the dirty bitmap `b0` and changed with the qemu-io `changes`. Returns (image, backup).
pub fn checkpointed_qcow2(
    dir: &Path,
    size: &str,
    base: &[&str],
    changes: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let image = dir.join("disk.qcow2");
    let backup = dir.join("backup.raw");
    let image_s = image.to_str().unwrap();
    testutil::tools::qemu_img(&["create", "-f", "qcow2", image_s, size]);
    testutil::tools::qemu_io(&image, "qcow2", base);
    ferry([
        "copy",
        "[",
        "qemu-nbd",
        "-f",
        "qcow2",
        image_s,
        "]",
        backup.to_str().unwrap(),
    ])
    .run()
    .expect_ok();
    testutil::tools::qemu_img(&["bitmap", "--add", image_s, "b0"]);
    testutil::tools::qemu_io(&image, "qcow2", changes);
    (image, backup)
}
