//! What an operator sees of a running `ferry serve` on its control listener: `/metrics` parsed
//! by a Prometheus text parser, its counters equal to the bytes curl actually moved; and the
//! status page rendered by headless Chromium while an upload runs, with a screenshot.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use testutil::FerryServe;

const MIB: u64 = 1 << 20;

fn ticket(dir: &Path, id: &str, size: u64, extra: serde_json::Value) -> String {
    let disk = dir.join(format!("{id}.img"));
    std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
    let mut doc = serde_json::json!({"uuid": id, "size": size, "ops": ["read", "write"],
        "timeout": 300, "url": format!("file://{}", disk.display())});
    doc.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let path = dir.join(format!("{id}.json"));
    std::fs::write(&path, doc.to_string()).unwrap();
    path.display().to_string()
}

/// Runs curl with `args`; returns the HTTP status it reports.
fn curl(args: &[&str]) -> u16 {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn get_text(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "GET {url}");
    String::from_utf8(out.stdout).unwrap()
}

fn start(dir: &Path, tickets: &[&str]) -> FerryServe {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--no-tls",
        "--control-listen",
        "127.0.0.1:0",
    ];
    for t in tickets {
        args.extend(["--ticket", t]);
    }
    FerryServe::start(Path::new(env!("CARGO_BIN_EXE_ferry")), dir, &args)
}

fn control(serve: &FerryServe) -> String {
    format!("http://{}", serve.ready()["control"].as_str().unwrap())
}

/// Every sample of the scrape, keyed by `name{label=value,...}` with labels sorted.
fn samples(text: &str) -> HashMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    let mut out = HashMap::new();
    for s in scrape.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|c| c.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), value);
    }
    out
}

#[test]
fn metrics_count_the_bytes_curl_moved() {
    let dir = testutil::temp_dir();
    let t = ticket(dir.path(), "m1", 8 * MIB, serde_json::json!({}));
    let serve = start(dir.path(), &[&t]);
    let data = format!("http://127.0.0.1:{}/images/m1", serve.port());
    let src = dir.path().join("src");
    testutil::random_file(&src, 3 * MIB, 5);

    let upload = format!("@{}", src.display());
    assert_eq!(curl(&["-X", "PUT", "--data-binary", &upload, &data]), 200);
    let zero = r#"{"op": "zero", "offset": 4194304, "size": 1048576}"#;
    assert_eq!(curl(&["-X", "PATCH", "--data-binary", zero, &data]), 200);
    assert_eq!(curl(&["-H", "Range: bytes=0-2097151", &data]), 206);
    let unknown = format!("http://127.0.0.1:{}/images/nope", serve.port());
    assert_eq!(curl(&[&unknown]), 403);
    assert_eq!(curl(&["-X", "BREW", &data]), 405);

    let text = get_text(&format!("{}/metrics", control(&serve)));
    let m = samples(&text);
    let value = |key: &str| {
        *m.get(key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{text}"))
    };
    assert_eq!(value("ferry_bytes_total{op=write}"), (3 * MIB) as f64);
    assert_eq!(value("ferry_bytes_total{op=zero}"), MIB as f64);
    assert_eq!(value("ferry_bytes_total{op=read}"), (2 * MIB) as f64);
    assert_eq!(
        value("ferry_ticket_bytes_total{op=write,ticket=m1}"),
        (3 * MIB) as f64
    );
    assert_eq!(
        value("ferry_ticket_bytes_total{op=read,ticket=m1}"),
        (2 * MIB) as f64
    );
    assert_eq!(value("ferry_tickets{}"), 1.0);
    assert_eq!(
        value("ferry_requests_total{method=PUT,service=remote,status=200}"),
        1.0
    );
    assert_eq!(
        value("ferry_requests_total{method=GET,service=remote,status=403}"),
        1.0
    );
    assert_eq!(value("ferry_errors_total{kind=forbidden}"), 1.0);
    assert_eq!(
        value("ferry_request_duration_seconds_count{method=PATCH,service=remote}"),
        1.0
    );
    // A method a client made up is counted, under one shared label.
    assert_eq!(
        value("ferry_requests_total{method=other,service=remote,status=405}"),
        1.0
    );
    assert!(!text.contains("BREW"), "no label set per made-up method");
    // Five curl runs, five connections, all closed by now or closing.
    assert_eq!(
        value("ferry_connections_accepted_total{service=remote}"),
        5.0
    );
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
}

/// Headless Chromium (Debian's `chromium`, installed by scripts/test).
fn chromium() -> Command {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        // Let the page poll twice, so rates are computed from two samples.
        "--virtual-time-budget=2500",
        "--window-size=1400,900",
    ]);
    cmd.stderr(Stdio::null());
    cmd
}

