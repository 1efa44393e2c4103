//! Hostile clients against the server, in process: raw bytes over a socket. Each one must get
//! an error reply or a disconnect — never a panic, never a hang — and a well-behaved client
//! must keep being served next to it. Server tasks run on tokio worker threads; a panic hook
//! counts panics on those threads, so a server panic (which tokio would otherwise swallow)
//! fails the test. Every step waits at most a few seconds.

mod server_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbd::proto::consts::*;
use nbd::proto::{HeaderMode, OptionReply};
use nbd::server::ServerConfig;
use nbd::{Client, Error};
use server_common::*;
use tokio::io::AsyncWriteExt;

static WORKER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics on tokio worker threads (where the server's tasks run) from here on.
fn watch_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if name.starts_with("tokio-runtime-worker") {
                WORKER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

fn assert_no_panics() {
    assert_eq!(
        WORKER_PANICS.load(Ordering::SeqCst),
        0,
        "a server task panicked (see the output above)"
    );
}

/// Runs a hostile scenario under the guard and checks that nothing panicked.
async fn hostile<F: std::future::Future<Output = ()>>(body: F) {
    watch_panics();
    guarded(body).await;
    assert_no_panics();
}

fn export() -> Arc<MemExport> {
    sample_export(full_caps(1))
}

/// A well-behaved client reads and writes a little through `server` and checks the data.
async fn well_behaved(server: &TestServer, export: &MemExport) {
    let client = Client::connect(&server.opts(HeaderMode::Structured), 1)
        .await
        .expect("a well-behaved client connects");
    let data = pattern(64 * KIB as usize, 42);
    client
        .write(3 * MIB, Bytes::from(data.clone()), false)
        .await
        .expect("write");
    let got = client.read(3 * MIB, 64 * KIB).await.expect("read");
    assert!(got[..] == data[..]);
    assert!(export.snapshot()[3 * MIB as usize..(3 * MIB + 64 * KIB) as usize] == data[..]);
    client.disconnect().await;
}

/// Expects the server to have dropped the connection with an error.
async fn dropped_with_error(task: tokio::task::JoinHandle<nbd::Result<()>>) -> Error {
    server_result(task)
        .await
        .expect_err("the server should report a broken client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_flags_close_the_connection() {
    hostile(async {
        let (mut raw, task) = raw_pair(export(), ServerConfig::default());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE | 0x8000_0000)
            .await;
        raw.expect_closed(STEP).await;
        let err = dropped_with_error(task).await;
        assert!(err.to_string().contains("unknown flags"), "{err}");
    })
    .await
}

/// Something that is not NBD at all (an HTTP request) gets the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_handshake() {
    hostile(async {
        let (mut raw, task) = raw_pair(export(), ServerConfig::default());
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        raw.expect_closed(STEP).await;
        dropped_with_error(task).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_option_magic_closes_the_connection() {
    hostile(async {
        let (mut raw, task) = raw_pair(export(), ServerConfig::default());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE).await;
        let mut bad = b"IHAVEOPX".to_vec();
        bad.extend_from_slice(&OPT_LIST.to_be_bytes());
        bad.extend_from_slice(&0u32.to_be_bytes());
        raw.send(&bad).await;
        raw.expect_closed(STEP).await;
        let err = dropped_with_error(task).await;
        assert!(err.is_protocol(), "{err:?}");
    })
    .await
}

/// An option claiming 4 GiB of data is refused at once, without waiting for (or allocating)
/// the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_option_length_closes_at_once() {
    hostile(async {
        let (mut raw, task) = raw_pair(export(), ServerConfig::default());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE).await;
        let mut head = IHAVEOPT.to_be_bytes().to_vec();
        head.extend_from_slice(&OPT_GO.to_be_bytes());
        head.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
        raw.send(&head).await;
        let started = Instant::now();
        raw.expect_closed(STEP).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        let err = dropped_with_error(task).await;
        assert!(err.is_protocol(), "{err:?}");
    })
    .await
}

/// An option whose payload stops short before the client closes: the server notices EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_payload_cut_short() {
    hostile(async {
        let (mut raw, task) = raw_pair(export(), ServerConfig::default());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE).await;
        let mut head = IHAVEOPT.to_be_bytes().to_vec();
        head.extend_from_slice(&OPT_GO.to_be_bytes());
        head.extend_from_slice(&100u32.to_be_bytes());
        head.extend_from_slice(&[0u8; 10]);
        raw.send(&head).await;
        raw.s.shutdown().await.ok();
        dropped_with_error(task).await;
    })
    .await
}

