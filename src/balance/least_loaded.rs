//! `least_loaded`: the emptier of two random endpoints by the load their
//! game processes report (players / capacity), "power of two choices".
//!
//! Comparing every endpoint would send every new player to the one
//! emptiest server until its next report arrives (a report lags by up to a
//! refresh): every sidecar of the fleet would herd onto it. Two random
//! choices keep the maximum load within a small constant of the ideal
//! while spreading the picks between reports.
//!
//! - An unknown load (never reported, or older than `load_ttl`) counts as
//!   half full: neither preferred like an empty server nor avoided like a
//!   full one (full ones are never candidates at all).
//! - Equal loads are broken by fewer connections in flight, then at random.
//! - Weights are not used: capacity is what the game says it can take.

use std::sync::atomic::Ordering;

use super::{first_usable, random_below, random_u64, Candidates, Endpoint};

#[derive(Debug, Default)]
pub struct LeastLoaded {
    members: Box<[u32]>,
}

impl LeastLoaded {
    pub fn build(members: &[u32]) -> Self {
        LeastLoaded {
            members: members.into(),
        }
    }

    #[inline]
    pub fn pick(&self, c: &Candidates<'_>) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = random_below(n);
        let a = first_usable(&self.members, start, c)?;
        if n == 1 {
            return Some(a);
        }
        // A second start other than the first, so two endpoints always
        // get compared when two are usable.
        let other = (start + 1 + random_below(n - 1)) % n;
        match first_usable(&self.members, other, c) {
            Some(b) if b != a => Some(emptier(&c.endpoints[a], a, &c.endpoints[b], b, c.now)),
            _ => Some(a),
        }
    }
}

/// The load share as a fraction `players / capacity`; unknown is 1/2.
#[inline]
pub(super) fn share(endpoint: &Endpoint, now: u64) -> (u64, u64) {
    match endpoint.load(now) {
        Some((players, capacity)) => (u64::from(players), u64::from(capacity)),
        None => (1, 2),
    }
}

/// `a` or `b`, whichever reports the lower share.
#[inline]
fn emptier(a: &Endpoint, ia: usize, b: &Endpoint, ib: usize, now: u64) -> usize {
    let (pa, ca) = share(a, now);
    let (pb, cb) = share(b, now);
    // Capacities are at most 1e6, so these products fit easily.
    match (pa * cb).cmp(&(pb * ca)) {
        std::cmp::Ordering::Less => ia,
        std::cmp::Ordering::Greater => ib,
        std::cmp::Ordering::Equal => {
            let active_a = a.stats.active.load(Ordering::Relaxed);
            let active_b = b.stats.active.load(Ordering::Relaxed);
            match active_a.cmp(&active_b) {
                std::cmp::Ordering::Less => ia,
                std::cmp::Ordering::Greater => ib,
                std::cmp::Ordering::Equal if random_u64() & 1 == 0 => ia,
                std::cmp::Ordering::Equal => ib,
            }
        }
    }
}
