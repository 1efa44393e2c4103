//! The writers against qemu: every image they make must pass `qemu-img check` with no errors
//! and no leaks, compare identical to its raw source, map its data where it was planned, and
//! read back byte for byte through the crate's reader.

// Lists of one data range are what they look like, not a mistaken collect.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use std::io::Write;
use std::ops::Range;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use qcow2::{Compression, ErrorKind, ExtentKind, Image, OpenOptions, StreamPlan};
use tempfile::TempDir;

/// A sink that can only be written: the streaming writer compiles against it, so it cannot
/// seek.
#[derive(Debug)]
struct Pipe(Vec<u8>);

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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

/// A guest of `size` bytes: random data ranges (unaligned), some with zero runs and some
/// compressible text inside them, and holes between. Returns the bytes and the data ranges.
fn source(seed: u64, size: u64) -> (Vec<u8>, Vec<Range<u64>>) {
    let mut rng = Rng(seed | 1);
    let mut data = vec![0u8; size as usize];
    let mut ranges = Vec::new();
    let mut at = rng.below(20_000);
    while at < size {
        let len = (1 + rng.below(400_000)).min(size - at);
        let r = at..at + len;
        let bytes = &mut data[r.start as usize..r.end as usize];
        // The first range always has the far repeats, so every image has some.
        let kind = if ranges.is_empty() { 3 } else { rng.below(4) };
        match kind {
            0 => bytes.copy_from_slice(&noise(rng.next(), len as usize)),
            // Repeats only further apart than qemu's 4 KiB deflate window.
            3 => {
                let block = noise(rng.next(), 6000);
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = block[i % 6000];
                }
            }
            1 => {
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = b"compressible text; "[i % 19];
                }
            }
            _ => {
                bytes.copy_from_slice(&noise(rng.next(), len as usize));
                // A zero run inside the data: stays data in a streamed image, unallocated in
                // one from the seekable writer.
                let z = (len / 3) as usize;
                bytes[z..2 * z].fill(0);
            }
        }
        ranges.push(r);
        at += len + rng.below(600_000);
    }
    // The very last bytes hold data, so the last cluster is partial.
    let tail = size - 100;
    if ranges.last().is_none_or(|r| r.end <= tail) {
        data[tail as usize..].fill(0x5a);
        ranges.push(tail..size);
    }
    (data, ranges)
}

/// Feeds the planned clusters from `src` in pieces of up to three clusters, clipped to the
/// virtual size (the last cluster is then partial).
fn feed(plan: &StreamPlan, src: &[u8], mut write: impl FnMut(u64, &[u8]) -> qcow2::Result<()>) {
    let cs = plan.cluster_size();
    let size = src.len() as u64;
    for r in plan.planned_ranges() {
        let mut off = r.start;
        while off < r.end {
            let end = (off + 3 * cs).min(r.end).min(size);
            write(off, &src[off as usize..end as usize]).unwrap();
            off += 3 * cs;
        }
    }
}

fn qemu_check(image: &Path) {
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
        out.status.success(),
        "qemu-img check {}: {text}",
        image.display()
    );
    assert!(
        text.contains("No errors were found on the image."),
        "qemu-img check {}: {text}",
        image.display()
    );
    assert!(!text.contains("leaked"), "qemu-img check: {text}");
}

fn qemu_compare(raw: &Path, image: &Path) {
    let out = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", p(raw), p(image)]);
    assert!(out.contains("Images are identical"), "compare: {out}");
}

/// The map qemu must show: data where the plan put clusters (clipped to the virtual size),
/// unallocated elsewhere.
fn expected_map(plan: &StreamPlan) -> Vec<qcow2::Extent> {
    let size = plan.virtual_size();
    let mut out = Vec::new();
    let mut at = 0;
    let push = |out: &mut Vec<qcow2::Extent>, offset: u64, end: u64, kind| {
        if end > offset {
            merge_push(
                out,
                qcow2::Extent {
                    offset,
                    length: end - offset,
                    kind,
                    depth: 0,
                },
            );
        }
    };
    for r in plan.planned_ranges() {
        push(&mut out, at, r.start, ExtentKind::Unallocated);
        push(&mut out, r.start, r.end.min(size), ExtentKind::Data);
        at = r.end.min(size);
    }
    push(&mut out, at, size, ExtentKind::Unallocated);
    out
}

