//! The published vectors of both references (imageio-api.md §3.6, nbdcopy.md §6), checked
//! through the sequential reference and through the parallel hasher fed in several ways.

use std::sync::Arc;

use blkhash::{Algorithm, Hasher, HasherOptions, Kind, Spec, reference};
use bytes::Bytes;

const MIB: usize = 1 << 20;

/// Every way of feeding `image` that must agree: the reference, one range, small pieces in
/// reverse order with zero runs declared, and unaligned pieces from several threads on a
/// private pool of three threads. Returns the common hex digest.
fn digest_all_ways(spec: Spec, image: &[u8]) -> String {
    let expected = reference::checksum(&spec, image).to_hex();
    let bytes = Bytes::copy_from_slice(image);

    let whole = Hasher::with_size(spec, image.len() as u64);
    whole.data(0, &bytes);
    assert_eq!(whole.finish().unwrap().to_hex(), expected, "one range");

    // Reverse order, 4 KiB pieces, zero pieces declared as zero; size learnt at finish.
    let reversed = Hasher::new(spec);
    let pieces: Vec<(usize, usize)> = (0..image.len())
        .step_by(4096)
        .map(|o| (o, (o + 4096).min(image.len())))
        .collect();
    for &(a, b) in pieces.iter().rev() {
        if image[a..b].iter().all(|&x| x == 0) {
            reversed.zero(a as u64, (b - a) as u64);
        } else {
            reversed.data(a as u64, &bytes.slice(a..b));
        }
    }
    assert_eq!(reversed.finish().unwrap().to_hex(), expected, "reversed");

    // Odd-sized pieces fed by three threads into a three-thread pool.
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap(),
    );
    let options = HasherOptions {
        max_pending: 1,
        pool: Some(pool),
    };
    let threaded = Arc::new(Hasher::with_options(
        spec,
        Some(image.len() as u64),
        options,
    ));
    let step = 777_777;
    std::thread::scope(|s| {
        for t in 0..3 {
            let threaded = threaded.clone();
            let bytes = bytes.clone();
            s.spawn(move || {
                let mut o = t * step;
                while o < bytes.len() {
                    let e = (o + step).min(bytes.len());
                    threaded.data(o as u64, &bytes.slice(o..e));
                    o += 3 * step;
                }
            });
        }
    });
    assert_eq!(threaded.finish().unwrap().to_hex(), expected, "threads");
    expected
}

fn imageio_image(size: usize) -> Vec<u8> {
    let mut v = b"data".to_vec();
    v.resize(size, 0);
    v
}

#[test]
fn imageio_published_vectors() {
    let sha1 = Spec::new(Kind::Imageio, Some(Algorithm::Sha1), None).unwrap();
    let cases = [
        (
            4 * MIB,
            "f426bb2cf1e1901fe4e87423950944ecfed6d9d18a09e6e802aa4912e1c9b2d6",
            "3ed03b375b6658d99b63ced1867a95aeef080b79",
        ),
        (
            3 * MIB,
            "42f3b76772a6d3dcffae2a24697721687975e2c60ddfd4ba7831ea9ce772ca71",
            "6cba43b908381be45a55ab9b4361f8370b928354",
        ),
        (
            5 * MIB,
            "0da53b583fc1fbbac7edea14454c79f84a8107613e614f2c7a47071dfdcf41a6",
            "d3936edd8e3a8ff10e8257a9f460d8da67838549",
        ),
        (
            0,
            "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8",
            "da39a3ee5e6b4b0d3255bfef95601890afd80709",
        ),
    ];
    for (size, blake2b, sha1_hex) in cases {
        let image = imageio_image(size);
        assert_eq!(
            digest_all_ways(Spec::imageio(), &image),
            blake2b,
            "blake2b {size}"
        );
        assert_eq!(digest_all_ways(sha1, &image), sha1_hex, "sha1 {size}");
    }
}

#[test]
fn imageio_ten_numbered_blocks() {
    let mut image = vec![0u8; 10 * 4 * MIB];
    for i in 0..10 {
        let label = format!("{i:02}\n");
        image[i * 4 * MIB..i * 4 * MIB + 3].copy_from_slice(label.as_bytes());
    }
    assert_eq!(
        digest_all_ways(Spec::imageio(), &image),
        "7934079f80b53142d738d2bb7efaedf696a3d34d76a7865a24130bc7b4a7acfe"
    );
}

#[test]
fn nbdcopy_published_vectors() {
    let blk = |v: &str| Spec::parse_blkhash(v).unwrap();
    assert_eq!(
        digest_all_ways(blk("sha256"), b""),
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
    );
    let hello = b"hello";
    assert_eq!(
        digest_all_ways(blk("md5"), hello),
        "f741ac9ce55f5325906bb14e9c05d467"
    );
    assert_eq!(
        digest_all_ways(blk("sha256"), hello),
        "337355feb53a5309d5aba92796223c2c84ffab930e706c01fef573a2722545e6"
    );
    assert_eq!(
        digest_all_ways(blk("sha512"), hello),
        "eca04a593cf12ec4132993da709048e25a2f1be3526e132fb521ec9d41f023ec\
         4018b3fd07b014a33e36bb5fa145b36991f431e62f9e1a93bebea6c9565682c1"
    );
    assert_eq!(
        digest_all_ways(blk("md5/4"), hello),
        "8262896de34125dec173722c920e8bd0"
    );

    let mut two = vec![0u8; MIB + 7];
    two[..5].copy_from_slice(b"hello");
    two[MIB..].copy_from_slice(b"goodbye");
    assert_eq!(
        digest_all_ways(blk("sha256"), &two),
        "61b8f3a8cea76e16eeff7ce27f1b7711c1f1e437f5038cec17773772a4bded28"
    );

    let pattern = b"12345678".repeat(512 * 256);
    assert_eq!(pattern.len(), MIB);
    assert_eq!(
        digest_all_ways(blk("md5"), &pattern),
        "84fc21ac2f49ac283ff399378d834d1a"
    );
    assert_eq!(
        digest_all_ways(blk("sha256"), &pattern),
        "cbb388edd25e567b85f504c7b345497f9fb4f6bbf4e39768809184b9f9e678f8"
    );
    assert_eq!(
        digest_all_ways(blk("sha512/512k"), &pattern),
        "379f7eb1628058c7abbc4c96941ac972074815ea9ef4aca95eefb2b4f9c29f64\
         023fff8d966e9fddf08d07bdba548e75298917f10268fdf9ba636c2321a2214e"
    );
}

#[test]
fn a_terabyte_of_zeroes_needs_no_block_hashing() {
    // 2^40 bytes of holes: one zero-block digest repeated 262,144 times, fed in order whatever
    // order the zero ranges come in.
    let spec = Spec::imageio();
    let size = 1u64 << 40;
    let zero_block = spec.algorithm.hash(&vec![0u8; spec.block_size as usize]);
    let blocks = (size / spec.block_size) as usize;
    let expected = spec.algorithm.hash(&zero_block.repeat(blocks));

    let h = Hasher::with_size(spec, size);
    h.zero(0, size);
    assert_eq!(h.finish().unwrap().as_bytes(), &expected[..]);

    let backwards = Hasher::with_size(spec, size);
    let step = 1u64 << 36;
    for i in (0..size / step).rev() {
        backwards.zero(i * step, step);
    }
    assert_eq!(backwards.finish().unwrap().as_bytes(), &expected[..]);
}
