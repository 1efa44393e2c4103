//! STARTTLS against real servers with throwaway X.509 credentials: qemu-nbd (mandatory TLS via
//! `--tls-creds`, with and without client-certificate checks), nbdkit (`--tls=require`) and
//! nbd-server (`force_tls`). Failures must be TLS errors that arrive quickly, never hangs.

mod interop;

use std::time::{Duration, Instant};

use interop::*;
use nbd::proto::HeaderMode;
use nbd::tls::TlsOptions;
use nbd::uri::NbdUri;
use nbd::{Client, ConnectOptions, Error};
use testutil::{Certs, NbdServer, Nbdkit, Peer, QemuNbd};

/// A read-only qemu-nbd TLS export of the mixed layout; `verify_clients` makes it demand a
/// client certificate.
fn qemu_tls(
    dir: &std::path::Path,
    certs: &Certs,
    verify_clients: bool,
    tcp: bool,
) -> (Peer, Vec<u8>) {
    let layout = mixed_layout();
    let img = image(dir, &layout, "raw");
    let mut builder = QemuNbd::new(&img)
        .read_only()
        .shared(0)
        .tls(certs.dir(), verify_clients);
    if tcp {
        builder = builder.tcp();
    }
    (builder.start(), layout.expected())
}

/// Options for the peer's export with explicit TLS settings.
fn tls_opts(peer: &Peer, tls: TlsOptions) -> ConnectOptions {
    let mut o = opts(&peer.nbd_uri());
    o.tls = Some(tls);
    o
}

fn client_tls(certs: &Certs, ca: &Certs, verify: bool, server_name: &str) -> TlsOptions {
    TlsOptions {
        ca_file: Some(ca.ca_cert()),
        client_cert: Some(certs.client_cert()),
        client_key: Some(certs.client_key()),
        verify_peer: verify,
        server_name: server_name.to_owned(),
    }
}

/// Connects and expects a TLS error within a few seconds.
async fn expect_tls_error(o: &ConnectOptions) -> Error {
    let start = Instant::now();
    let err = Client::connect(o, 1)
        .await
        .err()
        .expect("the connection must fail");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "failing took {:?}",
        start.elapsed()
    );
    assert!(
        matches!(err, Error::Tls(_)),
        "expected a TLS error, got {err:?}"
    );
    err
}

async fn check_data(client: &Client, expected: &[u8]) {
    assert!(client.info().tls, "the connection must be encrypted");
    assert_same(
        &client.read(0, expected.len() as u64).await.unwrap(),
        expected,
        "over TLS",
    );
}

/// CA verification on, client certificate presented: works, and every header mode is still
/// negotiated after STARTTLS.
#[tokio::test]
async fn qemu_tls_verified() {
    guarded(async {
        let dir = testutil::temp_dir();
        let certs = Certs::generate();
        let (peer, expected) = qemu_tls(dir.path(), &certs, true, false);
        for headers in ALL_HEADERS {
            let mut o = tls_opts(&peer, client_tls(&certs, &certs, true, "localhost"));
            headers.apply(&mut o);
            let client = Client::connect(&o, 1).await.expect("TLS connect");
            assert_eq!(client.info().mode, headers.full_mode());
            check_data(&client, &expected).await;
            client.disconnect().await;
        }
        let listed = tls_opts(&peer, client_tls(&certs, &certs, true, "localhost"))
            .list_exports()
            .await
            .expect("list over TLS");
        assert_eq!(listed.len(), 1);
    })
    .await
}