/// The plan whose map a data-first image must show for `src`: only the clusters holding
/// anything but zeroes.
fn zeroes_left_out(src: &[u8], cs: u64) -> StreamPlan {
    StreamPlan::new(src.len() as u64, cs, &nonzero_ranges(src, cs)).unwrap()
}

/// All the checks on one written image; `plan` gives the map it must have.
fn verify(image: &Path, raw: &Path, src: &[u8], plan: &StreamPlan, dir: &Path) {
    qemu_check(image);
    qemu_compare(raw, image);
    assert_eq!(
        qemu_map(image),
        expected_map(plan),
        "map of {}",
        image.display()
    );
    let img = check_against_qemu(image, dir, &OpenOptions::default());
    let mut back = vec![0xa5; src.len()];
    img.read_at(&mut back, 0).unwrap();
    assert_same(&back, src, "read back");
}

/// Not a whole number of clusters for clusters above 512 bytes: the last one is partial.
const SIZE: u64 = 5 * 1024 * 1024 + 1536;

#[test]
fn streamed_images_for_every_cluster_size() {
    let dir = TempDir::new().unwrap();
    let (src, ranges) = source(7, SIZE);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &src).unwrap();
    for cs in [512u64, 4096, 65536, 2 << 20] {
        let plan = StreamPlan::new(SIZE, cs, &ranges).unwrap();
        let mut w = plan.writer(Pipe(Vec::new())).unwrap();
        feed(&plan, &src, |off, b| w.write_cluster_data(off, b));
        let bytes = w.finish().unwrap().0;
        assert_eq!(bytes.len() as u64, plan.image_size(), "image size, {cs}");
        let image = dir.path().join(format!("s{cs}.qcow2"));
        std::fs::write(&image, &bytes).unwrap();
        verify(&image, &raw, &src, &plan, dir.path());
    }
}

#[test]
fn streamed_through_a_real_pipe() {
    let dir = TempDir::new().unwrap();
    let (src, ranges) = source(11, SIZE);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &src).unwrap();
    let image = dir.path().join("piped.qcow2");
    let plan = StreamPlan::new(SIZE, 65536, &ranges).unwrap();
    let mut child = Command::new("sh")
        .args(["-c", "cat > \"$0\"", p(&image)])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = plan.writer(child.stdin.take().unwrap()).unwrap();
    feed(&plan, &src, |off, b| w.write_cluster_data(off, b));
    drop(w.finish().unwrap());
    assert!(child.wait().unwrap().success());
    assert_eq!(std::fs::metadata(&image).unwrap().len(), plan.image_size());
    verify(&image, &raw, &src, &plan, dir.path());
}

#[test]
fn compressed_images() {
    let dir = TempDir::new().unwrap();
    let (src, ranges) = source(23, SIZE);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &src).unwrap();
    for compression in [Compression::Zlib, Compression::Zstd] {
        for cs in [512u64, 4096, 65536, 2 << 20] {
            let plan = StreamPlan::new(SIZE, cs, &ranges).unwrap();
            let image = dir.path().join(format!("c{cs}-{compression:?}.qcow2"));
            let file = std::fs::File::create(&image).unwrap();
            let mut w = plan.compressed_writer(file, compression).unwrap();
            feed(&plan, &src, |off, b| w.write_cluster_data(off, b));
            let (_, len) = w.finish().unwrap();
            assert_eq!(std::fs::metadata(&image).unwrap().len(), len);
            // The source is a third compressible text: the image must be smaller than the
            // uncompressed one.
            assert!(
                len < plan.image_size() * 9 / 10,
                "{compression:?} {cs}: {len} vs {}",
                plan.image_size()
            );
            verify(&image, &raw, &src, &zeroes_left_out(&src, cs), dir.path());
            let img = Image::open(&image, &OpenOptions::default()).unwrap();
            assert_eq!(img.compression(), compression);
            let info = qemu_img(&["info", "--output=json", p(&image)]);
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            let want = match compression {
                Compression::Zlib => "zlib",
                Compression::Zstd => "zstd",
            };
            assert_eq!(
                v["format-specific"]["data"]["compression-type"], want,
                "{info}"
            );
        }
    }
}

