//! Running helper programs (qemu-img, qemu-io, nbdinfo, nbdcopy) with a timeout, and parsing the
//! extent maps they print as JSON, so tests can compare the client's view of an export with
//! independent implementations.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// How long a helper program may run before the test fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `cmd` to completion and returns its stdout. Panics with the command line and its stderr
/// if it fails or outlives [`TOOL_TIMEOUT`] (it is killed then).
pub fn run(cmd: &mut Command) -> String {
    let o = crate::outcome::run_outcome(cmd, TOOL_TIMEOUT);
    assert!(
        o.status.success(),
        "{} failed ({}):\nstderr: {}\nstdout: {}",
        o.line,
        o.status,
        o.stderr,
        o.stdout
    );
    o.stdout
}

/// Runs `qemu-img ARGS`.
pub fn qemu_img(args: &[&str]) -> String {
    run(Command::new(crate::require_binary("qemu-img")).args(args))
}

/// Runs `qemu-io -f FORMAT -c CMD... IMAGE` (e.g. `write -P 0xab 1M 64k`). qemu-io exits 0
/// even when a command fails, so its output is checked for error words.
pub fn qemu_io(image: &Path, format: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new(crate::require_binary("qemu-io"));
    cmd.args(["-f", format]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run(cmd.arg(image));
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {commands:?} on {}: {out}",
        image.display()
    );
    out
}

/// One extent of a meta context as nbdinfo reports it: `flags` is the context's status value
/// (nbdinfo's `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapExtent {
    pub offset: u64,
    pub length: u64,
    pub flags: u64,
}

/// `nbdinfo --map[=CONTEXT] --json URI`: the extents of `context` (`base:allocation` when None).
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<MapExtent> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_owned(),
    };
    let out =
        run(Command::new(crate::require_binary("nbdinfo")).args([map.as_str(), "--json", uri]));
    let json: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("nbdinfo printed invalid JSON ({e}): {out}"));
    json.as_array()
        .unwrap_or_else(|| panic!("nbdinfo --map did not print an array: {out}"))
        .iter()
        .map(|e| MapExtent {
            offset: field(e, "offset"),
            length: field(e, "length"),
            flags: field(e, "type"),
        })
        .collect()
}

/// One extent as `qemu-img map --output=json` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuMapExtent {
    pub start: u64,
    pub length: u64,
    pub data: bool,
    pub zero: bool,
}

/// `qemu-img map --output=json -f FORMAT TARGET`; `target` may be a file or an NBD URI.
pub fn qemu_img_map(target: &str, format: &str) -> Vec<QemuMapExtent> {
    let out = qemu_img(&["map", "--output=json", "-f", format, target]);
    let json: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("qemu-img map printed invalid JSON ({e}): {out}"));
    json.as_array()
        .unwrap_or_else(|| panic!("qemu-img map did not print an array: {out}"))
        .iter()
        .map(|e| QemuMapExtent {
            start: field(e, "start"),
            length: field(e, "length"),
            data: flag(e, "data"),
            zero: flag(e, "zero"),
        })
        .collect()
}

/// `nbdcopy URI FILE`: an independent copy of the export's contents, read back as bytes.
pub fn nbdcopy_read(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("nbdcopy.out");
    run(Command::new(crate::require_binary("nbdcopy"))
        .arg(uri)
        .arg(&out));
    let data = std::fs::read(&out).unwrap_or_else(|e| panic!("reading {}: {e}", out.display()));
    let _ = std::fs::remove_file(&out);
    data
}

fn field(v: &Value, name: &str) -> u64 {
    v.get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("map entry without numeric {name:?}: {v}"))
}

fn flag(v: &Value, name: &str) -> bool {
    v.get(name)
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("map entry without boolean {name:?}: {v}"))
}

/// Merges adjacent extents with equal flags (tools and servers may split runs differently).
pub fn merge(extents: &[MapExtent]) -> Vec<MapExtent> {
    let mut out: Vec<MapExtent> = Vec::new();
    for e in extents {
        match out.last_mut() {
            Some(last) if last.flags == e.flags && last.offset + last.length == e.offset => {
                last.length += e.length;
            }
            _ => out.push(*e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_stdout_and_fails_loudly() {
        assert_eq!(run(Command::new("echo").arg("hi")), "hi\n");
        let failed = std::panic::catch_unwind(|| run(&mut Command::new("false")));
        assert!(failed.is_err());
    }

    #[test]
    fn merge_joins_equal_neighbours_only() {
        let e = |offset, length, flags| MapExtent {
            offset,
            length,
            flags,
        };
        assert_eq!(
            merge(&[e(0, 10, 3), e(10, 5, 3), e(15, 5, 0), e(20, 1, 3)]),
            vec![e(0, 15, 3), e(15, 5, 0), e(20, 1, 3)]
        );
    }
}
