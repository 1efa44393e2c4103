//! Progress of a copy, counted when work *completes* (a write or zero acknowledged, a zero run
//! skipped), never when it is dispatched. Reporters render it as a terminal bar with bytes, rate
//! and ETA, as nbdcopy's `N/100` lines on a file descriptor, or as JSON lines.
//!
//! A copy goes through phases — `copy`, `flush` (the final destination flush), `verify`, then
//! `done` — and the time spent in each is kept for the final summary (`--stats-json`).
//!
//! The JSON line, one a second and a last one when the copy succeeded (keys in this order;
//! the first three never change meaning):
//!
//! ```json
//! {"transferred":1048576,"size":4194304,"elapsed":0.512,"phase":"copy","percent":25,
//!  "rate":2048000.0,"eta":1.536,"retries":0}
//! ```
//!
//! `size` and `eta` are null while unknown; `rate` is the average in bytes per second since the
//! start; `retries` counts requests sent again after a retryable failure.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a copy is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Copy,
    Flush,
    Verify,
    Done,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Copy => "copy",
            Phase::Flush => "flush",
            Phase::Verify => "verify",
            Phase::Done => "done",
        }
    }
}

/// Shared counters; the engine adds, reporters read.
#[derive(Debug)]
pub struct Progress {
    done: AtomicU64,
    /// Total bytes, once known (0 until then for streams).
    size: AtomicU64,
    started: Instant,
    /// Phases entered so far and when, oldest first.
    phases: Mutex<Vec<(Phase, Instant)>>,
    /// The process's retry count when the copy started.
    retries_before: u64,
}

impl Progress {
    pub fn new(size: Option<u64>) -> Self {
        let started = Instant::now();
        Progress {
            done: AtomicU64::new(0),
            size: AtomicU64::new(size.unwrap_or(0)),
            started,
            phases: Mutex::new(vec![(Phase::Copy, started)]),
            retries_before: disk::retry::retries_total(),
        }
    }

