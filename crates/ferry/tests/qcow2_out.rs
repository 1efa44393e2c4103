//! `ferry copy … --dst-format qcow2` against qemu-img: raw sources with data, punched zero runs
//! and holes (and a qcow2 source read with `--src-format qcow2`) written as qcow2 with 512 B,
//! 64 KiB and 2 MiB clusters, plain, zstd- and zlib-compressed, into a file and through `-`
//! into a pipe. Every image must pass `qemu-img check`, compare identical to its source with
//! `qemu-img compare`, and leave what the source has no data in unallocated (`qemu-img map`);
//! an image written to a file also leaves the source's all-zero clusters unallocated, zeroes
//! written as data included. Usage errors exit 2.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const MIB: u64 = 1 << 20;

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn qemu_io(image: &Path, format: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(image));
}

/// A raw image of 16 MiB + 700 bytes (the tail is not a whole sector): data, a run of zeroes
/// written as data, a punched zero run inside data, a hole, and data in the last bytes.
fn raw_source(dir: &Path) -> PathBuf {
    let path = dir.join("src.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&path)
        .arg((16 * MIB + 700).to_string()));
    qemu_io(
        &path,
        "raw",
        &[
            "write -P 0x11 0 3M",
            "write -P 0x00 3M 256k",
            "write -P 0x22 9M 2M",
            "write -z -u 9728k 512k",
            "write -P 0x33 12M 5k",
            "write -P 0x44 16M 700",
        ],
    );
    path
}

/// A qcow2 source with data, zero clusters and unallocated clusters.
fn qcow2_source(dir: &Path) -> PathBuf {
    let path = dir.join("src.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=16384"])
        .arg(&path)
        .arg("12M"));
    qemu_io(
        &path,
        "qcow2",
        &[
            "write -P 0x55 0 1M",
            "write -z 1M 2M",
            "write -P 0x66 5M 48k",
            "write -z 5200k 16k",
            "write -P 0x77 11M 1M",
        ],
    );
    path
}

/// `qemu-img map --output=json` of an image: its data ranges.
fn data_map(image: &Path, format: &str) -> Vec<(u64, u64)> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", format])
        .arg(image));
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool().unwrap())
        .map(|e| {
            let start = e["start"].as_u64().unwrap();
            (start, start + e["length"].as_u64().unwrap())
        })
        .collect()
}

/// The clusters of `src`'s guest that hold anything but zeroes, as byte ranges (the last one
/// ends with the guest), merged.
fn nonzero_clusters(src: &Path, src_format: &str, cluster: u64) -> Vec<(u64, u64)> {
    let dir = testutil::temp_dir();
    let raw = dir.path().join("guest.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", src_format, "-O", "raw"])
        .arg(src)
        .arg(&raw));
    let guest = std::fs::read(&raw).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, c) in guest.chunks(cluster as usize).enumerate() {
        if c.iter().all(|&b| b == 0) {
            continue;
        }
        let start = i as u64 * cluster;
        let end = start + c.len() as u64;
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// How the writer treated the zero clusters inside the source's data extents.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zeroes {
    /// Streamed: the plan made them data clusters before they were read.
    Stored,
    /// Written to a file, data first: left unallocated.
    LeftOut,
}

