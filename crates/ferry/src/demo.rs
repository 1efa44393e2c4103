//! `ferry demo`: the main job on an embedded default. It makes a sample sparse image (random
//! data, zeroes written as data, holes) in a temporary directory, checks ferry's NBD map of it
//! against the file's own extents, then copies it through every endpoint kind ferry has —
//! file, NBD (qemu-nbd), qcow2 (ferry's own writer and reader, cross-checked with
//! socket-activated qemu-nbd), pipes, `null:`, and up to and back down from
//! an in-process `ferry serve` over HTTP — verifying every result byte for byte (and for
//! sparseness where the destination can be sparse), and prints a table.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use copy::{Cancel, Progress, Stats};
use disk::Endpoint;
use disk::pipe::PipeEndpoint;
use disk::subprocess::Subprocess;
use endpoints::{OpenOptions, Role, Spec};
use nbd::proto::consts::{CONTEXT_BASE_ALLOCATION, STATE_ZERO};
use nbd::uri::NbdUri;
use nbd::{Client, ConnectOptions};
use sample::{Layout, Segment};

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

/// The seed of the sample's layout and data, so every run builds the same image.
const SAMPLE_SEED: u64 = 0x5eed_f0e1_2026;

/// A qemu-nbd serving one raw file on a private Unix socket, started by socket activation
/// (the launcher of `[ CMD … ]` endpoints); stopped when dropped.
struct QemuNbd {
    process: Subprocess,
}

impl QemuNbd {
    fn start(image: &Path, read_only: bool) -> anyhow::Result<Self> {
        // The launcher runs any command; say what to install when this one is missing.
        std::process::Command::new("qemu-nbd")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .context("starting qemu-nbd (install qemu-utils)")?;
        let mut argv: Vec<String> = ["qemu-nbd", "-f", "raw", "--persistent", "--shared=4"]
            .map(String::from)
            .into();
        argv.push(if read_only {
            "--read-only".into()
        } else {
            // Let WRITE_ZEROES punch holes, so zero runs stay sparse in the copy.
            "--discard=unmap".into()
        });
        argv.push(image.display().to_string());
        Ok(QemuNbd {
            process: Subprocess::spawn(&argv)?,
        })
    }

    fn uri(&self) -> anyhow::Result<NbdUri> {
        let uri = format!("nbd+unix:///?socket={}", self.process.socket().display());
        Ok(uri.parse()?)
    }

