//! Streams as endpoints: standard input as a source and standard output as a destination (and
//! any other pipe, socket or character device given as a path). A stream has no size and no
//! seeking, so requests must arrive in offset order: a turnstile makes each request wait for
//! its turn, which lets the engine keep several reads or writes queued while the bytes still
//! move strictly in order. Holes are written to a destination stream as zero bytes.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::endpoint::{BoxFut, Caps, DiskError, ErrorKind, Op, zero_bytes};

enum Stream {
    Reader(Box<dyn Read + Send>),
    Writer(Box<dyn Write + Send>),
}

pub struct PipeEndpoint {
    name: String,
    caps: Caps,
    stream: Arc<Mutex<Stream>>,
    /// Offset of the next byte the stream will move; requests wait until it equals theirs.
    turn: watch::Sender<u64>,
}

impl PipeEndpoint {
    pub fn stdin() -> Self {
        match std::io::stdin().as_fd().try_clone_to_owned() {
            Ok(fd) => Self::from_file("-", std::fs::File::from(fd), true),
            // No descriptor to spare: std's handle still works, only slower.
            Err(_) => Self::new("-", Stream::Reader(Box::new(std::io::stdin())), true),
        }
    }

    /// Standard output; refuses a terminal.
    pub fn stdout() -> Result<Self, DiskError> {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            return Err(DiskError::new(
                "-",
                Op::Open,
                ErrorKind::InvalidRequest,
                "refusing to write to a terminal",
            ));
        }
        Ok(match std::io::stdout().as_fd().try_clone_to_owned() {
            Ok(fd) => Self::from_file("-", std::fs::File::from(fd), false),
            Err(_) => Self::new("-", Stream::Writer(Box::new(std::io::stdout())), false),
        })
    }

    /// A pipe, socket or character device opened by path.
    pub fn from_file(name: &str, file: std::fs::File, source: bool) -> Self {
        grow_pipe(&file);
        let stream = if source {
            Stream::Reader(Box::new(file))
        } else {
            Stream::Writer(Box::new(file))
        };
        Self::new(name, stream, source)
    }

    fn new(name: &str, stream: Stream, source: bool) -> Self {
        let mut caps = Caps::random_access(0);
        caps.size = None;
        caps.sequential = true;
        caps.read_only = source;
        caps.flush = !source;
        caps.max_request = 1 << 30;
        caps.queue_depth = 4;
        PipeEndpoint {
            name: name.to_string(),
            caps,
            stream: Arc::new(Mutex::new(stream)),
            turn: watch::channel(0).0,
        }
    }
}

/// Pipe buffer asked for: a default request and more. Unprivileged processes may get at most
/// /proc/sys/fs/pipe-max-size (1 MiB by default), which is what they then keep.
const PIPE_SIZE: libc::c_int = 4 << 20;

/// Grows `file`'s pipe buffer, as far as allowed; anything else (not a pipe) is left alone.
fn grow_pipe(file: &std::fs::File) {
    for size in [PIPE_SIZE, 1 << 20] {
        // SAFETY: F_SETPIPE_SZ takes an integer and touches no memory; the descriptor is
        // owned by `file` for the call. A failure (not a pipe, over the limit) changes nothing.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETPIPE_SZ, size) } >= 0 {
            return;
        }
    }
}

/// Turn value once a source stream has ended.
const ENDED: u64 = u64::MAX;

impl PipeEndpoint {
    /// Waits until the stream is at `offset`. Returns false if the source already ended.
    async fn wait_turn(&self, op: Op, offset: u64, len: u64) -> Result<bool, DiskError> {
        let mut rx = self.turn.subscribe();
        let at = *rx.wait_for(|pos| *pos >= offset).await.map_err(|_| {
            DiskError::new(&self.name, op, ErrorKind::ConnectionLost, "stream closed")
        })?;
        if at == ENDED {
            return Ok(false);
        }
        if at != offset {
            return Err(DiskError::new(
                &self.name,
                op,
                ErrorKind::InvalidRequest,
                format!("out-of-order request: the stream is already at offset {at}"),
            )
            .at(offset, len));
        }
        Ok(true)
    }

