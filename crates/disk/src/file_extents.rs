//! Extents of a local raw file or block device, from `lseek(SEEK_DATA / SEEK_HOLE)`.
//!
//! This module owns the translation of the kernel's view of a file's allocation into
//! [`Extent`]s ([`file_extents`]), and a size query that works for regular files and block
//! devices alike ([`file_size`]).
//!
//! It only asks. It never reads or writes file contents, never changes a file's length or
//! allocation, and must never report a range as a hole unless the kernel said so: whenever the
//! answer is uncertain (a filesystem without `SEEK_DATA`, a block device) it reports data,
//! which is always safe to copy.
//!
//! # File offset
//!
//! `lseek` moves the file offset, which is shared by every handle to the same open file
//! description (including [`File::try_clone`] copies). Callers must therefore do all I/O on
//! such a file with positional calls (`pread`/`pwrite`, i.e. [`std::os::unix::fs::FileExt`]),
//! never through `Read`/`Write`/`Seek`.
//!
//! # Snapshot
//!
//! The answer describes the file at the time of the call; concurrent writers may change it.

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

use crate::extents::{Extent, merge_adjacent};

/// Size in bytes of a regular file or block device.
///
/// Regular files report their length from `fstat`; block devices report 0 there, so their
/// size comes from `lseek(SEEK_END)` (which moves the file offset, see the module docs).
/// Anything else (directories, pipes, character devices, sockets) has no meaningful size and
/// is refused with [`io::ErrorKind::InvalidInput`].
pub fn file_size(file: &File) -> io::Result<u64> {
    size_of(file, &file.metadata()?)
}

fn size_of(file: &File, meta: &Metadata) -> io::Result<u64> {
    let kind = meta.file_type();
    if kind.is_file() {
        Ok(meta.len())
    } else if kind.is_block_device() {
        seek(file, 0, libc::SEEK_END)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file or block device: {kind:?}"),
        ))
    }
}

/// Extents of `file` within `[offset, offset + length)`.
///
/// The result covers exactly `[offset, min(offset + length, size))`: sorted, contiguous,
/// without empty extents, and with neighbours of equal kind merged. It is empty when that
/// range is (`length` 0, or `offset` at or past the end). Data ranges come back with `zero`
/// and `hole` clear, holes with both set.
///
/// A block device, or a file on a filesystem without `SEEK_DATA` support, comes back as a
/// single data extent. The call moves the file offset; see the module docs.
pub fn file_extents(file: &File, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
    let meta = file.metadata()?;
    let size = size_of(file, &meta)?;
    let end = offset.saturating_add(length).min(size);
    if offset >= end {
        return Ok(Vec::new());
    }
    if meta.file_type().is_block_device() {
        // Block devices have no holes to speak of; SEEK_DATA on them says nothing useful.
        return Ok(vec![Extent::data(offset, end - offset)]);
    }

    let mut extents = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(found) => found.clamp(pos, end),
            // No data at or after `pos`: the rest of the file is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) if unsupported(&e) => {
                tracing::debug!(error = %e, "SEEK_DATA unsupported, reporting data");
                extents.push(Extent::data(pos, end - pos));
                break;
            }
            Err(e) => return Err(e),
        };
        if data > pos {
            extents.push(Extent::hole(pos, data - pos));
        }
        if data >= end {
            break;
        }
        let hole = match seek(file, data, libc::SEEK_HOLE) {
            Ok(found) if found > data => found.min(end),
            // No progress, the file shrank under us (ENXIO), or no support: the rest is
            // reported as data, which is safe and ends the loop.
            Ok(_) => end,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) || unsupported(&e) => end,
            Err(e) => return Err(e),
        };
        extents.push(Extent::data(data, hole - data));
        pos = hole;
    }
    merge_adjacent(&mut extents);
    Ok(extents)
}

/// The filesystem does not implement `SEEK_DATA`/`SEEK_HOLE`.
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == libc::EINVAL || code == libc::EOPNOTSUPP || code == libc::ENOTSUP)
}

