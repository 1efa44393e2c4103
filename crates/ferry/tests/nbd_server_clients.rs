//! `ferry nbd-server` (the real binary, ready once it writes `--ready-file`) against real
//! clients: nbdcopy (reading and writing, four connections), nbdinfo (`--map`, `--list`,
//! `--can`), qemu-img (`convert` both ways, `compare`, `map`; qemu negotiates extended
//! headers), and ferry's own client (`info`, `map`, `copy` both ways). Every client runs
//! under a timeout; every server is on a private Unix socket (or a free loopback port).

mod nbd_server_common;

use nbd_server_common::*;
use testutil::tools::{nbdinfo_map, qemu_img_map};

/// nbdcopy with `-C 4 -T 4` reads the export over four connections (the server advertises
/// multi-conn), into a file and into `null:`.
#[test]
fn nbdcopy_reads_over_four_connections() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let img = image(dir.path(), "src.raw", &layout);
    let peer = server(&img).read_only().start();
    let uri = peer.nbd_uri();
    assert_eq!(peer.ready_uri(), uri, "the ready file names the URI");
    assert!(nbdinfo_flag("--can", "multi-conn", &uri));

    let before = connections(&peer);
    let out = dir.path().join("out.raw");
    run(
        "nbdcopy",
        &["-C", "4", "-T", "4", &uri, out.to_str().unwrap()],
    )
    .expect_success();
    assert_contents(&out, &layout.expected());
    let used = connections(&peer) - before;
    assert_eq!(used, 4, "nbdcopy opened {used} connections, not 4");

    run("nbdcopy", &["-C", "4", "-T", "4", &uri, "null:"]).expect_success();
}

/// nbdcopy writes an image into the server over four connections; every byte lands,
/// including zero runs over a destination that held other data.
#[test]
fn nbdcopy_writes_over_four_connections() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let dst = garbage_file(dir.path(), "dst.raw", layout.size());
    let peer = server(&dst).start();
    let uri = peer.nbd_uri();
    assert!(nbdinfo_flag("--can", "multi-conn", &uri));
    assert!(nbdinfo_flag("--can", "write", &uri));
    let before = connections(&peer);
    run(
        "nbdcopy",
        &["-C", "4", "-T", "4", "--flush", src.to_str().unwrap(), &uri],
    )
    .expect_success();
    let used = connections(&peer) - before;
    assert_eq!(used, 4, "nbdcopy opened {used} connections, not 4");
    assert_same_file(&src, &dst);
}

/// nbdinfo: the summary, `--can` flags of a writable export, `--list` with the export name,
/// and `--map` equal to the file's real holes.
#[test]
fn nbdinfo_map_list_and_can() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let img = image(dir.path(), "disk.raw", &layout);
    let peer = server(&img).export_name("disk").start();
    let uri = peer.nbd_uri();
    assert!(uri.starts_with("nbd+unix:///disk?socket="), "{uri}");

    let summary = run("nbdinfo", &[&uri]);
    let text = summary.expect_success();
    assert!(
        text.contains(&format!("export-size: {}", layout.size())),
        "{text}"
    );
    assert!(text.contains("base:allocation"), "{text}");
    for what in [
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "cache",
        "df",
        "multi-conn",
    ] {
        assert!(nbdinfo_flag("--can", what, &uri), "--can {what}");
    }
    assert!(!nbdinfo_flag("--is", "read-only", &uri));

    let list = run("nbdinfo", &["--list", "--json", &uri]);
    let json: serde_json::Value = serde_json::from_str(list.expect_success()).unwrap();
    let names: Vec<&str> = json["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["disk"]);

    let map = nbdinfo_map(&uri, None);
    assert_map_matches_file(&map, &img, &layout.expected(), "nbdinfo --map");
    // The layout's data and holes are really there (the file system kept them sparse).
    let file = file_map(&img);
    assert!(file.iter().any(|r| !r.2 && r.1 >= MIB), "{file:?}");
}

