//! NBD URIs: parsing and printing.
//!
//! This module owns the conversion between strings and [`NbdUri`]: the
//! modern syntax of the NBD URI specification (`doc/uri.md` in the NBD
//! project: `nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`) and qemu's
//! legacy syntax (`nbd:unix:/path[:exportname=NAME]`,
//! `nbd:HOST:PORT[:exportname=NAME]`), which oVirt imageio tickets still use.
//! [`NbdUri`]'s `Display` always prints the modern form.
//!
//! It never does I/O: no name resolution, no check that a socket or a
//! certificate directory exists, no connection. Callers act on the result.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::str::FromStr;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};

/// The IANA-assigned NBD port, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Longest export name the NBD protocol allows, in bytes.
const MAX_EXPORT_LEN: usize = 4096;

/// Printed as is: RFC 3986 unreserved characters. Everything else is encoded.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// Export names and query values: unreserved characters and `/`.
const PATH: &AsciiSet = &UNRESERVED.remove(b'/');
/// Hosts inside brackets (IPv6 literals): unreserved characters and `:`.
const IPV6_HOST: &AsciiSet = &UNRESERVED.remove(b':');

/// How to reach the NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP; `host` is a name or an address, IPv6 without brackets.
    Tcp { host: String, port: u16 },
    /// Unix domain socket; a path starting with a NUL byte (from `%00`)
    /// names a socket in Linux's abstract namespace.
    Unix { path: PathBuf },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    /// Export name, percent-decoded.
    pub export: String,
    /// True for `nbds://` and `nbds+unix://`: TLS is required.
    pub tls: bool,
    /// `?tls-hostname=`: the name to verify the server's certificate against.
    pub tls_hostname: Option<String>,
    /// `?tls-verify-peer=0|1|false|true`; true unless the URI says otherwise.
    pub tls_verify_peer: bool,
    /// `?tls-certificates=DIR`: a directory holding `ca-cert.pem`,
    /// `client-cert.pem` and `client-key.pem` (as libnbd reads it).
    pub tls_certificates: Option<PathBuf>,
}

/// Why a string is not an NBD URI this module accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid NBD URI {uri:?}: {reason}")]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

/// True if `s` starts with `nbd:`, `nbds:`, `nbd+unix:` or `nbds+unix:`
/// (scheme in any case). Tells a URI argument from a file path; it does not
/// say that `s` parses.
pub fn is_nbd_uri(s: &str) -> bool {
    s.split_once(':').is_some_and(|(scheme, _)| {
        ["nbd", "nbds", "nbd+unix", "nbds+unix"]
            .iter()
            .any(|known| scheme.eq_ignore_ascii_case(known))
    })
}

impl NbdUri {
    /// A URI for `export` over `transport`, without TLS and with the
    /// default TLS settings.
    pub fn new(transport: Transport, export: impl Into<String>) -> Self {
        NbdUri {
            transport,
            export: export.into(),
            tls: false,
            tls_hostname: None,
            tls_verify_peer: true,
            tls_certificates: None,
        }
    }

    /// The name to check the server's certificate against: `tls-hostname`
    /// if given, else the TCP host, else `localhost`.
    pub fn tls_server_name(&self) -> String {
        match (&self.tls_hostname, &self.transport) {
            (Some(name), _) => name.clone(),
            (None, Transport::Tcp { host, .. }) => host.clone(),
            (None, Transport::Unix { .. }) => "localhost".to_owned(),
        }
    }
}

impl FromStr for NbdUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        parse(s).map_err(|reason| UriError {
            uri: s.to_owned(),
            reason,
        })
    }
}

impl fmt::Display for NbdUri {
    /// Prints the canonical modern form; it parses back to an equal value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls { "nbds" } else { "nbd" })?;
        let mut params: Vec<(&str, &[u8])> = Vec::new();
        match &self.transport {
            Transport::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "://[{}]", percent_encode(host.as_bytes(), IPV6_HOST))?;
                } else {
                    write!(f, "://{}", percent_encode(host.as_bytes(), UNRESERVED))?;
                }
                if *port != DEFAULT_PORT {
                    write!(f, ":{port}")?;
                }
            }
            Transport::Unix { path } => {
                f.write_str("+unix://")?;
                params.push(("socket", path.as_os_str().as_bytes()));
            }
        }
        write!(f, "/{}", percent_encode(self.export.as_bytes(), PATH))?;
        if let Some(name) = &self.tls_hostname {
            params.push(("tls-hostname", name.as_bytes()));
        }
        if !self.tls_verify_peer {
            params.push(("tls-verify-peer", b"false"));
        }
        if let Some(dir) = &self.tls_certificates {
            params.push(("tls-certificates", dir.as_os_str().as_bytes()));
        }
        for (i, (key, value)) in params.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            write!(f, "{sep}{key}={}", percent_encode(value, PATH))?;
        }
        Ok(())
    }
}

