//! The client against nbd-server 3.24, the reference server: it knows neither structured
//! replies nor block status, so every client ends up with simple replies, and block status is
//! refused cleanly before anything is sent.

mod interop;

use bytes::Bytes;
use interop::*;
use nbd::client::ZeroFlags;
use nbd::proto::HeaderMode;
use nbd::proto::consts::*;
use nbd::{Client, Error};
use testutil::{NbdServer, pseudo_random};

/// Read/write round trip in simple-reply mode, whatever the client asked for.
#[tokio::test]
async fn round_trip_with_simple_replies() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = mixed_layout();
        let img = image(dir.path(), &layout, "raw");
        let size = layout.size();
        let mut model = layout.expected();
        let peer = NbdServer::new(&img).start();
        for headers in ALL_HEADERS {
            let client = connect(&peer, headers, &[CONTEXT_BASE_ALLOCATION]).await;
            let info = client.info();
            assert_eq!(
                info.mode,
                HeaderMode::Simple,
                "nbd-server 3.24 has simple replies only"
            );
            assert!(info.contexts.is_empty());
            assert!(
                !info.block_size_advertised,
                "nbd-server sends no block sizes"
            );
            assert_eq!(info.size, size);
            for flag in [
                TFLAG_SEND_FLUSH,
                TFLAG_SEND_FUA,
                TFLAG_SEND_TRIM,
                TFLAG_SEND_WRITE_ZEROES,
            ] {
                assert!(
                    info.has_flag(flag),
                    "flag {flag:#x} missing: {:#x}",
                    info.flags
                );
            }
            assert!(!info.has_flag(TFLAG_READ_ONLY));
            assert!(!info.has_flag(TFLAG_SEND_FAST_ZERO));
            let err = client
                .block_status(CONTEXT_BASE_ALLOCATION, 0, size)
                .await
                .unwrap_err();
            assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
            let err = client.block_status_once(0, size, false).await.unwrap_err();
            assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
            let fast = ZeroFlags {
                fast: true,
                ..ZeroFlags::default()
            };
            let err = client.write_zeroes(0, 4096, fast).await.unwrap_err();
            assert!(matches!(err, Error::Unsupported(_)), "{err:?}");

            assert_same(
                &client.read(0, size).await.unwrap(),
                &model,
                "initial contents",
            );
            check_reads(&client, &model, &odd_ranges(size)).await;
            let seed = 600 + headers as u64;
            let data = pseudo_random(seed, 100_003);
            let off = 77_777 + seed;
            client
                .write(off, Bytes::from(data.clone()), true)
                .await
                .expect("write");
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            client
                .write_zeroes(3 * MIB + 256 * KIB, 64 * KIB, ZeroFlags::default())
                .await
                .unwrap();
            model[(3 * MIB + 256 * KIB) as usize..(3 * MIB + 320 * KIB) as usize].fill(0);
            client.trim(5 * MIB, 64 * KIB, false).await.expect("trim");
            client.flush().await.expect("flush");
            assert_same(
                &client.read(0, size).await.unwrap(),
                &model,
                "same connection",
            );
            client.disconnect().await;
        }
        let fresh = connect(&peer, Headers::Extended, &[]).await;
        assert_same(
            &fresh.read(0, size).await.unwrap(),
            &model,
            "fresh connection",
        );
        fresh.disconnect().await;
        assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
    })
    .await
}

/// Simple replies carry 32 MiB of data each when a 36 MiB read is split.
#[tokio::test]
async fn large_read_split_with_simple_replies() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = big_layout();
        let img = image(dir.path(), &layout, "raw");
        let peer = NbdServer::new(&img).read_only().start();
        let client = connect(&peer, Headers::Extended, &[]).await;
        let got = client.read(0, layout.size()).await.expect("36 MiB read");
        assert_same(&got, &layout.expected(), "36 MiB read");
        client.disconnect().await;
    })
    .await
}

/// A read-only export: the client refuses writes; a write sent anyway gets EPERM and the
/// connection stays usable.
#[tokio::test]
async fn read_only_export() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = mixed_layout();
        let img = image(dir.path(), &layout, "raw");
        let peer = NbdServer::new(&img).read_only().start();
        let client = connect(&peer, Headers::Extended, &[]).await;
        assert!(client.info().has_flag(TFLAG_READ_ONLY));
        let err = client
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("read-only"), "{err}");
        let conn = &client.connections()[0];
        let err = conn
            .call(CMD_WRITE, 0, 0, 512, Some(Bytes::from(vec![1; 512])))
            .await
            .unwrap_err();
        assert_command_error(&err, CMD_WRITE, EPERM, 0, 512);
        let got = client.read(0, 4096).await.expect("read after EPERM");
        assert_same(&got, &layout.expected()[..4096], "unchanged");
        client.disconnect().await;
    })
    .await
}

/// TCP (`nbd://127.0.0.1:PORT/disk`), NBD_OPT_LIST, an unknown export, multi-conn.
#[tokio::test]
async fn tcp_list_and_unknown_export() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = mixed_layout();
        let img = image(dir.path(), &layout, "raw");
        let other = dir.path().join("other.raw");
        testutil::make_sparse_image(&other, &testutil::Layout::new().data(MIB, 77));
        let peer = NbdServer::new(&img)
            .extra_export("second", &other)
            .tcp()
            .start();
        assert!(
            peer.nbd_uri().starts_with("nbd://127.0.0.1:"),
            "{}",
            peer.nbd_uri()
        );
        let mut names: Vec<String> = opts(&peer.nbd_uri())
            .list_exports()
            .await
            .expect("list")
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.sort();
        assert_eq!(names, ["disk", "second"]);

        let o = peer_opts(&peer, Headers::Extended, &[]);
        let client = Client::connect(&o, 2).await.expect("connect over TCP");
        assert!(client.info().has_flag(TFLAG_CAN_MULTI_CONN));
        assert_eq!(client.connections().len(), 2);
        assert_same(
            &client.read(0, layout.size()).await.unwrap(),
            &layout.expected(),
            "TCP",
        );
        client.disconnect().await;

        let second = Client::connect(&opts(&peer.uri_for("second")), 1)
            .await
            .unwrap();
        assert_eq!(second.size(), MIB);
        assert_same(
            &second.read(0, MIB).await.unwrap(),
            &testutil::pseudo_random(77, MIB as usize),
            "second",
        );
        second.disconnect().await;

        let err = Client::connect(&opts(&peer.uri_for("missing")), 1)
            .await
            .err()
            .expect("unknown");
        assert!(err.to_string().contains("does not exist"), "{err}");
    })
    .await
}
