//! O_DIRECT's alignment rule, in one place: buffers, offsets and lengths must all be multiples
//! of [`DIRECT_ALIGN`]. File endpoints check I/O against it and pick aligned windows in pooled
//! buffers; `ferry serve` fills its upload chunks in such windows so a direct-I/O backend
//! writes them without another copy.

/// Alignment O_DIRECT needs for buffers, offsets and lengths on common devices.
pub const DIRECT_ALIGN: usize = 4096;

/// True when `offset` and `len` are multiples of [`DIRECT_ALIGN`].
pub fn is_aligned_range(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN)
}

/// True when I/O of `len` bytes at `offset` from memory at `ptr` may go through O_DIRECT.
pub fn is_aligned(offset: u64, len: usize, ptr: *const u8) -> bool {
    is_aligned_range(offset, len) && (ptr as usize).is_multiple_of(DIRECT_ALIGN)
}

/// A pooled buffer holding a window of `len` bytes that starts at an aligned address, and
/// where that window starts.
pub fn aligned_buf(len: usize) -> (bufpool::Buf, usize) {
    let buf = bufpool::get(len + DIRECT_ALIGN);
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    (buf, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_start_aligned_and_fit() {
        for len in [0, 1, 4096, 65536 + 17] {
            let (buf, start) = aligned_buf(len);
            assert!(start < DIRECT_ALIGN);
            assert!(start + len <= buf.len());
            assert!(is_aligned(0, 0, buf[start..].as_ptr()));
        }
        assert!(is_aligned_range(8192, 4096));
        assert!(!is_aligned_range(512, 4096));
        assert!(!is_aligned_range(4096, 512));
    }
}
