//! The crate against images made by the real qemu-img and qemu-io: the guest view must equal
//! `qemu-img convert -O raw` byte for byte, and the extents `qemu-img map`.

mod common;

use std::path::Path;

use common::*;
use qcow2::{ExtentKind, Image, OpenOptions};
use tempfile::TempDir;

/// Writes that hit whole clusters, partial clusters, cluster boundaries and zero clusters.
const WRITES: &[&str] = &[
    "write -P 0x11 0 4096",
    "write -P 0x22 70000 5000",
    "write -P 0x33 1048576 1048576",
    "write -P 0x44 2621440 131072",
    "write -z 2654208 65536",
    "write -P 0x55 4193280 1024",
];

fn written(dir: &Path, name: &str, opts: &[&str]) -> std::path::PathBuf {
    let img = create(dir, name, "4M", opts);
    qemu_io(&img, "qcow2", WRITES);
    img
}

#[test]
fn cluster_sizes() {
    let dir = TempDir::new().unwrap();
    for cs in ["512", "4096", "65536", "2M"] {
        let img = written(
            dir.path(),
            &format!("c{cs}.qcow2"),
            &["-o", &format!("cluster_size={cs}")],
        );
        let opened = check_against_qemu(&img, dir.path(), &OpenOptions::default());
        assert_eq!(opened.version(), 3);
    }
}

#[test]
fn tiny_l2_cache_evicts_and_still_reads_right() {
    let dir = TempDir::new().unwrap();
    // 512-byte clusters: one L2 table maps only 32 KiB, so a 4 MiB image needs 128 of them.
    let img = written(dir.path(), "small.qcow2", &["-o", "cluster_size=512"]);
    let opts = OpenOptions {
        l2_cache_bytes: 0,
        ..OpenOptions::default()
    };
    check_against_qemu(&img, dir.path(), &opts);
}

#[test]
fn extended_l2_subclusters() {
    let dir = TempDir::new().unwrap();
    for cs in ["65536", "2M"] {
        let img = create(
            dir.path(),
            &format!("ext{cs}.qcow2"),
            "4M",
            &["-o", &format!("extended_l2=on,cluster_size={cs}")],
        );
        // Subclusters are 2 KiB (64 KiB clusters) or 64 KiB (2 MiB clusters): write pieces of
        // them, zero some, leave others unallocated inside allocated clusters.
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0x61 2048 2048",
                "write -P 0x62 8192 6144",
                "write -z 16384 4096",
                "write -P 0x63 131072 65536",
                "write -z 196608 2048",
                "write -P 0x64 3145728 300000",
            ],
        );
        let opened = check_against_qemu(&img, dir.path(), &OpenOptions::default());
        assert!(opened.extended_l2());
    }
}

#[test]
fn extended_l2_over_backing_file() {
    let dir = TempDir::new().unwrap();
    let base = create(dir.path(), "base.qcow2", "4M", &[]);
    qemu_io(&base, "qcow2", &["write -P 0x71 0 4M"]);
    let top = create(
        dir.path(),
        "top.qcow2",
        "4M",
        &["-o", "extended_l2=on", "-b", "base.qcow2", "-F", "qcow2"],
    );
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x72 4096 2048", "write -z 10240 2048"],
    );
    check_against_qemu(&top, dir.path(), &OpenOptions::default());
}

fn mixed_raw(dir: &Path) -> std::path::PathBuf {
    // Compressible runs, incompressible noise (stored uncompressed by qemu) and zeroes.
    let mut data = vec![0u8; 4 << 20];
    for (i, chunk) in data.chunks_mut(65536).enumerate() {
        match i % 4 {
            0 => chunk.fill(i as u8),
            1 => chunk.copy_from_slice(&noise(i as u64, chunk.len())),
            2 => {}
            _ => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = (j / 100) as u8;
                }
            }
        }
    }
    let raw = dir.join("mixed.raw");
    std::fs::write(&raw, &data).unwrap();
    raw
}

