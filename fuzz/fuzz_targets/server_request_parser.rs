//! Everything a server decodes from client bytes: client flags, option requests with their
//! typed payloads (INFO/GO, LIST/SET_META_CONTEXT), then transmission request headers, skipping
//! each request's payload as `Request::payload_len` says.
//!
//! Input layout: one selector byte, then the client's byte stream.
//! selector bits 0-1: header mode (0 simple, 1 structured, 2 and 3 extended).
//!
//! Must never panic. Decoded messages are re-encoded and compared with their bytes.

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

/// Option haggling; returns once an option would start transmission (GO, EXPORT_NAME) or the
/// bytes are no longer option requests.
fn handshake(input: &mut &[u8]) {
    // Client flags.
    let _ = take(input, 4);
    while input.len() >= OPTION_HEADER_LEN {
        let Ok((option, len)) = OptionRequest::decode_header(&input[..OPTION_HEADER_LEN]) else {
            return;
        };
        take(input, OPTION_HEADER_LEN);
        let _ = option_name(option);
        let data = take(input, clamp(len.into(), input));
        match option {
            OPT_INFO | OPT_GO => {
                if let Ok(request) = InfoRequest::decode(data) {
                    assert!(request.name.len() <= MAX_STRING_LEN);
                    assert_eq!(
                        OptionRequest::info(option, &request).data,
                        data,
                        "{request:?}"
                    );
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if let Ok(request) = MetaContextRequest::decode(data) {
                    assert!(request.queries.iter().all(|q| q.len() <= MAX_STRING_LEN));
                    assert_eq!(
                        OptionRequest::meta_context(option, &request).data,
                        data,
                        "{request:?}"
                    );
                }
            }
            _ => {}
        }
        let mut again = Vec::new();
        OptionRequest {
            option,
            data: data.to_vec(),
        }
        .encode(&mut again);
        if data.len() == len as usize {
            assert_eq!(
                OptionRequest::decode_header(&again),
                Ok((option, len)),
                "option header"
            );
        }
        if matches!(option, OPT_GO | OPT_EXPORT_NAME) {
            return;
        }
    }
}

fn transmission(input: &mut &[u8], mode: HeaderMode) {
    while input.len() >= 4 {
        let magic: [u8; 4] = input[..4].try_into().unwrap();
        let Ok(header_len) = Request::header_len(magic) else {
            return;
        };
        if input.len() < header_len {
            return;
        }
        let header_bytes = take(input, header_len);
        let request = match Request::decode(header_bytes, mode) {
            Ok(request) => request,
            // The wrong layout for this mode: skip it to keep exercising the decoder.
            Err(_) => continue,
        };
        assert_eq!(header_len, mode.request_len());
        let _ = command_name(request.command);

        let extended_write_without_flag = mode == HeaderMode::Extended
            && request.command == CMD_WRITE
            && request.flags & CMD_FLAG_PAYLOAD_LEN == 0;
        if !extended_write_without_flag {
            let mut again = Vec::new();
            request.encode(mode, &mut again);
            assert_eq!(&again[..], header_bytes, "{request:?}");
        }

        let payload = request.payload_len(mode);
        if payload > 0 {
            assert_eq!(payload, request.length);
        }
        take(input, clamp(payload, input));
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
    handshake(&mut input);
    transmission(&mut input, mode);
});
