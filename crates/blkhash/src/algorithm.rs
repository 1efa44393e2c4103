//! The hash functions a block checksum is built on, their names as ovirt-imageio and nbdcopy
//! spell them, and one incremental hashing state over any of them.

use blake2::digest::{Update, VariableOutput};
use digest::DynDigest;

/// A hash function. Names follow Python's `hashlib` (what ovirt-imageio accepts):
/// `blake2b`, `sha3_256`, …; BLAKE2 digests other than imageio's 32 bytes are written
/// `blake2b-512` (bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// BLAKE2b with a digest of this many bytes (1–64); imageio's `blake2b` is 32.
    Blake2b(u8),
    /// BLAKE2s with a digest of this many bytes (1–32); imageio's `blake2s` is 32.
    Blake2s(u8),
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Sha512_224,
    Sha512_256,
    Sha3_224,
    Sha3_256,
    Sha3_384,
    Sha3_512,
}

/// The digest size imageio gives BLAKE2 (its `blake2b` is blake2b-256).
const IMAGEIO_BLAKE2_BYTES: u8 = 32;

const FIXED: &[(&str, Algorithm)] = &[
    ("md5", Algorithm::Md5),
    ("sha1", Algorithm::Sha1),
    ("sha224", Algorithm::Sha224),
    ("sha256", Algorithm::Sha256),
    ("sha384", Algorithm::Sha384),
    ("sha512", Algorithm::Sha512),
    ("sha512_224", Algorithm::Sha512_224),
    ("sha512_256", Algorithm::Sha512_256),
    ("sha3_224", Algorithm::Sha3_224),
    ("sha3_256", Algorithm::Sha3_256),
    ("sha3_384", Algorithm::Sha3_384),
    ("sha3_512", Algorithm::Sha3_512),
];

impl Algorithm {
    /// imageio's default.
    pub const BLAKE2B: Algorithm = Algorithm::Blake2b(IMAGEIO_BLAKE2_BYTES);

    /// Every algorithm under its default name, sorted by name as imageio lists them in
    /// `/checksum/algorithms`. Unlike the reference it lists only names that work (no `shake_*`,
    /// which need a length, nor names it cannot construct).
    pub fn imageio_names() -> Vec<&'static str> {
        let mut names: Vec<&str> = FIXED.iter().map(|(n, _)| *n).collect();
        names.extend(["blake2b", "blake2s"]);
        names.sort_unstable();
        names
    }

    /// Digest size in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Blake2b(n) | Algorithm::Blake2s(n) => n as usize,
            Algorithm::Md5 => 16,
            Algorithm::Sha1 => 20,
            Algorithm::Sha224 | Algorithm::Sha512_224 | Algorithm::Sha3_224 => 28,
            Algorithm::Sha256 | Algorithm::Sha512_256 | Algorithm::Sha3_256 => 32,
            Algorithm::Sha384 | Algorithm::Sha3_384 => 48,
            Algorithm::Sha512 | Algorithm::Sha3_512 => 64,
        }
    }

    /// The name this algorithm is parsed from and reported as.
    pub fn name(self) -> String {
        match self {
            Algorithm::Blake2b(IMAGEIO_BLAKE2_BYTES) => "blake2b".into(),
            Algorithm::Blake2s(IMAGEIO_BLAKE2_BYTES) => "blake2s".into(),
            Algorithm::Blake2b(n) => format!("blake2b-{}", n as u32 * 8),
            Algorithm::Blake2s(n) => format!("blake2s-{}", n as u32 * 8),
            fixed => FIXED
                .iter()
                .find(|(_, a)| *a == fixed)
                .map(|(n, _)| (*n).to_string())
                .expect("every fixed algorithm is named"),
        }
    }

    /// A fresh hashing state.
    pub(crate) fn start(self) -> State {
        let dynamic: Box<dyn DynDigest + Send> = match self {
            Algorithm::Blake2b(n) => {
                return State::Blake2b(
                    blake2::Blake2bVar::new(n as usize).expect("size checked when parsed"),
                );
            }
            Algorithm::Blake2s(n) => {
                return State::Blake2s(
                    blake2::Blake2sVar::new(n as usize).expect("size checked when parsed"),
                );
            }
            Algorithm::Md5 => Box::new(md5::Md5::default()),
            Algorithm::Sha1 => Box::new(sha1::Sha1::default()),
            Algorithm::Sha224 => Box::new(sha2::Sha224::default()),
            Algorithm::Sha256 => Box::new(sha2::Sha256::default()),
            Algorithm::Sha384 => Box::new(sha2::Sha384::default()),
            Algorithm::Sha512 => Box::new(sha2::Sha512::default()),
            Algorithm::Sha512_224 => Box::new(sha2::Sha512_224::default()),
            Algorithm::Sha512_256 => Box::new(sha2::Sha512_256::default()),
            Algorithm::Sha3_224 => Box::new(sha3::Sha3_224::default()),
            Algorithm::Sha3_256 => Box::new(sha3::Sha3_256::default()),
            Algorithm::Sha3_384 => Box::new(sha3::Sha3_384::default()),
            Algorithm::Sha3_512 => Box::new(sha3::Sha3_512::default()),
        };
        State::Dynamic(dynamic)
    }

    /// The digest of `data` in one go.
    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        let mut s = self.start();
        s.update(data);
        s.finish()
    }
}

