//! The client side of the handshake: greeting, STARTTLS, header and reply negotiation, meta
//! contexts, INFO/GO with the EXPORT_NAME fallback, and LIST. It runs on a boxed stream so that
//! STARTTLS can swap the plain socket for a TLS one halfway through.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use super::{BoxStream, ConnectOptions};
use crate::error::{Error, Result};
use crate::proto::consts::*;
use crate::proto::{
    BlockSize, ExportNameReply, GREETING_LEN, Greeting, HeaderMode, Info, InfoRequest,
    MetaContextRequest, OPTION_REPLY_HEADER_LEN, OptionReply, OptionReplyHeader, OptionRequest,
};

/// Longest option reply accepted: two 4096-byte strings and their framing fit comfortably.
const MAX_OPTION_REPLY_LEN: u32 = 64 * 1024;
/// Most replies accepted for one option (exports listed, contexts, infos): far above any real
/// server, low enough that a server that never sends the final reply cannot exhaust memory.
const MAX_OPTION_REPLIES: usize = 16 * 1024;
/// The largest export size accepted: offsets are signed 64-bit everywhere else.
pub const MAX_EXPORT_SIZE: u64 = i64::MAX as u64;

/// Everything the handshake established about the export and the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: String,
    pub size: u64,
    pub flags: u16,
    /// The limits in force: the server's when it sent them, the spec's defaults otherwise.
    pub block_size: BlockSize,
    /// True if the server sent INFO_BLOCK_SIZE.
    pub block_size_advertised: bool,
    pub canonical_name: Option<String>,
    pub description: Option<String>,
    pub mode: HeaderMode,
    pub tls: bool,
    /// Meta contexts selected with SET_META_CONTEXT, as (name, id).
    pub contexts: Vec<(String, u32)>,
    /// Meta contexts the server listed (only when asked for).
    pub offered_contexts: Vec<String>,
    /// The server did not know NBD_OPT_GO and the old EXPORT_NAME path was used.
    pub export_name_fallback: bool,
}

impl Negotiated {
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }
}

/// A handshake in progress on one stream.
pub(crate) struct Handshake {
    pub stream: BoxStream,
    timeout: Duration,
    fixed_newstyle: bool,
    no_zeroes: bool,
    tls: bool,
}

impl Handshake {
    /// Reads the greeting and answers it.
    pub async fn start(mut stream: BoxStream, timeout: Duration) -> Result<Self> {
        let mut buf = [0u8; GREETING_LEN];
        with_timeout(timeout, "waiting for the server's greeting", async {
            stream.read_exact(&mut buf).await
        })
        .await?;
        let flags = match Greeting::decode(&buf)? {
            Greeting::Newstyle { flags } => flags,
            Greeting::Oldstyle => {
                return Err(Error::Unsupported(
                    "the server speaks the oldstyle NBD protocol, which ferry does not support"
                        .into(),
                ));
            }
        };
        let fixed_newstyle = flags & FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let mut client_flags = 0u32;
        if fixed_newstyle {
            client_flags |= CLIENT_FLAG_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            client_flags |= CLIENT_FLAG_NO_ZEROES;
        }
        let mut hs = Handshake {
            stream,
            timeout,
            fixed_newstyle,
            no_zeroes,
            tls: false,
        };
        hs.write(&client_flags.to_be_bytes()).await?;
        Ok(hs)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let stream = &mut self.stream;
        with_timeout(self.timeout, "sending to the server", async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await
    }

    async fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let stream = &mut self.stream;
        with_timeout(self.timeout, what, async { stream.read_exact(buf).await })
            .await
            .map(|_| ())
    }

