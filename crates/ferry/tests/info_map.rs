//! `ferry info` and `ferry map` through the real binary, checked against nbdinfo (libnbd) on
//! the same qemu-nbd and nbdkit exports, and against the known layout of a sparse local file.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;
use testutil::tools::run as run_tool;
use testutil::{Layout, Nbdkit, QemuNbd, Segment};

fn nbdinfo(args: &[&str]) -> String {
    run_tool(Command::new(testutil::require_binary("nbdinfo")).args(args))
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"))
}

/// A sample raw image served read-only by qemu-nbd.
fn served_sample(dir: &std::path::Path) -> (Layout, testutil::Peer) {
    let (path, layout) = make_sample(dir, "sample.raw");
    (layout, QemuNbd::new(&path).read_only().start())
}

#[test]
fn map_text_is_identical_to_nbdinfo() {
    let dir = testutil::temp_dir();
    let (_, server) = served_sample(dir.path());
    let uri = server.nbd_uri();
    let ours = ferry(["map", &uri]).run();
    ours.expect_ok();
    let theirs = nbdinfo(&["--map", &uri]);
    assert!(theirs.lines().count() > 5, "a dull map:\n{theirs}");
    assert_eq!(ours.stdout_text(), theirs);
}

#[test]
fn map_json_equals_nbdinfo_json() {
    let dir = testutil::temp_dir();
    let (_, server) = served_sample(dir.path());
    let uri = server.nbd_uri();
    let ours = ferry(["map", "--json", &uri]).run();
    ours.expect_ok();
    assert_eq!(
        json(&ours.stdout_text()),
        json(&nbdinfo(&["--map", "--json", &uri]))
    );
}

#[test]
fn map_of_an_nbdkit_export_equals_nbdinfo() {
    let dir = testutil::temp_dir();
    let (path, _) = make_sample(dir.path(), "sample.raw");
    let server = Nbdkit::new("file")
        .arg(&format!("file={}", path.display()))
        .read_only()
        .start();
    let uri = server.nbd_uri();
    let ours = ferry(["map", &uri]).run();
    ours.expect_ok();
    assert_eq!(ours.stdout_text(), nbdinfo(&["--map", &uri]));
}

#[test]
fn map_allocation_depth_equals_nbdinfo() {
    let dir = testutil::temp_dir();
    // A qcow2 overlay over a backing file: unallocated, local and backing ranges.
    let (raw, _) = make_sample(dir.path(), "base.raw");
    let base = dir.path().join("base.qcow2");
    testutil::image::convert_to_qcow2(&raw, &base);
    let overlay = dir.path().join("overlay.qcow2");
    let (b, o) = (base.to_str().unwrap(), overlay.to_str().unwrap());
    testutil::tools::qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", o]);
    testutil::tools::qemu_io(
        &overlay,
        "qcow2",
        &["write -P 0x11 512k 1M", "write -z 9M 1M"],
    );
    let server = QemuNbd::new(&overlay)
        .format("qcow2")
        .read_only()
        .allocation_depth()
        .start();
    let uri = server.nbd_uri();
    let context = "qemu:allocation-depth";
    let theirs = nbdinfo(&[&format!("--map={context}"), &uri]);
    let kinds: std::collections::BTreeSet<&str> = theirs
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert!(kinds.len() >= 3, "expected depths 0, 1 and 2:\n{theirs}");
    let ours = ferry(["map", "--context", context, &uri]).run();
    ours.expect_ok();
    assert_eq!(ours.stdout_text(), theirs);
    let ours = ferry(["map", "--json", "--context", context, &uri]).run();
    ours.expect_ok();
    assert_eq!(
        json(&ours.stdout_text()),
        json(&nbdinfo(&[&format!("--map={context}"), "--json", &uri]))
    );
}

#[test]
fn map_of_a_sparse_local_file_follows_its_layout() {
    let dir = testutil::temp_dir();
    let (path, layout) = make_sample(dir.path(), "sample.raw");
    // Expected: written runs (data and zeroes written as data) are data, holes are hole,zero.
    let mut expected: Vec<(u64, u64, u64)> = Vec::new();
    for (offset, segment) in layout.placed() {
        let kind = if matches!(segment, Segment::Hole(_)) {
            3
        } else {
            0
        };
        match expected.last_mut() {
            Some(last) if last.2 == kind => last.1 += segment.len(),
            _ => expected.push((offset, segment.len(), kind)),
        }
    }
    let ours = ferry(["map", "--json", path.to_str().unwrap()]).run();
    ours.expect_ok();
    let got: Vec<(u64, u64, u64)> = json(&ours.stdout_text())
        .as_array()
        .expect("a JSON list")
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{e}"));
            (n("offset"), n("length"), n("type"))
        })
        .collect();
    assert_eq!(got, expected);
    // The text form agrees with nbdinfo reading the same file through qemu-nbd.
    let server = QemuNbd::new(&path).read_only().start();
    let text = ferry(["map", path.to_str().unwrap()]).run();
    text.expect_ok();
    assert_eq!(text.stdout_text(), nbdinfo(&["--map", &server.nbd_uri()]));
}

