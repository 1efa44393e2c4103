//! Which construction, algorithm and block size a checksum uses, and the rules each reference
//! puts on them.

use crate::{Algorithm, Error};

/// The construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// ovirt-imageio's `/checksum`: `H(D0 ‖ … ‖ Dn−1)`.
    Imageio,
    /// nbdcopy's `--blkhash`: `H(D0 ‖ … ‖ Dn−1 ‖ le64(size))`.
    Blkhash,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Imageio => "imageio",
            Kind::Blkhash => "blkhash",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "imageio" => Ok(Kind::Imageio),
            "blkhash" | "nbdcopy" => Ok(Kind::Blkhash),
            _ => Err(Error::BadSpec(format!(
                "unknown checksum kind '{s}' (imageio or blkhash)"
            ))),
        }
    }
}

/// Smallest block imageio accepts (`block_size` parameter).
pub const IMAGEIO_MIN_BLOCK: u64 = 1 << 20;
/// Largest block imageio accepts.
pub const IMAGEIO_MAX_BLOCK: u64 = 16 << 20;
/// imageio's block sizes must be multiples of this.
pub const IMAGEIO_BLOCK_ALIGN: u64 = 4096;
/// imageio's default block size.
pub const IMAGEIO_DEFAULT_BLOCK: u64 = 4 << 20;
/// nbdcopy's default `--blkhash` block size.
pub const BLKHASH_DEFAULT_BLOCK: u64 = 64 << 10;
/// Largest block ferry accepts for the nbdcopy construction: a partly fed block is held in
/// memory until it is complete, so this bounds that memory.
pub const BLKHASH_MAX_BLOCK: u64 = 1 << 30;

/// A complete description of a checksum: equal specs over equal bytes give equal digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Spec {
    pub kind: Kind,
    pub algorithm: Algorithm,
    pub block_size: u64,
}

impl Spec {
    /// imageio's default: blake2b-256 over 4 MiB blocks.
    pub fn imageio() -> Spec {
        Spec {
            kind: Kind::Imageio,
            algorithm: Algorithm::BLAKE2B,
            block_size: IMAGEIO_DEFAULT_BLOCK,
        }
    }

    /// nbdcopy's default `--blkhash`: sha256 over 64 KiB blocks.
    pub fn blkhash() -> Spec {
        Spec {
            kind: Kind::Blkhash,
            algorithm: Algorithm::Sha256,
            block_size: BLKHASH_DEFAULT_BLOCK,
        }
    }

    /// The default of `kind` with the given algorithm and block size, checked against that
    /// construction's rules.
    pub fn new(
        kind: Kind,
        algorithm: Option<Algorithm>,
        block_size: Option<u64>,
    ) -> Result<Spec, Error> {
        let mut spec = match kind {
            Kind::Imageio => Spec::imageio(),
            Kind::Blkhash => Spec::blkhash(),
        };
        if let Some(a) = algorithm {
            spec.algorithm = a;
        }
        if let Some(b) = block_size {
            spec.block_size = b;
        }
        spec.check()?;
        Ok(spec)
    }

    /// Checks the rules of the construction; the messages for imageio are the daemon's.
    pub fn check(&self) -> Result<(), Error> {
        let b = self.block_size;
        match self.kind {
            Kind::Imageio => {
                if !(IMAGEIO_MIN_BLOCK..=IMAGEIO_MAX_BLOCK).contains(&b) {
                    return Err(Error::BadSpec(format!(
                        "Block size out of allowed range: {IMAGEIO_MIN_BLOCK}-{IMAGEIO_MAX_BLOCK}"
                    )));
                }
                if !b.is_multiple_of(IMAGEIO_BLOCK_ALIGN) {
                    return Err(Error::BadSpec(format!(
                        "Block size is not aligned to {IMAGEIO_BLOCK_ALIGN}"
                    )));
                }
            }
            Kind::Blkhash => {
                if !matches!(
                    self.algorithm,
                    Algorithm::Md5 | Algorithm::Sha1 | Algorithm::Sha256 | Algorithm::Sha512
                ) {
                    return Err(Error::BadSpec(format!(
                        "nbdcopy's blkhash supports md5, sha1, sha256 and sha512, not {}",
                        self.algorithm
                    )));
                }
                if b == 0 || b > BLKHASH_MAX_BLOCK {
                    return Err(Error::BadSpec(format!(
                        "blkhash block size must be within 1-{BLKHASH_MAX_BLOCK}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Parses nbdcopy's `--blkhash` value `ALG[/SIZE]` (`sha256`, `md5/4`, `sha512/512k`);
    /// SIZE takes k, M, G, T suffixes (powers of 1024). An empty value is the default.
    pub fn parse_blkhash(value: &str) -> Result<Spec, Error> {
        if value.is_empty() {
            return Ok(Spec::blkhash());
        }
        let (alg, size) = match value.split_once('/') {
            Some((a, s)) => (
                a,
                Some(
                    units::parse_size(s)
                        .map_err(|_| Error::BadSpec(format!("invalid size '{s}'")))?,
                ),
            ),
            None => (value, None),
        };
        Spec::new(Kind::Blkhash, Some(alg.parse()?), size)
    }

    /// Number of blocks of an image of `size` bytes.
    pub fn blocks(&self, size: u64) -> u64 {
        size.div_ceil(self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imageio_block_rules_and_messages() {
        let ok = |b| Spec::new(Kind::Imageio, None, Some(b));
        assert!(ok(1 << 20).is_ok());
        assert!(ok(16 << 20).is_ok());
        assert!(ok((1 << 20) + 4096).is_ok());
        assert_eq!(
            ok((1 << 20) - 4096).unwrap_err().to_string(),
            "Block size out of allowed range: 1048576-16777216"
        );
        assert_eq!(
            ok((16 << 20) + 4096).unwrap_err().to_string(),
            "Block size out of allowed range: 1048576-16777216"
        );
        assert_eq!(
            ok((1 << 20) + 512).unwrap_err().to_string(),
            "Block size is not aligned to 4096"
        );
        // imageio takes any algorithm it lists.
        assert!(Spec::new(Kind::Imageio, Some(Algorithm::Sha3_512), None).is_ok());
    }

    #[test]
    fn blkhash_values_parse_like_nbdcopy() {
        assert_eq!(Spec::parse_blkhash("").unwrap(), Spec::blkhash());
        let s = Spec::parse_blkhash("md5/4").unwrap();
        assert_eq!((s.algorithm, s.block_size), (Algorithm::Md5, 4));
        let s = Spec::parse_blkhash("sha512/512k").unwrap();
        assert_eq!((s.algorithm, s.block_size), (Algorithm::Sha512, 512 << 10));
        let s = Spec::parse_blkhash("sha1").unwrap();
        assert_eq!((s.algorithm, s.block_size), (Algorithm::Sha1, 64 << 10));
        for bad in ["blake2b", "sha256/0", "sha256/x", "sha256/2G", "nope/4k"] {
            assert!(Spec::parse_blkhash(bad).is_err(), "{bad}");
        }
    }
}
