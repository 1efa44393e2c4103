//! Damaged and hostile images: each must give a clear error naming the file (and the offset in
//! it where one applies), never a panic, a hang or a huge allocation.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qcow2::{ErrorKind, Image, OpenOptions, Qcow2Error};
use tempfile::TempDir;

fn image_with_data(dir: &Path, name: &str) -> PathBuf {
    let img = create(dir, name, "4M", &[]);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x5a 0 131072", "write -P 0x5b 3145728 65536"],
    );
    img
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

fn open_err(path: &Path) -> Qcow2Error {
    Image::open(path, &OpenOptions::default()).expect_err("the damaged image must be refused")
}

fn read_all(img: &Image) -> Result<Vec<u8>, Qcow2Error> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).map(|()| buf)
}

fn assert_names(err: &Qcow2Error, path: &Path, words: &str) {
    let msg = err.to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        msg.contains(&*name),
        "message does not name the image: {msg}"
    );
    assert!(msg.contains(words), "message does not say '{words}': {msg}");
}

#[test]
fn l1_table_past_end_of_file() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "l1eof.qcow2");
    patch(&img, 40, &(1u64 << 40).to_be_bytes());
    let err = open_err(&img);
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!(err.offset, Some(40));
    assert_names(&err, &img, "past the end of the file");
    assert!(err.to_string().contains("file offset 40"), "{err}");
}

#[test]
fn huge_l1_size_is_refused_before_allocating() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "l1huge.qcow2");
    patch(&img, 36, &0x4000_0000u32.to_be_bytes());
    let err = open_err(&img);
    assert_names(&err, &img, "limit");

    // Too small for the virtual size is refused too.
    patch(&img, 36, &0u32.to_be_bytes());
    let err = open_err(&img);
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_names(&err, &img, "needs 1");
}

#[test]
fn huge_virtual_size_needs_a_matching_l1() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "bigsize.qcow2");
    patch(&img, 24, &(1u64 << 62).to_be_bytes());
    let err = open_err(&img);
    assert_names(&err, &img, "L1 table");
}

#[test]
fn l2_table_past_end_of_file() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "l2eof.qcow2");
    let data = std::fs::read(&img).unwrap();
    let l1 = be64(&data, 40) as usize;
    patch(&img, l1, &((1u64 << 40) | (1 << 63)).to_be_bytes());
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    let err = read_all(&opened).unwrap_err();
    assert_eq!(err.offset, Some(l1 as u64), "{err}");
    assert_names(&err, &img, "L2 table offset");
    assert!(opened.extents(0, opened.size()).is_err());
}

#[test]
fn misaligned_data_cluster() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "misaligned.qcow2");
    let data = std::fs::read(&img).unwrap();
    let l2 = (be64(&data, be64(&data, 40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(&data, l2);
    patch(&img, l2, &(entry + 512).to_be_bytes());
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    let err = read_all(&opened).unwrap_err();
    assert_names(&err, &img, "not cluster aligned");
}

#[test]
fn backing_chain_loop() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let a = create(d, "a.qcow2", "1M", &[]);
    let b = create(d, "b.qcow2", "1M", &["-b", "a.qcow2", "-F", "qcow2"]);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", p(&a)]);
    let err = open_err(&b);
    assert_eq!(err.kind(), ErrorKind::Backing);
    assert!(err.to_string().contains("loops"), "{err}");

    let selfref = create(d, "self.qcow2", "1M", &[]);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        p(&selfref),
    ]);
    let err = open_err(&selfref);
    assert_names(&err, &selfref, "loops");
}

#[test]
fn backing_chain_too_deep() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let mut prev = create(d, "i0.qcow2", "1M", &[]);
    for i in 1..=qcow2::MAX_CHAIN_DEPTH {
        let name = prev.file_name().unwrap().to_string_lossy().into_owned();
        prev = create(
            d,
            &format!("i{i}.qcow2"),
            "1M",
            &["-u", "-b", &name, "-F", "qcow2"],
        );
    }
    let err = open_err(&prev);
    assert_eq!(err.kind(), ErrorKind::Backing);
    assert!(err.to_string().contains("deeper"), "{err}");
}

#[test]
fn missing_backing_file() {
    let dir = TempDir::new().unwrap();
    let img = create(
        dir.path(),
        "orphan.qcow2",
        "1M",
        &["-u", "-b", "gone.qcow2", "-F", "qcow2"],
    );
    let err = open_err(&img);
    assert_eq!(err.kind(), ErrorKind::Backing);
    assert_names(&err, &img, "gone.qcow2");
}

