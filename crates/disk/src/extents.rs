//! The shared extent vocabulary: what each range of an image holds.
//!
//! Every endpoint (local files, block devices, NBD) describes its contents as a list of
//! [`Extent`]s, and the copy engine plans its work from them. This module owns that type and
//! the pure list operations on it ([`merge_adjacent`], [`clip`]).
//!
//! It does no I/O, and its operations must never invent or lose information: afterwards every
//! byte carries exactly the flags it carried before, and bytes that were not described stay
//! undescribed. In particular nothing here may turn a data range into a zero or hole range,
//! since that would make a copy silently drop data.

/// What a range of an image holds, as far as its source can tell.
///
/// The range is `[offset, offset + length)`. The two flags are reported independently by the
/// source:
///
/// - `zero`: the range reads as zeros, so a copy may skip reading it.
/// - `hole`: the range is not allocated in the source. A hole is usually also `zero`, but a
///   source may report `hole` without `zero` (NBD allows it); only `zero` licenses skipping.
///
/// A data range has both flags clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte of the range.
    pub offset: u64,
    /// Number of bytes in the range.
    pub length: u64,
    /// The range reads as zeros.
    pub zero: bool,
    /// The range is not allocated.
    pub hole: bool,
}

impl Extent {
    /// An allocated range holding data (`zero` and `hole` clear).
    pub const fn data(offset: u64, length: u64) -> Self {
        Self {
            offset,
            length,
            zero: false,
            hole: false,
        }
    }

    /// An unallocated range that reads as zeros (`zero` and `hole` set).
    pub const fn hole(offset: u64, length: u64) -> Self {
        Self {
            offset,
            length,
            zero: true,
            hole: true,
        }
    }

    /// One past the last byte of the range (saturating at `u64::MAX`).
    pub const fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    fn same_flags(&self, other: &Self) -> bool {
        self.zero == other.zero && self.hole == other.hole
    }
}

/// Merges neighbouring extents that touch (`a.end() == b.offset`) and have equal flags, and
/// drops empty extents.
///
/// Extents are merged in the order given; the list is expected to be sorted by offset and
/// non-overlapping. Neighbours separated by a gap, or with different flags, are kept apart,
/// so the flags of every byte are unchanged.
pub fn merge_adjacent(extents: &mut Vec<Extent>) {
    extents.retain(|e| e.length > 0);
    // `dedup_by` hands us the current element and the last one kept; returning true drops
    // the current one, after we have grown the kept one over it.
    extents.dedup_by(|next, kept| {
        let mergeable = kept.end() == next.offset && kept.same_flags(next);
        if mergeable {
            kept.length = kept.length.saturating_add(next.length);
        }
        mergeable
    });
}

