//! Opening a [`Spec`] as a source or a destination, with the user's connection options applied
//! the same way for every command.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use disk::file::FileEndpoint;
use disk::nbd::NbdEndpoint;
use disk::null::NullEndpoint;
use disk::pipe::PipeEndpoint;
use disk::qcow2::Qcow2Endpoint;
use disk::retry::RetryPolicy;
use disk::subprocess::SubprocessEndpoint;
use disk::{DiskError, Endpoint, Op};
use nbd::proto::consts::CONTEXT_DIRTY_BITMAP_PREFIX;
use nbd::uri::NbdUri;
use nbd::{ClientSettings, ConnectOptions};

use crate::{Error, Spec};

/// How NBD servers are reached: the TLS flags that refine an `nbds` URI, and client settings.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// PEM file of CA certificates that sign the server's certificate.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and its key, for servers that verify clients.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Encrypt but do not verify the server's certificate.
    pub tls_no_verify: bool,
    /// How long a silent server is waited for.
    pub timeout: Duration,
    /// How long connecting and the handshake may take (at most `timeout`).
    pub connect_timeout: Duration,
    /// Requests each connection keeps in flight (`None`: the client's default).
    pub max_in_flight: Option<usize>,
    /// A dirty bitmap to select on a source (`qemu:dirty-bitmap:NAME`), for incremental copies.
    pub bitmap: Option<String>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            tls_ca: None,
            tls_client: None,
            tls_no_verify: false,
            timeout: nbd::client::DEFAULT_TIMEOUT,
            connect_timeout: nbd::client::DEFAULT_CONNECT_TIMEOUT,
            max_in_flight: None,
            bitmap: None,
        }
    }
}

impl NbdOptions {
    fn tls_flags(&self) -> bool {
        self.tls_ca.is_some() || self.tls_client.is_some() || self.tls_no_verify
    }

    /// Client settings, wherever the server is.
    pub fn settings(&self) -> ClientSettings {
        let timeout = self.timeout.max(Duration::from_secs(1));
        let mut settings = ClientSettings {
            timeout,
            handshake_timeout: Some(self.connect_timeout.clamp(Duration::from_secs(1), timeout)),
            ..ClientSettings::default()
        };
        if let Some(n) = self.max_in_flight {
            settings.max_in_flight = n.max(1);
        }
        settings
    }

    /// Connection options for `uri` with these options applied. TLS flags need an `nbds` URI.
    pub fn connect_options(&self, uri: &NbdUri) -> Result<ConnectOptions, Error> {
        let mut opts = ConnectOptions::from_uri(uri);
        opts.settings = self.settings();
        match &mut opts.tls {
            Some(tls) => {
                if let Some(ca) = &self.tls_ca {
                    tls.ca_file = Some(ca.clone());
                }
                if let Some((cert, key)) = &self.tls_client {
                    tls.client_cert = Some(cert.clone());
                    tls.client_key = Some(key.clone());
                }
                if self.tls_no_verify {
                    tls.verify_peer = false;
                }
            }
            None if self.tls_flags() => {
                return Err(Error::Usage(format!(
                    "TLS options need an nbds:// or nbds+unix:// URI, not {uri}"
                )));
            }
            None => {}
        }
        Ok(opts)
    }

    /// Settings with the source's dirty bitmap selected, when there is one.
    fn with_bitmap(&self, mut settings: ClientSettings, role: Role) -> ClientSettings {
        if let (Role::Source, Some(bitmap)) = (role, &self.bitmap) {
            settings
                .meta_contexts
                .push(format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{bitmap}"));
        }
        settings
    }
}

/// How HTTP servers are reached.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// PEM file of CA certificates that sign an https server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Do not verify an https server's certificate (the connection is still encrypted).
    pub insecure: bool,
    /// Use the Unix socket an imageio server on this host offers.
    pub unix_socket: bool,
    /// How long connecting may take, and a server may stay silent.
    pub deadlines: imageio::Deadlines,
    /// Compress upload bodies for servers that take them (`ferry serve`).
    pub compression: imageio::WireCompression,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            ca_file: None,
            insecure: false,
            unix_socket: true,
            deadlines: imageio::Deadlines::default(),
            compression: imageio::WireCompression::Off,
        }
    }
}

