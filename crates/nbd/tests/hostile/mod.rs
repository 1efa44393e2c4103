//! A scripted NBD server for the hostile-server tests. It listens on a Unix socket in a temporary
//! directory, accepts one connection and hands it to the test's script. Scripts either speak the
//! handshake themselves (to break it) or call [`Server::handshake`] for a correct one and then
//! misbehave in the transmission phase. Everything is encoded with the crate's own codec.

use std::future::Future;
use std::time::Duration;

use nbd::ConnectOptions;
use nbd::proto::consts::*;
use nbd::proto::{
    BlockSize, Chunk, Greeting, HeaderMode, Info, MetaContextRequest, OptionReply, OptionRequest,
    ReplyHeader, Request,
};
use nbd::uri::Transport;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Export size the scripted server announces.
pub const SIZE: u64 = 1 << 20;
/// Id the server gives `base:allocation`.
pub const CONTEXT_ID: u32 = 1;

/// What a correct handshake negotiates.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// ACK NBD_OPT_STRUCTURED_REPLY (else ERR_UNSUP).
    pub structured: bool,
    /// ACK NBD_OPT_EXTENDED_HEADERS (else ERR_UNSUP).
    pub extended: bool,
    /// Send INFO_EXPORT in the GO reply.
    pub export_info: bool,
    /// Send INFO_BLOCK_SIZE with these values.
    pub block_size: Option<BlockSize>,
    /// Export size announced in INFO_EXPORT.
    pub size: u64,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            structured: true,
            extended: false,
            export_info: true,
            block_size: Some(BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 32 << 20,
            }),
            size: SIZE,
        }
    }
}

/// The server's end of one connection.
pub struct Server {
    pub stream: UnixStream,
    /// Header layout negotiated by [`Server::handshake`].
    pub mode: HeaderMode,
}

