//! The corpus: request sequences over the data API and the control API, run unchanged against
//! both servers. Invalid requests are the larger part, because clients and orchestrators
//! branch on error answers as much as on successes.
//!
//! Every case starts from the same state on both servers (all tickets deleted, the image
//! rewritten, tickets `rw` (write) and `ro` (read) for the whole image installed); those
//! prelude steps are compared like every other step. `{url}` in a target or body is replaced
//! by the side's backend URL, `{size}` by the image size.

/// Size of the image every case starts from.
pub const IMAGE_SIZE: u64 = 1 << 20;
/// Pseudo-random bytes at the start of the image; the rest is a hole.
pub const IMAGE_DATA: usize = 300_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Svc {
    Data,
    Control,
}

/// How the request states its body length.
#[derive(Debug, Clone)]
pub enum Length {
    /// `Content-Length` of the body as sent (omitted for bodiless GET/OPTIONS/DELETE).
    Auto,
    /// No `Content-Length` at all.
    Omit,
    /// This literal value (malformed, lying or duplicated).
    Literal(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Step {
    pub svc: Svc,
    /// Connection index within the case; steps on one index share a connection.
    pub conn: usize,
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub length: Length,
    pub half_close: bool,
}

impl Step {
    pub fn h(mut self, name: &str, value: &str) -> Step {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Step {
        self.body = b.into();
        self
    }
    pub fn json(self, text: &str) -> Step {
        self.body(text.as_bytes().to_vec())
    }
    pub fn length(mut self, values: &[&str]) -> Step {
        self.length = Length::Literal(values.iter().map(|s| s.to_string()).collect());
        self
    }
    pub fn no_length(mut self) -> Step {
        self.length = Length::Omit;
        self
    }
    pub fn conn(mut self, c: usize) -> Step {
        self.conn = c;
        self
    }
    pub fn half_close(mut self) -> Step {
        self.half_close = true;
        self
    }

    /// The request bytes, with `{url}` and `{size}` substituted.
    pub fn render(&self, url: &str) -> Vec<u8> {
        let sub = |s: &str| {
            s.replace("{url}", url)
                .replace("{size}", &IMAGE_SIZE.to_string())
        };
        let body = sub(&String::from_utf8_lossy(&self.body)).into_bytes();
        let body = if self.body.is_ascii() {
            body
        } else {
            self.body.clone()
        };
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\n",
            self.method,
            sub(&self.target)
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        match &self.length {
            Length::Auto => {
                if !body.is_empty() || ["PUT", "PATCH", "POST"].contains(&self.method.as_str()) {
                    out.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
            }
            Length::Omit => {}
            Length::Literal(values) => {
                for v in values {
                    out.push_str(&format!("Content-Length: {v}\r\n"));
                }
            }
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&body);
        bytes
    }
}

pub struct Case {
    pub name: String,
    pub steps: Vec<Step>,
}

fn step(svc: Svc, method: &str, target: &str) -> Step {
    Step {
        svc,
        conn: 0,
        method: method.into(),
        target: target.into(),
        headers: Vec::new(),
        body: Vec::new(),
        length: Length::Auto,
        half_close: false,
    }
}

pub fn data(method: &str, target: &str) -> Step {
    step(Svc::Data, method, target)
}

pub fn ctl(method: &str, target: &str) -> Step {
    step(Svc::Control, method, target)
}

/// `PUT /tickets/ID` with a ticket for the case's image; `size` and `extra` are JSON text.
pub fn add(id: &str, ops: &str, size: &str, extra: &str) -> Step {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    ctl("PUT", &format!("/tickets/{id}")).json(&format!(
        r#"{{"uuid": "{id}", "size": {size}, "ops": {ops}, "timeout": 300, "url": "{{url}}"{extra}}}"#
    ))
}

/// The steps every case starts with.
pub fn prelude() -> Vec<Step> {
    vec![
        ctl("DELETE", "/tickets/"),
        add("rw", r#"["write"]"#, "{size}", ""),
        add("ro", r#"["read"]"#, "{size}", ""),
    ]
}

fn put(target: &str, body: Vec<u8>) -> Step {
    data("PUT", target).body(body)
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn patch(target: &str, json: &str) -> Step {
    data("PATCH", target).json(json)
}

pub fn cases() -> Vec<Case> {
    let mut c: Vec<(String, Vec<Step>)> = Vec::new();
    let mut case = |name: &str, steps: Vec<Step>| c.push((name.to_string(), steps));

    // OPTIONS
    case("options/rw", vec![data("OPTIONS", "/images/rw")]);
    case("options/ro", vec![data("OPTIONS", "/images/ro")]);
    case("options/star", vec![data("OPTIONS", "/images/*")]);
    case(
        "options/no-such-ticket",
        vec![data("OPTIONS", "/images/nope")],
    );
    case("options/empty-id", vec![data("OPTIONS", "/images/")]);
    case(
        "options/origin",
        vec![data("OPTIONS", "/images/rw").h("Origin", "https://engine")],
    );
    case(
        "options/preflight",
        vec![
            data("OPTIONS", "/images/rw")
                .h("Origin", "https://engine")
                .h("Access-Control-Request-Method", "PUT")
                .h(
                    "Access-Control-Request-Headers",
                    "content-range,content-type",
                ),
        ],
    );
    case(
        "options/preflight-star",
        vec![
            data("OPTIONS", "/images/*")
                .h("Origin", "https://engine")
                .h("Access-Control-Request-Method", "PUT"),
        ],
    );
    case(
        "options/preflight-no-such-ticket",
        vec![
            data("OPTIONS", "/images/nope")
                .h("Origin", "https://engine")
                .h("Access-Control-Request-Method", "GET"),
        ],
    );

    // GET
    case("get/whole", vec![data("GET", "/images/rw")]);
    case("get/whole-ro", vec![data("GET", "/images/ro")]);
    case(
        "get/range",
        vec![data("GET", "/images/rw").h("Range", "bytes=0-99")],
    );
    case(
        "get/range-open",
        vec![data("GET", "/images/ro").h("Range", "bytes=1000000-")],
    );
    case(
        "get/range-whole",
        vec![data("GET", "/images/rw").h("Range", "bytes=0-1048575")],
    );
    case(
        "get/range-last-byte",
        vec![data("GET", "/images/rw").h("Range", "bytes=1048575-1048575")],
    );
    case(
        "get/range-suffix",
        vec![data("GET", "/images/rw").h("Range", "bytes=-100")],
    );
    case(
        "get/range-dash",
        vec![data("GET", "/images/rw").h("Range", "bytes=-")],
    );
    case(
        "get/range-multiple",
        vec![data("GET", "/images/rw").h("Range", "bytes=0-1,5-6")],
    );
    case(
        "get/range-junk",
        vec![data("GET", "/images/rw").h("Range", "bytes=a-b")],
    );
    case(
        "get/range-unit",
        vec![data("GET", "/images/rw").h("Range", "items=0-1")],
    );
    case(
        "get/range-first-gt-last",
        vec![data("GET", "/images/rw").h("Range", "bytes=9-1")],
    );
    case(
        "get/range-beyond-ticket",
        vec![data("GET", "/images/rw").h("Range", "bytes=0-1048576")],
    );
    case(
        "get/range-start-beyond",
        vec![data("GET", "/images/rw").h("Range", "bytes=2000000-2000001")],
    );
    case(
        "get/range-beyond-backend",
        vec![
            add("big", r#"["read"]"#, "2097152", ""),
            data("GET", "/images/big").h("Range", "bytes=0-1500000"),
        ],
    );
    case(
        "get/whole-big-ticket",
        vec![
            add("big", r#"["read"]"#, "2097152", ""),
            data("GET", "/images/big"),
        ],
    );
    case(
        "get/small-ticket",
        vec![
            add("small", r#"["read"]"#, "4096", ""),
            data("GET", "/images/small"),
            data("GET", "/images/small").h("Range", "bytes=0-4096"),
            data("GET", "/images/small").h("Range", "bytes=4000-4095"),
        ],
    );
    case(
        "get/range-spaces",
        vec![data("GET", "/images/rw").h("Range", "bytes= 0-9")],
    );
    case(
        "get/range-duplicated",
        vec![
            data("GET", "/images/rw")
                .h("Range", "bytes=0-9")
                .h("Range", "bytes=10-19"),
        ],
    );
    case(
        "get/origin",
        vec![data("GET", "/images/rw").h("Origin", "https://engine")],
    );
    case(
        "get/origin-error",
        vec![data("GET", "/images/nope").h("Origin", "https://engine")],
    );
    case(
        "get/no-such-ticket",
        vec![data("GET", "/images/nope"), data("GET", "/images/rw")],
    );
    case("get/empty-id", vec![data("GET", "/images/")]);
    case(
        "get/close",
        vec![data("GET", "/images/rw?close=y").h("Range", "bytes=0-9")],
    );
    case(
        "get/filename",
        vec![
            add(
                "named",
                r#"["read"]"#,
                "{size}",
                r#""filename": "disk.raw""#,
            ),
            data("GET", "/images/named").h("Range", "bytes=0-9"),
        ],
    );
    case(
        "get/size-2-64",
        vec![
            add("huge", r#"["read"]"#, "18446744073709551616", ""),
            data("GET", "/images/huge").h("Range", "bytes=0-9"),
            data("GET", "/images/huge").h("Range", "bytes=0-2000000"),
            ctl("GET", "/tickets/huge"),
        ],
    );

    // PUT
    case(
        "put/content-range",
        vec![
            put("/images/rw", bytes(4096, 1)).h("Content-Range", "bytes 0-4095/*"),
            data("GET", "/images/rw").h("Range", "bytes=0-4095"),
        ],
    );
    case(
        "put/no-content-range",
        vec![put("/images/rw", bytes(1000, 2))],
    );
    case(
        "put/content-range-total",
        vec![put("/images/rw", bytes(1000, 3)).h("Content-Range", "bytes 1000-1999/1048576")],
    );
    case(
        "put/content-range-star-last",
        vec![put("/images/rw", bytes(1000, 4)).h("Content-Range", "bytes 5000-*/*")],
    );
    for (i, bad) in [
        "bytes 10-5/*",
        "bytes 0-100/100",
        "bytes */100",
        "bytes 1-2",
        "0-1/2",
        "bytes -1-2/*",
        "bytes 1-2/x",
        "bytes=0-99/*",
    ]
    .iter()
    .enumerate()
    {
        case(
            &format!("put/bad-content-range-{i}"),
            vec![put("/images/rw", bytes(100, 5)).h("Content-Range", bad)],
        );
    }
    case(
        "put/missing-content-length",
        vec![data("PUT", "/images/rw").no_length()],
    );
    case(
        "put/content-length-junk",
        vec![put("/images/rw", Vec::new()).length(&["abc"])],
    );
    case(
        "put/content-length-negative",
        vec![put("/images/rw", Vec::new()).length(&["-1"])],
    );
    case(
        "put/content-length-duplicated-same",
        vec![put("/images/rw", bytes(10, 6)).length(&["10", "10"])],
    );
    case(
        "put/flush-n",
        vec![put("/images/rw?flush=n", bytes(5000, 7))],
    );
    case(
        "put/flush-y",
        vec![put("/images/rw?flush=y", bytes(5000, 8))],
    );
    case(
        "put/flush-bad",
        vec![put("/images/rw?flush=x", bytes(10, 9))],
    );
    case("put/close", vec![put("/images/rw?close=y", bytes(10, 10))]);
    case(
        "put/beyond-ticket",
        vec![put("/images/rw", bytes(4096, 11)).h("Content-Range", "bytes 1048000-1052095/*")],
    );
    case(
        "put/oversized-body",
        vec![data("PUT", "/images/rw").length(&["2097152"])],
    );
    case(
        "put/read-only-ticket",
        vec![put("/images/ro", bytes(10, 12))],
    );
    case(
        "put/no-such-ticket",
        vec![put("/images/nope", bytes(10, 13))],
    );
    case("put/empty-id", vec![put("/images/", bytes(10, 13))]);
    case(
        "put/short-body",
        vec![
            put("/images/rw", bytes(10, 14))
                .length(&["100"])
                .half_close(),
        ],
    );
    case("put/zero-length", vec![put("/images/rw", Vec::new())]);
    case(
        "put/expect-continue",
        vec![put("/images/rw", bytes(2000, 15)).h("Expect", "100-continue")],
    );
    case(
        "put/origin",
        vec![put("/images/rw", bytes(10, 16)).h("Origin", "https://engine")],
    );
    case(
        "put/keep-alive",
        vec![
            put("/images/rw", bytes(100, 17)).h("Content-Range", "bytes 0-99/*"),
            put("/images/rw", bytes(100, 18)).h("Content-Range", "bytes 100-199/*"),
            data("GET", "/images/rw").h("Range", "bytes=0-199"),
        ],
    );

    // PATCH
    case(
        "patch/zero",
        vec![patch(
            "/images/rw",
            r#"{"op": "zero", "offset": 4096, "size": 8192}"#,
        )],
    );
    case(
        "patch/zero-flush",
        vec![patch(
            "/images/rw",
            r#"{"op": "zero", "size": 100000, "flush": true}"#,
        )],
    );
    case(
        "patch/zero-empty",
        vec![patch("/images/rw", r#"{"op": "zero", "size": 0}"#)],
    );
    case(
        "patch/flush",
        vec![patch("/images/rw", r#"{"op": "flush"}"#)],
    );
    case(
        "patch/flush-ignores-range",
        vec![patch(
            "/images/rw",
            r#"{"op": "flush", "offset": -5, "size": "x"}"#,
        )],
    );
    case(
        "patch/op-unknown",
        vec![patch("/images/rw", r#"{"op": "trim", "size": 1}"#)],
    );
    case(
        "patch/op-missing",
        vec![patch("/images/rw", r#"{"size": 1}"#)],
    );
    case(
        "patch/invalid-json",
        vec![patch("/images/rw", r#"{"op": "zero""#)],
    );
    case("patch/empty-body", vec![patch("/images/rw", "")]);
    case("patch/json-array", vec![patch("/images/rw", "[1]")]);
    case("patch/json-string", vec![patch("/images/rw", r#""zero""#)]);
    case(
        "patch/size-missing",
        vec![patch("/images/rw", r#"{"op": "zero"}"#)],
    );
    case(
        "patch/size-string",
        vec![patch("/images/rw", r#"{"op": "zero", "size": "10"}"#)],
    );
    case(
        "patch/size-negative",
        vec![patch("/images/rw", r#"{"op": "zero", "size": -1}"#)],
    );
    case(
        "patch/size-float",
        vec![patch("/images/rw", r#"{"op": "zero", "size": 1.5}"#)],
    );
    case(
        "patch/size-bool",
        vec![patch("/images/rw", r#"{"op": "zero", "size": true}"#)],
    );
    case(
        "patch/offset-negative",
        vec![patch(
            "/images/rw",
            r#"{"op": "zero", "offset": -1, "size": 1}"#,
        )],
    );
    case(
        "patch/flush-not-bool",
        vec![patch(
            "/images/rw",
            r#"{"op": "zero", "size": 1, "flush": "yes"}"#,
        )],
    );
    case(
        "patch/zero-beyond-ticket",
        vec![patch(
            "/images/rw",
            r#"{"op": "zero", "offset": 1048000, "size": 4096}"#,
        )],
    );
    case(
        "patch/read-only-ticket",
        vec![patch("/images/ro", r#"{"op": "zero", "size": 1}"#)],
    );
    case(
        "patch/flush-read-only",
        vec![patch("/images/ro", r#"{"op": "flush"}"#)],
    );
    case(
        "patch/no-such-ticket",
        vec![patch("/images/nope", r#"{"op": "flush"}"#)],
    );
    case(
        "patch/oversized-body",
        vec![patch(
            "/images/rw",
            &format!(r#"{{"op": "flush"{}}}"#, " ".repeat(100_000)),
        )],
    );
    case(
        "patch/origin",
        vec![patch("/images/rw", r#"{"op": "flush"}"#).h("Origin", "https://engine")],
    );

    // Several errors at once: which check comes first.
    case(
        "order/patch-invalid-json-no-such-ticket",
        vec![patch("/images/nope", "{")],
    );
    case(
        "order/get-suffix-range-no-such-ticket",
        vec![data("GET", "/images/nope").h("Range", "bytes=-5")],
    );
    case(
        "order/put-bad-content-range-no-such-ticket",
        vec![put("/images/nope", bytes(10, 23)).h("Content-Range", "bytes 9-1/*")],
    );
    case(
        "order/put-bad-flush-no-such-ticket",
        vec![put("/images/nope?flush=x", bytes(10, 24))],
    );
    case(
        "order/put-beyond-ticket-read-only",
        vec![put("/images/ro", bytes(4096, 25)).h("Content-Range", "bytes 1048000-1052095/*")],
    );
    case(
        "order/extents-bad-context-no-such-ticket",
        vec![data("GET", "/images/nope/extents?context=bogus")],
    );
    case(
        "put/chunked",
        vec![
            data("PUT", "/images/rw")
                .no_length()
                .h("Transfer-Encoding", "chunked")
                .h("Connection", "close")
                .body(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ],
    );
    case(
        "put/content-length-duplicated-different",
        vec![
            put("/images/rw", bytes(10, 26))
                .length(&["10", "20"])
                .half_close(),
        ],
    );
    case(
        "put/content-range-duplicated",
        vec![
            put("/images/rw", bytes(10, 27))
                .h("Content-Range", "bytes 0-9/*")
                .h("Content-Range", "bytes 100-109/*"),
        ],
    );
    case(
        "put/two-connections",
        vec![
            put("/images/rw", bytes(4096, 28)).h("Content-Range", "bytes 0-4095/*"),
            put("/images/rw", bytes(4096, 29))
                .h("Content-Range", "bytes 4096-8191/*")
                .conn(1),
            patch("/images/rw", r#"{"op": "flush"}"#).conn(1),
            patch("/images/rw", r#"{"op": "flush"}"#),
            data("GET", "/images/rw").h("Range", "bytes=0-8191").conn(2),
        ],
    );
    case(
        "get/close-other-values",
        vec![
            data("GET", "/images/rw?close=n").h("Range", "bytes=0-9"),
            data("GET", "/images/rw?close=x").h("Range", "bytes=0-9"),
            data("GET", "/images/rw?close=").h("Range", "bytes=0-9"),
        ],
    );
    case(
        "get/query-ignored",
        vec![data("GET", "/images/rw?flush=x&junk").h("Range", "bytes=0-9")],
    );
    case(
        "options/no-ops",
        vec![
            add("none", "[]", "{size}", ""),
            data("OPTIONS", "/images/none"),
        ],
    );
    case(
        "options/unknown-ops",
        vec![
            add("odd", r#"["read", "delete"]"#, "{size}", ""),
            data("OPTIONS", "/images/odd"),
        ],
    );
    case(
        "options/read-write-ops",
        vec![
            add("both", r#"["read", "write"]"#, "{size}", ""),
            data("OPTIONS", "/images/both"),
        ],
    );

    // Extents
    case("extents/default", vec![data("GET", "/images/rw/extents")]);
    case(
        "extents/zero",
        vec![data("GET", "/images/ro/extents?context=zero")],
    );
    case(
        "extents/dirty-not-enabled",
        vec![data("GET", "/images/rw/extents?context=dirty")],
    );
    case(
        "extents/dirty-enabled",
        vec![
            add("d", r#"["read"]"#, "{size}", r#""dirty": true"#),
            data("GET", "/images/d/extents?context=dirty"),
        ],
    );
    case(
        "extents/context-bogus",
        vec![data("GET", "/images/rw/extents?context=bogus")],
    );
    case(
        "extents/no-such-ticket",
        vec![data("GET", "/images/nope/extents")],
    );
    case(
        "extents/wrong-method",
        vec![data("PUT", "/images/rw/extents").body(b"x".to_vec())],
    );
    case(
        "extents/small-ticket",
        vec![
            add("small", r#"["read"]"#, "4096", ""),
            data("GET", "/images/small/extents"),
        ],
    );
    case(
        "extents/origin",
        vec![data("GET", "/images/rw/extents").h("Origin", "https://engine")],
    );

    case(
        "extents/range-extension",
        vec![data("GET", "/images/rw/extents?start=0&length=4096")],
    );
    case(
        "extents/range-extension-junk",
        vec![data("GET", "/images/rw/extents?start=x")],
    );
    case(
        "patch/zero-beyond-backend",
        vec![
            add("big", r#"["write"]"#, "2097152", ""),
            patch(
                "/images/big",
                r#"{"op": "zero", "offset": 1040000, "size": 100000}"#,
            ),
        ],
    );
    case(
        "put/beyond-backend",
        vec![
            add("big", r#"["write"]"#, "2097152", ""),
            put("/images/big", bytes(4096, 30)).h("Content-Range", "bytes 1046528-1050623/*"),
        ],
    );
    case(
        "put/flush-n-then-patch-flush",
        vec![
            put("/images/rw?flush=n", bytes(8192, 31)).h("Content-Range", "bytes 8192-16383/*"),
            patch("/images/rw", r#"{"op": "flush"}"#),
            data("GET", "/images/rw").h("Range", "bytes=8192-16383"),
        ],
    );
    case(
        "options/star-preflight-headers",
        vec![
            data("OPTIONS", "/images/*")
                .h("Origin", "https://engine")
                .h("Access-Control-Request-Headers", "content-range"),
        ],
    );
    case("info/query", vec![data("GET", "/info/?x=1")]);
    case(
        "route/delete-image-with-body",
        vec![
            data("DELETE", "/images/rw").body(b"xyz".to_vec()),
            data("GET", "/info/"),
        ],
    );

    // Checksum
    case("checksum/default", vec![data("GET", "/images/rw/checksum")]);
    case(
        "checksum/sha1",
        vec![data("GET", "/images/ro/checksum?algorithm=sha1")],
    );
    case(
        "checksum/md5-1m",
        vec![data(
            "GET",
            "/images/ro/checksum?algorithm=md5&block_size=1048576",
        )],
    );
    case(
        "checksum/sha256",
        vec![data("GET", "/images/ro/checksum?algorithm=sha256")],
    );
    case(
        "checksum/blake2s",
        vec![data("GET", "/images/ro/checksum?algorithm=blake2s")],
    );
    case(
        "checksum/bogus-algorithm",
        vec![data("GET", "/images/rw/checksum?algorithm=bogus")],
    );
    case(
        "checksum/broken-algorithm",
        vec![data("GET", "/images/rw/checksum?algorithm=shake_128")],
    );
    case(
        "checksum/block-size-junk",
        vec![data("GET", "/images/rw/checksum?block_size=abc")],
    );
    case(
        "checksum/block-size-small",
        vec![data("GET", "/images/rw/checksum?block_size=4096")],
    );
    case(
        "checksum/block-size-large",
        vec![data("GET", "/images/rw/checksum?block_size=33554432")],
    );
    case(
        "checksum/block-size-unaligned",
        vec![data("GET", "/images/rw/checksum?block_size=1050000")],
    );
    case(
        "checksum/no-such-ticket",
        vec![data("GET", "/images/nope/checksum")],
    );
    case(
        "checksum/no-such-ticket-bad-algorithm",
        vec![data("GET", "/images/nope/checksum?algorithm=bogus")],
    );
    case(
        "checksum/wrong-method",
        vec![data("PUT", "/images/rw/checksum").body(b"x".to_vec())],
    );
    case(
        "checksum/algorithms",
        vec![data("GET", "/images/whatever/checksum/algorithms")],
    );
    case(
        "checksum/algorithms-wrong-method",
        vec![data("PUT", "/images/x/checksum/algorithms").body(b"x".to_vec())],
    );
    case(
        "checksum/after-write",
        vec![
            put("/images/rw", bytes(70000, 19)).h("Content-Range", "bytes 500000-569999/*"),
            data("GET", "/images/rw/checksum"),
        ],
    );

    // /info/ and routing
    case("info/get", vec![data("GET", "/info/")]);
    case(
        "info/origin",
        vec![data("GET", "/info/").h("Origin", "https://engine")],
    );
    case("info/no-slash", vec![data("GET", "/info")]);
    case(
        "info/wrong-method",
        vec![data("PUT", "/info/").body(b"x".to_vec())],
    );
    case("route/unknown-path", vec![data("GET", "/nothing")]);
    case("route/invalid-method", vec![data("FOO", "/images/rw")]);
    case("route/head", vec![data("HEAD", "/images/rw")]);
    case("route/delete-image", vec![data("DELETE", "/images/rw")]);
    case(
        "route/post-image",
        vec![data("POST", "/images/rw").body(b"x".to_vec())],
    );
    case(
        "route/sub-resource-typo",
        vec![data("GET", "/images/rw/extent")],
    );
    case(
        "route/request-line-too-long",
        vec![data("GET", &format!("/images/{}", "a".repeat(5000)))],
    );
    case("route/control-on-data", vec![data("GET", "/tickets/rw")]);

    // Control API
    case("tickets/get", vec![ctl("GET", "/tickets/rw")]);
    case("tickets/get-no-such", vec![ctl("GET", "/tickets/nope")]);
    case("tickets/get-empty-id", vec![ctl("GET", "/tickets/")]);
    case("tickets/no-slash", vec![ctl("GET", "/tickets")]);
    case(
        "tickets/add-full",
        vec![
            add(
                "full",
                r#"["read", "write"]"#,
                "{size}",
                r#""inactivity_timeout": 30, "transfer_id": "t-1", "filename": "a.raw", "sparse": true, "dirty": false"#,
            ),
            ctl("GET", "/tickets/full"),
        ],
    );
    case(
        "tickets/add-not-json",
        vec![ctl("PUT", "/tickets/x").json("{not json")],
    );
    case(
        "tickets/add-not-object",
        vec![ctl("PUT", "/tickets/x").json("[1, 2]")],
    );
    case(
        "tickets/add-missing-size",
        vec![
            ctl("PUT", "/tickets/x")
                .json(r#"{"uuid": "x", "ops": ["read"], "timeout": 300, "url": "{url}"}"#),
        ],
    );
    case(
        "tickets/add-missing-url",
        vec![
            ctl("PUT", "/tickets/x")
                .json(r#"{"uuid": "x", "size": 1, "ops": ["read"], "timeout": 300}"#),
        ],
    );
    case(
        "tickets/add-missing-uuid",
        vec![
            ctl("PUT", "/tickets/x")
                .json(r#"{"size": 1, "ops": ["read"], "timeout": 300, "url": "{url}"}"#),
        ],
    );
    case(
        "tickets/add-size-string",
        vec![add("x", r#"["read"]"#, r#""1""#, "")],
    );
    case(
        "tickets/add-size-float",
        vec![add("x", r#"["read"]"#, "1.5", "")],
    );
    case(
        "tickets/add-size-negative",
        vec![add("x", r#"["read"]"#, "-1", "")],
    );
    case(
        "tickets/add-size-2-64",
        vec![
            add("x", r#"["read"]"#, "18446744073709551616", ""),
            ctl("GET", "/tickets/x"),
        ],
    );
    case(
        "tickets/add-ops-not-list",
        vec![add("x", r#""read""#, "{size}", "")],
    );
    case(
        "tickets/add-bad-scheme",
        vec![ctl("PUT", "/tickets/x").json(
            r#"{"uuid": "x", "size": 1, "ops": ["read"], "timeout": 300, "url": "s3://bucket/x"}"#,
        )],
    );
    case(
        "tickets/add-sparse-not-bool",
        vec![add("x", r#"["read"]"#, "{size}", r#""sparse": 1"#)],
    );
    case(
        "tickets/add-timeout-string",
        vec![ctl("PUT", "/tickets/x").json(
            r#"{"uuid": "x", "size": 1, "ops": ["read"], "timeout": "300", "url": "{url}"}"#,
        )],
    );
    case(
        "tickets/add-path-mismatch",
        vec![
            ctl("PUT", "/tickets/other").json(
                r#"{"uuid": "x", "size": 1, "ops": ["read"], "timeout": 300, "url": "{url}"}"#,
            ),
        ],
    );
    case(
        "tickets/add-empty-path-id",
        vec![
            ctl("PUT", "/tickets/").json(
                r#"{"uuid": "x", "size": 1, "ops": ["read"], "timeout": 300, "url": "{url}"}"#,
            ),
        ],
    );
    case(
        "tickets/add-oversized",
        vec![ctl("PUT", "/tickets/x").json(&format!(
            r#"{{"uuid": "x", "size": 1, "ops": ["read"], "timeout": 300, "url": "{{url}}", "pad": "{}"}}"#,
            "p".repeat(100_000)
        ))],
    );
    case(
        "tickets/replace",
        vec![
            add("rw", r#"["read"]"#, "4096", ""),
            ctl("GET", "/tickets/rw"),
            put("/images/rw", bytes(10, 20)),
        ],
    );
    case(
        "tickets/extend",
        vec![
            ctl("PATCH", "/tickets/rw").json(r#"{"timeout": 600}"#),
            ctl("GET", "/tickets/rw"),
        ],
    );
    case(
        "tickets/extend-no-such",
        vec![ctl("PATCH", "/tickets/nope").json(r#"{"timeout": 600}"#)],
    );
    case(
        "tickets/extend-missing",
        vec![ctl("PATCH", "/tickets/rw").json(r#"{}"#)],
    );
    case(
        "tickets/extend-invalid-json",
        vec![ctl("PATCH", "/tickets/rw").json("{")],
    );
    case(
        "tickets/extend-negative",
        vec![ctl("PATCH", "/tickets/rw").json(r#"{"timeout": -1}"#)],
    );
    case(
        "tickets/extend-string",
        vec![ctl("PATCH", "/tickets/rw").json(r#"{"timeout": "1"}"#)],
    );
    case(
        "tickets/extend-empty-id",
        vec![ctl("PATCH", "/tickets/").json(r#"{"timeout": 1}"#)],
    );
    case(
        "tickets/expired-by-extend",
        vec![
            ctl("PATCH", "/tickets/rw").json(r#"{"timeout": 0}"#),
            data("GET", "/images/rw").h("Range", "bytes=0-9"),
            data("OPTIONS", "/images/rw"),
            put("/images/rw", bytes(10, 21)),
            patch("/images/rw", r#"{"op": "flush"}"#),
            data("GET", "/images/rw/extents"),
            data("GET", "/images/rw/checksum"),
            ctl("PATCH", "/tickets/rw").json(r#"{"timeout": 300}"#),
            data("GET", "/images/rw").h("Range", "bytes=0-9"),
        ],
    );
    case(
        "tickets/expired-at-add",
        vec![
            ctl("PUT", "/tickets/exp").json(r#"{"uuid": "exp", "size": {size}, "ops": ["write"], "timeout": 0, "url": "{url}"}"#),
            data("GET", "/images/exp").h("Range", "bytes=0-9"),
        ],
    );
    case(
        "tickets/delete",
        vec![
            data("GET", "/images/rw").h("Range", "bytes=0-9"),
            ctl("DELETE", "/tickets/rw"),
            data("GET", "/images/rw").h("Range", "bytes=0-9"),
            ctl("GET", "/tickets/rw"),
        ],
    );
    case(
        "tickets/delete-no-such",
        vec![ctl("DELETE", "/tickets/nope")],
    );
    case(
        "tickets/delete-with-open-connection",
        vec![
            data("GET", "/images/rw").h("Range", "bytes=0-9").conn(1),
            ctl("DELETE", "/tickets/rw"),
            data("GET", "/images/rw").h("Range", "bytes=0-9").conn(1),
            data("OPTIONS", "/images/rw").conn(2),
        ],
    );
    case(
        "tickets/delete-all",
        vec![
            ctl("DELETE", "/tickets/"),
            ctl("GET", "/tickets/ro"),
            data("GET", "/images/ro"),
        ],
    );
    case(
        "tickets/wrong-method",
        vec![ctl("POST", "/tickets/rw").body(b"x".to_vec())],
    );
    case("tickets/invalid-method", vec![ctl("FOO", "/tickets/rw")]);
    case(
        "tickets/info-after-transfer",
        vec![
            data("GET", "/images/ro").h("Range", "bytes=0-65535"),
            ctl("GET", "/tickets/ro"),
            put("/images/rw", bytes(4096, 22)).h("Content-Range", "bytes 0-4095/*"),
            ctl("GET", "/tickets/rw"),
        ],
    );

    c.into_iter()
        .map(|(name, steps)| Case { name, steps })
        .collect()
}
