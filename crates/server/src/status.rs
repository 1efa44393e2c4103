//! What the control listener shows operators besides tickets: `GET /metrics` (Prometheus),
//! `GET /status` (a self-updating HTML page: tickets, live transfers, recent errors) and
//! `GET /status.json` (the document the page polls). All three are read-only; the page has
//! no external assets, so it works on a host with no internet access.

use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Response, StatusCode};
use serde_json::json;

use crate::respond::{Body, HttpError, full};
use crate::store::TicketStore;

/// The content type of prometheus-client's text encoding.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The answer for `path` if it is one of the status resources.
pub fn route(
    path: &str,
    method: &Method,
    store: &TicketStore,
) -> Option<Result<Response<Body>, HttpError>> {
    let make: fn(&TicketStore) -> Response<Body> = match path {
        "/metrics" => metrics,
        "/status" | "/status/" => page,
        "/status.json" => document,
        _ => return None,
    };
    if method != Method::GET && method != Method::HEAD {
        return Some(Err(HttpError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method '{method}' not defined for '{path}'"),
        )));
    }
    let mut resp = make(store);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(Ok(resp))
}

fn with_type(body: impl Into<bytes::Bytes>, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn metrics(store: &TicketStore) -> Response<Body> {
    with_type(store.metrics.encode(), OPENMETRICS)
}

fn page(_: &TicketStore) -> Response<Body> {
    with_type(STATUS_PAGE, "text/html; charset=utf-8")
}

fn document(store: &TicketStore) -> Response<Body> {
    let mut text = serde_json::to_string_pretty(&status(store)).expect("status serializes");
    text.push('\n');
    with_type(text, "application/json")
}

/// The status document: tickets with their traffic, open connections, recent errors.
pub fn status(store: &TicketStore) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let tickets: Vec<serde_json::Value> = store
        .list()
        .iter()
        .map(|t| {
            let mut info = t.info();
            let (read, written, zeroed) = t.traffic.snapshot();
            info["read"] = json!(read);
            info["written"] = json!(written);
            info["zeroed"] = json!(zeroed);
            info["bwlimit"] = json!(t.flow.own().map_or(0, |l| l.rate()));
            info
        })
        .collect();
    let connections: Vec<serde_json::Value> = store
        .metrics
        .live_connections()
        .iter()
        .map(|c| {
            let (bytes_in, bytes_out) = c.bytes();
            json!({
                "id": c.id,
                "service": c.service,
                "peer": c.peer,
                "tickets": c.bound_tickets(),
                "requests": c.requests(),
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "seconds": c.age().as_secs_f64(),
            })
        })
        .collect();
    json!({
        "server": crate::conn::SERVER_NAME,
        "time": now,
        // Ticket expiry is on this clock (as the reference reports it).
        "monotonic": crate::ticket::monotonic_now(),
        "limits": {
            "global": store.limits().global.rate(),
            "per_ticket": store.limits().per_ticket(),
        },
        "tickets": tickets,
        "connections": connections,
        "errors": store.metrics.recent_errors(),
    })
}

