//! A qcow2 image as an endpoint: the guest view through the `qcow2` crate, on tokio's blocking
//! pool or inline in the calling task ([`Qcow2Endpoint::inline_io`]; its reads are positional
//! and it is shared by all requests), and extents from the image's tables instead of the
//! file's holes. Opened read-only it is a source; with a
//! persistent dirty bitmap selected, it also reports what changed since the bitmap was added,
//! for incremental copies. Opened read-write ([`Qcow2Endpoint::open_rw`]) it also takes
//! writes and zeroes into its guest view, and a flush makes them durable.

use std::path::Path;
use std::sync::Arc;

use ::qcow2::{ExtentKind, Image, OpenOptions, Qcow2Error};
use bytes::Bytes;

use crate::endpoint::{BoxFut, Caps, DiskError, Endpoint, ErrorKind, Op};
use crate::extents::{Extent, merge_adjacent};

/// Like a local file: enough in flight to overlap with the other side.
const QCOW2_QUEUE_DEPTH: usize = 8;

pub struct Qcow2Endpoint {
    name: String,
    image: Arc<Image>,
    caps: Caps,
    identity: String,
    /// The persistent bitmap `dirty` reads.
    bitmap: Option<String>,
    /// Run requests in the calling task instead of on the blocking pool.
    inline: bool,
}

fn kind_of(err: &Qcow2Error) -> ErrorKind {
    match err.kind() {
        ::qcow2::ErrorKind::Io => ErrorKind::Io,
        ::qcow2::ErrorKind::InvalidArgument => ErrorKind::InvalidRequest,
        ::qcow2::ErrorKind::Unsupported => ErrorKind::Unsupported,
        ::qcow2::ErrorKind::ReadOnly => ErrorKind::ReadOnly,
        // Not worth retrying: the image says the same thing next time.
        ::qcow2::ErrorKind::Corrupt | ::qcow2::ErrorKind::Backing => ErrorKind::Other,
    }
}

fn disk_error(name: &str, op: Op, err: Qcow2Error) -> DiskError {
    let mut e = DiskError::new(name, op, kind_of(&err), err.to_string());
    e.errno = err.source.as_ref().and_then(|s| s.raw_os_error());
    // No source: the message already holds the image error's text and its cause, which
    // would print twice in an error chain.
    e
}

impl Qcow2Endpoint {
    /// Opens the image at `path` read-only, with its backing chain when `follow_backing`.
    pub fn open(path: &Path, follow_backing: bool) -> Result<Self, DiskError> {
        Qcow2Endpoint::open_with(path, follow_backing, false)
    }

    /// Opens the image at `path` for reading and writing its guest view (the backing chain,
    /// when followed, is only read).
    pub fn open_rw(path: &Path, follow_backing: bool) -> Result<Self, DiskError> {
        Qcow2Endpoint::open_with(path, follow_backing, true)
    }

    fn open_with(path: &Path, follow_backing: bool, writable: bool) -> Result<Self, DiskError> {
        let name = path.display().to_string();
        let opts = OpenOptions {
            follow_backing,
            ..OpenOptions::default()
        };
        let image = if writable {
            Image::open_rw(path, &opts)
        } else {
            Image::open(path, &opts)
        }
        .map_err(|e| disk_error(&name, Op::Open, e))?;
        let meta = std::fs::metadata(path).map_err(|e| DiskError::from_io(&name, Op::Open, &e))?;
        use std::os::unix::fs::MetadataExt;
        // The top image only: a changed backing file is not noticed.
        let identity = format!(
            "qcow2 dev {} ino {} mtime {}.{:09}",
            meta.dev(),
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec()
        );
        let mut caps = Caps::random_access(image.size());
        caps.read_only = !writable;
        caps.flush = writable;
        // Changed tables stay in memory until a flush writes them back.
        caps.needs_flush = writable;
        // Zero clusters (version 3) or deallocation (nothing below to show through) make
        // zeroing a table update.
        caps.efficient_zero = writable && (image.version() >= 3 || image.chain_len() == 1);
        caps.fast_zero = caps.efficient_zero;
        caps.extents = true;
        caps.preferred_block = image.cluster_size().clamp(4096, 1 << 20);
        caps.queue_depth = QCOW2_QUEUE_DEPTH;
        Ok(Qcow2Endpoint {
            name,
            image: Arc::new(image),
            caps,
            identity,
            bitmap: None,
            inline: false,
        })
    }

    /// Selects the persistent dirty bitmap `name` for [`Endpoint::dirty`]. Refused when the
    /// image has no such bitmap, or its bits cannot be trusted: left in use by a writer that
    /// did not close the image, or with tables that do not fit the image.
    pub fn with_bitmap(mut self, name: &str) -> Result<Self, DiskError> {
        let refuse = |kind: ErrorKind, why: String| {
            DiskError::new(
                &self.name,
                Op::Open,
                kind,
                format!("dirty bitmap '{name}': {why}"),
            )
        };
        let bitmaps = self
            .image
            .bitmaps()
            .map_err(|e| disk_error(&self.name, Op::Open, e))?;
        let Some(bitmap) = bitmaps.into_iter().find(|b| b.name == name) else {
            return Err(refuse(
                ErrorKind::NotFound,
                "the image has no persistent bitmap of that name".into(),
            ));
        };
        if bitmap.in_use {
            return Err(refuse(
                ErrorKind::Other,
                "in use: the image was not closed cleanly (or is open in qemu), so its bits \
                 cannot be trusted"
                    .into(),
            ));
        }
        // An empty range still checks the bitmap's table against the image, so an
        // inconsistent bitmap is refused now rather than in the middle of the copy.
        self.image
            .bitmap_dirty(name, 0, 0)
            .map_err(|e| refuse(kind_of(&e), e.to_string()))?;
        self.caps.dirty = true;
        self.bitmap = Some(name.to_string());
        Ok(self)
    }

