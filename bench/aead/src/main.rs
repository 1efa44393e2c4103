//! Seals and opens TLS-record-sized buffers (16 KiB, as rustls does) with AES-128-GCM and
//! AES-256-GCM through ring and through aws-lc-rs, and prints GiB/s per core for each.

use std::time::{Duration, Instant};

const RECORD: usize = 16 << 10;
const SECONDS: f64 = 1.0;

fn measure(mut one: impl FnMut()) -> f64 {
    // Warm up, then count records for about SECONDS.
    for _ in 0..64 {
        one();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(SECONDS) {
        for _ in 0..64 {
            one();
        }
        n += 64;
    }
    (n as f64 * RECORD as f64) / start.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

macro_rules! provider {
    ($name:literal, $aead:path, $alg:expr, $label:literal) => {{
        use $aead as aead;
        let key = aead::LessSafeKey::new(
            aead::UnboundKey::new($alg, &[7u8; 32][..$alg.key_len()]).unwrap(),
        );
        let mut buf = vec![0x5au8; RECORD];
        let mut counter = 0u64;
        let seal = measure(|| {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::empty(),
                    &mut buf,
                )
                .unwrap();
            std::hint::black_box(tag.as_ref());
        });
        // Opening needs a valid tag: seal one record once and open copies of it.
        let nonce = [1u8; 12];
        let mut sealed = vec![0x5au8; RECORD];
        let tag = key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::empty(),
                &mut sealed,
            )
            .unwrap();
        sealed.extend_from_slice(tag.as_ref());
        let mut work = sealed.clone();
        let open = measure(|| {
            work.copy_from_slice(&sealed);
            let plain = key
                .open_in_place(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::empty(),
                    &mut work,
                )
                .unwrap();
            std::hint::black_box(plain.len());
        });
        println!(
            "{:10} {:12} seal {:6.2} GiB/s   open {:6.2} GiB/s (open includes a 16 KiB memcpy)",
            $name, $label, seal, open
        );
    }};
}

fn main() {
    provider!("ring", ring::aead, &ring::aead::AES_128_GCM, "AES-128-GCM");
    provider!(
        "aws-lc-rs",
        aws_lc_rs::aead,
        &aws_lc_rs::aead::AES_128_GCM,
        "AES-128-GCM"
    );
    provider!("ring", ring::aead, &ring::aead::AES_256_GCM, "AES-256-GCM");
    provider!(
        "aws-lc-rs",
        aws_lc_rs::aead,
        &aws_lc_rs::aead::AES_256_GCM,
        "AES-256-GCM"
    );
}
