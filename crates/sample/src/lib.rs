//! Sample disk images with a known layout: runs of deterministic pseudo-random data, runs of
//! zeros written as data (allocated), and holes (never written, so the file system keeps them
//! sparse). The expected contents come from the layout, so whoever reads the image back can
//! check it without trusting the file system or a server. `ferry demo` builds its image here,
//! and so do the tests.

#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One run of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes of [`pseudo_random`] data from `seed`.
    Data { len: u64, seed: u64 },
    /// `len` zero bytes written as data: allocated, reads as zero.
    Zero(u64),
    /// `len` bytes never written: a hole in the file.
    Hole(u64),
}

impl Segment {
    pub fn len(&self) -> u64 {
        match *self {
            Segment::Data { len, .. } | Segment::Zero(len) | Segment::Hole(len) => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The layout of a sample image, built run by run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    segments: Vec<Segment>,
}

impl Layout {
    pub fn new() -> Self {
        Layout::default()
    }

    pub fn data(mut self, len: u64, seed: u64) -> Self {
        self.segments.push(Segment::Data { len, seed });
        self
    }

    pub fn zero(mut self, len: u64) -> Self {
        self.segments.push(Segment::Zero(len));
        self
    }

    pub fn hole(mut self, len: u64) -> Self {
        self.segments.push(Segment::Hole(len));
        self
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn size(&self) -> u64 {
        self.segments.iter().map(Segment::len).sum()
    }

    /// A reproducible mixed layout of `size` bytes: runs of 64 KiB to 8 MiB, about half
    /// pseudo-random data, a quarter zeroes written as data, a quarter holes.
    pub fn random(seed: u64, size: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut layout = Layout::new();
        while layout.size() < size {
            let len = ((64 << 10) << (rng.next() % 8)).min(size - layout.size());
            layout = match rng.next() % 4 {
                0 | 1 => layout.data(len, rng.next()),
                2 => layout.zero(len),
                _ => layout.hole(len),
            };
        }
        layout
    }

    /// Each segment with its offset.
    pub fn placed(&self) -> impl Iterator<Item = (u64, Segment)> + '_ {
        let mut offset = 0;
        self.segments.iter().map(move |s| {
            let at = offset;
            offset += s.len();
            (at, *s)
        })
    }

    /// The bytes the whole image holds.
    pub fn expected(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size() as usize];
        for (offset, segment) in self.placed() {
            if let Segment::Data { len, seed } = segment {
                let at = offset as usize;
                fill_pseudo_random(seed, &mut out[at..at + len as usize]);
            }
        }
        out
    }

    /// Ranges written to the file (data and explicit zeros), as (offset, length).
    pub fn allocated(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (offset, segment) in self.placed() {
            if matches!(segment, Segment::Hole(_)) || segment.is_empty() {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 == offset => last.1 += segment.len(),
                _ => out.push((offset, segment.len())),
            }
        }
        out
    }
}

/// `len` pseudo-random bytes from `seed` (xorshift64*): the same seed gives the same bytes.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill_pseudo_random(seed, &mut out);
    out
}

/// Fills `buf` like [`pseudo_random`].
pub fn fill_pseudo_random(seed: u64, buf: &mut [u8]) {
    let mut rng = Rng::new(seed);
    for chunk in buf.chunks_mut(8) {
        let word = rng.next().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// xorshift64*: fast, deterministic, and good enough that no block repeats or compresses.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Mix the seed so that small seeds do not start with long runs of small numbers;
        // xorshift must never hold 0.
        let state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
        Rng(if state == 0 { 1 } else { state })
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Writes a raw image at `path` following `layout`: data and zero runs are written, holes are
/// left unwritten. Returns the image size.
pub fn write_image(path: &Path, layout: &Layout) -> std::io::Result<u64> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let size = layout.size();
    file.set_len(size)?;
    const PIECE: u64 = 4 << 20;
    for (offset, segment) in layout.placed() {
        let bytes = match segment {
            Segment::Hole(_) => continue,
            Segment::Zero(len) => vec![0u8; len.min(PIECE) as usize],
            Segment::Data { len, seed } => pseudo_random(seed, len as usize),
        };
        let mut done = 0;
        while done < segment.len() {
            let n = (segment.len() - done).min(bytes.len() as u64);
            let piece = match segment {
                Segment::Data { .. } => &bytes[done as usize..(done + n) as usize],
                _ => &bytes[..n as usize],
            };
            file.write_all_at(piece, offset + done)?;
            done += n;
        }
    }
    file.sync_all()?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_random_is_deterministic_and_seed_dependent() {
        assert_eq!(pseudo_random(7, 100), pseudo_random(7, 100));
        assert_ne!(pseudo_random(7, 100), pseudo_random(8, 100));
        assert_eq!(&pseudo_random(7, 100)[..37], &pseudo_random(7, 37)[..]);
        assert!(pseudo_random(0, 64).iter().any(|b| *b != 0));
    }

    #[test]
    fn image_matches_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        let layout = Layout::new()
            .data(5000, 1)
            .hole(1 << 20)
            .zero(4096)
            .data(3, 2)
            .hole(10);
        assert_eq!(write_image(&path, &layout).unwrap(), layout.size());
        assert_eq!(std::fs::read(&path).unwrap(), layout.expected());
        assert_eq!(
            layout.allocated(),
            vec![(0, 5000), (5000 + (1 << 20), 4099)]
        );
        // The hole really is a hole: far fewer blocks than the apparent size.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(blocks < 512 * 1024, "{blocks} bytes allocated");
    }

    #[test]
    fn random_layouts_are_reproducible_and_mixed() {
        let size = 64 << 20;
        let a = Layout::random(42, size);
        assert_eq!(a, Layout::random(42, size));
        assert_ne!(a, Layout::random(43, size));
        assert_eq!(a.size(), size);
        let kinds = |f: fn(&Segment) -> bool| a.segments().iter().filter(|s| f(s)).count();
        assert!(kinds(|s| matches!(s, Segment::Data { .. })) > 0);
        assert!(kinds(|s| matches!(s, Segment::Zero(_))) > 0);
        assert!(kinds(|s| matches!(s, Segment::Hole(_))) > 0);
    }
}
