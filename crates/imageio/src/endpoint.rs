//! [`HttpEndpoint`]: an imageio transfer URL or a plain HTTP(S) image as a copy endpoint.
//!
//! Opening probes the server once: `OPTIONS` tells an imageio server (features, writers,
//! readers, its Unix socket) from a plain web server; the size comes from OPTIONS (ferry's
//! server reports it), else from the extents, else from a one-byte ranged GET. Every request
//! may be repeated and is retried under `disk::retry` when its connection breaks or the server
//! answers 5xx (`request`); uploads go as PUT runs (`upload`, `stream`). Errors carry the HTTP
//! status and the server's message.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use disk::retry::RetryPolicy;
use disk::sink::{Sink, SinkOptions};
use disk::{BoxFut, Caps, DiskError, Endpoint, ErrorKind, Extent, Op, StreamReader};
use http::{Method, StatusCode, header};
use http_body_util::BodyExt;

use crate::body::ReqBody;
use crate::compress::{Policy, WireCompression};
use crate::request::{Fail, Shared, content_range, content_range_total, status_error};
use crate::stream::{RunReader, RunWriter};
pub use crate::transport::Deadlines;
use crate::transport::{Pool, Transport};
use crate::upload::RunSink;
use crate::url::HttpUrl;

/// Largest PUT or GET for a single `write` or `read` call (streamed runs have no limit).
const MAX_REQUEST: u64 = 8 << 20;
/// Zero requests are split so that none runs for minutes on a slow server.
const MAX_ZERO: u64 = 1 << 30;
/// Extents are fetched for at least this much of the image at a time (servers that only
/// know whole-image extents answer with everything, which is cached too).
const EXTENTS_WINDOW: u64 = 4 << 30;

/// How to reach the server and how much of it to use.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// PEM file of CA certificates that sign the server's certificate (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// Skip certificate verification (the session is still encrypted).
    pub insecure: bool,
    /// Most connections to use; the server's `max_readers`/`max_writers` lower it.
    pub connections: usize,
    /// The endpoint will be written (decides between the server's writer and reader limits).
    pub write: bool,
    /// Use the Unix socket an imageio server on this host advertises.
    pub unix_socket: bool,
    /// The copy is incremental: the server's dirty extents say what changed.
    pub dirty: bool,
    /// How requests that fail on the way (connections, 5xx) are retried.
    pub retry: RetryPolicy,
    /// Deadlines for opening a connection and for a server that stops moving bytes.
    pub deadlines: Deadlines,
    /// Compress upload bodies, when the server takes them compressed.
    pub compression: WireCompression,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            ca_file: None,
            insecure: false,
            connections: 4,
            write: false,
            unix_socket: true,
            dirty: false,
            retry: RetryPolicy::default(),
            deadlines: Deadlines::default(),
            compression: WireCompression::Off,
        }
    }
}

/// What the server said it can do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// It answered OPTIONS like an imageio server (or like an old one, for `/images/` URLs).
    pub imageio: bool,
    pub features: Vec<String>,
    pub max_readers: Option<u64>,
    pub max_writers: Option<u64>,
    pub unix_socket: Option<String>,
    pub writable: bool,
    /// The server honours Range (plain servers may not).
    pub ranges: bool,
    /// Where connections go after the probe (`unix …` when the local socket is used).
    pub transport: String,
    /// Body encodings the server takes on PUT (ferry's OPTIONS extension).
    pub encodings: Vec<String>,
}