    async fn run<T: Send + 'static>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut Stream) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, DiskError> {
        let stream = self.stream.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = stream.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| {
            DiskError::new(
                &self.name,
                op,
                ErrorKind::Other,
                format!("I/O task failed: {e}"),
            )
        })?
        .map_err(|e| DiskError::from_io(&self.name, op, &e).at(offset, len))
    }

    async fn write_in_turn(&self, op: Op, offset: u64, data: Bytes) -> Result<(), DiskError> {
        let len = data.len() as u64;
        if !self.wait_turn(op, offset, len).await? {
            return Err(
                DiskError::new(&self.name, op, ErrorKind::ConnectionLost, "stream ended")
                    .at(offset, len),
            );
        }
        self.run(op, offset, len, move |s| match s {
            Stream::Writer(w) => w.write_all(&data),
            Stream::Reader(_) => Err(std::io::Error::other("not writable")),
        })
        .await?;
        self.turn.send_modify(|pos| *pos += len);
        Ok(())
    }
}

impl crate::endpoint::Endpoint for PipeEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn caps(&self) -> &Caps {
        &self.caps
    }

    fn read(&self, offset: u64, len: u64) -> BoxFut<'_, Bytes> {
        Box::pin(async move {
            if !self.wait_turn(Op::Read, offset, len).await? {
                return Ok(Bytes::new());
            }
            let data = self
                .run(Op::Read, offset, len, move |s| {
                    let Stream::Reader(r) = s else {
                        return Err(std::io::Error::other("not readable"));
                    };
                    let mut buf = Vec::with_capacity(len as usize);
                    r.take(len).read_to_end(&mut buf)?;
                    Ok(Bytes::from(buf))
                })
                .await?;
            self.turn.send_modify(|pos| *pos += data.len() as u64);
            if (data.len() as u64) < len {
                // End of stream: later reads find nothing.
                self.turn.send_modify(|pos| *pos = ENDED);
            }
            Ok(data)
        })
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFut<'_, ()> {
        Box::pin(self.write_in_turn(Op::Write, offset, data))
    }

    fn zero(&self, offset: u64, len: u64, _allocate: bool) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(1 << 20);
                self.write_in_turn(Op::Zero, pos, zero_bytes(n as usize))
                    .await?;
                pos += n;
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.run(Op::Flush, 0, 0, |s| match s {
                Stream::Writer(w) => w.flush(),
                Stream::Reader(_) => Ok(()),
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;

    #[test]
    fn pipes_are_grown() {
        let (r, _w) = pipe();
        let before = pipe_size(&r);
        let _ep = PipeEndpoint::from_file("p", r.try_clone().unwrap(), true);
        let after = pipe_size(&r);
        assert!(after >= 1 << 20 && after > before, "{before} -> {after}");
    }

    fn pipe_size(file: &std::fs::File) -> i32 {
        // SAFETY: F_GETPIPE_SZ takes no argument and touches no memory.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETPIPE_SZ) }
    }

    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = std::io::pipe().unwrap();
        (
            std::fs::File::from(std::os::fd::OwnedFd::from(r)),
            std::fs::File::from(std::os::fd::OwnedFd::from(w)),
        )
    }

    #[tokio::test]
    async fn writes_issued_out_of_order_leave_in_order() {
        let (r, w) = pipe();
        let ep = Arc::new(PipeEndpoint::from_file("pipe", w, false));
        let late = {
            let ep = ep.clone();
            tokio::spawn(async move { ep.write(3, Bytes::from_static(b"def")).await })
        };
        tokio::task::yield_now().await;
        ep.write(0, Bytes::from_static(b"abc")).await.unwrap();
        late.await.unwrap().unwrap();
        ep.zero(6, 2, false).await.unwrap();
        drop(ep);
        let mut out = Vec::new();
        let mut r = r;
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcdef\0\0");
    }

    #[tokio::test]
    async fn reads_stop_at_end_of_stream() {
        let (r, mut w) = pipe();
        w.write_all(b"hello").unwrap();
        drop(w);
        let ep = PipeEndpoint::from_file("pipe", r, true);
        assert_eq!(&ep.read(0, 3).await.unwrap()[..], b"hel");
        assert_eq!(&ep.read(3, 10).await.unwrap()[..], b"lo");
        assert!(ep.read(5, 10).await.unwrap().is_empty());
    }
}