/// How a source file's bytes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// As they are (nbdcopy's and the default: a qcow2 file is copied as its bytes).
    #[default]
    Raw,
    /// As the disk a qcow2 image holds, its backing chain followed as qemu-img follows it.
    Qcow2,
    /// qcow2 when the file starts with qcow2's magic, raw otherwise. A probed image is never
    /// allowed a backing file: a raw disk whose guest wrote a qcow2 header at its start must not
    /// make ferry open files the user did not name (qemu's probing did, CVE-2008-2004). Such an
    /// image needs `qcow2` said explicitly.
    Auto,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "auto" => Ok(Format::Auto),
            _ => Err(format!("'{s}': expecting raw, qcow2 or auto")),
        }
    }
}

/// qcow2's magic, the first four bytes of every image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Does the file start with qcow2's magic? (What `Format::Auto` decides by.)
pub fn looks_like_qcow2(path: &Path) -> Result<bool, DiskError> {
    use std::io::Read;
    let name = path.display().to_string();
    let mut f = std::fs::File::open(path).map_err(|e| DiskError::from_io(&name, Op::Open, &e))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == QCOW2_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(DiskError::from_io(&name, Op::Open, &e)),
    }
}

/// Everything a command says about how to open its endpoints.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub nbd: NbdOptions,
    pub http: HttpSettings,
    /// Most connections to one server (NBD with multi-conn, imageio readers or writers).
    pub connections: usize,
    /// O_DIRECT for local files and block devices.
    pub direct: bool,
    /// An incremental copy: a source offers what changed (an NBD bitmap, imageio's dirty
    /// context), and an existing destination file is updated in place, never truncated.
    pub incremental: bool,
    /// An existing destination file is opened as it is, never truncated (a resumed copy).
    pub existing_destination: bool,
    /// Ask a source for its extents. (A destination is always asked where it can answer: what
    /// already reads as zero need not be zeroed again.)
    pub extents: bool,
    /// How requests of NBD and HTTP endpoints that fail on the way are sent again.
    pub retry: RetryPolicy,
    /// How a source that is a local file or block device is read.
    pub src_format: Format,
    /// A persistent dirty bitmap of a source opened as qcow2, for an incremental copy (an NBD
    /// source's bitmap is selected through `nbd.bitmap`).
    pub qcow2_bitmap: Option<String>,
    /// Local files do their syscalls in the task that asks (see `disk::FileEndpoint::inline_io`):
    /// right for the commands, which run one job each; a server opening files keeps them off
    /// its runtime.
    pub inline_io: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            nbd: NbdOptions::default(),
            http: HttpSettings::default(),
            connections: 4,
            direct: false,
            inline_io: true,
            incremental: false,
            existing_destination: false,
            extents: true,
            retry: RetryPolicy::default(),
            src_format: Format::Raw,
            qcow2_bitmap: None,
        }
    }
}

/// Which side of a copy an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    /// `size` is the source's, when known: a new file destination gets it.
    Destination {
        size: Option<u64>,
    },
}

/// An open endpoint.
pub struct Opened {
    pub endpoint: Arc<dyn Endpoint>,
    /// The same endpoint when it is HTTP, for what only its server tells or does (what it
    /// offers, dirty extents, its own checksum).
    pub http: Option<Arc<imageio::HttpEndpoint>>,
}