/// Parses `s`; the error is the reason only, [`FromStr`] adds the URI.
fn parse(s: &str) -> Result<NbdUri, String> {
    let (scheme, rest) = s.split_once(':').ok_or("missing URI scheme")?;
    let scheme = scheme.to_ascii_lowercase();
    let (tls, unix) = match scheme.as_str() {
        "nbd" => (false, false),
        "nbds" => (true, false),
        "nbd+unix" => (false, true),
        "nbds+unix" => (true, true),
        "nbd+vsock" | "nbds+vsock" | "nbd+ssh" | "nbds+ssh" => {
            return Err(format!("{scheme}: transport not supported"));
        }
        _ => return Err(format!("unknown scheme {scheme:?}")),
    };
    let Some(rest) = rest.strip_prefix("//") else {
        if scheme == "nbd" {
            return parse_legacy(rest);
        }
        return Err(format!("expected \"//\" after \"{scheme}:\""));
    };
    if rest.contains('#') {
        return Err("fragments (#...) are not allowed".into());
    }
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let export = decode_str(path.strip_prefix('/').unwrap_or(path), "export name")?;
    check_export(&export)?;
    let params = parse_query(query)?;
    let transport = if unix {
        if !authority.is_empty() {
            return Err(format!("authority must be empty, got {authority:?}"));
        }
        let path = params.socket.ok_or("missing socket parameter")?;
        Transport::Unix { path }
    } else {
        if authority.contains('@') {
            return Err("userinfo (user@) is not allowed".into());
        }
        if params.socket.is_some() {
            return Err("the socket parameter is only valid with nbd+unix or nbds+unix".into());
        }
        let (host, port) = split_host_port(authority)?;
        let host = decode_str(host, "host")?;
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(port) => parse_port(port)?,
        };
        Transport::Tcp { host, port }
    };
    Ok(NbdUri {
        tls,
        tls_hostname: params.tls_hostname,
        tls_verify_peer: params.tls_verify_peer.unwrap_or(true),
        tls_certificates: params.tls_certificates,
        ..NbdUri::new(transport, export)
    })
}

/// qemu's `nbd:unix:PATH[:exportname=NAME]` and
/// `nbd:HOST:PORT[:exportname=NAME]`; `rest` follows `nbd:`. Nothing is
/// percent-decoded in this syntax.
fn parse_legacy(rest: &str) -> Result<NbdUri, String> {
    let (address, export) = rest.split_once(":exportname=").unwrap_or((rest, ""));
    check_export(export)?;
    let transport = if let Some(path) = address.strip_prefix("unix:") {
        Transport::Unix {
            path: socket_path(path.as_bytes().to_vec())?,
        }
    } else {
        let (host, port) = split_host_port(address)?;
        let port = port.ok_or("missing port (expected nbd:HOST:PORT)")?;
        Transport::Tcp {
            host: host.to_owned(),
            port: parse_port(port)?,
        }
    };
    Ok(NbdUri::new(transport, export))
}

/// Splits `host[:port]` or `[v6][:port]`; the host comes back without
/// brackets and still percent-encoded, and is never empty.
fn split_host_port(s: &str) -> Result<(&str, Option<&str>), String> {
    let (host, port) = if let Some(inner) = s.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or("missing ']' after IPv6 address")?;
        match after.strip_prefix(':') {
            _ if after.is_empty() => (host, None),
            Some(port) => (host, Some(port)),
            None => return Err(format!("unexpected {after:?} after IPv6 address")),
        }
    } else {
        match s.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err("IPv6 addresses must be enclosed in brackets".into());
            }
            Some((host, _)) if host.contains(['[', ']']) => {
                return Err(format!("invalid host {host:?}"));
            }
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    Ok((host, port))
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(port) if port != 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(format!("invalid port {s:?}")),
    }
}

