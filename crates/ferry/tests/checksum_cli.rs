//! `ferry checksum` end to end: the real binary on a sparse file, the same image over NBD
//! (qemu-nbd) and as a qcow2 behind `[ qemu-nbd -f qcow2 … ]`, both constructions, several
//! algorithms and block sizes, with and without extents — every digest compared with the
//! blkhash reference over the image's bytes and with the ovirt-imageio daemon's `/checksum`.
//! Plus the published vectors from the command line, JSON output, and exit codes.

mod common;

use std::path::Path;

use common::{MIB, ferry, make_sample};
use testutil::imageio::{ImageioServer, ServerOptions};

fn reference(args: &[&str], image: &[u8]) -> String {
    let get = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .map(|i| args[i + 1].to_string())
    };
    let kind: blkhash::Kind = get("--kind")
        .as_deref()
        .unwrap_or("imageio")
        .parse()
        .unwrap();
    let alg = get("--algorithm").map(|a| a.parse().unwrap());
    let block = get("--block-size").map(|b| units::parse_size(&b).unwrap());
    let spec = blkhash::Spec::new(kind, alg, block).unwrap();
    blkhash::reference::checksum(&spec, image).to_hex()
}

fn checksum(endpoint: &str, args: &[&str]) -> String {
    let mut all = vec!["checksum", endpoint];
    all.extend_from_slice(args);
    let run = ferry(&all).run();
    run.expect_ok();
    let out = run.stdout_text();
    assert!(out.ends_with('\n'), "{out:?}");
    out.trim().to_string()
}

const SPECS: &[&[&str]] = &[
    &[],
    &["--algorithm", "sha1", "--block-size", "1M"],
    &["--algorithm", "sha3_256", "--block-size", "16M"],
    &["--kind", "blkhash"],
    &[
        "--kind",
        "blkhash",
        "--algorithm",
        "md5",
        "--block-size",
        "4k",
    ],
    &[
        "--kind",
        "blkhash",
        "--algorithm",
        "sha512",
        "--block-size",
        "1M",
    ],
];

#[test]
fn file_nbd_and_qcow2_endpoints_agree_with_the_reference() {
    let dir = testutil::temp_dir();
    let (path, layout) = make_sample(dir.path(), "img.raw");
    let image = layout.expected();
    let qcow2 = dir.path().join("img.qcow2");
    testutil::image::convert_to_qcow2(&path, &qcow2);
    let qemu = testutil::QemuNbd::new(&path).read_only().shared(8).start();
    let uri = qemu.nbd_uri();
    let file = path.display().to_string();
    for spec in SPECS {
        let want = reference(spec, &image);
        assert_eq!(checksum(&file, spec), want, "file {spec:?}");
        let mut no_extents = spec.to_vec();
        no_extents.push("--no-extents");
        assert_eq!(checksum(&file, &no_extents), want, "file {no_extents:?}");
        assert_eq!(checksum(&uri, spec), want, "nbd {spec:?}");
        let mut small_reads = spec.to_vec();
        small_reads.extend(["--request-size", "192k", "-R", "3"]);
        assert_eq!(checksum(&uri, &small_reads), want, "nbd {small_reads:?}");
    }
    // The guest's bytes, not the qcow2 file's: a socket-activated qemu-nbd reads the format.
    let mut argv = vec!["checksum", "[", "qemu-nbd", "-f", "qcow2"];
    let q = qcow2.display().to_string();
    argv.extend([q.as_str(), "]"]);
    let run = ferry(&argv).run();
    run.expect_ok();
    assert_eq!(run.stdout_text().trim(), reference(&[], &image));
}

#[test]
fn same_value_as_the_imageio_daemon() {
    let dir = testutil::temp_dir();
    let (path, _) = make_sample(dir.path(), "img.raw");
    let size = std::fs::metadata(&path).unwrap().len();
    let daemon = ImageioServer::daemon(&ServerOptions::default());
    daemon.file_ticket("t", &path, size, &["read"]);
    for (query, args) in [
        ("", vec![]),
        (
            "?algorithm=sha256&block_size=1048576",
            vec!["--algorithm", "sha256", "--block-size", "1M"],
        ),
    ] {
        let out = std::process::Command::new("curl")
            .args(["-s", "-S", "--max-time", "60"])
            .arg(format!("{}/checksum{query}", daemon.url("t")))
            .output()
            .expect("running curl");
        let theirs: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        let mut all = vec!["checksum", "--json"];
        let file = path.display().to_string();
        all.push(&file);
        all.extend(args.iter().copied());
        let run = ferry(&all).run();
        run.expect_ok();
        let ours: serde_json::Value = serde_json::from_str(&run.stdout_text()).unwrap();
        for key in ["algorithm", "block_size", "checksum"] {
            assert_eq!(ours[key], theirs[key], "{key} for {query:?}");
        }
    }
    // Through the daemon itself: by default the server computes it (its /checksum); with
    // --read ferry reads the ticket over HTTP and hashes locally. Both equal the reference.
    let expected = reference(&[], &std::fs::read(&path).unwrap());
    for (extra, by) in [(None, "server"), (Some("--read"), "ferry")] {
        let mut args = vec!["checksum", "--json"];
        args.extend(extra);
        let url = daemon.url("t");
        args.push(&url);
        let run = ferry(args).run();
        run.expect_ok();
        let doc: serde_json::Value = serde_json::from_str(&run.stdout_text()).unwrap();
        assert_eq!(doc["checksum"], expected.as_str(), "{extra:?}");
        assert_eq!(doc["computed_by"], by, "{extra:?}");
    }
    // The non-JSON form prints the digest alone.
    let run = ferry(["checksum", &daemon.url("t")]).run();
    run.expect_ok();
    assert_eq!(run.stdout_text().trim(), expected);
}

