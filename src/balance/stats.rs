//! Live state of one instance, shared by every snapshot that holds it.
//!
//! [`EndpointStats`] is created the first time a snapshot holds an instance
//! and carried by instance id into every later snapshot, so a rebuild keeps
//! connection counts, the latency estimate, failure counters and ejection
//! state. Everything is an atomic: pickers read it without a lock, proxies
//! write it after each attempt (a connect, or an HTTP response).
//!
//! Times are milliseconds on a process-wide monotonic clock ([`now_ms`]);
//! 0 means "never".

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How fast the latency estimate forgets: after this long without a sample
/// it has decayed to 1/e of its value (linkerd's and tower's peak-EWMA use
/// the same default).
pub const RTT_DECAY: Duration = Duration::from_secs(10);

/// The estimate a new endpoint starts from when its peers know nothing
/// better: high enough that a fresh instance is not flooded before it has
/// answered once, low enough to decay within a minute.
pub const INITIAL_RTT: Duration = Duration::from_millis(10);

/// Milliseconds since the first call in this process, never 0.
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<tokio::time::Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
    origin.elapsed().as_millis() as u64 + 1
}

#[derive(Debug)]
pub struct EndpointStats {
    /// Connections (or, for HTTP, requests) in flight through this endpoint.
    pub active: AtomicU64,
    /// Connections ever opened to it.
    pub total: AtomicU64,
    /// Times a balancer chose it (each connect attempt counts); rendered as
    /// `squire_upstream_picks_total` at each scrape.
    pub picks: AtomicU64,
    /// Failures since the last success; reset when it is ejected.
    pub consecutive_failures: AtomicU64,
    /// Failures ever recorded.
    pub failures: AtomicU64,
    /// Times it was ejected.
    pub ejections: AtomicU64,
    /// Ejections in the current streak: the next one lasts
    /// `base * 2^streak`. Forgiven after a quiet `max` ejection time.
    streak: AtomicU32,
    /// End of the current (or last) ejection, ms; 0 if never ejected.
    ejected_until: AtomicU64,
    /// Peak-EWMA latency estimate in nanoseconds (f64 bits).
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last written, ms.
    rtt_at: AtomicU64,
    /// When it last became routable, ms, for [slow
    /// start](super::slow_start); 0: warm (or never routable).
    routable_since: AtomicU64,
}

impl EndpointStats {
    /// Fresh stats whose latency estimate starts at `initial_rtt` as of `now`.
    pub fn new(initial_rtt: Duration, now: u64) -> Self {
        EndpointStats {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            picks: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            rtt_ns: AtomicU64::new((initial_rtt.as_nanos() as f64).to_bits()),
            rtt_at: AtomicU64::new(now),
            routable_since: AtomicU64::new(0),
        }
    }

    /// Records that it became routable at `now` (0: starts warm); a
    /// snapshot rebuild calls it.
    pub(crate) fn set_routable_since(&self, now: u64) {
        self.routable_since.store(now, Ordering::Relaxed);
    }

    /// Where its slow-start ramp starts, ms: when it last became routable
    /// or its last ejection ended, whichever is later (0: none).
    #[inline]
    pub fn ramp_start(&self) -> u64 {
        let since = self.routable_since.load(Ordering::Relaxed);
        let ejected = self.ejected_until.load(Ordering::Relaxed);
        since.max(ejected)
    }

