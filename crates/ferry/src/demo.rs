//! `ferry demo`: the main job on an embedded default. It makes a sample sparse image (random
//! data, zeroes written as data, holes) in a temporary directory, checks ferry's NBD map of it
//! against the file's own extents, then copies it through every endpoint kind ferry has —
//! file, NBD (qemu-nbd), socket-activated qcow2, pipes, `null:`, and up to and back down from
//! an in-process `ferry serve` over HTTP — verifying every result byte for byte (and for
//! sparseness where the destination can be sparse), and prints a table.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use copy::{Cancel, Progress, Stats};
use disk::Endpoint;
use disk::file::FileEndpoint;
use disk::nbd::NbdEndpoint;
use disk::null::NullEndpoint;
use disk::pipe::PipeEndpoint;
use disk::subprocess::SubprocessEndpoint;
use nbd::proto::consts::{CONTEXT_BASE_ALLOCATION, STATE_ZERO};
use nbd::uri::Transport;
use nbd::{Client, ConnectOptions};

use crate::Failure;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Size of the sample image in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Keep the temporary directory (its path is printed).
    #[arg(long)]
    pub keep: bool,
}

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
    name: String,
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

/// Copies as `ferry copy` does by default.
async fn run_copy(src: Arc<dyn Endpoint>, dst: Arc<dyn Endpoint>) -> anyhow::Result<Stats> {
    let size = src.caps().size;
    let report = copy::run(
        src.clone(),
        dst.clone(),
        &copy::Settings::default(),
        Arc::new(Progress::new(size)),
        Cancel::default(),
    )
    .await;
    src.close().await?;
    dst.close().await?;
    Ok(report?.stats)
}

fn nbd_endpoint_options(socket: &Path) -> ConnectOptions {
    ConnectOptions::new(
        Transport::Unix {
            path: socket.to_path_buf(),
        },
        "",
    )
}

async fn nbd_endpoint(server: &QemuNbd, extents: bool) -> anyhow::Result<Arc<dyn Endpoint>> {
    let name = format!("nbd+unix:///?socket={}", server.socket.display());
    Ok(Arc::new(
        NbdEndpoint::connect(&name, &server.options(), 4, extents).await?,
    ))
}

/// Checks `out` equals the sample, and (when `sparse`) that it allocates no more than the
/// sample's data. Returns the check's description.
fn verify(sample: &Path, out: &Path, data: u64, sparse: bool) -> anyhow::Result<String> {
    let a = std::fs::File::open(sample)?;
    let b = std::fs::File::open(out)?;
    let size = a.metadata()?.len();
    ensure!(
        b.metadata()?.len() == size,
        "{} has size {}, expected {size}",
        out.display(),
        b.metadata()?.len()
    );
    if let Some(at) = compare_files(&a, &b, size)? {
        bail!("{} differs from the sample at offset {at}", out.display());
    }
    let allocated = b.metadata()?.blocks() * 512;
    if sparse {
        ensure!(
            allocated <= data + (1 << 20),
            "{} allocates {allocated} bytes for {data} bytes of data",
            out.display()
        );
        Ok(format!("identical, {} allocated", units::size(allocated)))
    } else {
        Ok("identical".into())
    }
}