/// An `nbds+unix` URI with `tls-certificates` and `tls-hostname`, through `NbdUri` and
/// `ConnectOptions::from_uri`.
#[tokio::test]
async fn qemu_tls_from_uri() {
    guarded(async {
        let dir = testutil::temp_dir();
        let certs = Certs::generate();
        let (peer, expected) = qemu_tls(dir.path(), &certs, true, false);
        let certs_dir = certs.dir().to_str().unwrap();
        let query = [
            ("tls-certificates", certs_dir),
            ("tls-hostname", "localhost"),
        ];
        let text = peer.uri_with("nbds", "", &query);
        assert!(text.starts_with("nbds+unix:///?socket="), "{text}");
        let uri: NbdUri = text.parse().expect("parse");
        assert!(uri.tls);
        assert_eq!(uri.tls_hostname.as_deref(), Some("localhost"));
        assert_eq!(uri.tls_certificates.as_deref(), Some(certs.dir()));
        let o = ConnectOptions::from_uri(&uri);
        let tls = o.tls.as_ref().expect("nbds makes TLS mandatory");
        assert_eq!(tls.ca_file.as_deref(), Some(certs.ca_cert().as_path()));
        assert_eq!(
            tls.client_cert.as_deref(),
            Some(certs.client_cert().as_path())
        );
        assert!(tls.verify_peer);
        let client = Client::connect(&o, 1).await.expect("connect from URI");
        check_data(&client, &expected).await;
        client.disconnect().await;

        // The same URI with a name the certificate does not carry fails, unless verification
        // is off.
        let bad = [
            ("tls-certificates", certs_dir),
            ("tls-hostname", "wrong.example"),
        ];
        let uri: NbdUri = peer.uri_with("nbds", "", &bad).parse().unwrap();
        expect_tls_error(&ConnectOptions::from_uri(&uri)).await;
        let lax = [bad[0], bad[1], ("tls-verify-peer", "false")];
        let uri: NbdUri = peer.uri_with("nbds", "", &lax).parse().unwrap();
        let client = Client::connect(&ConnectOptions::from_uri(&uri), 1)
            .await
            .expect("no verify");
        check_data(&client, &expected).await;
        client.disconnect().await;
    })
    .await
}

/// A CA that did not sign the server's certificate: a TLS error, quickly.
#[tokio::test]
async fn qemu_tls_wrong_ca() {
    guarded(async {
        let dir = testutil::temp_dir();
        let certs = Certs::generate();
        let stranger = Certs::generate();
        let (peer, _) = qemu_tls(dir.path(), &certs, true, false);
        let err = expect_tls_error(&tls_opts(
            &peer,
            client_tls(&certs, &stranger, true, "localhost"),
        ))
        .await;
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "{err}"
        );
    })
    .await
}

/// Verification off: any server certificate is accepted (the client still authenticates
/// itself where the server wants it).
#[tokio::test]
async fn qemu_tls_verify_peer_off() {
    guarded(async {
        let dir = testutil::temp_dir();
        let certs = Certs::generate();
        let stranger = Certs::generate();
        let (peer, expected) = qemu_tls(dir.path(), &certs, true, false);
        let client = Client::connect(
            &tls_opts(&peer, client_tls(&certs, &stranger, false, "localhost")),
            1,
        )
        .await
        .expect("verify-peer off");
        check_data(&client, &expected).await;
        client.disconnect().await;

        // A server that checks no client certificates, and a client with no material at all.
        let dir2 = testutil::temp_dir();
        let (open_peer, expected) = qemu_tls(dir2.path(), &certs, false, false);
        let bare = TlsOptions {
            verify_peer: false,
            server_name: "localhost".to_owned(),
            ..TlsOptions::default()
        };
        let client = Client::connect(&tls_opts(&open_peer, bare), 1)
            .await
            .expect("bare TLS");
        check_data(&client, &expected).await;
        client.disconnect().await;
    })
    .await
}

/// A server that demands a client certificate rejects a client without one, without a hang.
#[tokio::test]
async fn qemu_tls_missing_client_certificate() {
    guarded(async {
        let dir = testutil::temp_dir();
        let certs = Certs::generate();
        let (peer, _) = qemu_tls(dir.path(), &certs, true, false);
        let tls = TlsOptions {
            client_cert: None,
            client_key: None,
            ..client_tls(&certs, &certs, true, "localhost")
        };
        let start = Instant::now();
        let err = Client::connect(&tls_opts(&peer, tls), 1)
            .await
            .err()
            .expect("must fail");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
        assert!(err.is_fatal(), "{err:?}");
    })
    .await
}