/// A map over holes longer than 4 GiB (nbdinfo uses compact 32-bit descriptors, qemu-img
/// extended headers) still lines up with the file.
#[test]
fn map_of_a_large_sparse_file() {
    let dir = testutil::temp_dir();
    let layout = testutil::Layout::new()
        .data(64 * KIB, 1)
        .hole(5 << 30)
        .data(MIB, 2)
        .hole(1 << 30)
        .data(4 * KIB, 3);
    let img = dir.path().join("big.raw");
    testutil::make_sparse_image(&img, &layout);
    let peer = server(&img).read_only().start();
    let uri = peer.nbd_uri();
    let file = file_map(&img);
    let as_extents = |runs: &[(u64, u64, bool)]| -> Vec<(u64, u64, bool)> { runs.to_vec() };

    let nbdinfo: Vec<(u64, u64, bool)> = testutil::tools::merge(&nbdinfo_map(&uri, None))
        .iter()
        .map(|e| (e.offset, e.length, e.flags & 1 == 0))
        .collect();
    assert_eq!(nbdinfo, as_extents(&file), "nbdinfo --map");

    let qemu = qemu_img_map(&uri, "raw");
    let mut merged: Vec<(u64, u64, bool)> = Vec::new();
    for e in qemu {
        match merged.last_mut() {
            Some(last) if last.2 == e.data && last.0 + last.1 == e.start => last.1 += e.length,
            _ => merged.push((e.start, e.length, e.data)),
        }
    }
    assert_eq!(merged, file, "qemu-img map");

    let ferry_map = ferry(&["map", "--json", &uri]);
    let json: serde_json::Value = serde_json::from_str(ferry_map.expect_success()).unwrap();
    let mut merged: Vec<(u64, u64, bool)> = Vec::new();
    for e in json.as_array().unwrap() {
        let (offset, length) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let data = e["type"].as_u64().unwrap() & 1 == 0;
        match merged.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == offset => last.1 += length,
            _ => merged.push((offset, length, data)),
        }
    }
    assert_eq!(merged, file, "ferry map");
}

/// A read-only server: nbdinfo says it cannot write, and writes through nbdcopy, qemu-img
/// and ferry all fail, leaving the file as it was.
#[test]
fn read_only_server_refuses_writes() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let img = image(dir.path(), "disk.raw", &layout);
    let src = garbage_file(dir.path(), "other.raw", layout.size());
    let peer = server(&img).read_only().start();
    let uri = peer.nbd_uri();
    assert!(!nbdinfo_flag("--can", "write", &uri));
    assert!(nbdinfo_flag("--is", "read-only", &uri));
    for what in ["trim", "zero", "flush"] {
        assert!(!nbdinfo_flag("--can", what, &uri), "--can {what}");
    }

    let nbdcopy = run("nbdcopy", &[src.to_str().unwrap(), &uri]);
    let err = nbdcopy.expect_failure().to_lowercase();
    assert!(
        err.contains("read-only") || err.contains("operation not permitted"),
        "nbdcopy: {err}"
    );
    let qemu = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    qemu.expect_failure();
    let ferry_copy = ferry(&["copy", src.to_str().unwrap(), &uri]);
    assert!(
        ferry_copy.expect_failure().contains("read-only"),
        "{}",
        ferry_copy.stderr
    );
    assert_contents(&img, &layout.expected());
}

/// qemu-img convert into the server and out of it (raw and qcow2), compare (which also
/// catches a difference), and map — over `nbd+unix://`. qemu negotiates extended headers.
#[test]
fn qemu_img_convert_compare_and_map() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let dst = garbage_file(dir.path(), "dst.raw", layout.size());
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();

    // Into the server.
    let peer = server(&dst).start();
    let uri = peer.nbd_uri();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &s(&src), &uri],
    )
    .expect_success();
    assert_same_file(&src, &dst);
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &s(&src), &uri],
    );
    assert!(cmp.expect_success().contains("identical"), "{}", cmp.stdout);
    assert!(
        peer.log().contains("headers=Extended"),
        "qemu-img did not use extended headers:\n{}",
        peer.log()
    );
    // Change one byte behind the server's back: compare must notice.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
        f.write_all_at(&[0x42], 5 * MIB + 7).unwrap();
    }
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &s(&src), &uri],
    );
    assert_eq!(cmp.code(), Some(1), "compare missed a difference: {cmp:?}");
    drop(peer);

    // Out of the server, to raw and to qcow2.
    let peer = server(&src).read_only().start();
    let uri = peer.nbd_uri();
    let out = dir.path().join("out.raw");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &s(&out)],
    )
    .expect_success();
    assert_same_file(&src, &out);
    let qcow = dir.path().join("out.qcow2");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &uri, &s(&qcow)],
    )
    .expect_success();
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &s(&src), &s(&qcow)],
    )
    .expect_success();

    // qemu-img map: data exactly where the file has data, everything else reads as zero.
    let map = qemu_img_map(&uri, "raw");
    let mut merged: Vec<(u64, u64, bool)> = Vec::new();
    for e in &map {
        assert!(e.data || e.zero, "{e:?}: neither data nor zero");
        match merged.last_mut() {
            Some(last) if last.2 == e.data && last.0 + last.1 == e.start => last.1 += e.length,
            _ => merged.push((e.start, e.length, e.data)),
        }
    }
    assert_eq!(merged, file_map(&src), "qemu-img map");
}