#[test]
fn compressed_zlib_and_zstd() {
    let dir = TempDir::new().unwrap();
    let raw = mixed_raw(dir.path());
    for (ty, cs) in [
        ("zlib", "65536"),
        ("zstd", "65536"),
        ("zlib", "4096"),
        ("zstd", "2M"),
    ] {
        let img = dir.path().join(format!("{ty}{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ty},cluster_size={cs}"),
            p(&raw),
            p(&img),
        ]);
        let opened = check_against_qemu(&img, dir.path(), &OpenOptions::default());
        let want = if ty == "zstd" {
            qcow2::Compression::Zstd
        } else {
            qcow2::Compression::Zlib
        };
        assert_eq!(opened.compression(), want);
        // Small reads inside compressed clusters, out of order.
        let expected = std::fs::read(&raw).unwrap();
        for off in [3_000_000usize, 17, 200_000, 65_530, 3_999_000] {
            let mut buf = vec![0u8; 777];
            opened.read_at(&mut buf, off as u64).unwrap();
            assert_same(
                &buf,
                &expected[off..off + 777],
                &format!("{ty} small read at {off}"),
            );
        }
    }
}

#[test]
fn compressed_extended_l2() {
    let dir = TempDir::new().unwrap();
    let raw = mixed_raw(dir.path());
    let img = dir.path().join("cext.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on,compression_type=zstd",
        p(&raw),
        p(&img),
    ]);
    check_against_qemu(&img, dir.path(), &OpenOptions::default());
}

#[test]
fn version_2_image() {
    let dir = TempDir::new().unwrap();
    let img = written(dir.path(), "v2.qcow2", &["-o", "compat=0.10"]);
    let opened = check_against_qemu(&img, dir.path(), &OpenOptions::default());
    assert_eq!(opened.version(), 2);
}

#[test]
fn preallocation_metadata_and_falloc() {
    let dir = TempDir::new().unwrap();
    for mode in ["metadata", "falloc", "full"] {
        let img = written(
            dir.path(),
            &format!("{mode}.qcow2"),
            &["-o", &format!("preallocation={mode}")],
        );
        let opened = check_against_qemu(&img, dir.path(), &OpenOptions::default());
        let ext = opened.extents(0, opened.size()).unwrap();
        assert!(
            ext.iter().all(|e| e.kind == ExtentKind::Data),
            "{mode}: {ext:?}"
        );
    }
}

#[test]
fn holes_of_a_raw_base_are_zero_not_data() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    // Sparse: data only at 1 MiB and 3 MiB, the rest holes.
    std::fs::File::create(&base)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    qemu_io(
        &base,
        "raw",
        &["write -P 0xc0 1M 64K", "write -P 0xc1 3M 128K"],
    );
    let top = create(d, "top.qcow2", "4M", &["-b", "base.raw", "-F", "raw"]);
    qemu_io(&top, "qcow2", &["write -P 0xc2 0 64K"]);
    // Reads and the whole map agree with qemu's.
    let img = check_against_qemu(&top, d, &OpenOptions::default());
    let ext = img.extents(0, img.size()).unwrap();
    let data_below: u64 = ext
        .iter()
        .filter(|e| e.depth == 1 && e.kind == ExtentKind::Data)
        .map(|e| e.length)
        .sum();
    assert_eq!(data_below, (64 << 10) + (128 << 10), "{ext:?}");
    assert!(
        ext.iter()
            .any(|e| e.depth == 1 && e.kind == ExtentKind::Zero && e.offset == 64 << 10),
        "{ext:?}"
    );
}

#[test]
fn three_deep_chain_raw_base() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
    // Written fully so that qemu reports it as data throughout, as this crate does for raw.
    qemu_io(&base, "raw", &["write -P 0xb0 0 4M"]);
    let mid = create(d, "mid.qcow2", "4M", &["-b", "base.raw", "-F", "raw"]);
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0xb1 65536 131072",
            "write -z 1048576 65536",
            "write -P 0xb1 2097152 4096",
        ],
    );
    let top = create(
        d,
        "top.qcow2",
        "4M",
        &["-b", "mid.qcow2", "-F", "qcow2", "-o", "cluster_size=4096"],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0xb2 131072 8192",
            "write -z 2097152 4096",
            "write -P 0xb2 3000000 10000",
        ],
    );

    let img = check_against_qemu(&top, d, &OpenOptions::default());
    assert_eq!(img.chain_len(), 3);
    let ext = img.extents(0, img.size()).unwrap();
    for depth in 0..3 {
        assert!(
            ext.iter()
                .any(|e| e.depth == depth && e.kind == ExtentKind::Data),
            "depth {depth}: {ext:?}"
        );
    }
    assert!(
        ext.iter()
            .any(|e| e.depth == 0 && e.kind == ExtentKind::Zero)
    );
    assert!(
        ext.iter()
            .any(|e| e.depth == 1 && e.kind == ExtentKind::Zero)
    );

    // Without following backing files, the same image is refused, saying why.
    let opts = OpenOptions {
        follow_backing: false,
        ..OpenOptions::default()
    };
    let err = Image::open(&top, &opts).unwrap_err();
    assert_eq!(err.kind(), qcow2::ErrorKind::Backing);
    assert!(err.to_string().contains("backing file"), "{err}");
    assert!(err.to_string().contains("top.qcow2"), "{err}");
}

