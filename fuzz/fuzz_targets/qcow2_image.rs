//! Opens the input as a qcow2 image held in memory (backing files are not followed), maps its
//! extents, reads a few ranges of the guest view and its dirty bitmaps.
//!
//! Must never panic, hang or allocate without bound, whatever the header and tables say.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2::{Image, OpenOptions};

/// Windows kept small so one input cannot make a run slow by claiming a huge virtual size.
const WINDOW: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let opts = OpenOptions {
        follow_backing: false,
        l2_cache_bytes: 1 << 20,
    };
    let Ok(img) = Image::from_storage(Box::new(data.to_vec()), "fuzz.qcow2", &opts) else {
        return;
    };
    let size = img.size();
    let mut buf = vec![0u8; 65536];
    for start in [0, size / 2, size.saturating_sub(WINDOW)] {
        let len = WINDOW.min(size - start);
        if let Ok(extents) = img.extents(start, len) {
            let covered: u64 = extents.iter().map(|e| e.length).sum();
            assert_eq!(covered, len, "extents must cover the range exactly");
        }
        let n = buf.len().min(len as usize);
        let _ = img.read_at(&mut buf[..n], start);
    }
    if let Ok(bitmaps) = img.bitmaps() {
        for b in bitmaps.iter().take(4) {
            let _ = img.bitmap_dirty(&b.name, 0, WINDOW.min(size));
        }
    }
});
