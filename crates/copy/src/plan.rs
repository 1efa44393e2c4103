//! Planning one work range: the source's extents become an ordered list of reads (data, split
//! at request-size boundaries) and zero runs (coalesced), and the destination's own zero extents
//! tell which zero runs need no work at all. Pure functions, tested by properties.

use disk::Extent;

/// One step of a work range, in offset order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Read { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

impl Step {
    pub fn offset(&self) -> u64 {
        match self {
            Step::Read { offset, .. } | Step::Zero { offset, .. } => *offset,
        }
    }

    pub fn length(&self) -> u64 {
        match self {
            Step::Read { len, .. } | Step::Zero { len, .. } => *len,
        }
    }
}

/// Plans [start, end) from `extents` (which must cover it exactly, in order). Zero extents
/// merge into one zero step; parts of a zero run not aligned to `zero_align` are read as data
/// instead, since the destination could not zero them. Data is read in pieces that end on
/// multiples of `request` (absolute offsets), so reads stay aligned after an odd extent.
pub fn plan(extents: &[Extent], start: u64, end: u64, request: u64, zero_align: u64) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut data_from: Option<u64> = None;
    let flush_data = |steps: &mut Vec<Step>, from: &mut Option<u64>, to: u64| {
        if let Some(mut pos) = from.take() {
            while pos < to {
                let boundary = (pos / request + 1) * request;
                let len = boundary.min(to) - pos;
                steps.push(Step::Read { offset: pos, len });
                pos += len;
            }
        }
    };
    let mut i = 0;
    while i < extents.len() {
        let e = extents[i];
        let (e_start, e_end) = (e.offset.max(start), e.end().min(end));
        if e_start >= e_end {
            i += 1;
            continue;
        }
        if !e.zero {
            data_from.get_or_insert(e_start);
            i += 1;
            continue;
        }
        // Coalesce a run of zero extents.
        let mut z_end = e_end;
        let mut j = i + 1;
        while j < extents.len() && extents[j].zero && extents[j].offset == z_end {
            z_end = extents[j].end().min(end);
            j += 1;
        }
        let aligned_start = e_start.div_ceil(zero_align) * zero_align;
        let aligned_end = z_end / zero_align * zero_align;
        if aligned_start < aligned_end {
            if aligned_start > e_start {
                data_from.get_or_insert(e_start);
            }
            flush_data(&mut steps, &mut data_from, aligned_start);
            steps.push(Step::Zero {
                offset: aligned_start,
                len: aligned_end - aligned_start,
            });
            if aligned_end < z_end {
                data_from = Some(aligned_end);
            }
        } else {
            data_from.get_or_insert(e_start);
        }
        i = j;
    }
    flush_data(&mut steps, &mut data_from, end);
    steps
}

/// The parts of [offset, offset+len) that `dst_extents` do not already show as zero.
pub fn needs_zeroing(offset: u64, len: u64, dst_extents: &[Extent]) -> Vec<(u64, u64)> {
    let end = offset + len;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = offset;
    for e in dst_extents.iter().filter(|e| e.zero) {
        let (z_start, z_end) = (e.offset.max(pos), e.end().min(end));
        if z_start >= z_end {
            continue;
        }
        if z_start > pos {
            out.push((pos, z_start - pos));
        }
        pos = z_end;
    }
    if pos < end {
        out.push((pos, end - pos));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(o: u64, l: u64) -> Extent {
        Extent::data(o, l)
    }
    fn hole(o: u64, l: u64) -> Extent {
        Extent::hole(o, l)
    }

    #[test]
    fn reads_split_at_request_boundaries_and_zeroes_coalesce() {
        let ext = [data(0, 10), hole(10, 6), hole(16, 16), data(32, 40)];
        let steps = plan(&ext, 0, 72, 16, 1);
        assert_eq!(
            steps,
            vec![
                Step::Read { offset: 0, len: 10 },
                Step::Zero {
                    offset: 10,
                    len: 22
                },
                Step::Read {
                    offset: 32,
                    len: 16
                },
                Step::Read {
                    offset: 48,
                    len: 16
                },
                Step::Read { offset: 64, len: 8 },
            ]
        );
    }

    #[test]
    fn unaligned_zero_edges_are_read() {
        let ext = [data(0, 3), hole(3, 10), data(13, 3)];
        let steps = plan(&ext, 0, 16, 64, 4);
        assert_eq!(
            steps,
            vec![
                Step::Read { offset: 0, len: 4 },
                Step::Zero { offset: 4, len: 8 },
                Step::Read { offset: 12, len: 4 },
            ]
        );
    }

    #[test]
    fn destination_zeroes_are_subtracted() {
        let dst = [data(0, 10), hole(10, 10), data(20, 5), hole(25, 100)];
        assert_eq!(needs_zeroing(5, 30, &dst), vec![(5, 5), (20, 5)]);
        assert_eq!(needs_zeroing(12, 5, &dst), vec![]);
        assert_eq!(needs_zeroing(0, 5, &[]), vec![(0, 5)]);
    }

    fn extents_strategy() -> impl Strategy<Value = Vec<Extent>> {
        proptest::collection::vec((1u64..40, any::<bool>()), 0..20).prop_map(|runs| {
            let mut pos = 0;
            runs.into_iter()
                .map(|(len, zero)| {
                    let e = if zero { hole(pos, len) } else { data(pos, len) };
                    pos += len;
                    e
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn plan_covers_range_once_and_never_zeroes_data(
            ext in extents_strategy(),
            request in prop_oneof![Just(1u64), Just(4), Just(16), Just(64)],
            align in prop_oneof![Just(1u64), Just(2), Just(8)],
        ) {
            let end = ext.last().map(|e| e.end()).unwrap_or(0);
            let steps = plan(&ext, 0, end, request, align);
            let mut pos = 0;
            for s in &steps {
                prop_assert_eq!(s.offset(), pos);
                prop_assert!(s.length() > 0);
                match *s {
                    Step::Read { offset, len } => {
                        // Never crosses a request boundary.
                        prop_assert!(offset / request == (offset + len - 1) / request);
                    }
                    Step::Zero { offset, len } => {
                        prop_assert_eq!(offset % align, 0);
                        prop_assert_eq!(len % align, 0);
                        for e in &ext {
                            if e.offset < offset + len && offset < e.end() {
                                prop_assert!(e.zero, "zero step over data extent {:?}", e);
                            }
                        }
                    }
                }
                pos += s.length();
            }
            prop_assert_eq!(pos, end);
        }

        #[test]
        fn needs_zeroing_is_the_complement_of_destination_zeroes(
            dst in extents_strategy(), offset in 0u64..50, len in 0u64..200,
        ) {
            let parts = needs_zeroing(offset, len, &dst);
            for b in offset..offset + len {
                let dst_zero = dst.iter().any(|e| e.zero && e.offset <= b && b < e.end());
                let listed = parts.iter().any(|(o, l)| *o <= b && b < o + l);
                prop_assert_eq!(listed, !dst_zero);
            }
        }
    }
}
