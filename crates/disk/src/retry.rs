//! The retry rule every endpoint applies to its requests: which failures go again (decided by
//! [`ErrorKind::is_retryable`](crate::ErrorKind::is_retryable) alone), how often ([`RetryPolicy::attempts`]), for how long
//! ([`RetryPolicy::timeout`]), and how far apart (exponential backoff with jitter).
//!
//! Endpoints own their retries because only they know what sending again means (an HTTP run
//! keeps its pieces; an NBD request is resent on a new connection); the rule is this one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::endpoint::DiskError;

/// How persistently a request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub attempts: u32,
    /// No retry starts later than this after the request first failed.
    pub timeout: Duration,
}

/// The first backoff; each next one doubles, up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(30);

impl Default for RetryPolicy {
    /// Ten retries within five minutes: the waits (0.1 s doubling to 30 s) add up to about
    /// 80 s, enough for a server restart or a network blip during a long migration, short
    /// enough that a dead peer is reported while someone still watches.
    fn default() -> Self {
        RetryPolicy {
            attempts: 10,
            timeout: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub const NONE: RetryPolicy = RetryPolicy {
        attempts: 0,
        timeout: Duration::ZERO,
    };

    /// The wait before retry `n` (1-based), without jitter.
    pub fn delay(n: u32) -> Duration {
        FIRST_DELAY
            .saturating_mul(1u32 << n.saturating_sub(1).min(20))
            .min(MAX_DELAY)
    }
}

/// Retries made by every request of this process so far. Progress reports and copy summaries
/// show it; one process-wide count needs no plumbing through each endpoint's constructor.
static RETRIES: AtomicU64 = AtomicU64::new(0);

/// Retries made so far in this process, by all endpoints.
pub fn retries_total() -> u64 {
    RETRIES.load(Ordering::Relaxed)
}

/// The retry state of one request.
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    attempt: u32,
    first_failure: Option<Instant>,
}

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Backoff {
        Backoff {
            policy,
            attempt: 0,
            first_failure: None,
        }
    }

    /// After a failed attempt: true (having logged it and waited) when the request may go
    /// again; false when it must not (its kind, the attempts or the time are used up).
    pub async fn again(&mut self, err: &DiskError) -> bool {
        if !err.is_retryable() || self.attempt >= self.policy.attempts {
            return false;
        }
        let started = *self.first_failure.get_or_insert_with(Instant::now);
        let left = self.policy.timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return false;
        }
        self.attempt += 1;
        RETRIES.fetch_add(1, Ordering::Relaxed);
        let base = RetryPolicy::delay(self.attempt);
        let wait = (base + jitter(base / 2)).min(left);
        tracing::warn!(
            "{err}; retrying ({} of {}) in {:.1} s",
            self.attempt,
            self.policy.attempts,
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
        true
    }

    /// The error to report once retries are over: the last one, saying how many attempts
    /// were made when there was more than one.
    pub fn give_up(&self, mut err: DiskError) -> DiskError {
        if self.attempt > 0 {
            err.cause = format!("{} (after {} attempts)", err.cause, self.attempt + 1);
        }
        err
    }

    /// Retries made so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// A pseudo-random duration below `max`, so clients that broke together do not retry together.
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let max = max.as_nanos().max(1) as u64;
    Duration::from_nanos(nanos % max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{ErrorKind, Op};

    fn err(kind: ErrorKind) -> DiskError {
        DiskError::new("x", Op::Write, kind, "failed").at(0, 1)
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        assert_eq!(RetryPolicy::delay(1), Duration::from_millis(100));
        assert_eq!(RetryPolicy::delay(2), Duration::from_millis(200));
        assert_eq!(RetryPolicy::delay(4), Duration::from_millis(800));
        assert_eq!(RetryPolicy::delay(12), MAX_DELAY);
        assert_eq!(RetryPolicy::delay(40), MAX_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_attempt_limit_and_say_how_many_were_made() {
        let mut b = Backoff::new(RetryPolicy {
            attempts: 2,
            timeout: Duration::from_secs(60),
        });
        let e = err(ErrorKind::ConnectionLost);
        assert!(b.again(&e).await);
        assert!(b.again(&e).await);
        assert!(!b.again(&e).await);
        let last = b.give_up(e);
        assert!(
            last.to_string().ends_with("failed (after 3 attempts)"),
            "{last}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn final_kinds_are_never_retried_and_the_deadline_ends_retries() {
        let mut b = Backoff::new(RetryPolicy::default());
        for kind in [
            ErrorKind::NoSpace,
            ErrorKind::ReadOnly,
            ErrorKind::InvalidRequest,
        ] {
            assert!(!b.again(&err(kind)).await, "{kind}");
        }
        assert_eq!(b.give_up(err(ErrorKind::NoSpace)).cause, "failed");
        let mut b = Backoff::new(RetryPolicy {
            attempts: 100,
            timeout: Duration::from_secs(1),
        });
        let e = err(ErrorKind::Timeout);
        let mut n = 0;
        while b.again(&e).await {
            n += 1;
        }
        assert!((1..10).contains(&n), "{n} retries within 1 s");
    }
}
