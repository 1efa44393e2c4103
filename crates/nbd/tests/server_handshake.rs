//! The server's handshake, in process with a raw client (exact option replies) and ferry's
//! own client: LIST, INFO, GO, EXPORT_NAME (with and without NO_ZEROES), ABORT, header
//! negotiation, meta contexts, STARTTLS, and a TLS-only server answering TLS_REQD.

mod server_common;

use nbd::proto::consts::*;
use nbd::proto::{
    BlockSize, HeaderMode, Info, InfoRequest, MetaContextRequest, OptionReply, OptionRequest,
};
use nbd::server::ServerConfig;
use nbd::tls::TlsOptions;
use nbd::{Client, Error};
use server_common::*;

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    OptionRequest::info(
        OPT_GO,
        &InfoRequest {
            name: name.into(),
            infos: infos.to_vec(),
        },
    )
    .data
}

fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    OptionRequest::meta_context(
        OPT_LIST_META_CONTEXT,
        &MetaContextRequest {
            export: export.into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        },
    )
    .data
}

fn error_code(replies: &[OptionReply]) -> u32 {
    match replies {
        [OptionReply::Error { code, .. }] => *code,
        other => panic!("expected one error reply, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_info_and_go() {
    guarded(async {
        let export = sample_export(full_caps(512));
        let server = TestServer::start(export.clone(), "disk", ServerConfig::default());
        let mut raw = server.raw().await;
        let flags = raw.greeting().await;
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)
            .await;
        assert_eq!(
            raw.option(OPT_LIST, &[]).await,
            vec![
                OptionReply::Server {
                    name: "disk".into(),
                    description: "in-memory test export".into()
                },
                OptionReply::Ack
            ]
        );
        // INFO answers and stays in the handshake.
        let infos = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
        let replies = raw.option(OPT_INFO, &go_data("disk", &infos)).await;
        assert!(replies.contains(&OptionReply::Info(Info::Name("disk".into()))));
        assert!(replies.contains(&OptionReply::Info(Info::Description(
            "in-memory test export".into()
        ))));
        assert!(
            replies.contains(&OptionReply::Info(Info::BlockSize(BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 2 * MIB as u32
            })))
        );
        let export_info = replies.iter().find_map(|r| match r {
            OptionReply::Info(Info::Export { size, flags }) => Some((*size, *flags)),
            _ => None,
        });
        let (size, tflags) = export_info.expect("INFO_EXPORT");
        assert_eq!(size, 4 * MIB);
        assert!(tflags & TFLAG_HAS_FLAGS != 0 && tflags & TFLAG_CAN_MULTI_CONN != 0);
        assert_eq!(replies.last(), Some(&OptionReply::Ack));
        // Unknown names are refused by INFO and GO, and the handshake goes on.
        let r = raw.option(OPT_INFO, &go_data("nope", &[])).await;
        assert_eq!(error_code(&r), REP_ERR_UNKNOWN);
        let r = raw.option(OPT_GO, &go_data("", &[])).await;
        assert_eq!(error_code(&r), REP_ERR_UNKNOWN);
        let r = raw.option(OPT_GO, &go_data("disk", &[])).await;
        assert_eq!(r.last(), Some(&OptionReply::Ack));
        raw.mode = HeaderMode::Simple;
        let got = raw.read(0, 4096, 0).await.expect("read after GO");
        assert!(got[..] == export.snapshot()[..4096]);
    })
    .await
}

/// The old EXPORT_NAME option: size, flags and 124 zero bytes unless NO_ZEROES; an unknown
/// name closes the connection (there is no error reply for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option() {
    guarded(async {
        let export = sample_export(full_caps(1));
        for no_zeroes in [false, true] {
            let (mut raw, _task) = raw_pair(export.clone(), ServerConfig::default());
            raw.greeting().await;
            let mut flags = CLIENT_FLAG_FIXED_NEWSTYLE;
            if no_zeroes {
                flags |= CLIENT_FLAG_NO_ZEROES;
            }
            raw.client_flags(flags).await;
            raw.send_option(OPT_EXPORT_NAME, b"").await;
            let reply = raw.read_n(10).await;
            assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 4 * MIB);
            let tflags = u16::from_be_bytes(reply[8..10].try_into().unwrap());
            assert!(tflags & TFLAG_SEND_WRITE_ZEROES != 0);
            if !no_zeroes {
                assert_eq!(raw.read_n(124).await, vec![0u8; 124]);
            }
            raw.mode = HeaderMode::Simple;
            let got = raw.read(0, 4096, 0).await.expect("read after EXPORT_NAME");
            assert!(got[..] == export.snapshot()[..4096]);
        }
        let (mut raw, task) = raw_pair(export, ServerConfig::default());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE).await;
        raw.send_option(OPT_EXPORT_NAME, b"nope").await;
        raw.expect_closed(STEP).await;
        server_result(task)
            .await
            .expect("a refusal is not an error");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_ends_the_handshake() {
    guarded(async {
        let (mut raw, task) = raw_pair(sample_export(full_caps(1)), ServerConfig::default());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE).await;
        assert_eq!(raw.option(OPT_ABORT, &[]).await, vec![OptionReply::Ack]);
        raw.expect_closed(STEP).await;
        server_result(task).await.expect("ABORT is a clean end");
    })
    .await
}

