//! What `ferry serve` tells operators about itself: Prometheus metrics (`GET /metrics` on the
//! control listener), the live connections and the recent errors the status page shows.
//!
//! The metrics are `prometheus-client`'s: its registry encodes the OpenMetrics text format,
//! which Prometheus scrapes. Server-wide families are updated where things happen (a request
//! answered, a connection opened, a wait for the bandwidth limit); per-ticket byte counters
//! live in each ticket ([`Traffic`]) and are read at scrape time by a collector, so a removed
//! ticket leaves no label set behind.
//!
//! - `ferry_bytes_total{op}`: bytes read, written and zeroed on backends, all tickets.
//! - `ferry_ticket_bytes_total{ticket,op}`: the same per installed ticket.
//! - `ferry_requests_total{service,method,status}` and
//!   `ferry_request_duration_seconds{service,method}` (until the response head is ready; a
//!   download's body streams after it).
//! - `ferry_connections{service}` (open now) and `ferry_connections_accepted_total{service}`.
//! - `ferry_errors_total{kind}`: failed requests, by backend error kind or HTTP refusal.
//! - `ferry_bwlimit_waits_total` and `ferry_bwlimit_wait_seconds_total`: time transfers spent
//!   held back by bandwidth limits.
//! - `ferry_tickets`: tickets installed.
//! - `ferry_upload_wire_bytes_total{encoding}`: PUT body bytes as they came over the wire, by
//!   `Content-Encoding` (`identity`, `zstd`); with `ferry_bytes_total{op="written"}` it shows
//!   what compression saved.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::conn::ConnCtx;
use crate::store::Ticket;

/// Recent errors the status page lists.
const RECENT_ERRORS: usize = 50;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EncodingLabel {
    encoding: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: &'static str,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    service: &'static str,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TicketOpLabels {
    ticket: String,
    op: &'static str,
}

/// Bytes moved on one ticket's backend (and, through `total`, on all of them).
#[derive(Debug, Default)]
pub struct Traffic {
    read: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
    total: Option<Arc<Metrics>>,
}

impl Traffic {
    pub fn new(total: Arc<Metrics>) -> Traffic {
        Traffic {
            total: Some(total),
            ..Traffic::default()
        }
    }

    pub fn read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = &self.total {
            m.bytes.get_or_create(&OpLabel { op: "read" }).inc_by(n);
        }
    }

    pub fn written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = &self.total {
            m.bytes.get_or_create(&OpLabel { op: "write" }).inc_by(n);
        }
    }

    pub fn zeroed(&self, n: u64) {
        self.zeroed.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = &self.total {
            m.bytes.get_or_create(&OpLabel { op: "zero" }).inc_by(n);
        }
    }

    /// (read, written, zeroed) so far.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.read.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
            self.zeroed.load(Ordering::Relaxed),
        )
    }
}

/// One failed request, as the status page lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentError {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub service: &'static str,
    pub ticket: Option<String>,
    pub status: u16,
    pub message: String,
}

/// The server's metrics and live state for the status page.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    bytes: Family<OpLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    connections: Family<ServiceLabel, Gauge>,
    accepted: Family<ServiceLabel, Counter>,
    errors: Family<KindLabel, Counter>,
    bwlimit_waits: Counter,
    upload_wire: Family<EncodingLabel, Counter>,
    bwlimit_wait_seconds: Counter<f64, AtomicU64>,
    live: Mutex<HashMap<u64, Weak<ConnCtx>>>,
    recent: Mutex<VecDeque<RecentError>>,
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 13 s: from a cached OPTIONS to a large zero or flush.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The tickets of a store, read at each scrape.
struct TicketCollector {
    tickets: Arc<dyn Fn() -> Vec<Arc<Ticket>> + Send + Sync>,
}

impl std::fmt::Debug for TicketCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketCollector")
    }
}

