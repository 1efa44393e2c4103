//! `ferry copy SRC DST --dst-format qcow2`: any source ferry reads, written as a new qcow2 image
//! into a local file, a block device, or a pipe (stdout with `-`).
//!
//! This module owns that path end to end: which destinations and flags a qcow2 output accepts,
//! planning the image from the source's extents (ranges the source reports as zero are never
//! read), reading the planned data with several reads in flight, and feeding one of the
//! `qcow2` crate's writers on a thread of its own (its writes are blocking, and compression
//! runs on all cores there).
//!
//! Which writer: a regular file or a block device gets the seekable writer (data first, tables
//! and header at the end), plain or compressed. It sees each cluster before placing it, so a
//! cluster of zeroes inside a data extent (a raw file's written zeroes, which its extents
//! report as data) is left unallocated, as `qemu-img convert` does: the image holds only the
//! clusters with data. A pipe cannot seek, so it gets the streaming writer, which writes
//! every table first from the plan alone and must then store every planned cluster, zeroes
//! included; compression is refused there. Stdout is streamed too unless compressing (which
//! needs it to be a file or a block device): it may have been opened for appending.
//!
//! It does not go through the copy engine: the engine writes pieces in whatever order their
//! reads complete, while both qcow2 writers need their data in guest order — the streaming
//! writer has already written every table, which fixes where each cluster lands in the file,
//! and the seekable one appends each cluster at the end of what it has written.

use std::fs::File;
use std::io::BufWriter;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use bytes::{Bytes, BytesMut};
use copy::Progress;
use disk::Endpoint;
use endpoints::{Role, Spec};
use futures_util::{StreamExt, TryStreamExt};
use qcow2::{Compression, StreamPlan};

use crate::copy_cmd::CopyArgs;
use crate::endpoint::open;
use crate::{Failure, usage};

/// Largest read; a multiple of every cluster size, so each piece starts on a cluster.
const PIECE: u64 = 4 << 20;
/// Reads in flight ahead of the writer.
const READS_IN_FLIGHT: usize = 8;
/// The writer's output buffer: tables go out a cluster at a time, compressed clusters are small.
const OUT_BUFFER: usize = 1 << 20;

/// Which format a copy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DstFormat {
    /// The disk's bytes as they are (the default, as nbdcopy).
    #[default]
    Raw,
    /// A new qcow2 image holding the disk; with an incremental copy, the guest view of an
    /// existing image ([`into_existing`]).
    Qcow2,
}

/// `--dst-format qcow2` with `--incremental`/`--bitmap`: an incremental copy keeps its
/// destination, so it writes into the guest view of the existing qcow2 image instead of
/// creating one.
pub fn into_existing(args: &CopyArgs) -> bool {
    args.dst_format == DstFormat::Qcow2 && (args.incremental || args.bitmap.is_some())
}

/// Opens the destination of [`into_existing`]: a local file that is a qcow2 image already.
pub fn open_existing(dst: &endpoints::Spec) -> Result<endpoints::Opened, Failure> {
    let endpoints::Spec::Path(path) = dst else {
        return Err(usage(
            "an incremental copy with --dst-format qcow2 writes into an existing local qcow2 \
             image; the destination is not a local file",
        ));
    };
    if !path.exists() || !endpoints::looks_like_qcow2(path)? {
        return Err(usage(format!(
            "an incremental copy with --dst-format qcow2 writes into an existing qcow2 image, \
             and {} is not one (a new image is written by a full copy)",
            path.display()
        )));
    }
    let image = disk::qcow2::Qcow2Endpoint::open_rw(path, true)?.inline_io();
    Ok(endpoints::Opened {
        endpoint: std::sync::Arc::new(image),
        http: None,
    })
}

pub fn parse_dst_format(s: &str) -> Result<DstFormat, String> {
    match s {
        "raw" => Ok(DstFormat::Raw),
        "qcow2" => Ok(DstFormat::Qcow2),
        _ => Err(format!("'{s}': expecting raw or qcow2")),
    }
}

pub fn parse_compression(s: &str) -> Result<Compression, String> {
    match s {
        "zstd" => Ok(Compression::Zstd),
        "zlib" => Ok(Compression::Zlib),
        _ => Err(format!("'{s}': expecting zstd or zlib")),
    }
}

/// Default cluster size of a written image, qemu-img's.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;

