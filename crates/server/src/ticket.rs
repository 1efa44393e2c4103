//! Ticket documents: parsing and validating the JSON a control client PUTs (`TicketSpec`), and
//! the monotonic clock `expires` is measured in.
//!
//! Validation is strict the way the reference is strict (types are checked, required keys must
//! be present, unknown keys are ignored), and its messages are the reference's, because vdsm
//! and the engine log them. Nothing here touches the network or the disk: the backend URL is
//! only checked for a supported scheme.

use serde_json::{Map, Value};
use std::sync::Arc;

/// Socket timeout once a connection is authorized, when the ticket does not say.
pub const DEFAULT_INACTIVITY_TIMEOUT: u64 = 60;

/// What a ticket lets its holder do. `write` implies `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// The backend a ticket names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendUrl {
    /// `file:///path`: a raw file or a block device.
    File(std::path::PathBuf),
    /// Any NBD URI ferry's client understands (`nbd:unix:`, `nbd:HOST:PORT`, `nbd://`, ...).
    Nbd(nbd::uri::NbdUri),
}

/// A validated ticket as installed by the control API.
#[derive(Debug, Clone, PartialEq)]
pub struct TicketSpec {
    pub uuid: String,
    /// Bytes the ticket lets a client address; a larger JSON integer saturates here (it is only
    /// an upper bound) and keeps its exact text in `size_text`.
    pub size: u64,
    /// `size` as the document spelled it: echoed in ticket info and in `Content-Range` totals.
    pub size_text: String,
    /// The `ops` list as given (echoed back verbatim; unknown entries are inert).
    pub ops: Vec<String>,
    pub timeout: u64,
    pub url: String,
    pub backend: BackendUrl,
    pub inactivity_timeout: u64,
    pub transfer_id: Option<String>,
    pub filename: Option<String>,
    pub sparse: bool,
    pub dirty: bool,
    /// The document as the control API received it: what a persistent store keeps.
    pub document: Arc<[u8]>,
    /// ferry's addition: this transfer's bandwidth limit in bytes per second (0: none),
    /// instead of the server's per-ticket default.
    pub bwlimit: Option<u64>,
    /// ferry's addition (`"format": "qcow2"`): a `file://` image is a qcow2 image whose guest
    /// view is transferred. Never guessed from the file's bytes, which a guest controls.
    pub qcow2: bool,
}

impl TicketSpec {
    /// Parses a ticket document; the error text is what the control API answers after
    /// `Invalid ticket: ` (or the JSON error).
    pub fn from_json(body: &[u8]) -> Result<TicketSpec, TicketError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| TicketError::NotJson(format!("Ticket is not in a json format: {e}")))?;
        let Value::Object(map) = value else {
            return Err(TicketError::Invalid(
                "Ticket is not a JSON object".to_string(),
            ));
        };
        let mut spec = Self::from_map(&map, raw_size(body)).map_err(TicketError::Invalid)?;
        spec.document = body.into();
        Ok(spec)
    }

    fn from_map(map: &Map<String, Value>, raw_size: Option<String>) -> Result<TicketSpec, String> {
        let uuid = required(map, "uuid", as_str)?;
        let (size, size_text) = match (map.get("size"), raw_size) {
            // Beyond u64: `Value` holds it as a float, so the digits come from the raw text.
            (Some(Value::Number(n)), Some(text))
                if n.as_u64().is_none() && text.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (u64::MAX, text)
            }
            _ => {
                let size = required(map, "size", as_uint)?;
                (size, size.to_string())
            }
        };
        let ops = required(map, "ops", as_str_list)?;
        let timeout = required(map, "timeout", as_uint)?;
        let url = required(map, "url", as_str)?;
        let backend = parse_url(&url).map_err(|why| {
            format!(
                "Invalid value for 'url': {}: {why}",
                Value::String(url.clone())
            )
        })?;
        let inactivity_timeout =
            optional(map, "inactivity_timeout", as_uint)?.unwrap_or(DEFAULT_INACTIVITY_TIMEOUT);
        if uuid.is_empty() {
            return Err("Invalid value for 'uuid': empty ticket id".to_string());
        }
        let qcow2 = match optional(map, "format", as_str)?.as_deref() {
            None | Some("raw") => false,
            Some("qcow2") if matches!(backend, BackendUrl::File(_)) => true,
            Some("qcow2") => {
                return Err("Invalid value for 'format': qcow2 needs a file:// url".into());
            }
            Some(other) => {
                return Err(format!(
                    "Invalid value for 'format': {}, expecting 'raw' or 'qcow2'",
                    Value::String(other.to_string())
                ));
            }
        };
        Ok(TicketSpec {
            uuid,
            size,
            size_text,
            ops,
            timeout,
            url,
            backend,
            inactivity_timeout,
            transfer_id: optional(map, "transfer_id", as_str)?,
            filename: optional(map, "filename", as_str)?,
            sparse: optional(map, "sparse", as_bool)?.unwrap_or(false),
            dirty: optional(map, "dirty", as_bool)?.unwrap_or(false),
            document: Arc::from(&[][..]),
            bwlimit: optional(map, "bwlimit", as_uint)?,
            qcow2,
        })
    }

    /// True if the ticket allows `access` (`write` implies `read`).
    pub fn allows(&self, access: Access) -> bool {
        let has = |name: &str| self.ops.iter().any(|o| o == name);
        match access {
            Access::Read => has("read") || has("write"),
            Access::Write => has("write"),
        }
    }

    /// The label used in logs and errors: `transfer_id`, or the reference's default.
    pub fn transfer_label(&self) -> String {
        match &self.transfer_id {
            Some(t) => t.clone(),
            None => format!(
                "(ticket/{})",
                self.uuid.chars().take(18).collect::<String>()
            ),
        }
    }

    /// The single kind of operation a ticket is for (`transferred` is reported only then).
    pub fn single_access(&self) -> Option<Access> {
        let read = self.ops.iter().any(|o| o == "read");
        let write = self.ops.iter().any(|o| o == "write");
        match (read, write) {
            (true, false) => Some(Access::Read),
            (false, true) => Some(Access::Write),
            _ => None,
        }
    }
}