async fn demo(dir: &Path, size: u64) -> anyhow::Result<()> {
    ensure!(size > 0, "the sample image needs a size above 0");
    let mut steps = Vec::new();
    let sample = dir.join("sample.raw");
    let started = Instant::now();
    let layout = make_sample(&sample, size).context("writing the sample image")?;
    steps.push(Step {
        name: "make sample image".into(),
        bytes: size,
        elapsed: started.elapsed(),
        check: format!(
            "{} runs: {} data, {} zeroes, {} holes",
            layout.runs,
            units::size(layout.data),
            units::size(layout.zero_data),
            units::size(layout.holes)
        ),
    });
    let src_server = QemuNbd::start(&sample, dir.join("src.sock"), true).await?;

    // Map over NBD: the server's view must agree with the file's own SEEK_DATA view.
    let started = Instant::now();
    let mut opts = src_server.options();
    opts.meta_contexts = vec![CONTEXT_BASE_ALLOCATION.into()];
    let client = Client::connect(&opts, 1)
        .await
        .context("connecting to qemu-nbd")?;
    let extents = client
        .block_status(CONTEXT_BASE_ALLOCATION, 0, size)
        .await?;
    client.disconnect().await;
    let file = std::fs::File::open(&sample)?;
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
        name: "map over NBD".into(),
        bytes: size,
        elapsed: started.elapsed(),
        check: format!(
            "{} extents, {} data: matches SEEK_DATA",
            extents.len(),
            units::size(nbd_data)
        ),
    });
    let data = local_data;

    // file -> file
    let out = dir.join("file-to-file.raw");
    let started = Instant::now();
    let stats = run_copy(
        Arc::new(FileEndpoint::open_source(&sample, false)?),
        Arc::new(FileEndpoint::open_destination(&out, Some(size), false)?),
    )
    .await?;
    steps.push(Step::copied(
        "file -> file",
        &stats,
        started,
        verify(&sample, &out, data, true)?,
    ));

    // file -> NBD (a writable qemu-nbd over an empty file)
    let target = dir.join("file-to-nbd.raw");
    std::fs::File::create(&target)?.set_len(size)?;
    let server = QemuNbd::start(&target, dir.join("dst1.sock"), false).await?;
    let started = Instant::now();
    let stats = run_copy(
        Arc::new(FileEndpoint::open_source(&sample, false)?),
        nbd_endpoint(&server, false).await?,
    )
    .await?;
    drop(server);
    steps.push(Step::copied(
        "file -> NBD",
        &stats,
        started,
        verify(&sample, &target, data, true)?,
    ));

    // NBD -> file
    let out = dir.join("nbd-to-file.raw");
    let started = Instant::now();
    let stats = run_copy(
        nbd_endpoint(&src_server, true).await?,
        Arc::new(FileEndpoint::open_destination(&out, Some(size), false)?),
    )
    .await?;
    steps.push(Step::copied(
        "NBD -> file",
        &stats,
        started,
        verify(&sample, &out, data, true)?,
    ));

    // NBD -> NBD
    let target = dir.join("nbd-to-nbd.raw");
    std::fs::File::create(&target)?.set_len(size)?;
    let server = QemuNbd::start(&target, dir.join("dst2.sock"), false).await?;
    let started = Instant::now();
    let stats = run_copy(
        nbd_endpoint(&src_server, true).await?,
        nbd_endpoint(&server, false).await?,
    )
    .await?;
    drop(server);
    steps.push(Step::copied(
        "NBD -> NBD",
        &stats,
        started,
        verify(&sample, &target, data, true)?,
    ));

    // file -> qcow2 and back, through socket-activated qemu-nbd subprocesses.
    let qcow2 = dir.join("sample.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg(size.to_string())
        .status()
        .context("running qemu-img (install qemu-utils)")?;
    ensure!(status.success(), "qemu-img create failed: {status}");
    let qemu_nbd = |read_only: bool| {
        let mut argv = vec!["qemu-nbd".to_string(), "-f".into(), "qcow2".into()];
        if read_only {
            argv.push("--read-only".into());
        }
        argv.push(qcow2.display().to_string());
        argv
    };
    let template = nbd_endpoint_options(Path::new(""));
    let started = Instant::now();
    let stats = run_copy(
        Arc::new(FileEndpoint::open_source(&sample, false)?),
        Arc::new(SubprocessEndpoint::start(&qemu_nbd(false), &template, true).await?),
    )
    .await?;
    let qcow2_size = std::fs::metadata(&qcow2)?.len();
    steps.push(Step::copied(
        "file -> [ qemu-nbd qcow2 ]",
        &stats,
        started,
        format!("qcow2 file {}", units::size(qcow2_size)),
    ));
    let out = dir.join("qcow2-to-file.raw");
    let started = Instant::now();
    let stats = run_copy(
        Arc::new(SubprocessEndpoint::start(&qemu_nbd(true), &template, true).await?),
        Arc::new(FileEndpoint::open_destination(&out, Some(size), false)?),
    )
    .await?;
    steps.push(Step::copied(
        "[ qemu-nbd qcow2 ] -> file",
        &stats,
        started,
        verify(&sample, &out, data, true)?,
    ));

    // file -> pipe -> file: two copies running at once, joined by a pipe.
    let out = dir.join("pipe-to-file.raw");
    let (reader, writer) = std::io::pipe()?;
    let reader = std::fs::File::from(std::os::fd::OwnedFd::from(reader));
    let writer = std::fs::File::from(std::os::fd::OwnedFd::from(writer));
    let started = Instant::now();
    let into_pipe = run_copy(
        Arc::new(FileEndpoint::open_source(&sample, false)?),
        Arc::new(PipeEndpoint::from_file("pipe", writer, false)),
    );
    let from_pipe = run_copy(
        Arc::new(PipeEndpoint::from_file("pipe", reader, true)),
        Arc::new(FileEndpoint::open_destination(&out, None, false)?),
    );
    let (sent, stats) = tokio::try_join!(into_pipe, from_pipe)?;
    ensure!(
        sent.size == stats.size,
        "pipe carried {} of {} bytes",
        stats.size,
        sent.size
    );
    steps.push(Step::copied(
        "file -> pipe -> file",
        &stats,
        started,
        verify(&sample, &out, data, true)?,
    ));

    // file -> null:
    let started = Instant::now();
    let stats = run_copy(
        Arc::new(FileEndpoint::open_source(&sample, false)?),
        Arc::new(NullEndpoint::default()),
    )
    .await?;
    let check = format!("read {}", units::size(stats.bytes_read));
    steps.push(Step::copied("file -> null:", &stats, started, check));
    drop(src_server);

    // file -> ferry serve -> file, over HTTP the way an imageio client moves images.
    steps.extend(serve_step::round_trip(dir, &sample, size, data).await?);

    println!(
        "{:<28} {:>10} {:>9} {:>12}  check",
        "step", "bytes", "time", "throughput"
    );
    for s in &steps {
        println!(
            "{:<28} {:>10} {:>8.3}s {:>12}  {}",
            s.name,
            units::size(s.bytes),
            s.elapsed.as_secs_f64(),
            units::rate(s.bytes, s.elapsed.as_secs_f64()),
            s.check
        );
    }
    Ok(())
}

