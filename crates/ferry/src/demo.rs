//! `ferry demo`: the main job on an embedded default. It makes a sample sparse image (random
//! data, zeroes written as data, holes) in a temporary directory, serves it with qemu-nbd, and
//! drives ferry's NBD client through it: info, map (checked against the file's own extents),
//! a pipelined read of the whole export (checked byte for byte), and an extent-aware copy into
//! a second, writable export (checked byte for byte and for sparseness).

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use nbd::client::{PendingReply, ZeroFlags};
use nbd::proto::consts::{CMD_READ, CMD_WRITE, CONTEXT_BASE_ALLOCATION, STATE_ZERO};
use nbd::uri::Transport;
use nbd::{Client, ConnectOptions, Reply};

use crate::{Failure, human};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Size of the sample image in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Keep the temporary directory (its path is printed).
    #[arg(long)]
    pub keep: bool,
}

/// Request size for the pipelined read and copy, as nbdcopy uses for NBD.
const REQUEST: u64 = 256 * 1024;

/// A deterministic pseudo-random generator (xorshift64*), so every run builds the same image.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[derive(Debug, Default)]
struct Layout {
    data: u64,
    zero_data: u64,
    holes: u64,
    runs: usize,
}

/// Writes the sample image: runs of 64 KiB – 8 MiB, about half random data, a quarter zeroes
/// written as data, a quarter holes.
fn make_sample(path: &Path, size: u64) -> anyhow::Result<Layout> {
    let file = std::fs::File::create(path)?;
    file.set_len(size)?;
    let mut rng = Rng(0x5eed_f0e1_2026);
    let mut layout = Layout::default();
    let mut buf = vec![0u8; 8 << 20];
    let mut offset = 0;
    while offset < size {
        let len = ((64 << 10) << (rng.next() % 8)).min(size - offset);
        match rng.next() % 4 {
            0 | 1 => {
                rng.fill(&mut buf[..len as usize]);
                file.write_all_at(&buf[..len as usize], offset)?;
                layout.data += len;
            }
            2 => {
                buf[..len as usize].fill(0);
                file.write_all_at(&buf[..len as usize], offset)?;
                layout.zero_data += len;
            }
            _ => layout.holes += len,
        }
        layout.runs += 1;
        offset += len;
    }
    file.sync_all()?;
    Ok(layout)
}

/// A qemu-nbd serving one file on a private unix socket; killed on drop.
struct QemuNbd {
    // Held so that kill_on_drop stops the server when the demo ends.
    _child: tokio::process::Child,
    socket: PathBuf,
}

impl QemuNbd {
    async fn start(image: &Path, socket: PathBuf, read_only: bool) -> anyhow::Result<Self> {
        let mut cmd = tokio::process::Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "--persistent", "--shared=4", "-k"])
            .arg(&socket)
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if read_only {
            cmd.arg("--read-only");
        } else {
            // Let WRITE_ZEROES punch holes, so zero runs stay sparse in the copy.
            cmd.arg("--discard=unmap");
        }
        cmd.arg(image);
        let mut child = cmd
            .spawn()
            .context("starting qemu-nbd (install qemu-utils)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                bail!("qemu-nbd exited with {status} before listening");
            }
            ensure!(
                Instant::now() < deadline,
                "qemu-nbd did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(QemuNbd {
            _child: child,
            socket,
        })
    }

    fn options(&self) -> ConnectOptions {
        ConnectOptions::new(
            Transport::Unix {
                path: self.socket.clone(),
            },
            "",
        )
    }
}

struct Step {
    name: &'static str,
    bytes: u64,
    elapsed: Duration,
    check: String,
}

pub async fn run(args: DemoArgs) -> Result<(), Failure> {
    let dir = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    let result = demo(dir.path(), args.size_mib << 20).await;
    if args.keep {
        let kept = dir.keep();
        eprintln!("ferry: demo files kept in {}", kept.display());
    }
    result.map_err(Failure::from)
}

