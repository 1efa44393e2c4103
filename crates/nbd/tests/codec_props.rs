//! Property tests of the sans-IO codec in `nbd::proto`: every encoder round-trips through its
//! decoder, every decoder that accepts input re-encodes it byte for byte, and no decoder panics on
//! arbitrary bytes. A few targeted tests cover limits (string length, huge counts) and
//! `BlockSize::validate`.

use nbd::proto::consts::*;
use nbd::proto::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// A valid NBD string: arbitrary Unicode, far below the 4096-byte limit.
fn nbd_string() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..48).prop_map(String::from_iter)
}

fn any_mode() -> impl Strategy<Value = HeaderMode> {
    prop_oneof![
        Just(HeaderMode::Simple),
        Just(HeaderMode::Structured),
        Just(HeaderMode::Extended),
    ]
}

fn block_size() -> impl Strategy<Value = BlockSize> {
    (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| BlockSize {
        minimum,
        preferred,
        maximum,
    })
}

fn info() -> impl Strategy<Value = Info> {
    prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| Info::Export { size, flags }),
        nbd_string().prop_map(Info::Name),
        nbd_string().prop_map(Info::Description),
        block_size().prop_map(Info::BlockSize),
        (
            (INFO_BLOCK_SIZE + 1)..=u16::MAX,
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(info_type, data)| Info::Unknown { info_type, data }),
    ]
}

fn option_reply() -> impl Strategy<Value = OptionReply> {
    prop_oneof![
        Just(OptionReply::Ack),
        (nbd_string(), nbd_string())
            .prop_map(|(name, description)| OptionReply::Server { name, description }),
        info().prop_map(OptionReply::Info),
        (any::<u32>(), nbd_string()).prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
        (any::<u32>(), nbd_string()).prop_map(|(code, message)| OptionReply::Error {
            code: code | REP_FLAG_ERROR,
            message
        }),
        (
            (0..REP_FLAG_ERROR).prop_filter("known reply type", |t| {
                !matches!(*t, REP_ACK | REP_SERVER | REP_INFO | REP_META_CONTEXT)
            }),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(reply_type, data)| OptionReply::Unknown { reply_type, data }),
    ]
}

/// Descriptors that survive the 32-bit compact encoding.
fn compact_descriptors() -> impl Strategy<Value = Vec<Descriptor>> {
    prop::collection::vec(
        (any::<u32>(), any::<u32>()).prop_map(|(length, flags)| Descriptor {
            length: length.into(),
            flags: flags.into(),
        }),
        1..32,
    )
}

fn ext_descriptors() -> impl Strategy<Value = Vec<Descriptor>> {
    prop::collection::vec(
        (any::<u64>(), any::<u64>()).prop_map(|(length, flags)| Descriptor { length, flags }),
        1..32,
    )
}

/// A chunk payload that `encode_payload(extended, ..)` encodes completely, with `extended`.
fn chunk_payload() -> impl Strategy<Value = (Chunk, bool)> {
    let extended = any::<bool>();
    prop_oneof![
        extended.prop_map(|e| (Chunk::None, e)),
        (any::<u64>(), 1..=u32::MAX, any::<bool>())
            .prop_map(|(offset, length, e)| (Chunk::OffsetHole { offset, length }, e)),
        (any::<u32>(), compact_descriptors()).prop_map(|(context, descriptors)| (
            Chunk::BlockStatus {
                context,
                descriptors
            },
            false
        )),
        (any::<u32>(), ext_descriptors()).prop_map(|(context, descriptors)| (
            Chunk::BlockStatus {
                context,
                descriptors
            },
            true
        )),
        (1..=u32::MAX, nbd_string(), any::<bool>())
            .prop_map(|(error, message, e)| (Chunk::Error { error, message }, e)),
        (1..=u32::MAX, nbd_string(), any::<u64>(), any::<bool>()).prop_map(
            |(error, message, offset, e)| (
                Chunk::ErrorOffset {
                    error,
                    message,
                    offset
                },
                e
            )
        ),
    ]
}

/// Mostly random bytes, but often starting with one of `prefixes` so that decoders get past
/// their magic or length checks and exercise the deeper paths.
fn bytes_with_prefix(prefixes: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let tail = prop::collection::vec(any::<u8>(), 0..96);
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..160),
        3 => (prop::sample::select(prefixes), tail).prop_map(|(mut p, t)| {
            p.extend_from_slice(&t);
            p
        }),
    ]
}

/// Big-endian u32s that are small, on a boundary, or huge: good string lengths and counts.
fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..16,
        Just(4096),
        Just(4097),
        Just(u32::MAX / 16 + 1),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

/// A length-prefixed item sequence: `u32 len | bytes` pieces, often well-formed.
fn length_prefixed_soup() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            interesting_u32().prop_map(|n| n.to_be_bytes().to_vec()),
            (any::<u16>()).prop_map(|n| (n % 8).to_be_bytes().to_vec()),
            prop::collection::vec(any::<u8>(), 0..12),
            nbd_string().prop_map(|s| {
                let mut v = (s.len() as u32).to_be_bytes().to_vec();
                v.extend_from_slice(s.as_bytes());
                v
            }),
        ],
        0..8,
    )
    .prop_map(|pieces| pieces.concat())
}