impl ServerInfo {
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// Extents cached from the last query of one context, covering [start, end) contiguously;
/// the flag is the dirty bit (dirty context only).
#[derive(Default)]
struct ExtentCache {
    start: u64,
    end: u64,
    extents: Vec<(Extent, bool)>,
}

pub struct HttpEndpoint {
    shared: Arc<Shared>,
    info: ServerInfo,
    caps: Caps,
    extents: Mutex<ExtentCache>,
    dirty: Mutex<ExtentCache>,
    /// For servers without Range: the one GET that streams the image, and where it is.
    whole: Mutex<Option<(u64, RunReader)>>,
    /// Upload runs are compressed as this decides (`None`: never).
    compression: Option<Arc<Policy>>,
}

/// Connects to `url`, learns what the server offers, and returns the endpoint.
pub async fn open(url: &str, opts: &HttpOptions) -> Result<HttpEndpoint, DiskError> {
    let fail = Fail::new(url, Op::Open);
    let parsed =
        HttpUrl::parse(url).map_err(|e| fail.because(ErrorKind::InvalidRequest, e.to_string()))?;
    let tls = if parsed.tls {
        let tls = nbd::tls::TlsOptions {
            ca_file: opts.ca_file.clone(),
            client_cert: None,
            client_key: None,
            verify_peer: !opts.insecure,
            server_name: parsed.host.clone(),
        };
        let config = tls
            .client_config()
            .map_err(|e| fail.because(e.kind(), e.to_string()))?;
        let name = tls
            .server_name()
            .map_err(|e| fail.because(e.kind(), e.to_string()))?;
        Some((config, name))
    } else {
        None
    };
    let transport = Transport::Tcp {
        authority: parsed.authority(),
        tls,
    };
    let shared = Arc::new(Shared {
        name: url.to_string(),
        host: parsed.authority(),
        target: parsed.target.clone(),
        pool: Pool::new(transport.clone(), 1, opts.deadlines),
        retry: opts.retry,
    });
    let (options, allow) = probe_options(&shared, &fail).await?;
    let mut info = ServerInfo {
        transport: format!("{transport:?}"),
        ..ServerInfo::default()
    };
    let mut size = None;
    match &options {
        Some(doc) => {
            info.imageio = true;
            info.features = doc.features.clone();
            info.max_readers = doc.max_readers;
            info.max_writers = doc.max_writers;
            info.unix_socket = doc.unix_socket.clone();
            info.encodings = doc.ferry_encodings.clone();
            size = doc.size;
            // A read-only ticket's OPTIONS allows only OPTIONS and GET; without the header,
            // assume writing is allowed and let the server refuse.
            info.writable = allow
                .as_deref()
                .is_none_or(|a| a.to_ascii_uppercase().contains("PUT"));
            info.ranges = true;
        }
        None if parsed.ticket().is_some() => {
            // An old imageio server (OPTIONS → 405) or proxy (204): GET and PUT only.
            info.imageio = true;
            info.writable = true;
            info.ranges = true;
        }
        None => {}
    }
    // The probe's pool (and its connection) is kept, grown to what the server allows.
    let endpoint_for = |info: ServerInfo, size: u64, shared: Arc<Shared>| {
        let limit = if opts.write {
            info.max_writers
        } else {
            info.max_readers
        };
        // Absent limits mean one connection only (the reference client's reading).
        let connections = if info.imageio {
            (opts.connections as u64).min(limit.unwrap_or(1)).max(1) as usize
        } else {
            opts.connections.max(1)
        };
        shared.pool.grow_to(connections);
        let mut ep = HttpEndpoint::new(shared, info, size, opts.dirty);
        ep.compression = compression_policy(url, &ep.info, opts.compression);
        ep
    };
    if !info.imageio {
        let (size, ranges) = probe_plain(&shared, &fail).await?;
        info.ranges = ranges;
        info.writable = false;
        return Ok(endpoint_for(info, size, shared));
    }
    if opts.unix_socket
        && parsed.is_loopback()
        && let Some(socket) = info.unix_socket.clone().filter(|s| !s.is_empty())
    {
        let local = Transport::Unix(socket);
        match local.connect(opts.deadlines).await {
            Ok(_) => {
                info.transport = format!("{local:?}");
                shared.pool.set_transport(local);
            }
            Err(e) => tracing::debug!("not using the server's unix socket: {e}"),
        }
    }
    let mut cache = None;
    let size = match size {
        Some(size) => size,
        None if info.has("extents") => {
            let extents: Vec<Extent> = fetch_extents(&shared, "zero", 0, None, &fail)
                .await?
                .into_iter()
                .map(|(e, _)| e)
                .collect();
            let size = extents.last().map_or(0, |e| e.end());
            cache = Some(ExtentCache {
                start: 0,
                end: size,
                extents: extents.into_iter().map(|e| (e, false)).collect(),
            });
            size
        }
        None => probe_plain(&shared, &fail).await?.0,
    };
    let endpoint = endpoint_for(info, size, shared);
    if let Some(cache) = cache {
        *endpoint.extents.lock().unwrap_or_else(|p| p.into_inner()) = cache;
    }
    Ok(endpoint)
}

/// How uploads to this server are compressed: `None` for plain bytes always.
fn compression_policy(url: &str, info: &ServerInfo, mode: WireCompression) -> Option<Arc<Policy>> {
    if mode == WireCompression::Off || !info.writable {
        return None;
    }
    if !info.encodings.iter().any(|e| e == crate::compress::ZSTD) {
        tracing::warn!(
            "{url}: the server does not take zstd bodies: --wire-compression {mode} ignored, \
             uploading plain bytes"
        );
        return None;
    }
    Some(Arc::new(Policy::new(mode)))
}

/// OPTIONS: the imageio document, or `None` when the server does not answer like imageio;
/// and the `allow` header.
async fn probe_options(
    shared: &Shared,
    fail: &Fail,
) -> Result<(Option<crate::wire::Options>, Option<String>), DiskError> {
    let make = || {
        shared
            .request(Method::OPTIONS, &shared.target)
            .body(ReqBody::Empty)
            .expect("valid request")
    };
    let (resp, lease) = shared.send(make, fail).await?;
    let status = resp.status();
    if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
        return Err(status_error(resp, fail).await);
    }
    let allow = resp
        .headers()
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail.hyper(&e))?
        .to_bytes();
    lease.release();
    // A document without a `features` list is not imageio's (it fails to parse).
    let doc = serde_json::from_slice::<crate::wire::Options>(&body)
        .ok()
        .filter(|_| status == StatusCode::OK);
    Ok((doc, allow))
}

