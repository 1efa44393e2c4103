//! `ferry copy SRC DST`: nbdcopy's command line (same option names, defaults and meanings) plus
//! ferry's additions, validated into [`copy::Settings`] and endpoints, then one library call.

use std::io::IsTerminal;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use copy::progress::{self, Style};
use copy::{Cancel, Progress};
use endpoints::{Role, Spec};
use units::parse_size;

use crate::endpoint::{HttpArgs, NbdArgs, open, spec};
use crate::{Failure, usage};

#[derive(clap::Args, Debug)]
#[command(
    version,
    after_help = "SRC and DST: FILE | DEVICE | NBD-URI | - (stdin/stdout) | [ CMD ARGS ... ] \
                  (an NBD server started with socket activation) | https://HOST:PORT/images/TICKET \
                  (an imageio transfer URL); SRC may also be any http(s) URL of a raw image; DST may \
                  also be null:.\n\
                  Sizes accept K, M, G, T suffixes (powers of 1024)."
)]
pub struct CopyArgs {
    pub source: String,
    pub destination: String,
    /// Maximum request size (power of 2, 4096 to 32M); sets both sides unless they are set.
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub request_size: Option<u64>,
    /// Read requests size of the source (default per endpoint: 256K for NBD and files).
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub src_request_size: Option<u64>,
    /// Write requests size of the destination (default per endpoint).
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub dst_request_size: Option<u64>,
    /// Maximum requests in flight per connection.
    #[arg(short = 'R', long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,
    /// Maximum connections to each NBD server (more than one only with multi-conn); also the
    /// number of copy pipelines.
    #[arg(short = 'C', long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub connections: u64,
    /// Worker threads (0: one per CPU).
    #[arg(short = 'T', long, value_name = "N", default_value_t = 0)]
    pub threads: u64,
    /// Maximum bytes in flight per pipeline [default: 16M; 2M to or from HTTP].
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub queue_size: Option<u64>,
    /// Zero-detection block size for data read (0 turns it off; else a power of 2 >= 512).
    #[arg(short = 'S', long, value_name = "N", default_value = "4096", value_parser = parse_size)]
    pub sparse: u64,
    /// Make the destination fully allocated: zeroes are written allocated, not punched.
    #[arg(long)]
    pub allocated: bool,
    /// Assume the destination reads as zeroes and skip zero ranges (unsafe if it does not).
    #[arg(long, visible_alias = "target-is-zero")]
    pub destination_is_zero: bool,
    /// Flush the destination at the end.
    #[arg(long)]
    pub flush: bool,
    /// Ignore the source's extents and read everything.
    #[arg(long)]
    pub no_extents: bool,
    /// Progress: a bar on stderr (-p, --progress), N/100 lines on a file descriptor
    /// (--progress=FD), or JSON lines on stderr (--progress=json).
    #[arg(short = 'p', long, value_name = "FD|json", num_args = 0..=1, require_equals = true, default_missing_value = "bar")]
    pub progress: Option<String>,
    /// One request at a time, one pipeline.
    #[arg(long)]
    pub synchronous: bool,
    /// O_DIRECT for local files and block devices.
    #[arg(long)]
    pub direct: bool,
    /// How a local file or block device is read: `raw` (its bytes, the default), `qcow2`
    /// (the disk it holds, backing files followed) or `auto` (qcow2 by its magic, without
    /// backing files).
    #[arg(long, value_name = "FORMAT", default_value = "raw", value_parser = parse_format)]
    pub src_format: endpoints::Format,
    /// What is written: `raw` (the disk's bytes, the default) or `qcow2` (a new qcow2 image,
    /// into a local file, a block device, or a pipe / `-`, streamed in one pass; with
    /// --incremental/--bitmap, into the guest view of the existing qcow2 image DST).
    #[arg(long, value_name = "FORMAT", default_value = "raw", value_parser = crate::qcow2_out::parse_dst_format)]
    pub dst_format: crate::qcow2_out::DstFormat,
    /// Cluster size of a qcow2 destination (a power of 2 from 512 to 2M; default 64K).
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub cluster_size: Option<u64>,
    /// Compress a qcow2 destination's clusters (zstd or zlib); needs a file or block device.
    #[arg(long, value_name = "ALG", value_parser = crate::qcow2_out::parse_compression)]
    pub compress: Option<qcow2::Compression>,
    /// Print what was chosen and what was done.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Verify the copy: hash the source while copying, then checksum the destination (on the
    /// server when it offers /checksum, else by reading it back); fail if they differ.
    #[arg(long)]
    pub verify: bool,
    /// Print nbdcopy's block hash of the data copied (ALG: md5, sha1, sha256, sha512; SIZE:
    /// block size; default sha256/64k).
    #[arg(long, value_name = "ALG[/SIZE]", num_args = 0..=1, require_equals = true, default_missing_value = "sha256/64k")]
    pub blkhash: Option<String>,
    /// Write the --blkhash digest to FILE instead of stdout.
    #[arg(long, value_name = "FILE", requires = "blkhash")]
    pub blkhash_file: Option<PathBuf>,
    /// Incremental copy from an NBD source or a qcow2 image: copy only what the dirty bitmap
    /// NAME (qemu:dirty-bitmap:NAME, or the image's persistent bitmap with --src-format qcow2)
    /// marks as changed, into an existing destination.
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    /// Incremental copy: copy only the source's dirty extents (with --bitmap for NBD and qcow2
    /// images; an imageio ticket with dirty extents for URLs) into an existing destination.
    #[arg(long)]
    pub incremental: bool,
    /// Keep a journal of what is complete and durable on the destination in FILE: after an
    /// interruption the same command copies only the rest. The journal is removed when the
    /// copy completes, and refused when the source or the destination changed.
    #[arg(long, value_name = "FILE")]
    pub resume: Option<PathBuf>,
    /// Bandwidth limit in bytes per second (100M, 1G; 0 or off: none). It counts the data read
    /// from the source, each byte copied once (reads are the larger direction: zero blocks
    /// found in data read are not written); holes and zero extents, which are not read, do not
    /// count.
    #[arg(long, value_name = "RATE", value_parser = bwlimit::parse_rate)]
    pub bwlimit: Option<u64>,
    /// Take the bandwidth limit from FILE (one RATE, as --bwlimit takes it) at the start and
    /// again on each SIGHUP, so it can change while the copy runs. Without the file at the
    /// start, --bwlimit (or no limit) applies until a SIGHUP finds it.
    #[arg(long, value_name = "FILE")]
    pub bwlimit_file: Option<PathBuf>,
    /// When the copy ends, write a JSON summary to FILE: bytes by kind, requests, retries,
    /// seconds per phase and rates (schema in the README).
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Compress upload bodies with zstd on the wire, for a destination that takes them (a
    /// `ferry serve` ticket URL; others are sent plain, with a warning): `zstd` compresses every
    /// data run, `auto` measures both ways as the copy runs and keeps the faster, `off` sends
    /// plain bytes. Zero runs are never sent either way.
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = parse_wire_compression)]
    pub wire_compression: imageio::WireCompression,
    #[command(flatten)]
    pub nbd: NbdArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