    /// Sends one option and collects replies up to the final one (ACK or an error for
    /// multi-reply options, the first reply otherwise). The final reply is last in the vector.
    async fn exchange(&mut self, request: OptionRequest) -> Result<Vec<OptionReply>> {
        if !self.fixed_newstyle {
            return Err(Error::Unsupported(format!(
                "the server does not speak fixed newstyle NBD, so {} cannot be sent",
                option_name(request.option)
            )));
        }
        let mut out = Vec::new();
        request.encode(&mut out);
        self.write(&out).await?;
        let multi = matches!(
            request.option,
            OPT_LIST | OPT_INFO | OPT_GO | OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT
        );
        let mut replies = Vec::new();
        loop {
            let mut head = [0u8; OPTION_REPLY_HEADER_LEN];
            self.read_exact(&mut head, "reading an option reply")
                .await?;
            let header = OptionReplyHeader::decode(&head)?;
            if header.option != request.option {
                return Err(Error::Protocol(format!(
                    "reply to {} echoes option {}",
                    option_name(request.option),
                    header.option
                )));
            }
            if header.length > MAX_OPTION_REPLY_LEN {
                return Err(Error::Protocol(format!(
                    "option reply of {} bytes to {} exceeds the {MAX_OPTION_REPLY_LEN}-byte limit",
                    header.length,
                    option_name(request.option)
                )));
            }
            let mut data = vec![0u8; header.length as usize];
            self.read_exact(&mut data, "reading an option reply")
                .await?;
            let reply = OptionReply::decode(header.reply_type, &data)?;
            let last = !multi || matches!(reply, OptionReply::Ack | OptionReply::Error { .. });
            replies.push(reply);
            if replies.len() > MAX_OPTION_REPLIES {
                return Err(Error::Protocol(format!(
                    "server sent over {MAX_OPTION_REPLIES} replies to {} without a final one",
                    option_name(request.option)
                )));
            }
            if last {
                return Ok(replies);
            }
        }
    }

    /// An option whose only success is a bare ACK. Returns Ok(false) on a refusal.
    async fn simple_option(&mut self, option: u32) -> Result<std::result::Result<(), Error>> {
        let replies = self.exchange(OptionRequest::simple(option)).await?;
        match replies.last() {
            Some(OptionReply::Ack) => Ok(Ok(())),
            Some(OptionReply::Error { code, message }) => Ok(Err(Error::OptionRefused {
                option,
                code: *code,
                message: message.clone(),
            })),
            other => Err(Error::Protocol(format!(
                "unexpected reply to {}: {other:?}",
                option_name(option)
            ))),
        }
    }

    pub async fn starttls(mut self, opts: &crate::tls::TlsOptions) -> Result<Self> {
        if let Err(refused) = self.simple_option(OPT_STARTTLS).await? {
            return Err(Error::Tls(format!(
                "TLS is required but the server refused to start it: {refused}"
            )));
        }
        let connector = TlsConnector::from(opts.client_config()?);
        let name = opts.server_name()?;
        let timeout = self.timeout;
        let tls = with_timeout(timeout, "TLS handshake", async {
            connector.connect(name, self.stream).await
        })
        .await
        .map_err(|e| match e {
            Error::Io { source, .. } => Error::Tls(format!("handshake failed: {source}")),
            other => other,
        })?;
        self.stream = Box::new(tls);
        self.tls = true;
        Ok(self)
    }

    /// Turns a TLS_REQD refusal into advice; other errors pass through.
    fn tls_hint(&self, err: Error) -> Error {
        match err {
            Error::OptionRefused { code, .. } if code == REP_ERR_TLS_REQD && !self.tls => {
                Error::Tls(format!(
                    "{err}; the server requires TLS: use an nbds:// or nbds+unix:// URI"
                ))
            }
            other => other,
        }
    }

