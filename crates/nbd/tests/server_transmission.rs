//! The server's transmission phase, in process: `nbd::server::serve` on a private Unix socket
//! with an in-memory export, and ferry's own client (plus a raw client where the exact reply
//! chunks matter). Covers every header mode, out-of-order and concurrent replies, OFFSET_HOLE
//! chunks, DF, REQ_ONE block status, multi-conn and heavy pipelining. The server's limits
//! (FAST_ZERO, block sizes, read-only, past the end) are in `server_limits.rs`.

mod server_common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbd::client::{StatusExtent, ZeroFlags};
use nbd::proto::consts::*;
use nbd::proto::{BlockSize, HeaderMode, ReplyHeader};
use nbd::server::ServerConfig;
use nbd::{Client, Reply};
use server_common::*;

const BASE: &str = CONTEXT_BASE_ALLOCATION;

/// The export's allocation runs as block-status extents.
fn expected_extents(export: &MemExport) -> Vec<StatusExtent> {
    export
        .runs()
        .into_iter()
        .map(|(offset, length, alloc)| StatusExtent {
            offset,
            length,
            flags: if alloc {
                0
            } else {
                u64::from(STATE_HOLE | STATE_ZERO)
            },
        })
        .collect()
}

/// Reads, writes, zeroes, trims, flushes and block status in every header mode, checked
/// against the export's own state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_in_every_header_mode() {
    guarded(async {
        for mode in ALL_MODES {
            let export = sample_export(full_caps(1));
            let server = TestServer::start(export.clone(), "", ServerConfig::default());
            let client = connect(&server, mode).await;
            let info = client.info().clone();
            assert_eq!(info.size, 4 * MIB);
            for flag in [
                TFLAG_SEND_FLUSH,
                TFLAG_SEND_FUA,
                TFLAG_SEND_TRIM,
                TFLAG_SEND_WRITE_ZEROES,
                TFLAG_SEND_FAST_ZERO,
                TFLAG_SEND_CACHE,
                TFLAG_CAN_MULTI_CONN,
            ] {
                assert!(info.has_flag(flag), "{mode:?}: flag {flag:#x} missing");
            }
            assert!(!info.has_flag(TFLAG_READ_ONLY));
            assert_eq!(
                info.has_flag(TFLAG_SEND_DF),
                mode != HeaderMode::Simple,
                "{mode:?}: DF is advertised exactly when structured replies are on"
            );
            assert_eq!(
                info.block_size,
                BlockSize {
                    minimum: 1,
                    preferred: 4096,
                    maximum: 2 * MIB as u32
                }
            );

            let mut model = export.snapshot();
            let all = client.read(0, 4 * MIB).await.expect("read everything");
            assert!(all[..] == model[..], "{mode:?}: image differs");
            if mode != HeaderMode::Simple {
                let extents = client.block_status(BASE, 0, 4 * MIB).await.unwrap();
                assert_eq!(extents, expected_extents(&export), "{mode:?}");
            }

            // An unaligned write across data → hole (longer than the maximum payload, so the
            // client splits it), one with FUA, zeroes that keep allocation and zeroes that
            // may punch, a trim, a flush and a cache hint.
            let a = pattern((2 * MIB + 12_345) as usize, 7);
            client
                .write(700_001, Bytes::from(a.clone()), false)
                .await
                .expect("write");
            model[700_001..700_001 + a.len()].copy_from_slice(&a);
            let b = pattern(4096, 8);
            client
                .write(3 * MIB, Bytes::from(b.clone()), true)
                .await
                .expect("FUA write");
            model[3 * MIB as usize..3 * MIB as usize + 4096].copy_from_slice(&b);
            let flushes = export.flushes.load(Ordering::SeqCst);
            let zf = ZeroFlags {
                no_hole: true,
                fast: false,
                fua: true,
            };
            client.write_zeroes(8192, 8192, zf).await.expect("zero");
            model[8192..16384].fill(0);
            assert!(
                export.flushes.load(Ordering::SeqCst) > flushes,
                "{mode:?}: FUA on WRITE_ZEROES must flush"
            );
            client
                .write_zeroes(2 * MIB, 256 * KIB, ZeroFlags::default())
                .await
                .expect("zero with punch");
            model[2 * MIB as usize..(2 * MIB + 256 * KIB) as usize].fill(0);
            client
                .trim(3 * MIB + 64 * KIB, 64 * KIB, false)
                .await
                .expect("trim");
            model[(3 * MIB + 64 * KIB) as usize..(3 * MIB + 128 * KIB) as usize].fill(0);
            let flushes = export.flushes.load(Ordering::SeqCst);
            client.flush().await.expect("flush");
            assert_eq!(export.flushes.load(Ordering::SeqCst), flushes + 1);
            client.cache(0, MIB).await.expect("cache");
            assert!(export.caches.load(Ordering::SeqCst) >= 1);

            let all = client.read(0, 4 * MIB).await.expect("read back");
            assert!(all[..] == model[..], "{mode:?}: read-back differs");
            assert!(export.snapshot() == model, "{mode:?}: export differs");
            if mode != HeaderMode::Simple {
                // The punched range became a hole again; the NO_HOLE range stayed data.
                let extents = client.block_status(BASE, 0, 4 * MIB).await.unwrap();
                assert_eq!(extents, expected_extents(&export), "{mode:?}");
                let hole = u64::from(STATE_HOLE | STATE_ZERO);
                let punched = 2 * MIB..2 * MIB + 256 * KIB;
                assert!(
                    extents.iter().any(|e| e.flags == hole
                        && e.offset <= punched.start
                        && e.offset + e.length >= punched.end),
                    "{mode:?}: {extents:?}"
                );
            }
            client.disconnect().await;
        }
    })
    .await
}

