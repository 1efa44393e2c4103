//! `[ CMD ARGS… ]` endpoints: an NBD server started just for one copy with systemd socket
//! activation. Ferry binds a unix socket in a private directory, passes the listening socket
//! as fd 3 with `LISTEN_FDS=1` and `LISTEN_PID` set to the server's own pid, connects to it,
//! and stops the server (and removes the directory) when done.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use crate::endpoint::{DiskError, ErrorKind, Op};

/// The file descriptor systemd socket activation passes first.
const LISTEN_FD: i32 = 3;

/// A running socket-activated server; killed and reaped on drop.
pub struct Subprocess {
    child: Mutex<Option<Child>>,
    socket: PathBuf,
    name: String,
    _dir: tempfile::TempDir,
}

impl Subprocess {
    /// Starts `argv` with a listening socket on fd 3.
    pub fn spawn(argv: &[String]) -> Result<Self, DiskError> {
        let name = format!("[ {} ]", argv.join(" "));
        let Some((program, args)) = argv.split_first() else {
            return Err(DiskError::new(
                &name,
                Op::Open,
                ErrorKind::InvalidRequest,
                "empty command between [ and ]",
            ));
        };
        let err = |e: std::io::Error| DiskError::from_io(&name, Op::Open, &e);
        let dir = tempfile::Builder::new()
            .prefix("ferry-nbd-")
            .tempdir()
            .map_err(err)?;
        let socket = dir.path().join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(err)?;
        let fd: OwnedFd = listener.into();
        let raw = fd.as_raw_fd();
        let mut cmd = Command::new("sh");
        // The shell's pid is the server's pid once it execs, which LISTEN_PID must name.
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$@\"")
            .arg("sh")
            .arg(program)
            .args(args)
            .env("LISTEN_FDS", "1")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls are made: dup2 and fcntl
        // on descriptors this process owns; no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || {
                if raw == LISTEN_FD {
                    let flags = libc::fcntl(raw, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, LISTEN_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(err)?;
        drop(fd);
        Ok(Subprocess {
            child: Mutex::new(Some(child)),
            socket,
            name,
            _dir: dir,
        })
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's exit status if it has already exited.
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Stops the server: SIGTERM, then SIGKILL if it lingers, and reaps it.
    pub fn stop(&self) {
        let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill only sends a signal to our own child, which is not yet reaped, so the
            // pid cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if std::time::Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for Subprocess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An NBD endpoint served by a [`Subprocess`] that lives as long as the endpoint.
pub struct SubprocessEndpoint {
    nbd: crate::nbd::NbdEndpoint,
    process: Subprocess,
}

impl SubprocessEndpoint {
    /// Starts `argv` and connects to its default export over the socket made for it, as
    /// `settings` say (one connection: the server is private to this copy).
    pub async fn start(
        argv: &[String],
        settings: &nbd::ClientSettings,
        extents: bool,
    ) -> Result<Self, DiskError> {
        let process = Subprocess::spawn(argv)?;
        let transport = nbd::uri::Transport::Unix {
            path: process.socket().to_path_buf(),
        };
        let opts = nbd::ConnectOptions::with_settings(transport, "", settings.clone());
        match crate::nbd::NbdEndpoint::connect(process.name(), &opts, 1, extents).await {
            Ok(nbd) => Ok(SubprocessEndpoint { nbd, process }),
            Err(mut e) => {
                // A server that died explains the failure better than the socket does.
                std::thread::sleep(std::time::Duration::from_millis(50));
                if let Some(status) = process.exited() {
                    e.cause = format!("the server exited ({status}) before serving: {}", e.cause);
                }
                Err(e)
            }
        }
    }
}

impl crate::endpoint::Endpoint for SubprocessEndpoint {
    fn name(&self) -> &str {
        self.process.name()
    }
    fn caps(&self) -> &crate::endpoint::Caps {
        self.nbd.caps()
    }
    fn read(&self, offset: u64, len: u64) -> crate::BoxFut<'_, bytes::Bytes> {
        self.nbd.read(offset, len)
    }
    fn write(&self, offset: u64, data: bytes::Bytes) -> crate::BoxFut<'_, ()> {
        self.nbd.write(offset, data)
    }
    fn zero(&self, offset: u64, len: u64, allocate: bool) -> crate::BoxFut<'_, ()> {
        self.nbd.zero(offset, len, allocate)
    }
    fn fast_zero(&self, offset: u64, len: u64) -> crate::BoxFut<'_, bool> {
        self.nbd.fast_zero(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> crate::BoxFut<'_, Vec<crate::Extent>> {
        self.nbd.extents(offset, len)
    }
    fn dirty(&self, offset: u64, len: u64) -> crate::BoxFut<'_, Vec<(crate::Extent, bool)>> {
        self.nbd.dirty(offset, len)
    }
    fn flush(&self) -> crate::BoxFut<'_, ()> {
        self.nbd.flush()
    }
    fn close(&self) -> crate::BoxFut<'_, ()> {
        Box::pin(async move {
            self.nbd.close().await?;
            self.process.stop();
            Ok(())
        })
    }
    fn abort(&self) -> crate::BoxFut<'_, ()> {
        Box::pin(async move {
            self.process.stop();
            Ok(())
        })
    }
}
