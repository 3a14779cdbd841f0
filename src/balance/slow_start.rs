//! Slow start: an instance that just became routable (it joined, turned
//! healthy, or came back from an ejection) takes a share of new traffic
//! that ramps linearly from `min` of its weight to all of it over
//! `duration`, so a game server back from a deploy is not flooded with
//! every player that was waiting.
//!
//! The ramp's start is recorded in the instance's
//! [`EndpointStats`](super::EndpointStats) when a snapshot rebuild finds it
//! routable and the previous snapshot did not (a snapshot after an empty
//! one, the first of all included, starts everyone warm: there is no one
//! else to take the traffic), or is the
//! end of its last ejection, whichever is later. The factor is computed at
//! pick time from [`Context::now`](super::Context::now): no rebuild is
//! needed while the ramp runs.
//!
//! How each strategy honours it:
//! - `least_connections` and `response_time` already divide by the weight
//!   per pick: they use the ramped weight.
//! - every other strategy (`round_robin`, `random`, `weighted_round_robin`,
//!   `consistent_hash`, `ip_hash`) admits a pick of a warming endpoint with
//!   probability equal to its factor and otherwise picks again without it
//!   (see [`Balancer::pick`](super::Balancer::pick)), so its share is its
//!   normal share times the factor. With a key the admission is decided by
//!   the key's hash, not at random: the keys that go to the new instance
//!   are the same on every pick and only grow as the ramp goes on.

use std::time::Duration;

/// The ramp of one upstream; off when `duration` is zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    /// How long the ramp lasts (zero: off, the default).
    pub duration: Duration,
    /// The share of its weight an endpoint starts with (0-1, default 0.1).
    pub min: f64,
}

impl Default for SlowStart {
    fn default() -> Self {
        SlowStart {
            duration: Duration::ZERO,
            min: 0.1,
        }
    }
}

impl SlowStart {
    #[inline]
    pub fn enabled(&self) -> bool {
        !self.duration.is_zero()
    }

    /// The share (`min`..=1) of its weight an endpoint whose ramp started
    /// at `since` (ms on [`now_ms`](super::now_ms)'s clock; 0: none) gets
    /// at `now`.
    #[inline]
    pub fn factor(&self, since: u64, now: u64) -> f64 {
        if since == 0 || !self.enabled() {
            return 1.0;
        }
        let elapsed = now.saturating_sub(since) as f64;
        let total = self.duration.as_millis() as f64;
        if elapsed >= total {
            return 1.0;
        }
        self.min + (1.0 - self.min) * elapsed / total
    }
}

/// The factor as a fixed-point weight multiplier out of [`SCALE`], for the
/// strategies that compare integer scores.
pub(super) const SCALE: u64 = 1 << 10;

#[inline]
pub(super) fn scaled(factor: f64) -> u64 {
    ((factor * SCALE as f64) as u64).clamp(1, SCALE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_linearly_from_min_to_full() {
        let s = SlowStart {
            duration: Duration::from_secs(10),
            min: 0.1,
        };
        assert_eq!(s.factor(0, 5_000), 1.0, "no ramp recorded");
        assert!((s.factor(1_000, 1_000) - 0.1).abs() < 1e-9);
        assert!((s.factor(1_000, 6_000) - 0.55).abs() < 1e-9);
        assert_eq!(s.factor(1_000, 11_000), 1.0);
        assert_eq!(SlowStart::default().factor(1_000, 1_000), 1.0, "off");
    }
}
