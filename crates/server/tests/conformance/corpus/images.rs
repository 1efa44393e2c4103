//! Cases for the read side of the data API: OPTIONS, GET, extents, checksums, `/info/`
//! and routing.

use super::*;

pub fn cases(case: &mut impl FnMut(&str, Vec<Step>)) {
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
}