/// A well-formed encoding from `valid`, kept as is or damaged in one place: truncated,
/// extended with junk, or with four bytes overwritten by an interesting length or count.
fn mutated(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let damage = prop_oneof![
        Just(None),
        (
            any::<prop::sample::Index>(),
            0u8..3,
            interesting_u32(),
            prop::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(Some),
    ];
    (valid, damage).prop_map(|(mut buf, damage)| {
        if let Some((at, how, value, junk)) = damage {
            let i = at.index(buf.len() + 1);
            match how {
                0 => buf.truncate(i),
                1 => buf.extend_from_slice(&junk),
                _ => {
                    for (k, b) in value.to_be_bytes().into_iter().enumerate() {
                        if let Some(slot) = buf.get_mut(i + k) {
                            *slot = b;
                        }
                    }
                }
            }
        }
        buf
    })
}

fn info_request_data() -> impl Strategy<Value = Vec<u8>> {
    (nbd_string(), prop::collection::vec(any::<u16>(), 0..8))
        .prop_map(|(name, infos)| OptionRequest::info(OPT_GO, &InfoRequest { name, infos }).data)
}

fn meta_context_request_data() -> impl Strategy<Value = Vec<u8>> {
    (nbd_string(), prop::collection::vec(nbd_string(), 0..6)).prop_map(|(export, queries)| {
        OptionRequest::meta_context(
            OPT_SET_META_CONTEXT,
            &MetaContextRequest { export, queries },
        )
        .data
    })
}

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

// ---------------------------------------------------------------------------------------------
// Round trips: handshake
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn greeting_round_trip(flags in any::<u16>(), oldstyle in any::<bool>()) {
        let greeting = if oldstyle { Greeting::Oldstyle } else { Greeting::Newstyle { flags } };
        let mut buf = Vec::new();
        greeting.encode(&mut buf);
        prop_assert_eq!(buf.len(), GREETING_LEN);
        prop_assert_eq!(Greeting::decode(&buf), Ok(greeting));
    }

    #[test]
    fn option_request_header_round_trip(
        option in any::<u32>(),
        data in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut buf = Vec::new();
        OptionRequest { option, data: data.clone() }.encode(&mut buf);
        prop_assert_eq!(buf.len(), OPTION_HEADER_LEN + data.len());
        let (opt, len) = OptionRequest::decode_header(&buf[..OPTION_HEADER_LEN]).unwrap();
        prop_assert_eq!(opt, option);
        prop_assert_eq!(len as usize, data.len());
        prop_assert_eq!(&buf[OPTION_HEADER_LEN..], &data[..]);
    }

    #[test]
    fn info_request_round_trip(
        go in any::<bool>(),
        name in nbd_string(),
        infos in prop::collection::vec(any::<u16>(), 0..32),
    ) {
        let option = if go { OPT_GO } else { OPT_INFO };
        let request = InfoRequest { name, infos };
        let encoded = OptionRequest::info(option, &request);
        prop_assert_eq!(encoded.option, option);
        let mut buf = Vec::new();
        encoded.encode(&mut buf);
        let (opt, len) = OptionRequest::decode_header(&buf).unwrap();
        prop_assert_eq!(opt, option);
        let data = &buf[OPTION_HEADER_LEN..];
        prop_assert_eq!(len as usize, data.len());
        prop_assert_eq!(InfoRequest::decode(data), Ok(request));
    }

    #[test]
    fn meta_context_request_round_trip(
        set in any::<bool>(),
        export in nbd_string(),
        queries in prop::collection::vec(nbd_string(), 0..16),
    ) {
        let option = if set { OPT_SET_META_CONTEXT } else { OPT_LIST_META_CONTEXT };
        let request = MetaContextRequest { export, queries };
        let encoded = OptionRequest::meta_context(option, &request);
        let mut buf = Vec::new();
        encoded.encode(&mut buf);
        let (opt, len) = OptionRequest::decode_header(&buf).unwrap();
        prop_assert_eq!(opt, option);
        let data = &buf[OPTION_HEADER_LEN..];
        prop_assert_eq!(len as usize, data.len());
        prop_assert_eq!(MetaContextRequest::decode(data), Ok(request));
    }

    #[test]
    fn info_round_trip(info in info()) {
        let mut buf = Vec::new();
        info.encode(&mut buf);
        prop_assert_eq!(Info::decode(&buf), Ok(info));
    }

    #[test]
    fn option_reply_round_trip(option in any::<u32>(), reply in option_reply()) {
        let mut buf = Vec::new();
        reply.encode(option, &mut buf);
        let header = OptionReplyHeader::decode(&buf[..OPTION_REPLY_HEADER_LEN]).unwrap();
        prop_assert_eq!(header.option, option);
        let payload = &buf[OPTION_REPLY_HEADER_LEN..];
        prop_assert_eq!(header.length as usize, payload.len());
        let expected_type = match &reply {
            OptionReply::Ack => REP_ACK,
            OptionReply::Server { .. } => REP_SERVER,
            OptionReply::Info(_) => REP_INFO,
            OptionReply::MetaContext { .. } => REP_META_CONTEXT,
            OptionReply::Error { code, .. } => *code,
            OptionReply::Unknown { reply_type, .. } => *reply_type,
        };
        prop_assert_eq!(header.reply_type, expected_type);
        prop_assert_eq!(OptionReply::decode(header.reply_type, payload), Ok(reply));
    }

    #[test]
    fn export_name_reply_round_trip(
        size in any::<u64>(),
        flags in any::<u16>(),
        no_zeroes in any::<bool>(),
    ) {
        let reply = ExportNameReply { size, flags };
        let mut buf = Vec::new();
        reply.encode(no_zeroes, &mut buf);
        let expected_len = ExportNameReply::LEN + if no_zeroes { 0 } else { ExportNameReply::PADDING };
        prop_assert_eq!(buf.len(), expected_len);
        prop_assert!(buf[ExportNameReply::LEN..].iter().all(|&b| b == 0));
        prop_assert_eq!(ExportNameReply::decode(&buf), Ok(reply));
        prop_assert_eq!(ExportNameReply::decode(&buf[..ExportNameReply::LEN]), Ok(reply));
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips: transmission
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn request_round_trip(
        mode in any_mode(),
        flags in any::<u16>(),
        command in prop_oneof![0u16..=CMD_RESIZE, any::<u16>()],
        cookie in any::<u64>(),
        offset in any::<u64>(),
        length in any::<u64>(),
    ) {
        let extended = mode == HeaderMode::Extended;
        let length = if extended { length } else { length & u64::from(u32::MAX) };
        let request = Request { flags, command, cookie, offset, length };
        let mut buf = Vec::new();
        request.encode(mode, &mut buf);
        prop_assert_eq!(buf.len(), mode.request_len());
        prop_assert_eq!(Request::header_len(buf[..4].try_into().unwrap()), Ok(buf.len()));

        let decoded = Request::decode(&buf, mode).unwrap();
        let mut expected = request;
        if extended && command == CMD_WRITE {
            expected.flags |= CMD_FLAG_PAYLOAD_LEN;
        }
        prop_assert_eq!(decoded, expected);

        // What follows the header on the wire.
        let payload = decoded.payload_len(mode);
        if extended {
            let has_payload = decoded.flags & CMD_FLAG_PAYLOAD_LEN != 0;
            prop_assert_eq!(payload, if has_payload { length } else { 0 });
            if command == CMD_WRITE {
                prop_assert_eq!(payload, length);
            }
        } else {
            prop_assert_eq!(payload, if command == CMD_WRITE { length } else { 0 });
        }

        // A header in the other layout is refused.
        let other = if extended { HeaderMode::Structured } else { HeaderMode::Extended };
        prop_assert!(Request::decode(&buf, other).is_err());
    }

    #[test]
    fn simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
        let mut buf = Vec::new();
        ReplyHeader::encode_simple(error, cookie, &mut buf);
        prop_assert_eq!(buf.len(), SIMPLE_REPLY_LEN);
        prop_assert_eq!(ReplyHeader::header_len(buf[..4].try_into().unwrap()), Ok(SIMPLE_REPLY_LEN));
        let expected = ReplyHeader::Simple { error, cookie };
        prop_assert_eq!(ReplyHeader::decode(&buf, HeaderMode::Simple), Ok(expected));
        prop_assert_eq!(ReplyHeader::decode(&buf, HeaderMode::Structured), Ok(expected));
        prop_assert!(ReplyHeader::decode(&buf, HeaderMode::Extended).is_err());
        prop_assert_eq!(expected.cookie(), cookie);
    }

    #[test]
    fn chunk_header_round_trip(
        extended in any::<bool>(),
        flags in any::<u16>(),
        chunk_type in any::<u16>(),
        cookie in any::<u64>(),
        offset in any::<u64>(),
        length in any::<u64>(),
    ) {
        let mode = if extended { HeaderMode::Extended } else { HeaderMode::Structured };
        let length = if extended { length } else { length & u64::from(u32::MAX) };
        let mut buf = Vec::new();
        ReplyHeader::encode_chunk(mode, flags, chunk_type, cookie, offset, length, &mut buf);
        let header_len = if extended { EXTENDED_REPLY_LEN } else { STRUCTURED_REPLY_LEN };
        prop_assert_eq!(buf.len(), header_len);
        prop_assert_eq!(ReplyHeader::header_len(buf[..4].try_into().unwrap()), Ok(header_len));
        let expected = ReplyHeader::Chunk {
            flags,
            chunk_type,
            cookie,
            offset: extended.then_some(offset),
            length,
        };
        prop_assert_eq!(ReplyHeader::decode(&buf, mode), Ok(expected));
        prop_assert_eq!(expected.cookie(), cookie);
        // Chunks are never allowed without structured replies, and each layout only in its mode.
        prop_assert!(ReplyHeader::decode(&buf, HeaderMode::Simple).is_err());
        let other = if extended { HeaderMode::Structured } else { HeaderMode::Extended };
        prop_assert!(ReplyHeader::decode(&buf, other).is_err());
    }

    #[test]
    fn chunk_payload_round_trip((chunk, extended) in chunk_payload()) {
        let mut payload = Vec::new();
        let chunk_type = chunk.encode_payload(extended, &mut payload);
        prop_assert_eq!(
            Chunk::decode(chunk_type, &payload, payload.len() as u64),
            Ok(chunk.clone())
        );
        if let Chunk::BlockStatus { .. } = chunk {
            let want = if extended { CHUNK_BLOCK_STATUS_EXT } else { CHUNK_BLOCK_STATUS };
            prop_assert_eq!(chunk_type, want);
        }
    }

    /// A whole chunk on the wire: header, then payload, decoded the way a client reads it.
    #[test]
    fn chunk_frame_round_trip(
        (chunk, extended) in chunk_payload(),
        cookie in any::<u64>(),
        offset in any::<u64>(),
        done in any::<bool>(),
    ) {
        let mode = if extended { HeaderMode::Extended } else { HeaderMode::Structured };
        let mut payload = Vec::new();
        let chunk_type = chunk.encode_payload(extended, &mut payload);
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        let mut wire = Vec::new();
        ReplyHeader::encode_chunk(
            mode, flags, chunk_type, cookie, offset, payload.len() as u64, &mut wire,
        );
        wire.extend_from_slice(&payload);

        let hlen = ReplyHeader::header_len(wire[..4].try_into().unwrap()).unwrap();
        let header = ReplyHeader::decode(&wire[..hlen], mode).unwrap();
        let ReplyHeader::Chunk { chunk_type: t, length, flags: f, .. } = header else {
            panic!("expected a chunk header, got {header:?}");
        };
        prop_assert_eq!(f, flags);
        let body = &wire[hlen..hlen + length as usize];
        prop_assert_eq!(Chunk::decode(t, body, length), Ok(chunk));
    }

    #[test]
    fn offset_data_round_trip(offset in any::<u64>(), data_len in 1u64..=u64::MAX - 8) {
        let chunk = Chunk::OffsetData { offset, data_len };
        let mut payload = Vec::new();
        let chunk_type = chunk.encode_payload(false, &mut payload);
        prop_assert_eq!(chunk_type, CHUNK_OFFSET_DATA);
        prop_assert_eq!(payload.len(), OFFSET_DATA_HEADER_LEN);
        let total = data_len + OFFSET_DATA_HEADER_LEN as u64;
        prop_assert_eq!(Chunk::decode(chunk_type, &payload, total), Ok(chunk));
        // No data at all is not a valid OFFSET_DATA chunk.
        prop_assert!(Chunk::decode(chunk_type, &payload, OFFSET_DATA_HEADER_LEN as u64).is_err());
    }

    #[test]
    fn unknown_error_chunk_round_trip(
        chunk_type in (CHUNK_ERROR_BIT..=u16::MAX)
            .prop_filter("known error type", |t| !matches!(*t, CHUNK_ERROR | CHUNK_ERROR_OFFSET)),
        junk in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let chunk = Chunk::UnknownError { chunk_type };
        let mut payload = Vec::new();
        prop_assert_eq!(chunk.encode_payload(false, &mut payload), chunk_type);
        prop_assert!(payload.is_empty());
        prop_assert_eq!(Chunk::decode(chunk_type, &junk, junk.len() as u64), Ok(chunk));
    }
}

