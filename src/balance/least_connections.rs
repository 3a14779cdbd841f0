//! `least_connections`: the endpoint with the fewest connections in flight
//! for its weight.
//!
//! The score is `(in_flight + 1) / weight`, lowest wins, so among idle
//! endpoints the heaviest is preferred and a weight-200 endpoint carries
//! twice the connections of a weight-100 one. Ties are broken at random
//! (reservoir sampling), so idle endpoints share new connections instead of
//! the first one by id taking them all.
//!
//! Up to [`EXACT`] endpoints every one is compared. Beyond that a full scan
//! costs more than a pick may (it touches every endpoint's counters), so the
//! best of [`SAMPLES`] random endpoints wins: the "power of d choices"
//! result says that already keeps the maximum load within a small constant
//! of the ideal.

use std::sync::atomic::Ordering;

use super::{first_usable, random_below, random_u64, slow_start, Candidates, Endpoint};

/// Endpoint counts up to which every endpoint is compared.
pub const EXACT: usize = 32;
/// Random endpoints compared when there are more than [`EXACT`].
pub const SAMPLES: usize = 8;

#[derive(Debug, Default)]
pub struct LeastConnections {
    members: Box<[u32]>,
}

impl LeastConnections {
    pub fn build(members: &[u32]) -> Self {
        LeastConnections {
            members: members.into(),
        }
    }

    #[inline]
    pub fn pick(&self, c: &Candidates<'_>) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let mut best: Option<(usize, Score)> = None;
        let mut ties = 0u64;
        let mut consider = |i: usize| {
            let score = Score::of(&c.endpoints[i], c);
            match best {
                Some((_, b)) if score.worse_than(b) => {}
                Some((_, b)) if !score.better_than(b) => {
                    // Equal: keep each of the tied with equal probability.
                    ties += 1;
                    if random_u64() % ties == 0 {
                        best = Some((i, score));
                    }
                }
                _ => {
                    best = Some((i, score));
                    ties = 1;
                }
            }
        };
        if n <= EXACT {
            for &i in self.members.iter() {
                if c.usable(i as usize) {
                    consider(i as usize);
                }
            }
        } else {
            for _ in 0..SAMPLES {
                let i = self.members[random_below(n)] as usize;
                if c.usable(i) {
                    consider(i);
                }
            }
        }
        best.map(|(i, _)| i)
            .or_else(|| first_usable(&self.members, random_below(n), c))
    }
}

/// `(in_flight + 1) / weight`, compared without division.
#[derive(Debug, Clone, Copy)]
struct Score {
    load: u128,
    weight: u128,
}

impl Score {
    /// The weight is ramped while the endpoint is in [slow
    /// start](super::slow_start).
    fn of(endpoint: &Endpoint, c: &Candidates<'_>) -> Score {
        let mut weight = u128::from(endpoint.instance.weight.max(1));
        if c.slow_start.enabled() {
            let factor = c.slow_start.factor(endpoint.stats.ramp_start(), c.now);
            weight *= u128::from(slow_start::scaled(factor));
        } else {
            weight *= u128::from(slow_start::SCALE);
        }
        Score {
            load: u128::from(endpoint.stats.active.load(Ordering::Relaxed)) + 1,
            weight,
        }
    }

    fn better_than(self, other: Score) -> bool {
        self.load * other.weight < other.load * self.weight
    }

    fn worse_than(self, other: Score) -> bool {
        other.better_than(self)
    }
}