#[test]
fn json_names_the_construction_and_size() {
    let dir = testutil::temp_dir();
    let (path, layout) = make_sample(dir.path(), "img.raw");
    let file = path.display().to_string();
    let run = ferry(["checksum", "--json", "--kind", "blkhash", &file]).run();
    run.expect_ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout_text()).unwrap();
    assert_eq!(v["algorithm"], "sha256");
    assert_eq!(v["block_size"], 65536);
    assert_eq!(v["kind"], "blkhash");
    assert_eq!(v["size"], layout.size());
    assert_eq!(
        v["checksum"],
        reference(&["--kind", "blkhash"], &layout.expected()).as_str()
    );
}

fn write(dir: &Path, name: &str, bytes: &[u8], size: u64) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(size)
        .unwrap();
    path.display().to_string()
}

#[test]
fn published_vectors_from_the_command_line() {
    let dir = testutil::temp_dir();
    let hello = write(dir.path(), "hello", b"hello", 5);
    assert_eq!(
        checksum(
            &hello,
            &[
                "--kind",
                "blkhash",
                "--algorithm",
                "md5",
                "--block-size",
                "4"
            ]
        ),
        "8262896de34125dec173722c920e8bd0"
    );
    assert_eq!(
        checksum(&hello, &["--kind", "blkhash"]),
        "337355feb53a5309d5aba92796223c2c84ffab930e706c01fef573a2722545e6"
    );
    let empty = write(dir.path(), "empty", b"", 0);
    assert_eq!(
        checksum(&empty, &["--kind", "blkhash"]),
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
    );
    let data = write(dir.path(), "data", b"data", 5 * MIB);
    assert_eq!(
        checksum(&data, &[]),
        "0da53b583fc1fbbac7edea14454c79f84a8107613e614f2c7a47071dfdcf41a6"
    );
    assert_eq!(
        checksum(&data, &["--algorithm", "sha1"]),
        "d3936edd8e3a8ff10e8257a9f460d8da67838549"
    );
}

#[test]
fn a_terabyte_of_holes_is_not_read() {
    let dir = testutil::temp_dir();
    let big = write(dir.path(), "big", b"", 1 << 40);
    let run = ferry(["checksum", &big]).run();
    run.expect_ok();
    // Reading a terabyte would take minutes; the holes cost one digest each.
    assert!(run.elapsed.as_secs() < 10, "took {:?}", run.elapsed);
    let spec = blkhash::Spec::imageio();
    let zero = spec.algorithm.hash(&vec![0u8; spec.block_size as usize]);
    let expected = spec
        .algorithm
        .hash(&zero.repeat(((1u64 << 40) / spec.block_size) as usize));
    let hex: String = expected.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(run.stdout_text().trim(), hex);
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    let dir = testutil::temp_dir();
    let file = write(dir.path(), "f", b"x", 4096);
    for args in [
        vec!["--block-size", "512"],
        vec!["--block-size", "1048577"],
        vec!["--algorithm", "nope"],
        vec!["--kind", "nope"],
        vec!["--kind", "blkhash", "--algorithm", "blake2b"],
    ] {
        let mut all = vec!["checksum", file.as_str()];
        all.extend(args.iter().copied());
        let stderr = ferry(&all).run().expect_code(2).to_string();
        assert!(stderr.starts_with("ferry: "), "{args:?}: {stderr}");
    }
    ferry(["checksum", "-"]).run().expect_code(2);
    let missing = dir.path().join("missing").display().to_string();
    let stderr = ferry(["checksum", &missing])
        .run()
        .expect_code(1)
        .to_string();
    assert!(stderr.contains("missing"), "{stderr}");
}
