//! Writing into an existing image: the guest view of an image opened with [`Image::open_rw`]
//! changes through [`Image::write_at`] and [`Image::zero`], and [`Image::flush`] makes the
//! changes durable.
//!
//! New clusters (data, L2 tables, refcount blocks, a grown refcount table) are only ever
//! appended at the end of the file, and freed clusters are never reused while the image is
//! open, so a cluster a concurrent writer still holds cannot be handed out again. Changed
//! metadata stays in memory (L2 tables pinned in the cache, refcount blocks here) until a flush
//! writes it back in an order that keeps the file consistent at every step: data, then
//! refcount blocks, then the refcount table (and the header naming a moved one), then L2
//! tables, then the L1 table, each step synced before the next; refcounts of clusters no longer
//! referenced drop last. A crash between flushes loses the unflushed writes and can at worst
//! leave clusters that nothing references (leaks), never a reference to a free cluster.
//!
//! Overwriting a cluster the image already owns alone (the COPIED flag) needs no lock: only
//! allocation and table changes run under the metadata mutex.
//!
//! Extended L2 entries are written per subcluster: a write into a cluster the image owns
//! completes and allocates only the subclusters it touches.
//!
//! Refused for writing, by name: internal snapshots, persistent bitmaps (writing would make
//! them stale), refcounts narrower than 8 bits, and images left dirty by a writer with lazy
//! refcounts.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use crate::error::{ErrorKind, Qcow2Error, Result};
use crate::header::{AUTOCLEAR_BITMAPS, read_exact};
use crate::{
    INCOMPAT_DIRTY, Image, L1_OFFSET_MASK, L2_COMPRESSED, L2_OFFSET_MASK, L2_ZERO, OpenOptions,
    lock,
};

/// L1 and L2 entries: the cluster's refcount is exactly one, so it may be written in place.
const COPIED: u64 = 1 << 63;
/// Changed metadata kept in memory before it is written back without being asked: bounds the
/// memory a long run of writes without a flush takes.
const MAX_DIRTY_BYTES: u64 = 64 << 20;
/// Largest refcount table read or grown to (64 MiB of table with 64 KiB clusters and 16-bit
/// refcounts describes far more than any file system holds).
const MAX_REFCOUNT_TABLE_BYTES: u64 = 64 << 20;
/// Host offsets must fit the 56-bit offset field of the tables.
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Allocation and metadata state of a writable image, behind the image's metadata mutex.
pub(crate) struct Meta {
    /// Where the next cluster goes: the end of the file, cluster aligned.
    next_free: u64,
    /// The refcount table as it is in memory (entries: refcount block offsets).
    rt: Vec<u64>,
    rt_offset: u64,
    rt_clusters: u64,
    /// The table has entries the file does not have yet.
    rt_dirty: bool,
    /// The table is at a new place the header does not name yet.
    rt_moved: bool,
    /// Refcount width in bytes.
    rc_width: usize,
    /// Refcount blocks read or created, by index in the table.
    blocks: HashMap<u64, Vec<u8>>,
    dirty_blocks: BTreeSet<u64>,
    /// Offsets of L2 tables changed in memory (pinned in the cache).
    dirty_l2: BTreeSet<u64>,
    l1_dirty: bool,
    /// Host ranges no longer referenced in memory, perhaps still on disk: their refcounts drop
    /// only once the tables without them are written.
    pending_free: Vec<(u64, u64)>,
}

fn rc_get(block: &[u8], i: usize, w: usize) -> u64 {
    block[i * w..i * w + w]
        .iter()
        .fold(0u64, |v, &b| (v << 8) | u64::from(b))
}

fn rc_set(block: &mut [u8], i: usize, w: usize, v: u64) {
    for j in 0..w {
        block[i * w + j] = (v >> (8 * (w - 1 - j))) as u8;
    }
}

fn unsupported(img: &Image, msg: impl Into<String>) -> Qcow2Error {
    Qcow2Error::new(&img.path, ErrorKind::Unsupported, msg)
}