/// Checks the qcow2-only flags are used only with a qcow2 destination, and the flags of a
/// qcow2 copy are ones it honours.
pub fn check_args(args: &CopyArgs) -> Result<(), Failure> {
    if args.dst_format == DstFormat::Raw {
        if args.cluster_size.is_some() {
            return Err(usage("--cluster-size needs --dst-format qcow2"));
        }
        if args.compress.is_some() {
            return Err(usage("--compress needs --dst-format qcow2"));
        }
        return Ok(());
    }
    if into_existing(args) {
        let refused = [
            (args.cluster_size.is_some(), "--cluster-size"),
            (args.compress.is_some(), "--compress"),
            (args.resume.is_some(), "--resume"),
            (args.blkhash.is_some(), "--blkhash"),
            (args.allocated, "--allocated"),
            (args.direct, "--direct"),
            (args.verify, "--verify"),
        ];
        if let Some((_, flag)) = refused.iter().find(|(set, _)| *set) {
            return Err(usage(format!(
                "{flag} is not supported by an incremental copy into an existing qcow2 image"
            )));
        }
        return Ok(());
    }
    if let Some(cs) = args.cluster_size
        && (!cs.is_power_of_two() || !(512..=2 << 20).contains(&cs))
    {
        return Err(usage(format!(
            "--cluster-size {cs}: must be a power of 2 from 512 to 2M"
        )));
    }
    if args.verify {
        return Err(usage(
            "--verify compares the destination's bytes with the source's, but a qcow2 \
             destination's bytes are the image format, not the disk; check the result with \
             `qemu-img compare` or `ferry checksum --src-format qcow2`",
        ));
    }
    let refused = [
        (args.resume.is_some(), "--resume"),
        (args.blkhash.is_some(), "--blkhash"),
        (args.allocated, "--allocated"),
        (
            args.bwlimit.is_some() || args.bwlimit_file.is_some(),
            "--bwlimit",
        ),
        (args.stats_json.is_some(), "--stats-json"),
        (args.direct, "--direct"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(set, _)| *set) {
        return Err(usage(format!(
            "{flag} is not supported with --dst-format qcow2 (a new image is written in one pass)"
        )));
    }
    Ok(())
}

/// Where the image goes.
struct Output {
    name: String,
    file: File,
    /// Regular file or block device: can seek (compression) and be fsynced.
    seekable: bool,
    /// A file or block device ferry opened itself, at offset 0 and not for appending: the
    /// plain image goes out data first with its zero clusters left out. Stdout is streamed
    /// even when it is a file: the shell may have opened it for appending (`>>`), where the
    /// seek back to the header would not land at its start.
    data_first: bool,
    /// fsync the image before reporting success (`--flush`, as for raw destinations).
    sync: bool,
}

/// Opens the destination. `seek`: the writer must seek (compression), checked before a pipe
/// is opened, since opening one waits for its reader.
fn open_output(spec: &Spec, word: &str, seek: bool) -> Result<Output, Failure> {
    let refuse = |name: &str| {
        usage(format!(
            "--compress needs a seekable destination (a file or a block device): a compressed \
             image's tables are known only after its data, and {name} is a pipe"
        ))
    };
    match spec {
        Spec::Stdio => {
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating stdout")?;
            let file = File::from(fd);
            let t = file.metadata().context("stat of stdout")?.file_type();
            let seekable = t.is_file() || t.is_block_device();
            if seek && !seekable {
                return Err(refuse("stdout"));
            }
            Ok(Output {
                name: "stdout".into(),
                seekable,
                data_first: false,
                sync: false,
                file,
            })
        }
        Spec::Path(path) => {
            let name = path.display().to_string();
            let existing = std::fs::metadata(path).ok().map(|m| m.file_type());
            let mut open = std::fs::OpenOptions::new();
            open.write(true);
            let seekable = match existing {
                // Pipes, sockets and devices are written as they are, never truncated.
                Some(t) if !t.is_file() => t.is_block_device(),
                _ => {
                    open.create(true).truncate(true);
                    true
                }
            };
            if seek && !seekable {
                return Err(refuse(&name));
            }
            let file = open
                .open(path)
                .with_context(|| format!("open {name} failed"))?;
            Ok(Output {
                name,
                file,
                seekable,
                data_first: seekable,
                sync: false,
            })
        }
        _ => Err(usage(format!(
            "--dst-format qcow2 writes a local file, a block device or a pipe (- for \
             stdout), not {word}"
        ))),
    }
}

/// The planned clusters as reads of at most [`PIECE`] bytes, each starting on a cluster.
fn pieces(plan: &StreamPlan) -> Vec<(u64, u64)> {
    let vsize = plan.virtual_size();
    let mut out = Vec::new();
    for r in plan.planned_ranges() {
        let end = r.end.min(vsize);
        let mut off = r.start;
        while off < end {
            let len = PIECE.min(end - off);
            out.push((off, len));
            off += len;
        }
    }
    out
}

/// The writer side, on a plain thread: the seekable writer when compressing, or when the
/// destination is a file or block device ferry opened (it leaves all-zero clusters out); the
/// streaming one otherwise.
fn write_image(
    plan: StreamPlan,
    out: Output,
    compression: Option<Compression>,
    mut data: tokio::sync::mpsc::Receiver<(u64, Bytes)>,
) -> anyhow::Result<u64> {
    let name = out.name.clone();
    // The image error's text already holds its cause: no error chain, which would repeat it.
    let ctx = |what: &str| {
        let name = name.clone();
        let what = what.to_string();
        move |e: qcow2::Qcow2Error| anyhow!("{what} qcow2 image {name} failed: {e}")
    };
    let at = |off: u64| {
        let name = name.clone();
        move |e: qcow2::Qcow2Error| anyhow!("write to {name} at guest offset {off} failed: {e}")
    };
    let buffered = BufWriter::with_capacity(OUT_BUFFER, out.file);
    let (buffered, size) = match compression {
        None if !out.data_first => {
            let mut w = plan.writer(buffered).map_err(ctx("write to"))?;
            while let Some((off, bytes)) = data.blocking_recv() {
                w.write_cluster_data(off, &bytes).map_err(at(off))?;
            }
            (w.finish().map_err(ctx("finish"))?, plan.image_size())
        }
        _ => {
            let w = match compression {
                Some(c) => plan.compressed_writer(buffered, c),
                None => plan.seekable_writer(buffered),
            };
            let mut w = w.map_err(ctx("write to"))?;
            while let Some((off, bytes)) = data.blocking_recv() {
                w.write_cluster_data(off, &bytes).map_err(at(off))?;
            }
            w.finish().map_err(ctx("finish"))?
        }
    };
    let file = buffered
        .into_inner()
        .map_err(|e| anyhow!("flush {name} failed: {}", e.error()))?;
    if out.seekable && out.sync {
        // Durable before success is reported; a pipe has nothing to sync.
        file.sync_all()
            .with_context(|| format!("fsync {name} failed"))?;
    }
    Ok(size)
}

/// The reads stopped because the writer did (and reports why).
#[derive(Debug)]
struct WriterStopped;

impl std::fmt::Display for WriterStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the qcow2 writer stopped")
    }
}