/// The `size` member's JSON text, when the document is an object that has one.
fn raw_size(body: &[u8]) -> Option<String> {
    let map: std::collections::HashMap<String, &serde_json::value::RawValue> =
        serde_json::from_slice(body).ok()?;
    map.get("size").map(|raw| raw.get().to_string())
}

/// Why a ticket document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("{0}")]
    NotJson(String),
    #[error("Invalid ticket: {0}")]
    Invalid(String),
}

fn required<T>(
    map: &Map<String, Value>,
    key: &str,
    conv: fn(&str, &Value) -> Result<T, String>,
) -> Result<T, String> {
    match map.get(key) {
        None | Some(Value::Null) => Err(format!("Required ticket parameter is missing: {key}")),
        Some(v) => conv(key, v),
    }
}

fn optional<T>(
    map: &Map<String, Value>,
    key: &str,
    conv: fn(&str, &Value) -> Result<T, String>,
) -> Result<Option<T>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => conv(key, v).map(Some),
    }
}

fn invalid(key: &str, v: &Value, why: &str) -> String {
    format!("Invalid value for '{key}': {v}: {why}")
}

fn as_str(key: &str, v: &Value) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| invalid(key, v, "expecting a string"))
}

fn as_uint(key: &str, v: &Value) -> Result<u64, String> {
    // Python's isinstance(True, int) holds, so the reference takes booleans as 0/1; so do we.
    match v {
        Value::Bool(b) => Ok(u64::from(*b)),
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| invalid(key, v, "expecting a non-negative integer")),
        _ => Err(invalid(key, v, "expecting an integer")),
    }
}

fn as_bool(key: &str, v: &Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| invalid(key, v, "expecting a boolean"))
}

fn as_str_list(key: &str, v: &Value) -> Result<Vec<String>, String> {
    let Value::Array(items) = v else {
        return Err(invalid(key, v, "expecting a list"));
    };
    items
        .iter()
        .map(|i| {
            i.as_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid(key, v, "expecting a list of strings"))
        })
        .collect()
}

/// A ticket `url` ferry cannot serve, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadUrl(String);

impl From<String> for BadUrl {
    fn from(why: String) -> Self {
        BadUrl(why)
    }
}

impl From<&str> for BadUrl {
    fn from(why: &str) -> Self {
        BadUrl(why.to_string())
    }
}

/// Parses a backend URL: `file:///abs/path` or an NBD URI. The proxy (`https:`) backend of the
/// reference is not supported.
pub fn parse_url(url: &str) -> Result<BackendUrl, BadUrl> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    if scheme.eq_ignore_ascii_case("file") {
        let rest = &url[5..];
        let path = rest
            .strip_prefix("//")
            .ok_or_else(|| "expecting file:///absolute/path".to_string())?;
        // file://localhost/path is the same as file:///path; other hosts are remote.
        let path = path.strip_prefix("localhost").unwrap_or(path);
        if !path.starts_with('/') {
            return Err("expecting file:///absolute/path".into());
        }
        let decoded = percent_encoding::percent_decode_str(path).collect::<Vec<u8>>();
        if decoded.contains(&0) {
            return Err("NUL in path".into());
        }
        use std::os::unix::ffi::OsStringExt;
        return Ok(BackendUrl::File(
            std::ffi::OsString::from_vec(decoded).into(),
        ));
    }
    if nbd::uri::is_nbd_uri(url) {
        let uri: nbd::uri::NbdUri = url.parse().map_err(|e: nbd::uri::UriError| e.reason)?;
        return Ok(BackendUrl::Nbd(uri));
    }
    Err(format!("Unsupported url scheme: {scheme}").into())
}

