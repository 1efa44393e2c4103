//! Turning command-line words into endpoints: an NBD URI (with the TLS and timeout flags that
//! refine it) or a local path.

use std::path::PathBuf;
use std::time::Duration;

use nbd::ConnectOptions;
use nbd::tls::TlsOptions;
use nbd::uri::{NbdUri, is_nbd_uri};

use crate::{Failure, usage};

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
    /// Seconds to wait for a silent server before failing.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
}

/// Where a command reads from.
#[derive(Debug, Clone)]
pub enum Target {
    Nbd(NbdUri),
    /// An imageio transfer URL or a plain http(s) image.
    Http(String),
    File(PathBuf),
}

impl Target {
    pub fn parse(word: &str) -> Result<Target, Failure> {
        if imageio::is_http_url(word) {
            imageio::HttpUrl::parse(word).map_err(|e| usage(e.to_string()))?;
            Ok(Target::Http(word.to_string()))
        } else if is_nbd_uri(word) {
            word.parse().map(Target::Nbd).map_err(usage)
        } else {
            Ok(Target::File(PathBuf::from(word)))
        }
    }
}

impl NbdArgs {
    /// Connection options for `uri`, with these flags applied. TLS flags need an nbds URI.
    pub fn connect_options(&self, uri: &NbdUri) -> Result<ConnectOptions, Failure> {
        let mut opts = ConnectOptions::from_uri(uri);
        opts.timeout = Duration::from_secs(self.timeout.max(1));
        let tls_flags = self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_no_verify;
        match &mut opts.tls {
            Some(tls) => self.apply_tls(tls),
            None if tls_flags => {
                return Err(usage(format!(
                    "TLS options need an nbds:// or nbds+unix:// URI, not {uri}"
                )));
            }
            None => {}
        }
        Ok(opts)
    }

    fn apply_tls(&self, tls: &mut TlsOptions) {
        if let Some(ca) = &self.tls_ca {
            tls.ca_file = Some(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls.client_cert = Some(cert.clone());
            tls.client_key = Some(key.clone());
        }
        if self.tls_no_verify {
            tls.verify_peer = false;
        }
    }
}

/// Commands written as `[ CMD ARGS … ]` on the command line, in order.
static SUBPROCESSES: std::sync::OnceLock<Vec<Vec<String>>> = std::sync::OnceLock::new();
/// Placeholder that stands for a bracketed command in the arguments clap sees. A NUL byte can
/// never occur in a real argument, so it cannot collide with a path.
const PLACEHOLDER: &str = "\0ferry-command:";

/// Replaces each `[ CMD ARGS … ]` group with a placeholder word and remembers the commands.
/// An unterminated group is left alone for clap to reject.
pub fn extract_subprocesses(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut commands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "["
            && let Some(len) = args[i + 1..].iter().position(|a| a == "]")
        {
            let argv: Vec<String> = args[i + 1..i + 1 + len]
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            out.push(format!("{PLACEHOLDER}{}", commands.len()).into());
            commands.push(argv);
            i += len + 2;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    let _ = SUBPROCESSES.set(commands);
    out
}

/// The command a placeholder word stands for.
pub fn subprocess_argv(word: &str) -> Option<Vec<String>> {
    let n: usize = word.strip_prefix(PLACEHOLDER)?.parse().ok()?;
    SUBPROCESSES.get()?.get(n).cloned()
}