    /// Negotiates everything up to and including GO (or EXPORT_NAME).
    pub async fn negotiate(mut self, opts: &ConnectOptions) -> Result<(BoxStream, Negotiated)> {
        let mut mode = HeaderMode::Simple;
        if self.fixed_newstyle && opts.settings.extended_headers {
            match self.simple_option(OPT_EXTENDED_HEADERS).await? {
                Ok(()) => mode = HeaderMode::Extended,
                Err(e) => self.fail_on_tls_reqd(e)?,
            }
        }
        if self.fixed_newstyle && mode == HeaderMode::Simple && opts.settings.structured_replies {
            match self.simple_option(OPT_STRUCTURED_REPLY).await? {
                Ok(()) => mode = HeaderMode::Structured,
                Err(e) => self.fail_on_tls_reqd(e)?,
            }
        }
        let mut offered_contexts = Vec::new();
        if mode != HeaderMode::Simple && opts.settings.list_meta_contexts {
            let request = MetaContextRequest {
                export: opts.export.clone(),
                queries: Vec::new(),
            };
            let replies = self
                .exchange(OptionRequest::meta_context(OPT_LIST_META_CONTEXT, &request))
                .await?;
            for reply in replies {
                match reply {
                    OptionReply::MetaContext { name, .. } => offered_contexts.push(name),
                    OptionReply::Error { code, message } => {
                        self.fail_on_tls_reqd(Error::OptionRefused {
                            option: OPT_LIST_META_CONTEXT,
                            code,
                            message,
                        })?
                    }
                    _ => {}
                }
            }
        }
        let mut contexts = Vec::new();
        if mode != HeaderMode::Simple && !opts.settings.meta_contexts.is_empty() {
            let request = MetaContextRequest {
                export: opts.export.clone(),
                queries: opts.settings.meta_contexts.clone(),
            };
            let replies = self
                .exchange(OptionRequest::meta_context(OPT_SET_META_CONTEXT, &request))
                .await?;
            for reply in replies {
                match reply {
                    OptionReply::MetaContext { id, name } => {
                        if contexts.iter().any(|(_, i)| *i == id) {
                            return Err(Error::Protocol(format!(
                                "server gave meta context id {id} twice"
                            )));
                        }
                        contexts.push((name, id));
                    }
                    OptionReply::Error { code, message } => {
                        // The selection is replaced even on failure: nothing is selected.
                        contexts.clear();
                        self.fail_on_tls_reqd(Error::OptionRefused {
                            option: OPT_SET_META_CONTEXT,
                            code,
                            message,
                        })?;
                    }
                    _ => {}
                }
            }
        }
        let mut negotiated = Negotiated {
            export: opts.export.clone(),
            size: 0,
            flags: 0,
            block_size: BlockSize::DEFAULT,
            block_size_advertised: false,
            canonical_name: None,
            description: None,
            mode,
            tls: self.tls,
            contexts,
            offered_contexts,
            export_name_fallback: false,
        };
        let mut infos = vec![INFO_BLOCK_SIZE];
        if opts.settings.full_info {
            infos.extend([INFO_NAME, INFO_DESCRIPTION]);
        }
        let go = InfoRequest {
            name: opts.export.clone(),
            infos,
        };
        let replies = if self.fixed_newstyle {
            Some(self.exchange(OptionRequest::info(OPT_GO, &go)).await?)
        } else {
            None
        };
        let mut got_export = false;
        match replies.as_ref().and_then(|r| r.last()) {
            Some(OptionReply::Ack) => {
                for reply in replies.iter().flatten() {
                    match reply {
                        OptionReply::Info(Info::Export { size, flags }) => {
                            negotiated.size = *size;
                            negotiated.flags = *flags;
                            got_export = true;
                        }
                        OptionReply::Info(Info::BlockSize(b)) => {
                            b.validate()?;
                            negotiated.block_size = *b;
                            negotiated.block_size_advertised = true;
                        }
                        OptionReply::Info(Info::Name(n)) => {
                            negotiated.canonical_name = Some(n.clone())
                        }
                        OptionReply::Info(Info::Description(d)) => {
                            negotiated.description = Some(d.clone())
                        }
                        _ => {}
                    }
                }
            }
            Some(OptionReply::Error { code, .. })
                if *code == REP_ERR_UNSUP && mode != HeaderMode::Extended =>
            {
                self.export_name(&opts.export, &mut negotiated).await?;
                got_export = true;
            }
            None => {
                self.export_name(&opts.export, &mut negotiated).await?;
                got_export = true;
            }
            Some(OptionReply::Error { code, message }) => {
                let err = Error::OptionRefused {
                    option: OPT_GO,
                    code: *code,
                    message: message.clone(),
                };
                return Err(match *code {
                    REP_ERR_UNKNOWN => Error::Unsupported(format!(
                        "export {:?} does not exist on this server ({err})",
                        opts.export
                    )),
                    _ => self.tls_hint(err),
                });
            }
            Some(other) => {
                return Err(Error::Protocol(format!(
                    "unexpected final reply to NBD_OPT_GO: {other:?}"
                )));
            }
        }
        if !got_export {
            return Err(Error::Protocol(
                "server acknowledged NBD_OPT_GO without sending NBD_INFO_EXPORT".into(),
            ));
        }
        if negotiated.flags & TFLAG_HAS_FLAGS == 0 {
            // Flags without HAS_FLAGS carry no meaning; treat the export as featureless.
            negotiated.flags = TFLAG_HAS_FLAGS;
        }
        if negotiated.size > MAX_EXPORT_SIZE {
            // No file or device can be that large, and offsets past it do not fit the signed
            // 64-bit offsets every peer and syscall uses: refuse it now, not mid-copy.
            return Err(Error::Unsupported(format!(
                "export {:?} has size {} bytes, larger than the largest possible ({MAX_EXPORT_SIZE}, \
                 2^63 - 1)",
                opts.export, negotiated.size
            )));
        }
        Ok((self.stream, negotiated))
    }