/// The size of a plain HTTP image, and whether the server honours Range.
async fn probe_plain(shared: &Shared, fail: &Fail) -> Result<(u64, bool), DiskError> {
    let make = || {
        shared
            .request(Method::GET, &shared.target)
            .header(header::RANGE, "bytes=0-0")
            .body(ReqBody::Empty)
            .expect("valid request")
    };
    let (resp, lease) = shared.send(make, fail).await?;
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {
            let total = content_range(resp.headers()).and_then(|(_, _, t)| t);
            let Some(total) = total else {
                return Err(fail.protocol("the server does not say the image's size"));
            };
            if resp.into_body().collect().await.is_ok() {
                lease.release();
            }
            Ok((total, true))
        }
        // An empty image: nothing satisfies the range.
        StatusCode::RANGE_NOT_SATISFIABLE if content_range_total(resp.headers()) == Some(0) => {
            Ok((0, true))
        }
        StatusCode::OK => {
            let len = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            // The body is the whole image: the connection is dropped rather than drained.
            match len {
                Some(len) => Ok((len, false)),
                None => Err(fail.because(
                    ErrorKind::Unsupported,
                    "the server neither honours Range nor says the image's size",
                )),
            }
        }
        _ => Err(status_error(resp, fail).await),
    }
}

/// `GET …/extents?context=zero`, limited to [start, start+len) where the server allows it.
async fn fetch_extents(
    shared: &Shared,
    context: &str,
    start: u64,
    len: Option<u64>,
    fail: &Fail,
) -> Result<Vec<(Extent, bool)>, DiskError> {
    let path = shared.target.split('?').next().unwrap_or("/");
    let target = match len {
        Some(len) => format!("{path}/extents?context={context}&start={start}&length={len}"),
        None => format!("{path}/extents?context={context}"),
    };
    let make = || {
        shared
            .request(Method::GET, &target)
            .body(ReqBody::Empty)
            .expect("valid request")
    };
    let (_, _, body) = shared.call(make, fail).await?;
    parse_items(&body).map_err(|e| fail.protocol(format!("bad extents from the server: {e}")))
}

/// The server's extents list, checked to be contiguous.
pub fn parse_extents(body: &[u8]) -> Result<Vec<Extent>, String> {
    Ok(parse_items(body)?.into_iter().map(|(e, _)| e).collect())
}

/// Extents with their dirty flag, checked to be contiguous.
fn parse_items(body: &[u8]) -> Result<Vec<(Extent, bool)>, String> {
    // Zero-context items carry `zero` (and `hole`), dirty-context items `dirty` (and `zero`
    // since imageio 2.2); one item type reads both.
    let items: Vec<crate::wire::AnyExtent> =
        serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut out: Vec<(Extent, bool)> = Vec::with_capacity(items.len());
    for item in items {
        if let Some((prev, _)) = out.last()
            && prev.end() != item.start
        {
            return Err(format!(
                "extent at {} does not follow the one ending at {}",
                item.start,
                prev.end()
            ));
        }
        if item.length == 0 {
            continue;
        }
        let extent = Extent {
            offset: item.start,
            length: item.length,
            zero: item.zero,
            hole: item.hole,
        };
        out.push((extent, item.dirty));
    }
    Ok(out)
}