fn compressed_image(dir: &Path) -> (PathBuf, usize) {
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 1000) as u8;
    }
    std::fs::write(&raw, &data).unwrap();
    let img = dir.join("comp.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", p(&raw), p(&img)]);
    let bytes = std::fs::read(&img).unwrap();
    let l2 = (be64(&bytes, be64(&bytes, 40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(
        be64(&bytes, l2) & (1 << 62),
        0,
        "first cluster is compressed"
    );
    (img, l2)
}

#[test]
fn compressed_cluster_past_end_of_file() {
    let dir = TempDir::new().unwrap();
    let (img, l2) = compressed_image(dir.path());
    let entry = be64(&std::fs::read(&img).unwrap(), l2);
    // 64 KiB clusters: the host offset is the low 54 bits.
    let moved = (entry & !((1u64 << 54) - 1)) | (1u64 << 40);
    patch(&img, l2, &moved.to_be_bytes());
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    let err = read_all(&opened).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_names(&err, &img, "past the end of the file");
}

#[test]
fn compressed_cluster_that_expands_past_a_cluster() {
    use std::io::Write;
    let dir = TempDir::new().unwrap();
    let (img, l2) = compressed_image(dir.path());
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes.len().div_ceil(512) * 512;
    bytes.resize(at, 0);
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&vec![7u8; 2 * 65536]).unwrap();
    bytes.extend_from_slice(&enc.finish().unwrap());
    // Bit 62: compressed; one sector of compressed data.
    let entry = (1u64 << 62) | at as u64;
    bytes[l2..l2 + 8].copy_from_slice(&entry.to_be_bytes());
    // And a second cluster whose data is garbage, not deflate.
    let garbage = (1u64 << 62) | 512;
    bytes[l2 + 8..l2 + 16].copy_from_slice(&garbage.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = opened.read_at(&mut buf, 0).unwrap_err();
    assert_names(&err, &img, "expands past one cluster");
    assert_eq!(err.offset, Some(at as u64));
    assert!(opened.read_at(&mut buf, 65536).is_err());
}

#[test]
fn encryption_is_refused_by_name() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "enc.qcow2");
    patch(&img, 32, &1u32.to_be_bytes());
    let err = open_err(&img);
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert_names(&err, &img, "encrypted");
}

#[test]
fn unknown_incompatible_bit_is_refused_by_name() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "incompat.qcow2");
    let data = std::fs::read(&img).unwrap();
    let incompat = be64(&data, 72);
    patch(&img, 72, &(incompat | 1 << 10).to_be_bytes());
    let err = open_err(&img);
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert_names(&err, &img, "incompatible feature bit 10");

    // With a name in the feature name table, the message uses it.
    let at = data[..65536]
        .windows(9)
        .position(|w| w == b"dirty bit")
        .expect("feature name table");
    patch(&img, at - 1, &[10]);
    let err = open_err(&img);
    assert_names(&err, &img, "'dirty bit' (bit 10)");
}

#[test]
fn corrupt_bit_is_refused_dirty_bit_is_not() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "flags.qcow2");
    let expected = qemu_raw(&img, dir.path());
    let incompat = be64(&std::fs::read(&img).unwrap(), 72);
    patch(&img, 72, &(incompat | 1).to_be_bytes());
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    assert!(opened.dirty());
    assert_same(&read_all(&opened).unwrap(), &expected, "dirty image");
    patch(&img, 72, &(incompat | 2).to_be_bytes());
    let err = open_err(&img);
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_names(&err, &img, "marked corrupt");
}

#[test]
fn external_data_file_is_refused() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data.raw");
    let img = create(
        dir.path(),
        "ext.qcow2",
        "1M",
        &["-o", &format!("data_file={}", p(&data))],
    );
    let err = open_err(&img);
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert_names(&err, &img, "external data file");
}

#[test]
fn not_qcow2_and_truncated() {
    let dir = TempDir::new().unwrap();
    let junk = dir.path().join("junk.qcow2");
    std::fs::write(&junk, noise(3, 70_000)).unwrap();
    assert_names(&open_err(&junk), &junk, "bad magic");

    let img = image_with_data(dir.path(), "short.qcow2");
    let data = std::fs::read(&img).unwrap();
    std::fs::write(&img, &data[..60]).unwrap();
    assert_names(&open_err(&img), &img, "only 60 bytes");

    let img = image_with_data(dir.path(), "bits.qcow2");
    patch(&img, 20, &30u32.to_be_bytes());
    assert_names(&open_err(&img), &img, "cluster_bits 30");
}

