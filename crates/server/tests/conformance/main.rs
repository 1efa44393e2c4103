//! Differential conformance of `ferry serve` against the ovirt-imageio 2.5.1 daemon.
//!
//! Every case of the [`corpus`] runs against both servers, started with the same configuration
//! (plain HTTP, no local socket, control on a Unix socket), with the same tickets, on the same
//! kind of backend: a raw file (`file:` tickets) and the same file behind qemu-nbd (`nbd:`
//! tickets). Compared per request: the status; the headers clients read (`Allow`,
//! `Content-Range`, `Content-Length`, `Content-Type`, `Content-Disposition`, `Connection`,
//! every `Access-Control-*`); JSON bodies field by field; other success bodies byte for byte;
//! and after each case the image bytes. Error texts are for humans, so only their status and
//! headers are compared (their `Content-Length` follows the text and is not).
//!
//! A difference is either listed in [`deliberate::DELIBERATE`] with its reason, or it fails
//! the test; so does a row of that table that no longer matches anything (the difference it
//! excused is gone). The report (printed always) counts cases run, identical, deliberately
//! different and unexplained, per backend.

#[path = "../common/mod.rs"]
mod common;
mod corpus;
mod deliberate;
mod http;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;
use testutil::imageio::{ImageioServer, ServerOptions};

use corpus::{IMAGE_DATA, IMAGE_SIZE, Svc};
use http::{Addr, Conn, Response};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    File,
    Nbd,
}

/// Headers compared on every response (names lowercase).
const COMPARED_HEADERS: &[&str] = &[
    "allow",
    "content-range",
    "content-type",
    "content-disposition",
    "connection",
];

/// Ticket info keys that are clocks: equal within this many seconds.
const CLOCK_KEYS: &[&str] = &["expires", "idle_time"];
const CLOCK_SLACK: f64 = 2.0;

/// One side of the comparison: where its services listen and what its tickets point at.
struct Side {
    data: Addr,
    control: Addr,
    image: PathBuf,
    url: String,
}

/// One difference between the servers' answers.
#[derive(Debug, Clone)]
pub struct Diff {
    pub step: usize,
    /// `status`, `header:NAME`, `json:PATH`, `json+:PATH` (only ferry), `json-:PATH` (only
    /// imageio), `body` or `image`.
    pub field: String,
    pub ferry: String,
    pub imageio: String,
}

fn reset_image(path: &Path) {
    let data = testutil::pseudo_random(11, IMAGE_DATA);
    std::fs::write(path, &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    f.sync_all().unwrap();
}

fn compare_json(path: &str, f: &Value, i: &Value, step: usize, out: &mut Vec<Diff>) {
    match (f, i) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => compare_json(&p, v, w, step, out),
                    None => out.push(Diff {
                        step,
                        field: format!("json+:{p}"),
                        ferry: v.to_string(),
                        imageio: "(absent)".into(),
                    }),
                }
            }
            for (k, w) in b {
                if !a.contains_key(k) {
                    out.push(Diff {
                        step,
                        field: format!("json-:{path}.{k}"),
                        ferry: "(absent)".into(),
                        imageio: w.to_string(),
                    });
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (n, (v, w)) in a.iter().zip(b).enumerate() {
                compare_json(&format!("{path}[{n}]"), v, w, step, out);
            }
        }
        (Value::Number(a), Value::Number(b))
            if CLOCK_KEYS.iter().any(|k| path.ends_with(&format!(".{k}"))) =>
        {
            let (a, b) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            if (a - b).abs() > CLOCK_SLACK {
                out.push(Diff {
                    step,
                    field: format!("json:{path}"),
                    ferry: a.to_string(),
                    imageio: b.to_string(),
                });
            }
        }
        _ if f == i => {}
        _ => out.push(Diff {
            step,
            field: format!("json:{path}"),
            ferry: f.to_string(),
            imageio: i.to_string(),
        }),
    }
}

