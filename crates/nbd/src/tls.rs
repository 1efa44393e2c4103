//! TLS for NBD's STARTTLS: building a rustls client configuration from a CA file, an optional
//! client certificate, and the verify-peer switch. The handshake itself happens in the client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};

/// Where a client's TLS material comes from, and how strict it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of CA certificates to trust; without it the system bundle is used.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for servers that verify clients.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Verify the server's certificate and name. Off means encryption without authentication.
    pub verify_peer: bool,
    /// Name the server's certificate must carry.
    pub server_name: String,
}

/// Common locations of the system CA bundle, tried in order when no CA file is given.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
];

impl TlsOptions {
    /// Options from a libnbd-style certificates directory (`ca-cert.pem`, and `client-cert.pem`
    /// with `client-key.pem` when both exist).
    pub fn from_certificates_dir(dir: &Path, server_name: String, verify_peer: bool) -> Self {
        let client_cert = dir.join("client-cert.pem");
        let client_key = dir.join("client-key.pem");
        let has_client = client_cert.exists() && client_key.exists();
        TlsOptions {
            ca_file: Some(dir.join("ca-cert.pem")),
            client_cert: has_client.then_some(client_cert),
            client_key: has_client.then_some(client_key),
            verify_peer,
            server_name,
        }
    }

    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        // aws-lc-rs: its AES-GCM runs at about twice ring's speed on AVX-512 (bench/aead).
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?;
        let builder = if self.verify_peer {
            builder.with_root_certificates(self.root_store()?)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        };
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = load_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| Error::Tls(format!("reading key {}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| Error::Tls(format!("client certificate: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(Error::Tls(
                    "a client certificate needs both a certificate and a key file".into(),
                ));
            }
        };
        Ok(Arc::new(config))
    }

    pub fn server_name(&self) -> Result<ServerName<'static>> {
        ServerName::try_from(self.server_name.clone())
            .map_err(|e| Error::Tls(format!("invalid server name {:?}: {e}", self.server_name)))
    }

    fn root_store(&self) -> Result<RootCertStore> {
        let path = match &self.ca_file {
            Some(path) => path.clone(),
            None => SYSTEM_CA_BUNDLES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .ok_or_else(|| {
                    Error::Tls("no CA file given and no system CA bundle found".into())
                })?,
        };
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(load_certs(&path)?);
        if added == 0 {
            return Err(Error::Tls(format!(
                "no usable CA certificate in {}",
                path.display()
            )));
        }
        Ok(roots)
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Tls(format!("reading certificates {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("no certificate in {}", path.display())));
    }
    Ok(certs)
}

/// Accepts any server certificate (verify-peer off) but still checks handshake signatures,
/// so the session is encrypted to whoever holds the presented key.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