    /// Runs every request in the task that polls it, as `FileEndpoint::inline_io` does: for
    /// a command that does one copy, where a hand-off to the pool per request costs more than
    /// a page-cache read; wrong for a server.
    pub fn inline_io(mut self) -> Self {
        self.inline = true;
        self
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        f: impl FnOnce(&Image) -> Result<T, Qcow2Error> + Send + 'static,
    ) -> Result<T, DiskError> {
        if self.inline {
            return f(&self.image).map_err(|e| disk_error(&self.name, op, e).at(offset, len));
        }
        let image = self.image.clone();
        let result = tokio::task::spawn_blocking(move || f(&image))
            .await
            .map_err(|e| {
                DiskError::new(
                    &self.name,
                    op,
                    ErrorKind::Other,
                    format!("I/O task failed: {e}"),
                )
                .at(offset, len)
            })?;
        result.map_err(|e| disk_error(&self.name, op, e).at(offset, len))
    }

    fn read_only(&self, op: Op, offset: u64, len: u64) -> DiskError {
        DiskError::new(
            &self.name,
            op,
            ErrorKind::ReadOnly,
            "the qcow2 image is open read-only",
        )
        .at(offset, len)
    }
}

impl Endpoint for Qcow2Endpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn caps(&self) -> &Caps {
        &self.caps
    }

    fn read(&self, offset: u64, len: u64) -> BoxFut<'_, Bytes> {
        Box::pin(self.blocking(Op::Read, offset, len, move |img| {
            let mut buf = bufpool::get(len as usize);
            img.read_at(&mut buf, offset)?;
            Ok(buf.freeze())
        }))
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFut<'_, ()> {
        let len = data.len() as u64;
        if self.caps.read_only {
            let err = self.read_only(Op::Write, offset, len);
            return Box::pin(async move { Err(err) });
        }
        Box::pin(self.blocking(Op::Write, offset, len, move |img| {
            img.write_at(&data, offset)
        }))
    }

    fn zero(&self, offset: u64, len: u64, allocate: bool) -> BoxFut<'_, ()> {
        if self.caps.read_only {
            let err = self.read_only(Op::Zero, offset, len);
            return Box::pin(async move { Err(err) });
        }
        Box::pin(self.blocking(Op::Zero, offset, len, move |img| {
            img.zero(offset, len, allocate)
        }))
    }

    fn fast_zero(&self, offset: u64, len: u64) -> BoxFut<'_, bool> {
        if !self.caps.fast_zero {
            return Box::pin(async { Ok(false) });
        }
        Box::pin(self.blocking(Op::Zero, offset, len, move |img| {
            img.zero(offset, len, false).map(|()| true)
        }))
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<Extent>> {
        Box::pin(self.blocking(Op::Extents, offset, len, move |img| {
            let mut out: Vec<Extent> = img
                .extents(offset, len)?
                .into_iter()
                .map(|e| match e.kind {
                    ExtentKind::Data => Extent::data(e.offset, e.length),
                    // Zeroed by the image itself: reads as zeroes, but is allocated there.
                    ExtentKind::Zero => Extent {
                        offset: e.offset,
                        length: e.length,
                        zero: true,
                        hole: false,
                    },
                    ExtentKind::Unallocated => Extent::hole(e.offset, e.length),
                })
                .collect();
            merge_adjacent(&mut out);
            Ok(out)
        }))
    }

    fn dirty(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<(Extent, bool)>> {
        let Some(bitmap) = self.bitmap.clone() else {
            let err = DiskError::new(
                &self.name,
                Op::Extents,
                ErrorKind::Unsupported,
                "no persistent dirty bitmap was selected",
            )
            .at(offset, len);
            return Box::pin(async move { Err(err) });
        };
        Box::pin(self.blocking(Op::Extents, offset, len, move |img| {
            let changed = img.bitmap_dirty(&bitmap, offset, len)?;
            Ok(with_clean_gaps(offset, len, &changed))
        }))
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        if self.caps.read_only {
            return Box::pin(async { Ok(()) });
        }
        let size = self.caps.size.unwrap_or(0);
        Box::pin(self.blocking(Op::Flush, 0, size, |img| img.flush()))
    }
}

/// The dirty ranges of `[offset, offset+len)` (in order, merged, as the bitmap reader returns
/// them) with the clean ranges between them, so the answer covers the range exactly.
fn with_clean_gaps(offset: u64, len: u64, dirty: &[(u64, u64)]) -> Vec<(Extent, bool)> {
    let mut out = Vec::with_capacity(dirty.len() * 2 + 1);
    let mut pos = offset;
    for &(start, length) in dirty {
        if start > pos {
            out.push((Extent::data(pos, start - pos), false));
        }
        out.push((Extent::data(start, length), true));
        pos = start + length;
    }
    if pos < offset + len {
        out.push((Extent::data(pos, offset + len - pos), false));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_gaps_fill_the_range() {
        let got = with_clean_gaps(4096, 1 << 20, &[(4096, 65536), (131072, 4096)]);
        let want = [
            (4096, 65536, true),
            (69632, 61440, false),
            (131072, 4096, true),
            (135168, (1 << 20) + 4096 - 135168, false),
        ];
        let got: Vec<_> = got.iter().map(|(e, d)| (e.offset, e.length, *d)).collect();
        assert_eq!(got, want);
        let got = with_clean_gaps(0, 8192, &[]);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.offset, got[0].0.length, got[0].1),
            (0, 8192, false)
        );
    }
}
