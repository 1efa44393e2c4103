//! A client that speaks the protocol by hand over a socket pair (or a server's socket), so
//! tests can see every reply chunk and send what no well-behaved client would.

use std::sync::Arc;
use std::time::Duration;

use nbd::proto::consts::*;
use nbd::proto::{
    Greeting, HeaderMode, InfoRequest, MetaContextRequest, OPTION_REPLY_HEADER_LEN, OptionReply,
    OptionReplyHeader, OptionRequest, ReplyHeader, Request,
};
use nbd::server::{Export, Exports, ServerConfig, SingleExport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::STEP;

/// Starts `serve_connection` on one end of a socket pair and returns the other end, plus the
/// server task (its result says how the server ended that connection).
pub fn raw_pair(
    export: Arc<dyn Export>,
    config: ServerConfig,
) -> (Raw, tokio::task::JoinHandle<nbd::Result<()>>) {
    let (client, server) = UnixStream::pair().expect("socket pair");
    let exports: Arc<dyn Exports> = Arc::new(SingleExport {
        name: String::new(),
        export,
    });
    let task = tokio::spawn(nbd::server::serve_connection(
        Box::new(server),
        exports,
        Arc::new(config),
    ));
    (Raw::new(client), task)
}

/// Waits (bounded) for a server connection task to end and returns its result.
pub async fn server_result(task: tokio::task::JoinHandle<nbd::Result<()>>) -> nbd::Result<()> {
    tokio::time::timeout(STEP, task)
        .await
        .expect("the server did not end the connection in time")
        .expect("the server task panicked")
}

/// One reply chunk (or simple reply) as it came off the wire.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub header: ReplyHeader,
    /// The chunk payload (empty for simple replies: read their data with `read_data`).
    pub payload: Vec<u8>,
}

impl RawReply {
    pub fn cookie(&self) -> u64 {
        self.header.cookie()
    }

    /// (flags, type) of a chunk; panics on a simple reply.
    pub fn chunk(&self) -> (u16, u16) {
        match self.header {
            ReplyHeader::Chunk {
                flags, chunk_type, ..
            } => (flags, chunk_type),
            ReplyHeader::Simple { .. } => panic!("expected a chunk, got {:?}", self.header),
        }
    }

    pub fn is_done(&self) -> bool {
        match self.header {
            ReplyHeader::Simple { .. } => true,
            ReplyHeader::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }

    /// The NBD error of this reply: a simple reply's error field or an error chunk's value.
    pub fn error(&self) -> u32 {
        match self.header {
            ReplyHeader::Simple { error, .. } => error,
            ReplyHeader::Chunk { chunk_type, .. } if chunk_type & CHUNK_ERROR_BIT != 0 => {
                u32::from_be_bytes(self.payload[..4].try_into().unwrap())
            }
            ReplyHeader::Chunk { .. } => 0,
        }
    }
}

/// A client that speaks the protocol by hand.
pub struct Raw {
    pub s: UnixStream,
    pub mode: HeaderMode,
    next_cookie: u64,
}

impl Raw {
    pub fn new(s: UnixStream) -> Self {
        Raw {
            s,
            mode: HeaderMode::Simple,
            next_cookie: 1,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(STEP, self.s.write_all(bytes))
            .await
            .expect("sending to the server timed out")
            .expect("sending to the server");
    }

    /// Sends, tolerating a server that already closed the connection.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        tokio::time::timeout(STEP, self.s.write_all(bytes))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }

    pub async fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(STEP, self.s.read_exact(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("waited {STEP:?} for {n} bytes from the server"))
            .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        buf
    }

    /// Waits until the server closes the connection (EOF or reset), discarding anything it
    /// sends first; panics if it stays open for `within`.
    pub async fn expect_closed(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("the server kept the connection open for {within:?}"),
            }
        }
    }

    /// Reads the greeting and returns the handshake flags.
    pub async fn greeting(&mut self) -> u16 {
        let buf = self.read_n(18).await;
        match Greeting::decode(&buf).expect("a valid greeting") {
            Greeting::Newstyle { flags } => flags,
            Greeting::Oldstyle => panic!("oldstyle greeting"),
        }
    }

