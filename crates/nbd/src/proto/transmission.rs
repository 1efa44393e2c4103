//! Transmission-phase messages: requests (compact and extended), reply headers (simple,
//! structured, extended) and the payloads of structured reply chunks. Shared by the client, the
//! server and the fuzz targets.

use super::DecodeError;
use super::consts::*;
use super::cursor::Reader;

/// Which header layout both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMode {
    /// No structured replies: compact requests, simple replies only.
    Simple,
    /// STRUCTURED_REPLY: compact requests, structured chunks (simple replies for payload-less commands).
    Structured,
    /// EXTENDED_HEADERS: 32-byte requests and reply chunks, 64-bit lengths.
    Extended,
}

impl HeaderMode {
    pub fn request_len(self) -> usize {
        match self {
            HeaderMode::Extended => EXTENDED_REQUEST_LEN,
            _ => COMPACT_REQUEST_LEN,
        }
    }
}

/// A request header. For WRITE (and BLOCK_STATUS with PAYLOAD_LEN) `length` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    /// Appends the header in `mode`'s layout. In compact modes `length` must fit in 32 bits; callers
    /// split requests before they get here.
    pub fn encode(&self, mode: HeaderMode, out: &mut Vec<u8>) {
        let extended = mode == HeaderMode::Extended;
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        out.extend_from_slice(&magic.to_be_bytes());
        let mut flags = self.flags;
        if extended && self.command == CMD_WRITE {
            // Extended headers require WRITE to say its length is a payload length.
            flags |= CMD_FLAG_PAYLOAD_LEN;
        }
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            debug_assert!(self.length <= u32::MAX as u64, "compact request too long");
            out.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
    }

    /// Length of the header whose first four bytes (the magic) are `magic`.
    pub fn header_len(magic: [u8; 4]) -> Result<usize, DecodeError> {
        match u32::from_be_bytes(magic) {
            REQUEST_MAGIC => Ok(COMPACT_REQUEST_LEN),
            EXTENDED_REQUEST_MAGIC => Ok(EXTENDED_REQUEST_LEN),
            other => Err(DecodeError::Invalid(format!(
                "request: bad magic {other:#010x}"
            ))),
        }
    }

    /// Decodes a request header; `mode` says which layout the client must use.
    pub fn decode(buf: &[u8], mode: HeaderMode) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf, "request");
        let magic = r.u32()?;
        let expected = if mode == HeaderMode::Extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != expected {
            return Err(DecodeError::Invalid(format!(
                "request: magic {magic:#010x}, expected {expected:#010x}"
            )));
        }
        let flags = r.u16()?;
        let command = r.u16()?;
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = if mode == HeaderMode::Extended {
            r.u64()?
        } else {
            u64::from(r.u32()?)
        };
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    /// Bytes of payload that follow this header on the wire. A WRITE's length is always its
    /// payload, with or without PAYLOAD_LEN (qemu sends extended WRITEs without the flag).
    pub fn payload_len(&self, mode: HeaderMode) -> u64 {
        match mode {
            _ if self.command == CMD_WRITE => self.length,
            HeaderMode::Extended if self.flags & CMD_FLAG_PAYLOAD_LEN != 0 => self.length,
            _ => 0,
        }
    }
}

/// A reply header of any of the three kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply; a successful READ is followed by exactly the requested bytes.
    Simple { error: u32, cookie: u64 },
    /// One chunk of a structured or extended reply; `length` payload bytes follow. `offset` is
    /// the request offset echoed by extended chunks (None for compact chunks).
    Chunk {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        offset: Option<u64>,
        length: u64,
    },
}

