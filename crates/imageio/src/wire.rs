//! The imageio wire model, defined once for both roles: the HTTP endpoint (client) parses
//! these documents and `ferry serve` (server) writes them. It owns the OPTIONS document, the
//! extents items of the zero and dirty contexts, the checksum document and algorithm list, the
//! `/info/` document, the `Content-Range` header, and the JSON text form the reference sends.
//!
//! Pure data and string work: no sockets, no policy. Unknown keys are ignored when parsing,
//! as reference clients do, so servers may add keys.

use serde::{Deserialize, Serialize};

/// `OPTIONS /images/{id}`: what the ticket allows and how many connections to use. The keys
/// after `max_writers` are ferry's extensions; reference clients ignore them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<String>,
    /// In the reference's fixed order: checksum, extents, flush, zero.
    pub features: Vec<String>,
    /// Advisory; absent means one connection only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_readers: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_writers: Option<u64>,
    /// Bytes a client may address (`min(ticket size, backend size)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_block_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_block_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_block_size: Option<u64>,
    /// Where the same ticket is served over NBD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_url: Option<String>,
    /// Body encodings a PUT may carry in `Content-Encoding` (ferry's extension: `zstd`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ferry_encodings: Vec<String>,
}

impl Options {
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// One item of `GET /images/{id}/extents` (zero context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZeroExtent {
    pub start: u64,
    pub length: u64,
    pub zero: bool,
    /// Unallocated in the top layer; absent from old servers.
    #[serde(default)]
    pub hole: bool,
}

/// One item of `GET /images/{id}/extents?context=dirty`; `zero` since imageio 2.2.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyExtent {
    pub start: u64,
    pub length: u64,
    pub dirty: bool,
    #[serde(default)]
    pub zero: bool,
}

/// An extents item of either context, as a client reads it: missing flags are false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct AnyExtent {
    pub start: u64,
    pub length: u64,
    #[serde(default)]
    pub zero: bool,
    #[serde(default)]
    pub hole: bool,
    #[serde(default)]
    pub dirty: bool,
}

/// `GET /images/{id}/checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    pub algorithm: String,
    pub block_size: u64,
    /// Hex digest.
    pub checksum: String,
}

/// `GET /images/{any}/checksum/algorithms`, sorted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Algorithms {
    pub algorithms: Vec<String>,
}

/// `GET /info/`. `server` is ferry's extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// `Content-Range: bytes FIRST-LAST/TOTAL`; LAST and TOTAL may be `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub first: u64,
    /// Inclusive.
    pub last: Option<u64>,
    pub total: Option<u64>,
}

/// Why a `Content-Range` header was refused, in the reference's words (a 400 body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentRangeError(pub String);

impl ContentRange {
    /// Parses the header the way the reference does: exactly `bytes (\d+)-(\d+|\*)/(\d+|\*)`,
    /// no spaces; LAST must not be below FIRST nor reach TOTAL.
    pub fn parse(header: &str) -> Result<ContentRange, ContentRangeError> {
        let invalid =
            |why: &str| ContentRangeError(format!("Invalid Content-Range '{header}'{why}"));
        let spec = header.strip_prefix("bytes ").ok_or_else(|| invalid(""))?;
        let (range, total) = spec.split_once('/').ok_or_else(|| invalid(""))?;
        let (first, last) = range.split_once('-').ok_or_else(|| invalid(""))?;
        let first = digits(first).ok_or_else(|| invalid(""))?;
        let last = match last {
            "*" => None,
            l => Some(digits(l).ok_or_else(|| invalid(""))?),
        };
        let total = match total {
            "*" => None,
            t => Some(digits(t).ok_or_else(|| invalid(""))?),
        };
        if let Some(l) = last {
            if l < first {
                return Err(invalid(", first > last"));
            }
            if total.is_some_and(|t| l >= t) {
                return Err(invalid(", last >= complete"));
            }
        }
        Ok(ContentRange { first, last, total })
    }

