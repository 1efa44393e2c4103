//! The client against nbdkit 1.32 filters that make things go wrong or tight: injected errors
//! (error filter), enforced block-size limits (blocksize-policy filter) and a stalled server
//! (delay filter).

mod interop;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use interop::*;
use nbd::client::ZeroFlags;
use nbd::proto::consts::*;
use nbd::{Error, Reply};
use testutil::{Nbdkit, pseudo_random};

const BASE: &str = CONTEXT_BASE_ALLOCATION;

/// The error filter injects failures while a control file exists: the client reports
/// `Error::Command` with nbdkit's errno and the request's range, and the connection keeps
/// working once the file is gone.
async fn error_filter(headers: Headers) {
    let ctl = testutil::temp_dir();
    let (read_ctl, write_ctl, extents_ctl) = (
        ctl.path().join("pread"),
        ctl.path().join("pwrite"),
        ctl.path().join("extents"),
    );
    let size = 40 * MIB;
    let peer = Nbdkit::new("memory")
        .filter("error")
        .arg(&format!("size={size}"))
        .args(&["error-pread=EIO", "error-pread-rate=100%"])
        .arg(&format!("error-pread-file={}", read_ctl.display()))
        .args(&["error-pwrite=ENOSPC", "error-pwrite-rate=100%"])
        .arg(&format!("error-pwrite-file={}", write_ctl.display()))
        .args(&["error-extents=EIO", "error-extents-rate=100%"])
        .arg(&format!("error-extents-file={}", extents_ctl.display()))
        .start();
    let client = connect(&peer, headers, &[BASE]).await;
    let data = pseudo_random(400, MIB as usize);
    client
        .write(0, Bytes::from(data.clone()), false)
        .await
        .expect("write before injection");

    touch(&read_ctl);
    let err = client.read(4096, 8192).await.unwrap_err();
    assert_command_error(&err, CMD_READ, EIO, 4096, 8192);
    assert!(err.to_string().contains("EIO"), "{err}");
    // A read split in two: the first piece's error is reported.
    let err = client.read(0, size).await.unwrap_err();
    assert_command_error(&err, CMD_READ, EIO, 0, u64::from(DEFAULT_MAX_PAYLOAD));
    std::fs::remove_file(&read_ctl).unwrap();
    assert_same(
        &client.read(0, MIB).await.unwrap(),
        &data,
        "read after errors",
    );

    touch(&write_ctl);
    let err = client
        .write(MIB, Bytes::from(vec![7; 4096]), false)
        .await
        .unwrap_err();
    assert_command_error(&err, CMD_WRITE, ENOSPC, MIB, 4096);
    std::fs::remove_file(&write_ctl).unwrap();
    client
        .write(MIB, Bytes::from(vec![7; 4096]), false)
        .await
        .expect("write after errors");

    if headers != Headers::Simple {
        touch(&extents_ctl);
        let err = client.block_status(BASE, 0, size).await.unwrap_err();
        match &err {
            Error::Command {
                command,
                errno,
                offset,
                ..
            } => {
                assert_eq!(
                    (*command, *errno, *offset),
                    (CMD_BLOCK_STATUS, EIO, 0),
                    "{err}"
                )
            }
            other => panic!("expected a block status error, got {other:?}"),
        }
        std::fs::remove_file(&extents_ctl).unwrap();
        let extents = client
            .block_status(BASE, 0, size)
            .await
            .expect("extents after errors");
        assert_eq!(flags_at(&extents, 0), 0);
    }
    let back = client.read(MIB, 4096).await.unwrap();
    assert!(back.iter().all(|b| *b == 7));
    client.disconnect().await;
}

fn touch(path: &Path) {
    std::fs::write(path, b"").unwrap();
}

#[tokio::test]
async fn error_filter_structured() {
    guarded(error_filter(Headers::Extended)).await
}

#[tokio::test]
async fn error_filter_simple_replies() {
    guarded(error_filter(Headers::Simple)).await
}

/// blocksize-policy advertises min 4 KiB / preferred 64 KiB / max 1 MiB and fails anything
/// outside them with EINVAL: the client obeys (splits big requests, refuses unaligned ones
/// itself), while the same oversized read sent raw is rejected by the server.
#[tokio::test]
async fn block_size_constraints_are_obeyed() {
    guarded(async {
        let size = 8 * MIB;
        let peer = Nbdkit::new("memory")
            .filter("blocksize-policy")
            .arg(&format!("size={size}"))
            .args(&["blocksize-minimum=4096", "blocksize-preferred=65536"])
            .args(&["blocksize-maximum=1048576", "blocksize-error-policy=error"])
            .start();
        for headers in ALL_HEADERS {
            let client = connect(&peer, headers, &[]).await;
            let b = client.info().block_size;
            assert!(client.info().block_size_advertised);
            assert_eq!(
                (b.minimum, b.preferred, b.maximum),
                (4096, 65536, MIB as u32)
            );
            let data = pseudo_random(headers as u64, 3 * MIB as usize + 8192);
            client
                .write(4096, Bytes::from(data.clone()), false)
                .await
                .expect("split write");
            let got = client
                .read(4096, data.len() as u64)
                .await
                .expect("split read");
            assert_same(&got, &data, "through 1 MiB pieces");
            client
                .write_zeroes(0, size, ZeroFlags::default())
                .await
                .expect("zero all");
            assert!(client.read(0, size).await.unwrap().iter().all(|b| *b == 0));

            for (offset, length) in [(1, 4096), (4096, 100), (0, 4097)] {
                let err = client.read(offset, length).await.unwrap_err();
                assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            }
            let conn = &client.connections()[0];
            let err = conn.call(CMD_READ, 0, 0, 2 * MIB, None).await.unwrap_err();
            assert_command_error(&err, CMD_READ, EINVAL, 0, 2 * MIB);
            let ok = conn
                .call(CMD_READ, 0, 0, MIB, None)
                .await
                .expect("1 MiB is allowed");
            assert!(matches!(ok, Reply::Data(d) if d.len() as u64 == MIB));
            client.disconnect().await;
        }
    })
    .await
}

/// A server that stops answering: the request fails with a timeout after the client's stall
/// timeout, not before and not never, and the connection is then dead. Idle time with nothing
/// in flight does not count.
#[tokio::test]
async fn stalled_server_times_out() {
    guarded(async {
        let peer = Nbdkit::new("memory")
            .filter("delay")
            .args(&["size=1M", "delay-read=1500ms"])
            .start();
        let mut o = peer_opts(&peer, Headers::Extended, &[]);
        o.settings.timeout = Duration::from_millis(500);
        let client = nbd::Client::connect(&o, 1).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(700)).await;
        client
            .write(0, Bytes::from_static(&[1; 512]), false)
            .await
            .expect("idle is fine");
        let start = Instant::now();
        let err = client.read(0, 512).await.unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, Error::Timeout(_)), "{err:?}");
        // The delayed reply would come at 1.5 s: failing earlier is the client's own timeout.
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(1400),
            "{took:?}"
        );
        let again = client
            .write(0, Bytes::from_static(&[2; 512]), false)
            .await
            .unwrap_err();
        assert!(again.is_fatal(), "{again:?}");
        // Close our end so nbdkit can stop at once.
        client.disconnect().await;
    })
    .await
}