/// Reads over holes arrive as OFFSET_HOLE chunks (structured and extended), simple replies
/// carry the zeroes as bytes, extended chunks echo the request offset, and payload-less
/// commands get a simple reply (structured) or a NONE chunk (extended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_kinds_per_header_mode() {
    guarded(async {
        for mode in ALL_MODES {
            let export = sample_export(full_caps(1));
            let expected = export.snapshot();
            let (mut raw, task) = raw_pair(export.clone(), ServerConfig::default());
            raw.handshake(mode).await;
            // [768 KiB, 2 MiB + 128 KiB): data, a 1 MiB hole, data.
            let (offset, len) = (768 * KIB, MIB + 384 * KIB);
            let cookie = raw.request(CMD_READ, 0, offset, len, &[]).await;
            let range = offset as usize..(offset + len) as usize;
            match mode {
                HeaderMode::Simple => {
                    let r = raw.reply().await;
                    assert!(matches!(r.header, ReplyHeader::Simple { error: 0, .. }));
                    assert_eq!(r.cookie(), cookie);
                    let data = raw.read_data(len as usize).await;
                    assert!(data[..] == expected[range.clone()]);
                }
                _ => {
                    let chunks = raw.full_reply().await;
                    let kinds: Vec<(u16, u64, u64)> = chunks
                        .iter()
                        .map(|c| {
                            let (_, t) = c.chunk();
                            let at = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                            let n = match t {
                                CHUNK_OFFSET_HOLE => u64::from(u32::from_be_bytes(
                                    c.payload[8..12].try_into().unwrap(),
                                )),
                                _ => c.payload.len() as u64 - 8,
                            };
                            (t, at, n)
                        })
                        .collect();
                    assert_eq!(
                        kinds,
                        vec![
                            (CHUNK_OFFSET_DATA, 768 * KIB, 256 * KIB),
                            (CHUNK_OFFSET_HOLE, MIB, MIB),
                            (CHUNK_OFFSET_DATA, 2 * MIB, 128 * KIB),
                        ],
                        "{mode:?}"
                    );
                    for (i, c) in chunks.iter().enumerate() {
                        assert_eq!(c.cookie(), cookie);
                        assert_eq!(c.is_done(), i == chunks.len() - 1, "DONE only on the last");
                        match (mode, c.header) {
                            (HeaderMode::Extended, ReplyHeader::Chunk { offset: o, .. }) => {
                                assert_eq!(o, Some(offset), "extended chunks echo the offset")
                            }
                            (HeaderMode::Structured, ReplyHeader::Chunk { offset: o, .. }) => {
                                assert_eq!(o, None)
                            }
                            other => panic!("unexpected reply {other:?}"),
                        }
                    }
                    let first = &chunks[0].payload[8..];
                    assert!(first[..] == expected[768 * KIB as usize..MIB as usize]);
                }
            }
            // A payload-less command.
            let cookie = raw.request(CMD_FLUSH, 0, 0, 0, &[]).await;
            let r = raw.reply().await;
            assert_eq!(r.cookie(), cookie);
            match mode {
                HeaderMode::Extended => assert_eq!(r.chunk(), (REPLY_FLAG_DONE, CHUNK_NONE)),
                _ => assert!(matches!(r.header, ReplyHeader::Simple { error: 0, .. })),
            }
            // An error in structured modes is an error chunk with a message.
            let cookie = raw.request(CMD_READ, 0, 4 * MIB, 4096, &[]).await;
            let r = raw.reply().await;
            assert_eq!(r.cookie(), cookie);
            assert_eq!(r.error(), EINVAL);
            if mode != HeaderMode::Simple {
                assert_eq!(r.chunk(), (REPLY_FLAG_DONE, CHUNK_ERROR));
            }
            raw.request(CMD_DISC, 0, 0, 0, &[]).await;
            raw.expect_closed(STEP).await;
            server_result(task).await.expect("a clean disconnect");
        }
    })
    .await
}

