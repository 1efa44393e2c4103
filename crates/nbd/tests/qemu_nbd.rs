//! The client against qemu-nbd 10, reading: raw and qcow2 exports in all three header modes
//! (extended, compact structured, simple), extents compared with nbdinfo and qemu-img map,
//! block-size splitting, DF / REQ_ONE / CACHE, and export listing.

mod interop;

use interop::*;
use nbd::proto::HeaderMode;
use nbd::proto::consts::*;
use nbd::{Client, Error, Reply};
use testutil::QemuNbd;
use testutil::tools::{QemuMapExtent, merge, nbdinfo_map, qemu_img_map};

const BASE: &str = CONTEXT_BASE_ALLOCATION;

/// Reads, extents (against nbdinfo and qemu-img map) and the negotiated info of a read-only
/// export in one header mode.
async fn check_read_only_export(format: &str, headers: Headers) {
    let dir = testutil::temp_dir();
    let layout = mixed_layout();
    let img = image(dir.path(), &layout, format);
    let expected = layout.expected();
    let size = layout.size();
    let peer = QemuNbd::new(&img).format(format).read_only().start();
    // The independent views first: qemu-nbd admits one client at a time by default.
    let tool_map = merge(&nbdinfo_map(&peer.nbd_uri(), None));
    let qemu_map = qemu_img_map(&peer.nbd_uri(), "raw");

    let client = connect(&peer, headers, &[BASE]).await;
    let info = client.info().clone();
    assert_eq!(
        info.mode,
        headers.full_mode(),
        "qemu-nbd 10 offers every mode"
    );
    assert_eq!(info.size, size);
    assert!(info.has_flag(TFLAG_READ_ONLY));
    assert!(
        !info.has_flag(TFLAG_CAN_MULTI_CONN),
        "--shared defaults to 1"
    );
    assert!(!info.tls);
    assert!(info.block_size_advertised, "qemu-nbd sends INFO_BLOCK_SIZE");
    assert_eq!(
        (
            info.block_size.minimum,
            info.block_size.preferred,
            info.block_size.maximum
        ),
        (1, 4096, 32 << 20)
    );

    let whole = client
        .read(0, size)
        .await
        .expect("reading the whole export");
    assert_same(&whole, &expected, "whole export");
    check_reads(&client, &expected, &odd_ranges(size)).await;

    if headers == Headers::Simple {
        assert!(
            info.contexts.is_empty(),
            "no meta contexts without structured replies"
        );
        let err = client.block_status(BASE, 0, size).await.unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    } else {
        assert!(info.context_id(BASE).is_some(), "{:?}", info.contexts);
        let extents = client
            .block_status(BASE, 0, size)
            .await
            .expect("block status");
        assert_tiles(&extents, size);
        assert_eq!(
            as_map(&extents),
            tool_map,
            "extents differ from nbdinfo --map"
        );
        let ours: Vec<QemuMapExtent> = merge_qemu(extents.iter().map(|e| QemuMapExtent {
            start: e.offset,
            length: e.length,
            data: e.flags & u64::from(STATE_HOLE) == 0,
            zero: e.flags & u64::from(STATE_ZERO) != 0,
        }));
        assert_eq!(
            ours,
            merge_qemu(qemu_map),
            "extents differ from qemu-img map"
        );
        // Sanity against the layout: data runs are never holes; holes read as zero.
        for (offset, segment) in layout.placed() {
            if let testutil::Segment::Data { len, .. } = segment {
                for at in [offset, offset + len - 1] {
                    assert_eq!(
                        flags_at(&extents, at),
                        0,
                        "data at {at} not reported as data"
                    );
                }
            }
        }
        assert_ne!(flags_at(&extents, 2 * MIB) & u64::from(STATE_ZERO), 0);
        // An unaligned window agrees with the whole map, clipped.
        let (start, len) = (12345, 3 * MIB + 17);
        let window = client.block_status(BASE, start, len).await.expect("window");
        assert_eq!(window.first().map(|e| e.offset), Some(start));
        let end = window.last().map(|e| e.offset + e.length);
        assert_eq!(
            end,
            Some(start + len),
            "window must be clipped to the request"
        );
        for e in &window {
            assert_eq!(e.flags, flags_at(&extents, e.offset), "window extent {e:?}");
        }
    }
    client.disconnect().await;
}

fn merge_qemu(extents: impl IntoIterator<Item = QemuMapExtent>) -> Vec<QemuMapExtent> {
    let mut out: Vec<QemuMapExtent> = Vec::new();
    for e in extents {
        match out.last_mut() {
            Some(l) if (l.data, l.zero) == (e.data, e.zero) && l.start + l.length == e.start => {
                l.length += e.length
            }
            _ => out.push(e),
        }
    }
    out
}

