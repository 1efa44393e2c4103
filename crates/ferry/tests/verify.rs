//! `ferry copy --verify` and `--blkhash`: the source is hashed while it is copied, the
//! destination checksummed after; a destination that does not hold what was written fails the
//! copy with both digests.

mod common;

use common::*;
use testutil::Nbdkit;

#[test]
fn verify_passes_for_a_good_copy_and_blkhash_matches_a_fresh_checksum() {
    let dir = testutil::temp_dir();
    let (src, _layout) = make_sample(dir.path(), "src.raw");
    let dst = dir.path().join("dst.raw");
    let hash_file = dir.path().join("hash.txt");
    let run = ferry([
        "copy",
        "-v",
        "--verify",
        "--blkhash",
        "--blkhash-file",
        hash_file.to_str().unwrap(),
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ])
    .run();
    let stderr = run.expect_ok();
    assert!(
        stderr.contains("ferry: verified: imageio blake2b/4194304"),
        "{stderr}"
    );
    let copied = std::fs::read_to_string(&hash_file).unwrap();
    // The digest of the data copied equals ferry checksum's reading of the source.
    let fresh = ferry(["checksum", "--kind", "blkhash", src.to_str().unwrap()]).run();
    let fresh = fresh.stdout_text();
    let fresh_hex = fresh.split_whitespace().next().unwrap_or("");
    assert_eq!(copied.trim(), fresh_hex, "checksum printed {fresh}");
    assert_eq!(copied.trim().len(), 64, "sha256 in hex");
}

#[test]
fn verify_catches_a_destination_that_loses_writes() {
    let dir = testutil::temp_dir();
    let (src, _layout) = make_sample(dir.path(), "src.raw");
    let size = std::fs::metadata(&src).unwrap().len();
    // nbdkit's null plugin accepts every write and reads back zeroes: a lying destination.
    let null = Nbdkit::new("null").arg(&size.to_string()).start();
    let run = ferry(["copy", "--verify", src.to_str().unwrap(), &null.nbd_uri()]).run();
    let stderr = run.expect_code(1);
    assert!(stderr.contains("verification failed"), "{stderr}");
    assert!(
        stderr.contains("source ") && stderr.contains("destination "),
        "{stderr}"
    );
    // Both digests are named, and they differ.
    let hexes: Vec<&str> = stderr
        .split(|c: char| !c.is_ascii_hexdigit())
        .filter(|w| w.len() == 64)
        .collect();
    assert_eq!(hexes.len(), 2, "{stderr}");
    assert_ne!(hexes[0], hexes[1]);
}

#[test]
fn blkhash_rejects_unknown_algorithms() {
    let dir = testutil::temp_dir();
    let (src, _layout) = make_sample(dir.path(), "src.raw");
    let run = ferry(["copy", "--blkhash=crc32", src.to_str().unwrap(), "null:"]).run();
    assert!(run.expect_code(2).contains("--blkhash"), "{}", run.stderr);
}
