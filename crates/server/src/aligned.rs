//! Byte-granular reads, writes and zeroing on backends that only take whole blocks (NBD
//! exports advertising a minimum block size, e.g. qemu-nbd over O_DIRECT storage). HTTP
//! clients address bytes; here unaligned heads and tails become read-modify-write of the
//! blocks around them, and the aligned middle goes straight through.
//!
//! Read-modify-write cycles are serialized per backend: two of them on the same block would
//! otherwise lose one update. Aligned I/O never waits for them.

use bytes::Bytes;
use disk::DiskError;

use crate::backend::Backend;

fn floor(x: u64, b: u64) -> u64 {
    x / b * b
}

fn ceil(x: u64, b: u64) -> u64 {
    x.div_ceil(b) * b
}

impl Backend {
    fn unaligned(&self, offset: u64, len: u64) -> bool {
        let min = self.min_block();
        min > 1 && (!offset.is_multiple_of(min) || !len.is_multiple_of(min))
    }

    /// Reads `len` bytes at `offset`, whatever the backend's alignment; counted in the
    /// ticket's traffic once done.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, DiskError> {
        let data = self.read_any(offset, len).await?;
        self.traffic.read(data.len() as u64);
        Ok(data)
    }

    /// Writes `data` at `offset`, whatever the backend's alignment; counted once done.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), DiskError> {
        let n = data.len() as u64;
        self.write_any(offset, data).await?;
        self.traffic.written(n);
        Ok(())
    }

    /// Writes `parts` back to back from `offset`, as [`Backend::write`] would their
    /// concatenation: an NBD export gets them as one request without a copy.
    pub async fn write_parts(&self, offset: u64, parts: Vec<Bytes>) -> Result<(), DiskError> {
        let n: u64 = parts.iter().map(|p| p.len() as u64).sum();
        match (&self.nbd, parts.len()) {
            (_, 0) => {}
            (_, 1) => {
                self.write_any(offset, parts.into_iter().next().expect("one"))
                    .await?
            }
            (Some(nbd), _) if !self.unaligned(offset, n) => nbd.write_parts(offset, parts).await?,
            _ => {
                let mut joined = bufpool::get(n as usize);
                let mut at = 0;
                for p in &parts {
                    joined[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                self.write_any(offset, joined.freeze()).await?
            }
        }
        self.traffic.written(n);
        Ok(())
    }

    /// Zeroes [offset, offset+len), whatever the backend's alignment; counted once done.
    pub async fn zero(&self, offset: u64, len: u64, allocate: bool) -> Result<(), DiskError> {
        self.zero_any(offset, len, allocate).await?;
        self.traffic.zeroed(len);
        Ok(())
    }

    async fn read_any(&self, offset: u64, len: u64) -> Result<Bytes, DiskError> {
        if !self.unaligned(offset, len) {
            return self.ep.read(offset, len).await;
        }
        let min = self.min_block();
        let start = floor(offset, min);
        let end = ceil(offset + len, min).min(ceil(self.size, min));
        let data = self.ep.read(start, end - start).await?;
        let from = (offset - start) as usize;
        Ok(data.slice(from..from + len as usize))
    }

    async fn write_any(&self, offset: u64, data: Bytes) -> Result<(), DiskError> {
        let len = data.len() as u64;
        if !self.unaligned(offset, len) {
            return self.ep.write(offset, data).await;
        }
        let min = self.min_block();
        let end = offset + len;
        let (mid_start, mid_end) = (ceil(offset, min), floor(end, min));
        if mid_start >= mid_end {
            // No whole block inside: one cycle over the blocks the range touches.
            return self.patch_blocks(offset, &data).await;
        }
        if offset < mid_start {
            let head = data.slice(..(mid_start - offset) as usize);
            self.patch_blocks(offset, &head).await?;
        }
        let middle = data.slice((mid_start - offset) as usize..(mid_end - offset) as usize);
        self.ep.write(mid_start, middle).await?;
        if mid_end < end {
            let tail = data.slice((mid_end - offset) as usize..);
            self.patch_blocks(mid_end, &tail).await?;
        }
        Ok(())
    }

    /// Unaligned edges are written as zero bytes.
    async fn zero_any(&self, offset: u64, len: u64, allocate: bool) -> Result<(), DiskError> {
        if !self.unaligned(offset, len) {
            return self.ep.zero(offset, len, allocate).await;
        }
        let min = self.min_block();
        let end = offset + len;
        let (mid_start, mid_end) = (ceil(offset, min), floor(end, min));
        if mid_start >= mid_end {
            return self
                .patch_blocks(offset, &disk::endpoint::zero_bytes(len as usize))
                .await;
        }
        if offset < mid_start {
            let n = (mid_start - offset) as usize;
            self.patch_blocks(offset, &disk::endpoint::zero_bytes(n))
                .await?;
        }
        self.ep
            .zero(mid_start, mid_end - mid_start, allocate)
            .await?;
        if mid_end < end {
            let n = (end - mid_end) as usize;
            self.patch_blocks(mid_end, &disk::endpoint::zero_bytes(n))
                .await?;
        }
        Ok(())
    }

    /// Read-modify-write of the blocks covering [offset, offset+data.len()).
    async fn patch_blocks(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let min = self.min_block();
        let start = floor(offset, min);
        let end = ceil(offset + data.len() as u64, min);
        let _turn = self.rmw.lock().await;
        let old = self.ep.read(start, end - start).await?;
        let mut block = bufpool::get((end - start) as usize);
        block.copy_from_slice(&old);
        let at = (offset - start) as usize;
        block[at..at + data.len()].copy_from_slice(data);
        self.ep.write(start, block.freeze()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(floor(4097, 4096), 4096);
        assert_eq!(ceil(4097, 4096), 8192);
        assert_eq!(ceil(4096, 4096), 4096);
        assert_eq!(floor(0, 512), 0);
    }
}
