//! `ferry nbd-server --format qcow2|auto`: the guest view of a qcow2 image over NBD, read by
//! the real qemu-img and nbdcopy and compared with `qemu-img convert -O raw` of the file; its
//! block status (`nbdinfo --map`) equals the image's own allocation (`qemu-img map`). Without
//! `--read-only` the export is writable: what qemu-io and nbdcopy write over several
//! connections passes `qemu-img check` and `qemu-img compare` once the server stops.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use testutil::ferry_nbd::FerryNbd;

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

/// A qcow2 image (32 KiB clusters), over a backing file of format `backing` when given: data
/// in both, zero clusters hiding backing data, unallocated clusters, and a size that is not a
/// whole cluster.
fn image(dir: &Path, backing: Option<&str>) -> PathBuf {
    let top = dir.join(match backing {
        Some(f) => format!("top-over-{f}.qcow2"),
        None => "plain.qcow2".into(),
    });
    let mut create = Command::new("qemu-img");
    create.args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=32768"]);
    if let Some(format) = backing {
        let name = format!("base.{format}");
        let base = dir.join(&name);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(&base)
            .arg("10M"));
        qemu_io(
            &base,
            format,
            &["write -P 0x11 0 2M", "write -P 0x12 8M 1M"],
        );
        create.args(["-F", format, "-b", &name]);
    }
    run(create.arg(&top).arg(((10u64 << 20) + 4096).to_string()));
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x21 1M 64k",
            "write -z 1536k 256k",
            "write -P 0x22 5M 100k",
            "write -z 8M 32k",
            "write -P 0x23 10M 4k",
        ],
    );
    top
}

/// Data ranges (not reading as zeroes) from `qemu-img map`, merged.
fn qemu_data(image: &Path) -> Vec<(u64, u64)> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(image));
    let v: Value = serde_json::from_str(&out).unwrap();
    merge(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"].as_bool().unwrap() && !e["zero"].as_bool().unwrap())
            .map(|e| {
                let s = e["start"].as_u64().unwrap();
                (s, s + e["length"].as_u64().unwrap())
            }),
    )
}

/// Data ranges (no NBD_STATE_ZERO) from `nbdinfo --map --json`, merged.
fn nbd_data(uri: &str) -> Vec<(u64, u64)> {
    let out = run(Command::new("nbdinfo").args(["--map", "--json", uri]));
    let v: Value = serde_json::from_str(&out).unwrap();
    merge(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"].as_u64().unwrap() & 2 == 0)
            .map(|e| {
                let s = e["offset"].as_u64().unwrap();
                (s, s + e["length"].as_u64().unwrap())
            }),
    )
}

fn merge(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => out.push((a, b)),
        }
    }
    out
}

/// Serves `image` and checks what qemu-img, nbdcopy and nbdinfo read. `exact_map`: the block
/// status must equal qemu-img's map; otherwise it may call more data (a raw backing file is
/// all data to ferry's reader, where qemu asks the file system for its holes) but never less.
fn serve_and_check(dir: &Path, image: &Path, format: &str, exact_map: bool) {
    let expected = dir.join("expected.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(&expected));
    let server = FerryNbd::new(std::path::Path::new(env!("CARGO_BIN_EXE_ferry")), image)
        .read_only()
        .arg("--format")
        .arg(format)
        .start();
    let uri = server.nbd_uri();

    let size = run(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(
        size.trim().parse::<u64>().unwrap(),
        std::fs::metadata(&expected).unwrap().len()
    );

    let by_qemu = dir.join("by-qemu.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", &uri, "-O", "raw"])
        .arg(&by_qemu));
    assert!(
        std::fs::read(&by_qemu).unwrap() == std::fs::read(&expected).unwrap(),
        "qemu-img reads over NBD what it reads from the file"
    );
    let by_nbdcopy = dir.join("by-nbdcopy.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&by_nbdcopy));
    assert!(
        std::fs::read(&by_nbdcopy).unwrap() == std::fs::read(&expected).unwrap(),
        "nbdcopy reads the guest view"
    );
    let map = nbd_data(&uri);
    let qemu = qemu_data(image);
    assert!(!map.is_empty());
    if exact_map {
        assert_eq!(map, qemu, "block status follows the qcow2 tables");
    } else {
        for (a, b) in &qemu {
            assert!(
                map.iter().any(|(x, y)| x <= a && b <= y),
                "data {a}..{b} reported as zero: {map:?}"
            );
        }
    }
}

#[test]
fn a_qcow2_chain_is_served_read_only_as_qemu_img_reads_it() {
    let dir = testutil::temp_dir();
    let top = image(dir.path(), Some("qcow2"));
    serve_and_check(dir.path(), &top, "qcow2", true);
    let top = image(dir.path(), Some("raw"));
    serve_and_check(dir.path(), &top, "qcow2", false);
}

#[test]
fn auto_serves_a_plain_qcow2_image_and_refuses_a_backing_file() {
    let dir = testutil::temp_dir();
    let plain = image(dir.path(), None);
    serve_and_check(dir.path(), &plain, "auto", true);
    let top = image(dir.path(), Some("qcow2"));
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["nbd-server", "--read-only", "--format", "auto", "--socket"])
        .arg(dir.path().join("x.sock"))
        .arg(&top)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("backing"),
        "{out:?}"
    );
}

