//! qemu-nbd's own meta contexts: `qemu:allocation-depth` (`-A`) over a backing chain and
//! `qemu:dirty-bitmap:NAME` (`-B`) from a persistent qcow2 bitmap, next to `base:allocation`.

mod interop;

use interop::*;
use nbd::proto::consts::*;
use testutil::QemuNbd;
use testutil::tools::{merge, nbdinfo_map, qemu_img, qemu_io};

const BASE: &str = CONTEXT_BASE_ALLOCATION;

/// `--allocation-depth` over a two-layer qcow2 chain, next to `base:allocation` in the same
/// reply; compared with the known layout and with nbdinfo.
#[tokio::test]
async fn allocation_depth_context() {
    guarded(async {
        let dir = testutil::temp_dir();
        let size = 6 * MIB;
        let base_layout = testutil::Layout::new()
            .data(MIB, 10)
            .hole(MIB)
            .data(MIB, 11)
            .hole(3 * MIB);
        let base = image(dir.path(), &base_layout, "qcow2");
        let top = dir.path().join("top.qcow2");
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
        qemu_io(
            &top,
            "qcow2",
            &["write -P 0x11 512k 1M", "write -P 0x22 4M 512k"],
        );
        let mut expected = base_layout.expected();
        expected[512 * KIB as usize..(512 * KIB + MIB) as usize].fill(0x11);
        expected[4 * MIB as usize..(4 * MIB + 512 * KIB) as usize].fill(0x22);
        let want_depth = [
            (0, 512 * KIB, 2),
            (512 * KIB, MIB, 1),
            (1536 * KIB, 512 * KIB, 0),
            (2 * MIB, MIB, 2),
            (3 * MIB, MIB, 0),
            (4 * MIB, 512 * KIB, 1),
            (4608 * KIB, 1536 * KIB, 0),
        ];

        let peer = QemuNbd::new(&top)
            .format("qcow2")
            .read_only()
            .allocation_depth()
            .start();
        let tool = nbdinfo_map(&peer.nbd_uri(), Some(CONTEXT_ALLOCATION_DEPTH));
        for headers in [Headers::Extended, Headers::Compact] {
            let contexts = [BASE, CONTEXT_ALLOCATION_DEPTH];
            let client = connect(&peer, headers, &contexts).await;
            assert_eq!(
                client.info().contexts.len(),
                2,
                "{:?}",
                client.info().contexts
            );
            let depth = client
                .block_status(CONTEXT_ALLOCATION_DEPTH, 0, size)
                .await
                .unwrap();
            let got: Vec<_> = depth
                .iter()
                .map(|e| (e.offset, e.length, e.flags))
                .collect();
            assert_eq!(got, want_depth, "allocation depth ({headers:?})");
            assert_eq!(as_map(&depth), merge(&tool), "differs from nbdinfo");
            // Both contexts in one reply, each with its own descriptors.
            let once = client.block_status_once(0, size, false).await.unwrap();
            let ids: Vec<u32> = once.iter().map(|(id, _)| *id).collect();
            for name in contexts {
                let id = client.info().context_id(name).unwrap();
                assert!(ids.contains(&id), "no descriptors for {name}: {once:?}");
            }
            let alloc = client.block_status(BASE, 0, size).await.unwrap();
            assert_eq!(
                flags_at(&alloc, 1536 * KIB),
                u64::from(STATE_HOLE | STATE_ZERO)
            );
            assert_eq!(flags_at(&alloc, 2 * MIB) & u64::from(STATE_HOLE), 0);
            let data = client.read(0, size).await.unwrap();
            assert_same(&data, &expected, "backing chain contents");
            client.disconnect().await;
        }
    })
    .await
}

/// A persistent dirty bitmap recorded by qemu-io writes, exported with `-B`.
#[tokio::test]
async fn dirty_bitmap_context() {
    guarded(async {
        let dir = testutil::temp_dir();
        let img = dir.path().join("bitmap.qcow2");
        let path = img.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", path, "8M"]);
        qemu_img(&["bitmap", "-f", "qcow2", "--add", "-g", "64K", path, "b0"]);
        qemu_io(
            &img,
            "qcow2",
            &["write -P 0xab 1M 64k", "write 3M 4k", "write 5M 200k"],
        );
        let context = "qemu:dirty-bitmap:b0";
        let peer = QemuNbd::new(&img)
            .format("qcow2")
            .read_only()
            .bitmap("b0")
            .start();
        let tool = nbdinfo_map(&peer.nbd_uri(), Some(context));
        // 64 KiB granularity rounds the 4 KiB and 200 KiB writes out to whole granules.
        let want = [
            (0, MIB, 0),
            (MIB, 64 * KIB, 1),
            (MIB + 64 * KIB, 2 * MIB - 64 * KIB, 0),
            (3 * MIB, 64 * KIB, 1),
            (3 * MIB + 64 * KIB, 2 * MIB - 64 * KIB, 0),
            (5 * MIB, 256 * KIB, 1),
            (5 * MIB + 256 * KIB, 3 * MIB - 256 * KIB, 0),
        ];
        for headers in [Headers::Extended, Headers::Compact] {
            let client = connect(&peer, headers, &[context, BASE]).await;
            let dirty = client
                .block_status(context, 0, 8 * MIB)
                .await
                .expect("bitmap");
            let got: Vec<_> = dirty
                .iter()
                .map(|e| (e.offset, e.length, e.flags))
                .collect();
            assert_eq!(got, want, "dirty bitmap ({headers:?})");
            assert_eq!(as_map(&dirty), merge(&tool), "differs from nbdinfo");
            let data = client.read(MIB, 64 * KIB).await.unwrap();
            assert!(data.iter().all(|b| *b == 0xab));
            client.disconnect().await;
        }
    })
    .await
}

/// LIST_META_CONTEXT shows what `-A` and `-B` add; a SET_META_CONTEXT naming only unknown
/// contexts selects nothing, so the client refuses block status without asking.
#[tokio::test]
async fn listing_and_unknown_contexts() {
    guarded(async {
        let dir = testutil::temp_dir();
        let img = dir.path().join("list.qcow2");
        let path = img.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", path, "1M"]);
        qemu_img(&["bitmap", "-f", "qcow2", "--add", path, "b0"]);
        let peer = QemuNbd::new(&img)
            .format("qcow2")
            .read_only()
            .allocation_depth()
            .bitmap("b0")
            .start();
        for headers in [Headers::Extended, Headers::Compact] {
            let mut o = peer_opts(&peer, headers, &["qemu:dirty-bitmap:nope", "nope:x"]);
            o.settings.list_meta_contexts = true;
            let client = nbd::Client::connect(&o, 1).await.expect("connect");
            let offered = &client.info().offered_contexts;
            for name in [BASE, CONTEXT_ALLOCATION_DEPTH, "qemu:dirty-bitmap:b0"] {
                assert!(
                    offered.iter().any(|c| c == name),
                    "{name} not in {offered:?}"
                );
            }
            assert!(
                client.info().contexts.is_empty(),
                "{:?}",
                client.info().contexts
            );
            let err = client.block_status(BASE, 0, MIB).await.unwrap_err();
            assert!(matches!(err, nbd::Error::Unsupported(_)), "{err:?}");
            let err = client.block_status_once(0, MIB, false).await.unwrap_err();
            assert!(matches!(err, nbd::Error::Unsupported(_)), "{err:?}");
            client.disconnect().await;
        }
    })
    .await
}
