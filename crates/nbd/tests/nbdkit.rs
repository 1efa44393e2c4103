//! The client against nbdkit 1.32: the memory, sparse-random, pattern and null plugins, the
//! error filter, export listing and TCP. nbdkit 1.32 has no extended headers, so a default
//! client falls back to compact structured replies.

mod interop;

use bytes::Bytes;
use interop::*;
use nbd::Client;
use nbd::client::ZeroFlags;
use nbd::proto::HeaderMode;
use nbd::proto::consts::*;
use testutil::tools::{merge, nbdcopy_read, nbdinfo_map};
use testutil::{Nbdkit, pseudo_random};

const BASE: &str = CONTEXT_BASE_ALLOCATION;

/// The mode a client asking for `headers` gets from nbdkit 1.32.
fn nbdkit_mode(headers: Headers) -> HeaderMode {
    match headers {
        Headers::Simple => HeaderMode::Simple,
        _ => HeaderMode::Structured,
    }
}

/// Writes, zeroes (plain, NO_HOLE, FAST_ZERO), trims, flushes and caches on the memory plugin,
/// then reads everything back through a fresh connection and compares extents with nbdinfo.
async fn memory_round_trip(headers: Headers) {
    let size = 16 * MIB;
    let peer = Nbdkit::new("memory").arg(&format!("size={size}")).start();
    let client = connect(&peer, headers, &[BASE]).await;
    let info = client.info().clone();
    assert_eq!(
        info.mode,
        nbdkit_mode(headers),
        "nbdkit 1.32 has no extended headers"
    );
    assert_eq!(info.size, size);
    assert!(
        !info.block_size_advertised,
        "the memory plugin sends no block sizes"
    );
    for flag in [
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_SEND_FAST_ZERO,
        TFLAG_SEND_CACHE,
        TFLAG_CAN_MULTI_CONN,
    ] {
        assert!(
            info.has_flag(flag),
            "flag {flag:#x} missing: {:#x}",
            info.flags
        );
    }

    let mut model = vec![0u8; size as usize];
    let put = |model: &mut Vec<u8>, offset: u64, data: &[u8]| {
        model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    };
    for (i, (offset, len)) in [(0, MIB), (3 * MIB + 5, 333_333), (8 * MIB, 4 * MIB)]
        .into_iter()
        .enumerate()
    {
        let data = pseudo_random(300 + i as u64, len as usize);
        client
            .write(offset, Bytes::from(data.clone()), i == 1)
            .await
            .expect("write");
        put(&mut model, offset, &data);
    }
    client
        .write_zeroes(256 * KIB, 64 * KIB, ZeroFlags::default())
        .await
        .expect("zero");
    put(&mut model, 256 * KIB, &[0; 64 * KIB as usize]);
    let no_hole = ZeroFlags {
        no_hole: true,
        ..ZeroFlags::default()
    };
    client
        .write_zeroes(512 * KIB, 64 * KIB, no_hole)
        .await
        .expect("zero, no hole");
    put(&mut model, 512 * KIB, &[0; 64 * KIB as usize]);
    let fast = ZeroFlags {
        fast: true,
        ..ZeroFlags::default()
    };
    client
        .write_zeroes(9 * MIB, MIB, fast)
        .await
        .expect("fast zero");
    put(&mut model, 9 * MIB, &[0; MIB as usize]);
    // The memory plugin reads trimmed ranges back as zeros.
    client.trim(10 * MIB, MIB, true).await.expect("trim");
    put(&mut model, 10 * MIB, &[0; MIB as usize]);
    client.cache(0, size).await.expect("cache");
    client.flush().await.expect("flush");
    let now = client.read(0, size).await.unwrap();
    assert_same(&now, &model, "read back on the writing connection");

    let extents = if headers == Headers::Simple {
        None
    } else {
        let e = client
            .block_status(BASE, 0, size)
            .await
            .expect("block status");
        assert_tiles(&e, size);
        assert_eq!(flags_at(&e, 0), 0, "written data must be data");
        assert_eq!(
            flags_at(&e, 10 * MIB),
            u64::from(STATE_HOLE | STATE_ZERO),
            "trimmed"
        );
        assert_eq!(
            flags_at(&e, 14 * MIB),
            u64::from(STATE_HOLE | STATE_ZERO),
            "never written"
        );
        Some(e)
    };
    client.disconnect().await;
    if let Some(e) = extents {
        assert_eq!(
            as_map(&e),
            merge(&nbdinfo_map(&peer.nbd_uri(), None)),
            "vs nbdinfo"
        );
    }
    for other in ALL_HEADERS {
        let fresh = connect(&peer, other, &[]).await;
        assert_same(
            &fresh.read(0, size).await.unwrap(),
            &model,
            &format!("fresh {other:?}"),
        );
        fresh.disconnect().await;
    }
}

