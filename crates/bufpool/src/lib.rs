//! A process-wide pool of I/O buffers. Copies move the same few hundred buffers' worth of
//! memory over and over; allocating each one fresh costs a page fault per 4 KiB touched (and
//! freshly mapped memory is slow on virtual machines). Buffers here are recycled instead: a
//! [`Buf`] is a plain mutable byte buffer, [`Buf::freeze`] turns it into [`bytes::Bytes`]
//! without copying, and when the last `Bytes` referring to it drops, the memory goes back to the
//! pool. The pool keeps at most [`MAX_CACHED`] bytes; anything beyond is freed.
//!
//! Recycled buffers are not zeroed: callers must write every byte they expose.

#![forbid(unsafe_code)]

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Smallest pooled capacity; smaller requests still get this much.
const MIN_CLASS: usize = 4 << 10;
/// Largest pooled capacity; larger buffers are allocated and freed normally.
const MAX_CLASS: usize = 64 << 20;
const CLASSES: usize = (MAX_CLASS.trailing_zeros() - MIN_CLASS.trailing_zeros() + 1) as usize;
/// Most bytes kept idle in the pool.
pub const MAX_CACHED: usize = 64 << 20;
/// Room every pooled buffer has beyond its class, so a request of a power of two plus a
/// little (an O_DIRECT buffer asks for one alignment more, to start its window at an aligned
/// address) takes its class and not the next one: 4 MiB + 4 KiB in 4 MiB + 4 KiB, not 8 MiB.
pub const SLACK: usize = 4 << 10;

struct Pool {
    free: [Mutex<Vec<Vec<u8>>>; CLASSES],
    cached: AtomicUsize,
}

static POOL: Pool = Pool {
    free: [const { Mutex::new(Vec::new()) }; CLASSES],
    cached: AtomicUsize::new(0),
};

/// The class a request of `len` bytes takes: the smallest power of two that `len` fits in
/// with the slack.
fn class_size(len: usize) -> usize {
    len.saturating_sub(SLACK).max(MIN_CLASS).next_power_of_two()
}

fn class_of(capacity: usize) -> Option<usize> {
    if !(MIN_CLASS..=MAX_CLASS).contains(&capacity) || !capacity.is_power_of_two() {
        return None;
    }
    Some((capacity.trailing_zeros() - MIN_CLASS.trailing_zeros()) as usize)
}

/// A buffer of `len` bytes from the pool (contents unspecified).
pub fn get(len: usize) -> Buf {
    let class = class_size(len);
    let recycled = class_of(class).and_then(|c| {
        let v = POOL.free[c].lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(v) = &v {
            POOL.cached.fetch_sub(v.len(), Ordering::Relaxed);
        }
        v
    });
    let vec = recycled.unwrap_or_else(|| {
        // Large exact-size buffers are not pooled, so they need not be rounded up.
        let capacity = if class > MAX_CLASS {
            len
        } else {
            class + SLACK
        };
        vec![0u8; capacity]
    });
    Buf { vec, len }
}

/// `len` zero bytes, for writing zeroes as data: shared static memory up to 1 MiB, so the
/// common case allocates nothing.
pub fn zero_bytes(len: usize) -> Bytes {
    const SHARED: usize = 1 << 20;
    static ZEROES: [u8; SHARED] = [0; SHARED];
    if len <= SHARED {
        Bytes::from_static(&ZEROES[..len])
    } else {
        Bytes::from(vec![0u8; len])
    }
}

/// A buffer of `len` zero bytes from the pool.
pub fn zeroed(len: usize) -> Buf {
    let mut b = get(len);
    b.fill(0);
    b
}

fn recycle(vec: Vec<u8>) {
    let capacity = vec.len();
    let Some(class) = capacity.checked_sub(SLACK).and_then(class_of) else {
        return;
    };
    if POOL.cached.fetch_add(capacity, Ordering::Relaxed) + capacity > MAX_CACHED {
        POOL.cached.fetch_sub(capacity, Ordering::Relaxed);
        return;
    }
    POOL.free[class]
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(vec);
}

/// A pooled buffer; returns to the pool when dropped (or when its frozen `Bytes` all drop).
#[derive(Debug, Default)]
pub struct Buf {
    /// Always at its full (pooled) length, so recycling never resizes.
    vec: Vec<u8>,
    /// The bytes in use: `vec[..len]`.
    len: usize,
}

impl Buf {
    /// Shortens the buffer to `len` bytes (no effect if it is shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Immutable, cheaply cloneable and sliceable bytes over this buffer, without copying.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.vec[..self.len]
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec[..self.len]
    }
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.vec));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_recycled_through_bytes() {
        let mut b = get(300 << 10);
        assert_eq!(b.len(), 300 << 10);
        b[0] = 42;
        let ptr = b.as_ptr();
        let bytes = b.freeze();
        let slice = bytes.slice(0..1);
        assert_eq!(slice[0], 42);
        drop(bytes);
        drop(slice);
        // The same memory comes back for the next buffer of that class (single-threaded
        // test binary section: the class list is LIFO).
        let again = get(280 << 10);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), 280 << 10);
    }

    #[test]
    fn zeroed_is_zero_even_when_recycled() {
        let mut b = get(8 << 10);
        b.fill(0xff);
        drop(b);
        assert!(zeroed(8 << 10).iter().all(|x| *x == 0));
    }

    #[test]
    fn zero_bytes_are_zero() {
        assert!(zero_bytes(100).iter().all(|b| *b == 0));
        assert_eq!(zero_bytes(3 << 20).len(), 3 << 20);
        assert!(zero_bytes(3 << 20).iter().all(|b| *b == 0));
    }

    #[test]
    fn a_class_plus_an_alignment_takes_its_class() {
        let b = get((4 << 20) + 4096);
        assert_eq!(b.len(), (4 << 20) + 4096);
        assert_eq!(b.vec.len(), (4 << 20) + SLACK, "not rounded up to 8 MiB");
        let c = get(4 << 20);
        assert_eq!(c.vec.len(), (4 << 20) + SLACK);
        let d = get((4 << 20) + SLACK + 1);
        assert_eq!(d.vec.len(), (8 << 20) + SLACK);
    }

    #[test]
    fn odd_sizes_work() {
        assert_eq!(get(0).len(), 0);
        assert_eq!(get(1).len(), 1);
        let big = get(MAX_CLASS + 1);
        assert_eq!(big.len(), MAX_CLASS + 1);
    }
}