/// Malformed but well-framed options get error replies and the handshake goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_options_get_error_replies() {
    hostile(async {
        let (mut raw, task) = raw_pair(export(), ServerConfig::default());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)
            .await;
        // An unknown option, LIST with data, GO whose name length overruns its data,
        // STRUCTURED_REPLY with data, meta contexts before structured replies.
        let cases: [(u32, Vec<u8>, u32); 5] = [
            (0x7777, vec![1, 2, 3], REP_ERR_UNSUP),
            (OPT_LIST, vec![0; 4], REP_ERR_INVALID),
            (OPT_GO, vec![0, 0, 1, 0, 0, 0], REP_ERR_INVALID),
            (OPT_STRUCTURED_REPLY, vec![1], REP_ERR_INVALID),
            (OPT_SET_META_CONTEXT, vec![0; 8], REP_ERR_INVALID),
        ];
        for (option, data, want) in cases {
            let replies = raw.option(option, &data).await;
            match replies.as_slice() {
                [OptionReply::Error { code, .. }] => {
                    assert_eq!(*code, want, "option {option:#x}")
                }
                other => panic!("option {option:#x}: expected an error, got {other:?}"),
            }
        }
        // An unknown export name is refused, the right one accepted.
        let go = |name: &str| {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&0u16.to_be_bytes());
            d
        };
        let replies = raw.option(OPT_GO, &go("nope")).await;
        assert!(
            matches!(replies.as_slice(), [OptionReply::Error { code, .. }] if *code == REP_ERR_UNKNOWN),
            "{replies:?}"
        );
        let replies = raw.option(OPT_GO, &go("")).await;
        assert_eq!(replies.last(), Some(&OptionReply::Ack));
        raw.mode = HeaderMode::Simple;
        assert!(raw.read(0, 4096, 0).await.is_ok());
        raw.request(CMD_DISC, 0, 0, 0, &[]).await;
        raw.expect_closed(STEP).await;
        server_result(task).await.expect("clean end");
    })
    .await
}

/// A client that never finishes the handshake is dropped after the handshake timeout — both
/// one that says nothing and one that keeps sending harmless options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_drops_slow_clients() {
    hostile(async {
        let config = ServerConfig {
            handshake_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        };
        let (mut silent, silent_task) = raw_pair(export(), config.clone());
        silent.greeting().await;
        let started = Instant::now();
        silent.expect_closed(Duration::from_secs(3)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "dropped after {took:?}"
        );
        let err = dropped_with_error(silent_task).await;
        assert!(matches!(err, Error::Timeout(_)), "{err:?}");

        let (mut chatty, chatty_task) = raw_pair(export(), config);
        chatty.greeting().await;
        chatty.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE).await;
        let started = Instant::now();
        let mut closed = false;
        while started.elapsed() < Duration::from_secs(3) {
            let mut req = Vec::new();
            nbd::proto::OptionRequest::simple(OPT_LIST).encode(&mut req);
            if chatty.try_send(&req).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !closed {
            chatty.expect_closed(Duration::from_secs(1)).await;
        }
        let err = dropped_with_error(chatty_task).await;
        assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    })
    .await
}