impl Step {
    fn copied(name: &str, stats: &Stats, started: Instant, check: String) -> Step {
        Step {
            name: name.into(),
            bytes: stats.size,
            elapsed: started.elapsed(),
            check,
        }
    }
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

/// The `ferry serve` step: the sample goes up to an in-process server over plain HTTP and comes
/// back down, through the copy engine's imageio endpoints (streamed PUTs, PATCH zero, ranged
/// GETs), the way `ferry copy FILE https://…/images/TICKET` moves images.
mod serve_step {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Instant;

    use anyhow::Context;
    use disk::Endpoint;
    use disk::file::FileEndpoint;
    use serde_json::json;
    use server::{Server, ServerConfig, TicketSpec, TicketStore};

    use super::{Step, run_copy, verify};

    /// Serves a new raw file over plain HTTP on a free loopback port (a write ticket to upload,
    /// a read ticket to download), copies the sample into it, copies it back into another new
    /// file, and verifies both against the sample. One table row per direction.
    pub(super) async fn round_trip(
        dir: &Path,
        sample: &Path,
        size: u64,
        data: u64,
    ) -> anyhow::Result<[Step; 2]> {
        let target = dir.join("http-upload.raw");
        std::fs::File::create(&target)?.set_len(size)?;
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".into(),
            tls: None,
            local_socket: None,
            control: None,
            ..ServerConfig::default()
        };
        let server = Server::start(cfg, Arc::new(TicketStore::new()))
            .await
            .context("starting ferry serve")?;
        let url = format!("file://{}", target.display());
        for (id, ops) in [("demo-upload", ["write"]), ("demo-download", ["read"])] {
            // sparse: zeroing punches holes, so the upload stays as sparse as the sample.
            let doc = json!({"uuid": id, "size": size, "ops": ops, "timeout": 300, "url": url,
                "sparse": true});
            server
                .store()
                .add(TicketSpec::from_json(doc.to_string().as_bytes())?);
        }
        let base = format!("http://{}/images", server.remote_addr());
        let http = |write| imageio::HttpOptions {
            write,
            ..imageio::HttpOptions::default()
        };

        let started = Instant::now();
        let src: Arc<dyn Endpoint> = Arc::new(FileEndpoint::open_source(sample, false)?);
        let dst: Arc<dyn Endpoint> =
            Arc::new(imageio::open(&format!("{base}/demo-upload"), &http(true)).await?);
        let stats = run_copy(src, dst).await?;
        let up = Step {
            name: "file -> ferry serve (HTTP)".into(),
            bytes: size,
            elapsed: started.elapsed(),
            check: format!(
                "{}; {} MiB sent",
                verify(sample, &target, data, true)?,
                stats.bytes_written >> 20
            ),
        };

        let out = dir.join("http-download.raw");
        let started = Instant::now();
        let src: Arc<dyn Endpoint> =
            Arc::new(imageio::open(&format!("{base}/demo-download"), &http(false)).await?);
        let dst: Arc<dyn Endpoint> =
            Arc::new(FileEndpoint::open_destination(&out, Some(size), false)?);
        let stats = run_copy(src, dst).await?;
        let down = Step {
            name: "ferry serve (HTTP) -> file".into(),
            bytes: size,
            elapsed: started.elapsed(),
            check: format!(
                "{}; {} MiB received",
                verify(sample, &out, data, true)?,
                stats.bytes_read >> 20
            ),
        };
        drop(server);
        Ok([up, down])
    }
}
