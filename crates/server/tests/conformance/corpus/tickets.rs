//! Cases for the control API: adding, reading, extending and deleting tickets, and
//! tickets that expire or go away while a client holds a connection.

use super::*;

pub fn cases(case: &mut impl FnMut(&str, Vec<Step>)) {
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
}
