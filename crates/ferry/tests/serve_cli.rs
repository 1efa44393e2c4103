//! `ferry serve` and `ferry ticket` as a user runs them: flags and a TOML config, start-up
//! tickets, the ready file, the admin client's sub-commands, usage errors, and clean shutdown
//! on SIGTERM.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use testutil::FerryServe;

const MIB: u64 = 1 << 20;

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Starts `ferry serve ARGS` and waits for its ready file.
fn serve(dir: &Path, args: &[&str]) -> FerryServe {
    FerryServe::start(Path::new(env!("CARGO_BIN_EXE_ferry")), dir, args)
}

fn ticket(control: &str, args: &[&str]) -> Output {
    ferry()
        .arg("ticket")
        .args(["--control-socket", control])
        .args(args)
        .output()
        .unwrap()
}

fn curl(args: &[&str]) -> (String, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let mut body = out.stdout;
    let split = body.iter().rposition(|b| *b == b'\n').unwrap();
    let code = String::from_utf8_lossy(&body[split + 1..]).to_string();
    body.truncate(split);
    (code, body)
}

#[test]
fn serve_with_flags_tickets_and_the_admin_client() {
    let dir = testutil::temp_dir();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, b"ferry!").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let boot = dir.path().join("boot.json");
    std::fs::write(
        &boot,
        serde_json::json!({"uuid": "boot", "size": MIB, "ops": ["read"], "timeout": 300,
            "url": format!("file://{}", disk.display())})
        .to_string(),
    )
    .unwrap();
    let control = dir.path().join("control.sock").display().to_string();
    let local = dir.path().join("local.sock").display().to_string();
    let boot_arg = boot.display().to_string();
    let mut srv = serve(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--control-socket",
            &control,
            "--local-socket",
            &local,
            "--ticket",
            &boot_arg,
        ],
    );
    assert_eq!(srv.ready()["control"], control.as_str());
    assert_eq!(srv.ready()["local"], local.as_str());
    assert!(
        srv.ready()["remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let port = srv.port();

    // The start-up ticket serves at once.
    let (code, body) = curl(&["-r", "0-5", &format!("http://127.0.0.1:{port}/images/boot")]);
    assert_eq!(code, "206");
    assert_eq!(body, b"ferry!");

    // ferry ticket add (from flags), show, list, mod, del.
    let url = format!("file://{}", disk.display());
    let out = ticket(
        &control,
        &[
            "add",
            "--uuid",
            "t2",
            "--url",
            &url,
            "--size",
            // Sizes take the same suffixes as `ferry copy`.
            "1M",
            "--ops",
            "read,write",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t2");
    let out = ticket(&control, &["show", "t2"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["uuid"], "t2");
    assert_eq!(v["ops"], serde_json::json!(["read", "write"]));
    assert_eq!(v["size"], 1048576);
    let out = ticket(&control, &["list"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(
        ticket(&control, &["mod", "t2", "--timeout", "0"])
            .status
            .success()
    );
    let (code, body) = curl(&["-r", "0-1", &format!("http://127.0.0.1:{port}/images/t2")]);
    assert_eq!(code, "403");
    assert!(String::from_utf8_lossy(&body).contains("expired"));
    assert!(ticket(&control, &["del", "t2"]).status.success());
    let out = ticket(&control, &["show", "t2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") && err.contains("No such ticket 't2'"),
        "{err}"
    );

    // A ticket file on stdin.
    let mut child = ferry()
        .args(["ticket", "--control-socket", &control, "add", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            serde_json::json!({"uuid": "t3", "size": 1, "ops": ["read"], "timeout": 5,
                "url": "file:///nonexistent"})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    // A bad ticket is refused with the server's reason.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"uuid": "b", "ops": []}"#).unwrap();
    let out = ticket(&control, &["add", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Required ticket parameter is missing"));

    assert!(srv.stop().success(), "{}", srv.log());
    assert!(!Path::new(&control).exists(), "control socket left behind");
    assert!(srv.log().contains("connection closed"), "{}", srv.log());
}

#[test]
fn serve_from_a_config_file_with_tls() {
    let dir = testutil::temp_dir();
    let certs = testutil::Certs::generate();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![3u8; 4096]).unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             control_listen = \"127.0.0.1:0\"\nauth_timeout = 5\n",
            certs.dir().join("server-cert.pem").display(),
            certs.dir().join("server-key.pem").display()
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let srv = serve(dir.path(), &["--config", &config_arg]);
    assert!(srv.ready()["local"].is_null());
    let control = srv.ready()["control"].as_str().unwrap().to_string();
    let url = format!("file://{}", disk.display());
    let out = ferry()
        .args([
            "ticket",
            "--control-listen",
            &control,
            "add",
            "--uuid",
            "tls",
        ])
        .args(["--url", &url, "--size", "4096", "--ops", "read"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = certs.ca_cert().display().to_string();
    let (code, body) = curl(&[
        "--cacert",
        &ca,
        "--tlsv1.2",
        &format!("https://localhost:{}/images/tls", srv.port()),
    ]);
    assert_eq!(code, "200");
    assert_eq!(body, vec![3u8; 4096]);
    // TLS 1.1 and older are refused.
    let (code, _) = curl(&[
        "--cacert",
        &ca,
        "--tls-max",
        "1.1",
        &format!("https://localhost:{}/images/tls", srv.port()),
    ]);
    assert_eq!(code, "000");
}

#[test]
fn usage_errors_exit_2() {
    let dir = testutil::temp_dir();
    for args in [
        vec!["serve", "--listen", "127.0.0.1:0"],
        vec!["serve", "--no-tls", "--tls-cert", "a", "--tls-key", "b"],
        vec![
            "serve",
            "--no-tls",
            "--control-socket",
            "a",
            "--control-listen",
            "b",
        ],
        vec!["ticket", "list"],
    ] {
        let out = ferry()
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let config = dir.path().join("typo.toml");
    std::fs::write(&config, "lisen = \"x\"\n").unwrap();
    let out = ferry()
        .args(["serve", "--config", &config.display().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));
}