/// A request with a bad magic ends the connection (the stream can no longer be framed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_the_connection() {
    hostile(async {
        for mode in ALL_MODES {
            let (mut raw, task) = raw_pair(export(), ServerConfig::default());
            raw.handshake(mode).await;
            let len = mode.request_len();
            let mut bad = vec![0x5a; len];
            bad[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
            raw.send(&bad).await;
            raw.expect_closed(STEP).await;
            let err = dropped_with_error(task).await;
            assert!(err.is_protocol(), "{mode:?}: {err:?}");
        }
    })
    .await
}

/// A WRITE claiming a 1 GiB payload (over the 2 MiB maximum) is a hard disconnect, before the
/// server reads or buffers any of it; the same with a 64-bit length under extended headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_disconnects() {
    hostile(async {
        for (mode, length) in [
            (HeaderMode::Simple, 1u64 << 30),
            (HeaderMode::Structured, 1 << 30),
            (HeaderMode::Extended, 1 << 30),
            (HeaderMode::Extended, 1 << 40),
        ] {
            let e = export();
            let before = e.snapshot();
            let (mut raw, task) = raw_pair(e.clone(), ServerConfig::default());
            raw.handshake(mode).await;
            raw.request(CMD_WRITE, 0, 0, length, &[0xee; 64 * 1024])
                .await;
            let started = Instant::now();
            raw.expect_closed(STEP).await;
            assert!(started.elapsed() < Duration::from_secs(2));
            let err = dropped_with_error(task).await;
            assert!(err.is_protocol(), "{mode:?}: {err:?}");
            assert!(e.snapshot() == before, "nothing may be written");
        }
    })
    .await
}

/// Unknown commands get EINVAL and the connection stays usable (also one that carries a
/// payload under extended headers, which the server must skip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_gets_einval() {
    hostile(async {
        for mode in ALL_MODES {
            let e = export();
            let expected = e.snapshot();
            let (mut raw, task) = raw_pair(e.clone(), ServerConfig::default());
            raw.handshake(mode).await;
            for command in [0x42u16, CMD_RESIZE, 0xffff] {
                let errno = raw.command(command, 0, 0, 4096).await;
                assert_eq!(errno, EINVAL, "{mode:?}: command {command:#x}");
            }
            // Unknown flags on a known command.
            assert_eq!(raw.command(CMD_FLUSH, 0x4000, 0, 0).await, EINVAL);
            if mode == HeaderMode::Extended {
                let cookie = raw
                    .request(0x42, CMD_FLAG_PAYLOAD_LEN, 0, 100, &[7; 100])
                    .await;
                let r = raw.full_reply().await;
                assert_eq!(r[0].cookie(), cookie);
                assert_eq!(r[0].error(), EINVAL);
            }
            let got = raw.read(0, 8192, 0).await.expect("read after EINVAL");
            assert!(got[..] == expected[..8192]);
            raw.request(CMD_DISC, 0, 0, 0, &[]).await;
            raw.expect_closed(STEP).await;
            server_result(task).await.expect("clean end");
        }
    })
    .await
}

/// Reads past the end get EINVAL, writes past the end ENOSPC (their payload is consumed, so
/// the stream stays in step); the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_end_keep_the_connection() {
    hostile(async {
        for mode in ALL_MODES {
            let e = export();
            let expected = e.snapshot();
            let (mut raw, task) = raw_pair(e.clone(), ServerConfig::default());
            let (size, _) = raw.handshake(mode).await;
            assert_eq!(raw.read(size, 4096, 0).await, Err(EINVAL));
            assert_eq!(raw.read(size - 512, 4096, 0).await, Err(EINVAL));
            assert_eq!(raw.read(u64::MAX - 511, 4096, 0).await, Err(EINVAL));
            let cookie = raw
                .request(CMD_WRITE, 0, size - 4096, 8192, &[1; 8192])
                .await;
            let r = raw.full_reply().await;
            assert_eq!(r[0].cookie(), cookie);
            assert_eq!(r[0].error(), ENOSPC);
            assert!(e.snapshot() == expected);
            let got = raw.read(size - 4096, 4096, 0).await.expect("read");
            assert!(got[..] == expected[(size - 4096) as usize..]);
            raw.request(CMD_DISC, 0, 0, 0, &[]).await;
            raw.expect_closed(STEP).await;
            server_result(task).await.expect("clean end");
        }
    })
    .await
}