#[test]
fn seekable_images_leave_zero_clusters_unallocated() {
    let dir = TempDir::new().unwrap();
    let (src, ranges) = source(41, SIZE);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &src).unwrap();
    let whole = [0..SIZE];
    for cs in [512u64, 4096, 65536, 2 << 20] {
        let want = zeroes_left_out(&src, cs);
        // The source's zero runs inside data must give unallocated clusters; they are too short
        // to hold a whole 2 MiB cluster.
        assert!(
            cs > 65536
                || want.data_clusters()
                    < StreamPlan::new(SIZE, cs, &ranges).unwrap().data_clusters(),
            "{cs}: the source has zero clusters inside its data"
        );
        // Planned from the data ranges, or the whole disk planned as data: the same image.
        for (how, planned) in [("ranges", &ranges[..]), ("whole", &whole[..])] {
            let plan = StreamPlan::new(SIZE, cs, planned).unwrap();
            let image = dir.path().join(format!("z{cs}-{how}.qcow2"));
            let file = std::fs::File::create(&image).unwrap();
            let mut w = plan.seekable_writer(file).unwrap();
            feed(&plan, &src, |off, b| w.write_cluster_data(off, b));
            let (_, len) = w.finish().unwrap();
            assert_eq!(std::fs::metadata(&image).unwrap().len(), len, "{cs} {how}");
            // The same clusters as a streamed image of only the non-zero clusters, in another
            // order.
            assert_eq!(len, want.image_size(), "{cs} {how}");
            verify(&image, &raw, &src, &want, dir.path());
            let img = Image::open(&image, &OpenOptions::default()).unwrap();
            assert_eq!(img.compression(), Compression::Zlib, "no compression type");
        }
    }
}

#[test]
fn an_all_zero_source_gives_a_seekable_image_without_l2_tables() {
    let dir = TempDir::new().unwrap();
    let size = 16u64 << 20;
    let src = vec![0u8; size as usize];
    let raw = dir.path().join("zero.raw");
    std::fs::write(&raw, &src).unwrap();
    for cs in [512u64, 65536] {
        let plan = StreamPlan::new(size, cs, &[0..size]).unwrap();
        let image = dir.path().join(format!("zero{cs}.qcow2"));
        let mut w = plan
            .seekable_writer(std::fs::File::create(&image).unwrap())
            .unwrap();
        feed(&plan, &src, |off, b| w.write_cluster_data(off, b));
        let (_, len) = w.finish().unwrap();
        // Header, L1, refcount table and one refcount block.
        let l1 = (size.div_ceil(cs * cs / 8) * 8).div_ceil(cs);
        assert_eq!(len, (3 + l1) * cs, "{cs}");
        let empty = StreamPlan::new(size, cs, &[]).unwrap();
        verify(&image, &raw, &src, &empty, dir.path());
    }
}

#[test]
fn huge_sparse_image_is_small() {
    let dir = TempDir::new().unwrap();
    let size = 4u64 << 40;
    let ranges = [
        0..5000,
        (1u64 << 40) + 7..(1u64 << 40) + 300_000,
        size - 10..size,
    ];
    let plan = StreamPlan::new(size, 65536, &ranges).unwrap();
    let image = dir.path().join("huge.qcow2");
    let file = std::fs::File::create(&image).unwrap();
    let mut w = plan.writer(std::io::BufWriter::new(file)).unwrap();
    let chunk = |r: &Range<u64>| -> Vec<u8> { noise(r.start, (r.end - r.start) as usize) };
    for r in &ranges {
        // The planned range starts at the cluster holding r.start.
        let start = r.start / 65536 * 65536;
        let mut data = vec![0u8; (r.start - start) as usize];
        data.extend_from_slice(&chunk(r));
        w.write_cluster_data(start, &data).unwrap();
    }
    w.finish().unwrap();
    let len = std::fs::metadata(&image).unwrap().len();
    assert_eq!(len, plan.image_size());
    assert!(len < 2 << 20, "image of {len} bytes");
    qemu_check(&image);
    assert_eq!(qemu_map(&image), expected_map(&plan));
    let img = Image::open(&image, &OpenOptions::default()).unwrap();
    assert_eq!(img.size(), size);
    for r in &ranges {
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        img.read_at(&mut buf, r.start).unwrap();
        assert_same(&buf, &chunk(r), &format!("range {r:?}"));
    }
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 3 << 40).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn no_data_at_all() {
    let dir = TempDir::new().unwrap();
    let plan = StreamPlan::new(10 << 20, 65536, &[]).unwrap();
    let bytes = plan.writer(Pipe(Vec::new())).unwrap().finish().unwrap().0;
    assert_eq!(bytes.len() as u64, plan.image_size());
    let image = dir.path().join("empty.qcow2");
    std::fs::write(&image, &bytes).unwrap();
    qemu_check(&image);
    assert_eq!(qemu_map(&image), expected_map(&plan));
}

