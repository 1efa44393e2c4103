//! The server side of the handshake. One option at a time, each answered per the spec; state
//! negotiated before STARTTLS is dropped with it.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Export, Exports, ServerConfig};
use crate::client::BoxStream;
use crate::error::{Error, Result};
use crate::proto::consts::*;
use crate::proto::{
    ExportNameReply, Greeting, HeaderMode, Info, InfoRequest, MetaContextRequest,
    OPTION_HEADER_LEN, OptionReply, OptionRequest,
};

/// Longest option payload accepted: a 4096-byte name plus queries fits in far less.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Id of `base:allocation` when selected (ids are per connection).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// A client that reached the transmission phase.
pub struct Session {
    pub stream: BoxStream,
    pub export: Arc<dyn Export>,
    pub mode: HeaderMode,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
    pub flags: u16,
}

struct State {
    stream: BoxStream,
    tls: bool,
    no_zeroes: bool,
    mode: HeaderMode,
    /// Export name and whether base:allocation is selected for it (last SET_META_CONTEXT).
    contexts: Option<(String, bool)>,
}

impl State {
    async fn reply(&mut self, option: u32, reply: OptionReply) -> Result<()> {
        let mut out = Vec::new();
        reply.encode(option, &mut out);
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| Error::io("sending an option reply", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| Error::io("sending an option reply", e))
    }

    async fn error(&mut self, option: u32, code: u32, message: &str) -> Result<()> {
        self.reply(
            option,
            OptionReply::Error {
                code,
                message: message.into(),
            },
        )
        .await
    }
}

/// Transmission flags of `export` for a client that negotiated `mode`.
pub fn transmission_flags(export: &dyn Export, mode: HeaderMode) -> u16 {
    let caps = export.caps();
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_CACHE;
    if caps.read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        if caps.flush {
            flags |= TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        }
        if caps.trim {
            flags |= TFLAG_SEND_TRIM;
        }
        if caps.zero {
            flags |= TFLAG_SEND_WRITE_ZEROES;
            if caps.fast_zero {
                flags |= TFLAG_SEND_FAST_ZERO;
            }
        }
    }
    if mode != HeaderMode::Simple {
        flags |= TFLAG_SEND_DF;
    }
    if caps.multi_conn {
        flags |= TFLAG_CAN_MULTI_CONN;
    }
    flags
}