#[test]
fn status_page_shows_a_live_upload_and_errors_in_chromium() {
    assert!(
        Command::new("chromium")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "headless Chromium is needed: apt-get install chromium (scripts/test installs it)"
    );
    let dir = testutil::temp_dir();
    // 1 MiB/s: the 8 MiB upload runs while the page is rendered.
    let t = ticket(
        dir.path(),
        "live-upload",
        8 * MIB,
        serde_json::json!({"bwlimit": MIB}),
    );
    let serve = start(dir.path(), &[&t]);
    let src = dir.path().join("src");
    testutil::random_file(&src, 8 * MIB, 9);
    let data = format!("http://127.0.0.1:{}/images/live-upload", serve.port());
    let mut upload = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-X", "PUT", "--data-binary"])
        .arg(format!("@{}", src.display()))
        .arg(&data)
        .spawn()
        .unwrap();
    let unknown = format!("http://127.0.0.1:{}/images/no-such-ticket", serve.port());
    assert_eq!(curl(&[&unknown]), 403);
    // The upload is under way: its connection is bound to the ticket.
    let status_url = format!("{}/status", control(&serve));
    assert!(
        common_wait(Duration::from_secs(10), || {
            get_text(&format!("{}.json", status_url)).contains("\"live-upload\"")
                && serde_json::from_str::<serde_json::Value>(&get_text(&format!(
                    "{status_url}.json"
                )))
                .unwrap()["tickets"][0]["written"]
                    .as_u64()
                    .unwrap()
                    > 0
        }),
        "the upload started"
    );

    let dom = chromium()
        .arg("--dump-dom")
        .arg(&status_url)
        .output()
        .unwrap();
    assert!(dom.status.success(), "chromium --dump-dom failed");
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ferry-status-page.png");
    let _ = std::fs::remove_file(&shot);
    let ok = chromium()
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&status_url)
        .status()
        .unwrap();
    assert!(ok.success(), "chromium --screenshot failed");
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    println!("status page screenshot: {}", shot.display());

    upload.kill().ok();
    upload.wait().ok();

    // Rendered by the page's script, not served as text: the tables are empty in the HTML.
    assert!(
        dom.contains(r#"<tr data-ticket="live-upload">"#),
        "ticket row in:\n{dom}"
    );
    assert!(dom.contains("%</td>"), "progress shown:\n{dom}");
    assert!(
        dom.contains(r#"<td class="peer">127.0.0.1:"#),
        "the client of the live transfer:\n{dom}"
    );
    assert!(
        dom.contains("No such ticket no-such-ticket"),
        "the recent error:\n{dom}"
    );
    assert!(
        dom.contains(r#"<div id="state">ferry/"#) && dom.contains(" · updated "),
        "the page updated itself:\n{dom}"
    );
    assert!(
        !dom.contains("favicon"),
        "the page asks for nothing but its status document:\n{dom}"
    );
    assert!(
        dom.contains(r#"<td class="num">1.0 MiB/s</td>"#),
        "the ticket's limit:\n{dom}"
    );
    // Two polls happened: the upload's rate is a number, not the first poll's dash.
    let row = dom
        .split(r#"<tr data-ticket="live-upload">"#)
        .nth(1)
        .unwrap()
        .split("</tr>")
        .next()
        .unwrap();
    assert!(
        row.contains("/s</td>"),
        "the ticket row shows a rate: {row}"
    );
}

fn common_wait(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