/// Random damage to the metadata of small images: anything may be reported, nothing may panic.
#[test]
fn random_damage_never_panics() {
    let dir = TempDir::new().unwrap();
    let mut seeds = Vec::new();
    for (name, opts) in [
        ("plain.qcow2", vec!["-o", "cluster_size=512"]),
        ("ext.qcow2", vec!["-o", "extended_l2=on,cluster_size=16384"]),
    ] {
        let img = create(dir.path(), name, "256K", &opts);
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0x5a 0 8192",
                "write -z 16384 4096",
                "write -P 1 200000 3000",
            ],
        );
        qemu_img(&["bitmap", "--add", p(&img), "b"]);
        seeds.push(std::fs::read(&img).unwrap());
    }
    let raw = dir.path().join("c.raw");
    std::fs::write(&raw, vec![9u8; 300_000]).unwrap();
    let comp = dir.path().join("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=4096",
        p(&raw),
        p(&comp),
    ]);
    seeds.push(std::fs::read(&comp).unwrap());

    let opts = OpenOptions {
        follow_backing: false,
        ..OpenOptions::default()
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..1500 {
        let mut data = seeds[round % seeds.len()].clone();
        // Metadata sits in the first few clusters; damage mostly there.
        let span = data.len().min(24_576);
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % span;
            data[at] = next() as u8;
        }
        let Ok(img) = Image::from_storage(Box::new(data), "fuzzed.qcow2", &opts) else {
            continue;
        };
        let size = img.size();
        let _ = img.extents(0, size.min(1 << 20));
        let mut buf = vec![0u8; 65536];
        for off in [0, 8000, 200_000] {
            if off + buf.len() as u64 <= size {
                let _ = img.read_at(&mut buf, off);
            }
        }
        if let Ok(list) = img.bitmaps() {
            for b in list {
                let _ = img.bitmap_dirty(&b.name, 0, size.min(1 << 20));
            }
        }
    }
}

#[test]
fn data_cluster_past_end_of_file_and_truncated_last_cluster() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "trunc.qcow2");
    let expected = qemu_raw(&img, dir.path());
    let data = std::fs::read(&img).unwrap();
    let l2 = (be64(&data, be64(&data, 40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    // The file ends 1000 bytes into the last data cluster: the rest reads as zeroes.
    let last = (0..8192)
        .map(|i| be64(&data, l2 + i * 8) & 0x00ff_ffff_ffff_fe00)
        .max()
        .unwrap() as usize;
    assert!(last + 65536 <= data.len());
    std::fs::write(&img, &data[..last + 1000]).unwrap();
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    let got = read_all(&opened).unwrap();
    let mut want = expected.clone();
    let guest_of_last = 3145728usize; // the second write's only cluster
    want[guest_of_last + 1000..guest_of_last + 65536].fill(0);
    assert_same(&got, &want, "truncated image");

    // An entry pointing wholly past the end is an error.
    let entry = be64(&data, l2) & !0x00ff_ffff_ffff_fe00;
    let mut bad = data.clone();
    bad[l2..l2 + 8].copy_from_slice(&(entry | (1u64 << 40)).to_be_bytes());
    std::fs::write(&img, &bad).unwrap();
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    let err = read_all(&opened).unwrap_err();
    assert_eq!(err.offset, Some(1 << 40));
    assert_names(&err, &img, "past the end of the file");
}

/// Offset of the bitmap directory entry of the only bitmap, from the bitmaps extension.
fn bitmap_entry(data: &[u8]) -> usize {
    let ext = data[..65536]
        .windows(4)
        .position(|w| w == [0x23, 0x85, 0x28, 0x75])
        .expect("bitmaps extension");
    be64(data, ext + 8 + 16) as usize
}

#[test]
fn stale_and_in_use_bitmaps() {
    let dir = TempDir::new().unwrap();
    let img = image_with_data(dir.path(), "bm.qcow2");
    qemu_img(&["bitmap", "--add", p(&img), "b"]);
    qemu_io(&img, "qcow2", &["write -P 1 0 4096"]);
    let data = std::fs::read(&img).unwrap();
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    assert_eq!(
        opened.bitmap_dirty("b", 0, opened.size()).unwrap(),
        vec![(0, 65536)]
    );

    // in_use: left by a writer that did not close the image; its bits are not trusted.
    let flags_at = bitmap_entry(&data) + 12;
    let flags = be32(&data, flags_at);
    patch(&img, flags_at, &(flags | 1).to_be_bytes());
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    assert!(opened.bitmaps().unwrap()[0].in_use);
    let err = opened.bitmap_dirty("b", 0, opened.size()).unwrap_err();
    assert_names(&err, &img, "in use");

    // Autoclear bit cleared by a writer that does not know bitmaps: they are stale, not shown.
    std::fs::write(&img, &data).unwrap();
    let autoclear = be64(&data, 88);
    patch(&img, 88, &(autoclear & !1).to_be_bytes());
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    assert!(opened.bitmaps().unwrap().is_empty());

    // A bitmap table past the end of the file.
    std::fs::write(&img, &data).unwrap();
    patch(&img, bitmap_entry(&data), &(1u64 << 40).to_be_bytes());
    let opened = Image::open(&img, &OpenOptions::default()).unwrap();
    let err = opened.bitmap_dirty("b", 0, opened.size()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_names(&err, &img, "table");
}