#[test]
fn bad_plans_are_errors() {
    let kind = |r: qcow2::Result<StreamPlan>| r.unwrap_err().kind();
    let mb = 1u64 << 20;
    assert_eq!(
        kind(StreamPlan::new(mb, 65536, &[100_000..200_000, 0..10])),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(StreamPlan::new(mb, 65536, &[0..10, 5..20])),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(StreamPlan::new(mb, 65536, &[0..mb + 1])),
        ErrorKind::InvalidArgument
    );
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = [20..10];
    assert_eq!(
        kind(StreamPlan::new(mb, 65536, &backwards)),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(StreamPlan::new(mb + 1, 512, &[])),
        ErrorKind::InvalidArgument
    );
    for cs in [0, 256, 1000, 4 << 20] {
        assert_eq!(
            kind(StreamPlan::new(mb, cs, &[])),
            ErrorKind::InvalidArgument
        );
    }
    // 512-byte clusters cannot map 4 PiB within qemu's L1 limit.
    assert_eq!(
        kind(StreamPlan::new(4 << 50, 512, &[])),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn writes_outside_the_plan_are_errors() {
    let cs = 4096u64;
    let plan = StreamPlan::new(1 << 20, cs, &[10_000..20_000, 100_000..101_000]).unwrap();
    assert_eq!(plan.planned_ranges(), vec![8192..20480, 98304..102400]);
    let mut w = plan.writer(Pipe(Vec::new())).unwrap();
    let c = vec![7u8; cs as usize];
    // Not the next planned cluster.
    let e = w.write_cluster_data(0, &c).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(w.write_cluster_data(12288, &c).is_err());
    // Past the end of the planned range.
    assert!(
        w.write_cluster_data(8192, &vec![0; 4 * cs as usize])
            .is_err()
    );
    w.write_cluster_data(8192, &c).unwrap();
    w.write_cluster_data(12288, &c[..100]).unwrap();
    // A partial cluster counts as the whole cluster.
    assert!(w.write_cluster_data(12288, &c).is_err());
    w.write_cluster_data(16384, &c).unwrap();
    let mut w2 = plan.writer(Pipe(Vec::new())).unwrap();
    w2.write_cluster_data(8192, &vec![1; 3 * cs as usize])
        .unwrap();
    // Finishing before everything planned was written.
    assert_eq!(w2.finish().unwrap_err().kind(), ErrorKind::InvalidArgument);
    w.write_cluster_data(98304, &c).unwrap();
    // Everything was written: any further write is refused.
    assert!(w.write_cluster_data(102400, &c).is_err());
    let bytes = w.finish().unwrap().0;
    assert_eq!(bytes.len() as u64, plan.image_size());

    // The seekable writers keep the same contract, zero clusters included.
    let dir = TempDir::new().unwrap();
    for compression in [Some(Compression::Zstd), None] {
        let file = std::fs::File::create(dir.path().join("c.qcow2")).unwrap();
        let mut w = match compression {
            Some(c) => plan.compressed_writer(file, c),
            None => plan.seekable_writer(file),
        }
        .unwrap();
        assert!(w.write_cluster_data(98304, &c).is_err());
        w.write_cluster_data(8192, &vec![0; cs as usize]).unwrap();
        assert!(w.write_cluster_data(8192, &c).is_err());
        w.write_cluster_data(12288, &c).unwrap();
        assert!(w.finish().is_err());
    }
}

/// A raw file with holes (never written), written zero clusters and data; its size is not a
/// whole number of clusters.
fn raw_file(dir: &Path, seed: u64, size: u64) -> (std::path::PathBuf, Vec<u8>) {
    let (mut src, ranges) = source(seed, size);
    // Zero clusters that were written: they must come out unallocated, like holes.
    let z = (size / 2) as usize;
    src[z..z + 300_000].fill(0);
    let path = dir.join(format!("raw{seed}.raw"));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    for r in &ranges {
        f.write_all_at(&src[r.start as usize..r.end as usize], r.start)
            .unwrap();
    }
    (path, src)
}

/// Guest ranges whose clusters hold anything but zeroes.
fn nonzero_ranges(src: &[u8], cs: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, c) in src.chunks(cs as usize).enumerate() {
        if c.iter().all(|&b| b == 0) {
            continue;
        }
        let start = i as u64 * cs;
        let end = start + c.len() as u64;
        match out.last_mut() {
            Some(l) if l.end == start => l.end = end,
            _ => out.push(start..end),
        }
    }
    out
}

#[test]
fn from_raw_files() {
    let dir = TempDir::new().unwrap();
    let (raw, src) = raw_file(dir.path(), 31, SIZE);
    for (cs, compression, seekable) in [
        (65536u64, None, false),
        (4096, None, false),
        (65536, None, true),
        (512, None, true),
        (65536, Some(Compression::Zstd), true),
        (512, Some(Compression::Zlib), true),
    ] {
        let opts = qcow2::WriteOptions {
            cluster_size: cs,
            compression,
        };
        let image = dir
            .path()
            .join(format!("r{cs}-{compression:?}-{seekable}.qcow2"));
        if seekable {
            let file = std::fs::File::create(&image).unwrap();
            qcow2::write_from_raw_seekable(&raw, file, &opts).unwrap();
        } else {
            let bytes = qcow2::write_from_raw(&raw, Pipe(Vec::new()), &opts)
                .unwrap()
                .0;
            std::fs::write(&image, bytes).unwrap();
        }
        let plan = StreamPlan::new(SIZE, cs, &nonzero_ranges(&src, cs)).unwrap();
        verify(&image, &raw, &src, &plan, dir.path());
    }
    // Compression without a seekable destination is refused.
    let opts = qcow2::WriteOptions {
        cluster_size: 65536,
        compression: Some(Compression::Zlib),
    };
    let e = qcow2::write_from_raw(&raw, Pipe(Vec::new()), &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

/// Times the writer against `qemu-img convert` on a raw image of `FERRY_BENCH_MIB` MiB
/// (default 1024), half data and half holes. Run with `--ignored --nocapture`, in release;
/// `FERRY_BENCH_MODES=plain` times only the uncompressed writers.
#[test]
#[ignore]
fn bench_against_qemu_img_convert() {
    use std::time::Instant;
    let mib: u64 = std::env::var("FERRY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = TempDir::new().unwrap();
    let raw = dir.path().join("bench.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(mib << 20).unwrap();
    use std::os::unix::fs::FileExt;
    let mut rng = Rng(99);
    for m in (0..mib).step_by(2) {
        // Half noise, half text, so compression has work of both kinds.
        let block = if rng.below(2) == 0 {
            noise(rng.next(), 1 << 20)
        } else {
            b"some compressible text ".repeat((1 << 20) / 23 + 1)[..1 << 20].to_vec()
        };
        f.write_all_at(&block, m << 20).unwrap();
    }
    drop(f);
    let time = |what: &str, run: &mut dyn FnMut()| {
        let t = Instant::now();
        run();
        let s = t.elapsed().as_secs_f64();
        println!("{what}: {s:.2} s ({:.0} MiB/s)", mib as f64 / s);
    };
    let modes = match std::env::var("FERRY_BENCH_MODES").as_deref() {
        Ok("plain") => vec![None],
        _ => vec![None, Some(Compression::Zstd), Some(Compression::Zlib)],
    };
    for compression in modes {
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let opts = qcow2::WriteOptions {
            cluster_size: 65536,
            compression,
        };
        time(
            &format!("ferry write_from_raw {compression:?}"),
            &mut || {
                let file = std::fs::File::create(&ours).unwrap();
                qcow2::write_from_raw_seekable(&raw, file, &opts).unwrap();
            },
        );
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        match compression {
            None => {}
            Some(Compression::Zstd) => args.extend(["-c", "-o", "compression_type=zstd"]),
            Some(Compression::Zlib) => args.push("-c"),
        }
        args.extend([p(&raw), p(&theirs)]);
        time(&format!("qemu-img convert {compression:?}"), &mut || {
            qemu_img(&args);
        });
        qemu_check(&ours);
        qemu_compare(&raw, &ours);
        println!(
            "  sizes: ours {} MiB, qemu-img {} MiB",
            std::fs::metadata(&ours).unwrap().len() >> 20,
            std::fs::metadata(&theirs).unwrap().len() >> 20
        );
    }
}

/// 512-byte clusters and 20 MiB of data: a refcount table of several clusters, hundreds of
/// refcount blocks and L2 tables.
#[test]
fn many_small_clusters() {
    let dir = TempDir::new().unwrap();
    let size = 24u64 << 20;
    let mut src = vec![0u8; size as usize];
    src[1 << 20..21 << 20].copy_from_slice(&noise(5, 20 << 20));
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &src).unwrap();
    let ranges = [(1u64 << 20)..(21 << 20)];
    let plan = StreamPlan::new(size, 512, &ranges).unwrap();
    let mut w = plan.writer(Pipe(Vec::new())).unwrap();
    feed(&plan, &src, |off, b| w.write_cluster_data(off, b));
    let bytes = w.finish().unwrap().0;
    assert_eq!(bytes.len() as u64, plan.image_size());
    // The refcount table is at cluster 1; it must span more than one cluster here.
    assert!(be32(&bytes, 56) > 1, "refcount table clusters");
    let image = dir.path().join("small.qcow2");
    std::fs::write(&image, &bytes).unwrap();
    verify(&image, &raw, &src, &plan, dir.path());

    let image = dir.path().join("small-zstd.qcow2");
    let mut w = plan
        .compressed_writer(std::fs::File::create(&image).unwrap(), Compression::Zstd)
        .unwrap();
    feed(&plan, &src, |off, b| w.write_cluster_data(off, b));
    w.finish().unwrap();
    verify(&image, &raw, &src, &zeroes_left_out(&src, 512), dir.path());
}

/// Random plans (sizes, cluster sizes, ranges across L2 table boundaries) read back through
/// the crate's reader; every fifth also through `qemu-img check`.
#[test]
fn random_plans_read_back() {
    let dir = TempDir::new().unwrap();
    let mut rng = Rng(0x5eed);
    for round in 0..60 {
        let cs = 512u64 << rng.below(5);
        // Up to a few L2 tables' worth of guest, so ranges cross table boundaries.
        let l2_span = cs * (cs / 8);
        let size = (1 + rng.below(3 * l2_span.min(64 << 20))).next_multiple_of(512);
        let mut ranges = Vec::new();
        let mut at = rng.below(size);
        while at < size && ranges.len() < 40 {
            let len = (1 + rng.below(8 * cs)).min(size - at);
            ranges.push(at..at + len);
            at += len + rng.below(size / 8 + 1);
        }
        let plan = StreamPlan::new(size, cs, &ranges).unwrap();
        let mut src = vec![0u8; size as usize];
        for r in plan.planned_ranges() {
            let end = r.end.min(size);
            src[r.start as usize..end as usize]
                .copy_from_slice(&noise(r.start + 1, (end - r.start) as usize));
        }
        let mut w = plan.writer(Pipe(Vec::new())).unwrap();
        feed(&plan, &src, |off, b| w.write_cluster_data(off, b));
        let bytes = w.finish().unwrap().0;
        assert_eq!(bytes.len() as u64, plan.image_size(), "round {round}");
        if round % 5 == 0 {
            let image = dir.path().join(format!("rand{round}.qcow2"));
            std::fs::write(&image, &bytes).unwrap();
            qemu_check(&image);
        }
        let img = Image::from_storage(Box::new(bytes), "mem", &OpenOptions::default()).unwrap();
        let mut back = vec![0xa5; size as usize];
        img.read_at(&mut back, 0).unwrap();
        assert_same(&back, &src, &format!("round {round}, cluster size {cs}"));
        assert_eq!(
            img.extents(0, size).unwrap(),
            expected_map(&plan),
            "round {round}"
        );
    }
}