fn check_export(export: &str) -> Result<(), String> {
    let len = export.len();
    if len > MAX_EXPORT_LEN {
        return Err(format!(
            "export name is {len} bytes, the limit is {MAX_EXPORT_LEN}"
        ));
    }
    if export.contains('\0') {
        return Err("export name contains a NUL byte".into());
    }
    Ok(())
}

/// Query parameters seen so far; `None` means absent.
#[derive(Default)]
struct Params {
    socket: Option<PathBuf>,
    tls_hostname: Option<String>,
    tls_verify_peer: Option<bool>,
    tls_certificates: Option<PathBuf>,
    tls_type: bool,
}

fn parse_query(query: &str) -> Result<Params, String> {
    let mut p = Params::default();
    for pair in query.split(['&', ';']).filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode_str(key, "parameter name")?;
        if key.starts_with("x-") {
            continue;
        }
        let what = format!("parameter {key}");
        let value = decode(value, &what)?;
        let duplicate = match key.as_str() {
            "socket" => p.socket.replace(socket_path(value)?).is_some(),
            "tls-hostname" if value.is_empty() => return Err("tls-hostname is empty".into()),
            "tls-hostname" => p.tls_hostname.replace(utf8(value, &what)?).is_some(),
            "tls-verify-peer" => p
                .tls_verify_peer
                .replace(parse_bool(&utf8(value, &what)?)?)
                .is_some(),
            "tls-certificates" if value.is_empty() || value.contains(&0) => {
                return Err("tls-certificates must be a non-empty path without NUL".into());
            }
            "tls-certificates" => {
                let dir = PathBuf::from(OsString::from_vec(value));
                p.tls_certificates.replace(dir).is_some()
            }
            "tls-type" => match utf8(value, &what)?.to_ascii_lowercase().as_str() {
                "x509" => std::mem::replace(&mut p.tls_type, true),
                other @ ("psk" | "anon") => {
                    return Err(format!("tls-type={other} is not supported (only x509 is)"));
                }
                other => return Err(format!("unknown tls-type {other:?}")),
            },
            _ => return Err(format!("unknown parameter {key:?}")),
        };
        if duplicate {
            return Err(format!("duplicate parameter {key:?}"));
        }
    }
    Ok(p)
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!(
            "invalid tls-verify-peer {value:?} (expected 0, 1, false or true)"
        )),
    }
}

/// A socket path: not empty, and NUL only as the first byte (abstract).
fn socket_path(bytes: Vec<u8>) -> Result<PathBuf, String> {
    if bytes.is_empty() {
        return Err("empty socket path".into());
    }
    if bytes[0] != 0 && bytes.contains(&0) {
        return Err("socket path contains a NUL byte".into());
    }
    Ok(OsString::from_vec(bytes).into())
}

/// Percent-decodes `s`, refusing `%` not followed by two hex digits.
fn decode(s: &str, what: &str) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b'%') {
        let hex = bytes.get(i + 1..i + 3);
        if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
            return Err(format!("invalid percent-encoding in {what}"));
        }
    }
    Ok(percent_decode_str(s).collect())
}

/// [`decode`], then requires UTF-8.
fn decode_str(s: &str, what: &str) -> Result<String, String> {
    utf8(decode(s, what)?, what)
}

