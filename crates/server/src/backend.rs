//! Opening the image a ticket names, and the image-level operations the data API needs on top
//! of [`disk::Endpoint`]: extents in the imageio sense (`zero`, `hole`), zeroing in bounded
//! steps, and the advertised connection limits.
//!
//! `file://` opens the exact path of the ticket (never anything derived from a request), with
//! O_DIRECT where the filesystem takes it, or with `"format": "qcow2"` the guest view of the
//! qcow2 image there (its backing chain followed, writes into the image itself). NBD URLs go through ferry's pipelined client; one
//! NBD client per ticket is shared by every HTTP connection of that ticket.

use std::sync::Arc;

use disk::file::FileEndpoint;
use disk::nbd::NbdEndpoint;
use disk::{DiskError, Endpoint, ErrorKind, Op};
use nbd::proto::consts::{
    CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP_PREFIX,
};

use crate::ticket::{Access, BackendUrl, TicketSpec};

/// Connections a client may open per ticket (the reference's `max_connections`).
pub const MAX_CONNECTIONS: u64 = 8;

/// NBD connections per ticket when the export allows several (CAN_MULTI_CONN).
const NBD_CONNECTIONS: usize = 4;

/// The extents API's items (zero and dirty contexts), from the imageio wire model.
pub use imageio::wire::{DirtyExtent, ZeroExtent as ImageExtent};

pub struct Backend {
    pub ep: Arc<dyn Endpoint>,
    pub(crate) nbd: Option<Arc<NbdEndpoint>>,
    /// Bytes the backend holds.
    pub size: u64,
    pub max_readers: u64,
    pub max_writers: u64,
    /// Serializes read-modify-write cycles (see [`crate::aligned`]).
    pub(crate) rmw: tokio::sync::Mutex<()>,
    /// Where the bytes it moves are counted: its ticket's, once the ticket holds it.
    pub traffic: Arc<crate::metrics::Traffic>,
}

impl Backend {
    /// Opens the backend of `spec`: read-only unless the ticket allows writing.
    pub async fn open(spec: &TicketSpec) -> Result<Backend, DiskError> {
        let writable = spec.allows(Access::Write);
        match &spec.backend {
            BackendUrl::File(path) if spec.qcow2 => {
                let ep = if writable {
                    disk::qcow2::Qcow2Endpoint::open_rw(path, true)?
                } else {
                    disk::qcow2::Qcow2Endpoint::open(path, true)?
                };
                let size = ep.caps().size.unwrap_or(0);
                // The image takes concurrent writes (allocation is serialized inside it).
                Ok(Backend {
                    ep: Arc::new(ep),
                    nbd: None,
                    size,
                    max_readers: MAX_CONNECTIONS,
                    max_writers: MAX_CONNECTIONS,
                    rmw: tokio::sync::Mutex::new(()),
                    traffic: Arc::default(),
                })
            }
            BackendUrl::File(path) => {
                let open = |direct| {
                    if writable {
                        FileEndpoint::open_existing(path, direct)
                    } else {
                        FileEndpoint::open_source(path, direct)
                    }
                };
                // tmpfs and some network filesystems refuse O_DIRECT: use the page cache there.
                let ep = match open(true) {
                    Ok(ep) => ep,
                    Err(e) if e.cause.starts_with("O_DIRECT") => open(false)?,
                    Err(e) => return Err(e),
                };
                let size = ep.caps().size.unwrap_or(0);
                // The reference allows one writer on regular files; ferry's file endpoint takes
                // concurrent positional writes, so every connection may write.
                Ok(Backend {
                    ep: Arc::new(ep),
                    nbd: None,
                    size,
                    max_readers: MAX_CONNECTIONS,
                    max_writers: MAX_CONNECTIONS,
                    rmw: tokio::sync::Mutex::new(()),
                    traffic: Arc::default(),
                })
            }
            BackendUrl::Nbd(uri) => {
                let mut opts = nbd::ConnectOptions::from_uri(uri);
                opts.settings.meta_contexts = vec![
                    CONTEXT_BASE_ALLOCATION.to_string(),
                    CONTEXT_ALLOCATION_DEPTH.to_string(),
                ];
                if spec.dirty
                    && let Some(bitmap) = first_dirty_bitmap(&spec.url, &opts).await?
                {
                    opts.settings.meta_contexts.push(bitmap);
                }
                // A request of a client fails at once when the backend does, as the reference
                // daemon's do: the client decides whether to send it again.
                let ep = NbdEndpoint::connect(&spec.url, &opts, NBD_CONNECTIONS, true)
                    .await?
                    .with_retry(disk::retry::RetryPolicy::NONE);
                if writable && ep.caps().read_only {
                    return Err(DiskError::new(
                        &spec.url,
                        Op::Open,
                        ErrorKind::ReadOnly,
                        "the NBD export is read-only but the ticket allows writing",
                    ));
                }
                let size = ep.caps().size.unwrap_or(0);
                let ep = Arc::new(ep);
                Ok(Backend {
                    ep: ep.clone(),
                    nbd: Some(ep),
                    size,
                    max_readers: MAX_CONNECTIONS,
                    max_writers: MAX_CONNECTIONS,
                    rmw: tokio::sync::Mutex::new(()),
                    traffic: Arc::default(),
                })
            }
        }
    }

