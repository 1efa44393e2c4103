//! A misbehaving server must get an error naming the problem out of the client: never a panic,
//! never a hang. Each test scripts one server (see `hostile/mod.rs`); every test body runs under
//! a 10-second guard so a hang fails instead of blocking CI.

mod hostile;

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hostile::*;
use nbd::proto::consts::*;
use nbd::proto::{BlockSize, Chunk, Descriptor, HeaderMode, OptionReply, Request};
use nbd::{Client, Error, Reply};

/// Connects to a server running `script` and expects the handshake to fail.
async fn handshake_error<F, Fut>(script: F) -> Error
where
    F: FnOnce(Server) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (_dir, opts) = serve(script);
    opts.connect().await.err().expect("the handshake must fail")
}

/// Handshakes correctly, sends one `command` over [0, 4096) and expects it to fail.
async fn request_error<F, Fut>(setup: Setup, command: u16, script: F) -> Error
where
    F: FnOnce(Server, Request) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (_dir, opts) = serve_request(setup, script);
    let conn = opts.connect().await.expect("handshake");
    let result = conn.call(command, 0, 0, 4096, None).await;
    result.expect_err("the request must fail")
}

async fn read_error<F, Fut>(script: F) -> Error
where
    F: FnOnce(Server, Request) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    request_error(Setup::default(), CMD_READ, script).await
}