/// The status page: plain HTML, CSS and script, polling `/status.json` every second. Rates
/// are computed here from the change between two polls.
const STATUS_PAGE: &str = r##"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ferry serve — status</title>
<link rel="icon" href="data:,">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; width: 8em; height: .8em; background: #eee; vertical-align: middle; }
.bar span { display: block; height: 100%; background: #3a7; }
.empty { color: #888; font-style: italic; }
.error td { color: #a22; }
#state { color: #666; }
</style>
</head>
<body>
<h1>ferry serve</h1>
<div id="state">loading…</div>
<h2>Tickets</h2>
<table id="tickets"><thead><tr><th>ticket</th><th>transfer</th><th>ops</th><th>size</th>
<th>progress</th><th>rate</th><th>limit</th><th>read</th><th>written</th><th>zeroed</th><th>connections</th>
<th>expires in</th></tr></thead><tbody></tbody></table>
<h2>Live transfers</h2>
<table id="connections"><thead><tr><th>connection</th><th>service</th><th>client</th>
<th>tickets</th><th>requests</th><th>in</th><th>out</th><th>rate</th><th>open for</th></tr>
</thead><tbody></tbody></table>
<h2>Recent errors</h2>
<table id="errors"><thead><tr><th>time</th><th>service</th><th>ticket</th><th>status</th>
<th>message</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
let previous = null;
function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
function fill(table, rows, empty, build) {
  const body = document.querySelector("#" + table + " tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = body.insertRow();
    const td = cell(tr, empty, "empty");
    td.colSpan = document.querySelectorAll("#" + table + " th").length;
    return;
  }
  for (const r of rows) build(body.insertRow(), r);
}
function rate(now, before, seconds) {
  if (before === undefined || seconds <= 0) return "—";
  return size(Math.max(0, now - before) / seconds) + "/s";
}
function render(doc) {
  const dt = previous ? doc.time - previous.time : 0;
  const moved = t => t.read + t.written + t.zeroed;
  const old = new Map((previous ? previous.tickets : []).map(t => [t.uuid, moved(t)]));
  fill("tickets", doc.tickets, "no tickets", (tr, t) => {
    tr.dataset.ticket = t.uuid;
    cell(tr, t.uuid);
    cell(tr, t.transfer_id);
    cell(tr, t.ops.join(","));
    cell(tr, size(t.size), "num");
    const done = t.transferred !== undefined ? t.transferred : moved(t);
    const pct = t.size > 0 ? Math.min(100, 100 * done / t.size) : 0;
    const td = cell(tr, "", "progress");
    const bar = document.createElement("span");
    bar.className = "bar";
    const fillSpan = document.createElement("span");
    fillSpan.style.width = pct.toFixed(1) + "%";
    bar.appendChild(fillSpan);
    td.appendChild(bar);
    td.appendChild(document.createTextNode(" " + pct.toFixed(1) + "%"));
    cell(tr, rate(moved(t), old.get(t.uuid), dt), "num rate");
    cell(tr, t.bwlimit ? size(t.bwlimit) + "/s" : "none", "num");
    cell(tr, size(t.read), "num");
    cell(tr, size(t.written), "num");
    cell(tr, size(t.zeroed), "num");
    cell(tr, String(t.connections), "num");
    cell(tr, Math.max(0, Math.round(t.expires - doc.monotonic)) + " s", "num");
  });
  const oldConn = new Map((previous ? previous.connections : [])
    .map(c => [c.id, c.bytes_in + c.bytes_out]));
  fill("connections", doc.connections, "no connections", (tr, c) => {
    tr.dataset.connection = c.id;
    cell(tr, "#" + c.id, "num");
    cell(tr, c.service);
    cell(tr, c.peer, "peer");
    cell(tr, c.tickets.join(","));
    cell(tr, String(c.requests), "num");
    cell(tr, size(c.bytes_in), "num");
    cell(tr, size(c.bytes_out), "num");
    cell(tr, rate(c.bytes_in + c.bytes_out, oldConn.get(c.id), dt), "num rate");
    cell(tr, c.seconds.toFixed(0) + " s", "num");
  });
  fill("errors", doc.errors.slice().reverse(), "no errors", (tr, e) => {
    tr.className = "error";
    cell(tr, new Date(e.time * 1000).toLocaleTimeString());
    cell(tr, e.service);
    cell(tr, e.ticket || "");
    cell(tr, String(e.status), "num");
    cell(tr, e.message, "message");
  });
  const limit = doc.limits.global ? size(doc.limits.global) + "/s" : "none";
  document.getElementById("state").textContent = doc.server + " · bandwidth limit " + limit +
    " · updated " + new Date(doc.time * 1000).toLocaleTimeString();
  previous = doc;
}
async function poll() {
  try {
    const resp = await fetch("/status.json", { cache: "no-store" });
    if (!resp.ok) throw new Error("status " + resp.status);
    render(await resp.json());
  } catch (e) {
    document.getElementById("state").textContent = "cannot reach the server: " + e.message;
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"##;
