//! Handshake-phase messages: the greeting, option requests and their typed payloads, option
//! replies, and the EXPORT_NAME reply. Encoders append to a `Vec<u8>`; decoders take complete
//! byte slices and return [`DecodeError`] on anything malformed.

use super::DecodeError;
use super::consts::*;
use super::cursor::Reader;

/// What the first 18 bytes from a server say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    Newstyle {
        flags: u16,
    },
    /// Oldstyle servers continue with size and flags; nothing modern speaks it.
    Oldstyle,
}

pub const GREETING_LEN: usize = 18;

impl Greeting {
    pub fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        match self {
            Greeting::Newstyle { flags } => {
                out.extend_from_slice(&IHAVEOPT.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Greeting::Oldstyle => {
                out.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes());
            }
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf, "greeting");
        let magic = r.u64()?;
        if magic != NBDMAGIC {
            return Err(DecodeError::Invalid(format!(
                "greeting: bad magic {magic:#018x}, this is not an NBD server"
            )));
        }
        match r.u64()? {
            IHAVEOPT => Ok(Greeting::Newstyle { flags: r.u16()? }),
            OLDSTYLE_MAGIC => Ok(Greeting::Oldstyle),
            other => Err(DecodeError::Invalid(format!(
                "greeting: bad second magic {other:#018x}"
            ))),
        }
    }
}

/// One option request: `IHAVEOPT | u32 option | u32 length | data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    pub option: u32,
    pub data: Vec<u8>,
}

pub const OPTION_HEADER_LEN: usize = 16;

impl OptionRequest {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.data);
    }

    /// Decodes the 16-byte header into `(option, data length)`.
    pub fn decode_header(buf: &[u8]) -> Result<(u32, u32), DecodeError> {
        let mut r = Reader::new(buf, "option request");
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(DecodeError::Invalid(format!(
                "option request: bad magic {magic:#018x}"
            )));
        }
        Ok((r.u32()?, r.u32()?))
    }

    pub fn simple(option: u32) -> Self {
        OptionRequest {
            option,
            data: Vec::new(),
        }
    }

    pub fn export_name(name: &str) -> Self {
        OptionRequest {
            option: OPT_EXPORT_NAME,
            data: name.as_bytes().to_vec(),
        }
    }

    /// NBD_OPT_INFO or NBD_OPT_GO.
    pub fn info(option: u32, request: &InfoRequest) -> Self {
        let mut data = Vec::with_capacity(6 + request.name.len() + 2 * request.infos.len());
        put_string32(&mut data, &request.name);
        data.extend_from_slice(&(request.infos.len() as u16).to_be_bytes());
        for info in &request.infos {
            data.extend_from_slice(&info.to_be_bytes());
        }
        OptionRequest { option, data }
    }

    /// NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT.
    pub fn meta_context(option: u32, request: &MetaContextRequest) -> Self {
        let mut data = Vec::new();
        put_string32(&mut data, &request.export);
        data.extend_from_slice(&(request.queries.len() as u32).to_be_bytes());
        for query in &request.queries {
            put_string32(&mut data, query);
        }
        OptionRequest { option, data }
    }
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn get_string32(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let len = r.u32()? as usize;
    if len > r.remaining() {
        return Err(DecodeError::Invalid(format!(
            "string length {len} exceeds the {} bytes left in the option",
            r.remaining()
        )));
    }
    r.string(len)
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data, "NBD_OPT_INFO/GO data");
        let name = get_string32(&mut r)?;
        let n = r.u16()? as usize;
        let mut infos = Vec::with_capacity(n.min(r.remaining() / 2));
        for _ in 0..n {
            infos.push(r.u16()?);
        }
        r.finish()?;
        Ok(InfoRequest { name, infos })
    }
}

/// Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data, "meta context request");
        let export = get_string32(&mut r)?;
        let n = r.u32()? as usize;
        // Each query needs at least 4 bytes, so a huge count is caught before allocating.
        let mut queries = Vec::with_capacity(n.min(r.remaining() / 4));
        for _ in 0..n {
            queries.push(get_string32(&mut r)?);
        }
        r.finish()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// The typed payload of an NBD_REP_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize(BlockSize),
    /// An info type this implementation does not know; clients ignore it.
    Unknown {
        info_type: u16,
        data: Vec<u8>,
    },
}

/// Block-size constraints of an export (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSize {
    /// What the spec tells a client to assume when the server says nothing.
    pub const DEFAULT: BlockSize = BlockSize {
        minimum: DEFAULT_MIN_BLOCK,
        preferred: DEFAULT_PREFERRED_BLOCK,
        maximum: DEFAULT_MAX_PAYLOAD,
    };

    /// Checks the spec's rules: minimum and preferred are powers of two, minimum ≤ 64 KiB,
    /// preferred ≥ minimum, and maximum ≥ minimum and either a multiple of minimum (it need not be
    /// a power of two) or 0xffffffff, "no inherent limit". The spec only asks maximum to reach the
    /// smaller of preferred and the export size, which cannot be checked without the size.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let b = self;
        let ok = b.minimum.is_power_of_two()
            && b.minimum <= 64 * 1024
            && b.preferred.is_power_of_two()
            && b.preferred >= b.minimum
            && b.maximum >= b.minimum
            && (b.maximum == u32::MAX || b.maximum.is_multiple_of(b.minimum));
        if ok {
            Ok(())
        } else {
            Err(DecodeError::Invalid(format!(
                "server sent inconsistent block sizes: minimum {}, preferred {}, maximum {}",
                b.minimum, b.preferred, b.maximum
            )))
        }
    }
}