impl Image {
    /// Opens the image at `path` for reading and writing (its backing chain read-only).
    pub fn open_rw(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Qcow2Error::io(&name, None, "opening the image for writing", e))?;
        // Two writers appending clusters would hand out the same ones: one writer at a time
        // (among those that take this lock; qemu's own byte-range locks are separate).
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Qcow2Error::new(
                    &name,
                    ErrorKind::Io,
                    "the image is already open for writing by another process",
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Qcow2Error::io(&name, None, "locking the image", e));
            }
        }
        let mut seen = Vec::new();
        let mut img = Image::from_storage_at(Box::new(file), &name, opts, 0, &mut seen)?;
        img.make_writable()?;
        Ok(img)
    }

    /// Opens an image held by `storage` for writing (its backing chain read-only); `name` is
    /// used in messages and to resolve a relative backing file name.
    pub fn from_storage_rw(
        storage: Box<dyn crate::Storage>,
        name: &str,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let mut seen = Vec::new();
        let mut img = Image::from_storage_at(storage, name, opts, 0, &mut seen)?;
        img.make_writable()?;
        Ok(img)
    }

    /// Was the image opened for writing?
    pub fn is_writable(&self) -> bool {
        self.meta.is_some()
    }

    fn make_writable(&mut self) -> Result<()> {
        let h = &self.header;
        if h.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(unsupported(
                self,
                "image was left dirty by a writer with lazy refcounts; repair it with \
                 'qemu-img check -r all' before writing",
            )
            .at(72));
        }
        if h.nb_snapshots != 0 {
            return Err(unsupported(
                self,
                format!(
                    "writing into images with internal snapshots ({}) is not supported",
                    h.nb_snapshots
                ),
            )
            .at(60));
        }
        if h.bitmaps.is_some() && h.autoclear & AUTOCLEAR_BITMAPS != 0 {
            return Err(unsupported(
                self,
                "image has persistent dirty bitmaps, which writing would make stale; writing \
                 into it is not supported",
            )
            .at(88));
        }
        if !(3..=6).contains(&h.refcount_order) {
            return Err(unsupported(
                self,
                format!(
                    "writing into images with {}-bit refcounts is not supported (8 to 64 bits)",
                    1u64 << h.refcount_order.min(63)
                ),
            )
            .at(96));
        }
        let cs = self.cluster_size();
        let file_len = self.file_len();
        let rt_offset = h.refcount_table_offset;
        let rt_clusters = u64::from(h.refcount_table_clusters);
        let rt_bytes = rt_clusters << self.cluster_bits;
        if rt_offset == 0 || !rt_offset.is_multiple_of(cs) || rt_clusters == 0 {
            return Err(Qcow2Error::corrupt(
                &self.path,
                48,
                format!(
                    "refcount table at {rt_offset} ({rt_clusters} clusters) is not a cluster \
                     aligned, non-empty table"
                ),
            ));
        }
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(unsupported(
                self,
                format!(
                    "refcount table of {rt_bytes} bytes is larger than the \
                     {MAX_REFCOUNT_TABLE_BYTES}-byte limit"
                ),
            )
            .at(56));
        }
        if rt_offset.checked_add(rt_bytes).is_none_or(|e| e > file_len) {
            return Err(Qcow2Error::corrupt(
                &self.path,
                48,
                format!(
                    "refcount table at {rt_offset} ({rt_bytes} bytes) extends past the end of \
                     the file ({file_len} bytes)"
                ),
            ));
        }
        let mut raw = vec![0u8; rt_bytes as usize];
        read_exact(
            &self.path,
            self.storage.as_ref(),
            &mut raw,
            rt_offset,
            "the refcount table",
        )?;
        let rt = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        if self.header.version >= 3 && self.header.autoclear != 0 {
            // Autoclear features this writer does not maintain are invalid once it writes.
            self.pwrite(&[0u8; 8], 88, "the autoclear features")?;
            self.sync()?;
            self.header.autoclear = 0;
        }
        self.meta = Some(Mutex::new(Meta {
            next_free: file_len.div_ceil(cs) * cs,
            rt,
            rt_offset,
            rt_clusters,
            rt_dirty: false,
            rt_moved: false,
            rc_width: (1usize << self.header.refcount_order) / 8,
            blocks: HashMap::new(),
            dirty_blocks: BTreeSet::new(),
            dirty_l2: BTreeSet::new(),
            l1_dirty: false,
            pending_free: Vec::new(),
        }));
        Ok(())
    }

    fn meta_lock(&self, op: &str) -> Result<std::sync::MutexGuard<'_, Meta>> {
        match &self.meta {
            Some(m) => Ok(lock(m)),
            None => Err(self.read_only(op)),
        }
    }

    fn read_only(&self, op: &str) -> Qcow2Error {
        Qcow2Error::new(
            &self.path,
            ErrorKind::ReadOnly,
            format!("cannot {op}: the image is open read-only"),
        )
    }

    fn pwrite(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Qcow2Error::io(&self.path, Some(offset), &format!("writing {what}"), e))?;
        self.file_len
            .fetch_max(offset + buf.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.storage
            .sync_data()
            .map_err(|e| Qcow2Error::io(&self.path, None, "syncing the image", e))
    }

    /// The L1 index, the L1 entry, the L2 entry and its subcluster bitmap (0 without an L2
    /// table; always 0 without extended L2 entries) of a guest offset.
    fn raw_entry(&self, guest: u64) -> Result<(usize, u64, u64, u64)> {
        let cb = self.cluster_bits;
        let l1_index = (guest >> (cb + self.l2_bits)) as usize;
        let Some(l1_entry) = self.l1.get(l1_index).map(|e| e.load(Ordering::Acquire)) else {
            return Err(Qcow2Error::new(
                &self.path,
                ErrorKind::InvalidArgument,
                format!("guest offset {guest} is beyond the L1 table"),
            ));
        };
        let l2_offset = l1_entry & L1_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((l1_index, l1_entry, 0, 0));
        }
        let table = self.l2_table(l1_index, l2_offset)?;
        let i = ((guest >> cb) as usize) & ((1usize << self.l2_bits) - 1);
        if self.extended {
            return Ok((l1_index, l1_entry, table[2 * i], table[2 * i + 1]));
        }
        Ok((l1_index, l1_entry, table[i], 0))
    }

    /// A data cluster may be written where it is: checked against the metadata whose place is
    /// known without a lock, so a hostile table cannot aim a write at the header or the tables.
    fn check_data_host(&self, host: u64, entry_guest: u64) -> Result<()> {
        let cs = self.cluster_size();
        let h = &self.header;
        let l1_end = h.l1_table_offset + u64::from(h.l1_size) * 8;
        let rt_end =
            h.refcount_table_offset + (u64::from(h.refcount_table_clusters) << self.cluster_bits);
        let overlaps = |start: u64, end: u64| host < end && start < host + cs;
        if !host.is_multiple_of(cs)
            || host < cs
            || host >= MAX_HOST_OFFSET
            || overlaps(h.l1_table_offset, l1_end)
            || overlaps(h.refcount_table_offset, rt_end)
        {
            return Err(Qcow2Error::corrupt(
                &self.path,
                host,
                format!(
                    "data cluster for guest offset {entry_guest} overlaps the image metadata or \
                     is not cluster aligned"
                ),
            ));
        }
        Ok(())
    }

    /// The subclusters of `[in_cluster, in_cluster+len)`, as a bitmap (extended L2 entries).
    fn subcluster_mask(&self, in_cluster: u64, len: u64) -> u32 {
        if len == 0 {
            return 0;
        }
        let sc_bits = self.cluster_bits - 5;
        let first = in_cluster >> sc_bits;
        let last = (in_cluster + len - 1) >> sc_bits;
        let ones = if last - first >= 31 {
            u32::MAX
        } else {
            (1u32 << (last - first + 1)) - 1
        };
        ones << first
    }

    /// Where the `len` bytes at `guest` (inside one cluster) can be overwritten in place, if
    /// they can.
    fn in_place_host(&self, guest: u64, len: u64) -> Result<Option<u64>> {
        let (_, l1_entry, entry, bitmap) = self.raw_entry(guest)?;
        let host = entry & L2_OFFSET_MASK;
        let zero = if self.extended {
            // Every subcluster written must be allocated already.
            let mask = self.subcluster_mask(guest & (self.cluster_size() - 1), len);
            (bitmap as u32) & mask != mask
        } else {
            self.header.version >= 3 && entry & L2_ZERO != 0
        };
        if l1_entry & COPIED == 0
            || entry & COPIED == 0
            || entry & L2_COMPRESSED != 0
            || zero
            || host == 0
        {
            return Ok(None);
        }
        self.check_data_host(host, guest)?;
        Ok(Some(host))
    }

    /// Writes `buf` into the guest view at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.meta.is_none() {
            return Err(self.read_only("write"));
        }
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.cluster_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let in_cluster = guest & (cs - 1);
            let n = ((cs - in_cluster) as usize).min(buf.len() - pos);
            let chunk = &buf[pos..pos + n];
            match self.in_place_host(guest, n as u64)? {
                Some(host) => self.pwrite(chunk, host + in_cluster, "guest data")?,
                None => {
                    let mut m = self.meta_lock("write")?;
                    self.write_cluster(&mut m, guest, chunk)?;
                    m.bound_dirty(self)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes `chunk` (inside one cluster) at `guest`, allocating the cluster when it cannot be
    /// written in place; the rest of a new cluster is what the guest read there before.
    fn write_cluster(&self, m: &mut Meta, guest: u64, chunk: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let in_cluster = guest & (cs - 1);
        let start = guest - in_cluster;
        // Another writer may have allocated it while this one waited for the lock.
        if let Some(host) = self.in_place_host(guest, chunk.len() as u64)? {
            return self.pwrite(chunk, host + in_cluster, "guest data");
        }
        let (_, _, old, bitmap) = self.raw_entry(guest)?;
        let old_host = old & L2_OFFSET_MASK;
        let compressed = old & L2_COMPRESSED != 0;
        if self.extended && !compressed && old_host != 0 && old & COPIED != 0 {
            return self.write_subclusters(m, guest, chunk, old, bitmap);
        }
        let zero = !self.extended && self.header.version >= 3 && old & L2_ZERO != 0 && !compressed;
        let visible = (self.size() - start).min(cs) as usize;
        let mut data = vec![0u8; cs as usize];
        if (chunk.len() as u64) < visible as u64 && !zero {
            self.read_at(&mut data[..visible], start)?;
        }
        data[in_cluster as usize..in_cluster as usize + chunk.len()].copy_from_slice(chunk);
        // A zero cluster that keeps its allocation (COPIED) is written where it is.
        let keep = zero && old_host != 0 && old & COPIED != 0;
        let host = if keep {
            self.check_data_host(old_host, guest)?;
            old_host
        } else {
            m.alloc_one(self)?
        };
        self.pwrite(&data, host, "guest data")?;
        let all = if self.extended {
            u64::from(u32::MAX)
        } else {
            0
        };
        self.set_entry(m, guest, host | COPIED, all)?;
        if !keep {
            m.release(self, old);
        }
        Ok(())
    }

    /// Writes into a cluster the image owns whose subclusters are not all allocated: the
    /// subclusters touched are completed from the guest view (backing file or zeroes) and
    /// marked allocated.
    fn write_subclusters(
        &self,
        m: &mut Meta,
        guest: u64,
        chunk: &[u8],
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let sc = cs >> 5;
        let in_cluster = guest & (cs - 1);
        let start = guest - in_cluster;
        let host = entry & L2_OFFSET_MASK;
        self.check_data_host(host, guest)?;
        let from = in_cluster / sc * sc;
        let to = (in_cluster + chunk.len() as u64).div_ceil(sc) * sc;
        let visible = (self.size() - start).min(to) - from;
        let mut data = vec![0u8; (to - from) as usize];
        if chunk.len() as u64 != to - from {
            self.read_at(&mut data[..visible as usize], start + from)?;
        }
        let at = (in_cluster - from) as usize;
        data[at..at + chunk.len()].copy_from_slice(chunk);
        self.pwrite(&data, host + from, "guest data")?;
        let mask = u64::from(self.subcluster_mask(in_cluster, chunk.len() as u64));
        let bitmap = (bitmap | mask) & !(mask << 32);
        self.set_entry(m, guest, entry, bitmap)
    }

    /// Points the L2 entry of `guest` at `value` (with subcluster `bitmap` for extended L2
    /// entries), allocating the L2 table when there is none.
    fn set_entry(&self, m: &mut Meta, guest: u64, value: u64, bitmap: u64) -> Result<()> {
        let (l1_index, l1_entry, _, _) = self.raw_entry(guest)?;
        let mut l2_offset = l1_entry & L1_OFFSET_MASK;
        if l2_offset == 0 {
            l2_offset = m.alloc_one(self)?;
            let words = (self.cluster_size() / 8) as usize;
            let table: std::sync::Arc<[u64]> = vec![0u64; words].into();
            lock(&self.cache).put_pinned(l2_offset, table);
            m.dirty_l2.insert(l2_offset);
            // The table is in the cache before the L1 entry names it.
            self.l1[l1_index].store(l2_offset | COPIED, Ordering::Release);
            m.l1_dirty = true;
        } else if l1_entry & COPIED == 0 {
            let rc = m.refcount(self, l2_offset)?;
            if rc != 1 {
                return Err(unsupported(
                    self,
                    format!(
                        "L2 table at {l2_offset} is shared (refcount {rc}); writing into shared \
                         tables is not supported"
                    ),
                ));
            }
            self.l1[l1_index].store(l1_entry | COPIED, Ordering::Release);
            m.l1_dirty = true;
        }
        let table = self.l2_table(l1_index, l2_offset)?;
        let i = ((guest >> self.cluster_bits) as usize) & ((1usize << self.l2_bits) - 1);
        let extended = self.extended;
        let update = |t: &mut [u64]| {
            if extended {
                t[2 * i] = value;
                t[2 * i + 1] = bitmap;
            } else {
                t[i] = value;
            }
        };
        let mut cache = lock(&self.cache);
        match cache.pin_mut(l2_offset) {
            Some(t) => update(t),
            None => {
                // Evicted between loading and pinning: pin a changed copy.
                let mut t = table.to_vec();
                update(&mut t);
                cache.put_pinned(l2_offset, t.into());
            }
        }
        m.dirty_l2.insert(l2_offset);
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeroes. Whole clusters become zero clusters
    /// (version 3) or are deallocated (version 2 without a backing file); `keep_allocated`
    /// keeps clusters the image owns allocated. Other ranges are written with zeroes.
    pub fn zero(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<()> {
        let mut m = self.meta_lock("zero")?;
        self.check_range(offset, len)?;
        let cs = self.cluster_size();
        let end = offset + len;
        let span_bits = self.cluster_bits + self.l2_bits;
        let mut guest = offset;
        while guest < end {
            let in_cluster = guest & (cs - 1);
            let start = guest - in_cluster;
            let n = (cs - in_cluster).min(end - guest);
            let (_, l1_entry, old, bitmap) = self.raw_entry(guest)?;
            if l1_entry & L1_OFFSET_MASK == 0 && self.backing.is_none() {
                // A whole unallocated table's span already reads as zeroes.
                guest = (((guest >> span_bits) + 1) << span_bits).min(end);
                continue;
            }
            let whole = in_cluster == 0 && (n == cs || start + n == self.size());
            if whole {
                self.zero_cluster(&mut m, guest, old, bitmap, keep_allocated)?;
            } else if !self.reads_zero(old, bitmap) {
                let zeroes = vec![0u8; n as usize];
                self.write_cluster(&mut m, guest, &zeroes)?;
            }
            m.bound_dirty(self)?;
            guest += n;
        }
        Ok(())
    }

    /// The whole cluster reads as zeroes by itself (not from a backing file).
    fn reads_zero(&self, entry: u64, bitmap: u64) -> bool {
        if self.extended {
            return (entry == 0 && bitmap == 0 && self.backing.is_none())
                || (entry & L2_COMPRESSED == 0 && bitmap >> 32 == u64::from(u32::MAX));
        }
        if entry == 0 {
            return self.backing.is_none();
        }
        self.header.version >= 3 && entry & L2_ZERO != 0 && entry & L2_COMPRESSED == 0
    }

    fn zero_cluster(
        &self,
        m: &mut Meta,
        guest: u64,
        old: u64,
        bitmap: u64,
        keep: bool,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let compressed = old & L2_COMPRESSED != 0;
        let host = if compressed { 0 } else { old & L2_OFFSET_MASK };
        let owned = host != 0 && old & COPIED != 0;
        if self.extended {
            // All subclusters zero: with the cluster kept, or without a cluster at all.
            let all_zero = u64::from(u32::MAX) << 32;
            let target = if keep && owned {
                (host | COPIED, all_zero)
            } else if self.backing.is_none() {
                (0, 0)
            } else {
                (0, all_zero)
            };
            if (old, bitmap) == target {
                return Ok(());
            }
            self.set_entry(m, guest, target.0, target.1)?;
            if !(keep && owned) {
                m.release(self, old);
            }
            return Ok(());
        }
        if self.header.version >= 3 {
            let target = if keep && owned {
                host | COPIED | L2_ZERO
            } else if self.backing.is_none() {
                0
            } else {
                L2_ZERO
            };
            if old == target || (target == 0 && self.reads_zero(old, 0) && host == 0) {
                return Ok(());
            }
            self.set_entry(m, guest, target, 0)?;
            if !(keep && owned) {
                m.release(self, old);
            }
            return Ok(());
        }
        if self.backing.is_none() && !keep {
            if old != 0 {
                self.set_entry(m, guest, 0, 0)?;
                m.release(self, old);
            }
            return Ok(());
        }
        if old == 0 && self.backing.is_none() {
            return Ok(());
        }
        let zeroes = vec![0u8; cs as usize];
        let visible = (self.size() - guest).min(cs) as usize;
        self.write_cluster(m, guest, &zeroes[..visible])
    }

    /// Writes back changed metadata in a crash-safe order and makes everything written so far
    /// durable. A read-only image has nothing to flush.
    pub fn flush(&self) -> Result<()> {
        let Some(meta) = &self.meta else {
            return Ok(());
        };
        lock(meta).write_back(self)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Best effort for callers that never flushed; errors have nobody to go to here.
        if self.meta.is_some() {
            let _ = self.flush();
        }
    }
}

impl Meta {
    fn per_block(&self, img: &Image) -> u64 {
        img.cluster_size() / self.rc_width as u64
    }

    /// The refcount block of table index `bi`, read on first use; the entry must be non-zero.
    fn block(&mut self, img: &Image, bi: u64) -> Result<&mut Vec<u8>> {
        let cs = img.cluster_size();
        match self.blocks.entry(bi) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(v) => {
                let off = self.rt[bi as usize];
                let at = self.rt_offset + bi * 8;
                let file_len = img.file_len();
                if !off.is_multiple_of(cs)
                    || off < cs
                    || off.checked_add(cs).is_none_or(|e| e > file_len)
                {
                    return Err(Qcow2Error::corrupt(
                        &img.path,
                        at,
                        format!(
                            "refcount block offset {off} is not cluster aligned or outside the \
                             file ({file_len} bytes)"
                        ),
                    ));
                }
                let mut buf = vec![0u8; cs as usize];
                read_exact(
                    &img.path,
                    img.storage.as_ref(),
                    &mut buf,
                    off,
                    "a refcount block",
                )?;
                Ok(v.insert(buf))
            }
        }
    }

    fn refcount(&mut self, img: &Image, host: u64) -> Result<u64> {
        let per_block = self.per_block(img);
        let ci = host >> img.cluster_bits;
        let bi = ci / per_block;
        if self.rt.get(bi as usize).is_none_or(|&o| o == 0) {
            return Ok(0);
        }
        let w = self.rc_width;
        let block = self.block(img, bi)?;
        Ok(rc_get(block, (ci % per_block) as usize, w))
    }

    /// Sets a refcount whose block exists.
    fn set_refcount(&mut self, img: &Image, host: u64, value: u64) -> Result<()> {
        let per_block = self.per_block(img);
        let ci = host >> img.cluster_bits;
        let bi = ci / per_block;
        if self.rt.get(bi as usize).is_none_or(|&o| o == 0) {
            return Err(Qcow2Error::corrupt(
                &img.path,
                self.rt_offset + bi * 8,
                format!("cluster at {host} has no refcount block"),
            ));
        }
        let w = self.rc_width;
        let block = self.block(img, bi)?;
        rc_set(block, (ci % per_block) as usize, w, value);
        self.dirty_blocks.insert(bi);
        Ok(())
    }

    /// Takes a cluster past the end of the file, which must be free.
    fn claim(&mut self, img: &Image, host: u64) -> Result<()> {
        let rc = self.refcount(img, host)?;
        if rc != 0 {
            return Err(Qcow2Error::corrupt(
                &img.path,
                host,
                format!(
                    "cluster at {host}, at or past the end of the image data, has refcount {rc}: \
                     the refcounts are inconsistent; repair with 'qemu-img check -r all'"
                ),
            ));
        }
        self.set_refcount(img, host, 1)
    }

    /// One new cluster at the end of the file, refcounted (in memory).
    fn alloc_one(&mut self, img: &Image) -> Result<u64> {
        let cs = img.cluster_size();
        let per_block = self.per_block(img);
        loop {
            let c = self.next_free;
            if c + cs > MAX_HOST_OFFSET {
                return Err(unsupported(
                    img,
                    "the image file would grow past the largest offset qcow2 tables hold",
                ));
            }
            let bi = (c >> img.cluster_bits) / per_block;
            if bi >= self.rt.len() as u64 {
                self.grow_table(img, bi)?;
                continue;
            }
            if self.rt[bi as usize] == 0 {
                // The new block describes itself: it is the first cluster of its range.
                self.rt[bi as usize] = c;
                self.rt_dirty = true;
                self.blocks.insert(bi, vec![0u8; cs as usize]);
                self.set_refcount(img, c, 1)?;
                self.next_free = c + cs;
                continue;
            }
            self.claim(img, c)?;
            self.next_free = c + cs;
            return Ok(c);
        }
    }

    /// Moves the refcount table to the end of the file, large enough for block index `need`,
    /// followed by the new refcount blocks that describe the new table and themselves.
    fn grow_table(&mut self, img: &Image, need: u64) -> Result<()> {
        let cb = img.cluster_bits;
        let cs = img.cluster_size();
        let per_entry_cluster = cs / 8;
        let per_block = self.per_block(img);
        let sc = self.next_free >> cb;
        let mut t = (need + 1)
            .max(self.rt.len() as u64 * 2)
            .div_ceil(per_entry_cluster)
            .max(1);
        loop {
            if t * cs > MAX_REFCOUNT_TABLE_BYTES {
                return Err(unsupported(
                    img,
                    format!(
                        "the refcount table would grow past the {MAX_REFCOUNT_TABLE_BYTES}-byte \
                         limit"
                    ),
                ));
            }
            let rt = &self.rt;
            let missing = |k: u64| -> Vec<u64> {
                (sc / per_block..=(sc + t + k - 1) / per_block)
                    .filter(|&b| rt.get(b as usize).is_none_or(|&o| o == 0))
                    .collect()
            };
            // Blocks for the table and for themselves: a fixed point, reached because each
            // added cluster adds at most one block.
            let mut k = 0u64;
            loop {
                let m = missing(k).len() as u64;
                if m == k {
                    break;
                }
                k = m;
            }
            let last_block = (sc + t + k - 1) / per_block;
            if last_block.max(need) >= t * per_entry_cluster {
                t += 1;
                continue;
            }
            let new_blocks = missing(k);
            let mut rt = self.rt.clone();
            rt.resize((t * per_entry_cluster) as usize, 0);
            for (j, &b) in new_blocks.iter().enumerate() {
                rt[b as usize] = (sc + t + j as u64) << cb;
                self.blocks.insert(b, vec![0u8; cs as usize]);
                self.dirty_blocks.insert(b);
            }
            let old = (self.rt_offset, self.rt_clusters << cb);
            self.rt = rt;
            for c in sc..sc + t + k {
                self.claim(img, c << cb)?;
            }
            self.pending_free.push(old);
            self.rt_offset = sc << cb;
            self.rt_clusters = t;
            self.rt_dirty = true;
            self.rt_moved = true;
            self.next_free = (sc + t + k) << cb;
            return Ok(());
        }
    }

    /// Queues the clusters an L2 entry held for freeing once the tables are written.
    fn release(&mut self, img: &Image, entry: u64) {
        if entry & L2_COMPRESSED != 0 {
            let cb = img.cluster_bits;
            let x = 62 - (cb - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
            let start = host & !511;
            self.pending_free.push((start, sectors * 512));
            return;
        }
        let host = entry & L2_OFFSET_MASK;
        if host != 0 {
            self.pending_free.push((host, img.cluster_size()));
        }
    }

    /// Writes back early when the changed metadata grows large.
    fn bound_dirty(&mut self, img: &Image) -> Result<()> {
        let tables = (self.dirty_l2.len() + self.dirty_blocks.len()) as u64;
        let frees = self.pending_free.len() as u64 * 16;
        if tables * img.cluster_size() + frees > MAX_DIRTY_BYTES {
            self.write_back(img)?;
        }
        Ok(())
    }

    fn write_blocks(&mut self, img: &Image) -> Result<()> {
        if self.dirty_blocks.is_empty() {
            return Ok(());
        }
        for &bi in &self.dirty_blocks {
            let off = self.rt[bi as usize];
            if let Some(block) = self.blocks.get(&bi) {
                img.pwrite(block, off, "a refcount block")?;
            }
        }
        img.sync()?;
        self.dirty_blocks.clear();
        Ok(())
    }

    fn write_back(&mut self, img: &Image) -> Result<()> {
        // Data (and anything written before) first.
        img.sync()?;
        self.write_blocks(img)?;
        if self.rt_dirty {
            let raw: Vec<u8> = self.rt.iter().flat_map(|e| e.to_be_bytes()).collect();
            img.pwrite(&raw, self.rt_offset, "the refcount table")?;
            img.sync()?;
            if self.rt_moved {
                let mut h = [0u8; 12];
                h[..8].copy_from_slice(&self.rt_offset.to_be_bytes());
                h[8..].copy_from_slice(&(self.rt_clusters as u32).to_be_bytes());
                img.pwrite(&h, 48, "the header")?;
                img.sync()?;
                self.rt_moved = false;
            }
            self.rt_dirty = false;
        }
        if !self.dirty_l2.is_empty() {
            for &off in &self.dirty_l2 {
                let table = lock(&img.cache).get(off);
                let Some(table) = table else {
                    return Err(Qcow2Error::new(
                        &img.path,
                        ErrorKind::Corrupt,
                        format!("changed L2 table at {off} is missing from memory"),
                    ));
                };
                let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
                img.pwrite(&raw, off, "an L2 table")?;
            }
            img.sync()?;
            let mut cache = lock(&img.cache);
            for &off in &self.dirty_l2 {
                cache.unpin(off);
            }
            drop(cache);
            self.dirty_l2.clear();
        }
        if self.l1_dirty {
            let raw: Vec<u8> = img
                .l1
                .iter()
                .flat_map(|e| e.load(Ordering::Acquire).to_be_bytes())
                .collect();
            img.pwrite(&raw, img.header.l1_table_offset, "the L1 table")?;
            img.sync()?;
            self.l1_dirty = false;
        }
        if !self.pending_free.is_empty() {
            let cs = img.cluster_size();
            let frees = std::mem::take(&mut self.pending_free);
            for (start, len) in frees {
                let first = start / cs;
                let last = (start + len - 1) / cs;
                for c in first..=last {
                    let host = c * cs;
                    let rc = self.refcount(img, host)?;
                    if rc == 0 {
                        return Err(Qcow2Error::corrupt(
                            &img.path,
                            host,
                            format!("freeing cluster at {host}, whose refcount is already 0"),
                        ));
                    }
                    self.set_refcount(img, host, rc - 1)?;
                }
            }
            self.write_blocks(img)?;
        }
        // Clean blocks are read again when needed: memory stays bounded.
        self.blocks.clear();
        Ok(())
    }
}
