//! Which byte ranges of a source hold data, from its extents: what a writer that must know the
//! data before reading it (a qcow2 image, whose tables come first) plans from.

use std::ops::Range;

use disk::{DiskError, Endpoint};

/// Extents are asked for in windows this large, so a huge sparse source never needs one
/// enormous reply.
pub const EXTENTS_WINDOW: u64 = 1 << 30;

/// The ranges of `[0, size)` of `src` that do not read as zeroes by its extents, in order and
/// merged. A source without extents (or with `use_extents` false) is all data; a range its
/// extents leave undescribed is data too, since it must be read.
pub async fn data_ranges(
    src: &dyn Endpoint,
    size: u64,
    use_extents: bool,
) -> Result<Vec<Range<u64>>, DiskError> {
    data_ranges_in(src, size, use_extents, EXTENTS_WINDOW).await
}

async fn data_ranges_in(
    src: &dyn Endpoint,
    size: u64,
    use_extents: bool,
    window: u64,
) -> Result<Vec<Range<u64>>, DiskError> {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut push = |r: Range<u64>| match ranges.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => ranges.push(r),
    };
    if !use_extents || !src.caps().extents {
        if size > 0 {
            push(0..size);
        }
        return Ok(ranges);
    }
    let mut offset = 0;
    while offset < size {
        let len = window.min(size - offset);
        let end = offset + len;
        let mut pos = offset;
        for e in src.extents(offset, len).await? {
            let (start, stop) = (e.offset.max(pos), e.end().min(end));
            if stop <= start {
                continue;
            }
            if start > pos || !e.zero {
                // A gap in the reply is data, like a data extent.
                push(pos..if e.zero { start } else { stop });
            }
            pos = stop;
        }
        if pos < end {
            push(pos..end);
        }
        offset = end;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::memory::MemoryEndpoint;
    use disk::{Caps, Extent};

    fn source(extents: Vec<Extent>, size: u64) -> MemoryEndpoint {
        MemoryEndpoint::new("mem", vec![0; size as usize], Caps::random_access(size))
            .with_extents(extents)
    }

    #[tokio::test]
    async fn data_is_merged_across_windows_and_zeroes_left_out() {
        let zero_not_hole = Extent {
            offset: 150,
            length: 50,
            zero: true,
            hole: false,
        };
        let src = source(
            vec![
                Extent::data(0, 10),
                Extent::hole(10, 90),
                Extent::data(100, 50),
                zero_not_hole,
                Extent::data(200, 56),
            ],
            256,
        );
        for window in [1, 7, 32, 1 << 30] {
            let r = data_ranges_in(&src, 256, true, window).await.unwrap();
            assert_eq!(r, vec![0..10, 100..150, 200..256], "window {window}");
        }
        // Without extents everything is data.
        let r = data_ranges(&src, 256, false).await.unwrap();
        assert_eq!(r, vec![0..256]);
        let none = MemoryEndpoint::new("mem", vec![0; 64], Caps::random_access(64));
        assert_eq!(data_ranges(&none, 64, true).await.unwrap(), vec![0..64]);
        assert!(data_ranges(&none, 0, true).await.unwrap().is_empty());
    }
}
