//! The server's limits, in process with ferry's own client: FAST_ZERO refused with ENOTSUP
//! when zeroing is not fast, block-size constraints advertised and enforced, read-only exports
//! refusing writes with EPERM, and requests past the end (EINVAL for reads, ENOSPC for
//! writes). The client's own argument checks are bypassed with `Connection::call`, so what is
//! tested is the server's enforcement; every refused request must leave the image alone and
//! the connection usable.

mod server_common;

use std::sync::atomic::Ordering;

use bytes::Bytes;
use nbd::Error;
use nbd::client::ZeroFlags;
use nbd::proto::consts::*;
use nbd::proto::{BlockSize, HeaderMode};
use nbd::server::ServerConfig;
use server_common::*;

/// FAST_ZERO fails fast with ENOTSUP, leaving the image alone, when zeroing is not fast: when
/// the export declines at run time, and when the export says so in its capabilities (then the
/// flag is not even advertised, and a client that sends it anyway gets ENOTSUP too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_zero_gets_enotsup_when_zeroing_is_slow() {
    guarded(async {
        let fast = ZeroFlags {
            no_hole: false,
            fast: true,
            fua: false,
        };
        for mode in ALL_MODES {
            // The export advertises fast zeroing but declines this time.
            let export = sample_export(full_caps(1));
            export.zero_is_fast.store(false, Ordering::SeqCst);
            let before = export.snapshot();
            let server = TestServer::start(export.clone(), "", ServerConfig::default());
            let client = connect(&server, mode).await;
            assert!(client.info().has_flag(TFLAG_SEND_FAST_ZERO));
            match client.write_zeroes(0, 64 * KIB, fast).await {
                Err(Error::Command { errno, .. }) => assert_eq!(errno, ENOTSUP, "{mode:?}"),
                other => panic!("{mode:?}: expected ENOTSUP, got {other:?}"),
            }
            assert!(
                export.snapshot() == before,
                "a refused fast zero changed the image"
            );
            assert_eq!(export.zeroes.load(Ordering::SeqCst), 0);
            // Still usable; and once zeroing is fast, the same request works.
            client.read(0, 4096).await.expect("read after ENOTSUP");
            export.zero_is_fast.store(true, Ordering::SeqCst);
            client
                .write_zeroes(0, 64 * KIB, fast)
                .await
                .expect("fast zero");
            assert!(
                client
                    .read(0, 64 * KIB)
                    .await
                    .unwrap()
                    .iter()
                    .all(|b| *b == 0)
            );

            // The export says zeroing is never fast.
            let export = sample_export(full_caps(1));
            export.set_caps(|c| c.fast_zero = false);
            let before = export.snapshot();
            let server = TestServer::start(export.clone(), "", ServerConfig::default());
            let client = connect(&server, mode).await;
            assert!(client.info().has_flag(TFLAG_SEND_WRITE_ZEROES));
            assert!(!client.info().has_flag(TFLAG_SEND_FAST_ZERO), "{mode:?}");
            assert!(matches!(
                client.write_zeroes(0, 64 * KIB, fast).await,
                Err(Error::Unsupported(_))
            ));
            let e = errno(
                conn(&client)
                    .call(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 64 * KIB, None)
                    .await,
                "FAST_ZERO on an export without fast zeroing",
            );
            assert_eq!(e, ENOTSUP, "{mode:?}");
            assert!(export.snapshot() == before);
            assert_eq!(export.zeroes.load(Ordering::SeqCst), 0);
            // Plain zeroing still works.
            client
                .write_zeroes(0, 64 * KIB, ZeroFlags::default())
                .await
                .expect("slow zero");
            assert_eq!(export.zeroes.load(Ordering::SeqCst), 1);
        }
    })
    .await
}

/// A 512-byte minimum block size is advertised and enforced (EINVAL for unaligned requests,
/// nothing written), and a read over the maximum payload fails; the connection survives all
/// of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_size_limits_are_enforced() {
    guarded(async {
        for mode in ALL_MODES {
            let export = sample_export(full_caps(512));
            let before = export.snapshot();
            let server = TestServer::start(export.clone(), "", ServerConfig::default());
            let client = connect(&server, mode).await;
            assert_eq!(
                client.info().block_size,
                BlockSize {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 2 * MIB as u32
                }
            );
            let c = conn(&client);
            let unaligned: [(u16, u64, u64); 7] = [
                (CMD_READ, 100, 512),
                (CMD_READ, 0, 100),
                (CMD_READ, 512, 1000),
                (CMD_TRIM, 100, 4096),
                (CMD_WRITE_ZEROES, 0, 700),
                (CMD_WRITE_ZEROES, 513, 512),
                (CMD_TRIM, 4096, 4095),
            ];
            for (cmd, offset, len) in unaligned {
                let e = errno(c.call(cmd, 0, offset, len, None).await, "unaligned");
                assert_eq!(e, EINVAL, "{mode:?}: {} {offset}+{len}", command_name(cmd));
            }
            let e = errno(
                c.call(CMD_WRITE, 0, 512, 100, Some(Bytes::from(vec![0xee; 100])))
                    .await,
                "unaligned write",
            );
            assert_eq!(e, EINVAL);
            let e = errno(
                c.call(CMD_WRITE, 0, 100, 512, Some(Bytes::from(vec![0xee; 512])))
                    .await,
                "unaligned write",
            );
            assert_eq!(e, EINVAL);
            assert!(
                export.snapshot() == before,
                "{mode:?}: a refused request wrote"
            );
            assert_eq!(export.writes.load(Ordering::SeqCst), 0);
            // Over the maximum payload: refused (EOVERFLOW or EINVAL), connection kept.
            let e = errno(c.call(CMD_READ, 0, 0, 4 * MIB, None).await, "read > max");
            assert!(e == EOVERFLOW || e == EINVAL, "{mode:?}: errno {e}");
            let e = errno(
                c.call(CMD_READ, 0, 0, 2 * MIB + 512, None).await,
                "read > max",
            );
            assert!(e == EOVERFLOW || e == EINVAL, "{mode:?}: errno {e}");
            // Aligned requests work, and the client splits a 4 MiB read itself.
            let got = client.read(0, 4 * MIB).await.expect("split read");
            assert!(got[..] == before[..]);
            client
                .write(512, Bytes::from(vec![0x5a; 1024]), false)
                .await
                .expect("aligned write");
            assert!(export.snapshot()[512..1536].iter().all(|b| *b == 0x5a));
        }
    })
    .await
}