    /// Reads the header the way a client does: lenient about spaces, also taking the
    /// unsatisfied form `bytes */TOTAL` (first = 0, last = None).
    pub fn parse_lenient(header: &str) -> Option<ContentRange> {
        let rest = header.trim().strip_prefix("bytes ")?;
        let (range, total) = rest.split_once('/')?;
        let total = match total.trim() {
            "*" => None,
            t => Some(t.parse().ok()?),
        };
        if range.trim() == "*" {
            return Some(ContentRange {
                first: 0,
                last: None,
                total,
            });
        }
        let (first, last) = range.split_once('-')?;
        let last = match last.trim() {
            "*" => None,
            l => Some(l.parse().ok()?),
        };
        Some(ContentRange {
            first: first.trim().parse().ok()?,
            last,
            total,
        })
    }

    /// The header value of a partial response: `bytes FIRST-LAST/TOTAL`. TOTAL is text so a
    /// server can echo a ticket size beyond `u64` exactly.
    pub fn format(first: u64, last: u64, total: &str) -> String {
        format!("bytes {first}-{last}/{total}")
    }

    /// The header value of a 416: `bytes */TOTAL`.
    pub fn unsatisfied(total: &str) -> String {
        format!("bytes */{total}")
    }
}

/// A non-empty run of ASCII digits that fits in u64.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// JSON text as the reference writes it (Python's `json.dumps`: `", "` and `": "`
/// separators, non-ASCII escaped) followed by a newline, so bodies and their
/// `Content-Length` match byte for byte.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value.serialize(&mut ser).expect("JSON documents serialize");
    out.push(b'\n');
    String::from_utf8(out).expect("the formatter writes ASCII")
}

/// Python's item separator, before every array value and object key but the first.
fn item_separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

/// `serde_json` formatting with Python's default separators and `ensure_ascii`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                writer.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_is_pythons() {
        let doc = Options {
            unix_socket: Some("\0/org/ovirt/imageio".into()),
            features: vec!["checksum".into(), "extents".into()],
            max_readers: Some(8),
            max_writers: Some(8),
            ..Options::default()
        };
        assert_eq!(
            to_json(&doc),
            "{\"unix_socket\": \"\\u0000/org/ovirt/imageio\", \"features\": [\"checksum\", \
             \"extents\"], \"max_readers\": 8, \"max_writers\": 8}\n"
        );
        assert_eq!(
            to_json(&serde_json::json!({"a": "é"})),
            "{\"a\": \"\\u00e9\"}\n"
        );
        assert_eq!(to_json(&Vec::<u8>::new()), "[]\n");
    }

    #[test]
    fn documents_round_trip() {
        let text = r#"[{"start": 0, "length": 4096, "zero": false, "hole": false, "x": 1},
                       {"start": 4096, "length": 8192, "dirty": true}]"#;
        let items: Vec<AnyExtent> = serde_json::from_str(text).unwrap();
        assert_eq!(items[1].start, 4096);
        assert!(items[1].dirty && !items[1].zero);
        let o: Options = serde_json::from_str(r#"{"features": ["zero"], "future": 1}"#).unwrap();
        assert!(o.has("zero") && o.max_writers.is_none());
        let c: Checksum =
            serde_json::from_str(r#"{"algorithm": "sha1", "block_size": 4, "checksum": "ab"}"#)
                .unwrap();
        assert_eq!(c.checksum, "ab");
    }

    #[test]
    fn content_range_strict_and_lenient() {
        assert_eq!(
            ContentRange::parse("bytes 10-19/*").unwrap(),
            ContentRange {
                first: 10,
                last: Some(19),
                total: None
            }
        );
        assert_eq!(
            ContentRange::parse("bytes 10-*/100").unwrap().total,
            Some(100)
        );
        for bad in [
            "bytes 19-10/*",
            "bytes 0-100/100",
            "bytes */100",
            "bytes 1-2",
            "0-1/2",
            "bytes -1-2/*",
            "bytes 1-2/x",
            " bytes 1-2/*",
            "bytes 1 -2/*",
        ] {
            let e = ContentRange::parse(bad).unwrap_err().0;
            assert!(
                e.starts_with(&format!("Invalid Content-Range '{bad}'")),
                "{e}"
            );
        }
        assert_eq!(
            ContentRange::parse_lenient(" bytes */4096").unwrap().total,
            Some(4096)
        );
        assert_eq!(
            ContentRange::parse_lenient("bytes 0 - 9/ 10").unwrap().last,
            Some(9)
        );
        assert_eq!(ContentRange::format(0, 9, "10"), "bytes 0-9/10");
        assert_eq!(ContentRange::unsatisfied("10"), "bytes */10");
    }
}
