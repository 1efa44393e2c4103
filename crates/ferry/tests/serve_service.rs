//! `ferry serve` as a service: SIGHUP applies a new certificate (new connections get it while
//! an upload on the old one completes) and new bandwidth limits; SIGTERM drains within its
//! deadline without losing an acknowledged byte; `--check-config`; socket activation and
//! `Type=notify` readiness through systemd's own `systemd-socket-activate`; the unit files
//! pass `systemd-analyze verify`.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testutil::FerryServe;

const MIB: u64 = 1 << 20;

fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// A ticket document for a new empty `size`-byte image; returns (ticket file, image).
fn ticket(dir: &Path, id: &str, size: u64, extra: serde_json::Value) -> (String, PathBuf) {
    let disk = dir.join(format!("{id}.img"));
    std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
    let mut doc = serde_json::json!({"uuid": id, "size": size, "ops": ["read", "write"],
        "timeout": 300, "url": format!("file://{}", disk.display())});
    doc.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let path = dir.join(format!("{id}.json"));
    std::fs::write(&path, doc.to_string()).unwrap();
    (path.display().to_string(), disk)
}

/// curl with `args`, returning (HTTP status or "000", body).
fn curl(args: &[&str]) -> (String, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("curl runs");
    let mut body = out.stdout;
    let split = body.iter().rposition(|&b| b == b'\n').unwrap();
    let code = String::from_utf8_lossy(&body[split + 1..]).to_string();
    body.truncate(split);
    (code, body)
}

