//! Throwaway X.509 credentials made with the `openssl` command: a CA, a server certificate for
//! `localhost` (and 127.0.0.1), and a client certificate, all in one directory laid out the way
//! qemu's `tls-creds-x509`, nbdkit's `--tls-certificates` and libnbd's `tls-certificates` read
//! it: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`.
//! Keys are ECDSA P-256 (instant to generate). The extensions satisfy both GnuTLS's checks
//! (qemu insists on keyEncipherment when key usage is critical) and webpki's (rustls).

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A certificate directory, removed on drop.
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    /// Generates a new CA with a server and a client certificate.
    pub fn generate() -> Certs {
        let dir = crate::temp_dir();
        make_certs(dir.path());
        Certs { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir().join("ca-cert.pem")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir().join("client-cert.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir().join("client-key.pem")
    }
}

const SERVER_EXT: &str = "\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

const CLIENT_EXT: &str = "\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Writes a CA, a server and a client certificate into `dir`.
pub fn make_certs(dir: &Path) {
    let openssl = crate::require_binary("openssl");
    let run = |args: &[&str]| {
        crate::tools::run(Command::new(&openssl).current_dir(dir).args(args));
    };
    for (name, text) in [("server.ext", SERVER_EXT), ("client.ext", CLIENT_EXT)] {
        std::fs::write(dir.join(name), text).expect("writing an openssl extension file");
    }
    for key in ["ca-key.pem", "server-key.pem", "client-key.pem"] {
        run(&[
            "genpkey",
            "-quiet",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            key,
        ]);
    }
    // A distinct CA name per directory, so two generated CAs never look alike.
    let tag = dir
        .file_name()
        .map_or("".into(), |n| n.to_string_lossy().into_owned());
    let ca_subject = format!("/CN=ferry test CA {tag}");
    run(&[
        "req",
        "-new",
        "-x509",
        "-key",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        &ca_subject,
        "-config",
        "/dev/null",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    for (who, cn) in [("server", "localhost"), ("client", "ferry test client")] {
        let csr = format!("{who}.csr");
        let key = format!("{who}-key.pem");
        let cert = format!("{who}-cert.pem");
        let ext = format!("{who}.ext");
        let subj = format!("/CN={cn}");
        run(&[
            "req",
            "-new",
            "-key",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
            "-config",
            "/dev/null",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
    for leftover in ["server.ext", "client.ext", "server.csr", "client.csr"] {
        let _ = std::fs::remove_file(dir.join(leftover));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_the_expected_files_and_a_valid_chain() {
        let certs = Certs::generate();
        for f in [
            "ca-cert.pem",
            "server-cert.pem",
            "server-key.pem",
            "client-cert.pem",
            "client-key.pem",
        ] {
            assert!(certs.dir().join(f).is_file(), "{f} missing");
        }
        let out = crate::tools::run(Command::new("openssl").current_dir(certs.dir()).args([
            "verify",
            "-CAfile",
            "ca-cert.pem",
            "server-cert.pem",
            "client-cert.pem",
        ]));
        assert!(out.contains("server-cert.pem: OK"), "{out}");
        assert!(out.contains("client-cert.pem: OK"), "{out}");
    }
}
