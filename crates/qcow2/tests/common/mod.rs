//! Helpers shared by the tests: images made by the real qemu tools, and the views qemu gives
//! of them (`convert -O raw`, `map --output=json`) to compare the crate against.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2::{Extent, ExtentKind, Image, OpenOptions};

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs `qemu-io` commands (`write -P 0xNN off len`, `write -z off len`) on an image.
pub fn qemu_io(image: &Path, format: &str, cmds: &[&str]) {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(image));
    // qemu-io exits 0 even when a command fails: its output tells.
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?} on {}: {out}",
        image.display()
    );
}

pub fn create(dir: &Path, name: &str, size: &str, opts: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.push(p(&path));
    args.push(size);
    qemu_img(&args);
    path
}

/// The guest view as qemu reads it.
pub fn qemu_raw(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.converted.raw",
        image.file_name().unwrap().to_string_lossy()
    ));
    qemu_img(&["convert", "-O", "raw", p(image), p(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// qemu's allocation map, reduced to what the crate reports: data, zero (present but not
/// data) or unallocated, with the depth; adjacent equal entries merged.
pub fn qemu_map(image: &Path) -> Vec<Extent> {
    let json = qemu_img(&["map", "--output=json", p(image)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut out: Vec<Extent> = Vec::new();
    for e in v.as_array().unwrap() {
        let offset = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        let depth = e["depth"].as_u64().unwrap() as u32;
        let kind = if e["data"].as_bool().unwrap() {
            ExtentKind::Data
        } else if e["present"].as_bool().unwrap() {
            ExtentKind::Zero
        } else {
            ExtentKind::Unallocated
        };
        merge_push(
            &mut out,
            Extent {
                offset,
                length,
                kind,
                depth,
            },
        );
    }
    out
}

pub fn merge_push(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut()
        && last.kind == e.kind
        && last.depth == e.depth
        && last.offset + last.length == e.offset
    {
        last.length += e.length;
        return;
    }
    out.push(e);
}

/// Opens `image` with the crate and checks it against qemu: every byte of the guest view (read
/// whole, and in pieces of an odd size that straddle clusters) and the allocation map.
pub fn check_against_qemu(image: &Path, dir: &Path, opts: &OpenOptions) -> Image {
    let expected = qemu_raw(image, dir);
    let img = Image::open(image, opts).unwrap();
    assert_eq!(img.size(), expected.len() as u64, "virtual size");

    let mut whole = vec![0xa5u8; expected.len()];
    img.read_at(&mut whole, 0).unwrap();
    assert_same(&whole, &expected, "whole read");

    let piece = 100_003usize;
    let mut off = 0usize;
    let mut buf = vec![0u8; piece];
    while off < expected.len() {
        let n = piece.min(expected.len() - off);
        img.read_at(&mut buf[..n], off as u64).unwrap();
        assert_same(
            &buf[..n],
            &expected[off..off + n],
            &format!("read at {off}"),
        );
        off += n;
    }

    let ours = img.extents(0, img.size()).unwrap();
    let theirs = qemu_map(image);
    assert_eq!(ours, theirs, "extents of {}", image.display());
    let covered: u64 = ours.iter().map(|e| e.length).sum();
    assert_eq!(covered, img.size());
    img
}

pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got 0x{:02x}, want 0x{:02x}",
            got[i], want[i]
        );
    }
}

/// Deterministic bytes that do not compress (xorshift).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