/// A read-only export advertises READ_ONLY, no write commands, and refuses every write with
/// EPERM without touching the image; reads keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_with_eperm() {
    guarded(async {
        for mode in ALL_MODES {
            let export = sample_export(full_caps(1));
            export.set_caps(|c| c.read_only = true);
            let before = export.snapshot();
            let server = TestServer::start(export.clone(), "", ServerConfig::default());
            let client = connect(&server, mode).await;
            let info = client.info().clone();
            assert!(info.has_flag(TFLAG_READ_ONLY));
            for flag in [
                TFLAG_SEND_FLUSH,
                TFLAG_SEND_FUA,
                TFLAG_SEND_TRIM,
                TFLAG_SEND_WRITE_ZEROES,
                TFLAG_SEND_FAST_ZERO,
            ] {
                assert!(
                    !info.has_flag(flag),
                    "{mode:?}: flag {flag:#x} on a read-only export"
                );
            }
            assert!(matches!(
                client.write(0, Bytes::from(vec![1; 4096]), false).await,
                Err(Error::Unsupported(_))
            ));
            let c = conn(&client);
            let e = errno(
                c.call(CMD_WRITE, 0, 0, 4096, Some(Bytes::from(vec![1; 4096])))
                    .await,
                "write",
            );
            assert_eq!(e, EPERM, "{mode:?}: write");
            for cmd in [CMD_WRITE_ZEROES, CMD_TRIM] {
                let e = errno(c.call(cmd, 0, 0, 4096, None).await, "write-like");
                assert_eq!(e, EPERM, "{mode:?}: {}", command_name(cmd));
            }
            assert!(export.snapshot() == before);
            assert_eq!(export.writes.load(Ordering::SeqCst), 0);
            assert_eq!(export.zeroes.load(Ordering::SeqCst), 0);
            assert_eq!(export.trims.load(Ordering::SeqCst), 0);
            let got = client.read(0, 4 * MIB).await.expect("reads still work");
            assert!(got[..] == before[..]);
        }
    })
    .await
}

/// Past the end: reads, cache and block status get EINVAL; writes, zeroes and trims get
/// ENOSPC; an offset + length that overflows is refused too. Nothing is written and the
/// connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_end() {
    guarded(async {
        for mode in ALL_MODES {
            let export = sample_export(full_caps(1));
            let before = export.snapshot();
            let server = TestServer::start(export.clone(), "", ServerConfig::default());
            let client = connect(&server, mode).await;
            let c = conn(&client);
            let size = 4 * MIB;
            let mut cases = vec![
                (CMD_READ, size - 4096, 8192, EINVAL),
                (CMD_READ, size, 1, EINVAL),
                (CMD_READ, u64::MAX - 100, 4096, EINVAL),
                (CMD_CACHE, size, 4096, EINVAL),
                (CMD_WRITE_ZEROES, size - 4096, 8192, ENOSPC),
                (CMD_WRITE_ZEROES, u64::MAX - 10, 4096, ENOSPC),
                (CMD_TRIM, size, 4096, ENOSPC),
            ];
            if mode != HeaderMode::Simple {
                cases.push((CMD_BLOCK_STATUS, size, 4096, EINVAL));
            }
            for (cmd, offset, len, want) in cases {
                let e = errno(c.call(cmd, 0, offset, len, None).await, "past the end");
                assert_eq!(e, want, "{mode:?}: {} at {offset}+{len}", command_name(cmd));
            }
            let e = errno(
                c.call(
                    CMD_WRITE,
                    0,
                    size - 4096,
                    8192,
                    Some(Bytes::from(vec![9; 8192])),
                )
                .await,
                "write past the end",
            );
            assert_eq!(e, ENOSPC, "{mode:?}: write");
            assert!(export.snapshot() == before);
            assert_eq!(export.writes.load(Ordering::SeqCst), 0);
            // Exactly up to the end is fine.
            let got = client.read(size - 4096, 4096).await.expect("last block");
            assert!(got[..] == before[(size - 4096) as usize..]);
            client
                .write(size - 4096, Bytes::from(vec![3; 4096]), false)
                .await
                .expect("write the last block");
        }
    })
    .await
}
