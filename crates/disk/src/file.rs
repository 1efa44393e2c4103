//! Local raw files and block devices as endpoints: positional I/O on tokio's blocking pool, or
//! inline in the calling task ([`FileEndpoint::inline_io`]), extents from SEEK_DATA/SEEK_HOLE,
//! zeroing by punch-hole, zero-range or BLKZEROOUT with fallbacks, and optional O_DIRECT.
//!
//! Inline I/O is for a process that runs one job: a request then costs one syscall, as in
//! nbdcopy, instead of a hand-off to a pool thread and a wake-up back (two futex calls, an
//! eventfd write and a context switch each way, which on a page-cache copy cost more than the
//! copy itself). A server keeps the pool, so that a slow disk never stalls other connections.
//! Either way a read is first tried with RWF_NOWAIT in the caller: what the page cache holds
//! costs one syscall, and only reads that must wait for the disk are handed to the pool, where
//! several can be in flight.
//!
//! Opening a destination never replaces a device node: the path is opened without O_CREAT
//! first, and created (O_EXCL) only when it does not exist.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;

use crate::direct;
use crate::endpoint::{BoxFut, Caps, DiskError, Endpoint, ErrorKind, Op, zero_bytes};
use crate::extents::Extent;
use crate::file_extents::{file_extents, file_size};

/// Requests in flight per pipeline: enough to overlap I/O with the other side; more only
/// fills memory with buffers waiting for the same disk.
const FILE_QUEUE_DEPTH: usize = 8;

// Zeroing methods, disabled one by one when the filesystem says it lacks them.
const NO_PUNCH: u8 = 1 << 0;
const NO_ZERO_RANGE: u8 = 1 << 1;
const NO_BLKZEROOUT: u8 = 1 << 2;

/// BLKZEROOUT from linux/fs.h: _IO(0x12, 127).
const BLKZEROOUT: libc::c_ulong = 0x127f;

struct Inner {
    name: String,
    /// Buffered handle: all I/O when not direct, and unaligned I/O when direct.
    file: File,
    /// O_DIRECT handle for aligned I/O, when asked for.
    direct: Option<File>,
    block_device: bool,
    disabled: AtomicU8,
    /// The file lives on a local filesystem, where SEEK_DATA/SEEK_HOLE read in-memory extent
    /// trees and do not wait on a network.
    local_fs: bool,
    /// Write-behind of a buffered destination file (see [`crate::write_behind`]).
    write_behind: Option<crate::write_behind::WriteBehind>,
    /// Buffered writes to a regular file take the inode lock in the kernel, and a writer that
    /// finds it held spins there while the holder copies (perf: 12 % of a file copy's CPU in
    /// rwsem_spin_on_owner with two writers). Taking this lock first makes the second writer
    /// sleep instead. Not for block devices, which the kernel writes without that lock.
    write_lock: Option<std::sync::Mutex<()>>,
}

pub struct FileEndpoint {
    inner: Arc<Inner>,
    identity: String,
    caps: Caps,
    /// Buffered writes to one file serialise on the inode lock in the kernel (and on
    /// `Inner::write_lock` before it), so more than a few at once only wait. Two (several
    /// with O_DIRECT): while one copies into the page cache, the next is ready behind it.
    write_gate: tokio::sync::Semaphore,
    /// Run the syscalls in the calling task instead of on the blocking pool.
    inline: bool,
}

impl FileEndpoint {
    /// Runs every request's syscalls in the task that polls it, on the runtime's own thread,
    /// except reads that must wait for the disk. Right for a command that does one copy (its
    /// runtime has nothing else to keep responsive for long); wrong for a server.
    pub fn inline_io(mut self) -> Self {
        self.inline = true;
        self
    }

