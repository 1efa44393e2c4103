//! The constructions written as plainly as possible: one thread, blocks in order, no zero
//! shortcut. The published vectors pin this down, and the tests check the parallel
//! [`crate::Hasher`] against it for arbitrary inputs and feeding orders.

use crate::{Digest, Kind, Spec};

/// The checksum of an image whose bytes are `image`.
pub fn checksum(spec: &Spec, image: &[u8]) -> Digest {
    let mut outer = spec.algorithm.start();
    for block in image.chunks(spec.block_size as usize) {
        outer.update(&spec.algorithm.hash(block));
    }
    if spec.kind == Kind::Blkhash {
        outer.update(&(image.len() as u64).to_le_bytes());
    }
    Digest(outer.finish())
}
