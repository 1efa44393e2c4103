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