fn check_and_compare(image: &Path, expected: &[u8], dir: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors") && !text.contains("leaked"),
        "qemu-img check: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = dir.join("mirror.raw");
    std::fs::write(&raw, expected).unwrap();
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&raw)
        .arg(image));
}

#[test]
fn a_writable_qcow2_export_takes_writes_from_several_connections() {
    let dir = testutil::temp_dir();
    let top = image(dir.path(), Some("qcow2"));
    let mirror_file = dir.path().join("before.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&top)
        .arg(&mirror_file));
    let mut mirror = std::fs::read(&mirror_file).unwrap();
    let server = FerryNbd::new(std::path::Path::new(env!("CARGO_BIN_EXE_ferry")), &top)
        .arg("--format")
        .arg("qcow2")
        .start();
    let uri = server.nbd_uri();
    // Two clients at once on disjoint halves: partial clusters over backing data, whole
    // clusters, zeroes over data.
    let jobs: Vec<Vec<(u64, u64, Option<u8>)>> = vec![
        vec![
            (1000, 5000, Some(0xa1)),
            (1 << 20, 32768, Some(0xa2)),
            ((1 << 20) + 40000, 70000, Some(0xa3)),
            (100 << 10, 200 << 10, None),
            (3 << 20, 1 << 20, Some(0xa4)),
            ((3 << 20) + 4096, 512, None),
        ],
        vec![
            (6 << 20, 12345, Some(0xb1)),
            ((8 << 20) + 512, 100, Some(0xb2)),
            (9 << 20, 1 << 20, None),
            ((5 << 20) + 77, 300000, Some(0xb3)),
            ((10 << 20) + 1024, 3072, Some(0xb4)),
        ],
    ];
    let children: Vec<_> = jobs
        .iter()
        .map(|job| {
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "raw"]);
            for &(off, len, byte) in job {
                let c = match byte {
                    Some(b) => format!("write -P {b} {off} {len}"),
                    None => format!("write -z {off} {len}"),
                };
                cmd.args(["-c", &c]);
            }
            cmd.arg(&uri).arg("-c").arg("flush");
            cmd.stdout(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("failed"), "{text}");
    }
    for &(off, len, byte) in jobs.iter().flatten() {
        mirror[off as usize..(off + len) as usize].fill(byte.unwrap_or(0));
    }
    // Block status comes from the tables: the zeroed megabyte is no longer data.
    let data = nbd_data(&uri);
    assert!(
        !data.iter().any(|&(a, b)| a.max(9 << 20) < b.min(10 << 20)),
        "zeroed range reported as data: {data:?}"
    );
    let by_qemu = dir.path().join("by-qemu.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", &uri, "-O", "raw"])
        .arg(&by_qemu));
    assert!(
        std::fs::read(&by_qemu).unwrap() == mirror,
        "reads over NBD see the writes"
    );
    drop(server);
    check_and_compare(&top, &mirror, dir.path());
}

#[test]
fn nbdcopy_with_several_connections_into_a_writable_qcow2_export() {
    let dir = testutil::temp_dir();
    let plain = image(dir.path(), None);
    let size = (10usize << 20) + 4096;
    let mut src = vec![0u8; size];
    let mut x = 12345u64;
    for (i, chunk) in src.chunks_mut(65536).enumerate() {
        // Every third 64 KiB chunk stays zero, so nbdcopy also sends zeroes.
        if i % 3 == 1 {
            continue;
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    let src_file = dir.path().join("src.raw");
    std::fs::write(&src_file, &src).unwrap();
    let server = FerryNbd::new(std::path::Path::new(env!("CARGO_BIN_EXE_ferry")), &plain)
        .arg("--format")
        .arg("auto")
        .start();
    let uri = server.nbd_uri();
    run(Command::new("nbdcopy")
        .args(["-C", "4", "--flush"])
        .arg(&src_file)
        .arg(&uri));
    drop(server);
    check_and_compare(&plain, &src, dir.path());
}

#[test]
fn a_write_into_an_image_with_a_wrong_refcount_table_fails_and_the_server_stays() {
    let dir = testutil::temp_dir();
    let plain = image(dir.path(), None);
    let mut data = std::fs::read(&plain).unwrap();
    let rt = u64::from_be_bytes(data[48..56].try_into().unwrap()) as usize;
    // The first refcount block "lives" inside the header cluster.
    data[rt..rt + 8].copy_from_slice(&1234u64.to_be_bytes());
    std::fs::write(&plain, &data).unwrap();
    let mut server = FerryNbd::new(std::path::Path::new(env!("CARGO_BIN_EXE_ferry")), &plain)
        .arg("--format")
        .arg("qcow2")
        .start();
    let uri = server.nbd_uri();
    // An unallocated cluster: the write must allocate, which needs the refcounts.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x55 3M 4k"])
        .arg(&uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("write failed"), "{text}");
    assert!(server.is_running(), "the server survives: {}", server.log());
    // Reads still work.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x21 1M 64k"])
        .arg(&uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}");
}
