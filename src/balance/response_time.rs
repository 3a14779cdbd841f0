//! `response_time`: peak-EWMA latency times load, power of two choices.
//!
//! Each endpoint's cost is its latency estimate (a peak-sensitive moving
//! average of connect times, or for HTTP times to headers, decaying towards
//! zero while idle; see [`super::EndpointStats::record_latency`]) times
//! `in_flight + 1`, divided by its weight. Two distinct random endpoints are
//! compared and the cheaper one wins (linkerd's and finagle's balancer):
//! that avoids the herd a global minimum would cause when many pickers see
//! the same numbers, and costs two reads per pick at any size.
//!
//! A new endpoint starts from a conservative estimate (the highest of its
//! peers', at least [`super::stats::INITIAL_RTT`]), not zero, so it is not
//! flooded before it has been measured once.

use std::sync::atomic::Ordering;

use super::{first_usable, random_below, Candidates, Endpoint};

/// Draws to find each of the two usable endpoints.
const DRAWS: usize = 6;

#[derive(Debug, Default)]
pub struct ResponseTime {
    members: Box<[u32]>,
}

impl ResponseTime {
    pub fn build(members: &[u32]) -> Self {
        ResponseTime {
            members: members.into(),
        }
    }

    #[inline]
    pub fn pick(&self, c: &Candidates<'_>) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        // The first choice, then a second one among the other n - 1.
        let Some(first) = (0..DRAWS)
            .map(|_| random_below(n))
            .find(|&p| c.usable(self.members[p] as usize))
        else {
            return first_usable(&self.members, random_below(n), c);
        };
        let a = self.members[first] as usize;
        if n == 1 {
            return Some(a);
        }
        let second = (0..DRAWS)
            .map(|_| {
                let p = random_below(n - 1);
                if p >= first {
                    p + 1
                } else {
                    p
                }
            })
            .map(|p| self.members[p] as usize)
            .find(|&i| c.usable(i));
        Some(match second {
            Some(b) if ramped_cost(&c.endpoints[b], c) < ramped_cost(&c.endpoints[a], c) => b,
            _ => a,
        })
    }
}

/// [`cost`] with the weight ramped while the endpoint is in [slow
/// start](super::slow_start).
#[inline]
fn ramped_cost(endpoint: &Endpoint, c: &Candidates<'_>) -> f64 {
    let cost = cost(endpoint, c.now);
    if !c.slow_start.enabled() {
        return cost;
    }
    cost / c.slow_start.factor(endpoint.stats.ramp_start(), c.now)
}

/// Latency estimate (ns) × (in flight + 1) / weight.
pub fn cost(endpoint: &Endpoint, now: u64) -> f64 {
    let load = endpoint.stats.active.load(Ordering::Relaxed) as f64 + 1.0;
    endpoint.stats.rtt_estimate(now) * load / f64::from(endpoint.instance.weight.max(1))
}
