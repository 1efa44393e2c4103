//! The connection flags every command that opens endpoints shares (NBD and HTTP), turned into
//! the library's [`endpoints::OpenOptions`], and the library's errors turned into exit codes.
//! What a word means and how it is opened is the `endpoints` crate's.

use std::path::PathBuf;
use std::time::Duration;

use disk::retry::RetryPolicy;
use endpoints::{HttpSettings, NbdOptions, Opened, Role, Spec};

use crate::{EXIT_FAILED, EXIT_USAGE, Failure};

/// Connection flags shared by every command that talks NBD.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NbdArgs {
    /// PEM file of CA certificates that sign the server's certificate (nbds:// URIs).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (needs --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Encrypt but do not verify the server's certificate.
    #[arg(long)]
    pub tls_no_verify: bool,
    /// Seconds to wait for a silent NBD or HTTP server before the request fails (and is
    /// retried, see --retries).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
    /// Seconds connecting and the handshake (TLS included) may take, at most --timeout.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub connect_timeout: u64,
}

impl NbdArgs {
    pub fn options(&self) -> NbdOptions {
        NbdOptions {
            tls_ca: self.tls_ca.clone(),
            tls_client: self.tls_cert.clone().zip(self.tls_key.clone()),
            tls_no_verify: self.tls_no_verify,
            timeout: Duration::from_secs(self.timeout),
            connect_timeout: Duration::from_secs(self.connect_timeout),
            ..NbdOptions::default()
        }
    }

    /// The same deadlines for HTTP servers.
    pub fn deadlines(&self) -> imageio::Deadlines {
        let io = Duration::from_secs(self.timeout.max(1));
        imageio::Deadlines {
            connect: Duration::from_secs(self.connect_timeout.max(1)).min(io),
            io,
        }
    }
}

/// Flags of HTTP endpoints (imageio URLs and plain https sources).
#[derive(clap::Args, Debug, Clone)]
pub struct HttpArgs {
    /// PEM file of CA certificates that sign an https server's certificate.
    #[arg(long, value_name = "FILE")]
    pub cafile: Option<PathBuf>,
    /// Do not verify an https server's certificate (the connection is still encrypted).
    #[arg(long)]
    pub insecure: bool,
    /// Always use TCP, even when an imageio server on this host offers its Unix socket.
    #[arg(long)]
    pub no_unix_socket: bool,
    /// Retries of a request that failed on the way (a broken connection, which is made again;
    /// a timeout; an HTTP 5xx; EIO from an NBD server); 0 turns retries off.
    #[arg(long, value_name = "N", default_value_t = RetryPolicy::default().attempts)]
    pub retries: u32,
    /// Seconds after a request first failed in which retries may start.
    #[arg(long, value_name = "SECONDS", default_value_t = RetryPolicy::default().timeout.as_secs())]
    pub retry_timeout: u64,
}

impl HttpArgs {
    /// HTTP settings, with the deadlines of the shared connection flags.
    pub fn settings(&self, nbd: &NbdArgs) -> HttpSettings {
        HttpSettings {
            deadlines: nbd.deadlines(),
            ca_file: self.cafile.clone(),
            insecure: self.insecure,
            unix_socket: !self.no_unix_socket,
            compression: imageio::WireCompression::Off,
        }
    }

    /// How requests of every endpoint are retried.
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            attempts: self.retries,
            timeout: Duration::from_secs(self.retry_timeout),
        }
    }
}

/// Options for a command that reads one endpoint with these flags and no others.
pub fn read_options(nbd: &NbdArgs, http: &HttpArgs, connections: usize) -> endpoints::OpenOptions {
    endpoints::OpenOptions {
        nbd: nbd.options(),
        http: http.settings(nbd),
        connections,
        retry: http.retry(),
        ..endpoints::OpenOptions::default()
    }
}

/// A library error with its exit code: the user's words are usage errors.
pub fn failure(e: endpoints::Error) -> Failure {
    Failure {
        code: if e.is_usage() {
            EXIT_USAGE
        } else {
            EXIT_FAILED
        },
        error: e.into(),
    }
}

/// What a command-line word names.
pub fn spec(word: &str) -> Result<Spec, Failure> {
    Spec::parse(word).map_err(failure)
}

/// Opens `spec` as `role`.
pub async fn open(
    spec: &Spec,
    role: Role,
    opts: &endpoints::OpenOptions,
) -> Result<Opened, Failure> {
    endpoints::open(spec, role, opts).await.map_err(failure)
}
