//! The client against qemu-nbd 10, writing: writes, WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO),
//! TRIM, FLUSH and CACHE on raw and qcow2 exports, checked through fresh connections and in the
//! image files; read-only exports refusing writes.

mod interop;

use bytes::Bytes;
use interop::*;
use nbd::Error;
use nbd::client::ZeroFlags;
use nbd::proto::consts::*;
use testutil::tools::{merge, nbdinfo_map, qemu_img};
use testutil::{QemuNbd, pseudo_random};

const BASE: &str = CONTEXT_BASE_ALLOCATION;

/// Writes, zeroes, trims and flushes, then checks the result through a fresh connection and
/// in the image file itself.
async fn write_round_trip(format: &str, headers: Headers) {
    let dir = testutil::temp_dir();
    let layout = mixed_layout();
    let img = image(dir.path(), &layout, format);
    let size = layout.size();
    let mut model = layout.expected();
    let peer = QemuNbd::new(&img).format(format).discard().start();
    let client = connect(&peer, headers, &[BASE]).await;
    let info = client.info().clone();
    for flag in [
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_SEND_FAST_ZERO,
        TFLAG_SEND_CACHE,
    ] {
        assert!(
            info.has_flag(flag),
            "flag {flag:#x} missing: {:#x}",
            info.flags
        );
    }
    assert!(!info.has_flag(TFLAG_READ_ONLY));

    let put = |model: &mut Vec<u8>, offset: u64, data: &[u8]| {
        model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    };
    // An unaligned write inside the first data run, and a FUA write across data → hole.
    let a = pseudo_random(100, 70_001);
    client
        .write(12_345, Bytes::from(a.clone()), false)
        .await
        .expect("write");
    put(&mut model, 12_345, &a);
    let b = pseudo_random(101, 68 * KIB as usize);
    client
        .write(MIB - 4 * KIB, Bytes::from(b.clone()), true)
        .await
        .expect("FUA write");
    put(&mut model, MIB - 4 * KIB, &b);
    // A write that lands wholly in a hole.
    let c = pseudo_random(102, 4096);
    client
        .write(2 * MIB, Bytes::from(c.clone()), false)
        .await
        .expect("write in hole");
    put(&mut model, 2 * MIB, &c);

    // WRITE_ZEROES with NO_HOLE keeps the range allocated.
    let no_hole = ZeroFlags {
        no_hole: true,
        ..ZeroFlags::default()
    };
    client
        .write_zeroes(256 * KIB, 128 * KIB, no_hole)
        .await
        .expect("zero no-hole");
    put(&mut model, 256 * KIB, &[0; 128 * KIB as usize]);
    // Plain WRITE_ZEROES (may punch a hole) in the second data run.
    let data2 = 3 * MIB + 256 * KIB;
    client
        .write_zeroes(data2, 192 * KIB, ZeroFlags::default())
        .await
        .expect("zero");
    put(&mut model, data2, &[0; 192 * KIB as usize]);
    // FAST_ZERO either zeroes quickly or fails with ENOTSUP leaving the data alone.
    let data3 = 4 * MIB + 576 * KIB;
    let fast = ZeroFlags {
        fast: true,
        fua: true,
        ..ZeroFlags::default()
    };
    match client.write_zeroes(data3, 64 * KIB, fast).await {
        Ok(()) => put(&mut model, data3, &[0; 64 * KIB as usize]),
        Err(e) => assert_command_error(&e, CMD_WRITE_ZEROES, ENOTSUP, data3, 64 * KIB),
    }
    // TRIM leaves undefined contents in general; qemu with --discard=unmap reads zeros.
    client
        .trim(512 * KIB, 256 * KIB, false)
        .await
        .expect("trim");
    put(&mut model, 512 * KIB, &[0; 256 * KIB as usize]);
    client.cache(0, size).await.expect("cache");
    client.flush().await.expect("flush");

    // The same connection sees everything at once.
    let now = client.read(0, size).await.expect("read back");
    assert_same(&now, &model, "read back on the writing connection");
    if headers != Headers::Simple {
        let extents = client
            .block_status(BASE, 0, size)
            .await
            .expect("block status");
        assert_tiles(&extents, size);
        let hole = u64::from(STATE_HOLE);
        let zero = u64::from(STATE_ZERO);
        // qemu sets HOLE for anything that is not data, allocated zeros included, so only the
        // ZERO bit says something here (see no_hole_keeps_the_range_allocated).
        assert_ne!(
            flags_at(&extents, 256 * KIB) & zero,
            0,
            "zeroed range not reported zero"
        );
        assert_ne!(
            flags_at(&extents, data2) & zero,
            0,
            "zeroed range not reported zero"
        );
        assert_ne!(
            flags_at(&extents, 512 * KIB) & zero,
            0,
            "trimmed range not reported zero"
        );
        assert_eq!(
            flags_at(&extents, 2 * MIB) & hole,
            0,
            "written hole must be data"
        );
        client.disconnect().await;
        assert_eq!(as_map(&extents), merge(&nbdinfo_map(&peer.nbd_uri(), None)));
    } else {
        client.disconnect().await;
    }

    // A fresh connection, in another header mode, reads the same.
    let other = if headers == Headers::Simple {
        Headers::Extended
    } else {
        Headers::Simple
    };
    let fresh = connect(&peer, other, &[]).await;
    let again = fresh.read(0, size).await.expect("fresh read");
    assert_same(&again, &model, "read back through a fresh connection");
    fresh.disconnect().await;

    // And the image file holds it (qemu-img -U reads past qemu-nbd's lock).
    let raw = if format == "raw" {
        img.clone()
    } else {
        let out = dir.path().join("check.raw");
        let (i, o) = (img.to_str().unwrap(), out.to_str().unwrap());
        qemu_img(&["convert", "-U", "-f", format, "-O", "raw", i, o]);
        out
    };
    assert_same(&std::fs::read(&raw).unwrap(), &model, "image file contents");
}