impl HttpEndpoint {
    fn new(shared: Arc<Shared>, info: ServerInfo, size: u64, dirty: bool) -> HttpEndpoint {
        let mut caps = Caps::random_access(size);
        caps.read_only = !info.writable;
        caps.extents = info.imageio && info.has("extents");
        caps.efficient_zero = info.imageio && info.has("zero");
        caps.flush = info.imageio;
        // Uploads are sent with flush=n, as imageio's own client does: one flush at the end
        // makes them durable.
        caps.needs_flush = info.imageio && info.writable;
        caps.sequential = !info.ranges;
        caps.max_request = MAX_REQUEST;
        caps.default_request = 256 << 10;
        // Zero blocks smaller than this are not worth ending a PUT for: the engine looks for
        // zeroes in 64 KiB blocks (shorter zero gaps inside a run travel as data anyway).
        caps.preferred_block = 64 << 10;
        caps.queue_depth = 64;
        // A PUT streams what it is given and the socket buffers hold what is on the wire, so a
        // deep read-ahead only makes a fresh process fault in memory: 2 MiB per connection
        // against nbdcopy's 16 MiB was 0.62 s against 0.70 s for a 1 GiB upload over TLS.
        caps.queue_bytes = Some(2 << 20);
        caps.connections = Some(shared.pool.size());
        caps.dirty = info.imageio && dirty;
        HttpEndpoint {
            shared,
            info,
            caps,
            extents: Mutex::new(ExtentCache::default()),
            dirty: Mutex::new(ExtentCache::default()),
            whole: Mutex::new(None),
            compression: None,
        }
    }

    /// The URL as the user gave it.
    pub fn url(&self) -> &str {
        &self.shared.name
    }

    pub fn server(&self) -> &ServerInfo {
        &self.info
    }

    pub fn connections(&self) -> usize {
        self.shared.pool.size()
    }

    fn fail(&self, op: Op, offset: u64, len: u64) -> Fail {
        Fail::new(&self.shared.name, op).at(offset, len)
    }

    async fn put(&self, offset: u64, data: Bytes, flush: bool) -> Result<(), DiskError> {
        let len = data.len() as u64;
        let fail = self.fail(Op::Write, offset, len);
        let target = self
            .shared
            .target_with(if flush { "flush=y" } else { "flush=n" });
        let make = || {
            let mut req = self
                .shared
                .request(Method::PUT, &target)
                .header(header::CONTENT_LENGTH, len);
            if len > 0 {
                req = req.header(
                    header::CONTENT_RANGE,
                    format!("bytes {}-{}/*", offset, offset + len - 1),
                );
            }
            req.body(ReqBody::full(data.clone()))
                .expect("valid request")
        };
        self.shared.call(make, &fail).await.map(|_| ())
    }

