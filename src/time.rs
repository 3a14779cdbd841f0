//! Waiting and pacing, on `tokio::time` so tests can pause the clock.
//!
//! - [`sleep_or_shutdown`] and [`sleep_until_some`]: the sleeps of the retry
//!   and refresh loops (registration, discovery, health), never deaf to
//!   shutdown.
//! - [`TokenBucket`]: the one rate limit, for registration's status writes
//!   (asked when a token is due, so the loop can `select!` on it) and the
//!   Consul watch's queries (which wait for one).
//! - [`LogThrottle`]: the one log rate limit, for faults that repeat by the
//!   thousand (accept errors, squire out of descriptors, denied admin
//!   requests).
//! - [`rfc3339`]: how the admin API prints a wall-clock time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Sleeps for `delay`; true if shutdown came first.
pub async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
pub async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Serializes an optional wall-clock time as RFC 3339 with milliseconds
/// (`serialize_with`), or `null`.
pub fn rfc3339<S: serde::Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(t) => s.collect_str(&humantime::format_rfc3339_millis(*t)),
        None => s.serialize_none(),
    }
}

/// At most one log line per `interval` for one kind of event, with how many
/// were not logged in between: a fault that repeats by the thousand (out of
/// file descriptors, a client retrying a wrong admin token) is still seen,
/// but does not flood the log. Lock-free, so it can be a `static` that every
/// task shares.
#[derive(Debug)]
pub struct LogThrottle {
    interval_ms: u64,
    /// When a line was last logged, ms on [`crate::balance::now_ms`]'s clock
    /// (never 0); 0 until the first.
    logged_at: AtomicU64,
    unlogged: AtomicU64,
}

impl LogThrottle {
    pub const fn new(interval: Duration) -> Self {
        LogThrottle {
            interval_ms: interval.as_millis() as u64,
            logged_at: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log this one now; `n` were not logged since the last line.
    /// `None`: stay quiet; this one is counted into the next line's `n`.
    pub fn due(&self) -> Option<u64> {
        let now = crate::balance::now_ms();
        let at = self.logged_at.load(Ordering::Relaxed);
        let due = at == 0 || now.saturating_sub(at) >= self.interval_ms;
        if due
            && self
                .logged_at
                .compare_exchange(at, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.unlogged.swap(0, Ordering::Relaxed))
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A token bucket: `burst` tokens at once, then one more every `refill`.
///
/// The refill clock starts when the first token of a full bucket is taken,
/// so a take after a quiet spell always goes through at once.
#[derive(Debug)]
pub struct TokenBucket {
    burst: u32,
    refill: Duration,
    tokens: u32,
    /// When the next token is added (meaningful while below `burst`).
    next: Instant,
}

impl TokenBucket {
    pub fn new(burst: u32, refill: Duration) -> Self {
        TokenBucket {
            burst,
            refill,
            tokens: burst,
            next: Instant::now() + refill,
        }
    }

    fn top_up(&mut self) {
        let now = Instant::now();
        while self.tokens < self.burst && self.next <= now {
            self.tokens += 1;
            self.next += self.refill;
        }
        if self.tokens == self.burst {
            self.next = now + self.refill;
        }
    }

    /// When a token is (or will be) available: now, or the instant the next
    /// one is added.
    pub fn ready_at(&mut self) -> Instant {
        self.top_up();
        if self.tokens > 0 {
            Instant::now()
        } else {
            self.next
        }
    }

    /// Takes a token. Meant for once [`ready_at`](Self::ready_at) has come;
    /// on an empty bucket it takes nothing.
    pub fn take(&mut self) {
        self.top_up();
        self.tokens = self.tokens.saturating_sub(1);
    }

    /// Waits until a token is available and takes it.
    pub async fn acquire(&mut self) {
        loop {
            let at = self.ready_at();
            if at <= Instant::now() {
                self.take();
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_log_throttle_lets_one_line_through_per_interval_with_a_count() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(throttle.due(), Some(0), "the first is logged");
        for _ in 0..5 {
            assert_eq!(throttle.due(), None);
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(throttle.due(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(throttle.due(), Some(6), "with the six not logged");
        assert_eq!(throttle.due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_one_per_refill() {
        let mut bucket = TokenBucket::new(3, Duration::from_secs(1));
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(bucket.ready_at(), start);
            bucket.take();
        }
        assert_eq!(bucket.ready_at(), start + Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(bucket.ready_at() <= Instant::now());
        bucket.take();
        assert_eq!(bucket.ready_at(), start + Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..3 {
            assert!(bucket.ready_at() <= Instant::now());
            bucket.take();
        }
        assert!(
            bucket.ready_at() > Instant::now(),
            "never more than the burst"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_the_next_token() {
        let mut bucket = TokenBucket::new(2, Duration::from_secs(1));
        let start = Instant::now();
        bucket.acquire().await;
        bucket.acquire().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        bucket.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        bucket.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let later = Instant::now();
        bucket.acquire().await;
        bucket.acquire().await;
        assert_eq!(later.elapsed(), Duration::ZERO, "refilled to the burst");
        bucket.acquire().await;
        assert_eq!(later.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_end_at_shutdown_or_never() {
        let shutdown = CancellationToken::new();
        assert!(!sleep_or_shutdown(Duration::from_secs(5), &shutdown).await);
        shutdown.cancel();
        assert!(sleep_or_shutdown(Duration::from_secs(3600), &shutdown).await);
        let start = Instant::now();
        sleep_until_some(Some(start + Duration::from_secs(2))).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        let never = tokio::time::timeout(Duration::from_secs(3600), sleep_until_some(None));
        assert!(never.await.is_err(), "None waits forever");
    }
}
