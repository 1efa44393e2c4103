//! Checksumming real endpoints: a sparse local file (SEEK_DATA extents) and the same image
//! served by qemu-nbd (NBD block status), against the sequential reference over the file's
//! bytes, for both constructions, with and without extents, with reads smaller than a block.

use std::sync::Arc;

use blkhash::endpoint::{ReadOptions, checksum};
use blkhash::{Algorithm, Kind, Spec, reference};
use disk::Endpoint;
use disk::file::FileEndpoint;
use disk::nbd::NbdEndpoint;

const MIB: u64 = 1 << 20;

fn layout() -> testutil::Layout {
    // Data, explicit zeroes and holes with boundaries inside blocks, ending in a short block.
    testutil::Layout::new()
        .data(3 * MIB + 4096, 1)
        .hole(5 * MIB)
        .zero(2 * MIB + 512)
        .data(MIB + 512, 2)
        .hole(9 * MIB - 4608)
        .data(64 << 10, 3)
        .hole(3 * MIB + 12288)
}

fn specs() -> Vec<Spec> {
    vec![
        Spec::imageio(),
        Spec::new(Kind::Imageio, Some(Algorithm::Sha256), Some(MIB)).unwrap(),
        Spec::new(Kind::Imageio, Some(Algorithm::Sha1), Some(16 * MIB)).unwrap(),
        Spec::blkhash(),
        Spec::parse_blkhash("md5/4k").unwrap(),
    ]
}

async fn check(ep: Arc<dyn Endpoint>, image: &[u8]) {
    for spec in specs() {
        let want = reference::checksum(&spec, image);
        for opts in [
            ReadOptions::default(),
            ReadOptions {
                extents: false,
                ..ReadOptions::default()
            },
            ReadOptions {
                request_size: 192 << 10,
                in_flight: 3,
                extents: true,
            },
        ] {
            let got = checksum(ep.clone(), spec, &opts).await.unwrap();
            assert_eq!(got, want, "{spec:?} {opts:?} on {}", ep.name());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_and_nbd_endpoints_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.raw");
    let layout = layout();
    testutil::make_sparse_image(&path, &layout);
    let image = std::fs::read(&path).unwrap();
    assert_eq!(image, layout.expected());

    let file: Arc<dyn Endpoint> = Arc::new(FileEndpoint::open_source(&path, false).unwrap());
    assert!(
        file.caps().extents,
        "the file endpoint should report extents"
    );
    check(file, &image).await;

    let server = testutil::QemuNbd::new(&path).read_only().start();
    let uri = server.nbd_uri();
    let opts = nbd::ConnectOptions::from_uri(&uri.parse().unwrap());
    let nbd: Arc<dyn Endpoint> =
        Arc::new(NbdEndpoint::connect(&uri, &opts, 2, true).await.unwrap());
    check(nbd.clone(), &image).await;
    nbd.close().await.unwrap();
}