/// No TLS against a TLS-only server: an error that says to use nbds://.
#[tokio::test]
async fn qemu_plain_client_is_told_to_use_tls() {
    guarded(async {
        let dir = testutil::temp_dir();
        let certs = Certs::generate();
        let (peer, _) = qemu_tls(dir.path(), &certs, true, false);
        for headers in ALL_HEADERS {
            let o = peer_opts(&peer, headers, &[]);
            assert!(o.tls.is_none());
            let err = expect_tls_error(&o).await;
            assert!(err.to_string().contains("nbds://"), "{headers:?}: {err}");
        }
        let err = opts(&peer.nbd_uri()).list_exports().await.unwrap_err();
        assert!(err.to_string().contains("nbds://"), "{err}");
    })
    .await
}

/// TLS over TCP to 127.0.0.1: the server name defaults to the URI host, which the
/// certificate carries as an IP address.
#[tokio::test]
async fn qemu_tls_over_tcp() {
    guarded(async {
        let dir = testutil::temp_dir();
        let certs = Certs::generate();
        let (peer, expected) = qemu_tls(dir.path(), &certs, true, true);
        let certs_dir = certs.dir().to_str().unwrap();
        let uri: NbdUri = peer
            .uri_with("nbds", "", &[("tls-certificates", certs_dir)])
            .parse()
            .unwrap();
        assert_eq!(uri.tls_server_name(), "127.0.0.1");
        let o = ConnectOptions::from_uri(&uri);
        let client = Client::connect(&o, 2).await.expect("TLS over TCP");
        assert_eq!(
            client.connections().len(),
            2,
            "--shared 0 allows multi-conn"
        );
        check_data(&client, &expected).await;
        client.disconnect().await;
    })
    .await
}

/// nbdkit with `--tls=require`.
#[tokio::test]
async fn nbdkit_tls() {
    guarded(async {
        let certs = Certs::generate();
        let peer = Nbdkit::new("pattern")
            .arg("size=1M")
            .tls(certs.dir(), false)
            .start();
        let mut expected = Vec::new();
        for word in (0..MIB).step_by(8) {
            expected.extend_from_slice(&word.to_be_bytes());
        }
        let client = Client::connect(
            &tls_opts(&peer, client_tls(&certs, &certs, true, "localhost")),
            1,
        )
        .await
        .expect("nbdkit TLS");
        assert_eq!(client.info().mode, HeaderMode::Structured);
        check_data(&client, &expected).await;
        client.disconnect().await;
        let err = expect_tls_error(&opts(&peer.nbd_uri())).await;
        assert!(err.to_string().contains("nbds://"), "{err}");
        let stranger = Certs::generate();
        expect_tls_error(&tls_opts(
            &peer,
            client_tls(&certs, &stranger, true, "localhost"),
        ))
        .await;
    })
    .await
}

/// nbd-server with `force_tls`.
#[tokio::test]
async fn nbd_server_tls() {
    guarded(async {
        let dir = testutil::temp_dir();
        let certs = Certs::generate();
        let layout = mixed_layout();
        let img = image(dir.path(), &layout, "raw");
        let peer = NbdServer::new(&img).read_only().tls(certs.dir()).start();
        let client = Client::connect(
            &tls_opts(&peer, client_tls(&certs, &certs, true, "localhost")),
            1,
        )
        .await
        .expect("nbd-server TLS");
        assert_eq!(client.info().mode, HeaderMode::Simple);
        check_data(&client, &layout.expected()).await;
        client.disconnect().await;
        let err = expect_tls_error(&opts(&peer.nbd_uri())).await;
        assert!(err.to_string().contains("nbds://"), "{err}");
    })
    .await
}