/// Compares one step's answers; `urls` are the sides' backend URLs, which JSON bodies may
/// echo and which are the same ticket URL to a client.
fn compare(step: usize, f: &Response, i: &Response, urls: (&str, &str), out: &mut Vec<Diff>) {
    let before = out.len();
    let mut push = |field: String, a: String, b: String| {
        out.push(Diff {
            step,
            field,
            ferry: a,
            imageio: b,
        })
    };
    if f.status != i.status {
        push("status".into(), f.status.to_string(), i.status.to_string());
    }
    let mut names: Vec<String> = COMPARED_HEADERS.iter().map(|s| s.to_string()).collect();
    for (k, _) in f.headers.iter().chain(&i.headers) {
        if k.starts_with("access-control-") && !names.contains(k) {
            names.push(k.clone());
        }
    }
    let success = f.status < 400 && i.status < 400;
    for name in &names {
        let (a, b) = (f.header(name), i.header(name));
        if a != b {
            let show = |v: Option<&str>| v.map_or("(absent)".to_string(), str::to_owned);
            push(format!("header:{name}"), show(a), show(b));
        }
    }
    if !success {
        return;
    }
    let is_json = |r: &Response| r.header("content-type") == Some("application/json");
    if is_json(f) && is_json(i) {
        let parse = |r: &Response, url: &str| {
            let text = String::from_utf8_lossy(&r.body).replace(url, "{url}");
            serde_json::from_str::<Value>(&text)
                .unwrap_or_else(|e| Value::String(format!("unparsable JSON ({e})")))
        };
        compare_json("", &parse(f, urls.0), &parse(i, urls.1), step, out);
    } else if f.body != i.body {
        push(
            "body".into(),
            format!("{} bytes", f.body.len()),
            format!("{} bytes", i.body.len()),
        );
    }
    // A body that differs explains its length; equal bodies must have equal lengths.
    let (a, b) = (f.header("content-length"), i.header("content-length"));
    let body_differs = out[before..]
        .iter()
        .any(|d| d.field.starts_with("json") || d.field == "body");
    if !body_differs && a != b {
        let show = |v: Option<&str>| v.map_or("(absent)".to_string(), str::to_owned);
        // Tagged with the status: 204 answers are the one place the two may differ by rule.
        out.push(Diff {
            step,
            field: format!("header:content-length@{}", f.status),
            ferry: show(a),
            imageio: show(b),
        });
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(p) => format!("first difference at byte {p}"),
        None => format!("lengths {} and {}", a.len(), b.len()),
    }
}

/// Runs one case on both sides; returns every difference.
fn run_case(
    case: &corpus::Case,
    ferry: &Side,
    daemon: &Side,
    prelude: &mut Vec<Diff>,
    errors: &mut usize,
) -> Vec<Diff> {
    reset_image(&ferry.image);
    reset_image(&daemon.image);
    let mut conns: BTreeMap<(Svc, usize), (Conn, Conn)> = BTreeMap::new();
    let mut diffs = Vec::new();
    let prelude_len = corpus::prelude().len();
    let mut failed = false;
    let steps: Vec<corpus::Step> = corpus::prelude()
        .into_iter()
        .chain(case.steps.clone())
        .collect();
    for (n, step) in steps.iter().enumerate() {
        let (cf, cd) = conns.entry((step.svc, step.conn)).or_insert_with(|| {
            let pick = |s: &Side| match step.svc {
                Svc::Data => Conn::new(s.data.clone()),
                Svc::Control => Conn::new(s.control.clone()),
            };
            (pick(ferry), pick(daemon))
        });
        let rf = cf.exchange(&step.render(&ferry.url), step.half_close);
        let rd = cd.exchange(&step.render(&daemon.url), step.half_close);
        compare(n, &rf, &rd, (&ferry.url, &daemon.url), &mut diffs);
        if n >= prelude_len && !(200..400).contains(&rd.status) {
            failed = true;
        }
        // The prelude is the same in every case: its differences are reported once, under
        // its own name, instead of marking every case.
        if n < prelude_len {
            for d in diffs.drain(..) {
                prelude.push(d);
            }
        }
    }
    drop(conns);
    *errors += usize::from(failed);
    let (a, b) = (
        std::fs::read(&ferry.image).unwrap(),
        std::fs::read(&daemon.image).unwrap(),
    );
    if a != b {
        diffs.push(Diff {
            step: steps.len(),
            field: "image".into(),
            ferry: first_difference(&a, &b),
            imageio: String::new(),
        });
    }
    diffs
}

