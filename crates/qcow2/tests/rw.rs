//! Writing into images qemu created: random writes and zeroes through the crate, mirrored in a
//! raw file, then `qemu-img check` (no errors, no leaks) and `qemu-img compare` against the
//! mirror.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use qcow2::{ErrorKind, Image, OpenOptions, Storage};
use tempfile::TempDir;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn check_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", p(image)])
        .output()
        .expect("run qemu-img check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found on the image."),
        "qemu-img check {}: {text}",
        image.display()
    );
    assert!(!text.contains("leaked"), "qemu-img check: {text}");
}

fn compare(mirror: &[u8], image: &Path, dir: &Path) {
    let raw = dir.join("mirror.raw");
    std::fs::write(&raw, mirror).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", p(&raw), p(image)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compare {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Random writes (unaligned, up to three clusters), zeroes (aligned or not, keeping the
/// allocation or not) and flushes, applied to the image and to `mirror` alike.
fn random_ops(img: &Image, mirror: &mut [u8], rng: &mut Rng, ops: usize) {
    let size = mirror.len() as u64;
    let cs = img.cluster_size();
    for i in 0..ops {
        let aligned = rng.below(2) == 0;
        let mut off = rng.below(size);
        let mut len = 1 + rng.below(3 * cs);
        if aligned {
            off -= off % cs;
            len = len.div_ceil(cs) * cs;
        }
        let len = len.min(size - off);
        match rng.below(10) {
            0..=6 => {
                let byte = (rng.next() % 255 + 1) as u8;
                let buf: Vec<u8> = (0..len).map(|j| byte.wrapping_add(j as u8)).collect();
                img.write_at(&buf, off).unwrap();
                mirror[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            7..=8 => {
                let keep = rng.below(2) == 0;
                img.zero(off, len, keep).unwrap();
                mirror[off as usize..(off + len) as usize].fill(0);
            }
            _ => img.flush().unwrap(),
        }
        if i % 50 == 0 {
            let mut back = vec![0u8; len as usize];
            img.read_at(&mut back, off).unwrap();
            assert_eq!(
                back,
                mirror[off as usize..(off + len) as usize],
                "read back at {off}"
            );
        }
    }
}

/// Data, compressed clusters and zeroes qemu wrote, so writes meet every kind of entry.
fn populate(image: &Path, cs: u64, v3: bool) {
    let compressed_at: u64 = if cs >= 1 << 20 { 10 * cs } else { 4 << 20 };
    let mut cmds = vec![
        "write -P 0x11 0 300k".to_string(),
        format!("write -P 0x22 {} {}", 3 * cs + 512, cs),
        // Compressed writes need unallocated clusters: past the data above.
        format!("write -c -P 0x33 {} {}", compressed_at, cs),
        format!("write -c -P 0x34 {} {}", compressed_at + cs, cs),
        "write -P 0x44 2M 1M".to_string(),
    ];
    if v3 {
        cmds.push(format!("write -z {} {}", 2 * cs, cs));
        cmds.push("write -z 2304k 128k".to_string());
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(image, "qcow2", &refs);
}

fn write_and_verify(cs: u64, compat: &str, size: &str, seed: u64, ops: usize) {
    write_and_verify_with(cs, compat, size, seed, ops, &[]);
}

fn write_and_verify_with(cs: u64, compat: &str, size: &str, seed: u64, ops: usize, extra: &[&str]) {
    let dir = TempDir::new().unwrap();
    let cluster = format!("cluster_size={cs}");
    let compat_opt = format!("compat={compat}");
    let mut opts = vec!["-o", &cluster, "-o", &compat_opt];
    opts.extend_from_slice(extra);
    let image = create(dir.path(), "img.qcow2", size, &opts);
    populate(&image, cs, compat != "0.10");
    let mut mirror = qemu_raw(&image, dir.path());
    {
        let img = Image::open_rw(&image, &OpenOptions::default()).unwrap();
        assert!(img.is_writable());
        let mut rng = Rng(seed);
        random_ops(&img, &mut mirror, &mut rng, ops);
        img.flush().unwrap();
    }
    check_clean(&image);
    compare(&mirror, &image, dir.path());
    let img = Image::open(&image, &OpenOptions::default()).unwrap();
    let mut all = vec![0u8; mirror.len()];
    img.read_at(&mut all, 0).unwrap();
    assert!(all == mirror, "the crate reads back what it wrote");
}

#[test]
fn random_writes_v3_every_cluster_size() {
    for (i, cs) in [512u64, 4096, 65536, 2 << 20].into_iter().enumerate() {
        let size = if cs >= 1 << 20 { "32M" } else { "8M" };
        write_and_verify(cs, "1.1", size, 7 + i as u64, 400);
    }
}

#[test]
fn random_writes_with_extended_l2_entries() {
    for (i, cs) in [16384u64, 65536, 2 << 20].into_iter().enumerate() {
        let size = if cs >= 1 << 20 { "32M" } else { "8M" };
        write_and_verify_with(
            cs,
            "1.1",
            size,
            40 + i as u64,
            400,
            &["-o", "extended_l2=on"],
        );
    }
}

#[test]
fn random_writes_v2() {
    for (i, cs) in [512u64, 65536].into_iter().enumerate() {
        write_and_verify(cs, "0.10", "8M", 100 + i as u64, 400);
    }
}

#[test]
fn odd_virtual_size() {
    write_and_verify(65536, "1.1", "5000k", 3, 300);
    write_and_verify(4096, "0.10", "5000k", 4, 300);
}

#[test]
fn refcount_table_grows() {
    // 512-byte clusters: one refcount table cluster describes only 8 MiB of file.
    let dir = TempDir::new().unwrap();
    let image = create(dir.path(), "img.qcow2", "24M", &["-o", "cluster_size=512"]);
    let size = 24u64 << 20;
    let rt_before = std::fs::read(&image).unwrap()[48..60].to_vec();
    let mut mirror = vec![0u8; size as usize];
    {
        let img = Image::open_rw(&image, &OpenOptions::default()).unwrap();
        let mut off = 0;
        let mut n = 0u8;
        while off < size {
            let buf = vec![n | 1; 1 << 20];
            img.write_at(&buf, off).unwrap();
            mirror[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
            off += buf.len() as u64;
            n = n.wrapping_add(1);
            if n.is_multiple_of(7) {
                img.flush().unwrap();
            }
        }
        img.flush().unwrap();
    }
    let rt_after = std::fs::read(&image).unwrap()[48..60].to_vec();
    assert_ne!(rt_before, rt_after, "the refcount table moved");
    check_clean(&image);
    compare(&mirror, &image, dir.path());
}

fn backing_chain(format: &str, compat: &str, seed: u64) {
    backing_chain_with(format, compat, seed, "off");
}

fn backing_chain_with(format: &str, compat: &str, seed: u64, extended: &str) {
    let dir = TempDir::new().unwrap();
    let base = if format == "raw" {
        let base = dir.path().join("base.raw");
        let mut data = vec![0u8; 4 << 20];
        let mut rng = Rng(seed);
        for b in data.iter_mut().step_by(97) {
            *b = rng.next() as u8 | 1;
        }
        std::fs::write(&base, &data).unwrap();
        base
    } else {
        let base = create(dir.path(), "base.qcow2", "4M", &[]);
        qemu_io(&base, "qcow2", &["write -P 0x5a 0 4M", "write -z 1M 64k"]);
        base
    };
    let compat_opt = format!("compat={compat}");
    let extended_opt = format!("extended_l2={extended}");
    let image = create(
        dir.path(),
        "top.qcow2",
        "6M",
        &[
            "-b",
            p(&base),
            "-F",
            format,
            "-o",
            "cluster_size=65536",
            "-o",
            &compat_opt,
            "-o",
            &extended_opt,
        ],
    );
    qemu_io(&image, "qcow2", &["write -P 0x77 256k 100k"]);
    let mut mirror = qemu_raw(&image, dir.path());
    {
        let img = Image::open_rw(&image, &OpenOptions::default()).unwrap();
        let mut rng = Rng(seed);
        random_ops(&img, &mut mirror, &mut rng, 300);
        img.flush().unwrap();
    }
    check_clean(&image);
    compare(&mirror, &image, dir.path());
}

#[test]
fn writes_over_a_backing_file_copy_the_rest_of_the_cluster() {
    backing_chain("qcow2", "1.1", 11);
    backing_chain("qcow2", "0.10", 12);
    backing_chain("raw", "1.1", 13);
    backing_chain("raw", "0.10", 14);
    // Subclusters: a write completes only the subclusters it touches from the backing file.
    backing_chain_with("qcow2", "1.1", 15, "on");
    backing_chain_with("raw", "1.1", 16, "on");
}

#[test]
fn concurrent_writers() {
    let dir = TempDir::new().unwrap();
    let image = create(dir.path(), "img.qcow2", "16M", &["-o", "cluster_size=4096"]);
    qemu_io(&image, "qcow2", &["write -P 0x11 0 2M"]);
    let size = 16u64 << 20;
    let stripe = 64u64 << 10;
    let threads = 4u64;
    let img = Arc::new(Image::open_rw(&image, &OpenOptions::default()).unwrap());
    let mut mirror = qemu_raw(&image, dir.path());
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                // Each thread owns every `threads`-th stripe: what it writes there is final.
                let mut rng = Rng(1000 + t);
                let mut done = Vec::new();
                for i in 0..300 {
                    let s = rng.below(size / stripe / threads) * threads + t;
                    let off = s * stripe + rng.below(stripe - 1);
                    let len = (1 + rng.below(20000)).min((s + 1) * stripe - off);
                    if i % 5 == 4 {
                        img.zero(off, len, false).unwrap();
                        done.push((off, vec![0u8; len as usize]));
                    } else {
                        let buf = vec![(t as u8 + 1) * 16 + (i % 16) as u8; len as usize];
                        img.write_at(&buf, off).unwrap();
                        done.push((off, buf));
                    }
                    if i % 97 == 0 {
                        img.flush().unwrap();
                    }
                }
                done
            })
        })
        .collect();
    for h in handles {
        for (off, buf) in h.join().unwrap() {
            mirror[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        }
    }
    img.flush().unwrap();
    drop(img);
    check_clean(&image);
    compare(&mirror, &image, dir.path());
}

#[test]
fn read_only_images_refuse_writes() {
    let dir = TempDir::new().unwrap();
    let image = create(dir.path(), "img.qcow2", "1M", &[]);
    let img = Image::open(&image, &OpenOptions::default()).unwrap();
    assert_eq!(
        img.write_at(&[1], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(
        img.zero(0, 512, false).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    img.flush().unwrap();
}

#[test]
fn unsupported_images_are_refused_by_name() {
    let dir = TempDir::new().unwrap();
    let snap = create(dir.path(), "snap.qcow2", "1M", &[]);
    qemu_img(&["snapshot", "-c", "s1", p(&snap)]);
    let e = Image::open_rw(&snap, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("internal snapshots"), "{e}");

    let bm = create(dir.path(), "bm.qcow2", "1M", &[]);
    qemu_img(&["bitmap", "--add", p(&bm), "b0"]);
    let e = Image::open_rw(&bm, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("bitmaps"), "{e}");

    let narrow = create(dir.path(), "narrow.qcow2", "1M", &["-o", "refcount_bits=1"]);
    let e = Image::open_rw(&narrow, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("1-bit refcounts"), "{e}");
}

fn be64_at(data: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(data[at..at + 8].try_into().unwrap())
}

#[test]
fn a_wrong_refcount_table_is_an_error_not_a_panic() {
    let dir = TempDir::new().unwrap();
    // Refcount block entry pointing inside a cluster.
    let image = create(dir.path(), "bad.qcow2", "4M", &[]);
    let mut data = std::fs::read(&image).unwrap();
    let rt = be64_at(&data, 48) as usize;
    data[rt..rt + 8].copy_from_slice(&1234u64.to_be_bytes());
    std::fs::write(&image, &data).unwrap();
    let img = Image::open_rw(&image, &OpenOptions::default()).unwrap();
    let e = img.write_at(&[1u8; 4096], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("refcount block"), "{e}");
    assert!(e.to_string().contains("bad.qcow2"), "{e}");
    drop(img);

    // A refcount block that claims the clusters past the end of the file are used.
    let image = create(dir.path(), "claims.qcow2", "4M", &[]);
    let mut data = std::fs::read(&image).unwrap();
    let rt = be64_at(&data, 48) as usize;
    let block = be64_at(&data, rt) as usize;
    let clusters = data.len() / 65536;
    for c in clusters..clusters + 8 {
        data[block + 2 * c..block + 2 * c + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    std::fs::write(&image, &data).unwrap();
    let img = Image::open_rw(&image, &OpenOptions::default()).unwrap();
    let e = img.write_at(&[1u8; 100], 70000).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("refcount"), "{e}");
    drop(img);

    // A refcount table that extends past the end of the file.
    let image = create(dir.path(), "short.qcow2", "4M", &[]);
    let mut data = std::fs::read(&image).unwrap();
    data[56..60].copy_from_slice(&1000u32.to_be_bytes());
    std::fs::write(&image, &data).unwrap();
    let e = Image::open_rw(&image, &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

#[test]
fn a_table_aimed_at_the_metadata_is_an_error() {
    let dir = TempDir::new().unwrap();
    let image = create(dir.path(), "aimed.qcow2", "4M", &[]);
    qemu_io(&image, "qcow2", &["write -P 0x11 0 64k"]);
    let mut data = std::fs::read(&image).unwrap();
    let l1 = be64_at(&data, 40) as usize;
    let l2 = (be64_at(&data, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    // The first cluster's entry says "owned alone, at the L1 table".
    data[l2..l2 + 8].copy_from_slice(&((l1 as u64) | 1 << 63).to_be_bytes());
    std::fs::write(&image, &data).unwrap();
    let img = Image::open_rw(&image, &OpenOptions::default()).unwrap();
    let e = img.write_at(&[7u8; 512], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("overlaps the image metadata"), "{e}");
    drop(img);
    assert_eq!(std::fs::read(&image).unwrap(), data, "nothing was written");
}

#[test]
fn unflushed_writes_leave_a_consistent_image() {
    let dir = TempDir::new().unwrap();
    let image = create(dir.path(), "img.qcow2", "8M", &[]);
    qemu_io(&image, "qcow2", &["write -P 0x11 0 1M"]);
    let before = qemu_raw(&image, dir.path());
    let img = Image::open_rw(&image, &OpenOptions::default()).unwrap();
    img.write_at(&vec![0x22u8; 3 << 20], 2 << 20).unwrap();
    img.zero(0, 512 << 10, false).unwrap();
    // As if the process died here: the tables never reach the file.
    std::mem::forget(img);
    check_clean(&image);
    compare(&before, &image, dir.path());
}

/// A file that keeps a copy of itself at every sync: each copy is what a crash right after
/// that sync would leave.
struct Snapshots {
    file: std::fs::File,
    path: std::path::PathBuf,
    taken: std::sync::Mutex<Vec<std::path::PathBuf>>,
}

impl Storage for Snapshots {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        Storage::read_at(&self.file, buf, offset)
    }

    fn len(&self) -> std::io::Result<u64> {
        Storage::len(&self.file)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        Storage::write_at(&self.file, buf, offset)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        let mut taken = self.taken.lock().unwrap();
        let copy = self.path.with_extension(format!("crash{}", taken.len()));
        std::fs::copy(&self.path, &copy)?;
        taken.push(copy);
        Ok(())
    }
}

#[test]
fn every_sync_point_leaves_a_consistent_image() {
    // Small clusters: the refcount table grows, and blocks and L2 tables are added often.
    sync_points(&["-o", "cluster_size=512"], 512);
    sync_points(&["-o", "cluster_size=16384,extended_l2=on"], 16384);
}

fn sync_points(opts: &[&str], cs: u64) {
    let dir = TempDir::new().unwrap();
    let image = create(dir.path(), "img.qcow2", "6M", opts);
    let compressed = format!("write -c -P 0x12 2M {cs}");
    qemu_io(
        &image,
        "qcow2",
        &["write -P 0x11 0 1M", &compressed, "write -P 0x13 3M 700"],
    );
    let mut mirror = qemu_raw(&image, dir.path());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let storage = Snapshots {
        file,
        path: image.clone(),
        taken: Default::default(),
    };
    let img =
        Image::from_storage_rw(Box::new(storage), p(&image), &OpenOptions::default()).unwrap();
    let mut rng = Rng(77);
    for round in 0..6u64 {
        let off = round << 20;
        let buf = vec![round as u8 + 0x40; 700 << 10];
        img.write_at(&buf, off + 1000).unwrap();
        mirror[(off + 1000) as usize..(off + 1000) as usize + buf.len()].copy_from_slice(&buf);
        random_ops(&img, &mut mirror, &mut rng, 40);
        img.zero(off, 64 << 10, false).unwrap();
        mirror[off as usize..(off + (64 << 10)) as usize].fill(0);
        img.flush().unwrap();
    }
    drop(img);
    check_clean(&image);
    compare(&mirror, &image, dir.path());
    let copies: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.to_string_lossy().starts_with("crash"))
        })
        .collect();
    assert!(copies.len() > 20, "{} sync points", copies.len());
    for copy in copies {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", p(&copy)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // Leaks (exit 3) are what a crash may leave; errors never.
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)) && !text.contains("ERROR"),
            "{}: {text}{}",
            copy.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn writes_into_compressed_images() {
    for compression in ["zlib", "zstd"] {
        let dir = TempDir::new().unwrap();
        let raw = dir.path().join("src.raw");
        let mut src = vec![0u8; 4 << 20];
        let mut rng = Rng(5);
        for (i, chunk) in src.chunks_mut(4096).enumerate() {
            if i % 5 != 0 {
                chunk.fill((rng.next() % 7) as u8 + 1);
            }
        }
        std::fs::write(&raw, &src).unwrap();
        let image = dir.path().join("img.qcow2");
        let opt = format!("compression_type={compression}");
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &opt,
            "-f",
            "raw",
            p(&raw),
            p(&image),
        ]);
        {
            let img = Image::open_rw(&image, &OpenOptions::default()).unwrap();
            random_ops(&img, &mut src, &mut rng, 300);
            img.flush().unwrap();
        }
        check_clean(&image);
        compare(&src, &image, dir.path());
    }
}

#[test]
fn one_writer_at_a_time() {
    let dir = TempDir::new().unwrap();
    let image = create(dir.path(), "img.qcow2", "1M", &[]);
    let first = Image::open_rw(&image, &OpenOptions::default()).unwrap();
    let e = Image::open_rw(&image, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("already open for writing"), "{e}");
    Image::open(&image, &OpenOptions::default()).unwrap();
    drop(first);
    Image::open_rw(&image, &OpenOptions::default()).unwrap();
}

/// The in-memory storage the write fuzz target uses: writes and zeroes land, the image it
/// holds passes `qemu-img check`, and a write that would grow it past its limit is an error
/// (the image still consistent), never an allocation that follows a table's word.
#[test]
fn images_in_bounded_memory() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("mem.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        p(&image),
        "8M",
    ]);
    populate(&image, 4096, true);
    let bytes = std::fs::read(&image).unwrap();
    let start = bytes.len() as u64;
    // Room for a few new clusters and their tables, not for 8 MiB of new data.
    let storage = Arc::new(qcow2::MemoryStorage::new(bytes, start + (256 << 10)));
    let img = Image::from_storage_rw(
        Box::new(storage.clone()),
        p(&image),
        &OpenOptions::default(),
    )
    .unwrap();
    let mut mirror = qemu_raw(&image, dir.path());
    let small: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8 + 1).collect();
    img.write_at(&small, 5 << 20).unwrap();
    mirror[5 << 20..(5 << 20) + small.len()].copy_from_slice(&small);
    img.zero(1 << 20, 64 << 10, false).unwrap();
    mirror[1 << 20..(1 << 20) + (64 << 10)].fill(0);
    img.flush().unwrap();
    // 2 MiB of new clusters past the ranges checked below: more than the room left.
    let big = vec![0x77u8; 2 << 20];
    let err = img.write_at(&big, 6 << 20).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    img.flush().unwrap();
    drop(img);
    let written = storage.snapshot();
    assert!(written.len() as u64 <= start + (256 << 10));
    std::fs::write(&image, &written).unwrap();
    check_clean(&image);
    let again = qemu_raw(&image, dir.path());
    assert_eq!(
        again[5 << 20..(5 << 20) + small.len()],
        mirror[5 << 20..(5 << 20) + small.len()]
    );
    assert!(
        again[1 << 20..(1 << 20) + (64 << 10)]
            .iter()
            .all(|&b| b == 0)
    );
}
