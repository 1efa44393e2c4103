//! Log output as operators see it: `--log-format json` lines that parse one by one and name the
//! transfer's ticket (serve) or endpoints (copy), text logs in a file without escape codes, and
//! colour on a terminal only while `NO_COLOR` is unset (run under `script`, which gives the
//! command a pseudo-terminal).

use std::path::Path;
use std::process::Command;

use testutil::FerryServe;

const MIB: usize = 1 << 20;
const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// A `ferry serve` on loopback with a read-write ticket `id` on a 1 MiB file.
fn serve_with_ticket(dir: &Path, id: &str, format: &str) -> FerryServe {
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; MIB]).unwrap();
    let ticket = dir.join("ticket.json");
    std::fs::write(
        &ticket,
        serde_json::json!({"uuid": id, "size": MIB, "ops": ["read", "write"], "timeout": 300,
            "url": format!("file://{}", disk.display())})
        .to_string(),
    )
    .unwrap();
    FerryServe::start(
        Path::new(FERRY),
        dir,
        &[
            "--log-format",
            format,
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--ticket",
            &ticket.display().to_string(),
        ],
    )
}

/// Uploads then downloads 1 MiB through ticket `id`, checking what comes back.
fn upload_and_download(dir: &Path, srv: &FerryServe, id: &str) {
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let src = dir.join("upload.raw");
    std::fs::write(&src, &data).unwrap();
    let url = format!("http://127.0.0.1:{}/images/{id}", srv.port());
    let put = Command::new("curl")
        .args(["-sSf", "--max-time", "20", "-T"])
        .arg(&src)
        .arg(&url)
        .output()
        .unwrap();
    assert!(put.status.success(), "{put:?}");
    let get = Command::new("curl")
        .args(["-sSf", "--max-time", "20", &url])
        .output()
        .unwrap();
    assert!(get.status.success(), "{get:?}");
    assert!(get.stdout == data, "download differs from the upload");
}

#[test]
fn json_lines_parse_and_carry_the_ticket() {
    let dir = testutil::temp_dir();
    let mut srv = serve_with_ticket(dir.path(), "log-ticket", "json");
    upload_and_download(dir.path(), &srv, "log-ticket");
    assert!(srv.stop().success());
    let log = srv.log();
    let mut lines = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}\n{log}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        lines.push(v);
    }
    let find = |message: &str| {
        lines
            .iter()
            .find(|v| v["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in\n{log}"))
    };
    for message in ["upload done", "download done"] {
        let v = find(message);
        assert_eq!(v["span"]["ticket"], "log-ticket", "{v}");
        assert_eq!(v["length"], MIB as u64, "{v}");
    }
    // The connection's last line, logged outside any request, names its ticket too.
    let closed: Vec<_> = lines
        .iter()
        .filter(|v| v["message"] == "connection closed")
        .collect();
    assert!(!closed.is_empty(), "{log}");
    for v in closed {
        assert_eq!(v["ticket"], "log-ticket", "{v}");
    }
}

#[test]
fn text_log_in_a_file_has_no_escape_codes() {
    let dir = testutil::temp_dir();
    let mut srv = serve_with_ticket(dir.path(), "text-ticket", "text");
    upload_and_download(dir.path(), &srv, "text-ticket");
    assert!(srv.stop().success());
    let log = srv.log();
    assert!(
        log.contains("transfer{ticket=text-ticket") && log.contains("upload done"),
        "{log}"
    );
    assert!(
        !log.contains('\x1b'),
        "escape codes in a log file:\n{log:?}"
    );
}

#[test]
fn copy_json_lines_name_the_endpoints() {
    let dir = testutil::temp_dir();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    std::fs::write(&src, vec![7u8; MIB]).unwrap();
    let out = Command::new(FERRY)
        .args(["copy", "--log-format", "json"])
        .arg(&src)
        .arg(&dst)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let mut copy_lines = 0;
    for line in stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        if v["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("copy::"))
        {
            assert_eq!(v["span"]["src"], src.display().to_string(), "{line}");
            assert_eq!(v["span"]["dst"], dst.display().to_string(), "{line}");
            copy_lines += 1;
        }
    }
    assert!(copy_lines > 0, "no line from the copy engine:\n{stderr}");
}

/// Runs `ferry copy` with debug logs on a pseudo-terminal (`script`) and returns what it wrote.
fn copy_on_a_terminal(dir: &Path, no_color: Option<&str>) -> String {
    let src = dir.join("t-src.raw");
    std::fs::write(&src, vec![1u8; 65536]).unwrap();
    let cmd = format!(
        "{FERRY} copy {} {}",
        src.display(),
        dir.join("t-dst.raw").display()
    );
    let mut script = Command::new("timeout");
    script
        .args(["20", "script", "-qec", &cmd, "/dev/null"])
        .env("RUST_LOG", "debug")
        .env_remove("NO_COLOR");
    if let Some(v) = no_color {
        script.env("NO_COLOR", v);
    }
    let out = script.output().expect("running script (util-linux)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("copy starts"), "{text:?}");
    text
}

#[test]
fn colour_on_a_terminal_unless_no_color() {
    testutil::require_binary("script");
    let dir = testutil::temp_dir();
    // The terminal case shows colour, so the check below can tell the difference.
    let coloured = copy_on_a_terminal(dir.path(), None);
    assert!(coloured.contains("\x1b["), "{coloured:?}");
    let plain = copy_on_a_terminal(dir.path(), Some("1"));
    assert!(!plain.contains('\x1b'), "{plain:?}");
}