fn data(offset: u64) -> Chunk {
    Chunk::OffsetData {
        offset,
        data_len: 0,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

// ---- handshake ------------------------------------------------------------------------------

#[tokio::test]
async fn wrong_greeting_magic() {
    guard(async {
        let err = handshake_error(|mut s| async move {
            let mut greeting = b"NBDMAGIX".to_vec();
            greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
            greeting.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
            s.send(&greeting).await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "bad magic");
    })
    .await
}

#[tokio::test]
async fn wrong_option_reply_magic() {
    guard(async {
        let err = handshake_error(|mut s| async move {
            s.greet().await;
            let (option, _) = s.option().await;
            let mut out = Vec::new();
            OptionReply::Ack.encode(option, &mut out);
            out[0] ^= 0xff;
            s.send(&out).await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "option reply: bad magic");
    })
    .await
}

#[tokio::test]
async fn option_reply_echoes_the_wrong_option() {
    guard(async {
        let err = handshake_error(|mut s| async move {
            s.greet().await;
            let (option, _) = s.option().await;
            assert_eq!(option, OPT_EXTENDED_HEADERS);
            s.reply(OPT_STRUCTURED_REPLY, OptionReply::Ack).await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "echoes option 8");
    })
    .await
}

#[tokio::test]
async fn oversized_option_reply() {
    guard(async {
        let err = handshake_error(|mut s| async move {
            s.greet().await;
            let (option, _) = s.option().await;
            // A 1 GiB META_CONTEXT reply; the payload never comes.
            let mut out = REPLY_MAGIC.to_be_bytes().to_vec();
            out.extend_from_slice(&option.to_be_bytes());
            out.extend_from_slice(&REP_META_CONTEXT.to_be_bytes());
            out.extend_from_slice(&(1u32 << 30).to_be_bytes());
            s.send(&out).await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "exceeds the 65536-byte limit");
    })
    .await
}

#[tokio::test]
async fn go_acknowledged_without_info_export() {
    guard(async {
        let setup = Setup {
            export_info: false,
            ..Setup::default()
        };
        let err = handshake_error(move |s| async move {
            s.handshake(setup).await.hold().await;
        })
        .await;
        assert_protocol(&err, "without sending NBD_INFO_EXPORT");
    })
    .await
}

#[tokio::test]
async fn inconsistent_block_sizes() {
    guard(async {
        let block_size = Some(BlockSize {
            minimum: 3,
            preferred: 4096,
            maximum: 32 << 20,
        });
        let setup = Setup {
            block_size,
            ..Setup::default()
        };
        let err = handshake_error(move |s| async move {
            s.handshake(setup).await.hold().await;
        })
        .await;
        assert_protocol(&err, "inconsistent block sizes: minimum 3");
    })
    .await
}

/// The spec lets 0xffffffff mean "no limit" even when it is not a multiple of the minimum.
#[tokio::test]
async fn unlimited_maximum_payload_is_accepted() {
    guard(async {
        let block_size = BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: u32::MAX,
        };
        let setup = Setup {
            block_size: Some(block_size),
            ..Setup::default()
        };
        let (_dir, opts) = serve(move |s| async move {
            s.handshake(setup).await.hold().await;
        });
        let conn = opts.connect().await.expect("0xffffffff maximum is legal");
        assert_eq!(conn.info().block_size, block_size);
    })
    .await
}

/// Offsets are signed 64-bit in every file and syscall: a larger export is refused at the
/// handshake, naming its size, and the largest legal one is accepted.
#[tokio::test]
async fn export_larger_than_i64_max_is_refused() {
    guard(async {
        for size in [i64::MAX as u64 + 1, u64::MAX] {
            let setup = Setup {
                size,
                ..Setup::default()
            };
            let err = handshake_error(move |s| async move {
                s.handshake(setup).await.hold().await;
            })
            .await;
            assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
            assert!(err.to_string().contains(&size.to_string()), "{err}");
            assert!(err.to_string().contains("2^63 - 1"), "{err}");
        }
        let setup = Setup {
            size: i64::MAX as u64,
            ..Setup::default()
        };
        let (_dir, opts) = serve(move |s| async move {
            s.handshake(setup).await.hold().await;
        });
        let conn = opts.connect().await.expect("2^63 - 1 is a legal size");
        assert_eq!(conn.size(), i64::MAX as u64);
    })
    .await
}

/// A server that accepts and then says nothing is given up on at the handshake deadline, not
/// the (longer) I/O timeout.
#[tokio::test]
async fn silent_server_fails_at_the_handshake_deadline() {
    guard(async {
        let (_dir, mut opts) = serve(|s| async move {
            s.hold().await;
        });
        opts.settings.timeout = Duration::from_secs(60);
        opts.settings.handshake_timeout = Some(Duration::from_millis(300));
        let started = Instant::now();
        let err = opts.connect().await.err().expect("the handshake must fail");
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        assert_eq!(err.kind(), errkind::ErrorKind::Timeout, "{err:?}");
    })
    .await
}

// ---- fatal transmission errors --------------------------------------------------------------

#[tokio::test]
async fn reply_with_wrong_magic() {
    guard(async {
        let err = read_error(|mut s, _req| async move {
            // A magic the spec reserves (never to be sent), then what would be a header.
            let mut out = 0x1256_0953u32.to_be_bytes().to_vec();
            out.extend_from_slice(&[0; 16]);
            s.send(&out).await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "reply: bad magic 0x12560953");
    })
    .await
}

#[tokio::test]
async fn truncated_reply() {
    guard(async {
        let err = read_error(|mut s, req| async move {
            s.chunk_header(&req, REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 8 + 4096)
                .await;
            // Closing the socket here cuts the reply after its header.
        })
        .await;
        assert!(matches!(err, Error::Closed(_)), "{err:?}");
        assert!(err.to_string().contains("in the middle of"), "{err}");
    })
    .await
}

#[tokio::test]
async fn reply_for_an_unknown_cookie() {
    guard(async {
        let err = read_error(|mut s, req| async move {
            let stranger = Request {
                cookie: req.cookie + 1000,
                ..req
            };
            s.chunk(&stranger, REPLY_FLAG_DONE, &Chunk::None, &[]).await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "unknown cookie");
    })
    .await
}

#[tokio::test]
async fn data_chunk_outside_the_request() {
    guard(async {
        let err = read_error(|mut s, req| async move {
            let bytes = pattern(512, 1);
            s.chunk(&req, REPLY_FLAG_DONE, &data(4096), &bytes).await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "outside the request");
    })
    .await
}

#[tokio::test]
async fn overlapping_data_chunks() {
    guard(async {
        let err = read_error(|mut s, req| async move {
            s.chunk(&req, 0, &data(0), &pattern(2048, 1)).await;
            s.chunk(&req, REPLY_FLAG_DONE, &data(1024), &pattern(2048, 2))
                .await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "overlaps data already received");
    })
    .await
}

#[tokio::test]
async fn read_done_without_covering_the_request() {
    guard(async {
        let err = read_error(|mut s, req| async move {
            s.chunk(&req, 0, &data(0), &pattern(1024, 1)).await;
            let hole = Chunk::OffsetHole {
                offset: 2048,
                length: 1024,
            };
            s.chunk(&req, REPLY_FLAG_DONE, &hole, &[]).await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "completed with only 2048 bytes");
    })
    .await
}

/// A 4 GiB block-status payload is refused from the header alone: the server never sends it
/// and keeps the socket open, so reading (or allocating) it would stall until the timeout.
#[tokio::test]
async fn oversized_block_status_chunk() {
    guard(async {
        let setup = Setup {
            extended: true,
            ..Setup::default()
        };
        let err = request_error(setup, CMD_BLOCK_STATUS, |mut s, req| async move {
            s.chunk_header(&req, REPLY_FLAG_DONE, CHUNK_BLOCK_STATUS_EXT, 4 << 30)
                .await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "claims 4294967296 bytes, over the limit");
    })
    .await
}

#[tokio::test]
async fn oversized_data_chunk() {
    guard(async {
        let err = read_error(|mut s, req| async move {
            s.chunk_header(&req, REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, u32::MAX.into())
                .await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "data chunk of 4294967295 bytes for a read of 4096");
    })
    .await
}

#[tokio::test]
async fn structured_chunk_when_only_simple_replies_were_negotiated() {
    guard(async {
        let setup = Setup {
            structured: false,
            ..Setup::default()
        };
        let err = request_error(setup, CMD_READ, |mut s, req| async move {
            s.mode = HeaderMode::Structured;
            s.chunk(&req, REPLY_FLAG_DONE, &data(0), &pattern(4096, 1))
                .await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "not allowed with Simple headers");
    })
    .await
}

#[tokio::test]
async fn block_status_for_a_context_never_negotiated() {
    guard(async {
        let err = request_error(
            Setup::default(),
            CMD_BLOCK_STATUS,
            |mut s, req| async move {
                let status = Chunk::BlockStatus {
                    context: CONTEXT_ID + 6,
                    descriptors: vec![Descriptor {
                        length: 4096,
                        flags: 0,
                    }],
                };
                s.chunk(&req, REPLY_FLAG_DONE, &status, &[]).await;
                s.hold().await;
            },
        )
        .await;
        assert_protocol(&err, "meta context id 7, which was never negotiated");
    })
    .await
}

#[tokio::test]
async fn none_chunk_without_done() {
    guard(async {
        let err = read_error(|mut s, req| async move {
            s.chunk(&req, 0, &Chunk::None, &[]).await;
            s.hold().await;
        })
        .await;
        assert_protocol(&err, "NONE chunk without the DONE flag");
    })
    .await
}

#[tokio::test]
async fn stalled_server_times_out() {
    guard(async {
        let (_dir, mut opts) = serve_request(Setup::default(), |s, _req| s.hold());
        opts.settings.timeout = Duration::from_millis(300);
        let conn = opts.connect().await.expect("handshake");
        let start = Instant::now();
        let err = conn.call(CMD_READ, 0, 0, 4096, None).await.unwrap_err();
        let elapsed = start.elapsed();
        assert!(matches!(err, Error::Timeout(_)), "{err:?}");
        assert!(elapsed < Duration::from_millis(1200), "took {elapsed:?}");
    })
    .await
}

/// A request sent after an idle spell gets the whole timeout, not what is left of the idle wait.
#[tokio::test]
async fn slow_reply_after_idle_is_not_a_stall() {
    guard(async {
        let (_dir, mut opts) = serve_request(Setup::default(), |mut s, req| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.chunk(&req, REPLY_FLAG_DONE, &data(0), &pattern(4096, 3))
                .await;
            s.hold().await;
        });
        opts.settings.timeout = Duration::from_millis(600);
        let conn = opts.connect().await.expect("handshake");
        tokio::time::sleep(Duration::from_millis(450)).await;
        let reply = conn.call(CMD_READ, 0, 0, 4096, None).await;
        assert_eq!(reply.unwrap(), Reply::Data(pattern(4096, 3).into()));
    })
    .await
}

#[tokio::test]
async fn server_closes_with_requests_in_flight() {
    guard(async {
        let (_dir, opts) = serve(|s| async move {
            let mut s = s.handshake(Setup::default()).await;
            for _ in 0..3 {
                s.request().await;
            }
            // Dropping the server closes the socket with three requests unanswered.
        });
        let conn = opts.connect().await.expect("handshake");
        let mut pending = Vec::new();
        for i in 0..3 {
            pending.push(
                conn.submit(CMD_READ, 0, i * 4096, 4096, None)
                    .await
                    .unwrap(),
            );
        }
        for p in pending {
            let err = p.wait().await.unwrap_err();
            assert!(matches!(err, Error::Closed(_)), "{err:?}");
            assert!(err.to_string().contains("3 requests in flight"), "{err}");
        }
        let quick = Duration::from_secs(1);
        let again = tokio::time::timeout(quick, conn.call(CMD_READ, 0, 0, 4096, None)).await;
        let err = again.expect("a request on a dead connection must fail at once");
        assert!(err.unwrap_err().is_fatal());
        assert_eq!(conn.in_flight(), 0);
    })
    .await
}

// ---- errors that fail one request, not the connection ----------------------------------------

#[tokio::test]
async fn error_offset_chunk_fails_only_its_read() {
    guard(async {
        let (_dir, opts) = serve(|s| async move {
            let mut s = s.handshake(Setup::default()).await;
            let (req, _) = s.request().await;
            s.chunk(&req, 0, &data(0), &pattern(512, 1)).await;
            let error = Chunk::ErrorOffset {
                error: EIO,
                message: "bad sector".into(),
                offset: 1024,
            };
            s.chunk(&req, REPLY_FLAG_DONE, &error, &[]).await;
            let (req, _) = s.request().await;
            s.chunk(&req, REPLY_FLAG_DONE, &data(8192), &pattern(4096, 2))
                .await;
            s.hold().await;
        });
        let conn = opts.connect().await.expect("handshake");
        let err = conn.call(CMD_READ, 0, 0, 4096, None).await.unwrap_err();
        match &err {
            Error::Command {
                errno,
                error_offset,
                ..
            } => {
                assert_eq!(*errno, EIO);
                assert_eq!(*error_offset, Some(1024));
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        assert!(!err.is_fatal());
        assert!(err.to_string().contains("at byte 1024"), "{err}");
        assert!(err.to_string().contains("bad sector"), "{err}");
        let reply = conn.call(CMD_READ, 0, 8192, 4096, None).await.unwrap();
        assert_eq!(reply, Reply::Data(pattern(4096, 2).into()));
    })
    .await
}

#[tokio::test]
async fn unknown_error_chunk_type_fails_only_its_request() {
    guard(async {
        let (_dir, opts) = serve(|s| async move {
            let mut s = s.handshake(Setup::default()).await;
            let (req, _) = s.request().await;
            let unknown = Chunk::UnknownError {
                chunk_type: CHUNK_ERROR_BIT | 0x55,
            };
            // Payload shaped like an ERROR chunk: error value, empty message.
            let payload = [0, 0, 0, EIO as u8, 0, 0];
            s.chunk(&req, REPLY_FLAG_DONE, &unknown, &payload).await;
            let (req, _) = s.request().await;
            s.chunk(&req, REPLY_FLAG_DONE, &Chunk::None, &[]).await;
            s.hold().await;
        });
        let conn = opts.connect().await.expect("handshake");
        let err = conn.call(CMD_READ, 0, 0, 4096, None).await.unwrap_err();
        assert!(matches!(err, Error::Command { .. }), "{err:?}");
        assert!(err.to_string().contains("0x8055"), "{err}");
        let reply = conn.call(CMD_FLUSH, 0, 0, 0, None).await;
        assert_eq!(reply.unwrap(), Reply::Done);
    })
    .await
}

#[tokio::test]
async fn simple_enospc_reply_to_a_write() {
    guard(async {
        let (_dir, opts) = serve(|s| async move {
            let mut s = s.handshake(Setup::default()).await;
            let (req, payload) = s.request().await;
            assert_eq!((req.command, payload.len()), (CMD_WRITE, 1024));
            s.simple(ENOSPC, req.cookie, &[]).await;
            s.hold().await;
        });
        let client = Client::from_connections(vec![opts.connect().await.expect("handshake")]);
        let err = client
            .write(8192, Bytes::from(pattern(1024, 9)), false)
            .await
            .unwrap_err();
        assert_eq!(err.errno(), Some(ENOSPC));
        let text = err.to_string();
        assert!(text.contains("No space left on device (ENOSPC)"), "{text}");
        assert!(text.contains("offset 8192 length 1024"), "{text}");
    })
    .await
}

// ---- the harness on a good day --------------------------------------------------------------

#[tokio::test]
async fn structured_read_from_chunks_in_reverse_order() {
    guard(async {
        let (_dir, opts) = serve_request(Setup::default(), |mut s, req| async move {
            let hole = Chunk::OffsetHole {
                offset: 3072,
                length: 1024,
            };
            s.chunk(&req, 0, &hole, &[]).await;
            s.chunk(&req, 0, &data(1024), &pattern(2048, 5)).await;
            s.chunk(&req, REPLY_FLAG_DONE, &data(0), &pattern(1024, 4))
                .await;
            s.hold().await;
        });
        let client = Client::from_connections(vec![opts.connect().await.expect("handshake")]);
        let got = client.read(0, 4096).await.expect("read");
        let mut want = pattern(1024, 4);
        want.extend(pattern(2048, 5));
        want.extend([0; 1024]);
        assert_eq!(got, want);
    })
    .await
}

#[tokio::test]
async fn extended_headers_session() {
    guard(async {
        let setup = Setup {
            extended: true,
            ..Setup::default()
        };
        let (_dir, opts) = serve(move |s| async move {
            let mut s = s.handshake(setup).await;
            let (req, _) = s.request().await;
            assert_eq!(
                (req.command, req.offset, req.length),
                (CMD_BLOCK_STATUS, 0, SIZE)
            );
            let status = Chunk::BlockStatus {
                context: CONTEXT_ID,
                descriptors: vec![
                    Descriptor {
                        length: 65536,
                        flags: 0,
                    },
                    Descriptor {
                        length: SIZE - 65536,
                        flags: u64::from(STATE_HOLE | STATE_ZERO),
                    },
                ],
            };
            s.chunk(&req, REPLY_FLAG_DONE, &status, &[]).await;
            let (req, _) = s.request().await;
            s.chunk(&req, REPLY_FLAG_DONE, &data(4096), &pattern(4096, 6))
                .await;
            s.hold().await;
        });
        let client = Client::connect(&opts, 1).await.expect("handshake");
        assert_eq!(client.info().mode, HeaderMode::Extended);
        let extents = client.block_status(CONTEXT_BASE_ALLOCATION, 0, SIZE).await;
        let extents = extents.expect("block status");
        assert_eq!(extents.len(), 2);
        assert_eq!((extents[0].offset, extents[0].length), (0, 65536));
        assert_eq!(extents[1].flags, u64::from(STATE_HOLE | STATE_ZERO));
        let got = client.read(4096, 4096).await.expect("read");
        assert_eq!(got, pattern(4096, 6));
    })
    .await
}