fn parse_wire_compression(s: &str) -> Result<imageio::WireCompression, String> {
    s.parse()
}

/// `--bitmap NAME` with a local source: the file must be read as a qcow2 image, the only
/// local format that keeps dirty bitmaps.
fn check_qcow2_bitmap(path: &Path, args: &CopyArgs) -> Result<(), Failure> {
    let qcow2 = match args.src_format {
        endpoints::Format::Qcow2 => true,
        // Probing fails only when the file cannot be read: opening it then says why.
        endpoints::Format::Auto => endpoints::looks_like_qcow2(path).unwrap_or(true),
        endpoints::Format::Raw => false,
    };
    if qcow2 {
        return Ok(());
    }
    Err(usage(format!(
        "--bitmap NAME needs an NBD source or a qcow2 image, and {} is read as raw: add \
         --src-format qcow2 for a qcow2 image's persistent bitmap",
        path.display()
    )))
}

fn check_request_size(flag: &str, v: Option<u64>) -> Result<(), Failure> {
    match v {
        Some(n) if !n.is_power_of_two() || !(4096..=32 << 20).contains(&n) => Err(usage(format!(
            "--{flag}: must be a power of 2 within 4096-33554432"
        ))),
        _ => Ok(()),
    }
}

/// How the copy's endpoints are opened: the flags, with `-R`'s requests in flight kept on
/// each NBD connection (twice over, so replies never wait for the next request to be sent).
pub fn parse_format(s: &str) -> Result<endpoints::Format, String> {
    s.parse()
}

/// Starts reporting `progress` to `out` (when asked for); the report ends, with its final
/// line, when the sender is told whether the copy succeeded.
pub fn start_reporter(
    progress: &Arc<Progress>,
    out: Option<ProgressOut>,
) -> (
    tokio::sync::oneshot::Sender<bool>,
    Option<tokio::task::JoinHandle<()>>,
) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<bool>();
    let reporter = out.map(|(style, out)| {
        let style = if style == Style::Bar && !std::io::stderr().is_terminal() {
            // A bar redrawn with \r makes a mess in a log; fall back to percent lines.
            Style::Percent
        } else {
            style
        };
        let progress = progress.clone();
        tokio::spawn(async move {
            progress::report(&progress, style, out, async move {
                done_rx.await.unwrap_or(false)
            })
            .await
        })
    });
    (done_tx, reporter)
}