    async fn patch(&self, doc: serde_json::Value, fail: &Fail) -> Result<(), DiskError> {
        let body = Bytes::from(doc.to_string());
        let make = || {
            self.shared
                .request(Method::PATCH, &self.shared.target)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, body.len())
                .body(ReqBody::full(body.clone()))
                .expect("valid request")
        };
        self.shared.call(make, fail).await.map(|_| ())
    }

    async fn read_range(&self, offset: u64, len: u64) -> Result<Bytes, DiskError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        if !self.info.ranges {
            return self.read_sequential(offset, len).await;
        }
        let mut reader = RunReader::new(self.shared.clone());
        reader.begin(offset, len);
        let piece = reader.read(len);
        drop(reader);
        piece.await
    }

    /// Reads from the one GET of a server that ignores Range; reads come in order.
    async fn read_sequential(&self, offset: u64, len: u64) -> Result<Bytes, DiskError> {
        let fut = {
            let mut whole = self.whole.lock().unwrap_or_else(|p| p.into_inner());
            let size = self.caps.size.unwrap_or(0);
            let (next, stream) = whole.get_or_insert_with(|| {
                let mut reader = RunReader::new(self.shared.clone());
                reader.begin_whole(size);
                (0, reader)
            });
            if *next != offset {
                return Err(self.fail(Op::Read, offset, len).because(
                    ErrorKind::Unsupported,
                    format!(
                        "the server does not honour Range, so the image can only be read in \
                         order (next offset {next})"
                    ),
                ));
            }
            *next += len;
            stream.read(len)
        };
        fut.await
    }

    /// Extents of `context` ("zero" or "dirty") for [offset, offset+len), from the cache when
    /// it covers the range.
    async fn extents_of(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(Extent, bool)>, DiskError> {
        let cache = if context == "dirty" {
            &self.dirty
        } else {
            &self.extents
        };
        let end = offset + len;
        let cached = {
            let cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            (cache.start <= offset && end <= cache.end).then(|| clip(&cache.extents, offset, end))
        };
        if let Some(extents) = cached {
            return Ok(extents);
        }
        let fail = self.fail(Op::Extents, offset, len);
        let size = self.caps.size.unwrap_or(end);
        let window = len.max(EXTENTS_WINDOW).min(size - offset);
        let extents = fetch_extents(&self.shared, context, offset, Some(window), &fail).await?;
        let (start, stop) = match (extents.first(), extents.last()) {
            (Some((f, _)), Some((l, _))) => (f.offset, l.end()),
            _ => (offset, offset),
        };
        if start > offset || stop < end {
            return Err(fail.protocol(format!(
                "the server's {context} extents cover [{start}, {stop}), not the range asked for"
            )));
        }
        let out = clip(&extents, offset, end);
        *cache.lock().unwrap_or_else(|p| p.into_inner()) = ExtentCache {
            start,
            end: stop,
            extents,
        };
        Ok(out)
    }

    /// The server's own checksum of the image (`GET …/checksum`) when it offers the checksum
    /// feature: `None` when it does not. The digest is hex, as the server sent it.
    pub async fn server_checksum(
        &self,
        algorithm: &str,
        block_size: u64,
    ) -> Result<Option<String>, DiskError> {
        if !(self.info.imageio && self.info.has("checksum")) {
            return Ok(None);
        }
        let path = self.shared.target.split('?').next().unwrap_or("/");
        let target = format!("{path}/checksum?algorithm={algorithm}&block_size={block_size}");
        let fail = Fail::new(&self.shared.name, Op::Read);
        let make = || {
            self.shared
                .request(Method::GET, &target)
                .body(ReqBody::Empty)
                .expect("valid request")
        };
        let (_, _, body) = self.shared.call(make, &fail).await?;
        let doc: crate::wire::Checksum = serde_json::from_slice(&body)
            .map_err(|e| fail.protocol(format!("bad checksum answer from the server: {e}")))?;
        Ok(Some(doc.checksum))
    }

    /// Dirty and clean extents of [offset, offset+len) (the ticket must allow dirty extents).
    pub async fn dirty_extents(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(Extent, bool)>, DiskError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.extents_of("dirty", offset, len).await
    }
}

/// The extents of [start, end), cut at its edges.
fn clip(extents: &[(Extent, bool)], start: u64, end: u64) -> Vec<(Extent, bool)> {
    let first = extents.partition_point(|(e, _)| e.end() <= start);
    extents[first..]
        .iter()
        .take_while(|(e, _)| e.offset < end)
        .map(|(e, flag)| {
            let s = e.offset.max(start);
            let clipped = Extent {
                offset: s,
                length: e.end().min(end) - s,
                ..*e
            };
            (clipped, *flag)
        })
        .collect()
}

impl Endpoint for HttpEndpoint {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn caps(&self) -> &Caps {
        &self.caps
    }

