//! Opens the input as a qcow2 image for writing, held in bounded memory (backing files are not
//! followed): the header checks, the refcount table and blocks, L1/L2 lookups that allocate.
//! Then writes, zeroes and flushes a few ranges picked from the input's last bytes, and opens
//! what was written again, read-only.
//!
//! Must never panic, hang or allocate without bound, whatever the header and tables say; a
//! write the image cannot take is an error.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qcow2::{Image, MemoryStorage, OpenOptions};

/// The image may grow to this size in memory; a write past it fails.
const STORAGE_LIMIT: u64 = 64 << 20;
const WINDOW: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let opts = OpenOptions {
        follow_backing: false,
        l2_cache_bytes: 1 << 20,
    };
    // The last 8 bytes choose where the writes go and, two bits each, what they are. They
    // are part of the image too, which is harmless (its metadata sits at the front).
    let pick = data
        .len()
        .checked_sub(8)
        .map(|at| u64::from_le_bytes(data[at..].try_into().unwrap()))
        .unwrap_or(0);
    let storage = Arc::new(MemoryStorage::new(data.to_vec(), STORAGE_LIMIT));
    let Ok(img) = Image::from_storage_rw(Box::new(storage.clone()), "fuzz.qcow2", &opts) else {
        return;
    };
    let size = img.size();
    if size == 0 {
        return;
    }
    let buf = vec![0xa5u8; 70_000];
    let places = [
        pick % size,
        (pick >> 20) % size,
        size.saturating_sub(WINDOW),
    ];
    for (i, &start) in places.iter().enumerate() {
        let len = (buf.len() as u64).min(size - start) as usize;
        let _ = match (pick >> (40 + 2 * i)) & 3 {
            0 => img.zero(start, len as u64, false),
            1 => img.zero(start, len as u64, true),
            _ => img.write_at(&buf[..len], start),
        };
    }
    let _ = img.flush();
    drop(img);
    let written = storage.snapshot();
    if let Ok(again) = Image::from_storage(Box::new(written), "fuzz.qcow2", &opts) {
        let mut back = vec![0u8; 4096];
        let n = back.len().min(again.size() as usize);
        let _ = again.read_at(&mut back[..n], 0);
    }
});