/// A PUT of `src` to `url` running in the background; its stdout is the HTTP status.
fn upload(src: &Path, url: &str, extra: &[&str]) -> Child {
    Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args(extra)
        .arg("--data-binary")
        .arg(format!("@{}", src.display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn finish(mut child: Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "curl did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// Waits until the ticket's upload has written something, so it is known to be under way.
fn wait_written(control: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = curl(&[&format!("http://{control}/status.json")]);
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let written = doc["tickets"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["uuid"] == id))
            .and_then(|t| t["written"].as_u64())
            .unwrap_or(0);
        if written > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the upload to {id} never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(serve: &mut FerryServe, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Some(status) = serve.exited() {
            assert!(status.success(), "ferry serve: {status}\n{}", serve.log());
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "ferry serve still running after {limit:?}:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sighup_serves_a_new_certificate_while_an_upload_on_the_old_one_completes() {
    let dir = testutil::temp_dir();
    let (old, new) = (testutil::Certs::generate(), testutil::Certs::generate());
    let config = dir.path().join("serve.toml");
    let write_config = |certs: &testutil::Certs| {
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ncontrol_listen = \"127.0.0.1:0\"\n\
                 tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                certs.dir().join("server-cert.pem").display(),
                certs.dir().join("server-key.pem").display()
            ),
        )
        .unwrap();
    };
    write_config(&old);
    // 2 MiB/s: the 8 MiB upload lasts about four seconds.
    let (t, disk) = ticket(
        dir.path(),
        "cert",
        8 * MIB,
        serde_json::json!({"bwlimit": 2 * MIB}),
    );
    let config_arg = config.display().to_string();
    let serve = FerryServe::start(
        Path::new(ferry_bin()),
        dir.path(),
        &["--config", &config_arg, "--ticket", &t],
    );
    let control = serve.ready()["control"].as_str().unwrap().to_string();
    let url = format!("https://localhost:{}/images/cert", serve.port());
    let src = dir.path().join("src");
    testutil::random_file(&src, 8 * MIB, 3);
    let old_ca = old.ca_cert().display().to_string();
    let new_ca = new.ca_cert().display().to_string();
    let running = upload(&src, &url, &["--cacert", &old_ca]);
    wait_written(&control, "cert");

    write_config(&new);
    serve.signal(libc::SIGHUP);
    let info = format!("https://localhost:{}/info/", serve.port());
    let deadline = Instant::now() + Duration::from_secs(10);
    while curl(&["--cacert", &new_ca, &info]).0 != "200" {
        assert!(
            Instant::now() < deadline,
            "the new certificate is never served:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        curl(&["--cacert", &old_ca, &info]).0,
        "000",
        "new connections must not get the old certificate"
    );
    assert_eq!(finish(running), "200", "{}", serve.log());
    assert!(
        std::fs::read(&disk).unwrap() == std::fs::read(&src).unwrap(),
        "the upload on the old certificate landed whole"
    );
    assert!(serve.log().contains("configuration reloaded"));
}

#[test]
fn sighup_changes_the_bandwidth_limits_of_running_transfers() {
    let dir = testutil::temp_dir();
    let config = dir.path().join("serve.toml");
    let base = "listen = \"127.0.0.1:0\"\nno_tls = true\ncontrol_listen = \"127.0.0.1:0\"\n";
    std::fs::write(&config, format!("{base}ticket_bwlimit = \"1M\"\n")).unwrap();
    let (t, _) = ticket(dir.path(), "paced", 64 * MIB, serde_json::json!({}));
    let config_arg = config.display().to_string();
    let serve = FerryServe::start(
        Path::new(ferry_bin()),
        dir.path(),
        &["--config", &config_arg, "--ticket", &t],
    );
    let url = format!("http://127.0.0.1:{}/images/paced", serve.port());
    let timed_get = |mib: u64| {
        let start = Instant::now();
        let range = format!("Range: bytes=0-{}", mib * MIB - 1);
        let (code, body) = curl(&["-H", &range, &url]);
        assert_eq!(code, "206");
        assert_eq!(body.len() as u64, mib * MIB);
        start.elapsed().as_secs_f64()
    };
    // 2 MiB at 1 MiB/s: about 2 s (the bucket starts empty).
    let slow = timed_get(2);
    assert!(slow > 1.5, "the 1M ticket limit holds: {slow:.2} s");

    std::fs::write(
        &config,
        format!("{base}ticket_bwlimit = \"16M\"\nbwlimit = \"32M\"\n"),
    )
    .unwrap();
    serve.signal(libc::SIGHUP);
    let control = serve.ready()["control"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = curl(&[&format!("http://{control}/status.json")]);
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if doc["limits"]["global"] == 32 * MIB && doc["tickets"][0]["bwlimit"] == 16 * MIB {
            break;
        }
        assert!(Instant::now() < deadline, "limits unchanged: {doc}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // 16 MiB at 16 MiB/s: about 1 s, where the old limit would take 16.
    let fast = timed_get(16);
    assert!(
        (0.6..4.0).contains(&fast),
        "the new limit applies: {fast:.2} s"
    );
    let (_, text) = curl(&[&format!("http://{control}/metrics")]);
    let text = String::from_utf8(text).unwrap();
    let waits = text
        .lines()
        .find_map(|l| l.strip_prefix("ferry_bwlimit_waits_total "))
        .expect("the bandwidth-limit wait counter");
    assert!(
        waits.trim().parse::<f64>().unwrap() > 0.0,
        "waits counted: {waits}"
    );
}

#[test]
fn sigterm_lets_a_running_upload_finish_then_exits() {
    let dir = testutil::temp_dir();
    let (t, disk) = ticket(
        dir.path(),
        "drain",
        6 * MIB,
        serde_json::json!({"bwlimit": 2 * MIB}),
    );
    let mut serve = FerryServe::start(
        Path::new(ferry_bin()),
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--control-listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "20",
            "--ticket",
            &t,
        ],
    );
    let control = serve.ready()["control"].as_str().unwrap().to_string();
    let port = serve.port();
    let src = dir.path().join("src");
    testutil::random_file(&src, 6 * MIB, 11);
    // An idle keep-alive connection must not hold the drain up.
    let idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let running = upload(&src, &format!("http://127.0.0.1:{port}/images/drain"), &[]);
    wait_written(&control, "drain");
    serve.signal(libc::SIGTERM);
    // Stopped accepting at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = wait_exit(&mut serve, Duration::from_secs(20));
    assert_eq!(finish(running), "200", "{}", serve.log());
    assert!(
        std::fs::read(&disk).unwrap() == std::fs::read(&src).unwrap(),
        "every acknowledged byte is in the image"
    );
    assert!(
        took > Duration::from_millis(300),
        "it waited for the upload"
    );
    assert!(serve.log().contains("all connections finished"));
    drop(idle);
}

#[test]
fn sigterm_ends_a_transfer_that_outlives_the_drain_deadline_unacknowledged() {
    let dir = testutil::temp_dir();
    // 512 KiB/s for 16 MiB: half a minute, far past the 1 s deadline.
    let (t, _) = ticket(
        dir.path(),
        "slow",
        16 * MIB,
        serde_json::json!({"bwlimit": 512 << 10}),
    );
    let mut serve = FerryServe::start(
        Path::new(ferry_bin()),
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--control-listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "1",
            "--ticket",
            &t,
        ],
    );
    let control = serve.ready()["control"].as_str().unwrap().to_string();
    let src = dir.path().join("src");
    testutil::random_file(&src, 16 * MIB, 13);
    let running = upload(
        &src,
        &format!("http://127.0.0.1:{}/images/slow", serve.port()),
        &[],
    );
    wait_written(&control, "slow");
    serve.signal(libc::SIGTERM);
    let took = wait_exit(&mut serve, Duration::from_secs(6));
    assert!(
        took >= Duration::from_millis(900),
        "the drain waited its deadline: {took:?}"
    );
    // The client never got a 200: it knows the upload did not land.
    assert_ne!(finish(running), "200");
    assert!(serve.log().contains("drain timeout"), "{}", serve.log());
}

#[test]
fn check_config_validates_and_reports_without_serving() {
    let dir = testutil::temp_dir();
    let certs = testutil::Certs::generate();
    let (t, _) = ticket(dir.path(), "c", MIB, serde_json::json!({}));
    let config = dir.path().join("ok.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:54399\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             tickets = [\"{t}\"]\nbwlimit = \"1G\"\ndrain_timeout = 12\n",
            certs.dir().join("server-cert.pem").display(),
            certs.dir().join("server-key.pem").display()
        ),
    )
    .unwrap();
    let run = |config: &Path| {
        Command::new(ferry_bin())
            .args(["serve", "--check-config", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = run(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["listen"], "127.0.0.1:54399");
    assert_eq!(doc["tls"], true);
    assert_eq!(doc["bwlimit"], 1u64 << 30);
    assert_eq!(doc["drain_timeout"], 12.0);
    // Nothing listens: it only checked.
    assert!(std::net::TcpStream::connect("127.0.0.1:54399").is_err());

    let bad = |name: &str, text: String, expect: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = run(&path);
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{name}: {err}");
    };
    bad(
        "typo.toml",
        "lisen = \"127.0.0.1:1\"\nno_tls = true\n".into(),
        "unknown field `lisen`",
    );
    bad(
        "cert.toml",
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            dir.path().join("missing.pem").display(),
            certs.dir().join("server-key.pem").display()
        ),
        "missing.pem",
    );
    // A key that is not the certificate's.
    bad(
        "mismatch.toml",
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            certs.dir().join("server-cert.pem").display(),
            certs.dir().join("client-key.pem").display()
        ),
        "certificate and key",
    );
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"uuid\": 1}").unwrap();
    bad(
        "ticket.toml",
        format!("no_tls = true\ntickets = [\"{}\"]\n", broken.display()),
        "broken.json",
    );
}

/// A free loopback TCP port (bound and released; the activation helper binds it again).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn socket_activation_and_readiness_through_systemd_socket_activate() {
    let activate = testutil::require_binary("systemd-socket-activate");
    let dir = testutil::temp_dir();
    let (t, _) = ticket(dir.path(), "act", MIB, serde_json::json!({}));
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (data, control) = (free_port(), free_port());
    let mut child = Command::new(activate)
        .arg(format!("--listen=127.0.0.1:{data}"))
        .arg(format!("--listen=127.0.0.1:{control}"))
        .arg("--fdname=remote:control")
        // The helper gives the server a fresh environment: only what -E names.
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg(ferry_bin())
        .args(["serve", "--no-tls", "--listen", "127.0.0.1:1"])
        .args(["--control-listen", "127.0.0.1:1", "--ticket", &t])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // The first connection starts the server, which takes over both listening sockets (the
    // addresses on its command line are never bound).
    let connected = Instant::now();
    let mut stream = loop {
        match std::net::TcpStream::connect(("127.0.0.1", control)) {
            Ok(s) => break s,
            Err(_) if connected.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the activation helper never listened: {e}"),
        }
    };
    stream
        .write_all(b"GET /tickets/act HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    let message = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(message.contains("READY=1"), "{message}");
    let (code, _) = curl(&[&format!("http://127.0.0.1:{data}/info/")]);
    assert_eq!(code, "200", "the data service answers on its passed socket");

    // SIGTERM: STOPPING=1, then the process exits.
    // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let n = notify.recv(&mut buf).expect("STOPPING=1 on NOTIFY_SOCKET");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "ferry serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Kill(child);
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let analyze = testutil::require_binary("systemd-analyze");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd");
    let dir = testutil::temp_dir();
    let names = [
        "ferry-serve.service",
        "ferry-serve.socket",
        "ferry-serve-control.socket",
    ];
    for name in names {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        // The units name the installed binary; verify the one under test.
        let text = text.replace("/usr/bin/ferry", ferry_bin());
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = Command::new(analyze)
        .arg("verify")
        .args(names.iter().map(|n| dir.path().join(n)))
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Lines about units this machine lacks (no systemd running here) are not about ours.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("ferry-serve")).collect();
    assert!(out.status.success() && ours.is_empty(), "{err}");
    // The service is Type=notify and reloads with SIGHUP; the socket names its listeners.
    let service = std::fs::read_to_string(units.join("ferry-serve.service")).unwrap();
    assert!(service.contains("Type=notify") && service.contains("ExecReload=/bin/kill -HUP"));
    for (unit, name) in [
        ("ferry-serve.socket", "remote"),
        ("ferry-serve-control.socket", "control"),
    ] {
        let socket = std::fs::read_to_string(units.join(unit)).unwrap();
        assert!(
            socket.contains(&format!("FileDescriptorName={name}")),
            "{unit}"
        );
    }
}
