//! Parsing `http://` and `https://` URLs into what a connection needs: scheme, host, port and
//! the request target; and recognising imageio transfer URLs (`/images/TICKET`).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub tls: bool,
    /// Host name or address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Path and query, as sent in the request line (at least "/").
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlError(pub String);

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UrlError {}

/// True for strings ferry should open as HTTP endpoints.
pub fn is_http_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

impl HttpUrl {
    pub fn parse(s: &str) -> Result<HttpUrl, UrlError> {
        let bad = |why: &str| UrlError(format!("invalid URL {s:?}: {why}"));
        let (tls, rest) = if let Some(r) = strip_prefix_ci(s, "https://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(s, "http://") {
            (false, r)
        } else {
            return Err(bad("expected http:// or https://"));
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        let target = match target.find('#') {
            Some(i) => target[..i].to_string(),
            None => target,
        };
        if authority.contains('@') {
            return Err(bad("user information in URLs is not supported"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let close = v6
                .find(']')
                .ok_or_else(|| bad("unclosed '[' in the host"))?;
            let host = &v6[..close];
            let port = match &v6[close + 1..] {
                "" => default_port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| bad("bad port"))?,
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(HttpUrl {
            tls,
            host,
            port,
            target,
        })
    }

    /// The ticket id of an imageio transfer URL (`/images/TICKET`), if it is one.
    pub fn ticket(&self) -> Option<&str> {
        let path = self.target.split('?').next().unwrap_or("");
        let id = path.strip_prefix("/images/")?;
        (!id.is_empty() && !id.contains('/')).then_some(id)
    }

    /// The path without a query, for building sub-resource paths (`…/extents`).
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("/")
    }

    /// `host:port` for the Host header and for connecting.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The host is this machine, so a Unix socket the server advertises is reachable.
    pub fn is_loopback(&self) -> bool {
        match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => self.host.eq_ignore_ascii_case("localhost"),
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imageio_urls() {
        let u = HttpUrl::parse("https://engine.example:54322/images/abc-123").unwrap();
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port), ("engine.example", 54322));
        assert_eq!(u.ticket(), Some("abc-123"));
        assert_eq!(u.authority(), "engine.example:54322");
        assert!(!u.is_loopback());
    }

    #[test]
    fn defaults_ipv6_and_queries() {
        let u = HttpUrl::parse("http://[::1]/disk.raw?x=1#frag").unwrap();
        assert!(!u.tls);
        assert_eq!((u.host.as_str(), u.port), ("::1", 80));
        assert_eq!(u.target, "/disk.raw?x=1");
        assert_eq!(u.path(), "/disk.raw");
        assert_eq!(u.ticket(), None);
        assert_eq!(u.authority(), "[::1]:80");
        assert!(u.is_loopback());
        let u = HttpUrl::parse("HTTPS://localhost").unwrap();
        assert_eq!((u.port, u.target.as_str()), (443, "/"));
        assert!(u.is_loopback());
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "ftp://x/y",
            "https://",
            "https://:80/x",
            "https://h:port/x",
            "https://u:p@h/x",
            "https://[::1/x",
            "https://h:99999/x",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(is_http_url("HTTP://x"));
        assert!(!is_http_url("nbd://x"));
        assert!(!is_http_url("https"));
    }

    #[test]
    fn ticket_needs_one_segment() {
        let t = |s: &str| HttpUrl::parse(s).unwrap().ticket().map(str::to_string);
        assert_eq!(t("http://h/images/"), None);
        assert_eq!(t("http://h/images/a/b"), None);
        assert_eq!(t("http://h/images/a?x=y"), Some("a".into()));
    }
}
