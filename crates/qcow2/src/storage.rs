//! Where image bytes come from: a file read with positional reads (so one handle serves many
//! threads without a lock), or memory (tests, fuzzing).

use std::io;
use std::os::unix::fs::FileExt;

/// Random-access bytes, read-only unless the implementation also writes (an image opened for
/// writing needs that). Implementations must be usable from many threads at once.
pub trait Storage: Send + Sync {
    /// Reads into `buf` at `offset`, returning how many bytes were read: fewer than asked only
    /// at the end of the storage.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Length in bytes.
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Writes all of `buf` at `offset`, extending the storage when needed.
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the storage is read-only",
        ))
    }
    /// Makes everything written so far durable.
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    /// Which parts of `[offset, offset+len)` hold data: runs `(start, length, data)` covering
    /// the range in order, or `None` when the storage cannot tell (then it is all data). A raw
    /// backing file's holes are reported from this, so they are never read.
    fn allocation(&self, _offset: u64, _len: u64) -> io::Result<Option<Vec<(u64, u64, bool)>>> {
        Ok(None)
    }
}

/// lseek with SEEK_DATA or SEEK_HOLE; `None` when there is no data past `pos` (ENXIO).
fn seek(file: &std::fs::File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek takes integers only; the descriptor belongs to `file` for the call. It
    // moves the file offset, which nothing here uses: all I/O is positional.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

impl Storage for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let Some(off) = offset.checked_add(done as u64) else {
                break;
            };
            match FileExt::read_at(self, &mut buf[done..], off) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, u64, bool)>>> {
        let end = offset.saturating_add(len);
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match seek(self, pos, libc::SEEK_DATA) {
                Ok(found) => found.map_or(end, |d| d.clamp(pos, end)),
                // The filesystem cannot say: everything is data.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            if data > pos {
                runs.push((pos, data - pos, false));
            }
            if data >= end {
                break;
            }
            let hole = match seek(self, data, libc::SEEK_HOLE)? {
                Some(h) if h > data => h.min(end),
                // No progress or the file shrank: the rest counts as data, which is safe.
                _ => end,
            };
            runs.push((data, hole - data, true));
            pos = hole;
        }
        Ok(Some(runs))
    }
}

/// An image held in memory.
impl Storage for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        slice_read_at(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
}

impl Storage for &'static [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        slice_read_at(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

fn slice_read_at(data: &[u8], buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let Ok(start) = usize::try_from(offset) else {
        return Ok(0);
    };
    if start >= data.len() {
        return Ok(0);
    }
    let n = buf.len().min(data.len() - start);
    buf[..n].copy_from_slice(&data[start..start + n]);
    Ok(n)
}

/// A writable image held in memory, bounded: a write that would grow it past `limit` bytes
/// fails instead of allocating (a corrupt table can name any offset). For tests and fuzzing.
pub struct MemoryStorage {
    data: std::sync::RwLock<Vec<u8>>,
    limit: u64,
}

impl MemoryStorage {
    pub fn new(data: Vec<u8>, limit: u64) -> MemoryStorage {
        MemoryStorage {
            data: std::sync::RwLock::new(data),
            limit,
        }
    }

    /// A copy of the bytes as they are now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        slice_read_at(
            &self.data.read().unwrap_or_else(|e| e.into_inner()),
            buf,
            offset,
        )
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.limit)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("write past the in-memory image's {}-byte limit", self.limit),
                )
            })?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = (offset as usize, end as usize);
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }
}

/// Shared storage, so a caller can keep a handle to what an image writes.
impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, u64, bool)>>> {
        (**self).allocation(offset, len)
    }
}
