//! Byte sizes as people write and read them: the one parser of `4096`, `256k`, `64M`, `1G`, `2T`
//! (powers of 1024) for every size a user types, and the one formatter of sizes and rates
//! (`1.5 KiB`, `12.0 MiB/s`) for every line ferry prints. No other crate parses or formats
//! sizes, so `ferry copy`, `ferry checksum`, `ferry ticket` and the progress bar agree.

#![forbid(unsafe_code)]

use std::fmt;

/// Why a size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseSizeError {
    /// Not digits with an optional K, M, G or T suffix.
    Invalid(String),
    /// The value does not fit in 64 bits.
    TooLarge(String),
}

impl fmt::Display for ParseSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseSizeError::Invalid(s) => write!(f, "could not parse: {s}"),
            ParseSizeError::TooLarge(s) => write!(f, "too large: {s}"),
        }
    }
}

impl std::error::Error for ParseSizeError {}

/// `4096`, `256k`, `4M`, `1G`, `2T`: digits with an optional suffix (either case) meaning a
/// power of 1024, as nbdcopy and qemu-img take them.
pub fn parse_size(s: &str) -> Result<u64, ParseSizeError> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(ParseSizeError::Invalid(s.to_string())),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    // `str::parse` takes a leading `+`; a size is digits only.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseSizeError::Invalid(s.to_string()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| ParseSizeError::TooLarge(s.to_string()))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| ParseSizeError::TooLarge(s.to_string()))
}

/// `1536` → `1.5 KiB`; exact byte counts below 1 KiB.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `bytes` over `seconds` as `123.4 MiB/s`; `-` when no time has passed.
pub fn rate(bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 {
        return "-".into();
    }
    format!("{}/s", size((bytes as f64 / seconds) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_nbdcopy_and_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256k"), Ok(256 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert_eq!(parse_size(" 8K "), Ok(8 << 10));
        for bad in ["", "x", "4Q", "K", "+4", "-1", "4 M"] {
            assert_eq!(
                parse_size(bad),
                Err(ParseSizeError::Invalid(bad.into())),
                "{bad:?}"
            );
        }
        let huge = "99999999999999999999G";
        assert_eq!(
            parse_size(huge).unwrap_err().to_string(),
            format!("too large: {huge}")
        );
        assert!(parse_size("16777216T").is_err());
    }

    #[test]
    fn sizes_and_rates_print_in_binary_units() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(8 << 20), "8.0 MiB");
        assert_eq!(size(3 << 40), "3.0 TiB");
        assert_eq!(size(u64::MAX), "16.0 EiB");
        assert_eq!(rate(1 << 20, 0.5), "2.0 MiB/s");
        assert_eq!(rate(1 << 20, 0.0), "-");
    }
}