    /// Counts a pick (the metric and the admin API's counter).
    pub fn picked(&self) {
        self.picks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection (or request) as in flight until the guard drops.
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// A connect (or, for HTTP, a response) succeeded: the failure streak ends.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// A connect failed (or, for HTTP, a 5xx came back). Returns the number
    /// of consecutive failures, which the balancer compares with its
    /// ejection threshold.
    pub fn record_failure(&self) -> u64 {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Feeds one latency sample (connect time; for HTTP, time to headers)
    /// into the peak-EWMA estimate: a slower sample replaces the estimate at
    /// once, a faster one pulls it down in proportion to the time since the
    /// last sample.
    pub fn record_latency(&self, rtt: Duration, now: u64) {
        let sample = rtt.as_nanos() as f64;
        let previous = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let at = self.rtt_at.load(Ordering::Relaxed);
        let next = if sample > previous {
            sample
        } else {
            let decay = decay_factor(now.saturating_sub(at));
            previous * decay + sample * (1.0 - decay)
        };
        // Two racing samples: one wins, both were plausible. Not worth a CAS.
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.rtt_at.store(now, Ordering::Relaxed);
    }

    /// The latency estimate at `now` in nanoseconds: the last value decayed
    /// towards zero for the time without samples, so an idle endpoint is
    /// tried again instead of being judged forever by one slow connect.
    pub fn rtt_estimate(&self, now: u64) -> f64 {
        let value = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let at = self.rtt_at.load(Ordering::Relaxed);
        value * decay_factor(now.saturating_sub(at))
    }

    /// Whether it is ejected at `now`.
    #[inline]
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// End of the current ejection, if it is ejected at `now`.
    pub fn ejected_until(&self, now: u64) -> Option<u64> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    /// Ejects for `base * 2^streak` (at most `max`) and returns how long.
    /// A streak is forgiven when the endpoint stayed in for `max` since its
    /// last ejection ended. The failure count starts over, so an endpoint
    /// coming back needs a fresh run of failures to go out again.
    pub(crate) fn eject(&self, base: Duration, max: Duration, now: u64) -> Duration {
        let last_end = self.ejected_until.load(Ordering::Relaxed);
        let max_ms = max.as_millis() as u64;
        if last_end != 0 && now.saturating_sub(last_end) >= max_ms {
            self.streak.store(0, Ordering::Relaxed);
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed).min(20);
        let duration = base.saturating_mul(1 << streak).min(max);
        self.ejected_until
            .store(now + duration.as_millis() as u64, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        duration
    }
}

fn decay_factor(elapsed_ms: u64) -> f64 {
    if elapsed_ms == 0 {
        return 1.0;
    }
    (-(elapsed_ms as f64) / RTT_DECAY.as_millis() as f64).exp()
}

/// Keeps an endpoint's in-flight count up while it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<EndpointStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> EndpointStats {
        EndpointStats::new(INITIAL_RTT, 1)
    }

    #[test]
    fn a_slower_sample_is_taken_at_once_a_faster_one_gradually() {
        let s = stats();
        s.record_latency(Duration::from_millis(50), 1);
        assert_eq!(s.rtt_estimate(1), 50e6);
        // A fast sample right after barely moves it...
        s.record_latency(Duration::from_millis(1), 2);
        assert!(s.rtt_estimate(2) > 49e6);
        // ...one after a full decay period pulls it most of the way.
        s.record_latency(Duration::from_millis(1), 2 + 10_000);
        let e = s.rtt_estimate(2 + 10_000);
        assert!(e < 20e6 && e > 1e6, "{e}");
    }

    #[test]
    fn the_estimate_decays_while_idle() {
        let s = stats();
        assert_eq!(s.rtt_estimate(1), 10e6);
        let later = s.rtt_estimate(1 + 10_000);
        assert!((later - 10e6 / std::f64::consts::E).abs() < 1e3, "{later}");
    }

    #[test]
    fn ejections_grow_then_are_capped_and_forgiven() {
        let s = stats();
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(5);
        assert_eq!(s.eject(base, max, 100), Duration::from_secs(1));
        assert!(s.is_ejected(1_099) && !s.is_ejected(1_100));
        assert_eq!(s.eject(base, max, 2_000), Duration::from_secs(2));
        assert_eq!(s.eject(base, max, 5_000), Duration::from_secs(4));
        assert_eq!(s.eject(base, max, 10_000), Duration::from_secs(5));
        // In for `max` after the last ejection ended: the streak is forgiven.
        assert_eq!(s.eject(base, max, 20_000), Duration::from_secs(1));
        assert_eq!(s.ejections.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn failures_count_until_a_success() {
        let s = stats();
        assert_eq!(s.record_failure(), 1);
        assert_eq!(s.record_failure(), 2);
        s.record_success();
        assert_eq!(s.record_failure(), 1);
        assert_eq!(s.failures.load(Ordering::Relaxed), 3);
    }
}