impl Collector for TicketCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tickets = (self.tickets)();
        {
            let mut family = encoder.encode_descriptor(
                "ferry_ticket_bytes",
                "Bytes read, written and zeroed on the backend of each installed ticket",
                None,
                MetricType::Counter,
            )?;
            for t in &tickets {
                let (read, written, zeroed) = t.traffic.snapshot();
                for (op, n) in [("read", read), ("write", written), ("zero", zeroed)] {
                    let labels = TicketOpLabels {
                        ticket: t.id().to_string(),
                        op,
                    };
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let gauge = ConstGauge::new(tickets.len() as i64);
        gauge.encode(encoder.encode_descriptor(
            "ferry_tickets",
            "Tickets installed",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}

impl Metrics {
    /// Metrics of a server whose tickets `tickets` lists at each scrape.
    pub fn new(tickets: impl Fn() -> Vec<Arc<Ticket>> + Send + Sync + 'static) -> Metrics {
        let mut registry = Registry::default();
        let bytes = Family::<OpLabel, Counter>::default();
        registry.register(
            "ferry_bytes",
            "Bytes read, written and zeroed on backends, all tickets",
            bytes.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "ferry_requests",
            "HTTP requests answered, by service, method and status",
            requests.clone(),
        );
        let latency: Family<LatencyLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "ferry_request_duration_seconds",
            "Time from a request's head to its response head",
            latency.clone(),
        );
        let connections = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "ferry_connections",
            "Connections open now, by service",
            connections.clone(),
        );
        let accepted = Family::<ServiceLabel, Counter>::default();
        registry.register(
            "ferry_connections_accepted",
            "Connections accepted, by service",
            accepted.clone(),
        );
        let errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "ferry_errors",
            "Failed requests, by backend error kind or HTTP refusal",
            errors.clone(),
        );
        let bwlimit_waits = Counter::default();
        registry.register(
            "ferry_bwlimit_waits",
            "Times a transfer waited for a bandwidth limit",
            bwlimit_waits.clone(),
        );
        let bwlimit_wait_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "ferry_bwlimit_wait_seconds",
            "Seconds transfers spent waiting for bandwidth limits",
            bwlimit_wait_seconds.clone(),
        );
        let upload_wire = Family::<EncodingLabel, Counter>::default();
        registry.register(
            "ferry_upload_wire_bytes",
            "PUT body bytes as received on the wire, by Content-Encoding",
            upload_wire.clone(),
        );
        registry.register_collector(Box::new(TicketCollector {
            tickets: Arc::new(tickets),
        }));
        Metrics {
            registry,
            bytes,
            requests,
            latency,
            connections,
            accepted,
            errors,
            bwlimit_waits,
            bwlimit_wait_seconds,
            upload_wire,
            live: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// A request answered with `status` after `elapsed`.
    pub fn request(&self, service: &'static str, method: &str, status: u16, elapsed: Duration) {
        // Clients choose the method: anything but the standard ones shares one label, so a
        // client cannot grow the metrics without bound.
        const KNOWN: &[&str] = &["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"];
        let method = if KNOWN.contains(&method) {
            method
        } else {
            "other"
        };
        self.requests
            .get_or_create(&RequestLabels {
                service,
                method: method.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                service,
                method: method.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A failed request: counted by `kind` and kept for the status page.
    pub fn error(
        &self,
        service: &'static str,
        ticket: Option<&str>,
        status: u16,
        kind: &str,
        message: &str,
    ) {
        self.errors
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_ERRORS {
            recent.pop_front();
        }
        recent.push_back(RecentError {
            time,
            service,
            ticket: ticket.map(str::to_string),
            status,
            message: message.to_string(),
        });
    }

    /// A wait of `waited` for a bandwidth limit.
    /// A PUT body took `n` bytes on the wire, sent with `encoding`.
    pub fn upload_wire(&self, encoding: &'static str, n: u64) {
        self.upload_wire
            .get_or_create(&EncodingLabel { encoding })
            .inc_by(n);
    }

    pub fn bwlimit_wait(&self, waited: Duration) {
        self.bwlimit_waits.inc();
        self.bwlimit_wait_seconds.inc_by(waited.as_secs_f64());
    }

    /// A connection opened; it counts as open until [`Metrics::connection_closed`].
    pub fn connection_opened(&self, ctx: &Arc<ConnCtx>) {
        let label = ServiceLabel {
            service: ctx.service,
        };
        self.accepted.get_or_create(&label).inc();
        self.connections.get_or_create(&label).inc();
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctx.id, Arc::downgrade(ctx));
    }

    pub fn connection_closed(&self, ctx: &ConnCtx) {
        let label = ServiceLabel {
            service: ctx.service,
        };
        self.connections.get_or_create(&label).dec();
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ctx.id);
    }

    /// The connections open now, oldest first.
    pub fn live_connections(&self) -> Vec<Arc<ConnCtx>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Arc<ConnCtx>> = live.values().filter_map(Weak::upgrade).collect();
        out.sort_by_key(|c| c.id);
        out
    }

    /// The most recent failed requests, oldest first.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// The metrics of a server that serves no tickets yet (tests, a store used alone).
impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Vec::new)
    }
}

/// Counts a wait for a bandwidth limit that began at `since`, if it held the transfer back at
/// all (an unlimited flow returns at once).
pub fn count_wait(metrics: &Metrics, since: std::time::Instant) {
    let waited = since.elapsed();
    if waited >= Duration::from_micros(500) {
        metrics.bwlimit_wait(waited);
    }
}