    pub async fn client_flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes()).await;
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        OptionRequest {
            option,
            data: data.to_vec(),
        }
        .encode(&mut out);
        self.send(&out).await;
    }

    /// Reads one option reply.
    pub async fn option_reply(&mut self) -> (u32, OptionReply) {
        let head = self.read_n(OPTION_REPLY_HEADER_LEN).await;
        let h = OptionReplyHeader::decode(&head).expect("option reply header");
        let data = self.read_n(h.length as usize).await;
        let reply = OptionReply::decode(h.reply_type, &data).expect("option reply payload");
        (h.option, reply)
    }

    /// Sends an option and reads replies up to the final ACK or error.
    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptionReply> {
        self.send_option(option, data).await;
        let mut replies = Vec::new();
        loop {
            let (opt, reply) = self.option_reply().await;
            assert_eq!(opt, option, "reply to the wrong option: {reply:?}");
            let last = matches!(reply, OptionReply::Ack | OptionReply::Error { .. });
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    /// Full handshake to the export "" in `mode`, selecting `base:allocation` unless Simple.
    /// Returns (size, transmission flags).
    pub async fn handshake(&mut self, mode: HeaderMode) -> (u64, u16) {
        self.greeting().await;
        self.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)
            .await;
        match mode {
            HeaderMode::Simple => {}
            HeaderMode::Structured => {
                let r = self.option(OPT_STRUCTURED_REPLY, &[]).await;
                assert_eq!(r, vec![OptionReply::Ack]);
            }
            HeaderMode::Extended => {
                let r = self.option(OPT_EXTENDED_HEADERS, &[]).await;
                assert_eq!(r, vec![OptionReply::Ack]);
            }
        }
        if mode != HeaderMode::Simple {
            let req = OptionRequest::meta_context(
                OPT_SET_META_CONTEXT,
                &MetaContextRequest {
                    export: String::new(),
                    queries: vec![CONTEXT_BASE_ALLOCATION.into()],
                },
            );
            let r = self.option(OPT_SET_META_CONTEXT, &req.data).await;
            assert!(
                matches!(r.first(), Some(OptionReply::MetaContext { .. })),
                "{r:?}"
            );
        }
        let go = OptionRequest::info(
            OPT_GO,
            &InfoRequest {
                name: String::new(),
                infos: vec![INFO_BLOCK_SIZE],
            },
        );
        let replies = self.option(OPT_GO, &go.data).await;
        let mut export = None;
        for r in &replies {
            if let OptionReply::Info(nbd::proto::Info::Export { size, flags }) = r {
                export = Some((*size, *flags));
            }
        }
        assert_eq!(replies.last(), Some(&OptionReply::Ack), "{replies:?}");
        self.mode = mode;
        export.expect("GO without INFO_EXPORT")
    }

    /// Sends a request header (and payload); returns its cookie.
    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut out = Vec::with_capacity(32 + payload.len());
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(self.mode, &mut out);
        out.extend_from_slice(payload);
        self.send(&out).await;
        cookie
    }

    /// Reads one reply header and, for chunks, its payload.
    pub async fn reply(&mut self) -> RawReply {
        let magic: [u8; 4] = self.read_n(4).await.try_into().unwrap();
        let len = ReplyHeader::header_len(magic).expect("a reply magic");
        let mut head = magic.to_vec();
        head.extend(self.read_n(len - 4).await);
        let header = ReplyHeader::decode(&head, self.mode).expect("a valid reply header");
        let payload = match header {
            ReplyHeader::Simple { .. } => Vec::new(),
            ReplyHeader::Chunk { length, .. } => self.read_n(length as usize).await,
        };
        RawReply { header, payload }
    }

    /// Reads chunks up to and including the one with DONE (a simple reply is one chunk).
    pub async fn full_reply(&mut self) -> Vec<RawReply> {
        let mut out = Vec::new();
        loop {
            let r = self.reply().await;
            let done = r.is_done();
            out.push(r);
            if done {
                return out;
            }
        }
    }

    /// The data bytes that follow a successful simple read reply.
    pub async fn read_data(&mut self, len: usize) -> Vec<u8> {
        self.read_n(len).await
    }

    /// A READ of [offset, offset+len) on an idle connection, reassembled; checks that every
    /// chunk belongs to it. Err(errno) on failure.
    pub async fn read(&mut self, offset: u64, len: u64, flags: u16) -> Result<Vec<u8>, u32> {
        let cookie = self.request(CMD_READ, flags, offset, len, &[]).await;
        if self.mode == HeaderMode::Simple {
            let r = self.reply().await;
            assert_eq!(r.cookie(), cookie);
            if r.error() != 0 {
                return Err(r.error());
            }
            return Ok(self.read_data(len as usize).await);
        }
        let mut out = vec![0xaa; len as usize];
        let mut error = 0;
        for r in self.full_reply().await {
            assert_eq!(r.cookie(), cookie);
            let (_, t) = r.chunk();
            match t {
                CHUNK_OFFSET_DATA => {
                    let at = u64::from_be_bytes(r.payload[..8].try_into().unwrap()) - offset;
                    let data = &r.payload[8..];
                    out[at as usize..at as usize + data.len()].copy_from_slice(data);
                }
                CHUNK_OFFSET_HOLE => {
                    let at = u64::from_be_bytes(r.payload[..8].try_into().unwrap()) - offset;
                    let n = u32::from_be_bytes(r.payload[8..12].try_into().unwrap());
                    out[at as usize..at as usize + n as usize].fill(0);
                }
                CHUNK_NONE => {}
                _ if r.error() != 0 => error = r.error(),
                other => panic!("unexpected chunk type {other} in a read reply"),
            }
        }
        if error != 0 { Err(error) } else { Ok(out) }
    }

    /// A payload-less command on an idle connection; returns the NBD error (0 = success).
    pub async fn command(&mut self, command: u16, flags: u16, offset: u64, length: u64) -> u32 {
        let cookie = self.request(command, flags, offset, length, &[]).await;
        let replies = self.full_reply().await;
        let mut error = 0;
        for r in &replies {
            assert_eq!(r.cookie(), cookie);
            if r.error() != 0 {
                error = r.error();
            }
        }
        error
    }
}