impl std::str::FromStr for Algorithm {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || crate::Error::UnknownAlgorithm(s.to_string());
        if let Some((_, a)) = FIXED.iter().find(|(n, _)| *n == s) {
            return Ok(*a);
        }
        let (family, bits) = match s.split_once('-') {
            Some((f, b)) => (f, Some(b)),
            None => (s, None),
        };
        let max_bytes = match family {
            "blake2b" => 64,
            "blake2s" => 32,
            _ => return Err(unknown()),
        };
        let bytes = match bits {
            None => IMAGEIO_BLAKE2_BYTES as u32,
            Some(b) => {
                let bits: u32 = b.parse().map_err(|_| unknown())?;
                if bits == 0 || !bits.is_multiple_of(8) || bits / 8 > max_bytes {
                    return Err(unknown());
                }
                bits / 8
            }
        };
        let n = bytes as u8;
        Ok(if family == "blake2b" {
            Algorithm::Blake2b(n)
        } else {
            Algorithm::Blake2s(n)
        })
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// An incremental hashing state. BLAKE2 keeps its own variant because its digest size is
/// chosen at run time, which `DynDigest` cannot express.
pub(crate) enum State {
    Dynamic(Box<dyn DynDigest + Send>),
    Blake2b(blake2::Blake2bVar),
    Blake2s(blake2::Blake2sVar),
}

impl State {
    pub(crate) fn update(&mut self, data: &[u8]) {
        match self {
            State::Dynamic(d) => d.update(data),
            State::Blake2b(b) => b.update(data),
            State::Blake2s(b) => b.update(data),
        }
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        match self {
            State::Dynamic(d) => d.finalize().into_vec(),
            State::Blake2b(b) => {
                let mut out = vec![0; b.output_size()];
                b.finalize_variable(&mut out)
                    .expect("buffer sized to the output");
                out
            }
            State::Blake2s(b) => {
                let mut out = vec![0; b.output_size()];
                b.finalize_variable(&mut out)
                    .expect("buffer sized to the output");
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(v: &[u8]) -> String {
        v.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn names_round_trip() {
        for name in Algorithm::imageio_names() {
            let a: Algorithm = name.parse().unwrap();
            assert_eq!(a.name(), name);
            assert_eq!(a.hash(b"").len(), a.digest_len(), "{name}");
        }
        let a: Algorithm = "blake2b-512".parse().unwrap();
        assert_eq!(a, Algorithm::Blake2b(64));
        assert_eq!(a.name(), "blake2b-512");
        assert_eq!(
            "blake2b-256".parse::<Algorithm>().unwrap().name(),
            "blake2b"
        );
        for bad in [
            "",
            "sha",
            "SHA256",
            "blake2b-0",
            "blake2b-520",
            "blake2s-512",
            "md5-sha1",
        ] {
            assert!(bad.parse::<Algorithm>().is_err(), "{bad}");
        }
    }

    #[test]
    fn imageio_list_is_sorted_like_python() {
        let names = Algorithm::imageio_names();
        assert_eq!(names[0], "blake2b");
        // Python sorts by code point: "sha384" < "sha3_224" ('8' < '_').
        let i384 = names.iter().position(|n| *n == "sha384").unwrap();
        let i3 = names.iter().position(|n| *n == "sha3_224").unwrap();
        assert!(i384 < i3);
    }

    #[test]
    fn known_answers() {
        // Published digests of "abc" (RFC 7693 for BLAKE2b-512, FIPS 180 / 202 for the others).
        assert_eq!(
            hex(&Algorithm::Sha256.hash(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&Algorithm::Md5.hash(b"abc")),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert_eq!(
            hex(&Algorithm::Sha1.hash(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(&Algorithm::Blake2b(64).hash(b"abc")),
            "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1\
             7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
        );
        assert_eq!(
            hex(&Algorithm::Sha3_256.hash(b"abc")),
            "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"
        );
    }
}