/// Checks `dst` is a clean qcow2 image identical to `src` whose data lies only in clusters
/// where the source has data (with [`Zeroes::LeftOut`], only in clusters that are not all
/// zero), and whose every cluster that holds anything but zeroes is allocated.
fn check_image(src: &Path, src_format: &str, dst: &Path, cluster: u64, zeroes: Zeroes) {
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(dst)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check {}: {}{}",
        dst.display(),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    for key in ["leaks", "corruptions", "check-errors"] {
        assert_eq!(report[key].as_u64().unwrap_or(0), 0, "{key}: {report}");
    }
    run(Command::new("qemu-img")
        .args(["compare", "-f", src_format, "-F", "qcow2"])
        .arg(src)
        .arg(dst));
    // The source's data rounded out to whole clusters, merged where they then touch.
    let mut rounded: Vec<(u64, u64)> = Vec::new();
    for (a, b) in data_map(src, src_format) {
        let (a, b) = (a / cluster * cluster, b.div_ceil(cluster) * cluster);
        match rounded.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => rounded.push((a, b)),
        }
    }
    let inside = |a: u64, b: u64| rounded.iter().any(|&(x, y)| x <= a && b <= y);
    let dst_data = data_map(dst, "qcow2");
    for &(a, b) in &dst_data {
        assert!(
            inside(a, b),
            "{}: data at {a}..{b} where the source has none (source data {rounded:?})",
            dst.display()
        );
    }
    let covered = |a: u64, b: u64| {
        let mut pos = a;
        for &(x, y) in &dst_data {
            if x <= pos && pos < y {
                pos = y;
            }
        }
        pos >= b
    };
    let nonzero = nonzero_clusters(src, src_format, cluster);
    for &(a, b) in &nonzero {
        assert!(
            covered(a, b),
            "{}: source data at {a}..{b} is not allocated ({dst_data:?})",
            dst.display()
        );
    }
    if zeroes == Zeroes::LeftOut {
        for &(a, b) in &dst_data {
            assert!(
                // The image's last cluster may run past the guest's end.
                nonzero
                    .iter()
                    .any(|&(x, y)| x <= a && b <= y.next_multiple_of(cluster)),
                "{}: data at {a}..{b} where the source has only zeroes (non-zero clusters \
                 {nonzero:?})",
                dst.display()
            );
        }
    }
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn ferry_copy(args: &[&str]) -> Output {
    ferry().arg("copy").args(args).output().unwrap()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ferry copy SRC - --dst-format qcow2 … | cat > DST`.
fn copy_through_pipe(src: &Path, dst: &Path, extra: &[&str]) {
    let mut writer = ferry()
        .arg("copy")
        .arg(src)
        .args(["-", "--dst-format", "qcow2"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = Command::new("cat")
        .stdin(writer.stdout.take().unwrap())
        .stdout(File::create(dst).unwrap())
        .status()
        .unwrap();
    let out = writer.wait_with_output().unwrap();
    assert_ok(&out);
    assert!(status.success());
}

#[test]
fn raw_sources_become_clean_sparse_images_at_every_cluster_size() {
    let dir = testutil::temp_dir();
    let src = raw_source(dir.path());
    for cluster in [512u64, 64 << 10, 2 << 20] {
        let cs = cluster.to_string();
        for compress in [None, Some("zstd"), Some("zlib")] {
            let dst = dir
                .path()
                .join(format!("{cluster}-{}.qcow2", compress.unwrap_or("plain")));
            let mut args = vec![
                src.to_str().unwrap(),
                dst.to_str().unwrap(),
                "--dst-format",
                "qcow2",
                "--cluster-size",
                &cs,
            ];
            if let Some(c) = compress {
                args.extend(["--compress", c]);
            }
            assert_ok(&ferry_copy(&args));
            check_image(&src, "raw", &dst, cluster, Zeroes::LeftOut);
            let info = run(Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(&dst));
            let info: Value = serde_json::from_str(&info).unwrap();
            assert_eq!(info["cluster-size"].as_u64(), Some(cluster), "{info}");
            let ctype = info["format-specific"]["data"]["compression-type"].as_str();
            assert_eq!(ctype, Some(compress.unwrap_or("zlib")), "{info}");
        }
        // The same image streamed into a pipe: the zeroes written as data at 3M..3M+256k
        // are stored, where the file, written data first, leaves them out.
        let piped = dir.path().join(format!("{cluster}-piped.qcow2"));
        copy_through_pipe(&src, &piped, &["--cluster-size", &cs]);
        check_image(&src, "raw", &piped, cluster, Zeroes::Stored);
        let file = dir.path().join(format!("{cluster}-plain.qcow2"));
        let zeroes = (3 * MIB, 3 * MIB + (256 << 10));
        let holds = |image: &Path| {
            data_map(image, "qcow2")
                .iter()
                .any(|&(a, b)| a < zeroes.1 && zeroes.0 < b)
        };
        assert!(holds(&piped), "{cluster}: the streamed image stores them");
        if cluster <= 256 << 10 {
            assert!(!holds(&file), "{cluster}: the file image leaves them out");
            let (p, f) = (len(&piped), len(&file));
            assert!(f < p, "{cluster}: file image {f} bytes, streamed {p}");
        }
    }
}

#[test]
fn compressed_images_are_smaller_and_marked_compressed() {
    let dir = testutil::temp_dir();
    let src = raw_source(dir.path());
    let plain = dir.path().join("plain.qcow2");
    let packed = dir.path().join("zstd.qcow2");
    for (dst, extra) in [(&plain, None), (&packed, Some("zstd"))] {
        let mut args = vec![
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--dst-format",
            "qcow2",
        ];
        if let Some(c) = extra {
            args.extend(["--compress", c]);
        }
        assert_ok(&ferry_copy(&args));
    }
    let plain_len = std::fs::metadata(&plain).unwrap().len();
    let packed_len = std::fs::metadata(&packed).unwrap().len();
    assert!(
        packed_len * 4 < plain_len,
        "zstd image {packed_len} bytes, plain {plain_len}"
    );
    let map = run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&packed));
    let map: Value = serde_json::from_str(&map).unwrap();
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|e| e["compressed"].as_bool() == Some(true)),
        "{map}"
    );
}

#[test]
fn a_qcow2_source_is_rewritten_with_its_zero_and_unallocated_clusters_left_out() {
    let dir = testutil::temp_dir();
    let src = qcow2_source(dir.path());
    for (cluster, compress) in [(64u64 << 10, None), (512, Some("zlib")), (2 << 20, None)] {
        let cs = cluster.to_string();
        let dst = dir.path().join(format!("out-{cluster}.qcow2"));
        let mut args = vec![
            "--src-format",
            "qcow2",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--dst-format",
            "qcow2",
            "--cluster-size",
            &cs,
        ];
        if let Some(c) = compress {
            args.extend(["--compress", c]);
        }
        assert_ok(&ferry_copy(&args));
        check_image(&src, "qcow2", &dst, cluster, Zeroes::LeftOut);
    }
    let piped = dir.path().join("piped.qcow2");
    copy_through_pipe(&src, &piped, &["--src-format", "qcow2"]);
    check_image(&src, "qcow2", &piped, 64 << 10, Zeroes::Stored);
    // Without --src-format the file's own bytes are copied, as for raw destinations.
    let bytes = dir.path().join("bytes.qcow2");
    assert_ok(&ferry_copy(&[
        src.to_str().unwrap(),
        bytes.to_str().unwrap(),
        "--dst-format",
        "qcow2",
    ]));
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&src)
        .arg(&bytes)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn usage_errors_exit_2_and_name_the_reason() {
    let dir = testutil::temp_dir();
    let src = raw_source(dir.path());
    let s = src.to_str().unwrap();
    let dst = dir.path().join("x.qcow2");
    let d = dst.to_str().unwrap();
    let fifo = dir.path().join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![s, "-", "--dst-format", "qcow2", "--compress", "zstd"],
            "--compress needs a seekable destination",
        ),
        (
            vec![
                s,
                fifo.to_str().unwrap(),
                "--dst-format",
                "qcow2",
                "--compress",
                "zlib",
            ],
            "--compress needs a seekable destination",
        ),
        (
            vec![s, d, "--dst-format", "qcow2", "--cluster-size", "1000"],
            "--cluster-size 1000",
        ),
        (
            vec![s, d, "--dst-format", "qcow2", "--cluster-size", "4M"],
            "--cluster-size",
        ),
        (
            vec![s, d, "--compress", "zstd"],
            "--compress needs --dst-format qcow2",
        ),
        (vec![s, d, "--dst-format", "qcow2", "--verify"], "--verify"),
        (vec![s, d, "--dst-format", "vmdk"], "vmdk"),
        (
            vec![s, "nbd://localhost/x", "--dst-format", "qcow2"],
            "not nbd://localhost/x",
        ),
    ];
    for (args, needle) in cases {
        let out = ferry()
            .arg("copy")
            .args(&args)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A stream source has no size to plan the tables with.
    let out = ferry()
        .args(["copy", "-", d, "--dst-format", "qcow2"])
        .stdin(File::open(&src).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("known size"));
}

#[test]
fn a_fifo_destination_receives_the_streamed_image() {
    let dir = testutil::temp_dir();
    let src = raw_source(dir.path());
    let fifo = dir.path().join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    let dst = dir.path().join("from-fifo.qcow2");
    let reader = Command::new("cp").arg(&fifo).arg(&dst).spawn().unwrap();
    let out = ferry_copy(&[
        src.to_str().unwrap(),
        fifo.to_str().unwrap(),
        "--dst-format",
        "qcow2",
        "--progress=json",
    ]);
    assert_ok(&out);
    assert!(reader.wait_with_output().unwrap().status.success());
    check_image(&src, "raw", &dst, 64 << 10, Zeroes::Stored);
    let progress = String::from_utf8_lossy(&out.stderr);
    let last: Value = serde_json::from_str(progress.lines().last().unwrap()).unwrap();
    assert_eq!(last["percent"].as_u64(), Some(100), "{progress}");
}

#[test]
fn a_destination_that_fails_exits_1_naming_it() {
    let dir = testutil::temp_dir();
    let src = raw_source(dir.path());
    let out = ferry_copy(&[src.to_str().unwrap(), "/dev/full", "--dst-format", "qcow2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/dev/full") && err.contains("No space left on device"),
        "{err}"
    );
}