fn utf8(bytes: Vec<u8>, what: &str) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|_| format!("{what} is not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: u16 = DEFAULT_PORT;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        let host = host.to_owned();
        NbdUri::new(Transport::Tcp { host, port }, export)
    }

    fn unix(path: &str, export: &str) -> NbdUri {
        NbdUri::new(Transport::Unix { path: path.into() }, export)
    }

    fn tls(uri: NbdUri) -> NbdUri {
        NbdUri { tls: true, ..uri }
    }

    /// `uri` with the given TLS parameters.
    fn opts(uri: NbdUri, name: Option<&str>, verify: bool, certs: Option<&str>) -> NbdUri {
        NbdUri {
            tls_hostname: name.map(str::to_owned),
            tls_verify_peer: verify,
            tls_certificates: certs.map(PathBuf::from),
            ..uri
        }
    }

    #[rustfmt::skip]
    fn good_cases() -> Vec<(&'static str, NbdUri)> {
        vec![
            ("nbd://example.com/disk", tcp("example.com", D, "disk")),
            ("nbd://example.com:10810/disk", tcp("example.com", 10810, "disk")),
            ("nbd://example.com/", tcp("example.com", D, "")),
            ("nbd://example.com", tcp("example.com", D, "")),
            ("nbd://h//disk", tcp("h", D, "/disk")),
            ("nbd://h/hello%20world", tcp("h", D, "hello world")),
            ("nbd://h/caf%C3%A9", tcp("h", D, "café")),
            ("nbd://[::1]:10810/x", tcp("::1", 10810, "x")),
            ("nbd://[fe80::1%25eth0]/x", tcp("fe80::1%eth0", D, "x")),
            ("nbd://192.0.2.1:1/x", tcp("192.0.2.1", 1, "x")),
            ("nbd://h:/x", tcp("h", D, "x")),
            ("NBD://Host/x", tcp("Host", D, "x")),
            ("nbds://h/x", tls(tcp("h", D, "x"))),
            ("nbd+unix:///disk?socket=/tmp/nbd.sock", unix("/tmp/nbd.sock", "disk")),
            ("nbd+unix:///?socket=nbd.sock", unix("nbd.sock", "")),
            ("nbd+unix:///e?socket=/a%20b/s%3Fq", unix("/a b/s?q", "e")),
            ("nbd+unix:///e?socket=%00/abstract", unix("\0/abstract", "e")),
            ("nbds+unix:///e?socket=/s", tls(unix("/s", "e"))),
            ("nbds+unix:///e?socket=/s&tls-certificates=/etc/pki/f",
                opts(tls(unix("/s", "e")), None, true, Some("/etc/pki/f"))),
            ("nbds://h/x?tls-hostname=srv.example&tls-verify-peer=false",
                opts(tls(tcp("h", D, "x")), Some("srv.example"), false, None)),
            ("nbds://h/x?tls-verify-peer=0;tls-type=x509", opts(tls(tcp("h", D, "x")), None, false, None)),
            ("nbds://h/x?tls-verify-peer=1", tls(tcp("h", D, "x"))),
            ("nbd://h/x?x-foo=bar&x-baz", tcp("h", D, "x")),
            ("nbd://h/x?tls-hostname=n%26m", opts(tcp("h", D, "x"), Some("n&m"), true, None)),
            ("nbd:unix:/tmp/s", unix("/tmp/s", "")),
            ("nbd:unix:/tmp/s:exportname=disk", unix("/tmp/s", "disk")),
            ("nbd:localhost:10809:exportname=a b", tcp("localhost", D, "a b")),
            ("nbd:[::1]:10810", tcp("::1", 10810, "")),
        ]
    }

    #[test]
    fn parses_good_uris() {
        for (input, expected) in good_cases() {
            assert!(is_nbd_uri(input), "{input}");
            match input.parse::<NbdUri>() {
                Ok(got) => assert_eq!(got, expected, "{input}"),
                Err(e) => panic!("{input}: {e}"),
            }
        }
        let export = "a".repeat(MAX_EXPORT_LEN);
        let uri: NbdUri = format!("nbd://h/{export}").parse().unwrap();
        assert_eq!(uri.export, export);
    }

    #[rustfmt::skip]
    const BAD: &[(&str, &str)] = &[
        ("nbd+vsock:///1", "transport not supported"),
        ("nbd+ssh://h/x", "transport not supported"),
        ("http://h/x", "unknown scheme"),
        ("no-scheme", "missing URI scheme"),
        ("nbds:h:10809", "expected \"//\""),
        ("nbd:///x", "empty host"),
        ("nbd://:10809/x", "empty host"),
        ("nbd://h/x#frag", "fragments"),
        ("nbd://user@h/x", "userinfo"),
        ("nbd://h:99999/x", "invalid port"),
        ("nbd://h:+1/x", "invalid port"),
        ("nbd://h:0/x", "invalid port"),
        ("nbd://::1/x", "brackets"),
        ("nbd://[::1/x", "missing ']'"),
        ("nbd://[::1]x/e", "after IPv6 address"),
        ("nbd://h/%zz", "invalid percent-encoding in export name"),
        ("nbd://h/x%2", "invalid percent-encoding in export name"),
        ("nbd://h/%ff", "export name is not valid UTF-8"),
        ("nbd://h/a%00b", "export name contains a NUL"),
        ("nbd://h/x?socket=/s", "only valid with nbd+unix"),
        ("nbd://h/x?foo=1", "unknown parameter \"foo\""),
        ("nbd://h/?tls-hostname=a&tls-hostname=b", "duplicate parameter \"tls-hostname\""),
        ("nbd://h/x?tls-hostname=", "tls-hostname is empty"),
        ("nbd://h/?tls-hostname=%g0", "invalid percent-encoding in parameter tls-hostname"),
        ("nbd://h/?tls-hostname=%ff", "parameter tls-hostname is not valid UTF-8"),
        ("nbds://h/x?tls-type=psk", "tls-type=psk is not supported"),
        ("nbds://h/x?tls-type=anon", "tls-type=anon is not supported"),
        ("nbds://h/x?tls-type=foo", "unknown tls-type"),
        ("nbds://h/?tls-verify-peer=maybe", "invalid tls-verify-peer"),
        ("nbds://h/x?tls-certificates=", "tls-certificates must be"),
        ("nbd+unix:///x", "missing socket parameter"),
        ("nbd+unix:///x?socket=", "empty socket path"),
        ("nbd+unix:///x?socket=/a%00b", "socket path contains a NUL"),
        ("nbd+unix://h/x?socket=/s", "authority must be empty"),
        ("nbd:", "empty host"),
        ("nbd:host", "missing port"),
        ("nbd:host:port", "invalid port"),
        ("nbd:unix:", "empty socket path"),
    ];

    #[test]
    fn rejects_bad_uris() {
        let long = format!("nbd://h/{}", "a".repeat(MAX_EXPORT_LEN + 1));
        let long = [(long.as_str(), "limit is 4096")];
        for (input, reason) in BAD.iter().chain(&long) {
            match input.parse::<NbdUri>() {
                Ok(got) => panic!("{input} parsed as {got:?}"),
                Err(e) => {
                    assert_eq!(e.uri, *input);
                    assert!(e.reason.contains(reason), "{input}: {:?}", e.reason);
                }
            }
        }
        let err = "nbd://h/?bad=1".parse::<NbdUri>().unwrap_err();
        let expected = r#"invalid NBD URI "nbd://h/?bad=1": unknown parameter "bad""#;
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    #[rustfmt::skip]
    fn prints_canonical_form() {
        let cases = [
            ("NBD://h:10809/x", "nbd://h/x"),
            ("nbd://h", "nbd://h/"),
            ("nbds://[::1]:1/a%20b?tls-verify-peer=0", "nbds://[::1]:1/a%20b?tls-verify-peer=false"),
            ("nbd:unix:/run/s:exportname=d?x", "nbd+unix:///d%3Fx?socket=/run/s"),
            ("nbd+unix:///?tls-hostname=n&socket=%00a", "nbd+unix:///?socket=%00a&tls-hostname=n"),
            ("nbd://h//disk?x-a=1&tls-type=x509", "nbd://h//disk"),
        ];
        for (input, expected) in cases {
            let uri: NbdUri = input.parse().unwrap();
            assert_eq!(uri.to_string(), expected, "{input}");
        }
    }

    #[test]
    fn round_trips() {
        let odd = "a b?c#d&e;f=g%h+i:j@k/l\u{e9}";
        let mut values: Vec<NbdUri> = good_cases().into_iter().map(|(_, u)| u).collect();
        values.push(tcp("fe80::1%eth0", 1, odd));
        values.push(tcp("a%b c", 2, &format!("/{odd}")));
        let certs = format!("/{odd}");
        let abstract_path = format!("\0{odd}");
        values.push(opts(
            tls(unix(&abstract_path, odd)),
            Some(odd),
            false,
            Some(&certs),
        ));
        values.push(unix(odd, ""));
        for value in values {
            let text = value.to_string();
            let back: NbdUri = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(back, value, "{text}");
        }
    }

    #[test]
    fn detects_uris_and_tls_server_name() {
        for s in ["nbd:x", "NBDS://h", "nbd+unix:///", "Nbds+Unix:"] {
            assert!(is_nbd_uri(s), "{s}");
        }
        for s in [
            "disk.img",
            "/tmp/nbd:x",
            "nbd",
            "nbdx://h",
            "./nbd:",
            "http://h",
        ] {
            assert!(!is_nbd_uri(s), "{s}");
        }
        let uri = tcp("h.example", D, "");
        assert_eq!(uri.tls_server_name(), "h.example");
        assert_eq!(opts(uri, Some("o"), true, None).tls_server_name(), "o");
        assert_eq!(unix("/s", "").tls_server_name(), "localhost");
    }
}