impl Opened {
    /// What an HTTP endpoint's server offers and how many connections it uses, in one line.
    pub fn http_summary(&self) -> Option<String> {
        let ep = self.http.as_ref()?;
        let info = ep.server();
        Some(format!(
            "{} features={} max_readers={:?} max_writers={:?} via {}, {} connections",
            if info.imageio { "imageio" } else { "http" },
            info.features.join(","),
            info.max_readers,
            info.max_writers,
            info.transport,
            ep.connections()
        ))
    }

    fn plain(endpoint: Arc<dyn Endpoint>) -> Opened {
        Opened {
            endpoint,
            http: None,
        }
    }
}

/// Opens `spec` as `role`.
pub async fn open(spec: &Spec, role: Role, opts: &OpenOptions) -> Result<Opened, Error> {
    let source = role == Role::Source;
    let extents = !source || opts.extents;
    let connections = opts.connections.max(1);
    let endpoint: Arc<dyn Endpoint> = match spec {
        Spec::Http(url) => {
            let http = imageio::HttpOptions {
                ca_file: opts.http.ca_file.clone(),
                insecure: opts.http.insecure,
                connections,
                write: !source,
                unix_socket: opts.http.unix_socket,
                dirty: source && opts.incremental,
                retry: opts.retry,
                deadlines: opts.http.deadlines,
                compression: opts.http.compression,
            };
            let ep = Arc::new(imageio::open(url, &http).await?);
            return Ok(Opened {
                endpoint: ep.clone(),
                http: Some(ep),
            });
        }
        Spec::Nbd(uri) => {
            let mut connect = opts.nbd.connect_options(uri)?;
            connect.settings = opts.nbd.with_bitmap(connect.settings, role);
            Arc::new(
                NbdEndpoint::connect(&uri.to_string(), &connect, connections, extents)
                    .await?
                    .with_retry(opts.retry),
            )
        }
        Spec::Command(argv) => {
            let settings = opts.nbd.with_bitmap(opts.nbd.settings(), role);
            Arc::new(SubprocessEndpoint::start(argv, &settings, extents).await?)
        }
        Spec::Null if source => {
            return Err(Error::Usage("null: can only be a destination".into()));
        }
        Spec::Null => Arc::new(NullEndpoint::default()),
        Spec::Stdio if source => Arc::new(PipeEndpoint::stdin()),
        Spec::Stdio => Arc::new(PipeEndpoint::stdout()?),
        Spec::Path(path) => open_path(path, role, opts)?,
    };
    Ok(Opened::plain(endpoint))
}

