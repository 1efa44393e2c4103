//! Sample disk images for tests: the `sample` crate's layouts, written with a panic instead of
//! an error, and converted to qcow2.

use std::path::Path;

pub use sample::{Layout, Segment, fill_pseudo_random, pseudo_random};

/// Writes a raw image at `path` following `layout`: data and zero runs are written, holes are
/// left unwritten. Returns the image size. Panics on I/O errors (this is a test helper).
pub fn make_sparse_image(path: &Path, layout: &Layout) -> u64 {
    sample::write_image(path, layout).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()))
}

/// Converts a raw image to qcow2 with `qemu-img convert` (zero runs become unallocated
/// clusters). Panics if qemu-img fails.
pub fn convert_to_qcow2(raw: &Path, qcow2: &Path) {
    crate::tools::run(
        std::process::Command::new(crate::require_binary("qemu-img"))
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(qcow2),
    );
}