/// Header negotiation: STRUCTURED_REPLY after EXTENDED_HEADERS is refused with
/// EXT_HEADER_REQD and extended headers stay; STARTTLS on a server without TLS is refused by
/// policy and the handshake goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_negotiation_and_starttls_without_tls() {
    guarded(async {
        let (mut raw, _task) = raw_pair(sample_export(full_caps(1)), ServerConfig::default());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE).await;
        assert_eq!(
            error_code(&raw.option(OPT_STARTTLS, &[]).await),
            REP_ERR_POLICY
        );
        assert_eq!(
            raw.option(OPT_EXTENDED_HEADERS, &[]).await,
            vec![OptionReply::Ack]
        );
        assert_eq!(
            error_code(&raw.option(OPT_STRUCTURED_REPLY, &[]).await),
            REP_ERR_EXT_HEADER_REQD
        );
        let r = raw.option(OPT_GO, &go_data("", &[])).await;
        assert_eq!(r.last(), Some(&OptionReply::Ack));
        raw.mode = HeaderMode::Extended;
        let cookie = raw.request(CMD_FLUSH, 0, 0, 0, &[]).await;
        let reply = raw.reply().await;
        assert_eq!(reply.cookie(), cookie);
        assert_eq!(reply.chunk(), (REPLY_FLAG_DONE, CHUNK_NONE));
    })
    .await
}

/// LIST_META_CONTEXT offers base:allocation; SET selects it only when asked for by name, for
/// an existing export, after structured replies; BLOCK_STATUS needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_contexts() {
    guarded(async {
        let (mut raw, _task) = raw_pair(sample_export(full_caps(1)), ServerConfig::default());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE).await;
        // Before structured replies: invalid.
        let r = raw.option(OPT_LIST_META_CONTEXT, &meta_data("", &[])).await;
        assert_eq!(error_code(&r), REP_ERR_INVALID);
        assert_eq!(
            raw.option(OPT_STRUCTURED_REPLY, &[]).await,
            vec![OptionReply::Ack]
        );
        let base = OptionReply::MetaContext {
            id: 0,
            name: CONTEXT_BASE_ALLOCATION.into(),
        };
        for queries in [&[][..], &["base:"][..], &[CONTEXT_BASE_ALLOCATION][..]] {
            let r = raw
                .option(OPT_LIST_META_CONTEXT, &meta_data("", queries))
                .await;
            assert_eq!(r, vec![base.clone(), OptionReply::Ack], "{queries:?}");
        }
        let r = raw
            .option(
                OPT_LIST_META_CONTEXT,
                &meta_data("", &["qemu:dirty-bitmap:x"]),
            )
            .await;
        assert_eq!(r, vec![OptionReply::Ack]);
        let r = raw
            .option(
                OPT_SET_META_CONTEXT,
                &meta_data("nope", &[CONTEXT_BASE_ALLOCATION]),
            )
            .await;
        assert_eq!(error_code(&r), REP_ERR_UNKNOWN);
        // Selecting only an unknown context selects nothing: BLOCK_STATUS is refused.
        let r = raw
            .option(
                OPT_SET_META_CONTEXT,
                &meta_data("", &["qemu:allocation-depth"]),
            )
            .await;
        assert_eq!(r, vec![OptionReply::Ack]);
        let r = raw.option(OPT_GO, &go_data("", &[])).await;
        assert_eq!(r.last(), Some(&OptionReply::Ack));
        raw.mode = HeaderMode::Structured;
        assert_eq!(raw.command(CMD_BLOCK_STATUS, 0, 0, 4096).await, EINVAL);
    })
    .await
}

/// A TLS-only server: every option but STARTTLS and ABORT gets TLS_REQD, EXPORT_NAME closes
/// the connection, and ferry's client gets in over TLS with every header mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_when_configured() {
    let certs = tokio::task::spawn_blocking(testutil::Certs::generate)
        .await
        .unwrap();
    guarded(async {
        let tls = nbd::server::tls_server_config(
            &certs.dir().join("server-cert.pem"),
            &certs.dir().join("server-key.pem"),
        )
        .expect("server TLS configuration");
        let config = ServerConfig {
            tls: Some(tls),
            ..ServerConfig::default()
        };
        let export = sample_export(full_caps(1));
        let (mut raw, _task) = raw_pair(export.clone(), config.clone());
        raw.greeting().await;
        raw.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE).await;
        for (option, data) in [
            (OPT_LIST, vec![]),
            (OPT_STRUCTURED_REPLY, vec![]),
            (OPT_EXTENDED_HEADERS, vec![]),
            (OPT_INFO, go_data("", &[])),
            (OPT_GO, go_data("", &[])),
            (OPT_LIST_META_CONTEXT, meta_data("", &[])),
        ] {
            let r = raw.option(option, &data).await;
            assert_eq!(error_code(&r), REP_ERR_TLS_REQD, "option {option}");
        }
        raw.send_option(OPT_EXPORT_NAME, b"").await;
        raw.expect_closed(STEP).await;

        let server = TestServer::start(export.clone(), "", config);
        for mode in ALL_MODES {
            let mut o = server.opts(mode);
            o.tls = Some(TlsOptions::from_certificates_dir(
                certs.dir(),
                "localhost".into(),
                true,
            ));
            let client = Client::connect(&o, 1).await.expect("TLS connect");
            assert!(client.info().tls);
            assert_eq!(client.info().mode, mode);
            let got = client.read(0, 4 * MIB).await.unwrap();
            assert!(got[..] == export.snapshot()[..]);
            client.disconnect().await;
        }
        // Without TLS, ferry's client is told TLS is required.
        let err = Client::connect(&server.opts(HeaderMode::Extended), 1)
            .await
            .err()
            .expect("plain connection must fail");
        assert!(err.to_string().contains("TLS_REQD"), "{err}");
        assert!(
            matches!(err, Error::Tls(_) | Error::OptionRefused { .. }),
            "{err:?}"
        );
    })
    .await
}