// ---------------------------------------------------------------------------------------------
// Arbitrary bytes never panic (and whatever decodes re-encodes to the same bytes)
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn greeting_decode_never_panics(buf in bytes_with_prefix(vec![
        be64(NBDMAGIC),
        [be64(NBDMAGIC), be64(IHAVEOPT)].concat(),
        [be64(NBDMAGIC), be64(OLDSTYLE_MAGIC)].concat(),
    ])) {
        if let Ok(greeting) = Greeting::decode(&buf) {
            prop_assert!(buf.len() >= GREETING_LEN || greeting == Greeting::Oldstyle);
            if let Greeting::Newstyle { .. } = greeting {
                let mut again = Vec::new();
                greeting.encode(&mut again);
                prop_assert_eq!(&again[..], &buf[..GREETING_LEN]);
            }
        }
    }

    #[test]
    fn option_request_header_never_panics(buf in bytes_with_prefix(vec![be64(IHAVEOPT)])) {
        if let Ok((option, len)) = OptionRequest::decode_header(&buf) {
            prop_assert!(buf.len() >= OPTION_HEADER_LEN);
            prop_assert_eq!(&buf[8..12], &option.to_be_bytes());
            prop_assert_eq!(&buf[12..16], &len.to_be_bytes());
        }
    }

    #[test]
    fn info_request_decode_never_panics(buf in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..96),
        length_prefixed_soup(),
        mutated(info_request_data()),
    ]) {
        if let Ok(request) = InfoRequest::decode(&buf) {
            prop_assert_eq!(OptionRequest::info(OPT_GO, &request).data, buf);
        }
    }

    #[test]
    fn meta_context_request_decode_never_panics(buf in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..96),
        length_prefixed_soup(),
        mutated(meta_context_request_data()),
    ]) {
        if let Ok(request) = MetaContextRequest::decode(&buf) {
            prop_assert_eq!(OptionRequest::meta_context(OPT_SET_META_CONTEXT, &request).data, buf);
        }
    }

    #[test]
    fn info_decode_never_panics(buf in bytes_with_prefix(
        (0u16..6).map(|t| t.to_be_bytes().to_vec()).collect(),
    )) {
        if let Ok(info) = Info::decode(&buf) {
            let mut again = Vec::new();
            info.encode(&mut again);
            prop_assert_eq!(again, buf);
        }
    }

    #[test]
    fn option_reply_header_never_panics(buf in bytes_with_prefix(vec![be64(REPLY_MAGIC)])) {
        if let Ok(header) = OptionReplyHeader::decode(&buf) {
            prop_assert!(buf.len() >= OPTION_REPLY_HEADER_LEN);
            prop_assert_eq!(&buf[16..20], &header.length.to_be_bytes());
        }
    }

    #[test]
    fn option_reply_decode_never_panics(
        reply_type in prop_oneof![
            0u32..8,
            REP_FLAG_ERROR..=REP_ERR_EXT_HEADER_REQD + 1,
            any::<u32>(),
        ],
        data in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..96),
            length_prefixed_soup(),
            bytes_with_prefix((0u16..6).map(|t| t.to_be_bytes().to_vec()).collect()),
            mutated(option_reply().prop_map(|reply| {
                let mut buf = Vec::new();
                reply.encode(0, &mut buf);
                buf.split_off(OPTION_REPLY_HEADER_LEN)
            })),
        ],
    ) {
        if let Ok(reply) = OptionReply::decode(reply_type, &data) {
            let lossy = matches!(&reply, OptionReply::Error { .. })
                && std::str::from_utf8(&data).is_err();
            if !lossy {
                let mut again = Vec::new();
                reply.encode(0, &mut again);
                let header = OptionReplyHeader::decode(&again).unwrap();
                prop_assert_eq!(header.reply_type, reply_type);
                prop_assert_eq!(&again[OPTION_REPLY_HEADER_LEN..], &data[..]);
            }
        }
    }

    #[test]
    fn export_name_reply_never_panics(buf in prop::collection::vec(any::<u8>(), 0..160)) {
        let decoded = ExportNameReply::decode(&buf);
        prop_assert_eq!(decoded.is_ok(), buf.len() >= ExportNameReply::LEN);
    }

    #[test]
    fn request_decode_never_panics(
        mode in any_mode(),
        buf in bytes_with_prefix(vec![be32(REQUEST_MAGIC), be32(EXTENDED_REQUEST_MAGIC)]),
    ) {
        if buf.len() >= 4 {
            let magic: [u8; 4] = buf[..4].try_into().unwrap();
            if let Ok(len) = Request::header_len(magic) {
                prop_assert!(len == COMPACT_REQUEST_LEN || len == EXTENDED_REQUEST_LEN);
            }
        }
        if let Ok(request) = Request::decode(&buf, mode) {
            prop_assert!(buf.len() >= mode.request_len());
            let _ = request.payload_len(mode);
            let extended_write_without_flag = mode == HeaderMode::Extended
                && request.command == CMD_WRITE
                && request.flags & CMD_FLAG_PAYLOAD_LEN == 0;
            if !extended_write_without_flag {
                let mut again = Vec::new();
                request.encode(mode, &mut again);
                prop_assert_eq!(&again[..], &buf[..mode.request_len()]);
            }
        }
    }

    #[test]
    fn request_header_len_never_panics(magic in any::<[u8; 4]>(), mode in any_mode()) {
        let len = Request::header_len(magic);
        let _ = Request::decode(&magic, mode);
        let known = matches!(u32::from_be_bytes(magic), REQUEST_MAGIC | EXTENDED_REQUEST_MAGIC);
        prop_assert_eq!(len.is_ok(), known);
    }

    #[test]
    fn reply_header_decode_never_panics(
        mode in any_mode(),
        buf in bytes_with_prefix(vec![
            be32(SIMPLE_REPLY_MAGIC),
            be32(STRUCTURED_REPLY_MAGIC),
            be32(EXTENDED_REPLY_MAGIC),
        ]),
    ) {
        let claimed = buf
            .get(..4)
            .and_then(|m| ReplyHeader::header_len(m.try_into().unwrap()).ok());
        if let Ok(header) = ReplyHeader::decode(&buf, mode) {
            let len = claimed.expect("a decoded header has a known magic");
            prop_assert!(buf.len() >= len);
            let mut again = Vec::new();
            match header {
                ReplyHeader::Simple { error, cookie } => {
                    ReplyHeader::encode_simple(error, cookie, &mut again)
                }
                ReplyHeader::Chunk { flags, chunk_type, cookie, offset, length } => {
                    prop_assert_eq!(offset.is_some(), mode == HeaderMode::Extended);
                    ReplyHeader::encode_chunk(
                        mode, flags, chunk_type, cookie, offset.unwrap_or(0), length, &mut again,
                    )
                }
            }
            prop_assert_eq!(&again[..], &buf[..len]);
        }
    }

    #[test]
    fn reply_header_len_never_panics(magic in any::<[u8; 4]>(), mode in any_mode()) {
        let known = matches!(
            u32::from_be_bytes(magic),
            SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC
        );
        prop_assert_eq!(ReplyHeader::header_len(magic).is_ok(), known);
        prop_assert!(ReplyHeader::decode(&magic, mode).is_err());
    }

    #[test]
    fn chunk_decode_never_panics(
        chunk_type in prop_oneof![
            0u16..8,
            CHUNK_ERROR_BIT..CHUNK_ERROR_BIT + 4,
            any::<u16>(),
        ],
        payload in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..160),
            // Plausible block-status and error layouts with mismatched counts.
            (any::<u32>(), interesting_u32(), prop::collection::vec(any::<u8>(), 0..96))
                .prop_map(|(a, b, rest)| [be32(a), be32(b), rest].concat()),
            (1u32..200, 0u16..40, prop::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(e, n, rest)| [be32(e), n.to_be_bytes().to_vec(), rest].concat()),
            mutated(chunk_payload().prop_map(|(chunk, extended)| {
                let mut buf = Vec::new();
                chunk.encode_payload(extended, &mut buf);
                buf
            })),
        ],
        total_len in prop_oneof![
            Just(None),
            Just(Some(0u64)),
            Just(Some(u64::MAX)),
            any::<u64>().prop_map(Some),
        ],
    ) {
        let total_len = total_len.unwrap_or(payload.len() as u64);
        if let Ok(chunk) = Chunk::decode(chunk_type, &payload, total_len) {
            match &chunk {
                Chunk::OffsetData { data_len, .. } => {
                    prop_assert!(*data_len > 0);
                    prop_assert!(payload.len() >= OFFSET_DATA_HEADER_LEN);
                }
                Chunk::UnknownError { chunk_type: t } => {
                    prop_assert_eq!(*t, chunk_type);
                    prop_assert!(t & CHUNK_ERROR_BIT != 0);
                }
                Chunk::Error { .. } | Chunk::ErrorOffset { .. } => {
                    // Messages decode lossily; only valid UTF-8 re-encodes to the same bytes.
                    let msg_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
                    if std::str::from_utf8(&payload[6..6 + msg_len]).is_ok() {
                        let mut again = Vec::new();
                        prop_assert_eq!(chunk.encode_payload(false, &mut again), chunk_type);
                        prop_assert_eq!(again, payload);
                    }
                }
                _ => {
                    let extended = chunk_type == CHUNK_BLOCK_STATUS_EXT;
                    let mut again = Vec::new();
                    prop_assert_eq!(chunk.encode_payload(extended, &mut again), chunk_type);
                    prop_assert_eq!(again, payload);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Targeted tests
// ---------------------------------------------------------------------------------------------

fn string32(s: &[u8]) -> Vec<u8> {
    [be32(s.len() as u32), s.to_vec()].concat()
}

#[test]
fn meta_context_huge_count_fails_without_allocating() {
    // Export "", then a query count of 2^32-1 and nothing else.
    let data = [string32(b""), be32(u32::MAX)].concat();
    assert!(matches!(
        MetaContextRequest::decode(&data),
        Err(DecodeError::Truncated { .. })
    ));
    // A huge count followed by a few well-formed queries still fails cleanly.
    let mut data = [string32(b"disk"), be32(u32::MAX)].concat();
    for _ in 0..3 {
        data.extend(string32(b"base:allocation"));
    }
    assert!(MetaContextRequest::decode(&data).is_err());
    // A count one larger than the queries present.
    let data = [
        string32(b"disk"),
        be32(2),
        string32(CONTEXT_BASE_ALLOCATION.as_bytes()),
    ]
    .concat();
    assert!(MetaContextRequest::decode(&data).is_err());
}

#[test]
fn huge_string_lengths_fail_without_allocating() {
    // Export name length 2^32-1 with almost nothing behind it.
    let data = [be32(u32::MAX), b"x".to_vec()].concat();
    assert!(MetaContextRequest::decode(&data).is_err());
    assert!(InfoRequest::decode(&data).is_err());
    // INFO_GO with 65535 info requests announced, none present.
    let data = [string32(b""), 0xffffu16.to_be_bytes().to_vec()].concat();
    assert!(InfoRequest::decode(&data).is_err());
    // SERVER reply whose name length exceeds the payload.
    assert!(OptionReply::decode(REP_SERVER, &be32(u32::MAX)).is_err());
}

#[test]
fn strings_over_4096_bytes_are_rejected() {
    let ok = vec![b'a'; MAX_STRING_LEN];
    let long = vec![b'a'; MAX_STRING_LEN + 1];

    let request = |export: &[u8]| [string32(export), be32(1), string32(b"base:")].concat();
    assert!(MetaContextRequest::decode(&request(&ok)).is_ok());
    assert!(matches!(
        MetaContextRequest::decode(&request(&long)),
        Err(DecodeError::Invalid(_))
    ));
    let query = |q: &[u8]| [string32(b""), be32(1), string32(q)].concat();
    assert!(MetaContextRequest::decode(&query(&ok)).is_ok());
    assert!(MetaContextRequest::decode(&query(&long)).is_err());

    let info_request = |name: &[u8]| [string32(name), 0u16.to_be_bytes().to_vec()].concat();
    assert!(InfoRequest::decode(&info_request(&ok)).is_ok());
    assert!(InfoRequest::decode(&info_request(&long)).is_err());

    let info = |t: u16, s: &[u8]| [t.to_be_bytes().to_vec(), s.to_vec()].concat();
    for t in [INFO_NAME, INFO_DESCRIPTION] {
        assert!(Info::decode(&info(t, &ok)).is_ok());
        assert!(Info::decode(&info(t, &long)).is_err());
        assert!(OptionReply::decode(REP_INFO, &info(t, &long)).is_err());
    }

    assert!(OptionReply::decode(REP_META_CONTEXT, &[be32(1), ok.clone()].concat()).is_ok());
    assert!(OptionReply::decode(REP_META_CONTEXT, &[be32(1), long.clone()].concat()).is_err());
    assert!(OptionReply::decode(REP_SERVER, &string32(&long)).is_err());
    assert!(OptionReply::decode(REP_SERVER, &[string32(b"x"), long.clone()].concat()).is_err());
    assert!(OptionReply::decode(REP_SERVER, &[string32(&ok), ok.clone()].concat()).is_ok());
}

#[test]
fn invalid_utf8_strings_are_rejected() {
    let bad = [0xffu8, 0xfe];
    assert!(Info::decode(&[INFO_NAME.to_be_bytes().to_vec(), bad.to_vec()].concat()).is_err());
    assert!(MetaContextRequest::decode(&[string32(&bad), be32(0)].concat()).is_err());
    // Error messages are informational and decoded lossily.
    assert!(matches!(
        OptionReply::decode(REP_ERR_UNSUP, &bad),
        Ok(OptionReply::Error {
            code: REP_ERR_UNSUP,
            ..
        })
    ));
}

#[test]
fn block_size_validate() {
    let bs = |minimum, preferred, maximum| BlockSize {
        minimum,
        preferred,
        maximum,
    };
    let valid = [
        BlockSize::DEFAULT,
        bs(1, 4096, 32 << 20),
        bs(512, 4096, 32 << 20),
        bs(4096, 4096, 4096),
        bs(1, 1, 1),
        bs(64 * 1024, 64 * 1024, 64 * 1024),
        // Maximum need not be a power of two, only a multiple of the minimum...
        bs(512, 4096, 3 * 512 * 1024),
        bs(1, 4096, 1_000_000),
        // ...or 0xffffffff, "no inherent limit", whatever the minimum.
        bs(1, 4096, u32::MAX),
        bs(512, 4096, u32::MAX),
        bs(64 * 1024, 1 << 20, u32::MAX),
        // The spec only needs maximum ≥ min(preferred, export size): a small export may do this.
        bs(512, 4096, 1024),
    ];
    for b in valid {
        assert!(b.validate().is_ok(), "{b:?} should be valid");
    }
    let invalid = [
        bs(0, 4096, 32 << 20),            // minimum 0
        bs(3, 4096, 3 << 20),             // minimum not a power of two
        bs(128 * 1024, 1 << 20, 1 << 25), // minimum over 64 KiB
        bs(512, 0, 32 << 20),             // preferred 0
        bs(512, 3000, 32 << 20),          // preferred not a power of two
        bs(4096, 512, 32 << 20),          // preferred below minimum
        bs(4096, 4096, 2048),             // maximum below minimum
        bs(512, 4096, 0),                 // maximum 0
        bs(512, 4096, 1000),              // maximum not a multiple of minimum
        bs(512, 4096, u32::MAX - 1),      // nor is this one
    ];
    for b in invalid {
        assert!(b.validate().is_err(), "{b:?} should be invalid");
    }
}

#[test]
fn chunk_rule_violations_are_rejected() {
    // OFFSET_HOLE of size 0.
    let hole = [be64(0), be32(0)].concat();
    assert!(Chunk::decode(CHUNK_OFFSET_HOLE, &hole, 12).is_err());
    // BLOCK_STATUS without descriptors, or with a partial one.
    assert!(Chunk::decode(CHUNK_BLOCK_STATUS, &be32(1), 4).is_err());
    let partial = [be32(1), be32(4096), be32(0), be32(7)].concat();
    assert!(Chunk::decode(CHUNK_BLOCK_STATUS, &partial, 16).is_err());
    // BLOCK_STATUS_EXT whose count disagrees with its descriptors, or a count of 0.
    let one = [be64(4096), be64(0)].concat();
    for count in [0, 2, u32::MAX] {
        let ext = [be32(1), be32(count), one.clone()].concat();
        assert!(Chunk::decode(CHUNK_BLOCK_STATUS_EXT, &ext, ext.len() as u64).is_err());
    }
    // Error chunks with error value 0, or a message length past the payload.
    let zero = [be32(0), 0u16.to_be_bytes().to_vec()].concat();
    assert!(Chunk::decode(CHUNK_ERROR, &zero, 6).is_err());
    let overlong = [be32(EIO), 10u16.to_be_bytes().to_vec(), b"short".to_vec()].concat();
    assert!(Chunk::decode(CHUNK_ERROR, &overlong, overlong.len() as u64).is_err());
    // ERROR_OFFSET without its offset.
    let no_offset = [be32(EIO), 0u16.to_be_bytes().to_vec()].concat();
    assert!(Chunk::decode(CHUNK_ERROR_OFFSET, &no_offset, 6).is_err());
    // NONE with a payload; unknown non-error types.
    assert!(Chunk::decode(CHUNK_NONE, &[0], 1).is_err());
    for t in [3, 4, 7, 0x7fff] {
        assert!(Chunk::decode(t, &[], 0).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzz seeds
// ---------------------------------------------------------------------------------------------

/// Writes the seed corpus of the cargo-fuzz targets in `fuzz/` (valid conversations built with
/// this codec). Run with `cargo test -p nbd --test codec_props -- --ignored write_fuzz_seeds`.
/// Inputs start with the targets' selector byte: bits 0-1 header mode (0 simple, 1 structured,
/// 2 extended), bit 2 EXPORT_NAME handshake, bit 3 NO_ZEROES.
#[test]
#[ignore = "writes files into fuzz/seeds; run explicitly"]
fn write_fuzz_seeds() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    let write = |target: &str, name: &str, data: Vec<u8>| {
        let dir = seeds.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };

    // --- What a server sends (client_reply_parser) ---
    let greeting = |out: &mut Vec<u8>| {
        Greeting::Newstyle {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        }
        .encode(out)
    };
    let export_flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES;
    let go_replies = |out: &mut Vec<u8>, negotiate: u32| {
        OptionReply::Ack.encode(negotiate, out);
        OptionReply::MetaContext {
            id: 1,
            name: CONTEXT_BASE_ALLOCATION.into(),
        }
        .encode(OPT_SET_META_CONTEXT, out);
        OptionReply::Ack.encode(OPT_SET_META_CONTEXT, out);
        for info in [
            Info::Export {
                size: 1 << 20,
                flags: export_flags,
            },
            Info::BlockSize(BlockSize::DEFAULT),
            Info::Name("disk".into()),
            Info::Description("a test disk".into()),
        ] {
            OptionReply::Info(info).encode(OPT_GO, out);
        }
        OptionReply::Ack.encode(OPT_GO, out);
    };
    let chunks = |out: &mut Vec<u8>, mode: HeaderMode| {
        let extended = mode == HeaderMode::Extended;
        let mut put = |chunk: Chunk, data: &[u8], done: bool, cookie: u64| {
            let mut payload = Vec::new();
            let t = chunk.encode_payload(extended, &mut payload);
            payload.extend_from_slice(data);
            let flags = if done { REPLY_FLAG_DONE } else { 0 };
            let len = payload.len() as u64;
            ReplyHeader::encode_chunk(mode, flags, t, cookie, 0, len, out);
            out.extend_from_slice(&payload);
        };
        let data = [0xabu8; 16];
        put(
            Chunk::OffsetData {
                offset: 0,
                data_len: 16,
            },
            &data,
            false,
            1,
        );
        put(
            Chunk::OffsetHole {
                offset: 16,
                length: 4080,
            },
            &[],
            true,
            1,
        );
        let descriptors = vec![
            Descriptor {
                length: 4096,
                flags: 0,
            },
            Descriptor {
                length: 8192,
                flags: u64::from(STATE_HOLE | STATE_ZERO),
            },
        ];
        put(
            Chunk::BlockStatus {
                context: 1,
                descriptors,
            },
            &[],
            true,
            2,
        );
        put(
            Chunk::Error {
                error: EIO,
                message: "read failed".into(),
            },
            &[],
            true,
            3,
        );
        put(
            Chunk::ErrorOffset {
                error: EINVAL,
                message: String::new(),
                offset: 512,
            },
            &[],
            true,
            4,
        );
        put(Chunk::None, &[], true, 5);
    };

    let mut s = vec![1u8];
    greeting(&mut s);
    go_replies(&mut s, OPT_STRUCTURED_REPLY);
    ReplyHeader::encode_simple(0, 9, &mut s);
    chunks(&mut s, HeaderMode::Structured);
    write("client_reply_parser", "structured_go", s);

    let mut s = vec![2u8];
    greeting(&mut s);
    go_replies(&mut s, OPT_EXTENDED_HEADERS);
    chunks(&mut s, HeaderMode::Extended);
    write("client_reply_parser", "extended_go", s);

    let mut s = vec![4u8];
    greeting(&mut s);
    ExportNameReply {
        size: 1 << 30,
        flags: export_flags,
    }
    .encode(false, &mut s);
    ReplyHeader::encode_simple(0, 1, &mut s);
    ReplyHeader::encode_simple(EIO, 2, &mut s);
    write("client_reply_parser", "export_name_simple", s);

    let mut s = vec![4 | 8 | 1];
    greeting(&mut s);
    ExportNameReply {
        size: 4096,
        flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY,
    }
    .encode(true, &mut s);
    chunks(&mut s, HeaderMode::Structured);
    write("client_reply_parser", "export_name_no_zeroes", s);

    let mut s = vec![0u8];
    greeting(&mut s);
    OptionReply::Server {
        name: "disk".into(),
        description: "first".into(),
    }
    .encode(OPT_LIST, &mut s);
    OptionReply::Ack.encode(OPT_LIST, &mut s);
    OptionReply::Error {
        code: REP_ERR_UNSUP,
        message: "no extended headers".into(),
    }
    .encode(OPT_EXTENDED_HEADERS, &mut s);
    OptionReply::Unknown {
        reply_type: 77,
        data: vec![1, 2, 3],
    }
    .encode(OPT_INFO, &mut s);
    OptionReply::Error {
        code: REP_ERR_UNKNOWN,
        message: String::new(),
    }
    .encode(OPT_GO, &mut s);
    write("client_reply_parser", "option_errors", s);

    // --- What a client sends (server_request_parser) ---
    let client_flags = be32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    let opt = |out: &mut Vec<u8>, request: OptionRequest| request.encode(out);
    let info = InfoRequest {
        name: "disk".into(),
        infos: vec![INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION],
    };
    let meta = MetaContextRequest {
        export: "disk".into(),
        queries: vec![
            CONTEXT_BASE_ALLOCATION.into(),
            format!("{CONTEXT_DIRTY_BITMAP_PREFIX}bitmap0"),
        ],
    };
    let req = |out: &mut Vec<u8>, mode, command, flags, cookie, offset, length: u64| {
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(mode, out)
    };

    let mode = HeaderMode::Simple;
    let mut s = vec![0u8];
    s.extend_from_slice(&client_flags);
    opt(&mut s, OptionRequest::simple(OPT_LIST));
    opt(&mut s, OptionRequest::info(OPT_INFO, &info));
    opt(&mut s, OptionRequest::info(OPT_GO, &info));
    req(&mut s, mode, CMD_READ, 0, 1, 0, 4096);
    req(&mut s, mode, CMD_WRITE, CMD_FLAG_FUA, 2, 4096, 8);
    s.extend_from_slice(b"payload!");
    req(&mut s, mode, CMD_FLUSH, 0, 3, 0, 0);
    req(&mut s, mode, CMD_DISC, 0, 4, 0, 0);
    write("server_request_parser", "simple_go", s);

    let mode = HeaderMode::Structured;
    let mut s = vec![1u8];
    s.extend_from_slice(&client_flags);
    opt(&mut s, OptionRequest::simple(OPT_STRUCTURED_REPLY));
    opt(
        &mut s,
        OptionRequest::meta_context(OPT_LIST_META_CONTEXT, &meta),
    );
    opt(
        &mut s,
        OptionRequest::meta_context(OPT_SET_META_CONTEXT, &meta),
    );
    opt(&mut s, OptionRequest::info(OPT_GO, &info));
    req(
        &mut s,
        mode,
        CMD_BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        1,
        0,
        1 << 20,
    );
    req(&mut s, mode, CMD_WRITE, 0, 2, 0, 4);
    s.extend_from_slice(b"data");
    req(&mut s, mode, CMD_TRIM, 0, 3, 0, 65536);
    req(
        &mut s,
        mode,
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE,
        4,
        0,
        65536,
    );
    req(&mut s, mode, CMD_READ, CMD_FLAG_DF, 5, 0, 512);
    write("server_request_parser", "structured_meta", s);

    let mode = HeaderMode::Extended;
    let mut s = vec![2u8];
    s.extend_from_slice(&client_flags);
    opt(&mut s, OptionRequest::simple(OPT_EXTENDED_HEADERS));
    opt(
        &mut s,
        OptionRequest::meta_context(OPT_SET_META_CONTEXT, &meta),
    );
    opt(&mut s, OptionRequest::info(OPT_GO, &info));
    req(&mut s, mode, CMD_WRITE, 0, 1, 0, 4);
    s.extend_from_slice(b"data");
    // BLOCK_STATUS with a payload: u64 effect length, then the context ids to report.
    req(
        &mut s,
        mode,
        CMD_BLOCK_STATUS,
        CMD_FLAG_PAYLOAD_LEN,
        2,
        0,
        12,
    );
    s.extend_from_slice(&be64(1 << 33));
    s.extend_from_slice(&be32(1));
    req(
        &mut s,
        mode,
        CMD_WRITE_ZEROES,
        CMD_FLAG_FAST_ZERO,
        3,
        0,
        1 << 40,
    );
    req(&mut s, mode, CMD_CACHE, 0, 4, 1 << 20, 1 << 20);
    req(&mut s, mode, CMD_DISC, 0, 5, 0, 0);
    write("server_request_parser", "extended_go", s);

    let mode = HeaderMode::Simple;
    let mut s = vec![0u8];
    s.extend_from_slice(&client_flags);
    opt(&mut s, OptionRequest::simple(OPT_STARTTLS));
    opt(&mut s, OptionRequest::simple(42));
    opt(&mut s, OptionRequest::export_name("disk"));
    req(&mut s, mode, CMD_READ, 0, 1, 0, 512);
    req(&mut s, mode, CMD_DISC, 0, 2, 0, 0);
    write("server_request_parser", "export_name", s);
}