fn open_options(args: &CopyArgs) -> endpoints::OpenOptions {
    let mut nbd = args.nbd.options();
    nbd.max_in_flight = Some((args.requests as usize).max(1) * 2);
    nbd.bitmap = args.bitmap.clone();
    // Only a file read as qcow2 takes it: other local sources were refused with a usage error.
    let qcow2_bitmap = args
        .bitmap
        .clone()
        .filter(|_| args.src_format != endpoints::Format::Raw);
    endpoints::OpenOptions {
        nbd,
        http: endpoints::HttpSettings {
            compression: args.wire_compression,
            ..args.http.settings(&args.nbd)
        },
        connections: if args.synchronous {
            1
        } else {
            args.connections as usize
        },
        direct: args.direct,
        incremental: args.incremental,
        // A resumed copy continues into what the interrupted one wrote.
        existing_destination: args.resume.as_deref().is_some_and(Path::exists),
        extents: !args.no_extents,
        retry: args.http.retry(),
        src_format: args.src_format,
        qcow2_bitmap,
        inline_io: true,
    }
}

/// A progress style and where its reports go.
pub(crate) type ProgressOut = (Style, Box<dyn std::io::Write + Send>);

/// Where progress reports go.
fn progress_target(arg: &Option<String>) -> Result<Option<ProgressOut>, Failure> {
    let Some(value) = arg.as_deref() else {
        return Ok(None);
    };
    Ok(Some(match value {
        "bar" => (Style::Bar, Box::new(std::io::stderr())),
        "json" => (Style::Json, Box::new(std::io::stderr())),
        fd => {
            let fd: i32 = fd
                .parse()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| usage(format!("--progress: could not parse: {fd}")))?;
            // Check the descriptor is open before taking it over.
            // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(usage(format!(
                    "--progress={fd}: file descriptor is not open"
                )));
            }
            // SAFETY: the user handed this open descriptor to ferry for progress output; ferry
            // uses it for nothing else and the File closes it at exit.
            let file = unsafe { std::fs::File::from_raw_fd(fd) };
            (Style::Percent, Box::new(file))
        }
    }))
}

/// The copy's limiter: from `--bwlimit-file` when it exists, else `--bwlimit`. `None` when
/// neither is given (the engine then never waits).
fn bandwidth_limit(args: &CopyArgs) -> Result<Option<Arc<bwlimit::Limiter>>, Failure> {
    let mut rate = args.bwlimit;
    if let Some(path) = &args.bwlimit_file {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                rate = Some(
                    bwlimit::parse_rate(&text)
                        .map_err(|e| usage(format!("--bwlimit-file: {}: {e}", path.display())))?,
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(usage(format!(
                    "--bwlimit-file: reading {}: {e}",
                    path.display()
                )));
            }
        }
    }
    if rate.is_none() && args.bwlimit_file.is_none() {
        return Ok(None);
    }
    Ok(Some(bwlimit::Limiter::new(rate.unwrap_or(0))))
}

/// Re-reads `path` into `limiter` on every SIGHUP; a file that cannot be read or parsed
/// leaves the limit as it was, with a warning.
fn reload_on_sighup(
    limiter: Arc<bwlimit::Limiter>,
    path: PathBuf,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let rate = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| bwlimit::parse_rate(&text));
            match rate {
                Ok(rate) => {
                    tracing::info!("bandwidth limit from {}: {rate} bytes/s", path.display());
                    limiter.set_rate(rate);
                }
                Err(e) => tracing::warn!(
                    "--bwlimit-file {}: {e}; the limit stays {} bytes/s",
                    path.display(),
                    limiter.rate()
                ),
            }
        }
    }))
}

pub async fn run(args: CopyArgs) -> Result<(), Failure> {
    // Every line the copy logs names its endpoints; the engine's tasks inherit the span.
    let span = tracing::info_span!("copy", src = %args.source, dst = %args.destination);
    tracing::Instrument::instrument(copy(args), span).await
}

