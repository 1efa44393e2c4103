//! Compression of upload bodies on the wire, for servers that offer it (`ferry serve`
//! advertises `"ferry_encodings": ["zstd"]` in its OPTIONS answer; imageio servers do not, and
//! are always sent plain bytes).
//!
//! A compressed run is one PUT with `Content-Encoding: zstd` whose body is a sequence of
//! independent zstd frames (with content checksums), one per block of about a MiB of the
//! run; the blocks are compressed at once on the blocking thread pool, so a run uses every
//! core, and several pipelines compress side by side. `Content-Range` still names the bytes
//! the body decompresses to; zero runs are still zero requests and never sent.
//!
//! `auto` measures instead of guessing. Every run's goodput (bytes of the image per second,
//! from the start of compressing it to the server's answer) is kept as a moving average per
//! mode. The first runs alternate between plain and compressed; after that each run goes the
//! faster way, and now and then one run tries the other way again (every 8 runs at first,
//! doubling up to every 128 while the other way keeps losing), so a link that gets busier or
//! data that gets less compressible is noticed. On a fast link (loopback) compression loses
//! and almost every run is plain; on a slow link with compressible data it wins.

use std::io::{self, Write};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

/// The body encoding ferry servers offer and ferry clients send.
pub const ZSTD: &str = "zstd";
/// zstd's default level: several times faster than a 1 Gbit/s link per core, and a better
/// ratio than the fastest levels.
const LEVEL: i32 = 3;
/// Runs are compressed in independent blocks of at least this size.
const BLOCK: usize = 1 << 20;

/// `--wire-compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireCompression {
    /// Plain bytes always.
    #[default]
    Off,
    /// Every data run compressed (when the server takes it).
    Zstd,
    /// Compressed when that measures faster.
    Auto,
}

impl FromStr for WireCompression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(WireCompression::Off),
            "zstd" => Ok(WireCompression::Zstd),
            "auto" => Ok(WireCompression::Auto),
            other => Err(format!(
                "unknown wire compression {other:?}: expected zstd, auto or off"
            )),
        }
    }
}

impl std::fmt::Display for WireCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireCompression::Off => "off",
            WireCompression::Zstd => "zstd",
            WireCompression::Auto => "auto",
        })
    }
}

/// Runs each way before the faster one is preferred.
const WARMUP: u32 = 2;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.3;
const FIRST_RETRY: u32 = 8;
const LAST_RETRY: u32 = 128;

/// Decides, run by run, whether to compress; shared by the pipelines of one endpoint.
#[derive(Debug)]
pub(crate) struct Policy {
    mode: WireCompression,
    state: Mutex<Measured>,
}

#[derive(Debug, Default)]
struct Measured {
    /// Moving average of goodput, bytes/s: [plain, compressed].
    rate: [Option<f64>; 2],
    /// Runs started each way.
    started: [u32; 2],
    /// Runs since the slower way was last tried, and how many to wait.
    since_retry: u32,
    retry_every: u32,
}

impl Policy {
    pub(crate) fn new(mode: WireCompression) -> Policy {
        Policy {
            mode,
            state: Mutex::new(Measured {
                retry_every: FIRST_RETRY,
                ..Measured::default()
            }),
        }
    }

    /// Whether the next run is compressed.
    pub(crate) fn choose(&self) -> bool {
        match self.mode {
            WireCompression::Off => false,
            WireCompression::Zstd => true,
            WireCompression::Auto => {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let pick = s.pick();
                s.started[pick as usize] += 1;
                pick
            }
        }
    }

    /// A run of `bytes` went `compressed` or not and took `took`.
    pub(crate) fn record(&self, compressed: bool, bytes: u64, took: Duration) {
        if self.mode != WireCompression::Auto || bytes == 0 {
            return;
        }
        let rate = bytes as f64 / took.as_secs_f64().max(1e-6);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut s.rate[compressed as usize];
        *slot = Some(slot.map_or(rate, |old| old + ALPHA * (rate - old)));
    }
}