#[tokio::test]
async fn raw_write_round_trip_extended() {
    guarded(write_round_trip("raw", Headers::Extended)).await
}

#[tokio::test]
async fn raw_write_round_trip_compact() {
    guarded(write_round_trip("raw", Headers::Compact)).await
}

#[tokio::test]
async fn raw_write_round_trip_simple() {
    guarded(write_round_trip("raw", Headers::Simple)).await
}

#[tokio::test]
async fn qcow2_write_round_trip_extended() {
    guarded(write_round_trip("qcow2", Headers::Extended)).await
}

#[tokio::test]
async fn qcow2_write_round_trip_simple() {
    guarded(write_round_trip("qcow2", Headers::Simple)).await
}

/// NO_HOLE reaches the server: on a raw file with `--discard=unmap`, zeroing with NO_HOLE keeps
/// the blocks allocated while plain zeroing and TRIM punch holes (seen in the file's block
/// count; qemu's HOLE bit cannot tell allocated zeros from holes).
#[tokio::test]
async fn no_hole_keeps_the_range_allocated() {
    guarded(async {
        use std::os::unix::fs::MetadataExt;
        let dir = testutil::temp_dir();
        let layout = testutil::Layout::new().data(4 * MIB, 9);
        let img = image(dir.path(), &layout, "raw");
        let allocated = || std::fs::metadata(&img).unwrap().blocks() * 512;
        let before = allocated();
        assert!(
            before >= 4 * MIB,
            "the sample image must be fully allocated"
        );
        let peer = QemuNbd::new(&img).discard().start();
        let client = connect(&peer, Headers::Extended, &[]).await;
        let no_hole = ZeroFlags {
            no_hole: true,
            ..ZeroFlags::default()
        };
        client
            .write_zeroes(0, MIB, no_hole)
            .await
            .expect("zero, no hole");
        client.flush().await.unwrap();
        assert_eq!(allocated(), before, "NO_HOLE zeroing freed blocks");
        client
            .write_zeroes(2 * MIB, MIB, ZeroFlags::default())
            .await
            .expect("zero");
        client.flush().await.unwrap();
        assert_eq!(
            allocated(),
            before - MIB,
            "plain zeroing should punch a hole"
        );
        client.trim(MIB, MIB, false).await.expect("trim");
        client.flush().await.unwrap();
        assert_eq!(allocated(), before - 2 * MIB, "trim should punch a hole");
        let got = client.read(0, 4 * MIB).await.unwrap();
        assert!(got[..3 * MIB as usize].iter().all(|b| *b == 0));
        assert_same(
            &got[3 * MIB as usize..],
            &layout.expected()[3 * MIB as usize..],
            "tail",
        );
        client.disconnect().await;
    })
    .await
}