/// Runs the handshake. `Ok(None)` when the client ended it (ABORT) without transmission.
pub async fn negotiate(
    mut stream: BoxStream,
    exports: &dyn Exports,
    config: &ServerConfig,
) -> Result<Option<Session>> {
    let mut out = Vec::new();
    Greeting::Newstyle {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }
    .encode(&mut out);
    stream
        .write_all(&out)
        .await
        .map_err(|e| Error::io("sending the greeting", e))?;
    let client_flags = stream
        .read_u32()
        .await
        .map_err(|e| Error::io("reading client flags", e))?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(Error::Protocol(format!(
            "client sent unknown flags {client_flags:#x}"
        )));
    }
    let mut st = State {
        stream,
        tls: false,
        no_zeroes: client_flags & CLIENT_FLAG_NO_ZEROES != 0,
        mode: HeaderMode::Simple,
        contexts: None,
    };
    let tls_required = config.tls.is_some();
    loop {
        let mut head = [0u8; OPTION_HEADER_LEN];
        st.stream
            .read_exact(&mut head)
            .await
            .map_err(|e| Error::io("reading an option", e))?;
        let (option, len) = OptionRequest::decode_header(&head)?;
        if len > MAX_OPTION_LEN {
            return Err(Error::Protocol(format!(
                "option {option} carries {len} bytes, over the {MAX_OPTION_LEN}-byte limit"
            )));
        }
        let mut data = vec![0u8; len as usize];
        st.stream
            .read_exact(&mut data)
            .await
            .map_err(|e| Error::io("reading an option", e))?;

        if tls_required && !st.tls && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                // No way to send an error to EXPORT_NAME: the spec says close.
                return Ok(None);
            }
            st.error(option, REP_ERR_TLS_REQD, "TLS is required")
                .await?;
            continue;
        }
        match option {
            OPT_ABORT => {
                let _ = st.reply(option, OptionReply::Ack).await;
                return Ok(None);
            }
            OPT_STARTTLS => {
                let Some(tls) = config.tls.clone() else {
                    st.error(option, REP_ERR_POLICY, "TLS is not configured")
                        .await?;
                    continue;
                };
                if st.tls || !data.is_empty() {
                    st.error(option, REP_ERR_INVALID, "TLS already started or data sent")
                        .await?;
                    continue;
                }
                st.reply(option, OptionReply::Ack).await?;
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                let stream = acceptor
                    .accept(st.stream)
                    .await
                    .map_err(|e| Error::Tls(format!("handshake with the client failed: {e}")))?;
                st = State {
                    stream: Box::new(stream),
                    tls: true,
                    no_zeroes: st.no_zeroes,
                    // STARTTLS drops everything negotiated before it.
                    mode: HeaderMode::Simple,
                    contexts: None,
                };
            }
            OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    st.error(option, REP_ERR_INVALID, "option takes no data")
                        .await?;
                } else if option == OPT_STRUCTURED_REPLY && st.mode == HeaderMode::Extended {
                    st.error(option, REP_ERR_EXT_HEADER_REQD, "extended headers in use")
                        .await?;
                } else {
                    st.mode = if option == OPT_EXTENDED_HEADERS {
                        HeaderMode::Extended
                    } else {
                        HeaderMode::Structured
                    };
                    // Contexts chosen under other headers are void.
                    st.contexts = None;
                    st.reply(option, OptionReply::Ack).await?;
                }
            }
            OPT_LIST => {
                if !data.is_empty() {
                    st.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                    continue;
                }
                for (name, description) in exports.list() {
                    st.reply(option, OptionReply::Server { name, description })
                        .await?;
                }
                st.reply(option, OptionReply::Ack).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(&mut st, option, &data, exports).await?;
            }
            OPT_INFO | OPT_GO => {
                let request = match InfoRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        st.error(option, REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let Some(export) = exports.lookup(&request.name) else {
                    st.error(option, REP_ERR_UNKNOWN, "no such export").await?;
                    continue;
                };
                let flags = transmission_flags(export.as_ref(), st.mode);
                st.reply(
                    option,
                    OptionReply::Info(Info::Export {
                        size: export.size(),
                        flags,
                    }),
                )
                .await?;
                st.reply(
                    option,
                    OptionReply::Info(Info::BlockSize(export.caps().block_size)),
                )
                .await?;
                if request.infos.contains(&INFO_NAME) {
                    st.reply(option, OptionReply::Info(Info::Name(request.name.clone())))
                        .await?;
                }
                if request.infos.contains(&INFO_DESCRIPTION) {
                    st.reply(
                        option,
                        OptionReply::Info(Info::Description(export.description())),
                    )
                    .await?;
                }
                st.reply(option, OptionReply::Ack).await?;
                if option == OPT_GO {
                    let base_allocation = matches!(
                        &st.contexts,
                        Some((name, true)) if *name == request.name
                    );
                    return Ok(Some(Session {
                        stream: st.stream,
                        export,
                        mode: st.mode,
                        base_allocation,
                        flags,
                    }));
                }
            }
            OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data) else {
                    return Ok(None);
                };
                let Some(export) = exports.lookup(&name) else {
                    // EXPORT_NAME has no error reply: closing is the answer.
                    return Ok(None);
                };
                let flags = transmission_flags(export.as_ref(), st.mode);
                let mut out = Vec::new();
                ExportNameReply {
                    size: export.size(),
                    flags,
                }
                .encode(st.no_zeroes, &mut out);
                st.stream
                    .write_all(&out)
                    .await
                    .map_err(|e| Error::io("sending the export reply", e))?;
                let base_allocation = matches!(&st.contexts, Some((n, true)) if *n == name);
                return Ok(Some(Session {
                    stream: st.stream,
                    export,
                    mode: st.mode,
                    base_allocation,
                    flags,
                }));
            }
            _ => {
                st.error(option, REP_ERR_UNSUP, "option not supported")
                    .await?;
            }
        }
    }
}

async fn meta_context(
    st: &mut State,
    option: u32,
    data: &[u8],
    exports: &dyn Exports,
) -> Result<()> {
    let set = option == OPT_SET_META_CONTEXT;
    if set {
        // The selection is replaced even when the request fails.
        st.contexts = None;
    }
    if st.mode == HeaderMode::Simple {
        return st
            .error(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            )
            .await;
    }
    let request = match MetaContextRequest::decode(data) {
        Ok(r) => r,
        Err(e) => return st.error(option, REP_ERR_INVALID, &e.to_string()).await,
    };
    if exports.lookup(&request.export).is_none() {
        return st.error(option, REP_ERR_UNKNOWN, "no such export").await;
    }
    // Every export can answer base:allocation (one without extent knowledge says "data").
    let matches = |q: &str| {
        if set {
            q == CONTEXT_BASE_ALLOCATION
        } else {
            q == CONTEXT_BASE_ALLOCATION || q == "base:"
        }
    };
    let selected = if request.queries.is_empty() {
        !set
    } else {
        request.queries.iter().any(|q| matches(q))
    };
    if selected {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        st.reply(
            option,
            OptionReply::MetaContext {
                id,
                name: CONTEXT_BASE_ALLOCATION.into(),
            },
        )
        .await?;
    }
    if set {
        st.contexts = Some((request.export, selected));
    }
    st.reply(option, OptionReply::Ack).await
}