/// Returns the parts of `extents` that fall inside `[offset, offset + length)`, trimmed to
/// that range, in the order given. Empty intersections are left out; nothing is merged.
///
/// If `extents` covers the range contiguously, the result covers exactly the range; gaps in
/// the input stay gaps in the output. `offset + length` saturates at `u64::MAX`.
pub fn clip(extents: &[Extent], offset: u64, length: u64) -> Vec<Extent> {
    let end = offset.saturating_add(length);
    extents
        .iter()
        .filter_map(|e| {
            let start = e.offset.max(offset);
            let stop = e.end().min(end);
            // Lazily: `stop - start` underflows when the intersection is empty.
            (start < stop).then(|| Extent {
                offset: start,
                length: stop - start,
                ..*e
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Flags of byte `b`: those of the first extent containing it, `None` if none does.
    fn flags_at(extents: &[Extent], b: u64) -> Option<(bool, bool)> {
        extents
            .iter()
            .find(|e| e.offset <= b && b < e.end())
            .map(|e| (e.zero, e.hole))
    }

    /// Sorted, non-overlapping extents (some empty) starting at `start`; gaps only if `gaps`.
    fn extents_strategy(gaps: bool) -> impl Strategy<Value = Vec<Extent>> {
        let gap = if gaps {
            prop_oneof![3 => Just(0u64), 1 => 1..5u64].boxed()
        } else {
            Just(0u64).boxed()
        };
        (
            0..100u64,
            prop::collection::vec((gap, 0..20u64, any::<bool>(), any::<bool>()), 0..20),
        )
            .prop_map(|(start, pieces)| {
                let mut pos = start;
                let mut out = Vec::new();
                for (gap, length, zero, hole) in pieces {
                    pos += gap;
                    out.push(Extent {
                        offset: pos,
                        length,
                        zero,
                        hole,
                    });
                    pos += length;
                }
                out
            })
    }

    fn span(extents: &[Extent]) -> (u64, u64) {
        let start = extents.first().map_or(0, |e| e.offset);
        let end = extents.last().map_or(0, Extent::end);
        (start, end)
    }

    proptest! {
        #[test]
        fn merge_preserves_flags_per_byte(input in extents_strategy(true)) {
            let mut merged = input.clone();
            merge_adjacent(&mut merged);
            let (start, end) = span(&input);
            // One byte either side too: merging must not grow the covered range.
            for b in start.saturating_sub(1)..=end {
                prop_assert_eq!(flags_at(&input, b), flags_at(&merged, b), "byte {}", b);
            }
        }

        #[test]
        fn merge_is_maximal(input in extents_strategy(true)) {
            let mut merged = input;
            merge_adjacent(&mut merged);
            prop_assert!(merged.iter().all(|e| e.length > 0));
            for pair in merged.windows(2) {
                prop_assert!(pair[0].end() <= pair[1].offset, "unsorted: {:?}", pair);
                prop_assert!(
                    pair[0].end() < pair[1].offset || !pair[0].same_flags(&pair[1]),
                    "left unmerged: {:?}", pair
                );
            }
        }

        #[test]
        fn clip_yields_exactly_the_covered_range(
            input in extents_strategy(false),
            offset in 0..500u64,
            length in 0..300u64,
        ) {
            let clipped = clip(&input, offset, length);
            let (start, end) = span(&input);
            let lo = start.max(offset);
            let hi = end.min(offset + length);
            let mut pos = lo;
            for e in &clipped {
                prop_assert_eq!(e.offset, pos, "not contiguous: {:?}", clipped);
                prop_assert!(e.length > 0);
                pos = e.end();
            }
            prop_assert_eq!(pos, hi.max(lo), "does not end at the range end: {:?}", clipped);
        }

        #[test]
        fn clip_preserves_flags_inside_and_nothing_outside(
            input in extents_strategy(true),
            offset in 0..500u64,
            length in 0..300u64,
        ) {
            let clipped = clip(&input, offset, length);
            let (_, end) = span(&input);
            for b in 0..=end.max(offset + length) {
                let inside = offset <= b && b < offset + length;
                let want = if inside { flags_at(&input, b) } else { None };
                prop_assert_eq!(flags_at(&clipped, b), want, "byte {}", b);
            }
        }
    }

    #[test]
    fn merge_examples() {
        let mut v = vec![
            Extent::data(0, 10),
            Extent::data(10, 5),
            Extent::hole(15, 0),
            Extent::data(15, 5),
            Extent::hole(20, 4),
            Extent::data(30, 2),
            Extent::data(32, 2),
        ];
        merge_adjacent(&mut v);
        assert_eq!(
            v,
            vec![
                Extent::data(0, 20),
                Extent::hole(20, 4),
                Extent::data(30, 4)
            ]
        );
    }

    #[test]
    fn merge_keeps_zero_apart_from_hole() {
        let zero_only = Extent {
            offset: 4,
            length: 4,
            zero: true,
            hole: false,
        };
        let mut v = vec![Extent::hole(0, 4), zero_only];
        merge_adjacent(&mut v);
        assert_eq!(v, vec![Extent::hole(0, 4), zero_only]);
    }

    #[test]
    fn clip_examples() {
        let v = [
            Extent::data(0, 10),
            Extent::hole(10, 10),
            Extent::data(20, 10),
        ];
        assert_eq!(
            clip(&v, 5, 10),
            vec![Extent::data(5, 5), Extent::hole(10, 5)]
        );
        assert_eq!(clip(&v, 10, 10), vec![Extent::hole(10, 10)]);
        assert_eq!(clip(&v, 25, u64::MAX), vec![Extent::data(25, 5)]);
        assert_eq!(clip(&v, 12, 0), vec![]);
        assert_eq!(clip(&v, 30, 5), vec![]);
    }
}
