//! Persistent dirty bitmaps (qcow2 spec, "Bitmaps"): the directory and the dirty ranges.

use crate::Image;
use crate::error::{ErrorKind, Qcow2Error, Result};
use crate::header::{AUTOCLEAR_BITMAPS, read_exact};

/// Caps taken from qemu's own limits, so a hostile directory cannot ask for much memory.
const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
const MAX_TABLE_ENTRIES: u32 = 1 << 22;
const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const TYPE_DIRTY_TRACKING: u8 = 1;
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A persistent dirty bitmap, as listed in the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// Raw flags word of the directory entry.
    pub flags: u32,
    /// Left set by a writer that did not close the image cleanly: the bits cannot be trusted.
    pub in_use: bool,
    /// Tracks guest writes while the image is in use (qemu enables it on open).
    pub auto: bool,
    table_offset: u64,
    table_size: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Image {
    /// The persistent dirty bitmaps. Empty when the image has none, or when its bitmaps were
    /// made stale by a writer that does not know them (autoclear bit cleared).
    pub fn bitmaps(&self) -> Result<Vec<Bitmap>> {
        let Some(ext) = self.header.bitmaps else {
            return Ok(Vec::new());
        };
        if self.header.autoclear & AUTOCLEAR_BITMAPS == 0 {
            return Ok(Vec::new());
        }
        let path = &self.path;
        if ext.nb_bitmaps > MAX_BITMAPS || ext.directory_size > MAX_DIRECTORY_BYTES {
            return Err(Qcow2Error::corrupt(
                path,
                ext.directory_offset,
                format!(
                    "bitmap directory of {} bitmaps, {} bytes, exceeds the limits",
                    ext.nb_bitmaps, ext.directory_size
                ),
            ));
        }
        if ext.directory_offset % self.cluster_size() != 0
            || ext.directory_offset < self.cluster_size()
            || ext
                .directory_offset
                .checked_add(ext.directory_size)
                .is_none_or(|e| e > self.file_len())
        {
            return Err(Qcow2Error::corrupt(
                path,
                ext.directory_offset,
                "bitmap directory is misaligned or outside the file",
            ));
        }
        let mut dir = vec![0u8; ext.directory_size as usize];
        read_exact(
            path,
            self.storage.as_ref(),
            &mut dir,
            ext.directory_offset,
            "the bitmap directory",
        )?;
        let mut list = Vec::new();
        let mut pos = 0usize;
        for _ in 0..ext.nb_bitmaps {
            let at = ext.directory_offset + pos as u64;
            if dir.len() - pos < 24 {
                return Err(Qcow2Error::corrupt(
                    path,
                    at,
                    "bitmap directory entry is truncated",
                ));
            }
            let e = &dir[pos..];
            let mut off = [0u8; 8];
            off.copy_from_slice(&e[..8]);
            let table_offset = u64::from_be_bytes(off);
            let table_size = be32(e, 8);
            let flags = be32(e, 12);
            let ty = e[16];
            let granularity_bits = e[17];
            let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
            let extra = be32(e, 20) as usize;
            let entry_len = (24 + extra + name_size).div_ceil(8) * 8;
            if entry_len > dir.len() - pos {
                return Err(Qcow2Error::corrupt(
                    path,
                    at,
                    "bitmap directory entry runs past the directory",
                ));
            }
            let name_at = 24 + extra;
            let name = String::from_utf8_lossy(&e[name_at..name_at + name_size]).into_owned();
            if ty != TYPE_DIRTY_TRACKING {
                return Err(Qcow2Error::corrupt(
                    path,
                    at,
                    format!("bitmap '{name}' has unknown type {ty}"),
                ));
            }
            if !(9..=31).contains(&granularity_bits) {
                return Err(Qcow2Error::corrupt(
                    path,
                    at,
                    format!(
                        "bitmap '{name}' has granularity bits {granularity_bits} outside 9..=31"
                    ),
                ));
            }
            list.push(Bitmap {
                name,
                granularity: 1 << granularity_bits,
                flags,
                in_use: flags & FLAG_IN_USE != 0,
                auto: flags & FLAG_AUTO != 0,
                table_offset,
                table_size,
            });
            pos += entry_len;
        }
        Ok(list)
    }

    /// The dirty ranges of bitmap `name` within `[offset, offset+len)`, as (offset, length)
    /// pairs in order, adjacent ones merged.
    pub fn bitmap_dirty(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.check_range(offset, len)?;
        let path = &self.path;
        let Some(bm) = self.bitmaps()?.into_iter().find(|b| b.name == name) else {
            return Err(Qcow2Error::new(
                path,
                ErrorKind::InvalidArgument,
                format!("no persistent bitmap named '{name}'"),
            ));
        };
        if bm.in_use {
            return Err(Qcow2Error::new(
                path,
                ErrorKind::Corrupt,
                format!(
                    "bitmap '{name}' is in use: the image was not closed cleanly, its bits cannot be trusted"
                ),
            ));
        }
        let cluster_size = self.cluster_size();
        let bits_per_cluster = cluster_size * 8;
        let per_entry = bm.granularity * bits_per_cluster;
        let needed = self.size().div_ceil(per_entry);
        if bm.table_size > MAX_TABLE_ENTRIES
            || u64::from(bm.table_size) < needed
            || bm.table_offset % cluster_size != 0
            || bm.table_offset < cluster_size
            || bm
                .table_offset
                .checked_add(u64::from(bm.table_size) * 8)
                .is_none_or(|e| e > self.file_len())
        {
            return Err(Qcow2Error::corrupt(
                path,
                bm.table_offset,
                format!(
                    "bitmap '{name}' table of {} entries is invalid for this image",
                    bm.table_size
                ),
            ));
        }
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        if len == 0 {
            return Ok(ranges);
        }
        let end = offset + len;
        let mut push = |start: u64, stop: u64| {
            let (s, e) = (start.max(offset), stop.min(end));
            if s >= e {
                return;
            }
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += e - s,
                _ => ranges.push((s, e - s)),
            }
        };
        let first_entry = offset / per_entry;
        let last_entry = (end - 1) / per_entry;
        let mut data = vec![0u8; cluster_size as usize];
        for i in first_entry..=last_entry {
            let entry_at = bm.table_offset + i * 8;
            let mut raw = [0u8; 8];
            read_exact(
                path,
                self.storage.as_ref(),
                &mut raw,
                entry_at,
                "a bitmap table entry",
            )?;
            let entry = u64::from_be_bytes(raw);
            let base = i * per_entry;
            let data_off = entry & ENTRY_OFFSET_MASK;
            if data_off == 0 {
                if entry & 1 != 0 {
                    push(base, base + per_entry);
                }
                continue;
            }
            if !data_off.is_multiple_of(cluster_size)
                || data_off
                    .checked_add(cluster_size)
                    .is_none_or(|e| e > self.file_len())
            {
                return Err(Qcow2Error::corrupt(
                    path,
                    entry_at,
                    format!(
                        "bitmap '{name}' data cluster at {data_off} is misaligned or past the end of the file"
                    ),
                ));
            }
            read_exact(
                path,
                self.storage.as_ref(),
                &mut data,
                data_off,
                "bitmap data",
            )?;
            // Only the bits that cover the asked range.
            let lo_bit = offset.saturating_sub(base) / bm.granularity;
            let hi_bit = ((end - base).min(per_entry)).div_ceil(bm.granularity);
            let mut bit = lo_bit;
            while bit < hi_bit {
                let byte = data[(bit / 8) as usize];
                if byte == 0 && bit.is_multiple_of(8) {
                    bit += 8;
                    continue;
                }
                if byte & (1 << (bit % 8)) != 0 {
                    let start = base + bit * bm.granularity;
                    push(start, start + bm.granularity);
                }
                bit += 1;
            }
        }
        Ok(ranges)
    }
}