/// A client that pipelines thousands of reads and never reads a reply must not make the
/// server do unbounded work or hold unbounded memory: once the socket is full the server stops
/// taking requests. Meanwhile a well-behaved client is served normally, and when the hostile
/// client goes away its connection ends promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_without_reading_replies() {
    hostile(async {
        let e = Arc::new(MemExport::new(64 * MIB, full_caps(1)));
        e.fill(3 * MIB, &pattern(64 * KIB as usize, 1));
        // Reads hand out slices of one buffer, so even a misbehaving server would not run the
        // test machine out of memory; the read counter tells what the server took on.
        *e.shared_read.lock().unwrap() = Some(Bytes::from(vec![0x11u8; 256 * 1024]));
        let server = TestServer::start(e.clone(), "", ServerConfig::default());
        let (mut raw, task) = raw_pair(e.clone(), ServerConfig::default());
        raw.handshake(HeaderMode::Structured).await;
        const REQUESTS: u64 = 4000;
        let mut burst = Vec::new();
        for i in 0..REQUESTS {
            nbd::proto::Request {
                flags: 0,
                command: CMD_READ,
                cookie: i + 1,
                offset: (i % 200) * 256 * KIB,
                length: 256 * KIB,
            }
            .encode(HeaderMode::Structured, &mut burst);
        }
        // 112 KB of requests: the socket buffers take all of it without the server reading.
        raw.send(&burst).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        let taken = e.reads.load(Ordering::SeqCst);
        // In flight (64) plus what the socket buffers hold (a few 256 KiB replies).
        assert!(
            taken < 200,
            "the server read {taken} of {REQUESTS} requests whose replies nobody reads"
        );

        // Another client is served meanwhile (its reads come from the shared buffer too).
        *e.shared_read.lock().unwrap() = None;
        well_behaved(&server, &e).await;

        // The flooder goes away: its connection ends soon, without a panic.
        drop(raw);
        let started = Instant::now();
        let _ = server_result(task).await;
        assert!(started.elapsed() < STEP);
        well_behaved(&server, &e).await;
    })
    .await
}

/// Several hostile clients at once (garbage, a stalled handshake, an oversized write, a
/// flood) do not stop a well-behaved client on the same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_behaved_client_is_served_next_to_hostile_ones() {
    hostile(async {
        let e = export();
        let config = ServerConfig {
            handshake_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        let server = TestServer::start(e.clone(), "", config);
        let mut garbage = server.raw().await;
        garbage.send(&[0xff; 4096]).await;
        let mut stalled = server.raw().await;
        stalled.greeting().await;
        let mut oversized = server.raw().await;
        oversized.handshake(HeaderMode::Extended).await;
        oversized
            .request(CMD_WRITE, 0, 0, 1 << 30, &[0; 1024])
            .await;
        let mut flood = server.raw().await;
        flood.handshake(HeaderMode::Simple).await;
        let mut burst = Vec::new();
        for i in 0..2000u64 {
            nbd::proto::Request {
                flags: 0,
                command: CMD_READ,
                cookie: i,
                offset: 0,
                length: 64 * KIB,
            }
            .encode(HeaderMode::Simple, &mut burst);
        }
        flood.send(&burst).await;
        for _ in 0..3 {
            well_behaved(&server, &e).await;
        }
        garbage.expect_closed(STEP).await;
        oversized.expect_closed(STEP).await;
        stalled.expect_closed(STEP).await;
        well_behaved(&server, &e).await;
    })
    .await
}