impl Ord for Svc {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self as u8).cmp(&(*other as u8))
    }
}
impl PartialOrd for Svc {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// What one backend's run found.
struct Outcome {
    report: String,
    unexplained: usize,
    /// Rows of the deliberate table that explained something.
    used: std::collections::BTreeSet<usize>,
}

fn run(backend: Backend) -> Outcome {
    let ferry_srv = common::TestServer::start_with(|c| c.local_socket = None);
    let daemon_srv = ImageioServer::daemon(&ServerOptions::default());
    let ferry_image = ferry_srv.dir.path().join("image.raw");
    let daemon_image = daemon_srv.dir().join("image.raw");
    reset_image(&ferry_image);
    reset_image(&daemon_image);
    // qemu-nbd peers live as long as the run; the raw file behind each is the image compared.
    let mut peers = Vec::new();
    let mut url_for = |image: &Path| match backend {
        Backend::File => format!("file://{}", image.display()),
        Backend::Nbd => {
            let peer = testutil::QemuNbd::new(image).shared(0).start();
            let url = format!("nbd:unix:{}", peer.socket().unwrap().display());
            peers.push(peer);
            url
        }
    };
    let ferry = Side {
        data: Addr::Tcp(ferry_srv.port),
        control: Addr::Unix(ferry_srv.control_socket()),
        url: url_for(&ferry_image),
        image: ferry_image,
    };
    let daemon = Side {
        data: Addr::Tcp(daemon_srv.port()),
        control: Addr::Unix(daemon_srv.control_socket().to_path_buf()),
        url: url_for(&daemon_image),
        image: daemon_image,
    };
    let cases = corpus::cases();
    let mut names = std::collections::BTreeSet::new();
    for case in &cases {
        assert!(names.insert(&case.name), "two cases named {}", case.name);
    }
    let mut identical = 0;
    let mut deliberate: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut used = std::collections::BTreeSet::new();
    let mut unexplained = Vec::new();
    let mut prelude_diffs = Vec::new();
    // Cases in which the reference refused at least one request: the invalid part.
    let mut error_cases = 0;
    for case in &cases {
        let diffs = run_case(case, &ferry, &daemon, &mut prelude_diffs, &mut error_cases);
        if diffs.is_empty() {
            identical += 1;
            continue;
        }
        for d in &diffs {
            match deliberate::explain(backend, &case.name, &d.field) {
                Some(row) => {
                    used.insert(row);
                    let reason = deliberate::DELIBERATE[row].reason;
                    let names = deliberate.entry(reason).or_default();
                    if !names.contains(&case.name) {
                        names.push(case.name.clone());
                    }
                }
                None => {
                    unexplained.push(format!(
                        "{} step {}: {}: ferry {} / imageio {}",
                        case.name, d.step, d.field, d.ferry, d.imageio
                    ));
                }
            }
        }
    }
    // Prelude differences must be explained like any other.
    prelude_diffs.dedup_by(|a, b| a.step == b.step && a.field == b.field);
    let mut seen = std::collections::BTreeSet::new();
    for d in &prelude_diffs {
        if !seen.insert((d.step, d.field.clone())) {
            continue;
        }
        match deliberate::explain(backend, "prelude", &d.field) {
            Some(row) => {
                used.insert(row);
                let reason = deliberate::DELIBERATE[row].reason;
                let names = deliberate.entry(reason).or_default();
                if !names.iter().any(|n| n == "prelude") {
                    names.push("prelude".into());
                }
            }
            None => unexplained.push(format!(
                "prelude step {}: {}: ferry {} / imageio {}",
                d.step, d.field, d.ferry, d.imageio
            )),
        }
    }
    let explained_cases: std::collections::BTreeSet<&String> =
        deliberate.values().flatten().collect();
    let unexplained_cases: std::collections::BTreeSet<&str> = unexplained
        .iter()
        .map(|u| u.split(" step ").next().unwrap())
        .collect();
    let deliberate_cases = explained_cases
        .iter()
        .filter(|c| c.as_str() != "prelude" && !unexplained_cases.contains(c.as_str()))
        .count();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "conformance, {backend:?} backend: {} cases run ({error_cases} with requests the \
         reference refuses), {identical} identical, {deliberate_cases} deliberately \
         different, {} unexplained",
        cases.len(),
        unexplained_cases.len()
    );
    for (reason, names) in &deliberate {
        let _ = writeln!(
            report,
            "  deliberate: {reason}\n    cases: {}",
            names.join(", ")
        );
    }
    for u in &unexplained {
        let _ = writeln!(report, "  UNEXPLAINED {u}");
    }
    println!("{report}");
    if !unexplained.is_empty() {
        // Keep the servers' logs near the failure.
        eprintln!("daemon log tail:\n{}", tail(&daemon_srv.log()));
    }
    drop(peers);
    Outcome {
        report,
        unexplained: unexplained_cases.len(),
        used,
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Both backends in one test, so the table's rows can be checked against both runs.
#[test]
fn ferry_serve_answers_like_ovirt_imageio() {
    let runs = [run(Backend::File), run(Backend::Nbd)];
    let reports: String = runs.iter().map(|r| r.report.as_str()).collect();
    assert!(
        runs.iter().all(|r| r.unexplained == 0),
        "unexplained differences from ovirt-imageio:\n{reports}"
    );
    let stale: Vec<String> = deliberate::DELIBERATE
        .iter()
        .enumerate()
        .filter(|(i, _)| runs.iter().all(|r| !r.used.contains(i)))
        .map(|(_, d)| format!("{} / {}: {}", d.cases, d.field, d.reason))
        .collect();
    assert!(
        stale.is_empty(),
        "deliberate differences that no case shows any more (remove them):\n{}",
        stale.join("\n")
    );
}