/// DF: exactly one content chunk for the whole range, holes included as zero bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn df_reads_come_in_one_chunk() {
    guarded(async {
        for mode in [HeaderMode::Structured, HeaderMode::Extended] {
            let export = sample_export(full_caps(1));
            let expected = export.snapshot();
            let (mut raw, _task) = raw_pair(export.clone(), ServerConfig::default());
            let (_, flags) = raw.handshake(mode).await;
            assert!(flags & TFLAG_SEND_DF != 0);
            let (offset, len) = (768 * KIB, MIB + 384 * KIB);
            let cookie = raw.request(CMD_READ, CMD_FLAG_DF, offset, len, &[]).await;
            let chunks = raw.full_reply().await;
            assert_eq!(chunks.len(), 1, "{mode:?}: DF must not fragment");
            let c = &chunks[0];
            assert_eq!(c.cookie(), cookie);
            assert_eq!(c.chunk(), (REPLY_FLAG_DONE, CHUNK_OFFSET_DATA));
            assert_eq!(
                u64::from_be_bytes(c.payload[..8].try_into().unwrap()),
                offset
            );
            assert!(c.payload[8..] == expected[offset as usize..(offset + len) as usize]);
            // A DF read wholly inside a hole may be one hole chunk.
            let got = raw.read(MIB + 4096, 8192, CMD_FLAG_DF).await.unwrap();
            assert!(got.iter().all(|b| *b == 0));
        }
    })
    .await
}