#[tokio::test]
async fn memory_round_trip_default_headers() {
    guarded(memory_round_trip(Headers::Extended)).await
}

#[tokio::test]
async fn memory_round_trip_compact_headers() {
    guarded(memory_round_trip(Headers::Compact)).await
}

#[tokio::test]
async fn memory_round_trip_simple_replies() {
    guarded(memory_round_trip(Headers::Simple)).await
}

/// sparse-random: extents equal nbdinfo's, zero extents read as zeros, and the contents equal
/// what nbdcopy reads (40 MiB, so the client splits at the default 32 MiB maximum).
#[tokio::test]
async fn sparse_random_extents_and_contents() {
    guarded(async {
        let size = 40 * MIB;
        let peer = Nbdkit::new("sparse-random")
            .read_only()
            .args(&[
                &format!("size={size}"),
                "seed=42",
                "percent=30",
                "runlength=262144",
            ])
            .arg("random-content=true")
            .start();
        let tool = merge(&nbdinfo_map(&peer.nbd_uri(), None));
        let reference = nbdcopy_read(&peer.nbd_uri(), peer.dir());
        assert_eq!(reference.len() as u64, size);
        for headers in [Headers::Extended, Headers::Simple] {
            let client = connect(&peer, headers, &[BASE]).await;
            assert_eq!(client.info().block_size.maximum, DEFAULT_MAX_PAYLOAD);
            let data = client.read(0, size).await.expect("40 MiB read");
            assert_same(&data, &reference, &format!("vs nbdcopy ({headers:?})"));
            if headers != Headers::Simple {
                let extents = client.block_status(BASE, 0, size).await.unwrap();
                assert_tiles(&extents, size);
                assert!(extents.len() > 20, "expected many runs: {}", extents.len());
                assert_eq!(as_map(&extents), tool, "vs nbdinfo --map");
                for e in extents
                    .iter()
                    .filter(|e| e.flags & u64::from(STATE_ZERO) != 0)
                {
                    let run = &data[e.offset as usize..(e.offset + e.length) as usize];
                    assert!(run.iter().all(|b| *b == 0), "zero extent {e:?} holds data");
                }
            }
            client.disconnect().await;
        }
    })
    .await
}

/// The pattern plugin: every 8-byte word holds its own offset, big-endian; the last partial
/// word is truncated. Checked at unaligned offsets and in every header mode.
#[tokio::test]
async fn pattern_plugin_bytes() {
    guarded(async {
        let size = 5 * MIB + 3;
        let peer = Nbdkit::new("pattern").arg(&format!("size={size}")).start();
        let mut expected = Vec::with_capacity(size as usize + 8);
        for word in (0..size).step_by(8) {
            expected.extend_from_slice(&word.to_be_bytes());
        }
        expected.truncate(size as usize);
        assert_eq!(&expected[0x28..0x30], &[0, 0, 0, 0, 0, 0, 0, 0x28]);
        for headers in ALL_HEADERS {
            let client = connect(&peer, headers, &[]).await;
            assert!(
                client.info().has_flag(TFLAG_READ_ONLY),
                "pattern is read-only"
            );
            assert_eq!(client.size(), size);
            let all = client.read(0, size).await.unwrap();
            assert_same(&all, &expected, &format!("pattern ({headers:?})"));
            check_reads(&client, &expected, &odd_ranges(size)).await;
            check_reads(&client, &expected, &[(size - 3, 3), (size - 11, 11)]).await;
            client.disconnect().await;
        }
    })
    .await
}

