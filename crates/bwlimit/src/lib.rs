//! Bandwidth limits in bytes per second: [`Limiter`] is one token bucket whose rate can change
//! while transfers wait on it; [`Flow`] is one transfer's way through a per-transfer limiter
//! and a shared (global) one, so concurrent transfers get equal shares of the global rate.
//!
//! Fair share: a flow takes its bytes in quanta of [`QUANTUM`] bytes, and every quantum waits
//! in the bucket's FIFO queue (a fair `tokio::sync::Mutex`). One flow holds at most one place
//! in the global queue at a time (its own lock serializes its connections), so transfers are
//! served round-robin, one quantum each, whatever the number of connections or the request
//! sizes they use: a greedy client with many connections cannot starve the others.
//!
//! Written here rather than taken from `governor`: its limiters take at most `u32` cells per
//! call and no more than their burst, cannot change their rate once built, and have no fair
//! queue between waiters; the three are what this crate is for.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

/// Bytes a waiter takes from a bucket per turn: small enough that transfers interleave finely,
/// large enough that a fast limit costs few turns (16 thousand a second at 1 GiB/s).
pub const QUANTUM: u64 = 64 << 10;

/// The most a bucket saves up while idle, in seconds of its rate: a transfer that starts or
/// resumes gets at most this much ahead of the rate.
const BURST: f64 = 0.05;

/// The shortest sleep for tokens: what arrives meanwhile is saved (up to [`BURST`]).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// One token bucket: `rate` bytes per second (0: unlimited).
#[derive(Debug)]
pub struct Limiter {
    rate: AtomicU64,
    /// Woken when the rate changes, so a waiter sleeping on the old rate recomputes.
    changed: Notify,
    /// Fair (FIFO) lock: the waiter holding it is the next to be served.
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Limiter {
    /// A limiter of `rate` bytes per second; 0 means unlimited.
    pub fn new(rate: u64) -> Arc<Limiter> {
        Arc::new(Limiter {
            rate: AtomicU64::new(rate),
            changed: Notify::new(),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            }),
        })
    }

    /// The rate in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the rate; transfers waiting now move at the new one.
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Waits until `n` bytes may move. Cancel-safe: a dropped wait takes nothing.
    pub async fn acquire(&self, n: u64) {
        let mut left = n;
        while left > 0 && self.rate() > 0 {
            let q = left.min(QUANTUM);
            self.take(q).await;
            left -= q;
        }
    }

    /// Waits its turn, then until the bucket holds `q` (at most [`QUANTUM`]) bytes.
    async fn take(&self, q: u64) {
        let mut bucket = self.bucket.lock().await;
        loop {
            // Registered before the rate is read, so a change in between still wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let rate = self.rate();
            if rate == 0 {
                return;
            }
            let rate = rate as f64;
            let now = Instant::now();
            let cap = (rate * BURST).max(QUANTUM as f64);
            let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * rate).min(cap);
            bucket.last = now;
            let need = q as f64;
            if bucket.tokens >= need {
                bucket.tokens -= need;
                return;
            }
            // Timers tick in milliseconds: a shorter sleep could wake with no time passed.
            let wait = Duration::from_secs_f64((need - bucket.tokens) / rate).max(MIN_WAIT);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut changed => {}
            }
        }
    }
}

/// One transfer's limits: its own limiter (if any), then the shared one (if any). Clones share
/// the flow's place in the queue: connections of one transfer take turns among themselves.
#[derive(Debug, Clone)]
pub struct Flow(Arc<FlowInner>);

#[derive(Debug)]
struct FlowInner {
    own: Option<Arc<Limiter>>,
    shared: Option<Arc<Limiter>>,
    /// Held while the flow waits on either bucket: one place in the shared queue per flow.
    turn: Mutex<()>,
}

impl Flow {
    /// A flow limited by `own` (this transfer only) and `shared` (every flow holding it).
    pub fn new(own: Option<Arc<Limiter>>, shared: Option<Arc<Limiter>>) -> Flow {
        Flow(Arc::new(FlowInner {
            own,
            shared,
            turn: Mutex::new(()),
        }))
    }

    /// A flow that never waits.
    pub fn unlimited() -> Flow {
        Flow::new(None, None)
    }

    /// The flow's own limiter, if it has one.
    pub fn own(&self) -> Option<&Arc<Limiter>> {
        self.0.own.as_ref()
    }

    fn limited(&self) -> bool {
        let on = |l: &Option<Arc<Limiter>>| l.as_ref().is_some_and(|l| l.rate() > 0);
        on(&self.0.own) || on(&self.0.shared)
    }