    /// An NBD export (zeroing there is a WRITE_ZEROES request, cheap for the server).
    pub fn is_nbd(&self) -> bool {
        self.nbd.is_some()
    }

    pub fn min_block(&self) -> u64 {
        self.ep.caps().min_block
    }

    pub fn preferred_block(&self) -> u64 {
        self.ep.caps().preferred_block
    }

    pub fn max_request(&self) -> u64 {
        self.ep.caps().max_request
    }

    /// The zero-context extents of [start, start+length), contiguous, neighbours merged.
    /// `hole` means "unallocated in the top layer" (NBD `qemu:allocation-depth` = 0); files and
    /// exports without that context never report holes, as the reference.
    pub async fn extents(&self, start: u64, length: u64) -> Result<Vec<ImageExtent>, DiskError> {
        if length == 0 {
            return Ok(Vec::new());
        }
        let zero: Vec<ImageExtent> = self
            .ep
            .extents(start, length)
            .await?
            .into_iter()
            .map(|e| ImageExtent {
                start: e.offset,
                length: e.length,
                zero: e.zero,
                hole: false,
            })
            .collect();
        let depth = match &self.nbd {
            Some(n)
                if n.client()
                    .info()
                    .context_id(CONTEXT_ALLOCATION_DEPTH)
                    .is_some() =>
            {
                let status = n
                    .client()
                    .block_status(CONTEXT_ALLOCATION_DEPTH, start, length)
                    .await
                    .map_err(|e| DiskError::from_nbd(n.name(), Op::Extents, &e))?;
                Some(
                    status
                        .into_iter()
                        .map(|s| (s.offset, s.length, s.flags == 0))
                        .collect::<Vec<_>>(),
                )
            }
            _ => None,
        };
        let mut out = match depth {
            Some(depth) => overlay_holes(&zero, &depth),
            None => zero,
        };
        merge(&mut out);
        Ok(out)
    }

    /// Dirty-context items of [start, start+length): changed since the checkpoint or not,
    /// and whether they read as zeroes; neighbours merged. Needs a dirty bitmap.
    pub async fn dirty_extents(
        &self,
        start: u64,
        length: u64,
    ) -> Result<Option<Vec<DirtyExtent>>, DiskError> {
        if !self.ep.caps().dirty {
            return Ok(None);
        }
        if length == 0 {
            return Ok(Some(Vec::new()));
        }
        let dirty = self.ep.dirty(start, length).await?;
        let zero = self.ep.extents(start, length).await?;
        let mut out: Vec<DirtyExtent> = Vec::new();
        let mut j = 0;
        for (d, is_dirty) in dirty {
            let mut pos = d.offset;
            let end = d.end();
            while pos < end {
                while j < zero.len() && zero[j].end() <= pos {
                    j += 1;
                }
                let (is_zero, until) = match zero.get(j) {
                    Some(z) if z.offset <= pos => (z.zero, z.end().min(end)),
                    Some(z) => (false, z.offset.min(end)),
                    None => (false, end),
                };
                match out.last_mut() {
                    Some(last)
                        if last.dirty == is_dirty
                            && last.zero == is_zero
                            && last.start + last.length == pos =>
                    {
                        last.length += until - pos
                    }
                    _ => out.push(DirtyExtent {
                        start: pos,
                        length: until - pos,
                        dirty: is_dirty,
                        zero: is_zero,
                    }),
                }
                pos = until;
            }
        }
        Ok(Some(out))
    }