#[test]
fn qcow2_chain_with_unallocated_areas_and_probed_format() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let base = create(d, "base.qcow2", "4M", &[]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0xc0 0 65536", "write -z 131072 65536"],
    );
    let mid = create(d, "mid.qcow2", "4M", &["-b", "base.qcow2", "-F", "qcow2"]);
    qemu_io(&mid, "qcow2", &["write -P 0xc1 1048576 4096"]);
    let top = create(d, "top.qcow2", "4M", &["-b", "mid.qcow2", "-F", "qcow2"]);
    qemu_io(&top, "qcow2", &["write -P 0xc2 2097152 4096"]);
    // Hide the backing format extension (an unknown extension type is skipped): the reader
    // must probe the format, as qemu does.
    let mut bytes = std::fs::read(&top).unwrap();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&top, &bytes).unwrap();
    check_against_qemu(&top, d, &OpenOptions::default());
}

#[test]
fn backing_file_shorter_than_overlay() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let base = create(d, "base.qcow2", "1M", &[]);
    qemu_io(&base, "qcow2", &["write -P 0xd0 0 1M"]);
    let top = create(d, "top.qcow2", "4M", &["-b", "base.qcow2", "-F", "qcow2"]);
    qemu_io(&top, "qcow2", &["write -P 0xd1 3145728 4096"]);
    let expected = qemu_raw(&top, d);
    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    let mut got = vec![1u8; expected.len()];
    img.read_at(&mut got, 0).unwrap();
    assert_same(&got, &expected, "guest view");
}

#[test]
fn many_threads_share_one_image() {
    let dir = TempDir::new().unwrap();
    let raw = mixed_raw(dir.path());
    let img_path = dir.path().join("mt.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p(&raw),
        p(&img_path),
    ]);
    let expected = std::fs::read(&raw).unwrap();
    let img = Image::open(
        &img_path,
        &OpenOptions {
            l2_cache_bytes: 8192,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let img = &img;
            let expected = &expected;
            s.spawn(move || {
                let mut buf = vec![0u8; 12_345];
                for i in 0..200u64 {
                    let off =
                        ((i * 7919 + t * 104_729) * 997) as usize % (expected.len() - buf.len());
                    img.read_at(&mut buf, off as u64).unwrap();
                    assert_same(&buf, &expected[off..off + buf.len()], "threaded read");
                }
            });
        }
    });
}

#[test]
fn reads_past_the_end_are_refused() {
    let dir = TempDir::new().unwrap();
    let img = create(dir.path(), "e.qcow2", "1M", &[]);
    let img = Image::open(&img, &OpenOptions::default()).unwrap();
    let mut buf = [0u8; 10];
    let err = img.read_at(&mut buf, (1 << 20) - 5).unwrap_err();
    assert_eq!(err.kind(), qcow2::ErrorKind::InvalidArgument);
    assert!(img.extents(1 << 20, 1).is_err());
    assert!(img.extents(u64::MAX, 2).is_err());
}

/// The dirty ranges qemu must have recorded for writes, at the bitmap's granularity.
fn expected_dirty(writes: &[(u64, u64)], granularity: u64) -> Vec<(u64, u64)> {
    let mut bits: Vec<u64> = writes
        .iter()
        .flat_map(|&(o, l)| (o / granularity)..(o + l).div_ceil(granularity))
        .collect();
    bits.sort_unstable();
    bits.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in bits {
        let start = b * granularity;
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += granularity,
            _ => out.push((start, granularity)),
        }
    }
    out
}