    /// Opens a source for reading.
    pub fn open_source(path: &Path, direct: bool) -> Result<Self, DiskError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| DiskError::from_io(&name, Op::Open, &e))?;
        Self::finish_open(name, file, path, direct, false, false)
    }

    /// Opens an existing file or device for reading and writing, as it is (for serving it).
    pub fn open_existing(path: &Path, direct: bool) -> Result<Self, DiskError> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| DiskError::from_io(&name, Op::Open, &e))?;
        Self::finish_open(name, file, path, direct, true, false)
    }

    /// Opens (or creates) a destination. A regular file is truncated to `size` when given, so
    /// it is known to read as zeroes; a block device is used as it is.
    pub fn open_destination(
        path: &Path,
        size: Option<u64>,
        direct: bool,
    ) -> Result<Self, DiskError> {
        let name = path.display().to_string();
        let open = |create: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if create {
                o.create_new(true).mode(0o644);
            }
            o.open(path)
        };
        let (file, created) = match open(false) {
            Ok(f) => (f, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                open(true).map_err(|e| DiskError::from_io(&name, Op::Open, &e))?,
                true,
            ),
            Err(e) => return Err(DiskError::from_io(&name, Op::Open, &e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| DiskError::from_io(&name, Op::Open, &e))?;
        let mut truncated = created;
        if meta.file_type().is_file() {
            // Truncating to 0 first discards old blocks, so the file then reads as zeroes. A
            // stream's size is unknown: the file grows, and set_size fixes it at the end.
            // The truncation to 0 goes through a short-lived second handle: ext4 marks a file
            // truncated to 0 for writeback on close (auto_da_alloc), and that mark is consumed
            // when this handle closes, before any data is written. Through the main handle it
            // would make the final close flush the whole copy to disk.
            let size = size.unwrap_or(0);
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(0))
                .and_then(|_| file.set_len(size))
                .map_err(|e| DiskError::from_io(&name, Op::Open, &e).at(0, size))?;
            truncated = true;
        }
        let mut ep = Self::finish_open(name, file, path, direct, true, truncated)?;
        // Only a fresh copy into a regular file: its pages are not wanted after the copy.
        if truncated
            && !ep.inner.block_device
            && let Some(inner) = Arc::get_mut(&mut ep.inner)
        {
            inner.write_behind = crate::write_behind::WriteBehind::start(&inner.file).ok();
        }
        Ok(ep)
    }

    fn finish_open(
        name: String,
        file: File,
        path: &Path,
        direct: bool,
        writable: bool,
        known_zero: bool,
    ) -> Result<Self, DiskError> {
        let meta = file
            .metadata()
            .map_err(|e| DiskError::from_io(&name, Op::Open, &e))?;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::new(
                &name,
                Op::Open,
                ErrorKind::InvalidRequest,
                "not a regular file or block device",
            ));
        }
        let size = file_size(&file).map_err(|e| DiskError::from_io(&name, Op::Open, &e))?;
        let direct = if direct {
            let mut o = OpenOptions::new();
            o.read(true).write(writable).custom_flags(libc::O_DIRECT);
            Some(o.open(path).map_err(|e| {
                let mut err = DiskError::from_io(&name, Op::Open, &e);
                err.cause = format!("O_DIRECT: {}", err.cause);
                err
            })?)
        } else {
            None
        };
        let block_device = kind.is_block_device();
        let local_fs = on_local_filesystem(&file);
        let direct_writes = direct.is_some();
        use std::os::unix::fs::MetadataExt;
        let preferred = (meta.blksize()).clamp(512, 1 << 20).next_power_of_two();
        let mut caps = Caps::random_access(size);
        caps.extents = !block_device;
        caps.efficient_zero = true;
        caps.fast_zero = !block_device;
        caps.flush = true;
        caps.preferred_block = preferred;
        caps.queue_depth = FILE_QUEUE_DEPTH;
        caps.known_zero = known_zero;
        caps.read_only = !writable;
        // A source is the same image only while it is unmodified; a destination is the same
        // file (ferry's own writes change its mtime).
        let identity = if writable {
            format!("dev {} ino {}", meta.dev(), meta.ino())
        } else {
            format!(
                "dev {} ino {} mtime {}.{:09}",
                meta.dev(),
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec()
            )
        };
        Ok(FileEndpoint {
            identity,
            inner: Arc::new(Inner {
                name,
                file,
                direct,
                local_fs,
                block_device,
                disabled: AtomicU8::new(0),
                write_behind: None,
                write_lock: (!block_device).then(|| std::sync::Mutex::new(())),
            }),
            caps,
            write_gate: tokio::sync::Semaphore::new(if direct_writes { 8 } else { 2 }),
            inline: false,
        })
    }

    /// Runs `f` inline or on the pool, as the endpoint was opened.
    async fn blocking<T: Send + 'static>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        f: impl FnOnce(&Inner) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, DiskError> {
        if self.inline {
            return f(&self.inner)
                .map_err(|e| DiskError::from_io(&self.inner.name, op, &e).at(offset, len));
        }
        self.pooled(op, offset, len, f).await
    }

    /// Runs `f` on the blocking pool.
    async fn pooled<T: Send + 'static>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        f: impl FnOnce(&Inner) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, DiskError> {
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| {
                DiskError::new(
                    &self.inner.name,
                    op,
                    ErrorKind::Other,
                    format!("I/O task failed: {e}"),
                )
            })?;
        result.map_err(|e| DiskError::from_io(&self.inner.name, op, &e).at(offset, len))
    }
}

