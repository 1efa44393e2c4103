//! Parsing the `Range` header of a download the way the reference accepts it: exactly one
//! `bytes=FIRST-[LAST]` range, no spaces, no suffix ranges. Pure string work; the handler
//! checks the result against the ticket and backend sizes. (`Content-Range` belongs to the
//! wire model, `imageio::wire::ContentRange`, shared with the client.)

/// A parsed `Range: bytes=...` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub first: u64,
    /// Inclusive; `None` for `bytes=A-` (to the end).
    pub last: Option<u64>,
}

/// Why a Range header cannot be served (always 416).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeError(pub String);

pub fn parse_range(header: &str) -> Result<ByteRange, RangeError> {
    let invalid = || {
        RangeError(format!(
            "Cannot satisfy range '{header}', invalid range or multiple ranges"
        ))
    };
    let spec = header.strip_prefix("bytes=").ok_or_else(invalid)?;
    let (first, last) = spec.split_once('-').ok_or_else(invalid)?;
    let digits_or_empty = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits_or_empty(first) || !digits_or_empty(last) {
        return Err(invalid());
    }
    if first.is_empty() {
        if last.is_empty() {
            return Err(RangeError(format!(
                "Cannot satisfy range '{header}', no first or last"
            )));
        }
        return Err(RangeError(
            "suffix-byte-range-spec not supported yet".to_string(),
        ));
    }
    let first = digits(first).ok_or_else(invalid)?;
    let last = if last.is_empty() {
        None
    } else {
        Some(digits(last).ok_or_else(invalid)?)
    };
    if let Some(l) = last
        && first > l
    {
        return Err(RangeError(format!(
            "Cannot satisfy range '{header}', first > last"
        )));
    }
    Ok(ByteRange { first, last })
}

/// A non-empty string of ASCII digits that fits in u64.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range("bytes=0-99").unwrap(),
            ByteRange {
                first: 0,
                last: Some(99)
            }
        );
        assert_eq!(
            parse_range("bytes=5-").unwrap(),
            ByteRange {
                first: 5,
                last: None
            }
        );
        assert_eq!(
            parse_range("bytes=-5").unwrap_err().0,
            "suffix-byte-range-spec not supported yet"
        );
        assert_eq!(
            parse_range("bytes=0-1,5-6").unwrap_err().0,
            "Cannot satisfy range 'bytes=0-1,5-6', invalid range or multiple ranges"
        );
        assert_eq!(
            parse_range("bytes=9-1").unwrap_err().0,
            "Cannot satisfy range 'bytes=9-1', first > last"
        );
        for junk in [
            "bytes=-",
            "bytes=a-b",
            "items=0-1",
            "bytes=+1-2",
            "bytes=99999999999999999999999-",
            "bytes= 0-9",
            "bytes=0-9 ",
            "",
        ] {
            assert!(parse_range(junk).is_err(), "{junk}");
        }
    }
}
