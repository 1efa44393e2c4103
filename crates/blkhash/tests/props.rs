//! Property: the digest depends only on the image's bytes and the spec — not on how the image
//! is split into ranges, the order they are fed in, which zero parts are declared zero instead
//! of fed as bytes, whether the size is known up front, or how many threads feed and hash.
//! Plus the errors for ranges fed twice, beyond the end, or never.

use std::sync::Arc;

use blkhash::{Algorithm, Error, Hasher, HasherOptions, Kind, Spec, reference};
use bytes::Bytes;
use proptest::prelude::*;

/// An image made of data and zero segments.
fn image(segments: &[(bool, usize, u8)]) -> Vec<u8> {
    let mut v = Vec::new();
    for &(data, len, seed) in segments {
        if data {
            v.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1));
        } else {
            v.resize(v.len() + len, 0);
        }
    }
    v
}

/// Feeds `image` cut at `cuts`, in the order given by `order`, declaring zero pieces as zero
/// when `declare_zero` says so, from `feeders` threads into a pool of `threads`.
#[allow(clippy::too_many_arguments)]
fn feed(
    spec: Spec,
    image: &[u8],
    cuts: &[usize],
    order: &[usize],
    declare_zero: &[bool],
    feeders: usize,
    threads: usize,
    size_known: bool,
) -> Result<String, Error> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (image.len() + 1)).collect();
    points.push(0);
    points.push(image.len());
    points.sort_unstable();
    points.dedup();
    let mut pieces: Vec<(usize, usize)> = points.windows(2).map(|w| (w[0], w[1])).collect();
    // A permutation drawn from `order`.
    for (i, o) in order.iter().enumerate() {
        if !pieces.is_empty() {
            let n = pieces.len();
            pieces.swap(i % n, o % n);
        }
    }
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap(),
    );
    let options = HasherOptions {
        max_pending: 4096,
        pool: Some(pool),
    };
    let size = size_known.then_some(image.len() as u64);
    let h = Arc::new(Hasher::with_options(spec, size, options));
    let bytes = Bytes::copy_from_slice(image);
    std::thread::scope(|s| {
        for t in 0..feeders {
            let h = h.clone();
            let bytes = bytes.clone();
            let pieces = &pieces;
            s.spawn(move || {
                for (i, &(a, b)) in pieces.iter().enumerate().skip(t).step_by(feeders) {
                    let zero = bytes[a..b].iter().all(|&x| x == 0);
                    if zero && declare_zero[i % declare_zero.len()] {
                        h.zero(a as u64, (b - a) as u64);
                    } else {
                        h.data(a as u64, &bytes.slice(a..b));
                    }
                }
            });
        }
    });
    if !size_known {
        // A trailing zero range that was never fed cannot be inferred; everything was fed here.
        h.set_size(image.len() as u64);
    }
    h.finish().map(|d| d.to_hex())
}

fn segments() -> impl Strategy<Value = Vec<(bool, usize, u8)>> {
    prop::collection::vec((any::<bool>(), 0usize..6000, any::<u8>()), 0..8)
}

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        Just(Algorithm::Md5),
        Just(Algorithm::Sha1),
        Just(Algorithm::Sha256),
        Just(Algorithm::Sha512),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn blkhash_digest_ignores_how_it_is_fed(
        segs in segments(),
        alg in algorithm(),
        block in 1u64..9000,
        cuts in prop::collection::vec(any::<usize>(), 0..24),
        order in prop::collection::vec(any::<usize>(), 0..24),
        declare_zero in prop::collection::vec(any::<bool>(), 1..8),
        feeders in 1usize..4,
        threads in 1usize..4,
        size_known in any::<bool>(),
    ) {
        let spec = Spec::new(Kind::Blkhash, Some(alg), Some(block)).unwrap();
        let img = image(&segs);
        let expected = reference::checksum(&spec, &img).to_hex();
        let got = feed(spec, &img, &cuts, &order, &declare_zero, feeders, threads, size_known);
        prop_assert_eq!(got, Ok(expected));
    }
}

proptest! {
    // Blocks of 1 MiB and more make each case cost milliseconds of hashing.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn imageio_digest_ignores_how_it_is_fed(
        mib_segs in prop::collection::vec((any::<bool>(), 0usize..(3 << 20), any::<u8>()), 0..5),
        alg in prop_oneof![Just(Algorithm::BLAKE2B), Just(Algorithm::Sha1), Just(Algorithm::Sha3_256)],
        extra_pages in 0u64..64,
        cuts in prop::collection::vec(any::<usize>(), 0..16),
        order in prop::collection::vec(any::<usize>(), 0..16),
        declare_zero in prop::collection::vec(any::<bool>(), 1..8),
        threads in 1usize..4,
    ) {
        let spec = Spec::new(Kind::Imageio, Some(alg), Some((1 << 20) + extra_pages * 4096)).unwrap();
        let img = image(&mib_segs);
        let expected = reference::checksum(&spec, &img).to_hex();
        let got = feed(spec, &img, &cuts, &order, &declare_zero, 2, threads, true);
        prop_assert_eq!(got, Ok(expected));
    }
}

fn small() -> Spec {
    Spec::new(Kind::Blkhash, Some(Algorithm::Sha256), Some(16)).unwrap()
}

#[test]
fn bytes_fed_twice_are_an_error() {
    let data = Bytes::from(vec![1u8; 64]);
    // A whole block twice.
    let h = Hasher::with_size(small(), 64);
    h.data(0, &data);
    h.data(16, &data.slice(0..16));
    let r = h.finish();
    assert!(matches!(r, Err(Error::Overlap { .. })), "{r:?}");
    // Two pieces of one block overlapping.
    let h = Hasher::with_size(small(), 64);
    h.data(0, &data);
    h.zero(20, 4);
    let r = h.finish();
    assert!(matches!(r, Err(Error::Overlap { .. })), "{r:?}");
    // A zero run over data.
    let h = Hasher::with_size(small(), 64);
    h.data(0, &data);
    h.zero(0, 32);
    let r = h.finish();
    assert!(matches!(r, Err(Error::Overlap { .. })), "{r:?}");
}

#[test]
fn missing_bytes_are_reported_with_their_offset() {
    let data = Bytes::from(vec![1u8; 64]);
    let h = Hasher::with_size(small(), 64);
    h.data(0, &data.slice(0..20));
    h.data(40, &data.slice(40..64));
    assert_eq!(h.finish(), Err(Error::Incomplete { offset: 16 }));
    // A size learnt at finish cannot cover a trailing gap, but a declared one is checked.
    let h = Hasher::new(small());
    h.data(0, &data.slice(0..32));
    h.set_size(64);
    assert_eq!(h.finish(), Err(Error::Incomplete { offset: 32 }));
}

#[test]
fn bytes_beyond_the_size_are_an_error() {
    let h = Hasher::with_size(small(), 10);
    h.data_slice(8, b"abcd");
    assert!(matches!(h.finish(), Err(Error::BeyondEnd { size: 10, .. })));
    let h = Hasher::new(small());
    h.data_slice(0, b"abcdefghijkl");
    h.set_size(10);
    assert!(matches!(h.finish(), Err(Error::BeyondEnd { size: 10, .. })));
}

#[test]
fn finish_twice_is_an_error() {
    let h = Hasher::with_size(small(), 4);
    h.data_slice(0, b"abcd");
    assert!(h.finish().is_ok());
    assert_eq!(h.finish(), Err(Error::Finished));
}
