//! Where ferry's log lines go and how they look: `--log-format text` (human lines, coloured
//! only on a terminal and never with `NO_COLOR` set) or `--log-format json` (one JSON object a
//! line, for journald and log shippers). `RUST_LOG` picks the levels (default `warn`).
//!
//! A transfer's lines carry its context from the span they are logged in: `ticket` (and `conn`,
//! `peer`) for `ferry serve`, `src` and `dst` for `ferry copy`. In JSON they sit in the line's
//! `span` object; in text they prefix the message.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Whether text lines may carry colour: only on a terminal, and never with `NO_COLOR` set to
/// anything but the empty string (<https://no-color.org>).
fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber writing to stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }
}
