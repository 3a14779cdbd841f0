//! Passive failure handling: endpoints that keep failing are taken out
//! locally, before the registry notices anything.
//!
//! After `consecutive_failures` failed attempts in a row (a failed connect;
//! for HTTP also a failed exchange or a 5xx answer) an endpoint is ejected for `base_time`, doubled for
//! each further ejection in a streak, at most `max_time`; the streak is
//! forgiven once the endpoint has stayed in for `max_time`. At most
//! `max_share` of an upstream's routable endpoints are ejected at once, so a
//! network blip on our side cannot empty a pool. The ejection is a
//! timestamp in the endpoint's stats, so it takes effect on the very next
//! pick, and it survives snapshot rebuilds like every other stat.
//!
//! Counting how many endpoints are ejected right now means looking at every
//! one, which a pick must not do at 1,000 endpoints. A `Census` caches the
//! count per snapshot until the next ejection anywhere in the upstream (a
//! generation number) or the next ejection end, whichever comes first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Endpoint;

/// When to eject, for how long, and how many at most.
#[derive(Debug, Clone, PartialEq)]
pub struct EjectionPolicy {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further one in a streak doubles it.
    pub base_time: Duration,
    /// The longest ejection, and the quiet time that forgives a streak.
    pub max_time: Duration,
    /// The largest share (0.0-1.0) of routable endpoints ejected at once.
    pub max_share: f64,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        EjectionPolicy {
            consecutive_failures: 3,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(300),
            max_share: 0.5,
        }
    }
}

impl EjectionPolicy {
    pub fn enabled(&self) -> bool {
        self.consecutive_failures > 0 && self.max_share > 0.0
    }

    /// How many of `eligible` endpoints may be ejected at once.
    pub fn cap(&self, eligible: usize) -> usize {
        (self.max_share * eligible as f64 + 1e-9).floor() as usize
    }
}

/// How many of a snapshot's eligible routable endpoints are ejected now,
/// cached until it can have changed.
#[derive(Debug, Default)]
pub(crate) struct Census {
    /// `generation << 32 | count`.
    packed: AtomicU64,
    /// The count is stale from this time on (the earliest ejection end).
    valid_until: AtomicU64,
}

impl Census {
    /// Ejected endpoints among `members` at `now`. `generation` is the
    /// upstream's ejection counter (never 0): when it moved, or an ejection
    /// ended, the count is taken again. Returns the count and whether it
    /// was taken again (so the caller can update the gauge).
    pub fn ejected(
        &self,
        endpoints: &[Endpoint],
        members: &[u32],
        generation: u32,
        now: u64,
    ) -> (u32, bool) {
        let packed = self.packed.load(Ordering::Acquire);
        if (packed >> 32) as u32 == generation && now < self.valid_until.load(Ordering::Relaxed) {
            return (packed as u32, false);
        }
        let mut count = 0u32;
        let mut earliest_end = u64::MAX;
        for &i in members {
            if let Some(until) = endpoints[i as usize].stats.ejected_until(now) {
                count += 1;
                earliest_end = earliest_end.min(until);
            }
        }
        // Two pickers may count at once; both counts are right for their
        // moment, and the last writer wins. Written before `packed` so that
        // a reader that sees the new count sees its deadline too.
        self.valid_until.store(earliest_end, Ordering::Relaxed);
        self.packed.store(
            u64::from(generation) << 32 | u64::from(count),
            Ordering::Release,
        );
        (count, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_rounds_down() {
        let policy = EjectionPolicy::default();
        assert_eq!(policy.cap(1), 0);
        assert_eq!(policy.cap(2), 1);
        assert_eq!(policy.cap(5), 2);
        assert_eq!(policy.cap(10), 5);
        let all = EjectionPolicy {
            max_share: 1.0,
            ..policy
        };
        assert_eq!(all.cap(3), 3);
    }
}