    /// Enters `phase` (the previous one ends now).
    pub fn set_phase(&self, phase: Phase) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        if phases.last().is_none_or(|(p, _)| *p != phase) {
            phases.push((phase, Instant::now()));
        }
    }

    pub fn phase(&self) -> Phase {
        let phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        phases.last().map_or(Phase::Copy, |(p, _)| *p)
    }

    /// Time spent in `phase` so far (zero if never entered).
    pub fn phase_time(&self, phase: Phase) -> Duration {
        let phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut total = Duration::ZERO;
        for (i, (p, at)) in phases.iter().enumerate() {
            if *p == phase {
                let end = phases.get(i + 1).map_or(now, |(_, next)| *next);
                total += end.saturating_duration_since(*at);
            }
        }
        total
    }

    /// Requests sent again since the copy started.
    pub fn retries(&self) -> u64 {
        disk::retry::retries_total().saturating_sub(self.retries_before)
    }

    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> Option<u64> {
        match self.size.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whole percent done, 0–100 (0 while the size is unknown).
    pub fn percent(&self) -> u64 {
        match self.size() {
            Some(size) => (self.done().min(size) as u128 * 100 / size as u128) as u64,
            None => 0,
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A bar with bytes, rate and ETA on stderr, redrawn in place.
    Bar,
    /// `N/100` lines, as nbdcopy's `--progress=FD`.
    Percent,
    /// JSON lines `{"transferred":…,"size":…,"elapsed":…,"phase":…,…}` (see the module doc).
    Json,
}

/// Renders one report line for `style` (without the trailing newline or carriage return).
pub fn render(p: &Progress, style: Style, final_line: bool) -> String {
    let done = p.done();
    let elapsed = p.elapsed().as_secs_f64();
    match style {
        Style::Percent => format!("{}/100", if final_line { 100 } else { p.percent() }),
        Style::Json => {
            let rate = if elapsed > 0.0 {
                done as f64 / elapsed
            } else {
                0.0
            };
            let eta = match p.size() {
                _ if final_line => "0".to_string(),
                Some(size) if rate > 0.0 && p.phase() == Phase::Copy => {
                    format!("{:.3}", size.saturating_sub(done) as f64 / rate)
                }
                _ => "null".to_string(),
            };
            format!(
                "{{\"transferred\":{done},\"size\":{},\"elapsed\":{elapsed:.3},\"phase\":\"{}\",\
                 \"percent\":{},\"rate\":{rate:.1},\"eta\":{eta},\"retries\":{}}}",
                p.size().map_or("null".to_string(), |s| s.to_string()),
                p.phase().name(),
                if final_line { 100 } else { p.percent() },
                p.retries(),
            )
        }
        Style::Bar => {
            const CELLS: u64 = 30;
            let pct = if final_line { 100 } else { p.percent() };
            let filled = (pct * CELLS / 100) as usize;
            let rate = if elapsed > 0.0 {
                done as f64 / elapsed
            } else {
                0.0
            };
            let eta = match p.size() {
                Some(size) if rate > 0.0 && !final_line => {
                    let secs = (size.saturating_sub(done) as f64 / rate) as u64;
                    format!(" ETA {}:{:02}", secs / 60, secs % 60)
                }
                _ => String::new(),
            };
            let total = p
                .size()
                .map_or(String::new(), |s| format!(" / {}", units::size(s)));
            format!(
                "{pct:>3}% [{}{}] {}{total} {}{eta}",
                "#".repeat(filled),
                "-".repeat(CELLS as usize - filled),
                units::size(done),
                units::rate(done, elapsed),
            )
        }
    }
}

/// Writes reports to `out` until `stop` resolves, then a final 100 % report when `finished`.
pub async fn report<W: Write + Send>(
    progress: &Progress,
    style: Style,
    mut out: W,
    stop: impl std::future::Future<Output = bool>,
) {
    let interval = match style {
        Style::Bar => Duration::from_millis(200),
        Style::Percent => Duration::from_millis(100),
        Style::Json => Duration::from_secs(1),
    };
    let end = match style {
        Style::Bar => "\r",
        _ => "\n",
    };
    let mut last = String::new();
    let _ = write!(out, "{}{end}", render(progress, style, false));
    let _ = out.flush();
    tokio::pin!(stop);
    let finished = loop {
        tokio::select! {
            finished = &mut stop => break finished,
            _ = tokio::time::sleep(interval) => {
                let line = render(progress, style, false);
                // Percent lines only when the number changes, like nbdcopy.
                if style != Style::Percent || line != last {
                    let _ = write!(out, "{line}{end}");
                    let _ = out.flush();
                    last = line;
                }
            }
        }
    };
    if finished {
        let _ = writeln!(out, "{}", render(progress, style, true));
    } else if style == Style::Bar {
        let _ = writeln!(out);
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_style() {
        let p = Progress::new(Some(1000));
        p.add(250);
        assert_eq!(p.percent(), 25);
        assert_eq!(render(&p, Style::Percent, false), "25/100");
        assert_eq!(render(&p, Style::Percent, true), "100/100");
        let json = render(&p, Style::Json, false);
        assert!(
            json.starts_with("{\"transferred\":250,\"size\":1000,\"elapsed\":"),
            "{json}"
        );
        let bar = render(&p, Style::Bar, false);
        assert!(bar.starts_with(" 25% [#######-"), "{bar}");
        assert!(bar.contains("250 B / 1000 B"), "{bar}");
        // One unit of rate, whatever follows it.
        assert!(!bar.contains("/s/s"), "{bar}");
        let done = Progress::new(Some(1 << 20));
        done.add(1 << 20);
        let last = render(&done, Style::Bar, true);
        assert!(last.ends_with("/s") || last.ends_with(" -"), "{last}");
        assert!(!last.contains("/s/s"), "{last}");
        let unknown = Progress::new(None);
        assert!(render(&unknown, Style::Json, false).contains("\"size\":null"));
    }

    #[test]
    fn json_lines_carry_phase_rate_eta_and_retries() {
        let p = Progress::new(Some(1000));
        p.add(500);
        std::thread::sleep(Duration::from_millis(20));
        let v: serde_json::Value = serde_json::from_str(&render(&p, Style::Json, false)).unwrap();
        assert_eq!(v["transferred"], 500);
        assert_eq!(v["size"], 1000);
        assert_eq!(v["phase"], "copy");
        assert_eq!(v["percent"], 50);
        assert_eq!(v["retries"], 0);
        let rate = v["rate"].as_f64().unwrap();
        assert!(rate > 0.0 && rate < 500.0 / 0.019, "{v}");
        let eta = v["eta"].as_f64().unwrap();
        assert!((eta - 500.0 / rate).abs() < 0.01, "{v}");
        p.set_phase(Phase::Verify);
        let v: serde_json::Value = serde_json::from_str(&render(&p, Style::Json, false)).unwrap();
        assert_eq!(v["phase"], "verify");
        assert!(v["eta"].is_null(), "{v}");
        p.set_phase(Phase::Done);
        let v: serde_json::Value = serde_json::from_str(&render(&p, Style::Json, true)).unwrap();
        assert_eq!(
            (v["phase"].as_str(), v["percent"].as_u64()),
            (Some("done"), Some(100))
        );
        assert!(p.phase_time(Phase::Copy) >= Duration::from_millis(20));
        assert_eq!(p.phase_time(Phase::Flush), Duration::ZERO);
    }
}