impl Measured {
    fn pick(&mut self) -> bool {
        // Warming up: the way with fewer runs started, plain first.
        if self.started.iter().any(|&n| n < WARMUP) || self.rate.iter().any(Option::is_none) {
            return self.started[1] < self.started[0];
        }
        let (plain, zstd) = (self.rate[0].unwrap_or(0.0), self.rate[1].unwrap_or(0.0));
        let best = zstd > plain;
        self.since_retry += 1;
        if self.since_retry >= self.retry_every {
            self.since_retry = 0;
            // The other way keeps losing: try it less often.
            self.retry_every = (self.retry_every * 2).min(LAST_RETRY);
            return !best;
        }
        best
    }
}

/// Compresses a run's pieces into a sequence of zstd frames, blocks in parallel.
pub(crate) async fn compress(pieces: &[Bytes]) -> io::Result<Bytes> {
    let total: usize = pieces.iter().map(Bytes::len).sum();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Enough blocks for every core, none smaller than BLOCK unless the run is.
    let block = (total / threads).max(BLOCK);
    let mut groups: Vec<Vec<Bytes>> = Vec::new();
    let mut current: Vec<Bytes> = Vec::new();
    let mut filled = 0;
    for piece in pieces {
        let mut piece = piece.clone();
        while !piece.is_empty() {
            let take = piece.len().min(block - filled);
            current.push(piece.split_to(take));
            filled += take;
            if filled == block {
                groups.push(std::mem::take(&mut current));
                filled = 0;
            }
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    let tasks: Vec<_> = groups
        .into_iter()
        .map(|g| tokio::task::spawn_blocking(move || compress_block(&g)))
        .collect();
    let mut out = Vec::with_capacity(total / 2);
    for t in tasks {
        let frame = t.await.map_err(io::Error::other)??;
        out.extend_from_slice(&frame);
    }
    Ok(Bytes::from(out))
}

/// One zstd frame of `pieces`, with its size and a checksum of its content.
fn compress_block(pieces: &[Bytes]) -> io::Result<Vec<u8>> {
    let len: usize = pieces.iter().map(Bytes::len).sum();
    let mut enc = zstd::stream::write::Encoder::new(Vec::with_capacity(len / 2 + 64), LEVEL)?;
    enc.include_checksum(true)?;
    enc.set_pledged_src_size(Some(len as u64))?;
    for p in pieces {
        enc.write_all(p)?;
    }
    enc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_warms_up_both_ways_then_prefers_the_faster() {
        let p = Policy::new(WireCompression::Auto);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let c = p.choose();
            seen.push(c);
            // Compressed runs are twice as fast here.
            let took = if c { 1.0 } else { 2.0 };
            p.record(c, 100, Duration::from_secs_f64(took));
        }
        assert_eq!(seen, [false, true, false, true]);
        let picks: Vec<bool> = (0..40).map(|_| p.choose()).collect();
        let plain = picks.iter().filter(|c| !**c).count();
        // Only the occasional retry of the slower way.
        assert!((1..=3).contains(&plain), "{picks:?}");
    }

    #[test]
    fn fixed_modes_do_not_measure() {
        assert!(!Policy::new(WireCompression::Off).choose());
        assert!(Policy::new(WireCompression::Zstd).choose());
        assert_eq!("auto".parse(), Ok(WireCompression::Auto));
        assert!("gzip".parse::<WireCompression>().is_err());
    }

    #[tokio::test]
    async fn blocks_decompress_to_the_run() {
        let a = Bytes::from(vec![7u8; 3 << 20]);
        let b = Bytes::from(
            (0..(1u32 << 20))
                .map(|i| (i % 251) as u8)
                .collect::<Vec<_>>(),
        );
        let body = compress(&[a.clone(), b.clone()]).await.unwrap();
        assert!(body.len() < (a.len() + b.len()) / 10);
        let back = zstd::stream::decode_all(&body[..]).unwrap();
        assert_eq!(back.len(), a.len() + b.len());
        assert_eq!(&back[..a.len()], &a[..]);
        assert_eq!(&back[a.len()..], &b[..]);
    }
}