/// `lseek(file, offset, whence)`, returning the new offset.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset exceeds off_t"))?;
    // SAFETY: lseek takes no pointers and has no memory-safety preconditions; the descriptor
    // is borrowed from `file`, so it stays open and refers to that file for the whole call.
    // An invalid `whence` or offset only makes it fail with an errno.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    // A negative result means failure; errno is read right away, before anything can reset it.
    u64::try_from(found).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use tempfile::NamedTempFile;

    const K64: u64 = 64 * 1024;

    /// Whether the temp dir's filesystem leaves unwritten ranges unallocated: a 1 MiB file
    /// that was only `set_len` must then occupy no blocks.
    fn holes_supported() -> bool {
        let probe = NamedTempFile::new().unwrap();
        probe.as_file().set_len(16 * K64).unwrap();
        probe.as_file().sync_all().unwrap();
        std::fs::metadata(probe.path()).unwrap().blocks() == 0
    }

    /// A temp file of `size` bytes with non-zero data at `data` ranges, holes elsewhere.
    fn sparse(size: u64, data: &[(u64, u64)]) -> NamedTempFile {
        let tmp = NamedTempFile::new().unwrap();
        for &(off, len) in data {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
            tmp.as_file().write_at(&bytes, off).unwrap();
        }
        tmp.as_file().set_len(size).unwrap();
        tmp.as_file().sync_all().unwrap();
        assert_eq!(file_size(tmp.as_file()).unwrap(), size);
        tmp
    }

    /// `exact` where holes exist; otherwise the fallback, one data extent over the same span.
    fn expect(exact: Vec<Extent>) -> Vec<Extent> {
        match (exact.first(), exact.last()) {
            (Some(first), Some(last)) if !holes_supported() => {
                vec![Extent::data(first.offset, last.end() - first.offset)]
            }
            _ => exact,
        }
    }

    /// Data, hole, data, each a multiple of 64 KiB: [0, 64K) [64K, 192K) [192K, 256K).
    fn data_hole_data() -> NamedTempFile {
        sparse(4 * K64, &[(0, K64), (3 * K64, K64)])
    }

    #[test]
    fn empty_file_has_no_extents() {
        let f = sparse(0, &[]);
        assert_eq!(file_extents(f.as_file(), 0, 16 * K64).unwrap(), vec![]);
    }

    #[test]
    fn fully_written_file_is_one_data_extent() {
        let f = sparse(4 * K64, &[(0, 4 * K64)]);
        let got = file_extents(f.as_file(), 0, 4 * K64).unwrap();
        assert_eq!(got, vec![Extent::data(0, 4 * K64)]);
        let got = file_extents(f.as_file(), K64, K64).unwrap();
        assert_eq!(got, vec![Extent::data(K64, K64)]);
    }

    #[test]
    fn never_written_file_is_one_hole() {
        let f = sparse(16 * K64, &[]);
        let got = file_extents(f.as_file(), 0, 16 * K64).unwrap();
        assert_eq!(got, expect(vec![Extent::hole(0, 16 * K64)]));
    }

    #[test]
    fn data_hole_data_is_reported_in_order() {
        let f = data_hole_data();
        let got = file_extents(f.as_file(), 0, 4 * K64).unwrap();
        let want = [
            Extent::data(0, K64),
            Extent::hole(K64, 2 * K64),
            Extent::data(3 * K64, K64),
        ];
        assert_eq!(got, expect(want.to_vec()));
    }

    #[test]
    fn range_starting_mid_hole() {
        let f = data_hole_data();
        let start = K64 + K64 / 2;
        let got = file_extents(f.as_file(), start, 2 * K64).unwrap();
        let want = [
            Extent::hole(start, 3 * K64 - start),
            Extent::data(3 * K64, K64 / 2),
        ];
        assert_eq!(got, expect(want.to_vec()));
        // Starting and ending inside the same hole.
        let got = file_extents(f.as_file(), start, K64 / 4).unwrap();
        assert_eq!(got, expect(vec![Extent::hole(start, K64 / 4)]));
    }

    #[test]
    fn range_past_eof_is_clipped() {
        // Data, then a trailing hole up to EOF: [0, 64K) data, [64K, 256K) hole.
        let f = sparse(4 * K64, &[(0, K64)]);
        let got = file_extents(f.as_file(), 0, u64::MAX).unwrap();
        assert_eq!(
            got,
            expect(vec![Extent::data(0, K64), Extent::hole(K64, 3 * K64)])
        );
        let got = file_extents(f.as_file(), 2 * K64, 16 * K64).unwrap();
        assert_eq!(got, expect(vec![Extent::hole(2 * K64, 2 * K64)]));

        let f = data_hole_data();
        let got = file_extents(f.as_file(), 3 * K64, 16 * K64).unwrap();
        assert_eq!(got, vec![Extent::data(3 * K64, K64)]);
        assert_eq!(file_extents(f.as_file(), 4 * K64, K64).unwrap(), vec![]);
        assert_eq!(file_extents(f.as_file(), 8 * K64, K64).unwrap(), vec![]);
    }

    #[test]
    fn zero_length_has_no_extents() {
        let f = data_hole_data();
        assert_eq!(file_extents(f.as_file(), 0, 0).unwrap(), vec![]);
        assert_eq!(file_extents(f.as_file(), 2 * K64, 0).unwrap(), vec![]);
    }

    #[test]
    fn directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::open(dir.path()).unwrap();
        let err = file_size(&file).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = file_extents(&file, 0, K64).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