async fn demo(dir: &Path, size: u64) -> anyhow::Result<()> {
    ensure!(size > 0, "the sample image needs a size above 0");
    let mut steps = Vec::new();
    let source = dir.join("sample.raw");
    let started = Instant::now();
    let layout = make_sample(&source, size).context("writing the sample image")?;
    steps.push(Step {
        name: "make sample image",
        bytes: size,
        elapsed: started.elapsed(),
        check: format!(
            "{} runs: {} data, {} zeroes, {} holes",
            layout.runs,
            human::size(layout.data),
            human::size(layout.zero_data),
            human::size(layout.holes)
        ),
    });

    let server = QemuNbd::start(&source, dir.join("src.sock"), true).await?;
    let mut opts = server.options();
    opts.meta_contexts = vec![CONTEXT_BASE_ALLOCATION.into()];
    let started = Instant::now();
    let client = Client::connect(&opts, 4)
        .await
        .context("connecting to qemu-nbd")?;
    let info = client.info().clone();
    ensure!(
        info.size == size,
        "export size {} != image size {size}",
        info.size
    );
    steps.push(Step {
        name: "connect + info",
        bytes: 0,
        elapsed: started.elapsed(),
        check: format!(
            "{:?} replies, {} connections, max payload {}",
            info.mode,
            client.connections().len(),
            human::size(u64::from(info.block_size.maximum))
        ),
    });

    // Map: the server's view must agree with the file's own SEEK_DATA view on what is data.
    let started = Instant::now();
    let extents = client
        .block_status(CONTEXT_BASE_ALLOCATION, 0, size)
        .await?;
    let file = std::fs::File::open(&source)?;
    let local = disk::file_extents::file_extents(&file, 0, size)?;
    let nbd_data: u64 = extents
        .iter()
        .filter(|e| e.flags & u64::from(STATE_ZERO) == 0)
        .map(|e| e.length)
        .sum();
    let local_data: u64 = local.iter().filter(|e| !e.zero).map(|e| e.length).sum();
    ensure!(
        nbd_data == local_data,
        "NBD map says {nbd_data} data bytes, the file says {local_data}"
    );
    steps.push(Step {
        name: "map (base:allocation)",
        bytes: size,
        elapsed: started.elapsed(),
        check: format!(
            "{} extents, {} data: matches SEEK_DATA",
            extents.len(),
            human::size(nbd_data)
        ),
    });

    // Pipelined read of the whole export, compared with the file.
    let started = Instant::now();
    let mismatch = read_and_compare(&client, &file, size).await?;
    ensure!(
        mismatch.is_none(),
        "read differs from the image at offset {mismatch:?}"
    );
    steps.push(Step {
        name: "read all, pipelined",
        bytes: size,
        elapsed: started.elapsed(),
        check: "identical to the image".into(),
    });

    // Extent-aware copy into a fresh writable export.
    let target = dir.join("copy.raw");
    std::fs::File::create(&target)?.set_len(size)?;
    let dst_server = QemuNbd::start(&target, dir.join("dst.sock"), false).await?;
    let dst = Client::connect(&dst_server.options(), 4).await?;
    let started = Instant::now();
    let written = copy_extents(&client, &dst, &extents).await?;
    dst.flush().await?;
    let elapsed = started.elapsed();
    dst.disconnect().await;
    let copied = std::fs::File::open(&target)?;
    let mismatch = compare_files(&file, &copied, size)?;
    ensure!(mismatch.is_none(), "copy differs at offset {mismatch:?}");
    let allocated = copied.metadata()?.blocks() * 512;
    ensure!(
        allocated <= nbd_data + (1 << 20),
        "copy allocates {allocated} bytes but only {nbd_data} are data"
    );
    steps.push(Step {
        name: "copy NBD -> NBD",
        bytes: written,
        elapsed,
        check: format!(
            "identical; {} allocated of {}",
            human::size(allocated),
            human::size(size)
        ),
    });
    client.disconnect().await;
    drop(server);
    drop(dst_server);

    println!(
        "{:<24} {:>10} {:>9} {:>12}  check",
        "step", "bytes", "time", "throughput"
    );
    for s in &steps {
        println!(
            "{:<24} {:>10} {:>8.3}s {:>12}  {}",
            s.name,
            human::size(s.bytes),
            s.elapsed.as_secs_f64(),
            if s.bytes > 0 {
                human::rate(s.bytes, s.elapsed.as_secs_f64())
            } else {
                "-".into()
            },
            s.check
        );
    }
    Ok(())
}