    /// Anything but a TLS_REQD refusal lets negotiation go on without the feature.
    fn fail_on_tls_reqd(&self, err: Error) -> Result<()> {
        match self.tls_hint(err) {
            e @ Error::Tls(_) => Err(e),
            _ => Ok(()),
        }
    }

    async fn export_name(&mut self, export: &str, negotiated: &mut Negotiated) -> Result<()> {
        let mut out = Vec::new();
        OptionRequest::export_name(export).encode(&mut out);
        self.write(&out).await?;
        let len = ExportNameReply::LEN
            + if self.no_zeroes {
                0
            } else {
                ExportNameReply::PADDING
            };
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf, "waiting for the NBD_OPT_EXPORT_NAME reply")
            .await
            .map_err(|e| match e {
                Error::Closed(_) | Error::Io { .. } => Error::Unsupported(format!(
                    "the server closed the connection after NBD_OPT_EXPORT_NAME: \
                     export {export:?} probably does not exist ({e})"
                )),
                other => other,
            })?;
        let reply = ExportNameReply::decode(&buf)?;
        negotiated.size = reply.size;
        negotiated.flags = reply.flags;
        negotiated.export_name_fallback = true;
        Ok(())
    }

    /// NBD_OPT_LIST: the exports the server names, as (name, description).
    pub async fn list(&mut self) -> Result<Vec<(String, String)>> {
        let replies = self.exchange(OptionRequest::simple(OPT_LIST)).await?;
        let mut exports = Vec::new();
        for reply in replies {
            match reply {
                OptionReply::Server { name, description } => exports.push((name, description)),
                OptionReply::Error { code, message } => {
                    return Err(self.tls_hint(Error::OptionRefused {
                        option: OPT_LIST,
                        code,
                        message,
                    }));
                }
                _ => {}
            }
        }
        Ok(exports)
    }

    /// Ends the handshake without entering transmission.
    pub async fn abort(mut self) {
        let mut out = Vec::new();
        OptionRequest::simple(OPT_ABORT).encode(&mut out);
        // The server may close without acknowledging; either way we are done.
        if self.write(&out).await.is_ok() {
            let mut head = [0u8; OPTION_REPLY_HEADER_LEN];
            let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.read_exact(&mut head))
                .await;
        }
        let _ = self.stream.shutdown().await;
    }
}

pub(crate) async fn with_timeout<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Closed(format!(
            "the server closed the connection while {what}"
        ))),
        Ok(Err(e)) => Err(Error::io(what, e)),
        Err(_) => Err(Error::Timeout(format!(
            "no answer from the server for {} s while {what}",
            timeout.as_secs_f64()
        ))),
    }
}