/// The client refuses writes to a read-only export itself; sent anyway, qemu-nbd fails them
/// with EINVAL ("Export is read-only") and the connection stays usable.
#[tokio::test]
async fn read_only_export_refuses_writes() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = mixed_layout();
        let img = image(dir.path(), &layout, "raw");
        let expected = layout.expected();
        let peer = QemuNbd::new(&img).read_only().start();
        for headers in ALL_HEADERS {
            let client = connect(&peer, headers, &[]).await;
            let err = client
                .write(0, Bytes::from_static(b"nope"), false)
                .await
                .unwrap_err();
            assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
            assert!(err.to_string().contains("read-only"), "{err}");
            let err = client
                .write_zeroes(0, 4096, ZeroFlags::default())
                .await
                .unwrap_err();
            assert!(err.to_string().contains("read-only"), "{err}");
            let err = client.trim(0, 4096, false).await.unwrap_err();
            assert!(err.to_string().contains("read-only"), "{err}");

            let conn = &client.connections()[0];
            let payload = Bytes::from(vec![0xee; 512]);
            // The spec suggests EPERM; qemu-nbd 10 answers EINVAL, with a message when the
            // reply can carry one.
            let err = conn
                .call(CMD_WRITE, 0, 4096, 512, Some(payload))
                .await
                .unwrap_err();
            assert_command_error(&err, CMD_WRITE, EINVAL, 4096, 512);
            let err = conn
                .call(CMD_WRITE_ZEROES, 0, 8192, 4096, None)
                .await
                .unwrap_err();
            assert_command_error(&err, CMD_WRITE_ZEROES, EINVAL, 8192, 4096);
            if headers != Headers::Simple {
                assert!(err.to_string().contains("Export is read-only"), "{err}");
            }
            // Still usable, and nothing changed.
            let got = client
                .read(0, 64 * KIB)
                .await
                .expect("read after the refusal");
            assert_same(
                &got,
                &expected[..64 * KIB as usize],
                &format!("{headers:?}"),
            );
            client.disconnect().await;
        }
        assert_same(&std::fs::read(&img).unwrap(), &expected, "image untouched");
    })
    .await
}

/// An export over 4 GiB: with extended headers one request carries a 64-bit length (WRITE_ZEROES,
/// BLOCK_STATUS descriptors); with compact headers the client splits below 4 GiB and a raw
/// 64-bit request is refused before it is sent.
#[tokio::test]
async fn export_over_4_gib() {
    guarded(async {
        const GIB: u64 = 1 << 30;
        let dir = testutil::temp_dir();
        let size = 6 * GIB;
        let layout = testutil::Layout::new()
            .data(MIB, 20)
            .hole(5 * GIB - MIB)
            .data(MIB, 21)
            .hole(GIB - MIB);
        let img = image(dir.path(), &layout, "raw");
        let tail = pseudo_random(21, MIB as usize);
        let peer = QemuNbd::new(&img).discard().start();
        for headers in [Headers::Extended, Headers::Compact] {
            let client = connect(&peer, headers, &[BASE]).await;
            assert_eq!(client.size(), size);
            client
                .write(5 * GIB, Bytes::from(tail.clone()), false)
                .await
                .unwrap();
            assert_same(
                &client.read(5 * GIB, MIB).await.unwrap(),
                &tail,
                "data past 4 GiB",
            );
            let extents = client
                .block_status(BASE, 0, size)
                .await
                .expect("block status");
            assert_tiles(&extents, size);
            assert_eq!(flags_at(&extents, 5 * GIB), 0);
            assert_eq!(
                flags_at(&extents, 4 * GIB + 1),
                u64::from(STATE_HOLE | STATE_ZERO)
            );
            let conn = &client.connections()[0];
            if headers == Headers::Extended {
                // One descriptor longer than 4 GiB, and one 6 GiB WRITE_ZEROES.
                let once = client
                    .block_status_once(MIB, size - MIB, false)
                    .await
                    .unwrap();
                assert!(once[0].1[0].length > u64::from(u32::MAX), "{once:?}");
                conn.call(CMD_WRITE_ZEROES, 0, 0, size, None)
                    .await
                    .expect("64-bit zero");
            } else {
                let err = conn
                    .call(CMD_WRITE_ZEROES, 0, 0, size, None)
                    .await
                    .unwrap_err();
                assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
                client
                    .write_zeroes(0, size, ZeroFlags::default())
                    .await
                    .expect("split zero");
            }
            client.flush().await.unwrap();
            assert!(
                client
                    .read(5 * GIB, MIB)
                    .await
                    .unwrap()
                    .iter()
                    .all(|b| *b == 0)
            );
            let extents = client.block_status(BASE, 0, size).await.unwrap();
            assert_eq!(extents.len(), 1, "{extents:?}");
            assert_eq!(extents[0].flags, u64::from(STATE_HOLE | STATE_ZERO));
            client.disconnect().await;
        }
    })
    .await
}