/// A slow read does not hold back a fast one sent after it: on the wire the fast reply comes
/// first, and ferry's client completes it while the slow one is still pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_out_of_order() {
    guarded(async {
        let export = sample_export(full_caps(1));
        export
            .slow_reads
            .lock()
            .unwrap()
            .push((0, Duration::from_millis(1000)));
        let expected = export.snapshot();
        // On the wire.
        for mode in ALL_MODES {
            let (mut raw, _task) = raw_pair(export.clone(), ServerConfig::default());
            raw.handshake(mode).await;
            let slow = raw.request(CMD_READ, 0, 0, 4096, &[]).await;
            let fast = raw.request(CMD_READ, 0, 8192, 4096, &[]).await;
            let first = raw.reply().await;
            assert_eq!(
                first.cookie(),
                fast,
                "{mode:?}: the fast read must be answered first"
            );
            if mode == HeaderMode::Simple {
                raw.read_data(4096).await;
            } else if !first.is_done() {
                raw.full_reply().await;
            }
            let second = raw.reply().await;
            assert_eq!(second.cookie(), slow);
        }
        // Through ferry's client.
        let server = TestServer::start(export.clone(), "", ServerConfig::default());
        let client = connect(&server, HeaderMode::Structured).await;
        let c = conn(&client);
        let started = Instant::now();
        let slow = c.submit(CMD_READ, 0, 0, 4096, None).await.unwrap();
        let fast = c.submit(CMD_READ, 0, 8192, 4096, None).await.unwrap();
        let got = fast.wait().await.expect("fast read");
        let fast_took = started.elapsed();
        assert!(
            fast_took < Duration::from_millis(900),
            "the fast read waited for the slow one ({fast_took:?})"
        );
        assert_eq!(
            got,
            Reply::Data(Bytes::copy_from_slice(&expected[8192..12288]))
        );
        let got = slow.wait().await.expect("slow read");
        assert!(started.elapsed() >= Duration::from_millis(1000));
        assert_eq!(got, Reply::Data(Bytes::copy_from_slice(&expected[..4096])));
    })
    .await
}

/// Requests on one connection run at the same time: 16 reads that each take 200 ms finish
/// in well under 16 × 200 ms, and the export sees many of them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_concurrently() {
    guarded(async {
        let export = sample_export(full_caps(1));
        *export.read_delay.lock().unwrap() = Duration::from_millis(200);
        let expected = export.snapshot();
        let server = TestServer::start(export.clone(), "", ServerConfig::default());
        for mode in ALL_MODES {
            export.max_in_flight.store(0, Ordering::SeqCst);
            let client = connect(&server, mode).await;
            let started = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..16u64 {
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    (i, client.read(i * 64 * KIB, 4096).await)
                }));
            }
            for t in tasks {
                let (i, got) = t.await.unwrap();
                let at = (i * 64 * KIB) as usize;
                assert!(got.expect("read")[..] == expected[at..at + 4096]);
            }
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(1600),
                "{mode:?}: 16 reads of 200 ms took {took:?}: they ran one after another"
            );
            let max = export.max_in_flight.load(Ordering::SeqCst);
            assert!(max >= 8, "{mode:?}: at most {max} reads ran at once");
            client.disconnect().await;
        }
    })
    .await
}

/// REQ_ONE: one descriptor, not longer than the request; without it, several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_req_one() {
    guarded(async {
        let export = sample_export(full_caps(1));
        let server = TestServer::start(export.clone(), "", ServerConfig::default());
        for mode in [HeaderMode::Structured, HeaderMode::Extended] {
            let client = connect(&server, mode).await;
            let id = client.info().context_id(BASE).expect("base:allocation");
            let one = |status: Vec<(u32, Vec<nbd::proto::Descriptor>)>| {
                assert_eq!(status.len(), 1, "one chunk per context");
                assert_eq!(status[0].0, id);
                status[0].1.clone()
            };
            let d = one(client.block_status_once(0, 4 * MIB, true).await.unwrap());
            assert_eq!(d.len(), 1, "{mode:?}: REQ_ONE gave {d:?}");
            assert_eq!((d[0].length, d[0].flags), (MIB, 0));
            // The run goes on to 1 MiB, but REQ_ONE clips it to the request.
            let d = one(client.block_status_once(4096, 8192, true).await.unwrap());
            assert_eq!(d.len(), 1);
            assert_eq!((d[0].length, d[0].flags), (8192, 0), "{mode:?}");
            let d = one(client.block_status_once(MIB, 4096, true).await.unwrap());
            assert_eq!(
                (d.len(), d[0].length, d[0].flags),
                (1, 4096, u64::from(STATE_HOLE | STATE_ZERO))
            );
            let d = one(client.block_status_once(0, 4 * MIB, false).await.unwrap());
            assert_eq!(
                d.iter().map(|d| (d.length, d.flags)).collect::<Vec<_>>(),
                vec![
                    (MIB, 0),
                    (MIB, u64::from(STATE_HOLE | STATE_ZERO)),
                    (512 * KIB, 0),
                    (1536 * KIB, u64::from(STATE_HOLE | STATE_ZERO)),
                ],
                "{mode:?}"
            );
            client.disconnect().await;
        }
        // Without a negotiated context, BLOCK_STATUS is refused.
        let mut o = server.opts(HeaderMode::Structured);
        o.settings.meta_contexts.clear();
        let client = Client::connect(&o, 1).await.unwrap();
        let e = errno(
            conn(&client).call(CMD_BLOCK_STATUS, 0, 0, 4096, None).await,
            "block status without a context",
        );
        assert_eq!(e, EINVAL);
    })
    .await
}