    pub async fn close(&self) {
        if let Err(e) = self.ep.close().await {
            tracing::warn!("closing {}: {e}", self.ep.name());
        }
    }
}

/// The first dirty bitmap the export offers (qemu-nbd exports the one named by `-B`), as a
/// meta context name. The reference uses the export's one bitmap the same way.
async fn first_dirty_bitmap(
    url: &str,
    opts: &nbd::ConnectOptions,
) -> Result<Option<String>, DiskError> {
    let mut probe = opts.clone();
    probe.settings.list_meta_contexts = true;
    probe.settings.meta_contexts = Vec::new();
    let conn = probe
        .connect()
        .await
        .map_err(|e| DiskError::from_nbd(url, Op::Open, &e))?;
    let found = conn
        .info()
        .offered_contexts
        .iter()
        .find(|c| c.starts_with(CONTEXT_DIRTY_BITMAP_PREFIX))
        .cloned();
    conn.disconnect().await;
    Ok(found)
}

/// Combines zero extents with (offset, length, unallocated) ranges into extents split at both
/// lists' boundaries.
fn overlay_holes(zero: &[ImageExtent], depth: &[(u64, u64, bool)]) -> Vec<ImageExtent> {
    let mut out = Vec::new();
    let mut j = 0;
    for z in zero {
        let mut pos = z.start;
        let end = z.start + z.length;
        while pos < end {
            while j < depth.len() && depth[j].0 + depth[j].1 <= pos {
                j += 1;
            }
            let (hole, until) = match depth.get(j) {
                Some(&(off, len, unalloc)) if off <= pos => (unalloc, (off + len).min(end)),
                Some(&(off, _, _)) => (false, off.min(end)),
                None => (false, end),
            };
            out.push(ImageExtent {
                start: pos,
                length: until - pos,
                zero: z.zero,
                hole,
            });
            pos = until;
        }
    }
    out
}

fn merge(extents: &mut Vec<ImageExtent>) {
    extents.retain(|e| e.length > 0);
    extents.dedup_by(|next, kept| {
        let same = kept.start + kept.length == next.start
            && kept.zero == next.zero
            && kept.hole == next.hole;
        if same {
            kept.length += next.length;
        }
        same
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, length: u64, zero: bool, hole: bool) -> ImageExtent {
        ImageExtent {
            start,
            length,
            zero,
            hole,
        }
    }

    #[test]
    fn holes_split_zero_extents() {
        let zero = [ext(0, 100, false, false), ext(100, 300, true, false)];
        let depth = [(0, 50, false), (50, 250, true), (300, 100, false)];
        let mut got = overlay_holes(&zero, &depth);
        merge(&mut got);
        assert_eq!(
            got,
            vec![
                ext(0, 50, false, false),
                ext(50, 50, false, true),
                ext(100, 200, true, true),
                ext(300, 100, true, false),
            ]
        );
    }

    #[test]
    fn merge_joins_equal_neighbours() {
        let mut v = vec![
            ext(0, 10, true, false),
            ext(10, 10, true, false),
            ext(20, 0, false, false),
            ext(20, 5, false, false),
        ];
        merge(&mut v);
        assert_eq!(v, vec![ext(0, 20, true, false), ext(20, 5, false, false)]);
    }
}