impl ReplyHeader {
    /// Length of the reply header that starts with `magic`.
    pub fn header_len(magic: [u8; 4]) -> Result<usize, DecodeError> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
            EXTENDED_REPLY_MAGIC => Ok(EXTENDED_REPLY_LEN),
            other => Err(DecodeError::Invalid(format!(
                "reply: bad magic {other:#010x}"
            ))),
        }
    }

    /// Decodes a full header and checks that its kind is allowed in `mode`.
    pub fn decode(buf: &[u8], mode: HeaderMode) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf, "reply");
        let magic = r.u32()?;
        let header = match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: r.u32()?,
                cookie: r.u64()?,
            },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: r.u16()?,
                chunk_type: r.u16()?,
                cookie: r.u64()?,
                offset: None,
                length: u64::from(r.u32()?),
            },
            EXTENDED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: r.u16()?,
                chunk_type: r.u16()?,
                cookie: r.u64()?,
                offset: Some(r.u64()?),
                length: r.u64()?,
            },
            other => {
                return Err(DecodeError::Invalid(format!(
                    "reply: bad magic {other:#010x}"
                )));
            }
        };
        let allowed = matches!(
            (mode, magic),
            (HeaderMode::Simple, SIMPLE_REPLY_MAGIC)
                | (
                    HeaderMode::Structured,
                    SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC
                )
                | (HeaderMode::Extended, EXTENDED_REPLY_MAGIC)
        );
        if !allowed {
            return Err(DecodeError::Invalid(format!(
                "reply: header magic {magic:#010x} not allowed with {mode:?} headers"
            )));
        }
        Ok(header)
    }

    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => *cookie,
        }
    }

    /// Appends a simple reply header.
    pub fn encode_simple(error: u32, cookie: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
    }

    /// Appends a chunk header in `mode`'s layout (Structured or Extended). `offset` is the
    /// request offset, echoed only by extended chunks.
    pub fn encode_chunk(
        mode: HeaderMode,
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        out: &mut Vec<u8>,
    ) {
        let extended = mode == HeaderMode::Extended;
        let magic = if extended {
            EXTENDED_REPLY_MAGIC
        } else {
            STRUCTURED_REPLY_MAGIC
        };
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&chunk_type.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        if extended {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        } else {
            out.extend_from_slice(&(length as u32).to_be_bytes());
        }
    }
}

/// One block-status descriptor: `length` bytes with status `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub length: u64,
    pub flags: u64,
}

/// The payload of a structured chunk, other than OFFSET_DATA's data bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    /// Only the header of OFFSET_DATA: the data offset. `data_len` bytes follow it.
    OffsetData {
        offset: u64,
        data_len: u64,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context: u32,
        descriptors: Vec<Descriptor>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    /// Unknown type with the error bit set: fails its reply, the connection stays usable.
    UnknownError {
        chunk_type: u16,
    },
}

/// Bytes of OFFSET_DATA's payload that precede the data.
pub const OFFSET_DATA_HEADER_LEN: usize = 8;

/// Upper bound for the payload of any chunk except OFFSET_DATA: an error message is ≤ 4096 bytes,
/// and a block-status chunk carries at most 2^20 extended descriptors (the spec's SHOULD).
pub const MAX_METADATA_CHUNK_LEN: u64 = 8 + 16 * (1 << 20);