fn open_path(path: &Path, role: Role, opts: &OpenOptions) -> Result<Arc<dyn Endpoint>, DiskError> {
    let name = path.display().to_string();
    let stream = std::fs::metadata(path).ok().is_some_and(|m| {
        let t = m.file_type();
        t.is_fifo() || t.is_socket() || t.is_char_device()
    });
    let source = role == Role::Source;
    if stream && source && opts.qcow2_bitmap.is_some() {
        return Err(DiskError::new(
            &name,
            Op::Open,
            disk::ErrorKind::Unsupported,
            "a persistent dirty bitmap needs a qcow2 image file, not a stream",
        ));
    }
    if stream {
        let file = std::fs::OpenOptions::new()
            .read(source)
            .write(!source)
            .open(path)
            .map_err(|e| DiskError::from_io(&name, Op::Open, &e))?;
        return Ok(Arc::new(PipeEndpoint::from_file(&name, file, source)));
    }
    let qcow2 = match (role, opts.src_format) {
        (Role::Source, Format::Qcow2) => Some(Qcow2Endpoint::open(path, true)?),
        (Role::Source, Format::Auto) if looks_like_qcow2(path)? => {
            Some(Qcow2Endpoint::open(path, false).map_err(|mut e| {
                if e.cause.contains("backing") {
                    e.cause.push_str(
                        " (a probed image may not name other files; saying the \
                         format is qcow2 follows its backing chain: --src-format qcow2, \
                         or --format qcow2 for nbd-server)",
                    );
                }
                e
            })?)
        }
        _ => None,
    };
    if let Some(mut image) = qcow2 {
        if opts.inline_io {
            image = image.inline_io();
        }
        return Ok(Arc::new(match &opts.qcow2_bitmap {
            Some(bitmap) => image.with_bitmap(bitmap)?,
            None => image,
        }));
    }
    let inline = |ep: FileEndpoint| if opts.inline_io { ep.inline_io() } else { ep };
    Ok(match role {
        Role::Source if opts.qcow2_bitmap.is_some() => {
            // Only a qcow2 image keeps bitmaps: copying the whole file instead would be wrong.
            return Err(DiskError::new(
                &name,
                Op::Open,
                disk::ErrorKind::Unsupported,
                "a persistent dirty bitmap needs a qcow2 image, and this file is read as raw",
            ));
        }
        Role::Source => Arc::new(inline(FileEndpoint::open_source(path, opts.direct)?)),
        // The previous copy is updated in place: never truncated.
        Role::Destination { .. } if opts.incremental || opts.existing_destination => {
            Arc::new(inline(FileEndpoint::open_existing(path, opts.direct)?))
        }
        Role::Destination { size } => Arc::new(inline(FileEndpoint::open_destination(
            path,
            size,
            opts.direct,
        )?)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_flags_need_an_nbds_uri() {
        let opts = NbdOptions {
            tls_no_verify: true,
            ..NbdOptions::default()
        };
        let plain: NbdUri = "nbd://localhost/x".parse().unwrap();
        let e = opts.connect_options(&plain).unwrap_err();
        assert!(e.is_usage());
        assert_eq!(
            e.to_string(),
            "TLS options need an nbds:// or nbds+unix:// URI, not nbd://localhost/x"
        );
        let tls: NbdUri = "nbds://localhost/x".parse().unwrap();
        let c = opts.connect_options(&tls).unwrap();
        assert!(!c.tls.unwrap().verify_peer);
    }

    #[test]
    fn a_bitmap_is_selected_on_sources_only() {
        let opts = NbdOptions {
            bitmap: Some("b0".into()),
            max_in_flight: Some(128),
            ..NbdOptions::default()
        };
        let src = opts.with_bitmap(opts.settings(), Role::Source);
        assert_eq!(src.meta_contexts, ["qemu:dirty-bitmap:b0"]);
        assert_eq!(src.max_in_flight, 128);
        let dst = opts.with_bitmap(opts.settings(), Role::Destination { size: None });
        assert!(dst.meta_contexts.is_empty());
    }

    #[tokio::test]
    async fn paths_open_as_files_pipes_or_updated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![1u8; 8192]).unwrap();
        let spec = Spec::Path(image.clone());
        let src = open(&spec, Role::Source, &OpenOptions::default())
            .await
            .unwrap();
        assert_eq!(src.endpoint.caps().size, Some(8192));
        assert!(src.http.is_none() && src.http_summary().is_none());

        // Incremental: the destination keeps its size and content.
        let opts = OpenOptions {
            incremental: true,
            ..OpenOptions::default()
        };
        let dst = open(&spec, Role::Destination { size: Some(4096) }, &opts)
            .await
            .unwrap();
        assert_eq!(dst.endpoint.caps().size, Some(8192));
        // A new copy is truncated to the source's size.
        let dst = open(
            &spec,
            Role::Destination { size: Some(4096) },
            &OpenOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(dst.endpoint.caps().size, Some(4096));

        // A character device is a stream.
        let null = open(
            &Spec::Path("/dev/null".into()),
            Role::Source,
            &OpenOptions::default(),
        )
        .await
        .unwrap();
        assert!(null.endpoint.caps().sequential);
        assert!(null.endpoint.caps().size.is_none());

        let e = open(&Spec::Null, Role::Source, &OpenOptions::default())
            .await
            .err()
            .unwrap();
        assert!(e.is_usage(), "{e}");
    }
}
