//! `weighted_round_robin`: smooth weighted round robin.
//!
//! Like nginx's smooth WRR, every period of `W` picks (the sum of the
//! weights, reduced by their gcd) gives each endpoint exactly its weight,
//! and an endpoint's picks are spread over the period instead of coming in a
//! burst (weights 3, 2, 1 give `a b a c b a`, never `a a a b b c`).
//! nginx computes that order with a loop over every endpoint per pick under
//! a lock; here the whole period is laid out once per snapshot rebuild, as
//! an earliest-deadline-first order (endpoint `k`'s `j`-th pick is due at
//! `(j + 1/2) / w_k` of the period, ties to the heavier endpoint, then the
//! lower id), and a pick is one array read at the shared cursor. For
//! small weight sets this is nginx's order exactly (3, 2, 1 and 2, 1); in
//! general it is the same kind of interleaving, not always the same
//! sequence.
//!
//! A period longer than [`MAX_PERIOD`] slots is scaled down to it (each
//! weight rounded, at least 1), which bounds memory and rebuild time; the
//! rounding is below 1% for any endpoint with at least 1/1000th of
//! the total weight.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{first_usable, Candidates};

/// The longest period laid out (256 KiB of `u32`).
pub const MAX_PERIOD: usize = 1 << 16;

/// Slots tried after the cursor's before walking the member list.
const PROBES: usize = 8;

#[derive(Debug, Default)]
pub struct WeightedRoundRobin {
    /// One period: endpoint indices in pick order.
    slots: Box<[u32]>,
    /// The eligible endpoints, ascending, for the fallback walk.
    members: Box<[u32]>,
}

impl WeightedRoundRobin {
    /// `members` are endpoint indices, `weights` theirs (all > 0).
    pub fn build(members: &[u32], weights: &[u32]) -> Self {
        let slots = schedule(weights)
            .into_iter()
            .map(|k| members[k as usize])
            .collect();
        WeightedRoundRobin {
            slots,
            members: members.into(),
        }
    }

    #[inline]
    pub fn pick(&self, cursor: &AtomicUsize, c: &Candidates<'_>) -> Option<usize> {
        let len = self.slots.len();
        if len == 0 {
            return None;
        }
        let start = cursor.fetch_add(1, Ordering::Relaxed);
        for step in 0..PROBES.min(len) {
            let i = self.slots[(start + step) % len] as usize;
            if c.usable(i) {
                return Some(i);
            }
        }
        first_usable(&self.members, start, c)
    }

    pub fn period(&self) -> usize {
        self.slots.len()
    }
}

/// The cursor in a new schedule at the same phase of its period, so a
/// rebuild neither restarts the period nor skips most of it.
pub fn rebase(cursor: usize, old: &WeightedRoundRobin, new: &WeightedRoundRobin) -> usize {
    let (old_len, new_len) = (old.period(), new.period());
    if old_len == 0 || new_len == 0 {
        return cursor;
    }
    ((cursor % old_len) as u128 * new_len as u128 / old_len as u128) as usize
}

/// One period of smooth weighted round robin over `weights` (all > 0): the
/// position in `weights` of each pick, in order. Also the turn order of the
/// weighted Maglev table ([`super::consistent_hash`]).
pub fn schedule(weights: &[u32]) -> Vec<u32> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w / divisor)).collect();
    let total: u64 = reduced.iter().sum();
    if total > MAX_PERIOD as u64 {
        for w in &mut reduced {
            *w = ((*w * MAX_PERIOD as u64 + total / 2) / total).max(1);
        }
    }
    let period = reduced.iter().sum::<u64>();
    // Endpoint k's j-th pick is due at (j + 1/2) / w_k of the period: the
    // slot index is exact integer arithmetic, the same on every host.
    let bucket = |k: usize, j: u64| -> usize { ((2 * j + 1) * period / (2 * reduced[k])) as usize };
    // Ties go to the heavier endpoint, then to the lower id.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(reduced[k]));
    // Counting sort by due slot; stable, so ties keep that order.
    let period = period as usize;
    let mut starts = vec![0u32; period + 1];
    for &k in &order {
        for j in 0..reduced[k] {
            starts[bucket(k, j) + 1] += 1;
        }
    }
    for b in 1..=period {
        starts[b] += starts[b - 1];
    }
    let mut out = vec![0u32; period];
    for &k in &order {
        for j in 0..reduced[k] {
            let b = bucket(k, j);
            out[starts[b] as usize] = k as u32;
            starts[b] += 1;
        }
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(order: &[u32]) -> String {
        order.iter().map(|&k| char::from(b'a' + k as u8)).collect()
    }

    #[test]
    fn smooth_order_like_nginx() {
        // nginx gives exactly these for the first three.
        assert_eq!(names(&schedule(&[2, 1])), "aba");
        assert_eq!(names(&schedule(&[3, 2, 1])), "abacba");
        assert_eq!(names(&schedule(&[1, 1, 1])), "abc");
        assert_eq!(names(&schedule(&[100, 100, 100])), "abc");
        // nginx: "aabacaa"; equally smooth, b and c side by side.
        assert_eq!(names(&schedule(&[5, 1, 1])), "aaabcaa");
    }

    #[test]
    fn each_period_gives_each_endpoint_its_weight() {
        let weights = [7, 3, 11, 1, 5];
        let order = schedule(&weights);
        assert_eq!(order.len(), 27);
        for (k, &w) in weights.iter().enumerate() {
            assert_eq!(order.iter().filter(|&&x| x == k as u32).count(), w as usize);
        }
    }

    #[test]
    fn picks_are_spread_not_bursty() {
        // Between two picks of one endpoint the gap is within a couple of
        // slots of its ideal period / weight, also across the period's end.
        let weights = [9, 4, 4, 2, 1];
        let order = schedule(&weights);
        let period = order.len();
        for (k, &w) in weights.iter().enumerate() {
            let at: Vec<usize> = (0..period).filter(|&i| order[i] == k as u32).collect();
            let ideal = period as f64 / w as f64;
            for (x, &pos) in at.iter().enumerate() {
                let next = at.get(x + 1).copied().unwrap_or(at[0] + period);
                let gap = (next - pos) as f64;
                assert!(
                    (gap - ideal).abs() <= 3.0,
                    "endpoint {k}: gap {gap} vs ideal {ideal:.1} in {}",
                    names(&order)
                );
            }
        }
    }

    #[test]
    fn huge_periods_are_scaled_within_tolerance() {
        let weights: Vec<u32> = (0..100).map(|i| 1_000 + i * 37).collect();
        let order = schedule(&weights);
        assert!(order.len() <= MAX_PERIOD + weights.len());
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut counts = vec![0usize; weights.len()];
        for &k in &order {
            counts[k as usize] += 1;
        }
        for (k, &w) in weights.iter().enumerate() {
            let want = w as f64 / total as f64;
            let got = counts[k] as f64 / order.len() as f64;
            assert!((got - want).abs() / want < 0.01, "{k}: {got} vs {want}");
        }
    }
}
