//! Where `ferry serve` answers differently from ovirt-imageio on purpose: one table, each row
//! with its reason. A difference not matched here fails the harness.

use crate::Backend;

pub struct Deliberate {
    /// Case names this row covers; `*` matches any run of characters.
    pub cases: &'static str,
    /// The compared field (see `Diff::field`); `*` as in `cases`.
    pub field: &'static str,
    /// Only on this backend, or on both.
    pub backend: Option<Backend>,
    pub reason: &'static str,
}

/// Shared by several rows.
const JSON_BODY_LIMIT: &str = "JSON bodies are limited to 64 KiB (413, connection closed) to bound memory; \
                 the reference reads any size";

/// Shared by several rows.
const NOT_A_JSON_OBJECT: &str =
    "a PATCH body that is not a JSON object is 400; the reference crashes (500)";

/// Shared by several rows.
const EVERY_403_CLOSES: &str = "every 403 of the data API closes the connection; the reference's checksum \
                 403 keeps it open (handlers/checksum.py)";

pub const DELIBERATE: &[Deliberate] = &[
    Deliberate {
        cases: "*",
        field: "header:content-length@204",
        backend: None,
        reason: "204 answers carry no Content-Length (RFC 9110 section 8.6 forbids it; hyper \
                 enforces it); the reference sends `content-length: 0`. Neither has a body.",
    },
    Deliberate {
        cases: "options/*",
        field: "json+:.*",
        backend: None,
        reason: "extra OPTIONS features: ferry adds size, min/preferred/max_block_size \
                 (imageio issue #67); reference clients ignore unknown keys",
    },
    Deliberate {
        cases: "options/*",
        field: "json:.max_writers",
        backend: Some(Backend::File),
        reason: "more writers on file tickets: ferry serializes unaligned writes itself, so \
                 regular files take max_connections writers (the reference says 1)",
    },
    Deliberate {
        cases: "options/preflight*",
        field: "header:access-control-allow-methods",
        backend: None,
        reason: "PATCH is in the CORS preflight methods (the reference omits it, so browsers \
                 cannot zero or flush)",
    },
    Deliberate {
        cases: "patch/origin",
        field: "header:access-control-*",
        backend: None,
        reason: "PATCH answers carry CORS headers like PUT, so a browser that was allowed \
                 PATCH by the preflight can read the answer",
    },
    Deliberate {
        // Any case that ends on /info/.
        cases: "*",
        field: "json:.version",
        backend: None,
        reason: "ferry's version string: ferry reports the imageio API level it implements \
                 (2.5.3)",
    },
    Deliberate {
        // Any case that ends on /info/.
        cases: "*",
        field: "json+:.server",
        backend: None,
        reason: "ferry's version string: /info/ also names the server (`ferry/VERSION`)",
    },
    Deliberate {
        cases: "put/content-encoding-unknown",
        field: "*",
        backend: None,
        reason: "a PUT body in a Content-Encoding the server does not take (ferry takes zstd \
                 and identity) is refused with 415 and the connection closed; the reference \
                 ignores the header and writes the encoded bytes as image data",
    },
    Deliberate {
        cases: "route/head",
        field: "*",
        backend: None,
        reason: "HEAD is implemented (GET's headers, no body); the reference answers 405 \
                 with a body",
    },
    Deliberate {
        cases: "route/sub-resource-typo",
        field: "*",
        backend: None,
        reason: "an unknown sub-resource is 404 No handler; the reference takes \
                 `rw/extent` as a ticket id and answers 403 (imageio #211)",
    },
    Deliberate {
        cases: "extents/*",
        field: "json:*",
        backend: Some(Backend::File),
        reason: "file tickets report the file's real zero ranges (SEEK_HOLE), so clients \
                 skip reading them; the reference reports one data extent. Same data.",
    },
    Deliberate {
        cases: "extents/small-ticket",
        field: "json:*",
        backend: None,
        reason: "extents stop at the ticket size (what the client may address); the \
                 reference lists the whole backend, so its clients then read past the ticket",
    },
    Deliberate {
        cases: "extents/range-extension*",
        field: "*",
        backend: None,
        reason: "extents take optional start/length (imageio #83) and refuse malformed \
                 values with 400; the reference ignores both and lists the whole image",
    },
    Deliberate {
        cases: "p*/*beyond-backend",
        field: "*",
        backend: None,
        reason: "writes and zeroes past the backend's end (inside a larger ticket) are 416 \
                 `Requested more bytes than available`, as reads are; the reference grows a \
                 file image, or fails with 500 on NBD",
    },
    Deliberate {
        cases: "checksum/algorithms",
        field: "json:.algorithms",
        backend: None,
        reason: "only algorithms that work are listed; the reference also lists \
                 md5-sha1, ripemd160, shake_*, sm3, which fail with 500",
    },
    Deliberate {
        cases: "checksum/broken-algorithm",
        field: "status",
        backend: None,
        reason: "shake_128 is refused with 400 Unsupported value; the reference lists it \
                 and then fails with 500",
    },
    Deliberate {
        cases: "checksum/no-such-ticket",
        field: "header:connection",
        backend: None,
        reason: EVERY_403_CLOSES,
    },
    Deliberate {
        cases: "tickets/expired-by-extend",
        field: "header:connection",
        backend: None,
        reason: EVERY_403_CLOSES,
    },
    Deliberate {
        cases: "patch/json-array",
        field: "status",
        backend: None,
        reason: NOT_A_JSON_OBJECT,
    },
    Deliberate {
        cases: "patch/json-string",
        field: "status",
        backend: None,
        reason: NOT_A_JSON_OBJECT,
    },
    Deliberate {
        cases: "patch/size-bool",
        field: "*",
        backend: None,
        reason: "`\"size\": true` is not an integer (400); the reference's Python takes it \
                 as 1 and zeroes one byte",
    },
    Deliberate {
        cases: "*/oversized-body",
        field: "*",
        backend: None,
        reason: JSON_BODY_LIMIT,
    },
    Deliberate {
        cases: "tickets/add-oversized",
        field: "*",
        backend: None,
        reason: JSON_BODY_LIMIT,
    },
    Deliberate {
        cases: "put/content-length-*",
        field: "*",
        backend: None,
        reason: "a malformed Content-Length is refused by the HTTP parser with a bare 400 \
                 and the connection closed: the body's framing is unknown, and keeping the \
                 connection would parse body bytes as the next request",
    },
    Deliberate {
        cases: "put/chunked",
        field: "*",
        backend: None,
        reason: "chunked uploads are accepted and written; the reference answers 400 and \
                 then parses the leftover chunks as the next request (imageio #217)",
    },
    Deliberate {
        cases: "order/patch-invalid-json-no-such-ticket",
        field: "*",
        backend: None,
        reason: "PATCH authorizes before reading its body (403, closing), so a client \
                 without a ticket cannot make the server read and parse anything; the \
                 reference parses the JSON first (400)",
    },
    Deliberate {
        cases: "tickets/get-empty-id",
        field: "*",
        backend: None,
        reason: "GET /tickets/ lists every ticket (extension); the reference answers 400",
    },
    Deliberate {
        cases: "tickets/add-size-negative",
        field: "*",
        backend: None,
        reason: "a negative ticket size is refused (400); the reference installs a ticket \
                 that allows nothing",
    },
    Deliberate {
        cases: "tickets/add-path-mismatch",
        field: "*",
        backend: None,
        reason: "a path id that differs from the body's uuid is refused (400); the reference \
                 ignores the path and installs the body's uuid",
    },
];

/// The row that lists a difference (its index in [`DELIBERATE`]), if any.
pub fn explain(backend: Backend, case: &str, field: &str) -> Option<usize> {
    DELIBERATE.iter().position(|d| {
        d.backend.is_none_or(|b| b == backend) && glob(d.cases, case) && glob(d.field, field)
    })
}

/// `*`-only wildcard matching.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn globs() {
        assert!(super::glob("options/*", "options/rw"));
        assert!(super::glob("*", ""));
        assert!(super::glob("json+:*.size", "json+:.size"));
        assert!(!super::glob("options/*", "get/x"));
        assert!(!super::glob("a", "ab"));
    }
}