#[test]
fn map_of_an_unknown_context_fails() {
    let dir = testutil::temp_dir();
    let (_, server) = served_sample(dir.path());
    let run = ferry([
        "map",
        "--context",
        "qemu:dirty-bitmap:nope",
        &server.nbd_uri(),
    ])
    .run();
    assert!(
        run.expect_code(1).contains("qemu:dirty-bitmap:nope"),
        "{}",
        run.stderr
    );
    ferry(["map", "nbd+unix:///"]).run().expect_code(2);
    // Streams have nothing to describe or map: usage errors, like a malformed URI.
    for word in ["-", "null:"] {
        for command in ["info", "map"] {
            let run = ferry([command, word]).run();
            assert!(
                run.expect_code(2)
                    .contains("an NBD export, an http(s) URL or a local file"),
                "{}",
                run.stderr
            );
        }
    }
}

#[test]
fn info_json_fields_match_nbdinfo_for_qemu_nbd() {
    let dir = testutil::temp_dir();
    let (path, layout) = make_sample(dir.path(), "sample.raw");
    let server = QemuNbd::new(&path)
        .read_only()
        .allocation_depth()
        .export_name("disk0")
        .description("the sample")
        .start();
    let uri = server.nbd_uri();
    let ours = ferry(["info", "--json", &uri]).run();
    ours.expect_ok();
    let ours = json(&ours.stdout_text());
    let theirs = json(&nbdinfo(&["--json", &uri]));
    let export = &theirs["exports"][0];

    assert_eq!(ours["size"].as_u64(), Some(layout.size()));
    assert_eq!(ours["size"], export["export-size"]);
    assert_eq!(ours["export"], "disk0");
    assert_eq!(ours["description"], "the sample");
    for (field, theirs_field) in [
        ("minimum", "block_size_minimum"),
        ("preferred", "block_size_preferred"),
        ("maximum", "block_size_maximum"),
    ] {
        assert_eq!(ours["block_size"][field], export[theirs_field], "{field}");
    }
    // qemu-nbd 10 speaks extended headers (nbdinfo 1.14 stops at structured replies).
    assert_eq!(ours["negotiated"]["replies"], "extended", "{ours:#}");
    assert_eq!(ours["negotiated"]["structured_replies"], true);
    assert_eq!(ours["negotiated"]["tls"], false);
    assert_eq!(ours["multi_conn"], export["can_multi_conn"]);
    let flags: Vec<&str> = ours["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(flags.contains(&"read_only"), "{flags:?}");
    let sorted = |v: &Value| {
        let mut names: Vec<String> = v
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    assert_eq!(sorted(&ours["contexts"]), sorted(&export["contexts"]));
    assert!(sorted(&ours["contexts"]).contains(&"qemu:allocation-depth".to_string()));
}

#[test]
fn info_reports_structured_replies_from_nbdkit() {
    // nbdkit 1.32 predates extended headers.
    let server = Nbdkit::new("memory").arg("size=1M").start();
    let ours = ferry(["info", "--json", &server.nbd_uri()]).run();
    ours.expect_ok();
    let ours = json(&ours.stdout_text());
    assert_eq!(ours["negotiated"]["replies"], "structured", "{ours:#}");
    assert_eq!(ours["size"].as_u64(), Some(MIB));
    assert_eq!(ours["multi_conn"], true);
}

#[test]
fn info_list_shows_the_exports_of_qemu_nbd() {
    let dir = testutil::temp_dir();
    let (path, _) = make_sample(dir.path(), "sample.raw");
    let server = QemuNbd::new(&path)
        .read_only()
        .export_name("vm-disk")
        .description("a test disk")
        .start();
    // Listing does not need the export's name in the URI.
    let uri = server.uri_for("");
    let ours = ferry(["info", "--list", "--json", &uri]).run();
    ours.expect_ok();
    let ours = json(&ours.stdout_text());
    assert_eq!(
        ours,
        serde_json::json!([{"name": "vm-disk", "description": "a test disk"}])
    );
    let theirs = json(&nbdinfo(&["--list", "--json", &uri]));
    let names: Vec<&Value> = theirs["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| &e["export-name"])
        .collect();
    assert_eq!(names, vec![&ours[0]["name"]]);
    let text = ferry(["info", "--list", &uri]).run();
    text.expect_ok();
    assert!(
        text.stdout_text().contains("\"vm-disk\"\ta test disk"),
        "{}",
        text.stdout_text()
    );
}

#[test]
fn info_of_a_local_file() {
    let dir = testutil::temp_dir();
    let (path, layout) = make_sample(dir.path(), "sample.raw");
    let run = ferry(["info", "--json", path.to_str().unwrap()]).run();
    run.expect_ok();
    let info = json(&run.stdout_text());
    assert_eq!(info["size"].as_u64(), Some(layout.size()));
    assert_eq!(info["allocated"].as_u64(), Some(allocated(&path)));
    assert_eq!(info["kind"], "regular file");
    let run = ferry(["info", "--list", path.to_str().unwrap()]).run();
    run.expect_code(2);
}