impl Info {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(s) => {
                out.extend_from_slice(&INFO_NAME.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Info::Description(s) => {
                out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize(b) => {
                out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&b.minimum.to_be_bytes());
                out.extend_from_slice(&b.preferred.to_be_bytes());
                out.extend_from_slice(&b.maximum.to_be_bytes());
            }
            Info::Unknown { info_type, data } => {
                out.extend_from_slice(&info_type.to_be_bytes());
                out.extend_from_slice(data);
            }
        }
    }

    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data, "NBD_REP_INFO");
        let info_type = r.u16()?;
        let info = match info_type {
            INFO_EXPORT => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            INFO_NAME => {
                let len = r.remaining();
                Info::Name(r.string(len)?)
            }
            INFO_DESCRIPTION => {
                let len = r.remaining();
                Info::Description(r.string(len)?)
            }
            INFO_BLOCK_SIZE => Info::BlockSize(BlockSize {
                minimum: r.u32()?,
                preferred: r.u32()?,
                maximum: r.u32()?,
            }),
            _ => Info::Unknown {
                info_type,
                data: r.rest().to_vec(),
            },
        };
        r.finish()?;
        Ok(info)
    }
}

/// Header of an option reply: `REPLY_MAGIC | u32 option | u32 type | u32 length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub const OPTION_REPLY_HEADER_LEN: usize = 20;

impl OptionReplyHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf, "option reply");
        let magic = r.u64()?;
        if magic != REPLY_MAGIC {
            return Err(DecodeError::Invalid(format!(
                "option reply: bad magic {magic:#018x}"
            )));
        }
        Ok(OptionReplyHeader {
            option: r.u32()?,
            reply_type: r.u32()?,
            length: r.u32()?,
        })
    }
}

/// A decoded option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    Server {
        name: String,
        description: String,
    },
    Info(Info),
    MetaContext {
        id: u32,
        name: String,
    },
    /// Any reply type with the error bit set; `code` is the full reply type.
    Error {
        code: u32,
        message: String,
    },
    /// A non-error reply type this implementation does not know.
    Unknown {
        reply_type: u32,
        data: Vec<u8>,
    },
}

impl OptionReply {
    /// Encodes the whole reply (header and payload) to `option`.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) {
        let mut payload = Vec::new();
        let reply_type = match self {
            OptionReply::Ack => REP_ACK,
            OptionReply::Server { name, description } => {
                put_string32(&mut payload, name);
                payload.extend_from_slice(description.as_bytes());
                REP_SERVER
            }
            OptionReply::Info(info) => {
                info.encode(&mut payload);
                REP_INFO
            }
            OptionReply::MetaContext { id, name } => {
                payload.extend_from_slice(&id.to_be_bytes());
                payload.extend_from_slice(name.as_bytes());
                REP_META_CONTEXT
            }
            OptionReply::Error { code, message } => {
                payload.extend_from_slice(message.as_bytes());
                *code
            }
            OptionReply::Unknown { reply_type, data } => {
                payload.extend_from_slice(data);
                *reply_type
            }
        };
        out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&reply_type.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
    }

    /// Decodes the payload of a reply whose header said `reply_type`.
    pub fn decode(reply_type: u32, data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data, "option reply");
        let reply = match reply_type {
            REP_ACK => OptionReply::Ack,
            REP_SERVER => {
                let name = get_string32(&mut r)?;
                let len = r.remaining();
                OptionReply::Server {
                    name,
                    description: r.string(len)?,
                }
            }
            REP_INFO => OptionReply::Info(Info::decode(r.rest())?),
            REP_META_CONTEXT => {
                let id = r.u32()?;
                let len = r.remaining();
                OptionReply::MetaContext {
                    id,
                    name: r.string(len)?,
                }
            }
            code if code & REP_FLAG_ERROR != 0 => {
                // Servers' messages are informational; keep what is valid UTF-8.
                let message = String::from_utf8_lossy(r.rest()).into_owned();
                OptionReply::Error { code, message }
            }
            _ => OptionReply::Unknown {
                reply_type,
                data: r.rest().to_vec(),
            },
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The reply to NBD_OPT_EXPORT_NAME: `u64 size | u16 flags | 124 zero bytes unless NO_ZEROES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: u16,
}

impl ExportNameReply {
    pub const LEN: usize = 10;
    pub const PADDING: usize = 124;

    pub fn encode(&self, no_zeroes: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        if !no_zeroes {
            out.extend_from_slice(&[0u8; Self::PADDING]);
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf, "NBD_OPT_EXPORT_NAME reply");
        Ok(ExportNameReply {
            size: r.u64()?,
            flags: r.u16()?,
        })
    }
}
