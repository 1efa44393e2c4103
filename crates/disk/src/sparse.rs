//! Zero detection in data just read: splits a buffer into runs of data and runs of all-zero
//! blocks, so zero blocks can be zeroed (or skipped) on the destination instead of written.

/// True if every byte is zero. Compares the buffer with itself shifted by 16 bytes after checking
/// the first 16, which turns the scan into one `memcmp` (vectorised by the C library).
pub fn is_zero(buf: &[u8]) -> bool {
    const HEAD: usize = 16;
    if buf.len() <= HEAD {
        return buf.iter().all(|b| *b == 0);
    }
    buf[..HEAD].iter().all(|b| *b == 0) && buf[HEAD..] == buf[..buf.len() - HEAD]
}

/// A piece of a buffer: `[start, start+len)` relative to the buffer, data or zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub start: usize,
    pub len: usize,
    pub zero: bool,
}

/// Splits `buf`, which starts at image offset `offset`, into data and zero pieces. Zero pieces
/// consist of whole `block`-sized blocks aligned to absolute image offsets; unaligned head and
/// tail bytes always count as data. Neighbouring pieces of the same kind are merged.
pub fn split(buf: &[u8], offset: u64, block: usize) -> Vec<Piece> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut push = |start: usize, len: usize, zero: bool| {
        if len == 0 {
            return;
        }
        match pieces.last_mut() {
            Some(p) if p.zero == zero && p.start + p.len == start => p.len += len,
            _ => pieces.push(Piece { start, len, zero }),
        }
    };
    if block == 0 || buf.len() < block {
        push(0, buf.len(), false);
        return pieces;
    }
    let misalign = (offset % block as u64) as usize;
    let head = if misalign == 0 { 0 } else { block - misalign }.min(buf.len());
    push(0, head, false);
    let mut pos = head;
    while pos + block <= buf.len() {
        push(pos, block, is_zero(&buf[pos..pos + block]));
        pos += block;
    }
    push(pos, buf.len() - pos, false);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn detects_zero_and_nonzero() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        let mut b = vec![0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn splits_on_aligned_blocks() {
        let mut buf = vec![0u8; 16];
        buf[5] = 1; // block [4, 8) is data
        let p = split(&buf, 0, 4);
        assert_eq!(
            p,
            vec![
                Piece {
                    start: 0,
                    len: 4,
                    zero: true
                },
                Piece {
                    start: 4,
                    len: 4,
                    zero: false
                },
                Piece {
                    start: 8,
                    len: 8,
                    zero: true
                },
            ]
        );
        // Misaligned start: the 2 head bytes are data even though zero.
        let p = split(&[0u8; 10], 2, 4);
        assert_eq!(
            p,
            vec![
                Piece {
                    start: 0,
                    len: 2,
                    zero: false
                },
                Piece {
                    start: 2,
                    len: 8,
                    zero: true
                },
            ]
        );
    }

    proptest! {
        #[test]
        fn pieces_cover_buffer_and_zero_pieces_are_zero(
            data in proptest::collection::vec(prop_oneof![3 => Just(0u8), 1 => any::<u8>()], 0..300),
            offset in 0u64..64,
            block in prop_oneof![Just(0usize), Just(1), Just(4), Just(16), Just(64)],
        ) {
            let pieces = split(&data, offset, block);
            let mut pos = 0;
            for p in &pieces {
                prop_assert_eq!(p.start, pos);
                prop_assert!(p.len > 0);
                if p.zero {
                    prop_assert!(is_zero(&data[p.start..p.start + p.len]));
                    prop_assert_eq!((offset + p.start as u64) % block as u64, 0);
                    prop_assert_eq!(p.len % block, 0);
                }
                pos += p.len;
            }
            prop_assert_eq!(pos, data.len());
        }
    }
}