    fn spec(&self) -> anyhow::Result<Spec> {
        Ok(Spec::Nbd(self.uri()?))
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

/// Opens `spec` as `ferry copy` would by default.
async fn open(spec: &Spec, role: Role) -> anyhow::Result<Arc<dyn Endpoint>> {
    Ok(endpoints::open(spec, role, &OpenOptions::default())
        .await?
        .endpoint)
}

/// Opens both sides and copies as `ferry copy` does by default.
async fn copy_specs(src: &Spec, dst: &Spec, size: u64) -> anyhow::Result<Stats> {
    let src = open(src, Role::Source).await?;
    let dst = open(dst, Role::Destination { size: Some(size) }).await?;
    run_copy(src, dst).await
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
    let layout = Layout::random(SAMPLE_SEED, size);
    sample::write_image(&sample, &layout).context("writing the sample image")?;
    let total = |f: fn(&Segment) -> bool| -> u64 {
        layout
            .segments()
            .iter()
            .filter(|s| f(s))
            .map(Segment::len)
            .sum()
    };
    steps.push(Step {
        name: "make sample image".into(),
        bytes: size,
        elapsed: started.elapsed(),
        check: format!(
            "{} runs: {} data, {} zeroes, {} holes",
            layout.segments().len(),
            units::size(total(|s| matches!(s, Segment::Data { .. }))),
            units::size(total(|s| matches!(s, Segment::Zero(_)))),
            units::size(total(|s| matches!(s, Segment::Hole(_))))
        ),
    });
    let sample_spec = Spec::Path(sample.clone());
    let src_server = QemuNbd::start(&sample, true)?;

    // Map over NBD: the server's view must agree with the file's own SEEK_DATA view.
    let started = Instant::now();
    let mut opts = ConnectOptions::from_uri(&src_server.uri()?);
    opts.settings.meta_contexts = vec![CONTEXT_BASE_ALLOCATION.into()];
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
    let stats = copy_specs(&sample_spec, &Spec::Path(out.clone()), size).await?;
    steps.push(Step::copied(
        "file -> file",
        &stats,
        started,
        verify(&sample, &out, data, true)?,
    ));

    // file -> NBD (a writable qemu-nbd over an empty file)
    let target = dir.join("file-to-nbd.raw");
    std::fs::File::create(&target)?.set_len(size)?;
    let server = QemuNbd::start(&target, false)?;
    let started = Instant::now();
    let stats = copy_specs(&sample_spec, &server.spec()?, size).await?;
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
    let stats = copy_specs(&src_server.spec()?, &Spec::Path(out.clone()), size).await?;
    steps.push(Step::copied(
        "NBD -> file",
        &stats,
        started,
        verify(&sample, &out, data, true)?,
    ));

    // NBD -> NBD
    let target = dir.join("nbd-to-nbd.raw");
    std::fs::File::create(&target)?.set_len(size)?;
    let server = QemuNbd::start(&target, false)?;
    let started = Instant::now();
    let stats = copy_specs(&src_server.spec()?, &server.spec()?, size).await?;
    drop(server);
    steps.push(Step::copied(
        "NBD -> NBD",
        &stats,
        started,
        verify(&sample, &target, data, true)?,
    ));

    // file -> qcow2 and back with ferry's own writer and reader.
    let native = dir.join("native.qcow2");
    let started = Instant::now();
    let src = open(&sample_spec, Role::Source).await?;
    let written = crate::qcow2_out::write_file(
        src.clone(),
        &native,
        crate::qcow2_out::DEFAULT_CLUSTER,
        None,
    )
    .await?;
    src.close().await?;
    steps.push(Step {
        name: "file -> qcow2 (native)".into(),
        bytes: written.size,
        elapsed: started.elapsed(),
        check: format!(
            "qcow2 file {}, {} of data clusters",
            units::size(written.image),
            units::size(written.data)
        ),
    });
    let qcow2_source = |path: &Path| {
        let opts = OpenOptions {
            src_format: endpoints::Format::Qcow2,
            ..OpenOptions::default()
        };
        let spec = Spec::Path(path.to_path_buf());
        async move { anyhow::Ok(endpoints::open(&spec, Role::Source, &opts).await?.endpoint) }
    };
    let out = dir.join("native-qcow2-to-file.raw");
    let started = Instant::now();
    let dst = open(
        &Spec::Path(out.clone()),
        Role::Destination { size: Some(size) },
    )
    .await?;
    let stats = run_copy(qcow2_source(&native).await?, dst).await?;
    steps.push(Step::copied(
        "qcow2 (native) -> file",
        &stats,
        started,
        verify(&sample, &out, data, true)?,
    ));

    // The same through qemu: socket-activated qemu-nbd subprocesses write an image ferry
    // reads natively, and read the image ferry wrote; all must equal the sample.
    let qcow2 = dir.join("sample.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg(size.to_string())
        .status()
        .context("running qemu-img (install qemu-utils)")?;
    ensure!(status.success(), "qemu-img create failed: {status}");
    let qemu_nbd = |image: &Path, read_only: bool| {
        let mut argv = vec!["qemu-nbd".to_string(), "-f".into(), "qcow2".into()];
        if read_only {
            argv.push("--read-only".into());
        }
        argv.push(image.display().to_string());
        Spec::Command(argv)
    };
    let started = Instant::now();
    let stats = copy_specs(&sample_spec, &qemu_nbd(&qcow2, false), size).await?;
    let qcow2_size = std::fs::metadata(&qcow2)?.len();
    steps.push(Step::copied(
        "file -> [ qemu-nbd qcow2 ]",
        &stats,
        started,
        format!("qcow2 file {}", units::size(qcow2_size)),
    ));
    let out = dir.join("qemu-reads-native.raw");
    let started = Instant::now();
    let stats = copy_specs(&qemu_nbd(&native, true), &Spec::Path(out.clone()), size).await?;
    steps.push(Step::copied(
        "[ qemu-nbd native ] -> file",
        &stats,
        started,
        format!("{}; agrees with native", verify(&sample, &out, data, true)?),
    ));
    let out = dir.join("native-reads-qemu.raw");
    let started = Instant::now();
    let dst = open(
        &Spec::Path(out.clone()),
        Role::Destination { size: Some(size) },
    )
    .await?;
    let stats = run_copy(qcow2_source(&qcow2).await?, dst).await?;
    steps.push(Step::copied(
        "qemu qcow2 (native) -> file",
        &stats,
        started,
        format!("{}; agrees with qemu", verify(&sample, &out, data, true)?),
    ));

    // file -> pipe -> file: two copies running at once, joined by a pipe.
    let out = dir.join("pipe-to-file.raw");
    let (reader, writer) = std::io::pipe()?;
    let reader = std::fs::File::from(std::os::fd::OwnedFd::from(reader));
    let writer = std::fs::File::from(std::os::fd::OwnedFd::from(writer));
    let started = Instant::now();
    let into_pipe = run_copy(
        open(&sample_spec, Role::Source).await?,
        Arc::new(PipeEndpoint::from_file("pipe", writer, false)),
    );
    let from_pipe = run_copy(
        Arc::new(PipeEndpoint::from_file("pipe", reader, true)),
        open(&Spec::Path(out.clone()), Role::Destination { size: None }).await?,
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
    let stats = copy_specs(&sample_spec, &Spec::Null, size).await?;
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
    use endpoints::Spec;
    use serde_json::json;
    use server::{Server, ServerConfig, TicketSpec, TicketStore};

    use super::{Step, copy_specs, verify};

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
        let sample_spec = Spec::Path(sample.to_path_buf());

        let started = Instant::now();
        let upload = Spec::parse(&format!("{base}/demo-upload"))?;
        let stats = copy_specs(&sample_spec, &upload, size).await?;
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
        let download = Spec::parse(&format!("{base}/demo-download"))?;
        let stats = copy_specs(&download, &Spec::Path(out.clone()), size).await?;
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