/// Multi-conn: advertised when the export says so, and then ferry's client spreads requests
/// over four connections that all see each other's writes; not advertised otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_conn_follows_the_export() {
    guarded(async {
        let export = sample_export(full_caps(1));
        let server = TestServer::start(export.clone(), "", ServerConfig::default());
        let client = Client::connect(&server.opts(HeaderMode::Extended), 4)
            .await
            .unwrap();
        assert_eq!(client.connections().len(), 4);
        let data = pattern(2 * MIB as usize, 9);
        client
            .write(MIB, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        client.flush().await.unwrap();
        for c in client.connections() {
            match c.call(CMD_READ, 0, MIB, MIB, None).await.unwrap() {
                Reply::Data(d) => assert!(d[..] == data[..MIB as usize]),
                other => panic!("{other:?}"),
            }
        }
        client.disconnect().await;

        let export = sample_export(full_caps(1));
        export.set_caps(|c| c.multi_conn = false);
        let server = TestServer::start(export, "", ServerConfig::default());
        let client = Client::connect(&server.opts(HeaderMode::Extended), 4)
            .await
            .unwrap();
        assert!(!client.info().has_flag(TFLAG_CAN_MULTI_CONN));
        assert_eq!(client.connections().len(), 1);
    })
    .await
}

/// Every request a client pipelines gets exactly one reply, with the right data, however
/// the server orders them: 500 mixed reads and writes over one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_requests_each_get_their_reply() {
    guarded(async {
        let export = Arc::new(MemExport::new(8 * MIB, full_caps(1)));
        let server = TestServer::start(export.clone(), "", ServerConfig::default());
        for mode in ALL_MODES {
            let client = connect(&server, mode).await;
            let c = conn(&client);
            let mut model = export.snapshot();
            let mut pending = Vec::new();
            for i in 0..500u64 {
                // Writes go to distinct blocks below 2 MiB, reads to the last 64 KiB.
                let offset = i * 4096;
                if i % 3 == 0 {
                    let d = pattern(4096, i as u8);
                    model[offset as usize..offset as usize + 4096].copy_from_slice(&d);
                    let p = c
                        .submit(CMD_WRITE, 0, offset, 4096, Some(Bytes::from(d)))
                        .await
                        .unwrap();
                    pending.push((p, None));
                } else {
                    let offset = 8 * MIB - 4096 * (1 + i % 16);
                    let p = c.submit(CMD_READ, 0, offset, 4096, None).await.unwrap();
                    pending.push((p, Some(offset)));
                }
            }
            for (p, read) in pending {
                match (p.wait().await.expect("reply"), read) {
                    (Reply::Done, None) => {}
                    (Reply::Data(d), Some(at)) => {
                        assert!(d[..] == model[at as usize..at as usize + 4096])
                    }
                    other => panic!("{mode:?}: unexpected {other:?}"),
                }
            }
            assert!(export.snapshot() == model, "{mode:?}");
        }
    })
    .await
}