async fn copy(args: CopyArgs) -> Result<(), Failure> {
    check_request_size("request-size", args.request_size)?;
    check_request_size("src-request-size", args.src_request_size)?;
    check_request_size("dst-request-size", args.dst_request_size)?;
    if args.sparse != 0 && (!args.sparse.is_power_of_two() || args.sparse < 512) {
        return Err(usage("--sparse: must be a power of 2 and >= 512"));
    }
    crate::qcow2_out::check_args(&args)?;
    let progress_out = progress_target(&args.progress)?;
    let mut args = args;
    if args.bitmap.is_some() {
        args.incremental = true;
    }
    let blkhash_spec = match &args.blkhash {
        Some(value) => Some(
            blkhash::Spec::parse_blkhash(value).map_err(|e| usage(format!("--blkhash: {e}")))?,
        ),
        None => None,
    };
    if blkhash_spec.is_some() && args.incremental {
        return Err(usage(
            "--blkhash hashes the whole source; an incremental copy reads only what changed",
        ));
    }
    let src_spec = spec(&args.source)?;
    if args.incremental {
        match &src_spec {
            Spec::Nbd(_) | Spec::Command(_) if args.bitmap.is_none() => {
                return Err(usage(
                    "--incremental from an NBD source needs --bitmap NAME",
                ));
            }
            Spec::Nbd(_) | Spec::Command(_) => {}
            Spec::Http(_) if args.bitmap.is_some() => {
                return Err(usage(
                    "--bitmap names an NBD dirty bitmap; for an imageio URL use --incremental",
                ));
            }
            Spec::Http(_) => {}
            Spec::Path(path) if args.bitmap.is_some() => check_qcow2_bitmap(path, &args)?,
            Spec::Path(_) if args.src_format != endpoints::Format::Raw => {
                return Err(usage(
                    "--incremental from a qcow2 image needs --bitmap NAME (one of its \
                     persistent bitmaps)",
                ));
            }
            _ => {
                return Err(usage(
                    "an incremental copy needs an NBD or imageio source with dirty extents",
                ));
            }
        }
    }
    let dst_spec = spec(&args.destination)?;
    let limiter = bandwidth_limit(&args)?;

    let open_opts = open_options(&args);
    let into_qcow2 = crate::qcow2_out::into_existing(&args);
    if args.dst_format == crate::qcow2_out::DstFormat::Qcow2 && !into_qcow2 {
        return crate::qcow2_out::run(&args, &src_spec, &dst_spec, &open_opts, progress_out).await;
    }
    let src_opened = open(&src_spec, Role::Source, &open_opts).await?;
    let src = src_opened.endpoint.clone();
    let src_size = src.caps().size;
    let dst_role = Role::Destination { size: src_size };
    let dst_open = async {
        if into_qcow2 {
            crate::qcow2_out::open_existing(&dst_spec)
        } else {
            open(&dst_spec, dst_role, &open_opts).await
        }
    };
    let dst_opened = match dst_open.await {
        Ok(o) => o,
        Err(e) => {
            let _ = src.close().await;
            return Err(e);
        }
    };
    let dst = dst_opened.endpoint.clone();
    let settings = copy::Settings {
        src_request: args.src_request_size.or(args.request_size),
        dst_request: args.dst_request_size.or(args.request_size),
        requests: args.requests as usize,
        connections: args.connections as usize,
        threads: args.threads as usize,
        queue_bytes: args.queue_size,
        sparse: args.sparse,
        allocated: args.allocated,
        destination_is_zero: args.destination_is_zero,
        flush: args.flush,
        extents: !args.no_extents,
        incremental: args.incremental,
        synchronous: args.synchronous,
        verify: args.verify,
        blkhash: blkhash_spec,
        journal: args.resume.clone(),
        bwlimit: limiter.clone().map(copy::settings::RateLimit),
    };
    if args.verbose {
        let (sc, dc) = (src.caps(), dst.caps());
        let opts = copy::CopyOptions::resolve(sc, dc, &settings);
        eprintln!(
            "ferry: source {} size {} preferred {} request {}",
            src.name(),
            sc.size.map_or("unknown".into(), |s| s.to_string()),
            sc.preferred_block,
            opts.src_request
        );
        eprintln!(
            "ferry: destination {} size {} preferred {} request {}",
            dst.name(),
            dc.size.map_or("unknown".into(), |s| s.to_string()),
            dc.preferred_block,
            opts.dst_request
        );
        for (side, opened) in [("source", &src_opened), ("destination", &dst_opened)] {
            if let Some(server) = opened.http_summary() {
                eprintln!("ferry: {side} server: {server}");
            }
        }
        eprintln!(
            "ferry: pipelines={} requests={} queue-size={} sparse={} synchronous={}",
            opts.workers, opts.requests, opts.queue_bytes, opts.sparse, args.synchronous
        );
    }

    let progress = Arc::new(Progress::new(src_size));
    let cancel = Cancel::default();
    let (done_tx, reporter) = start_reporter(&progress, progress_out);
    let interrupt = {
        let cancel = cancel.clone();
        let interrupted =
            crate::interrupt::interrupted().context("installing the signal handlers")?;
        tokio::spawn(async move {
            interrupted.await;
            cancel.cancel();
        })
    };
    let limit_reloader = match (&limiter, &args.bwlimit_file) {
        (Some(limiter), Some(path)) => Some(
            reload_on_sighup(limiter.clone(), path.clone())
                .context("installing the SIGHUP handler")?,
        ),
        _ => None,
    };
    let result = copy::run(
        src.clone(),
        dst.clone(),
        &settings,
        progress.clone(),
        cancel,
    )
    .await;
    interrupt.abort();
    if let Some(task) = limit_reloader {
        task.abort();
    }
    let _ = done_tx.send(result.is_ok());
    if let Some(r) = reporter {
        let _ = r.await;
    }
    let (close_src, close_dst) = if result.is_ok() {
        (src.close().await, dst.close().await)
    } else {
        (src.abort().await, dst.abort().await)
    };
    let outcome = result
        .map_err(anyhow::Error::from)
        .and_then(|r| close_src.and(close_dst).map(|()| r).map_err(Into::into));
    progress.set_phase(copy::progress::Phase::Done);
    if let Some(path) = &args.stats_json {
        let doc = stats_json(&args, &progress, &outcome);
        // Write then rename, so a watcher never reads half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{doc:#}\n"))
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let report = outcome?;
    if let Some(digest) = &report.blkhash {
        match &args.blkhash_file {
            Some(path) => std::fs::write(path, format!("{digest}\n"))
                .with_context(|| format!("writing {}", path.display()))?,
            None => println!("{digest}"),
        }
    }
    if args.verbose {
        let stats = &report.stats;
        if let Some(v) = &report.verified {
            eprintln!(
                "ferry: verified: {} {} (destination by {})",
                v.checksum, v.digest, v.how
            );
        }
        let secs = stats.elapsed.as_secs_f64();
        eprintln!(
            "ferry: copied {} in {secs:.3} s ({}): read {}, wrote {}, zeroed {}, skipped {} \
             (destination zeroes: {:?}), {} pipelines",
            units::size(stats.size),
            units::rate(stats.size, secs),
            units::size(stats.bytes_read),
            units::size(stats.bytes_written),
            units::size(stats.bytes_zeroed),
            units::size(stats.bytes_skipped),
            stats.destination_zero,
            stats.workers
        );
    }
    Ok(())
}

/// The `--stats-json` document (its schema is in the README's "Copy statistics" section).
fn stats_json(
    args: &CopyArgs,
    progress: &Progress,
    outcome: &Result<copy::Report, anyhow::Error>,
) -> serde_json::Value {
    use copy::progress::Phase;
    let secs = |p: Phase| progress.phase_time(p).as_secs_f64();
    let (copy_s, flush_s, verify_s) = (secs(Phase::Copy), secs(Phase::Flush), secs(Phase::Verify));
    let total_s = copy_s + flush_s + verify_s;
    let per_s = |bytes: u64, s: f64| if s > 0.0 { bytes as f64 / s } else { 0.0 };
    let stats = outcome.as_ref().ok().map(|r| &r.stats);
    let size = stats.map(|s| s.size).or(progress.size());
    let done = progress.done();
    serde_json::json!({
        "result": if outcome.is_ok() { "ok" } else { "failed" },
        "error": outcome.as_ref().err().map(|e| format!("{e:#}")),
        "source": args.source,
        "destination": args.destination,
        "size": size,
        "bytes": {
            "done": done,
            "read": stats.map(|s| s.bytes_read),
            "data": stats.map(|s| s.bytes_written),
            "zero": stats.map(|s| s.bytes_zeroed),
            "skipped": stats.map(|s| s.bytes_skipped),
        },
        "requests": {
            "read": stats.map(|s| s.read_requests),
            "write": stats.map(|s| s.write_requests),
        },
        "retries": progress.retries(),
        "seconds": {
            "copy": copy_s,
            "flush": flush_s,
            "verify": verify_s,
            "total": total_s,
        },
        "rates": {
            "copy": per_s(done, copy_s),
            "total": per_s(done, total_s),
            "data": per_s(stats.map_or(0, |s| s.bytes_written), copy_s),
        },
        "verified": outcome.as_ref().ok().and_then(|r| r.verified.as_ref()).map(|v| {
            serde_json::json!({"checksum": v.checksum, "digest": v.digest, "how": v.how})
        }),
        "pipelines": stats.map(|s| s.workers),
    })
}