#[test]
fn persistent_dirty_bitmaps() {
    let dir = TempDir::new().unwrap();
    for (cs, gran) in [(65536u64, 65536u64), (65536, 4096), (4096, 512)] {
        let img = create(
            dir.path(),
            &format!("bm{cs}-{gran}.qcow2"),
            "8M",
            &["-o", &format!("cluster_size={cs}")],
        );
        qemu_io(&img, "qcow2", &["write -P 0x01 0 65536"]);
        qemu_img(&["bitmap", "--add", "-g", &gran.to_string(), p(&img), "b0"]);
        qemu_img(&["bitmap", "--add", "-g", &gran.to_string(), p(&img), "empty"]);
        qemu_img(&["bitmap", "--disable", p(&img), "empty"]);
        let writes = [
            (100_000u64, 4096u64),
            (1 << 20, 200_000),
            (5_000_000, 1),
            (8_384_000, 4608),
        ];
        let cmds: Vec<String> = writes
            .iter()
            .map(|(o, l)| format!("write -P 0x02 {o} {l}"))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&img, "qcow2", &cmds);

        let opened = check_against_qemu(&img, dir.path(), &OpenOptions::default());
        let list = opened.bitmaps().unwrap();
        let names: Vec<&str> = list.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["b0", "empty"]);
        assert_eq!(list[0].granularity, gran);
        assert!(list[0].auto && !list[0].in_use);
        assert!(!list[1].auto);

        let size = opened.size();
        let want = expected_dirty(&writes, gran);
        assert_eq!(
            opened.bitmap_dirty("b0", 0, size).unwrap(),
            want,
            "cluster {cs} granularity {gran}"
        );
        assert_eq!(opened.bitmap_dirty("empty", 0, size).unwrap(), vec![]);
        // A window that cuts dirty ranges: clipped to the window.
        let (wo, wl) = (1_100_000u64, 50_000u64);
        let clipped: Vec<(u64, u64)> = want
            .iter()
            .filter_map(|&(o, l)| {
                let (s, e) = (o.max(wo), (o + l).min(wo + wl));
                (s < e).then(|| (s, e - s))
            })
            .collect();
        assert_eq!(opened.bitmap_dirty("b0", wo, wl).unwrap(), clipped);
        let err = opened.bitmap_dirty("nope", 0, size).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}

#[test]
fn relative_backing_name_with_directory() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("images")).unwrap();
    std::fs::create_dir(d.join("images/base")).unwrap();
    let base = create(d, "images/base/disk.qcow2", "1M", &[]);
    qemu_io(&base, "qcow2", &["write -P 0xe0 0 64k"]);
    // Relative to the directory of the image that names it, not to the working directory.
    let top = create(
        d,
        "images/top.qcow2",
        "1M",
        &["-b", "base/disk.qcow2", "-F", "qcow2"],
    );
    qemu_io(&top, "qcow2", &["write -P 0xe1 4096 4096"]);
    let img = check_against_qemu(&top, d, &OpenOptions::default());
    assert_eq!(img.backing_file(), Some("base/disk.qcow2"));
}

#[test]
fn image_is_shareable_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Image>();
}

#[test]
fn many_tib_image_maps_quickly_with_bounded_memory() {
    let dir = TempDir::new().unwrap();
    let img = create(dir.path(), "huge.qcow2", "16T", &[]);
    let at = 10u64 << 40;
    qemu_io(
        &img,
        "qcow2",
        &[
            &format!("write -P 0x77 {at} 65536"),
            "write -P 0x78 1M 4096",
        ],
    );
    let opened = Image::open(
        &img,
        &OpenOptions {
            l2_cache_bytes: 1 << 20,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(opened.size(), 16 << 40);
    let ours = opened.extents(0, opened.size()).unwrap();
    assert_eq!(ours, qemu_map(&img));
    let mut buf = vec![0u8; 3 * 65536];
    opened.read_at(&mut buf, at - 65536).unwrap();
    assert!(buf[..65536].iter().all(|&b| b == 0));
    assert!(buf[65536..131072].iter().all(|&b| b == 0x77));
    assert!(buf[131072..].iter().all(|&b| b == 0));
}