/// Reads the export in REQUEST-sized pieces with up to 64 requests in flight, comparing each
/// piece with the file in order. Returns the first differing offset.
async fn read_and_compare(
    client: &Client,
    file: &std::fs::File,
    size: u64,
) -> anyhow::Result<Option<u64>> {
    let mut queue: std::collections::VecDeque<(u64, PendingReply)> = Default::default();
    let mut offset = 0;
    let mut expected = vec![0u8; REQUEST as usize];
    let conns = client.connections();
    let mut next_conn = 0;
    while offset < size || !queue.is_empty() {
        while offset < size && queue.len() < 64 {
            let len = REQUEST.min(size - offset);
            let conn = &conns[next_conn % conns.len()];
            next_conn += 1;
            queue.push_back((offset, conn.submit(CMD_READ, 0, offset, len, None).await?));
            offset += len;
        }
        let (at, pending) = queue.pop_front().expect("queue is not empty");
        let Reply::Data(data) = pending.wait().await? else {
            bail!("read at {at} returned no data");
        };
        let want = &mut expected[..data.len()];
        file.read_exact_at(want, at)?;
        if let Some(i) = data.iter().zip(want.iter()).position(|(a, b)| a != b) {
            return Ok(Some(at + i as u64));
        }
    }
    Ok(None)
}

/// Copies data extents with pipelined READ → WRITE and zero extents with WRITE_ZEROES.
async fn copy_extents(
    src: &Client,
    dst: &Client,
    extents: &[nbd::client::StatusExtent],
) -> anyhow::Result<u64> {
    let mut written = 0;
    let mut reads: std::collections::VecDeque<(u64, PendingReply)> = Default::default();
    let mut writes: std::collections::VecDeque<PendingReply> = Default::default();
    let src_conns = src.connections();
    let dst_conns = dst.connections();
    let mut n = 0usize;
    for e in extents {
        if e.flags & u64::from(STATE_ZERO) != 0 {
            dst.write_zeroes(e.offset, e.length, ZeroFlags::default())
                .await?;
            continue;
        }
        let mut offset = e.offset;
        let end = e.offset + e.length;
        while offset < end {
            let len = REQUEST.min(end - offset);
            let conn = &src_conns[n % src_conns.len()];
            n += 1;
            reads.push_back((offset, conn.submit(CMD_READ, 0, offset, len, None).await?));
            offset += len;
            while reads.len() >= 32 {
                written += forward(&mut reads, &mut writes, dst_conns, n).await?;
            }
            while writes.len() >= 32 {
                writes.pop_front().expect("not empty").wait().await?;
            }
        }
    }
    while !reads.is_empty() {
        written += forward(&mut reads, &mut writes, dst_conns, n).await?;
    }
    for w in writes {
        w.wait().await?;
    }
    Ok(written)
}

async fn forward(
    reads: &mut std::collections::VecDeque<(u64, PendingReply)>,
    writes: &mut std::collections::VecDeque<PendingReply>,
    dst_conns: &[nbd::Connection],
    n: usize,
) -> anyhow::Result<u64> {
    let (offset, pending) = reads.pop_front().expect("not empty");
    let Reply::Data(data) = pending.wait().await? else {
        bail!("read at {offset} returned no data");
    };
    let len = data.len() as u64;
    let conn = &dst_conns[n % dst_conns.len()];
    writes.push_back(
        conn.submit(CMD_WRITE, 0, offset, len, Some(Bytes::clone(&data)))
            .await?,
    );
    Ok(len)
}

fn compare_files(a: &std::fs::File, b: &std::fs::File, size: u64) -> anyhow::Result<Option<u64>> {
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(ba.len() as u64) as usize;
        a.read_exact_at(&mut ba[..len], offset)?;
        b.read_exact_at(&mut bb[..len], offset)?;
        if let Some(i) = ba[..len].iter().zip(&bb[..len]).position(|(x, y)| x != y) {
            return Ok(Some(offset + i as u64));
        }
        offset += len as u64;
    }
    Ok(None)
}