impl std::error::Error for WriterStopped {}

/// What a qcow2 copy did.
pub struct Summary {
    /// The source's size.
    pub size: u64,
    /// Bytes read from the source: its data, rounded out to clusters.
    pub data: u64,
    /// Size of the image file.
    pub image: u64,
}

/// Writes `src` as a new qcow2 image file at `path` (created or truncated), as `ferry copy
/// SRC PATH --dst-format qcow2` does.
pub async fn write_file(
    src: Arc<dyn Endpoint>,
    path: &std::path::Path,
    cluster_size: u64,
    compression: Option<Compression>,
) -> anyhow::Result<Summary> {
    let out = open_output(&Spec::Path(path.to_path_buf()), "", compression.is_some())
        .map_err(|f| f.error)?;
    let progress = Progress::new(src.caps().size);
    write_qcow2(src, out, cluster_size, compression, true, &progress).await
}

async fn write_qcow2(
    src: Arc<dyn Endpoint>,
    out: Output,
    cluster_size: u64,
    compression: Option<Compression>,
    use_extents: bool,
    progress: &Progress,
) -> anyhow::Result<Summary> {
    let size = src
        .caps()
        .size
        .ok_or_else(|| anyhow!("{}: a stream has no size", src.name()))?;
    let ranges = copy::data_ranges::data_ranges(src.as_ref(), size, use_extents).await?;
    // qemu counts the size in 512-byte sectors: the padding reads as zeroes.
    let vsize = size.next_multiple_of(512);
    let plan = StreamPlan::new(vsize, cluster_size, &ranges)
        .with_context(|| format!("planning the qcow2 image {}", out.name))?;
    let pieces = pieces(&plan);
    let data: u64 = pieces.iter().map(|p| p.1).sum();
    // What is not read is done already.
    progress.add(size.saturating_sub(data));
    let (tx, rx) = tokio::sync::mpsc::channel::<(u64, Bytes)>(READS_IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || write_image(plan, out, compression, rx));
    let reads = futures_util::stream::iter(pieces)
        .map(|(off, len)| {
            let src = src.clone();
            async move {
                let readable = size.saturating_sub(off).min(len);
                let mut bytes = if readable > 0 {
                    src.read(off, readable).await?
                } else {
                    Bytes::new()
                };
                if (bytes.len() as u64) < readable {
                    bail!(
                        "read from {} at offset {off} length {readable} failed: short read of {} bytes",
                        src.name(),
                        bytes.len()
                    );
                }
                if (bytes.len() as u64) < len {
                    // The tail up to the next 512 bytes: zeroes.
                    let mut padded = BytesMut::from(&bytes[..]);
                    padded.resize(len as usize, 0);
                    bytes = padded.freeze();
                }
                Ok((off, bytes))
            }
        })
        .buffered(READS_IN_FLIGHT);
    let feed = reads.try_for_each(|(off, bytes)| {
        let tx = &tx;
        async move {
            let n = bytes.len() as u64;
            // Closed only when the writer stopped early: its error is the one reported.
            tx.send((off, bytes)).await.map_err(|_| WriterStopped)?;
            progress.add(n);
            Ok(())
        }
    });
    let fed = feed.await;
    drop(tx);
    let written = writer.await.context("the qcow2 writer task failed")?;
    let image = match fed {
        Err(e) if e.is::<WriterStopped>() => written?,
        // A read error leaves the writer short of data: report the read, not the writer.
        Err(e) => return Err(e),
        Ok(()) => written?,
    };
    Ok(Summary { size, data, image })
}