impl Server {
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("server: write");
    }

    pub async fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.stream
            .read_exact(&mut buf)
            .await
            .expect("server: read");
        buf
    }

    /// Keeps the connection open without saying anything.
    pub async fn hold(self) {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(self);
    }

    /// Sends a fixed-newstyle greeting (FIXED_NEWSTYLE | NO_ZEROES) and reads the client flags.
    pub async fn greet(&mut self) {
        let mut out = Vec::new();
        Greeting::Newstyle {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        }
        .encode(&mut out);
        self.send(&out).await;
        let flags = self.recv(4).await;
        assert_eq!(
            u32::from_be_bytes(flags.try_into().unwrap()),
            CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES
        );
    }

    /// Reads one option request: (option, data).
    pub async fn option(&mut self) -> (u32, Vec<u8>) {
        let head = self.recv(16).await;
        let (option, len) = OptionRequest::decode_header(&head).expect("server: option header");
        let data = self.recv(len as usize).await;
        (option, data)
    }

    pub async fn reply(&mut self, option: u32, reply: OptionReply) {
        let mut out = Vec::new();
        reply.encode(option, &mut out);
        self.send(&out).await;
    }

    /// A correct handshake up to and including GO, answering as `setup` says.
    pub async fn handshake(mut self, setup: Setup) -> Self {
        self.greet().await;
        loop {
            let (option, data) = self.option().await;
            let unsup = OptionReply::Error {
                code: REP_ERR_UNSUP,
                message: String::new(),
            };
            match option {
                OPT_EXTENDED_HEADERS if setup.extended => {
                    self.mode = HeaderMode::Extended;
                    self.reply(option, OptionReply::Ack).await;
                }
                OPT_STRUCTURED_REPLY if setup.structured => {
                    self.mode = HeaderMode::Structured;
                    self.reply(option, OptionReply::Ack).await;
                }
                OPT_SET_META_CONTEXT => {
                    let request = MetaContextRequest::decode(&data).expect("meta context data");
                    for query in request.queries {
                        if query == CONTEXT_BASE_ALLOCATION {
                            let name = query.clone();
                            let reply = OptionReply::MetaContext {
                                id: CONTEXT_ID,
                                name,
                            };
                            self.reply(option, reply).await;
                        }
                    }
                    self.reply(option, OptionReply::Ack).await;
                }
                OPT_GO => {
                    if setup.export_info {
                        let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES;
                        let info = Info::Export {
                            size: setup.size,
                            flags,
                        };
                        self.reply(option, OptionReply::Info(info)).await;
                    }
                    if let Some(b) = setup.block_size {
                        self.reply(option, OptionReply::Info(Info::BlockSize(b)))
                            .await;
                    }
                    self.reply(option, OptionReply::Ack).await;
                    return self;
                }
                _ => self.reply(option, unsup).await,
            }
        }
    }

    /// Reads one request header in the negotiated layout, and its payload.
    pub async fn request(&mut self) -> (Request, Vec<u8>) {
        let head = self.recv(self.mode.request_len()).await;
        let request = Request::decode(&head, self.mode).expect("server: request header");
        let payload = self.recv(request.payload_len(self.mode) as usize).await;
        (request, payload)
    }

    /// Sends one structured (or extended) reply chunk to `req`; `data` follows the chunk's own
    /// payload (the bytes of an OFFSET_DATA chunk).
    pub async fn chunk(&mut self, req: &Request, flags: u16, chunk: &Chunk, data: &[u8]) {
        let mut payload = Vec::new();
        let chunk_type = chunk.encode_payload(self.mode == HeaderMode::Extended, &mut payload);
        payload.extend_from_slice(data);
        let mut out = Vec::new();
        let len = payload.len() as u64;
        ReplyHeader::encode_chunk(
            self.mode, flags, chunk_type, req.cookie, req.offset, len, &mut out,
        );
        out.extend_from_slice(&payload);
        self.send(&out).await;
    }

    /// Sends a chunk header claiming `length` payload bytes, and no payload.
    pub async fn chunk_header(&mut self, req: &Request, flags: u16, chunk_type: u16, length: u64) {
        let mut out = Vec::new();
        let (cookie, offset) = (req.cookie, req.offset);
        ReplyHeader::encode_chunk(
            self.mode, flags, chunk_type, cookie, offset, length, &mut out,
        );
        self.send(&out).await;
    }

    /// Sends a simple reply followed by `data`.
    pub async fn simple(&mut self, error: u32, cookie: u64, data: &[u8]) {
        let mut out = Vec::new();
        ReplyHeader::encode_simple(error, cookie, &mut out);
        out.extend_from_slice(data);
        self.send(&out).await;
    }
}

/// Listens on a fresh socket; the first connection runs `script`. Returns the directory (keep it
/// alive for the test) and client options pointing at the socket, asking for `base:allocation`.
pub fn serve<F, Fut>(script: F) -> (TempDir, ConnectOptions)
where
    F: FnOnce(Server) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let server = Server {
            stream,
            mode: HeaderMode::Simple,
        };
        script(server).await;
    });
    let mut opts = ConnectOptions::new(Transport::Unix { path }, "disk");
    opts.settings.meta_contexts = vec![CONTEXT_BASE_ALLOCATION.to_string()];
    opts.settings.timeout = Duration::from_secs(5);
    (dir, opts)
}

/// [`serve`] with a correct handshake; `script` gets the first request.
pub fn serve_request<F, Fut>(setup: Setup, script: F) -> (TempDir, ConnectOptions)
where
    F: FnOnce(Server, Request) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve(move |server| async move {
        let mut server = server.handshake(setup).await;
        let (request, _payload) = server.request().await;
        script(server, request).await;
    })
}

/// Fails the test instead of hanging it.
pub async fn guard<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), test)
        .await
        .expect("the test hung for 10 s")
}

/// Asserts `err` is a protocol error whose message contains `what`.
#[track_caller]
pub fn assert_protocol(err: &nbd::Error, what: &str) {
    assert!(err.is_protocol(), "expected a protocol error, got {err:?}");
    assert!(err.to_string().contains(what), "{err:?} lacks {what:?}");
}
