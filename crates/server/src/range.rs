//! Parsing the `Range` (GET) and `Content-Range` (PUT) headers the way the reference accepts
//! them: one `bytes=` range, no suffix ranges, and `bytes FIRST-LAST|*/TOTAL|*`. Pure string
//! work; the handlers check the result against the ticket and backend sizes.

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
    let spec = header.trim().strip_prefix("bytes=").ok_or_else(invalid)?;
    if spec.contains(',') {
        return Err(invalid());
    }
    let (first, last) = spec.split_once('-').ok_or_else(invalid)?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        if last.is_empty() {
            return Err(invalid());
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

/// A parsed `Content-Range: bytes FIRST-LAST/TOTAL` header (LAST and TOTAL may be `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub first: u64,
    pub last: Option<u64>,
    pub total: Option<u64>,
}

/// Parses a Content-Range header; Err is the 400 message.
pub fn parse_content_range(header: &str) -> Result<ContentRange, String> {
    let invalid = || format!("Invalid Content-Range '{header}'");
    let spec = header.trim().strip_prefix("bytes ").ok_or_else(invalid)?;
    let (range, total) = spec.trim().split_once('/').ok_or_else(invalid)?;
    let (first, last) = range.split_once('-').ok_or_else(invalid)?;
    let first = digits(first).ok_or_else(invalid)?;
    let last = match last {
        "*" => None,
        l => Some(digits(l).ok_or_else(invalid)?),
    };
    let total = match total {
        "*" => None,
        t => Some(digits(t).ok_or_else(invalid)?),
    };
    if let Some(l) = last {
        if l < first {
            return Err(invalid());
        }
        if let Some(t) = total
            && l >= t
        {
            return Err(invalid());
        }
    }
    Ok(ContentRange { first, last, total })
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
            "",
        ] {
            assert!(parse_range(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 10-19/*").unwrap(),
            ContentRange {
                first: 10,
                last: Some(19),
                total: None
            }
        );
        assert_eq!(
            parse_content_range("bytes 10-*/100").unwrap(),
            ContentRange {
                first: 10,
                last: None,
                total: Some(100)
            }
        );
        for bad in [
            "bytes 19-10/*",
            "bytes 0-100/100",
            "bytes */100",
            "bytes 1-2",
            "0-1/2",
            "bytes -1-2/*",
            "bytes 1-2/x",
        ] {
            assert_eq!(
                parse_content_range(bad).unwrap_err(),
                format!("Invalid Content-Range '{bad}'"),
                "{bad}"
            );
        }
    }
}