/// ferry's own client: `info` (JSON), `map` (JSON, equal to the file's holes), and `copy`
/// out of and into the server.
#[test]
fn ferry_client_info_map_and_copy() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let peer = server(&src).read_only().start();
    let uri = peer.nbd_uri();

    let info = ferry(&["info", "--json", &uri]);
    let json: serde_json::Value = serde_json::from_str(info.expect_success()).unwrap();
    assert_eq!(json["size"].as_u64(), Some(layout.size()), "{json}");
    assert_eq!(json["multi_conn"].as_bool(), Some(true), "{json}");
    assert_eq!(json["negotiated"]["extended_headers"].as_bool(), Some(true));
    let flags: Vec<&str> = json["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(flags.contains(&"read_only"), "{flags:?}");
    assert!(!flags.contains(&"send_write_zeroes"), "{flags:?}");
    assert_eq!(json["block_size"]["advertised"].as_bool(), Some(true));
    assert!(
        json["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "{json}"
    );

    let map = ferry(&["map", "--json", &uri]);
    let json: serde_json::Value = serde_json::from_str(map.expect_success()).unwrap();
    let extents: Vec<testutil::MapExtent> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|e| testutil::MapExtent {
            offset: e["offset"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            flags: e["type"].as_u64().unwrap(),
        })
        .collect();
    assert_map_matches_file(&extents, &src, &layout.expected(), "ferry map");

    let out = dir.path().join("out.raw");
    ferry(&["copy", &uri, out.to_str().unwrap()]).expect_success();
    assert_same_file(&src, &out);
    drop(peer);

    let dst = garbage_file(dir.path(), "dst.raw", layout.size());
    let peer = server(&dst).start();
    let before = connections(&peer);
    ferry(&["copy", src.to_str().unwrap(), &peer.nbd_uri()]).expect_success();
    assert_same_file(&src, &dst);
    assert!(connections(&peer) - before >= 1);
}

/// A client asking for another export name is refused (and the right name works).
#[test]
fn wrong_export_name_is_refused() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let img = image(dir.path(), "disk.raw", &layout);
    let peer = server(&img).export_name("disk").read_only().start();
    let wrong = peer.uri_with("nbd", "other", &[]);
    let empty = peer.uri_with("nbd", "", &[]);
    for uri in [&wrong, &empty] {
        run("nbdinfo", &[uri]).expect_failure();
        let info = ferry(&["info", uri]);
        let err = info.expect_failure();
        assert!(
            err.contains("NBD_REP_ERR_UNKNOWN"),
            "ferry info {uri}: {err}"
        );
        run("qemu-img", &["info", "-f", "raw", uri]).expect_failure();
    }
    run("nbdinfo", &[&peer.nbd_uri()]).expect_success();
}

/// `--listen 127.0.0.1:0`: the ready file names the port, and clients connect over TCP.
#[test]
fn tcp_listener() {
    let dir = testutil::temp_dir();
    let layout = layout();
    let img = image(dir.path(), "disk.raw", &layout);
    let peer = server(&img).tcp().read_only().start();
    let uri = peer.nbd_uri();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    assert_eq!(peer.ready_uri(), uri);
    let out = dir.path().join("out.raw");
    run("nbdcopy", &[&uri, out.to_str().unwrap()]).expect_success();
    assert_same_file(&img, &out);
    ferry(&["info", &uri]).expect_success();
}