    /// Waits until `n` bytes of this transfer may move. Cancel-safe.
    pub async fn acquire(&self, n: u64) {
        if n == 0 || !self.limited() {
            return;
        }
        let _turn = self.0.turn.lock().await;
        let mut left = n;
        while left > 0 && self.limited() {
            let q = left.min(QUANTUM);
            // The flow's own limit first: waiting on it never holds a place in the shared
            // queue that others could use.
            if let Some(own) = &self.0.own {
                own.acquire(q).await;
            }
            if let Some(shared) = &self.0.shared {
                shared.acquire(q).await;
            }
            left -= q;
        }
    }
}

/// A rate as people write it: a size per second (`100M`, `1G`, `512k`, bytes without a
/// suffix), or `0`, `off` or `none` for unlimited.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if ["off", "none", "unlimited"]
        .iter()
        .any(|w| t.eq_ignore_ascii_case(w))
    {
        return Ok(0);
    }
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("/S"))
        .unwrap_or(t);
    units::parse_size(t).map_err(|e| format!("expecting bytes per second like 100M or 1G: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes moved by `flow` in `secs` of (paused, auto-advancing) time, `request` at a time.
    async fn run_for(flow: Flow, request: u64, secs: u64) -> u64 {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut moved = 0;
        while Instant::now() < end {
            flow.acquire(request).await;
            // A request granted after the end (queued behind others) does not count.
            if Instant::now() <= end {
                moved += request;
            }
        }
        moved
    }

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_for_large_and_small_requests() {
        for request in [4096, 256 << 10, 8 << 20] {
            let limiter = Limiter::new(10 << 20);
            let moved = run_for(Flow::new(Some(limiter), None), request, 10).await;
            let rate = moved as f64 / 10.0;
            let want = (10 << 20) as f64;
            assert!(
                (rate - want).abs() / want < 0.02 + request as f64 / (10 * (10 << 20)) as f64,
                "request {request}: {rate} B/s, want {want}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_change_applies_to_waiters() {
        let limiter = Limiter::new(1 << 20);
        let flow = Flow::new(Some(limiter.clone()), None);
        let t0 = Instant::now();
        // A 64 MiB request at 1 MiB/s would take a minute; raised at once, it takes ~1 s.
        let waiter = tokio::spawn(async move { flow.acquire(64 << 20).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        limiter.set_rate(64 << 20);
        waiter.await.unwrap();
        let took = t0.elapsed().as_secs_f64();
        assert!((0.9..1.3).contains(&took), "took {took} s");
        // Unlimited: returns at once.
        limiter.set_rate(0);
        let t1 = Instant::now();
        Flow::new(Some(limiter), None).acquire(1 << 40).await;
        assert_eq!(t1.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn flows_share_a_global_limit_equally_whatever_their_connections() {
        let global = Limiter::new(20 << 20);
        let greedy = Flow::new(None, Some(global.clone()));
        let modest = Flow::new(None, Some(global.clone()));
        // The greedy transfer has 8 connections with 8 MiB requests; the other one, 1 with 64 KiB.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            tasks.push(tokio::spawn(run_for(greedy.clone(), 8 << 20, 10)));
        }
        let small = tokio::spawn(run_for(modest, 64 << 10, 10));
        let mut big = 0;
        for t in tasks {
            big += t.await.unwrap();
        }
        let small = small.await.unwrap();
        let ratio = big as f64 / small as f64;
        assert!(
            (0.85..1.15).contains(&ratio),
            "greedy {big}, modest {small}"
        );
        let total = (big + small) as f64 / 10.0;
        assert!(total < 1.05 * (20 << 20) as f64, "total {total} B/s");
    }

    #[tokio::test(start_paused = true)]
    async fn own_and_global_limits_both_hold() {
        let global = Limiter::new(30 << 20);
        let slow = Flow::new(Some(Limiter::new(5 << 20)), Some(global.clone()));
        let fast = Flow::new(None, Some(global));
        let (a, b) = tokio::join!(run_for(slow, 1 << 20, 10), run_for(fast, 1 << 20, 10));
        let (a, b) = (a as f64 / 10.0, b as f64 / 10.0);
        assert!(
            (a - (5 << 20) as f64).abs() < 0.1 * (5 << 20) as f64,
            "slow {a}"
        );
        // What the slow flow does not use goes to the other one.
        assert!(
            (b - (25 << 20) as f64).abs() < 0.1 * (25 << 20) as f64,
            "fast {b}"
        );
    }

    #[test]
    fn rates_parse_like_sizes() {
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert_eq!(parse_rate("1G/s"), Ok(1 << 30));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert_eq!(parse_rate("off"), Ok(0));
        assert_eq!(parse_rate(" 0 "), Ok(0));
        assert!(parse_rate("fast").unwrap_err().contains("100M"));
    }
}
