//! qcow2 sources on the command line, against qemu-img: `ferry copy --src-format qcow2` of a
//! three-deep backing chain equals `qemu-img convert -O raw`; `map` equals `qemu-img map`;
//! `checksum` equals the checksum of the converted image; and the probing rule: `auto`
//! reads a plain qcow2 image but never follows a backing file, so a raw disk whose guest wrote a
//! qcow2 header naming another file cannot make ferry read that file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
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

/// raw base ← qcow2 middle (64 KiB clusters) ← qcow2 top (16 KiB clusters, extended L2), with
/// data, zero clusters and holes at every level.
fn chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&base)
        .arg("16M"));
    qemu_io(
        &base,
        "raw",
        &["write -P 0x11 0 4M", "write -P 0x12 12M 1M"],
    );
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw"])
        .arg(&mid));
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x21 1M 2M",
            "write -z 5M 1M",
            "write -P 0x22 8M 64k",
        ],
    );
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16384,extended_l2=on",
        ])
        .args(["-F", "qcow2", "-b", "mid.qcow2"])
        .arg(&top));
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x31 1536k 8k",
            "write -z 12M 512k",
            "write -P 0x32 15M 3k",
        ],
    );
    top
}

#[test]
fn a_backing_chain_copies_maps_and_hashes_as_qemu_img_reads_it() {
    let dir = testutil::temp_dir();
    let top = chain(dir.path());
    let top_s = top.to_str().unwrap();
    let expected = dir.path().join("expected.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw", top_s])
        .arg(&expected));

    let out = dir.path().join("out.raw");
    ok(ferry(&[
        "copy",
        "--src-format",
        "qcow2",
        top_s,
        out.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&expected).unwrap(),
        "the copy reads the guest view"
    );
    // The default is raw, as nbdcopy: the file's own bytes.
    let bytes = dir.path().join("bytes.raw");
    ok(ferry(&["copy", top_s, bytes.to_str().unwrap()]));
    assert!(std::fs::read(&bytes).unwrap() == std::fs::read(&top).unwrap());

    // map: the same ranges qemu-img map reports as data, zero or absent.
    let map = ok(ferry(&["map", "--json", "--src-format", "qcow2", top_s]));
    let ours: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let theirs: Vec<serde_json::Value> =
        serde_json::from_str(&run(Command::new("qemu-img").args([
            "map",
            "--output=json",
            top_s,
        ])))
        .unwrap();
    let data_at = |rows: &[serde_json::Value], data: &dyn Fn(&serde_json::Value) -> bool| {
        let mut out = Vec::new();
        for r in rows {
            let start = r["offset"].as_u64().or(r["start"].as_u64()).unwrap();
            let len = r["length"].as_u64().unwrap();
            if data(r) {
                out.push((start, start + len));
            }
        }
        merge(out)
    };
    let ours_data = data_at(&ours, &|r| r["description"] == "data");
    // qemu-img: data read from a raw base's holes reads as zero; ferry reports the base's
    // whole extent as data, so compare what qemu-img calls data against ferry's data.
    let theirs_data = data_at(&theirs, &|r| r["data"] == true);
    for (a, b) in &theirs_data {
        assert!(
            ours_data.iter().any(|(c, d)| c <= a && b <= d),
            "qemu-img's data {a}..{b} is data in ferry's map {ours_data:?}"
        );
    }
    // Every zero the top two qcow2 layers declare is a hole,zero in ferry's map.
    for r in &theirs {
        if r["zero"] == true && r["data"] == false && r["depth"].as_u64().unwrap() < 2 {
            let start = r["start"].as_u64().unwrap();
            let end = start + r["length"].as_u64().unwrap();
            assert!(
                !ours_data.iter().any(|(c, d)| *c < end && start < *d),
                "qemu-img's zero {start}..{end} is not data for ferry"
            );
        }
    }
    // allocation depth: the top's own writes are depth 1.
    let depth = ok(ferry(&[
        "map",
        "--json",
        "--src-format",
        "qcow2",
        "--context",
        "qemu:allocation-depth",
        top_s,
    ]));
    let depth: Vec<serde_json::Value> = serde_json::from_str(&depth).unwrap();
    let at = |offset: u64| {
        depth
            .iter()
            .find(|r| {
                let o = r["offset"].as_u64().unwrap();
                o <= offset && offset < o + r["length"].as_u64().unwrap()
            })
            .unwrap()["type"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(at(1536 << 10), 1, "top");
    assert_eq!(at(MIB), 2, "middle");
    assert_eq!(at(0), 3, "raw base");

    let ours = ok(ferry(&["checksum", "--src-format", "qcow2", top_s]));
    let theirs = ok(ferry(&["checksum", expected.to_str().unwrap()]));
    assert_eq!(ours, theirs);

    let info = ok(ferry(&["info", "--json", "--src-format", "qcow2", top_s]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["size"], 16 * MIB);
    assert_eq!(info["cluster_size"], 16384);
    assert_eq!(info["extended_l2"], true);
    assert_eq!(info["chain_length"], 3);
}

fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[test]
fn probing_reads_plain_qcow2_but_never_follows_a_backing_file() {
    let dir = testutil::temp_dir();
    // A plain image (no backing file): auto reads it as qcow2.
    let plain = dir.path().join("plain.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&plain)
        .arg("4M"));
    qemu_io(&plain, "qcow2", &["write -P 0x5a 1M 1M"]);
    let out = dir.path().join("plain.raw");
    ok(ferry(&[
        "copy",
        "--src-format",
        "auto",
        plain.to_str().unwrap(),
        out.to_str().unwrap(),
    ]));
    let guest = std::fs::read(&out).unwrap();
    assert_eq!(guest.len() as u64, 4 * MIB);
    assert!(
        guest[MIB as usize..2 * MIB as usize]
            .iter()
            .all(|&b| b == 0x5a)
    );
    assert!(guest[..MIB as usize].iter().all(|&b| b == 0));

    // A raw disk whose guest wrote, at its start, a qcow2 header naming a file of the host.
    let secret = dir.path().join("secret.raw");
    std::fs::write(&secret, vec![0x66u8; MIB as usize]).unwrap();
    let header = dir.path().join("header.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&header)
        .arg("1M"));
    let mut disk = std::fs::read(&header).unwrap();
    disk.resize(2 * MIB as usize, 0);
    let guest_disk = dir.path().join("guest.raw");
    std::fs::write(&guest_disk, &disk).unwrap();
    let copy = dir.path().join("guest-copy.raw");
    let refused = ferry(&[
        "copy",
        "--src-format",
        "auto",
        guest_disk.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("backing file") && err.contains("--src-format qcow2"),
        "{err}"
    );
    assert!(
        !copy.exists() || !std::fs::read(&copy).unwrap().contains(&0x66),
        "the named file was never read"
    );
    for cmd in [["info", "--src-format"], ["map", "--src-format"]] {
        let out = ferry(&[cmd[0], cmd[1], "auto", guest_disk.to_str().unwrap()]);
        assert!(!out.status.success(), "{} follows no backing file", cmd[0]);
    }
    // Raw, the default, copies the disk as it is.
    ok(ferry(&[
        "copy",
        guest_disk.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&copy).unwrap() == disk);
}