/// The null plugin: reads are zeros, writes vanish, everything is a hole.
#[tokio::test]
async fn null_plugin() {
    guarded(async {
        let size = 1 << 30;
        let peer = Nbdkit::new("null").arg(&format!("size={size}")).start();
        let client = connect(&peer, Headers::Extended, &[BASE]).await;
        assert_eq!(client.size(), size);
        client
            .write(MIB, Bytes::from(pseudo_random(1, 4096)), false)
            .await
            .unwrap();
        client
            .write_zeroes(0, size, ZeroFlags::default())
            .await
            .unwrap();
        client.flush().await.unwrap();
        for (offset, len) in [(0, 2 * MIB), (size - MIB - 1, MIB + 1)] {
            let data = client.read(offset, len).await.unwrap();
            assert!(
                data.iter().all(|b| *b == 0),
                "null read at {offset} is not zero"
            );
        }
        let extents = client.block_status(BASE, 0, size).await.unwrap();
        assert_tiles(&extents, size);
        assert!(
            extents
                .iter()
                .all(|e| e.flags == u64::from(STATE_HOLE | STATE_ZERO)),
            "{extents:?}"
        );
        client.disconnect().await;
    })
    .await
}

/// NBD_OPT_LIST through the exportname filter, and the plain default listing.
#[tokio::test]
async fn list_exports() {
    guarded(async {
        let peer = Nbdkit::new("memory")
            .filter("exportname")
            .args(&["size=1M", "exportname=a", "exportname=b"])
            .args(&["exportname-list=explicit", "exportdesc=fixed:ferry test"])
            .export_name("b")
            .start();
        let listed = opts(&peer.nbd_uri()).list_exports().await.expect("list");
        let want = |n: &str| (n.to_owned(), "ferry test".to_owned());
        assert_eq!(listed, vec![want("a"), want("b")]);
        let client = connect(&peer, Headers::Extended, &[]).await;
        assert_eq!(client.info().export, "b");
        client.disconnect().await;

        let plain = Nbdkit::new("memory").arg("size=1M").start();
        let listed = opts(&plain.nbd_uri()).list_exports().await.expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].0, "");
    })
    .await
}

/// TCP transport with an `nbd://127.0.0.1:PORT/` URI, and multi-conn (memory allows it).
#[tokio::test]
async fn tcp_and_multi_conn() {
    guarded(async {
        let peer = Nbdkit::new("memory").arg("size=8M").tcp().start();
        assert!(
            peer.nbd_uri().starts_with("nbd://127.0.0.1:"),
            "{}",
            peer.nbd_uri()
        );
        let o = peer_opts(&peer, Headers::Extended, &[]);
        let client = Client::connect(&o, 3).await.expect("connect over TCP");
        assert_eq!(client.connections().len(), 3);
        let data = pseudo_random(500, 8 * MIB as usize);
        client
            .write(0, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        client.flush().await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let c = client.clone();
            tasks.push(tokio::spawn(async move {
                (i, c.read(i * 256 * KIB, 256 * KIB).await)
            }));
        }
        for t in tasks {
            let (i, got) = t.await.unwrap();
            let off = (i * 256 * KIB) as usize;
            assert_same(
                &got.unwrap(),
                &data[off..off + 256 * KIB as usize],
                "TCP read",
            );
        }
        client.disconnect().await;
    })
    .await
}
