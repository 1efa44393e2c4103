//! Upload body frames held as they arrived, addressed as one run of the image: the frames of an
//! HTTP body have whatever sizes the socket reads gave, so writing each as it comes would send
//! the backend requests at unaligned offsets (read-modify-write on O_DIRECT storage). Gathered
//! here, they are cut at aligned offsets into requests whose payload goes out in pieces, with
//! no copy; zero detection looks across the frames' edges.

use bytes::Bytes;

/// Body frames covering `[at, at + len)` of the image, in order.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    pub at: u64,
    pub len: u64,
    pub parts: Vec<Bytes>,
}

/// A piece of a gathered run: `[at, at + len)`, all zero or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub at: u64,
    pub len: u64,
    pub zero: bool,
}

impl Gathered {
    pub fn new(at: u64) -> Self {
        Gathered {
            at,
            len: 0,
            parts: Vec::new(),
        }
    }

    pub fn end(&self) -> u64 {
        self.at + self.len
    }

    pub fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len() as u64;
            self.parts.push(data);
        }
    }

    /// Takes `[at, until)` out as a run of its own; this one keeps the rest.
    pub fn split_to(&mut self, until: u64) -> Gathered {
        let n = until.clamp(self.at, self.end()) - self.at;
        let mut head = Gathered::new(self.at);
        let mut rest = std::mem::take(&mut self.parts).into_iter();
        while head.len < n {
            let mut part = rest.next().expect("parts cover len");
            let want = (n - head.len) as usize;
            if part.len() > want {
                self.parts.push(part.split_off(want));
            }
            head.push(part);
        }
        self.parts.extend(rest);
        self.at += n;
        self.len -= n;
        head
    }

    /// The pieces of the parts covering `[from, from + len)`, which must lie inside the run.
    pub fn slice(&self, from: u64, len: u64) -> Vec<Bytes> {
        let mut out = Vec::new();
        let (mut pos, end) = (self.at, from + len);
        for part in &self.parts {
            let part_end = pos + part.len() as u64;
            if part_end > from && pos < end {
                let a = (from.max(pos) - pos) as usize;
                let b = (end.min(part_end) - pos) as usize;
                out.push(part.slice(a..b));
            }
            if part_end >= end {
                break;
            }
            pos = part_end;
        }
        out
    }

    fn is_zero(&self, from: u64, len: u64) -> bool {
        self.slice(from, len)
            .iter()
            .all(|p| disk::sparse::is_zero(p))
    }

    /// Splits the run into data and zero pieces: zero pieces are whole `block`-sized blocks at
    /// multiples of `block` (0: no zero detection); neighbours of a kind are merged.
    pub fn pieces(&self, block: u64) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        let mut add = |at: u64, len: u64, zero: bool| match out.last_mut() {
            Some(last) if last.zero == zero => last.len += len,
            _ => out.push(Piece { at, len, zero }),
        };
        let end = self.end();
        if block == 0 {
            if self.len > 0 {
                add(self.at, self.len, false);
            }
            return out;
        }
        let mut pos = self.at;
        while pos < end {
            let next = ((pos / block + 1) * block).min(end);
            let whole = pos.is_multiple_of(block) && next - pos == block;
            let zero = whole && self.is_zero(pos, block);
            add(pos, next - pos, zero);
            pos = next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(at: u64, frames: &[&[u8]]) -> Gathered {
        let mut g = Gathered::new(at);
        for f in frames {
            g.push(Bytes::copy_from_slice(f));
        }
        g
    }

    fn flat(parts: &[Bytes]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.iter().copied()).collect()
    }

    #[test]
    fn split_to_cuts_inside_a_part_and_keeps_the_rest_in_order() {
        let mut g = run(10, &[b"abc", b"defgh", b"ij"]);
        let head = g.split_to(15);
        assert_eq!((head.at, head.len), (10, 5));
        assert_eq!(flat(&head.parts), b"abcde");
        assert_eq!((g.at, g.len), (15, 5));
        assert_eq!(flat(&g.parts), b"fghij");
        // Past the end takes everything; before the start takes nothing.
        let none = g.split_to(3);
        assert_eq!((none.len, g.len), (0, 5));
        let all = g.split_to(100);
        assert_eq!(flat(&all.parts), b"fghij");
        assert_eq!((g.at, g.len, g.parts.len()), (20, 0, 0));
    }

    #[test]
    fn slice_picks_the_bytes_across_parts() {
        let g = run(100, &[b"0123", b"45", b"6789"]);
        assert_eq!(flat(&g.slice(103, 5)), b"34567");
        assert_eq!(flat(&g.slice(100, 10)), b"0123456789");
        assert_eq!(flat(&g.slice(104, 2)), b"45");
        assert_eq!(g.slice(104, 2).len(), 1);
    }

    #[test]
    fn zero_blocks_are_found_across_frame_edges_and_only_whole() {
        // Blocks of 4 at offset 2: [2,4) head, [4,8) zero across two frames, [8,12) data,
        // [12,16) zero, [16,18) a zero tail that is not a whole block.
        let mut bytes = [0u8; 16];
        bytes[0] = 1; // offset 2: data head
        bytes[7] = 9; // offset 9: data block
        let g = run(2, &[&bytes[..4], &bytes[4..11], &bytes[11..]]);
        let got = g.pieces(4);
        assert_eq!(
            got,
            vec![
                Piece {
                    at: 2,
                    len: 2,
                    zero: false
                },
                Piece {
                    at: 4,
                    len: 4,
                    zero: true
                },
                Piece {
                    at: 8,
                    len: 4,
                    zero: false
                },
                Piece {
                    at: 12,
                    len: 4,
                    zero: true
                },
                Piece {
                    at: 16,
                    len: 2,
                    zero: false
                },
            ]
        );
        assert_eq!(
            g.pieces(0),
            vec![Piece {
                at: 2,
                len: 16,
                zero: false
            }]
        );
    }
}
