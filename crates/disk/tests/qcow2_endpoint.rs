//! The qcow2 endpoint against qemu: its guest view must equal `qemu-img convert -O raw`, its
//! extents must say data exactly where `qemu-img map` does; read-only it refuses writes,
//! read-write its writes pass `qemu-img check` and `compare`.

use std::path::Path;
use std::process::Command;

use disk::qcow2::Qcow2Endpoint;
use disk::{Endpoint, ErrorKind};
use tempfile::TempDir;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // qemu-io exits 0 even when a command fails: its output tells.
    assert!(
        cmd != "qemu-io" || !(stdout.contains("failed") || stdout.contains("error")),
        "{cmd} {args:?}: {stdout}"
    );
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A two-image chain with data, zero clusters and unallocated space.
fn chain(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x31 0 1M",
            "-c",
            "write -P 0x32 3M 64k",
            s(&base),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "4M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x41 512k 100k",
            "-c",
            "write -z 3M 64k",
            "-c",
            "write -P 0x42 2M 4k",
            s(&top),
        ],
    );
    top
}

/// Bytes qemu-img map reports as data (true) or not, one flag per 4 KiB block.
fn qemu_data_blocks(image: &Path, size: u64) -> Vec<bool> {
    let json = run("qemu-img", &["map", "--output=json", s(image)]);
    let mut blocks = vec![false; (size / 4096) as usize];
    // The map is a JSON array of flat objects: split it by entry and pick the fields by name.
    for entry in json.split('}') {
        let field = |name: &str| -> Option<&str> {
            let at = entry.find(&format!("\"{name}\": "))? + name.len() + 4;
            let rest = &entry[at..];
            Some(rest[..rest.find([',', ' ']).unwrap_or(rest.len())].trim())
        };
        let (Some(start), Some(length), Some(data)) =
            (field("start"), field("length"), field("data"))
        else {
            continue;
        };
        let (start, length): (u64, u64) = (start.parse().unwrap(), length.parse().unwrap());
        for b in start / 4096..(start + length) / 4096 {
            blocks[b as usize] = data == "true";
        }
    }
    blocks
}

#[tokio::test]
async fn qcow2_endpoint_reads_the_guest_view_and_maps_extents() {
    let dir = TempDir::new().unwrap();
    let top = chain(dir.path());
    let raw = dir.path().join("expected.raw");
    run("qemu-img", &["convert", "-O", "raw", s(&top), s(&raw)]);
    let expected = std::fs::read(&raw).unwrap();

    let ep = Qcow2Endpoint::open(&top, true).unwrap();
    let caps = ep.caps().clone();
    assert_eq!(caps.size, Some(expected.len() as u64));
    assert!(caps.read_only && caps.extents);

    let mut got = Vec::new();
    let step = 300_000u64;
    let mut off = 0u64;
    while off < expected.len() as u64 {
        let n = step.min(expected.len() as u64 - off);
        got.extend_from_slice(&ep.read(off, n).await.unwrap());
        off += n;
    }
    assert!(got == expected, "guest view differs from qemu-img convert");

    let size = expected.len() as u64;
    let extents = ep.extents(0, size).await.unwrap();
    assert_eq!(extents.first().unwrap().offset, 0);
    assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), size);
    let want = qemu_data_blocks(&top, size);
    for e in &extents {
        for b in e.offset / 4096..e.end() / 4096 {
            assert_eq!(!e.zero, want[b as usize], "block {b} in {e:?}");
        }
        // Zero extents read as zeroes.
        if e.zero {
            assert!(
                expected[e.offset as usize..e.end() as usize]
                    .iter()
                    .all(|&x| x == 0)
            );
        }
    }
    assert!(
        extents.iter().any(|e| e.zero && !e.hole),
        "the zeroed cluster"
    );
    assert!(
        extents.iter().any(|e| e.hole),
        "space unallocated in the chain"
    );

    let err = ep
        .write(0, bytes::Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    let err = ep.read(size - 10, 20).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("top.qcow2") && msg.contains("offset") && msg.contains("length 20"),
        "{msg}"
    );
}

#[tokio::test]
async fn qcow2_endpoint_open_errors_name_the_image() {
    let dir = TempDir::new().unwrap();
    let top = chain(dir.path());
    let err = Qcow2Endpoint::open(&top, false).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("open") && msg.contains("top.qcow2") && msg.contains("backing"),
        "{msg}"
    );
}