    fn read(&self, offset: u64, len: u64) -> BoxFut<'_, Bytes> {
        Box::pin(self.read_range(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let mut pos = 0;
            while pos < data.len() {
                let n = (data.len() - pos).min(MAX_REQUEST as usize);
                self.put(offset + pos as u64, data.slice(pos..pos + n), false)
                    .await?;
                pos += n;
            }
            Ok(())
        })
    }

    fn zero(&self, offset: u64, len: u64, _allocate: bool) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                if self.info.has("zero") {
                    let n = (end - pos).min(MAX_ZERO);
                    let doc =
                        serde_json::json!({"op": "zero", "offset": pos, "size": n, "flush": false});
                    self.patch(doc, &self.fail(Op::Zero, pos, n)).await?;
                    pos += n;
                } else {
                    // Servers without the zero feature get zero bytes.
                    let n = (end - pos).min(MAX_REQUEST);
                    self.put(pos, bufpool::zero_bytes(n as usize), false)
                        .await
                        .map_err(|mut e| {
                            e.op = Op::Zero;
                            e
                        })?;
                    pos += n;
                }
            }
            Ok(())
        })
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<Extent>> {
        Box::pin(async move {
            if !self.caps.extents || len == 0 {
                return Ok(vec![Extent::data(offset, len)]);
            }
            let extents = self.extents_of("zero", offset, len).await?;
            Ok(extents.into_iter().map(|(e, _)| e).collect())
        })
    }

    /// Flushes every connection that carried writes: a server may keep one backend handle (and
    /// one NBD connection) per HTTP connection, and a flush covers only its own.
    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let fail = Fail::new(&self.shared.name, Op::Flush);
            let count = self.shared.pool.idle_count().max(1);
            let flush_one = || async {
                if self.info.has("flush") {
                    self.patch(serde_json::json!({"op": "flush"}), &fail).await
                } else {
                    self.put(0, Bytes::new(), true).await.map_err(|mut e| {
                        e.op = Op::Flush;
                        e
                    })
                }
            };
            let all = futures_util::future::join_all((0..count).map(|_| flush_one())).await;
            all.into_iter().collect::<Result<Vec<()>, _>>().map(|_| ())
        })
    }

    fn dirty(&self, offset: u64, len: u64) -> BoxFut<'_, Vec<(Extent, bool)>> {
        Box::pin(self.dirty_extents(offset, len))
    }

    /// imageio servers take each data run as one streamed PUT; others get a PUT per write.
    fn sink(&self, opts: &SinkOptions) -> Box<dyn Sink + '_> {
        if self.info.imageio && self.info.writable {
            Box::new(RunSink::new(
                self,
                RunWriter::new(self.shared.clone(), self.compression.clone()),
                opts,
            ))
        } else {
            Box::new(disk::sink::RequestSink::new(self, opts))
        }
    }

    fn stream_reader(&self) -> Option<Box<dyn StreamReader>> {
        self.info
            .ranges
            .then(|| Box::new(RunReader::new(self.shared.clone())) as _)
    }

    fn server_checksum(&self, algorithm: &str, block_size: u64) -> BoxFut<'_, Option<String>> {
        let algorithm = algorithm.to_string();
        Box::pin(async move { HttpEndpoint::server_checksum(self, &algorithm, block_size).await })
    }

    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.shared.pool.close();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_parse_and_clip() {
        let body = br#"[{"start": 0, "length": 65536, "zero": true, "hole": false},
            {"start": 65536, "length": 65536, "zero": false},
            {"start": 131072, "length": 0, "zero": true},
            {"start": 131072, "length": 131072, "zero": true, "hole": true}]"#;
        let e = parse_extents(body).unwrap();
        assert_eq!(e.len(), 3);
        assert!(e[2].hole && e[2].zero && !e[1].zero);
        let items = parse_items(body).unwrap();
        let c = clip(&items, 4096, 140000);
        assert_eq!(c.first().unwrap().0.offset, 4096);
        assert_eq!(c.last().unwrap().0.end(), 140000);
        assert_eq!(c.iter().map(|x| x.0.length).sum::<u64>(), 140000 - 4096);
        let dirty = br#"[{"start": 0, "length": 65536, "dirty": true, "zero": false},
            {"start": 65536, "length": 65536, "dirty": false, "zero": false}]"#;
        let d = parse_items(dirty).unwrap();
        assert_eq!((d[0].1, d[1].1), (true, false));
    }

    #[test]
    fn extents_with_gaps_are_refused() {
        let body = br#"[{"start": 0, "length": 10, "zero": true},
            {"start": 20, "length": 10, "zero": false}]"#;
        assert!(parse_extents(body).unwrap_err().contains("does not follow"));
        assert!(parse_extents(b"{}").is_err());
    }

    #[test]
    fn content_range_parsing() {
        let mut h = http::HeaderMap::new();
        h.insert(header::CONTENT_RANGE, "bytes 0-0/1048576".parse().unwrap());
        assert_eq!(content_range(&h), Some((0, 0, Some(1048576))));
        h.insert(header::CONTENT_RANGE, "bytes */0".parse().unwrap());
        assert_eq!(content_range(&h), None);
        assert_eq!(content_range_total(&h), Some(0));
    }
}
