//! The `ferry serve --config FILE.toml` file: the same settings as the command-line flags
//! (underscores for dashes), plus the timeouts and I/O sizes that have no flag. Flags given on
//! the command line win over the file. Unknown keys are errors, so typos do not go unnoticed.
//!
//! ```toml
//! listen = "0.0.0.0:54322"
//! tls_cert = "/etc/pki/ferry/cert.pem"
//! tls_key = "/etc/pki/ferry/key.pem"
//! local_socket = "/run/ferry/local.sock"
//! control_socket = "/run/ferry/control.sock"
//! tickets = ["/etc/ferry/ticket.json"]
//! ticket_store = "/var/lib/ferry/tickets"  # keep tickets across restarts
//! auth_timeout = 60       # seconds an unauthorized connection may stay idle
//! remove_timeout = 60     # seconds DELETE waits for running operations
//! reap_grace = 600        # seconds after expiry before a ticket is removed
//! buffer_size = 4194304   # bytes per backend request
//! queue_depth = 4         # backend requests in flight per HTTP request
//! nbd_write_size = 262144 # bytes per upload write to an NBD backend (at most buffer_size)
//! buffer_memory = "512M"  # image data all transfers together may hold in buffers
//! bwlimit = "1G"          # bytes per second for all transfers together, in equal shares
//! ticket_bwlimit = "100M" # bytes per second for each ticket without its own "bwlimit"
//! drain_timeout = 30      # seconds requests in progress get to finish on SIGTERM
//! ```

use std::path::{Path, PathBuf};

#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub no_tls: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub local_socket: Option<String>,
    pub nbd_socket: Option<PathBuf>,
    pub nbd_listen: Option<String>,
    pub control_socket: Option<String>,
    pub control_listen: Option<String>,
    #[serde(default)]
    pub tickets: Vec<PathBuf>,
    pub ticket_store: Option<PathBuf>,
    pub ready_file: Option<PathBuf>,
    pub auth_timeout: Option<f64>,
    pub remove_timeout: Option<f64>,
    pub reap_grace: Option<f64>,
    pub reap_interval: Option<f64>,
    pub buffer_size: Option<u64>,
    pub queue_depth: Option<usize>,
    pub nbd_write_size: Option<u64>,
    pub buffer_memory: Option<Rate>,
    pub bwlimit: Option<Rate>,
    pub ticket_bwlimit: Option<Rate>,
    pub drain_timeout: Option<f64>,
}

/// A rate in the file: bytes per second as an integer, or text like `"100M"`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum Rate {
    Bytes(u64),
    Text(String),
}

impl Rate {
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Rate::Bytes(n) => Ok(*n),
            Rate::Text(t) => bwlimit::parse_rate(t),
        }
    }
}

/// A configuration file that cannot be used: what is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl From<String> for ConfigError {
    fn from(message: String) -> Self {
        ConfigError(message)
    }
}

impl From<&str> for ConfigError {
    fn from(message: &str) -> Self {
        ConfigError(message.to_string())
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        let cfg: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, v) in [
            ("auth_timeout", cfg.auth_timeout),
            ("remove_timeout", cfg.remove_timeout),
            ("reap_grace", cfg.reap_grace),
            ("reap_interval", cfg.reap_interval),
            ("drain_timeout", cfg.drain_timeout),
        ] {
            if v.is_some_and(|s| !(s.is_finite() && s >= 0.0)) {
                return Err(format!("{name}: expecting a number of seconds >= 0").into());
            }
        }
        if cfg
            .buffer_size
            .is_some_and(|b| !(4096..=(64 << 20)).contains(&b))
        {
            return Err("buffer_size: expecting 4096 to 67108864 bytes".into());
        }
        if cfg
            .nbd_write_size
            .is_some_and(|b| !(4096..=(64 << 20)).contains(&b))
        {
            return Err("nbd_write_size: expecting 4096 to 67108864 bytes".into());
        }
        for (name, rate) in [
            ("bwlimit", &cfg.bwlimit),
            ("ticket_bwlimit", &cfg.ticket_bwlimit),
        ] {
            if let Some(Err(e)) = rate.as_ref().map(Rate::bytes) {
                return Err(format!("{name}: {e}").into());
            }
        }
        match cfg.buffer_memory.as_ref().map(Rate::bytes) {
            Some(Err(e)) => return Err(format!("buffer_memory: {e}").into()),
            Some(Ok(n)) if n < (4 << 20) => {
                return Err("buffer_memory: expecting at least 4M".into());
            }
            _ => {}
        }
        if cfg.queue_depth.is_some_and(|d| !(1..=64).contains(&d)) {
            return Err("queue_depth: expecting 1 to 64".into());
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_typos() {
        let c = FileConfig::parse(
            "listen = \"127.0.0.1:0\"\nno_tls = true\nauth_timeout = 0.5\ntickets = [\"a.json\"]\n",
        )
        .unwrap();
        assert_eq!(c.listen.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(c.auth_timeout, Some(0.5));
        assert_eq!(c.tickets, vec![PathBuf::from("a.json")]);
        assert!(FileConfig::parse("lisen = 1").is_err());
        assert!(FileConfig::parse("auth_timeout = -1").is_err());
        assert!(FileConfig::parse("queue_depth = 0").is_err());
        assert!(FileConfig::parse("nbd_write_size = 1024").is_err());
        assert_eq!(
            FileConfig::parse("nbd_write_size = 65536")
                .unwrap()
                .nbd_write_size,
            Some(65536)
        );
        let c = FileConfig::parse("bwlimit = \"1G\"\nticket_bwlimit = 1048576\n").unwrap();
        assert_eq!(c.bwlimit.unwrap().bytes(), Ok(1 << 30));
        assert_eq!(c.ticket_bwlimit.unwrap().bytes(), Ok(1 << 20));
        assert!(FileConfig::parse("bwlimit = \"fast\"").is_err());
    }
}