#[tokio::test]
async fn qcow2_endpoint_dirty_reports_the_persistent_bitmap() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), "4M"],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 4M", s(&image)],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "64k", s(&image), "b0"],
    );
    // Unaligned writes: the bitmap marks every 64 KiB granule they touch.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 100k 4k",
            "-c",
            "write -z 1M 128k",
            "-c",
            "write -P 0x33 1152k 4k",
            "-c",
            "write -P 0x44 4032k 64k",
            s(&image),
        ],
    );
    let ep = Qcow2Endpoint::open(&image, false).unwrap();
    assert!(!ep.caps().dirty, "no bitmap selected");
    assert_eq!(
        ep.dirty(0, 4096).await.unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    let ep = ep.with_bitmap("b0").unwrap();
    assert!(ep.caps().dirty);
    let pairs = |v: Vec<(disk::Extent, bool)>| -> Vec<(u64, u64, bool)> {
        v.into_iter()
            .map(|(e, d)| (e.offset, e.length, d))
            .collect()
    };
    const K: u64 = 1024;
    assert_eq!(
        pairs(ep.dirty(0, 4096 * K).await.unwrap()),
        [
            (0, 64 * K, false),
            (64 * K, 64 * K, true),
            (128 * K, 896 * K, false),
            // The zero write and the write right after it, merged.
            (1024 * K, 192 * K, true),
            (1216 * K, 2816 * K, false),
            (4032 * K, 64 * K, true),
        ]
    );
    // A range that starts and ends inside granules: clipped to it, still covered exactly.
    assert_eq!(
        pairs(ep.dirty(100 * K, 1000 * K).await.unwrap()),
        [
            (100 * K, 28 * K, true),
            (128 * K, 896 * K, false),
            (1024 * K, 76 * K, true),
        ]
    );

    let err = Qcow2Endpoint::open(&image, false)
        .unwrap()
        .with_bitmap("nope")
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let msg = err.to_string();
    assert!(
        msg.contains("disk.qcow2") && msg.contains("'nope'") && msg.contains("open"),
        "{msg}"
    );
}

/// Sets the in-use flag of the image's first bitmap, as a writer that never closed the image
/// leaves it: found through the bitmaps header extension, as the qcow2 spec lays it out.
fn mark_first_bitmap_in_use(image: &Path) {
    use std::os::unix::fs::FileExt;
    const BITMAPS_EXTENSION: u32 = 0x2385_2875;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let be32 = |at: u64| {
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, at).unwrap();
        u32::from_be_bytes(b)
    };
    let mut at = u64::from(be32(100));
    loop {
        let (kind, len) = (be32(at), be32(at + 4));
        assert_ne!(kind, 0, "no bitmaps extension in {}", image.display());
        if kind == BITMAPS_EXTENSION {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, at + 8 + 16).unwrap();
            let entry_flags = u64::from_be_bytes(b) + 12;
            let flags = be32(entry_flags) | 1;
            f.write_all_at(&flags.to_be_bytes(), entry_flags).unwrap();
            return;
        }
        at += 8 + u64::from(len).div_ceil(8) * 8;
    }
}

#[tokio::test]
async fn qcow2_endpoint_refuses_a_bitmap_in_use() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), "1M"],
    );
    run("qemu-img", &["bitmap", "--add", s(&image), "b0"]);
    Qcow2Endpoint::open(&image, false)
        .unwrap()
        .with_bitmap("b0")
        .unwrap();
    mark_first_bitmap_in_use(&image);
    let err = Qcow2Endpoint::open(&image, false)
        .unwrap()
        .with_bitmap("b0")
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("disk.qcow2") && msg.contains("'b0'") && msg.contains("in use"),
        "{msg}"
    );
    // qemu agrees the bitmap is in use, so the patch above made what a crash leaves.
    let info = run("qemu-img", &["info", "--output=json", s(&image)]);
    assert!(info.contains("in-use"), "{info}");
}

#[tokio::test]
async fn writable_qcow2_endpoint_writes_zeroes_and_flushes() {
    let dir = TempDir::new().unwrap();
    let top = chain(dir.path());
    let raw = dir.path().join("expected.raw");
    run("qemu-img", &["convert", "-O", "raw", s(&top), s(&raw)]);
    let mut expected = std::fs::read(&raw).unwrap();
    let ep = Qcow2Endpoint::open_rw(&top, true).unwrap();
    let caps = ep.caps().clone();
    assert!(!caps.read_only && caps.flush && caps.efficient_zero);
    // A write into a cluster the base holds copies the rest of it from the base.
    let data = vec![0x5au8; 10000];
    ep.write(4096 + 17, bytes::Bytes::from(data.clone()))
        .await
        .unwrap();
    expected[4096 + 17..4096 + 17 + 10000].copy_from_slice(&data);
    ep.zero(1 << 20, 1 << 20, false).await.unwrap();
    expected[1 << 20..2 << 20].fill(0);
    assert!(ep.fast_zero(3 << 20, 65536).await.unwrap());
    expected[3 << 20..(3 << 20) + 65536].fill(0);
    ep.flush().await.unwrap();
    let back = ep.read(0, 4 << 20).await.unwrap();
    assert!(back[..] == expected[..], "reads see the writes");
    let ext = ep.extents(1 << 20, 1 << 20).await.unwrap();
    assert!(
        ext.iter().all(|e| e.zero && !e.hole),
        "zeroed range: {ext:?}"
    );
    drop(ep);
    let out = Command::new("qemu-img")
        .args(["check", s(&top)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors") && !text.contains("leaked"),
        "{text}"
    );
    std::fs::write(&raw, &expected).unwrap();
    run("qemu-img", &["compare", "-f", "raw", s(&raw), s(&top)]);

    let ro = Qcow2Endpoint::open(&top, true).unwrap();
    let err = ro
        .write(0, bytes::Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
}