/// Runs a copy into a qcow2 destination; `args` were checked by [`check_args`].
pub async fn run(
    args: &CopyArgs,
    src_spec: &Spec,
    dst_spec: &Spec,
    open_opts: &endpoints::OpenOptions,
    progress_out: Option<crate::copy_cmd::ProgressOut>,
) -> Result<(), Failure> {
    let mut out = open_output(dst_spec, &args.destination, args.compress.is_some())?;
    out.sync = args.flush;
    let src = open(src_spec, Role::Source, open_opts).await?.endpoint;
    if src.caps().size.is_none() {
        let _ = src.close().await;
        return Err(usage(format!(
            "--dst-format qcow2 needs a source of known size (the image's tables come first); \
             {} is a stream",
            src.name()
        )));
    }
    let progress = Arc::new(Progress::new(src.caps().size));
    let (done_tx, reporter) = crate::copy_cmd::start_reporter(&progress, progress_out);
    let interrupted = crate::interrupt::interrupted().context("installing the signal handlers")?;
    let cluster_size = args.cluster_size.unwrap_or(DEFAULT_CLUSTER);
    let result = tokio::select! {
        r = write_qcow2(src.clone(), out, cluster_size, args.compress, !args.no_extents, &progress) => r,
        _ = interrupted => Err(anyhow!("interrupted")),
    };
    let _ = done_tx.send(result.is_ok());
    if let Some(r) = reporter {
        let _ = r.await;
    }
    let closed = if result.is_ok() {
        src.close().await
    } else {
        src.abort().await
    };
    let summary = result?;
    closed?;
    if args.verbose {
        let secs = progress.elapsed().as_secs_f64();
        eprintln!(
            "ferry: wrote qcow2 image {} of {} in {secs:.3} s ({}): {} of data clusters read, \
             image file {}, cluster size {}, compression {}",
            args.destination,
            units::size(summary.size),
            units::rate(summary.size, secs),
            units::size(summary.data),
            units::size(summary.image),
            units::size(cluster_size),
            match args.compress {
                Some(Compression::Zstd) => "zstd",
                Some(Compression::Zlib) => "zlib",
                None => "none",
            }
        );
    }
    Ok(())
}
