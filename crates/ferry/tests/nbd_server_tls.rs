//! `ferry nbd-server --tls-cert --tls-key`: TLS is mandatory. libnbd clients (nbdinfo,
//! nbdcopy) connect with `nbds+unix://…?tls-certificates=DIR` and ferry's client with the same
//! URI; clients without TLS, or trusting another CA, are refused. Certificates come from
//! testutil's throwaway CA.

mod nbd_server_common;

use nbd_server_common::*;
use testutil::Certs;

/// `nbds…` URI of `peer` that trusts the CA in `certs`.
fn tls_uri(peer: &testutil::ferry_nbd::FerryNbdPeer, certs: &Certs) -> String {
    let dir = certs.dir().to_str().unwrap().to_owned();
    peer.uri_with("nbds", peer.export(), &[("tls-certificates", &dir)])
}

#[test]
fn libnbd_clients_over_tls() {
    let certs = Certs::generate();
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let peer = server(&src).tls_from(&certs).read_only().start();
    assert!(
        peer.ready_uri().starts_with("nbds+unix://"),
        "{}",
        peer.ready_uri()
    );
    let uri = tls_uri(&peer, &certs);

    let info = run("nbdinfo", &[&uri]);
    assert!(
        info.expect_success().contains("with TLS"),
        "{}",
        info.stdout
    );
    assert!(nbdinfo_flag("--is", "tls", &uri));
    let map = testutil::tools::nbdinfo_map(&uri, None);
    assert_map_matches_file(&map, &src, &layout.expected(), "nbdinfo --map over TLS");

    let out = dir.path().join("out.raw");
    run(
        "nbdcopy",
        &["-C", "4", "-T", "4", &uri, out.to_str().unwrap()],
    )
    .expect_success();
    assert_same_file(&src, &out);
    drop(peer);

    // Writing over TLS.
    let dst = garbage_file(dir.path(), "dst.raw", layout.size());
    let peer = server(&dst).tls_from(&certs).start();
    let uri = tls_uri(&peer, &certs);
    run("nbdcopy", &[src.to_str().unwrap(), &uri]).expect_success();
    assert_same_file(&src, &dst);
}

#[test]
fn ferry_client_over_tls() {
    let certs = Certs::generate();
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let peer = server(&src).tls_from(&certs).read_only().start();
    let uri = tls_uri(&peer, &certs);
    let info = ferry(&["info", "--json", &uri]);
    let json: serde_json::Value = serde_json::from_str(info.expect_success()).unwrap();
    assert_eq!(json["negotiated"]["tls"].as_bool(), Some(true), "{json}");
    assert_eq!(json["size"].as_u64(), Some(layout.size()));
    let out = dir.path().join("out.raw");
    ferry(&["copy", &uri, out.to_str().unwrap()]).expect_success();
    assert_same_file(&src, &out);
    drop(peer);

    let dst = garbage_file(dir.path(), "dst.raw", layout.size());
    let peer = server(&dst).tls_from(&certs).start();
    let uri = tls_uri(&peer, &certs);
    ferry(&["copy", src.to_str().unwrap(), &uri]).expect_success();
    assert_same_file(&src, &dst);
}

/// TLS over TCP: the certificate names 127.0.0.1, and libnbd checks it.
#[test]
fn tls_over_tcp() {
    let certs = Certs::generate();
    let dir = testutil::temp_dir();
    let layout = layout();
    let src = image(dir.path(), "src.raw", &layout);
    let peer = server(&src).tls_from(&certs).tcp().read_only().start();
    let uri = tls_uri(&peer, &certs);
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");
    let out = dir.path().join("out.raw");
    run("nbdcopy", &[&uri, out.to_str().unwrap()]).expect_success();
    assert_same_file(&src, &out);
    ferry(&["info", &uri]).expect_success();
}

/// Clients without TLS are refused with TLS required; clients trusting another CA fail the
/// TLS handshake; a refused writer changes nothing.
#[test]
fn clients_without_tls_are_refused() {
    let certs = Certs::generate();
    let other = Certs::generate();
    let dir = testutil::temp_dir();
    let layout = layout();
    let dst = image(dir.path(), "dst.raw", &layout);
    let src = garbage_file(dir.path(), "src.raw", layout.size());
    let peer = server(&dst).tls_from(&certs).start();
    let plain = peer.nbd_uri();
    assert!(plain.starts_with("nbd+unix://"));

    run("nbdinfo", &[&plain]).expect_failure();
    let info = ferry(&["info", &plain]);
    let err = info.expect_failure();
    assert!(err.contains("TLS_REQD"), "ferry info without TLS: {err}");
    run("nbdcopy", &[&plain, "null:"]).expect_failure();
    run("nbdcopy", &[src.to_str().unwrap(), &plain]).expect_failure();
    ferry(&["copy", src.to_str().unwrap(), &plain]).expect_failure();
    run("qemu-img", &["info", "-f", "raw", &plain]).expect_failure();

    // A client trusting another CA: ferry's client checks the chain on any transport;
    // libnbd 1.14 verifies only when it has a host name, i.e. over TCP.
    let wrong_ca = tls_uri(&peer, &other);
    let info = ferry(&["info", &wrong_ca]);
    assert!(info.expect_failure().contains("TLS"), "{}", info.stderr);
    let tcp = server(&dst).tls_from(&certs).tcp().start();
    run("nbdinfo", &[&tls_uri(&tcp, &other)]).expect_failure();
    run("nbdinfo", &[&tls_uri(&tcp, &certs)]).expect_success();
    let info = ferry(&["info", &tls_uri(&tcp, &other)]);
    assert!(info.expect_failure().contains("TLS"), "{}", info.stderr);

    assert_contents(&dst, &layout.expected());
    // The server is still fine for a proper client.
    run("nbdinfo", &[&tls_uri(&peer, &certs)]).expect_success();
}
