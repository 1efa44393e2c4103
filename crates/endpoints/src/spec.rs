//! What a command-line word names. Words are told apart by their form alone; nothing is
//! opened or looked up here (a path is only found to be a pipe when it is opened).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

use nbd::uri::{NbdUri, is_nbd_uri};

use crate::Error;

/// How a word names an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// `[ CMD ARGS … ]`: an NBD server started for this use with socket activation.
    Command(Vec<String>),
    /// `-`: standard input as a source, standard output as a destination.
    Stdio,
    /// `null:`: a destination that discards everything.
    Null,
    /// An imageio transfer URL or a plain http(s) image (validated).
    Http(String),
    Nbd(NbdUri),
    /// A file or block device; a FIFO, socket or character device opens as a pipe.
    Path(PathBuf),
}

impl Spec {
    /// The spec a word names. A bracketed command stands in the word as the placeholder
    /// [`extract_commands`] put there.
    pub fn parse(word: &str) -> Result<Spec, Error> {
        if let Some(argv) = command(word) {
            return Ok(Spec::Command(argv));
        }
        if word == "-" {
            return Ok(Spec::Stdio);
        }
        if word == "null:" {
            return Ok(Spec::Null);
        }
        if imageio::is_http_url(word) {
            imageio::HttpUrl::parse(word)?;
            return Ok(Spec::Http(word.to_string()));
        }
        if is_nbd_uri(word) {
            return Ok(Spec::Nbd(word.parse()?));
        }
        Ok(Spec::Path(PathBuf::from(word)))
    }
}

/// Commands written as `[ CMD ARGS … ]` on the command line, in order.
static COMMANDS: OnceLock<Vec<Vec<String>>> = OnceLock::new();
/// Placeholder that stands for a bracketed command in the arguments an argument parser sees.
/// A NUL byte can never occur in a real argument, so it cannot collide with a path.
const PLACEHOLDER: &str = "\0ferry-command:";

/// Replaces each `[ CMD ARGS … ]` group of a command line with one placeholder word (so an
/// argument parser sees one positional argument) and remembers the commands for
/// [`Spec::parse`]. An unterminated group is left alone for the parser to reject. Call once,
/// before parsing.
pub fn extract_commands(args: Vec<OsString>) -> Vec<OsString> {
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
    let _ = COMMANDS.set(commands);
    out
}

/// The command a placeholder word stands for.
fn command(word: &str) -> Option<Vec<String>> {
    let n: usize = word.strip_prefix(PLACEHOLDER)?.parse().ok()?;
    COMMANDS.get()?.get(n).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_name_specs_by_their_form() {
        let words: Vec<OsString> = [
            "ferry", "copy", "[", "qemu-nbd", "-f", "qcow2", "x", "]", "-",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let args = extract_commands(words);
        assert_eq!(args.len(), 4);
        let placeholder = args[2].to_str().unwrap();
        assert_eq!(
            Spec::parse(placeholder).unwrap(),
            Spec::Command(vec![
                "qemu-nbd".into(),
                "-f".into(),
                "qcow2".into(),
                "x".into()
            ])
        );
        assert_eq!(Spec::parse("-").unwrap(), Spec::Stdio);
        assert_eq!(Spec::parse("null:").unwrap(), Spec::Null);
        assert_eq!(
            Spec::parse("https://h:54322/images/t").unwrap(),
            Spec::Http("https://h:54322/images/t".into())
        );
        assert!(matches!(
            Spec::parse("nbd+unix:///?socket=/s").unwrap(),
            Spec::Nbd(_)
        ));
        assert_eq!(
            Spec::parse("disk.raw").unwrap(),
            Spec::Path("disk.raw".into())
        );
        for bad in ["nbd://[::1/", "https://user@h/x"] {
            let e = Spec::parse(bad).unwrap_err();
            assert!(e.is_usage(), "{bad}: {e}");
        }
    }
}