/// Seconds on the clock `expires` is reported in: the reference's `os.times()[4]`, that is
/// `times(2)` in clock ticks. It is monotonic but not CLOCK_MONOTONIC (Linux starts its tick
/// counter near 2^32 ticks), so a value from ferry and one from the reference on the same host
/// compare directly.
pub fn monotonic_now() -> f64 {
    let mut buf = libc::tms {
        tms_utime: 0,
        tms_stime: 0,
        tms_cutime: 0,
        tms_cstime: 0,
    };
    // SAFETY: times writes one struct tms through the pointer, which points to a live local;
    // sysconf only reads a constant.
    let (ticks, per_second) = unsafe { (libc::times(&mut buf), libc::sysconf(libc::_SC_CLK_TCK)) };
    ticks as f64 / per_second.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<TicketSpec, TicketError> {
        TicketSpec::from_json(s.as_bytes())
    }

    #[test]
    fn full_ticket_parses_with_defaults() {
        let t = parse(
            r#"{"uuid": "u1", "size": 8388608, "ops": ["write"], "timeout": 300,
                "url": "nbd:unix:/run/x.sock:exportname=sda", "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(t.uuid, "u1");
        assert_eq!(t.inactivity_timeout, 60);
        assert!(t.allows(Access::Read) && t.allows(Access::Write));
        assert_eq!(t.single_access(), Some(Access::Write));
        assert_eq!(t.transfer_label(), "(ticket/u1)");
        match t.backend {
            BackendUrl::Nbd(u) => assert_eq!(u.export, "sda"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_use_the_reference_wording() {
        let e = parse(r#"{"uuid": "u", "ops": [], "timeout": 1, "url": "file:///x"}"#);
        assert_eq!(
            e.unwrap_err().to_string(),
            "Invalid ticket: Required ticket parameter is missing: size"
        );
        let e = parse(r#"{"uuid": "u", "size": 1, "ops": [], "timeout": 1, "url": "s3://b/x"}"#);
        assert_eq!(
            e.unwrap_err().to_string(),
            "Invalid ticket: Invalid value for 'url': \"s3://b/x\": Unsupported url scheme: s3"
        );
        let e = parse("{not json").unwrap_err().to_string();
        assert!(e.starts_with("Ticket is not in a json format: "), "{e}");
        let e = parse(r#"{"uuid": "u", "size": "1", "ops": [], "timeout": 1, "url": "file:///x"}"#);
        assert!(e.unwrap_err().to_string().contains("'size'"));
        let e = parse(r#"{"uuid": "u", "size": -1, "ops": [], "timeout": 1, "url": "file:///x"}"#);
        assert!(e.is_err());
        let e = parse(r#"[1]"#);
        assert!(e.is_err());
    }

    #[test]
    fn sizes_beyond_u64_are_upper_bounds() {
        let t = parse(
            r#"{"uuid": "u", "size": 18446744073709551616, "ops": ["read"], "timeout": 1,
                "url": "file:///x"}"#,
        )
        .unwrap();
        assert_eq!(
            (t.size, t.size_text.as_str()),
            (u64::MAX, "18446744073709551616")
        );
        let t =
            parse(r#"{"uuid": "u", "size": 4096, "ops": [], "timeout": 1, "url": "file:///x"}"#);
        assert_eq!(t.unwrap().size_text, "4096");
        for bad in ["1.5", "1e30", "-18446744073709551616"] {
            let doc = format!(
                r#"{{"uuid": "u", "size": {bad}, "ops": [], "timeout": 1, "url": "file:///x"}}"#
            );
            assert!(parse(&doc).is_err(), "{bad}");
        }
    }

    #[test]
    fn read_only_ticket_forbids_write() {
        let t =
            parse(r#"{"uuid": "u", "size": 1, "ops": ["read"], "timeout": 1, "url": "file:///x"}"#)
                .unwrap();
        assert!(t.allows(Access::Read));
        assert!(!t.allows(Access::Write));
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            parse_url("file:///srv/a%20b.raw").unwrap(),
            BackendUrl::File("/srv/a b.raw".into())
        );
        assert_eq!(
            parse_url("file://localhost/srv/x").unwrap(),
            BackendUrl::File("/srv/x".into())
        );
        assert!(parse_url("file://otherhost/srv/x").is_err());
        assert!(parse_url("file:relative").is_err());
        assert!(parse_url("file:///a%00b").is_err());
        assert!(parse_url("https://host:54322/images/x").is_err());
        assert!(parse_url("nbd://localhost:10809/x").is_ok());
        assert!(parse_url("nbd:localhost:10809").is_ok());
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_now();
        let b = monotonic_now();
        assert!(a > 0.0 && b >= a);
    }
}
