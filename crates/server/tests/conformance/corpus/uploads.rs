//! Cases for the write side of the data API: PUT and PATCH, and the order in which a
//! request's checks run when several fail.

use super::*;

pub fn cases(case: &mut impl FnMut(&str, Vec<Step>)) {
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
    // ferry takes zstd bodies and refuses other encodings; what the reference does with a
    // Content-Encoding it does not know is recorded here.
    case(
        "put/content-encoding-unknown",
        vec![
            put("/images/rw", bytes(4096, 12))
                .h("Content-Range", "bytes 0-4095/*")
                .h("Content-Encoding", "gzip"),
            data("GET", "/images/rw").h("Range", "bytes=0-4095"),
        ],
    );
    case(
        "put/content-encoding-identity",
        vec![
            put("/images/rw", bytes(4096, 13))
                .h("Content-Range", "bytes 0-4095/*")
                .h("Content-Encoding", "identity"),
        ],
    );
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
}
