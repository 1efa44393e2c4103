//! Pipelining and multi-conn against qemu-nbd 10: `--shared` decides CAN_MULTI_CONN, hundreds
//! of requests in flight come back right, and a soft disconnect waits for them.

mod interop;

use bytes::Bytes;
use interop::*;
use nbd::proto::consts::*;
use nbd::{Client, Reply};
use testutil::{QemuNbd, pseudo_random};

/// `--shared 4` advertises CAN_MULTI_CONN: four connections carry 256 pipelined reads and
/// concurrent writes that one flush covers.
#[tokio::test]
async fn multi_conn_with_shared_4() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = mixed_layout();
        let img = image(dir.path(), &layout, "raw");
        let size = layout.size();
        let mut model = layout.expected();
        let peer = QemuNbd::new(&img).shared(4).start();
        let mut o = peer_opts(&peer, Headers::Extended, &[]);
        o.settings.max_in_flight = 64;
        let client = Client::connect(&o, 4).await.expect("four connections");
        assert!(client.info().has_flag(TFLAG_CAN_MULTI_CONN));
        assert_eq!(client.connections().len(), 4);

        let mut pending = Vec::new();
        for i in 0..256u64 {
            let conn = &client.connections()[(i % 4) as usize];
            let len = 4096 + i * 37;
            let off = (i * 24_571) % (size - len);
            pending.push((
                off,
                len,
                conn.submit(CMD_READ, 0, off, len, None).await.unwrap(),
            ));
        }
        let busy: usize = client.connections().iter().map(|c| c.in_flight()).sum();
        assert!(
            busy > 0,
            "requests must still be in flight before the first wait"
        );
        for (off, len, p) in pending {
            match p.wait().await.expect("pipelined read") {
                Reply::Data(d) => {
                    assert_same(&d, &model[off as usize..(off + len) as usize], "pipelined")
                }
                other => panic!("read returned {other:?}"),
            }
        }

        // Concurrent writes spread over the connections, then one flush.
        let mut tasks = Vec::new();
        for i in 0..16u64 {
            let client = client.clone();
            let data = pseudo_random(200 + i, 64 * KIB as usize);
            let off = i * 320 * KIB;
            model[off as usize..(off + 64 * KIB) as usize].copy_from_slice(&data);
            tasks.push(tokio::spawn(async move {
                client.write(off, Bytes::from(data), false).await
            }));
        }
        for t in tasks {
            t.await.unwrap().expect("concurrent write");
        }
        client.flush().await.expect("flush");
        client.disconnect().await;
        let fresh = connect(&peer, Headers::Compact, &[]).await;
        assert_same(
            &fresh.read(0, size).await.unwrap(),
            &model,
            "after multi-conn writes",
        );
        fresh.disconnect().await;
    })
    .await
}

/// Without `--shared`, no CAN_MULTI_CONN: asking for 4 connections opens 1, which still carries
/// 256 requests in flight.
#[tokio::test]
async fn single_conn_without_shared() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = mixed_layout();
        let img = image(dir.path(), &layout, "raw");
        let expected = layout.expected();
        let peer = QemuNbd::new(&img).read_only().start();
        let mut o = peer_opts(&peer, Headers::Extended, &[]);
        o.settings.max_in_flight = 256;
        let client = Client::connect(&o, 4).await.expect("connect");
        assert!(!client.info().has_flag(TFLAG_CAN_MULTI_CONN));
        assert_eq!(client.connections().len(), 1);
        let conn = &client.connections()[0];
        let mut pending = Vec::new();
        for i in 0..256u64 {
            let off = i * 23 * KIB + i;
            pending.push((
                off,
                conn.submit(CMD_READ, 0, off, 8 * KIB, None).await.unwrap(),
            ));
        }
        assert!(conn.in_flight() > 0);
        for (off, p) in pending {
            let Reply::Data(d) = p.wait().await.expect("read") else {
                panic!("not data")
            };
            assert_same(
                &d,
                &expected[off as usize..(off + 8 * KIB) as usize],
                "pipelined",
            );
        }
        client.disconnect().await;
    })
    .await
}

/// A soft disconnect waits for the replies still owed: qemu-nbd drops the socket as soon as it
/// sees NBD_CMD_DISC, so a DISC sent early would lose them.
#[tokio::test]
async fn disconnect_waits_for_requests_in_flight() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = big_layout();
        let img = image(dir.path(), &layout, "raw");
        let expected = layout.expected();
        let peer = QemuNbd::new(&img).read_only().start();
        let mut o = peer_opts(&peer, Headers::Extended, &[]);
        o.settings.max_in_flight = 128;
        let client = Client::connect(&o, 1).await.unwrap();
        let conn = client.connections()[0].clone();
        let mut pending = Vec::new();
        for i in 0..64u64 {
            let off = i * 512 * KIB;
            pending.push((
                off,
                conn.submit(CMD_READ, 0, off, 256 * KIB, None)
                    .await
                    .unwrap(),
            ));
        }
        conn.disconnect().await;
        assert_eq!(
            conn.in_flight(),
            0,
            "disconnect returned with requests in flight"
        );
        for (off, p) in pending {
            let Reply::Data(d) = p.wait().await.expect("reply owed before DISC") else {
                panic!("not data")
            };
            assert_same(
                &d,
                &expected[off as usize..(off + 256 * KIB) as usize],
                "read",
            );
        }
        let err = conn.call(CMD_READ, 0, 0, 512, None).await.unwrap_err();
        assert!(
            err.is_fatal(),
            "requests after disconnect must fail: {err:?}"
        );
    })
    .await
}
