//! Progress of a copy, counted when work *completes* (a write or zero acknowledged, a zero run
//! skipped), never when it is dispatched. Reporters render it as a terminal bar with bytes, rate
//! and ETA, as nbdcopy's `N/100` lines on a file descriptor, or as JSON lines.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shared counters; the engine adds, reporters read.
#[derive(Debug)]
pub struct Progress {
    done: AtomicU64,
    /// Total bytes, once known (0 until then for streams).
    size: AtomicU64,
    started: Instant,
}

impl Progress {
    pub fn new(size: Option<u64>) -> Self {
        Progress {
            done: AtomicU64::new(0),
            size: AtomicU64::new(size.unwrap_or(0)),
            started: Instant::now(),
        }
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
    /// JSON lines `{"transferred":…,"size":…,"elapsed":…}`.
    Json,
}

/// Renders one report line for `style` (without the trailing newline or carriage return).
pub fn render(p: &Progress, style: Style, final_line: bool) -> String {
    let done = p.done();
    let elapsed = p.elapsed().as_secs_f64();
    match style {
        Style::Percent => format!("{}/100", if final_line { 100 } else { p.percent() }),
        Style::Json => format!(
            "{{\"transferred\":{done},\"size\":{},\"elapsed\":{elapsed:.3}}}",
            p.size().map_or("null".to_string(), |s| s.to_string())
        ),
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
}