/// Is `file` on a filesystem known to be local (ext4, xfs, btrfs, tmpfs)? Network and FUSE
/// filesystems may answer SEEK_DATA over a link, so their extents stay off the caller's thread.
fn on_local_filesystem(file: &File) -> bool {
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    const TMPFS: i64 = 0x0102_1994;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct, filled in below.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into `st`, which lives for the call; the descriptor
    // belongs to `file`.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as i64, EXT4 | XFS | BTRFS | TMPFS)
}

/// A positional read with RWF_NOWAIT: what the page cache holds, without waiting for the
/// disk; EAGAIN where it would have to wait.
fn nowait_read(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, borrowed mutably for the call, so the kernel may write
    // all of it; the descriptor stays open with `file`.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// A positional write with RWF_NOWAIT: into the page cache as far as it goes without
/// waiting; EAGAIN where it would have to wait.
fn nowait_write(file: &File, data: &[u8], offset: u64) -> std::io::Result<usize> {
    let iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: `iov` describes `data`, borrowed for the call; a write only reads through the
    // pointer. The descriptor stays open with `file`.
    let n = unsafe {
        libc::pwritev2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

impl Inner {
    /// A buffered read served from the page cache without leaving the calling thread, when
    /// all of it is there; `None` when the disk would be needed (or the read ends the file).
    fn read_cached(&self, offset: u64, len: usize) -> Option<Bytes> {
        if self.direct.is_some() || len == 0 {
            return None;
        }
        // A page-aligned buffer: the kernel's copies into and out of the page cache run
        // faster when source and destination are aligned alike (a file copy: 5 % less CPU).
        let (mut buf, start) = direct::aligned_buf(len);
        match nowait_read(&self.file, &mut buf[start..start + len], offset) {
            Ok(n) if n == len => Some(buf.freeze().slice(start..start + len)),
            _ => None,
        }
    }

    /// A buffered write into the page cache without leaving the calling thread, as far as it
    /// goes without waiting; returns the bytes written (0 when the disk would be needed).
    fn write_cached(&self, offset: u64, data: &[u8]) -> usize {
        if self.direct.is_some() || data.is_empty() {
            return 0;
        }
        match nowait_write(&self.file, data, offset) {
            Ok(n) => {
                if let (Some(wb), true) = (&self.write_behind, n > 0) {
                    wb.written(offset, n as u64);
                }
                n
            }
            Err(_) => 0,
        }
    }

    fn read(&self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        // Over-allocate so an aligned window exists, for O_DIRECT and for the page-cache
        // copies (see `read_cached`); the slice keeps it.
        let (mut buf, start) = direct::aligned_buf(len);
        let window = &mut buf[start..start + len];
        let file = match &self.direct {
            Some(d) if direct::is_aligned(offset, len, window.as_ptr()) => d,
            _ => &self.file,
        };
        let mut got = 0;
        while got < len {
            match file.read_at(&mut window[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf.freeze().slice(start..start + got))
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match &self.direct {
            Some(d) if direct::is_aligned(offset, data.len(), data.as_ptr()) => {
                d.write_all_at(data, offset)
            }
            Some(d) if direct::is_aligned_range(offset, data.len()) => {
                // Aligned range, unaligned buffer: copy into an aligned one.
                let (mut buf, start) = direct::aligned_buf(data.len());
                buf[start..start + data.len()].copy_from_slice(data);
                d.write_all_at(&buf[start..start + data.len()], offset)
            }
            _ => {
                {
                    let _one = self
                        .write_lock
                        .as_ref()
                        .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()));
                    self.file.write_all_at(data, offset)?;
                }
                if let Some(wb) = &self.write_behind {
                    wb.written(offset, data.len() as u64);
                }
                Ok(())
            }
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
        // `self.file` and stays open for the duration of the call.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn blkzeroout(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads a [u64; 2] (start, length) through the pointer, which
        // points to a live local array for the whole call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Tries `method`; on "not supported" disables it for good and reports Ok(false).
    fn attempt(
        &self,
        bit: u8,
        method: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<bool> {
        if self.disabled.load(Ordering::Relaxed) & bit != 0 {
            return Ok(false);
        }
        match method() {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY | libc::EINVAL)
                ) =>
            {
                self.disabled.fetch_or(bit, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Zeroes without ever writing zero bytes: punch a hole, or zero the range in place.
    /// Ok(false) when neither works here (block devices, filesystems without them).
    fn fast_zero(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        if self.block_device {
            return Ok(false);
        }
        Ok(self.attempt(NO_PUNCH, || {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        })? || self.attempt(NO_ZERO_RANGE, || {
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        })?)
    }

    fn zero(&self, offset: u64, len: u64, allocate: bool) -> std::io::Result<()> {
        if self.block_device {
            if offset.is_multiple_of(512)
                && len.is_multiple_of(512)
                && self.attempt(NO_BLKZEROOUT, || self.blkzeroout(offset, len))?
            {
                return Ok(());
            }
        } else {
            if !allocate
                && self.attempt(NO_PUNCH, || {
                    self.fallocate(
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                })?
            {
                return Ok(());
            }
            // tmpfs lacks ZERO_RANGE; the write fallback below covers it.
            if self.attempt(NO_ZERO_RANGE, || {
                self.fallocate(
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            })? {
                return Ok(());
            }
        }
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(1 << 20);
            self.file.write_all_at(&zero_bytes(n as usize), pos)?;
            pos += n;
        }
        Ok(())
    }
}

impl Endpoint for FileEndpoint {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn caps(&self) -> &Caps {
        &self.caps
    }

    fn read(&self, offset: u64, len: u64) -> BoxFut<'_, Bytes> {
        Box::pin(async move {
            // What the page cache holds is read here and then: a hand-off to a pool thread
            // costs more than such a read. What must come from the disk goes to the pool even
            // for an inline endpoint, so that a pipeline keeps several disk reads in flight
            // instead of waiting for each in turn.
            if let Some(data) = self.inner.read_cached(offset, len as usize) {
                return Ok(data);
            }
            self.pooled(Op::Read, offset, len, move |i| i.read(offset, len as usize))
                .await
        })
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFut<'_, ()> {
        let len = data.len() as u64;
        Box::pin(async move {
            let _turn = self.write_gate.acquire().await;
            let done = if self.inline {
                0
            } else {
                self.inner.write_cached(offset, &data)
            };
            if done == data.len() {
                return Ok(());
            }
            let (offset, data) = (offset + done as u64, data.slice(done..));
            self.blocking(Op::Write, offset, len - done as u64, move |i| {
                i.write(offset, &data)
            })
            .await
        })
    }

    fn zero(&self, offset: u64, len: u64, allocate: bool) -> BoxFut<'_, ()> {
        Box::pin(self.blocking(Op::Zero, offset, len, move |i| {
            i.zero(offset, len, allocate)
        }))
    }

    fn fast_zero(&self, offset: u64, len: u64) -> BoxFut<'_, bool> {
        Box::pin(self.blocking(Op::Zero, offset, len, move |i| i.fast_zero(offset, len)))
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<Extent>> {
        if !self.inline && self.inner.local_fs {
            // As qemu does for block status: a local filesystem answers from memory, and a
            // pool round trip would cost more than the lookup (a server asks per read).
            let got = file_extents(&self.inner.file, offset, len)
                .map_err(|e| DiskError::from_io(&self.inner.name, Op::Extents, &e).at(offset, len));
            return Box::pin(std::future::ready(got));
        }
        Box::pin(self.blocking(Op::Extents, offset, len, move |i| {
            file_extents(&i.file, offset, len)
        }))
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(self.blocking(Op::Flush, 0, 0, |i| i.file.sync_data()))
    }

    fn set_size(&self, size: u64) -> BoxFut<'_, ()> {
        Box::pin(self.blocking(Op::Write, size, 0, move |i| {
            if i.block_device {
                Ok(())
            } else {
                i.file.set_len(size)
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_read_zero_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let ep = FileEndpoint::open_destination(&path, Some(1 << 20), false).unwrap();
        assert!(ep.caps().known_zero);
        ep.write(4096, Bytes::from(vec![7u8; 8192])).await.unwrap();
        let back = ep.read(0, 16384).await.unwrap();
        assert!(back[..4096].iter().all(|b| *b == 0));
        assert!(back[4096..12288].iter().all(|b| *b == 7));
        ep.zero(4096, 4096, false).await.unwrap();
        let back = ep.read(4096, 8192).await.unwrap();
        assert!(back[..4096].iter().all(|b| *b == 0));
        assert!(back[4096..].iter().all(|b| *b == 7));
        ep.zero(8192, 4096, true).await.unwrap();
        assert!(ep.read(8192, 4096).await.unwrap().iter().all(|b| *b == 0));
        ep.flush().await.unwrap();
    }

    #[tokio::test]
    async fn inline_and_pool_paths_read_what_the_other_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let size = 4 << 20;
        let inline = FileEndpoint::open_destination(&path, Some(size), false)
            .unwrap()
            .inline_io();
        let data: Vec<u8> = (0..size as usize).map(|i| (i * 7 % 251) as u8).collect();
        inline.write(0, Bytes::from(data.clone())).await.unwrap();
        inline.zero(1 << 20, 1 << 20, false).await.unwrap();
        let mut want = data;
        want[1 << 20..2 << 20].fill(0);
        // The pool endpoint reads from the page cache without a hand-off; both must agree.
        let pooled = FileEndpoint::open_existing(&path, false).unwrap();
        assert_eq!(pooled.read(0, size).await.unwrap(), want);
        assert_eq!(inline.read(0, size).await.unwrap(), want);
        pooled
            .write(3 << 20, Bytes::from(vec![9u8; 4096]))
            .await
            .unwrap();
        want[3 << 20..(3 << 20) + 4096].fill(9);
        assert_eq!(inline.read(0, size).await.unwrap(), want);
        let ext = pooled.extents(0, size).await.unwrap();
        assert!(
            ext.iter()
                .any(|e| e.zero && e.offset <= 1 << 20 && e.end() >= 2 << 20),
            "{ext:?}"
        );
        // A read past the end stops at the end on both paths.
        assert_eq!(pooled.read(size - 100, 4096).await.unwrap().len(), 100);
        assert_eq!(inline.read(size - 100, 4096).await.unwrap().len(), 100);
    }

    #[tokio::test]
    async fn destination_device_path_is_not_replaced_and_file_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![1u8; 10000]).unwrap();
        let ep = FileEndpoint::open_destination(&path, Some(4096), false).unwrap();
        assert_eq!(ep.caps().size, Some(4096));
        assert!(ep.read(0, 4096).await.unwrap().iter().all(|b| *b == 0));
    }

    #[tokio::test]
    async fn errors_name_the_file_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.raw");
        let err = FileEndpoint::open_source(&path, false).err().unwrap();
        let text = err.to_string();
        assert!(text.starts_with("open "), "{text}");
        assert!(text.contains("missing.raw"), "{text}");
        assert!(text.contains("(ENOENT)"), "{text}");
    }

    #[tokio::test]
    async fn direct_io_reads_and_writes_unaligned_tails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let ep = match FileEndpoint::open_destination(&path, Some(3 * 4096 + 100), true) {
            Ok(ep) => ep,
            // Some filesystems (tmpfs) refuse O_DIRECT; the error must say so.
            Err(e) => {
                assert!(e.cause.contains("O_DIRECT"), "{e}");
                return;
            }
        };
        ep.write(0, Bytes::from(vec![3u8; 8192])).await.unwrap();
        ep.write(12288, Bytes::from(vec![4u8; 100])).await.unwrap();
        let back = ep.read(0, 3 * 4096 + 100).await.unwrap();
        assert!(back[..8192].iter().all(|b| *b == 3));
        assert!(back[8192..12288].iter().all(|b| *b == 0));
        assert!(back[12288..].iter().all(|b| *b == 4));
    }
}