#[tokio::test]
async fn raw_read_only_extended_headers() {
    guarded(check_read_only_export("raw", Headers::Extended)).await
}

#[tokio::test]
async fn raw_read_only_compact_headers() {
    guarded(check_read_only_export("raw", Headers::Compact)).await
}

#[tokio::test]
async fn raw_read_only_simple_replies() {
    guarded(check_read_only_export("raw", Headers::Simple)).await
}

#[tokio::test]
async fn qcow2_read_only_extended_headers() {
    guarded(check_read_only_export("qcow2", Headers::Extended)).await
}

#[tokio::test]
async fn qcow2_read_only_compact_headers() {
    guarded(check_read_only_export("qcow2", Headers::Compact)).await
}

#[tokio::test]
async fn qcow2_read_only_simple_replies() {
    guarded(check_read_only_export("qcow2", Headers::Simple)).await
}

/// A 36 MiB read is split at qemu-nbd's 32 MiB maximum payload, in every header mode.
#[tokio::test]
async fn read_larger_than_max_payload_is_split() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = big_layout();
        let img = image(dir.path(), &layout, "raw");
        let expected = layout.expected();
        let peer = QemuNbd::new(&img).read_only().start();
        for headers in ALL_HEADERS {
            let client = connect(&peer, headers, &[]).await;
            assert!(layout.size() > u64::from(client.info().block_size.maximum));
            let got = client.read(0, layout.size()).await.expect("big read");
            assert_same(&got, &expected, &format!("36 MiB read ({headers:?})"));
            // An unaligned range that still needs two requests.
            let (off, len) = (MIB - 3, 33 * MIB + 5);
            let got = client.read(off, len).await.expect("big unaligned read");
            assert_same(
                &got,
                &expected[off as usize..(off + len) as usize],
                "unaligned",
            );
            client.disconnect().await;
        }
    })
    .await
}

/// DF reads, REQ_ONE block status and CACHE, sent as raw commands.
#[tokio::test]
async fn df_req_one_and_cache() {
    guarded(async {
        let dir = testutil::temp_dir();
        let layout = mixed_layout();
        let img = image(dir.path(), &layout, "raw");
        let expected = layout.expected();
        let size = layout.size();
        let peer = QemuNbd::new(&img).read_only().start();
        for headers in [Headers::Extended, Headers::Compact] {
            let client = connect(&peer, headers, &[BASE]).await;
            assert!(client.info().has_flag(TFLAG_SEND_DF));
            let conn = &client.connections()[0];
            // Across the data → hole boundary, in one chunk.
            let off = MIB - 32 * KIB;
            let Reply::Data(d) = conn
                .call(CMD_READ, CMD_FLAG_DF, off, 64 * KIB, None)
                .await
                .unwrap()
            else {
                panic!("DF read returned no data")
            };
            assert_same(
                &d,
                &expected[off as usize..(off + 64 * KIB) as usize],
                "DF read",
            );
            let one = client.block_status_once(0, size, true).await.unwrap();
            assert_eq!(one.len(), 1);
            assert_eq!(one[0].1.len(), 1, "REQ_ONE gives one descriptor: {one:?}");
            assert_eq!(one[0].1[0].length, MIB);
            let many = client.block_status_once(0, size, false).await.unwrap();
            assert!(many[0].1.len() > 1, "{many:?}");
            client.cache(0, size).await.expect("cache");
            client.disconnect().await;
        }
    })
    .await
}

/// NBD_OPT_LIST names the `-x` export with its `-D` description; GO to another name fails.
#[tokio::test]
async fn list_exports_and_export_names() {
    guarded(async {
        let dir = testutil::temp_dir();
        let img = image(dir.path(), &mixed_layout(), "raw");
        let peer = QemuNbd::new(&img)
            .read_only()
            .export_name("vm disk")
            .description("ferry test export")
            .start();
        let o = opts(&peer.nbd_uri());
        let exports = o.list_exports().await.expect("list");
        assert_eq!(
            exports,
            vec![("vm disk".to_owned(), "ferry test export".to_owned())]
        );

        let mut o = peer_opts(&peer, Headers::Extended, &[]);
        o.settings.full_info = true;
        let client = Client::connect(&o, 1).await.expect("named export");
        assert_eq!(client.info().export, "vm disk");
        assert_eq!(
            client.info().description.as_deref(),
            Some("ferry test export")
        );
        client.disconnect().await;

        let wrong = opts(&peer.uri_for("no such disk"));
        let err = Client::connect(&wrong, 1)
            .await
            .err()
            .expect("unknown export");
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert_eq!(
            HeaderMode::Extended,
            connect(&peer, Headers::Extended, &[]).await.info().mode
        );
    })
    .await
}
