//! Everything a client decodes from server bytes: the greeting, option replies (or the
//! EXPORT_NAME reply), then a stream of transmission reply headers and chunk payloads.
//!
//! Input layout: one selector byte, then the server's byte stream.
//! selector bits 0-1: header mode (0 simple, 1 structured, 2 and 3 extended);
//! bit 2: the handshake ends with NBD_OPT_EXPORT_NAME instead of option replies;
//! bit 3: NO_ZEROES was negotiated (EXPORT_NAME reply without padding).
//!
//! Must never panic. Decoded messages are re-encoded and compared with their bytes wherever the
//! codec is lossless, so the target also catches decode/encode disagreements.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::proto::consts::*;
use nbd::proto::*;

/// Splits off up to `n` bytes (fewer if the input runs out), like a reader hitting EOF.
fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = input.split_at(n.min(input.len()));
    *input = tail;
    head
}

fn clamp(len: u64, input: &[u8]) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX).min(input.len())
}

fn handshake(input: &mut &[u8], export_name: bool, no_zeroes: bool) {
    if let Ok(Greeting::Newstyle { flags }) = Greeting::decode(take(input, GREETING_LEN)) {
        let mut again = Vec::new();
        Greeting::Newstyle { flags }.encode(&mut again);
        assert_eq!(Greeting::decode(&again), Ok(Greeting::Newstyle { flags }));
    }

    if export_name {
        let len = ExportNameReply::LEN
            + if no_zeroes {
                0
            } else {
                ExportNameReply::PADDING
            };
        if let Ok(reply) = ExportNameReply::decode(take(input, len)) {
            let _ = transmission_flag_names(reply.flags);
        }
        return;
    }

    // Option replies until something that is not one (the client would stop at GO's ACK).
    while input.len() >= OPTION_REPLY_HEADER_LEN {
        let Ok(header) = OptionReplyHeader::decode(&input[..OPTION_REPLY_HEADER_LEN]) else {
            break;
        };
        take(input, OPTION_REPLY_HEADER_LEN);
        let _ = option_name(header.option);
        let payload = take(input, clamp(header.length.into(), input));
        let Ok(reply) = OptionReply::decode(header.reply_type, payload) else {
            continue;
        };
        match &reply {
            OptionReply::Info(Info::BlockSize(b)) => {
                let _ = b.validate();
            }
            OptionReply::Info(Info::Export { flags, .. }) => {
                let _ = transmission_flag_names(*flags);
            }
            OptionReply::Error { code, .. } => {
                let _ = reply_error_name(*code);
            }
            _ => {}
        }
        // Error messages decode lossily; everything else must re-encode to the same bytes.
        let lossy =
            matches!(reply, OptionReply::Error { .. }) && std::str::from_utf8(payload).is_err();
        if !lossy {
            let mut again = Vec::new();
            reply.encode(header.option, &mut again);
            assert_eq!(&again[OPTION_REPLY_HEADER_LEN..], payload, "{reply:?}");
            // Unless the input ended early, the header comes back too.
            if payload.len() == header.length as usize {
                assert_eq!(
                    OptionReplyHeader::decode(&again),
                    Ok(header),
                    "option reply header of {reply:?}"
                );
            }
        }
    }
}

fn transmission(input: &mut &[u8], mode: HeaderMode) {
    while input.len() >= 4 {
        let magic: [u8; 4] = input[..4].try_into().unwrap();
        // An unknown magic leaves the client nothing to resynchronise on: it hard-disconnects.
        let Ok(header_len) = ReplyHeader::header_len(magic) else {
            return;
        };
        if input.len() < header_len {
            return;
        }
        let header_bytes = take(input, header_len);
        let header = match ReplyHeader::decode(header_bytes, mode) {
            Ok(header) => header,
            // A header kind not allowed in this mode: skip it to keep exercising the decoders.
            Err(_) => continue,
        };

        let mut again = Vec::new();
        match header {
            ReplyHeader::Simple { error, cookie } => {
                let _ = errno_name(error);
                ReplyHeader::encode_simple(error, cookie, &mut again);
            }
            ReplyHeader::Chunk {
                flags,
                chunk_type,
                cookie,
                offset,
                length,
            } => {
                assert_eq!(offset.is_some(), mode == HeaderMode::Extended);
                ReplyHeader::encode_chunk(
                    mode,
                    flags,
                    chunk_type,
                    cookie,
                    offset.unwrap_or(0),
                    length,
                    &mut again,
                );
                chunk(input, chunk_type, length);
            }
        }
        assert_eq!(&again[..], header_bytes, "{header:?}");
    }
}

/// Decodes one chunk payload the way the client reads it: OFFSET_DATA's 8-byte header, then its
/// data is skipped; any other chunk is read whole, capped by MAX_METADATA_CHUNK_LEN.
fn chunk(input: &mut &[u8], chunk_type: u16, length: u64) {
    if chunk_type != CHUNK_OFFSET_DATA && length > MAX_METADATA_CHUNK_LEN {
        // The client refuses to buffer this and disconnects; skip it here.
        take(input, clamp(length, input));
        return;
    }
    let claimed = clamp(length, input);
    let payload = if chunk_type == CHUNK_OFFSET_DATA {
        &input[..claimed.min(OFFSET_DATA_HEADER_LEN)]
    } else {
        &input[..claimed]
    };
    let decoded = Chunk::decode(chunk_type, payload, length);
    take(input, claimed);
    let Ok(decoded) = decoded else { return };
    match &decoded {
        Chunk::OffsetData { data_len, .. } => {
            assert!(*data_len > 0);
            assert_eq!(*data_len, length - OFFSET_DATA_HEADER_LEN as u64);
        }
        Chunk::UnknownError { chunk_type: t } => assert_eq!(*t, chunk_type),
        Chunk::Error { error, .. } | Chunk::ErrorOffset { error, .. } => {
            assert_ne!(*error, 0);
            let _ = errno_name(*error);
            let msg_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
            if std::str::from_utf8(&payload[6..6 + msg_len]).is_ok() {
                let mut again = Vec::new();
                assert_eq!(decoded.encode_payload(false, &mut again), chunk_type);
                assert_eq!(&again[..], payload, "{decoded:?}");
            }
        }
        Chunk::None | Chunk::OffsetHole { .. } | Chunk::BlockStatus { .. } => {
            let extended = chunk_type == CHUNK_BLOCK_STATUS_EXT;
            let mut again = Vec::new();
            assert_eq!(decoded.encode_payload(extended, &mut again), chunk_type);
            assert_eq!(&again[..], payload, "{decoded:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, mut input)) = data.split_first() else {
        return;
    };
    let mode = match selector & 3 {
        0 => HeaderMode::Simple,
        1 => HeaderMode::Structured,
        _ => HeaderMode::Extended,
    };
    handshake(&mut input, selector & 4 != 0, selector & 8 != 0);
    transmission(&mut input, mode);
});