impl Chunk {
    /// Decodes a complete chunk payload of `chunk_type` (for OFFSET_DATA, only the first 8 bytes
    /// are needed; `total_len` is the chunk length from the header).
    pub fn decode(chunk_type: u16, payload: &[u8], total_len: u64) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload, "reply chunk");
        let chunk = match chunk_type {
            CHUNK_NONE => Chunk::None,
            CHUNK_OFFSET_DATA => {
                let offset = r.u64()?;
                let data_len = total_len.saturating_sub(OFFSET_DATA_HEADER_LEN as u64);
                if data_len == 0 {
                    return Err(DecodeError::Invalid(
                        "OFFSET_DATA chunk without data".into(),
                    ));
                }
                r.rest();
                Chunk::OffsetData { offset, data_len }
            }
            CHUNK_OFFSET_HOLE => {
                let offset = r.u64()?;
                let length = r.u32()?;
                if length == 0 {
                    return Err(DecodeError::Invalid("OFFSET_HOLE chunk of length 0".into()));
                }
                Chunk::OffsetHole { offset, length }
            }
            CHUNK_BLOCK_STATUS => {
                let context = r.u32()?;
                if r.remaining() == 0 || !r.remaining().is_multiple_of(8) {
                    return Err(DecodeError::Invalid(format!(
                        "BLOCK_STATUS chunk: {} descriptor bytes, not a positive multiple of 8",
                        r.remaining()
                    )));
                }
                let mut descriptors = Vec::with_capacity(r.remaining() / 8);
                while r.remaining() > 0 {
                    let length = u64::from(r.u32()?);
                    let flags = u64::from(r.u32()?);
                    descriptors.push(Descriptor { length, flags });
                }
                Chunk::BlockStatus {
                    context,
                    descriptors,
                }
            }
            CHUNK_BLOCK_STATUS_EXT => {
                let context = r.u32()?;
                let count = r.u32()? as usize;
                if count == 0 || r.remaining() != count.saturating_mul(16) {
                    return Err(DecodeError::Invalid(format!(
                        "BLOCK_STATUS_EXT chunk: count {count} does not match {} descriptor bytes",
                        r.remaining()
                    )));
                }
                let mut descriptors = Vec::with_capacity(count);
                for _ in 0..count {
                    descriptors.push(Descriptor {
                        length: r.u64()?,
                        flags: r.u64()?,
                    });
                }
                Chunk::BlockStatus {
                    context,
                    descriptors,
                }
            }
            CHUNK_ERROR | CHUNK_ERROR_OFFSET => {
                let error = r.u32()?;
                let msg_len = r.u16()? as usize;
                let message = String::from_utf8_lossy(r.take(msg_len)?).into_owned();
                if error == 0 {
                    return Err(DecodeError::Invalid(
                        "error chunk with error value 0".into(),
                    ));
                }
                if chunk_type == CHUNK_ERROR_OFFSET {
                    Chunk::ErrorOffset {
                        error,
                        message,
                        offset: r.u64()?,
                    }
                } else {
                    Chunk::Error { error, message }
                }
            }
            t if t & CHUNK_ERROR_BIT != 0 => {
                r.rest();
                Chunk::UnknownError { chunk_type: t }
            }
            t => {
                return Err(DecodeError::Invalid(format!(
                    "unknown reply chunk type {t}"
                )));
            }
        };
        r.finish()?;
        Ok(chunk)
    }

    /// Appends this chunk's payload (for OffsetData, only the offset; the caller appends data).
    /// `extended` selects BLOCK_STATUS_EXT over BLOCK_STATUS.
    pub fn encode_payload(&self, extended: bool, out: &mut Vec<u8>) -> u16 {
        match self {
            Chunk::None => CHUNK_NONE,
            Chunk::OffsetData { offset, .. } => {
                out.extend_from_slice(&offset.to_be_bytes());
                CHUNK_OFFSET_DATA
            }
            Chunk::OffsetHole { offset, length } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
                CHUNK_OFFSET_HOLE
            }
            Chunk::BlockStatus {
                context,
                descriptors,
            } => {
                out.extend_from_slice(&context.to_be_bytes());
                if extended {
                    out.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
                    for d in descriptors {
                        out.extend_from_slice(&d.length.to_be_bytes());
                        out.extend_from_slice(&d.flags.to_be_bytes());
                    }
                    CHUNK_BLOCK_STATUS_EXT
                } else {
                    for d in descriptors {
                        out.extend_from_slice(&(d.length as u32).to_be_bytes());
                        out.extend_from_slice(&(d.flags as u32).to_be_bytes());
                    }
                    CHUNK_BLOCK_STATUS
                }
            }
            Chunk::Error { error, message } | Chunk::ErrorOffset { error, message, .. } => {
                out.extend_from_slice(&error.to_be_bytes());
                let msg = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
                out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                out.extend_from_slice(msg);
                if let Chunk::ErrorOffset { offset, .. } = self {
                    out.extend_from_slice(&offset.to_be_bytes());
                    CHUNK_ERROR_OFFSET
                } else {
                    CHUNK_ERROR
                }
            }
            Chunk::UnknownError { chunk_type } => *chunk_type,
        }
    }
}
