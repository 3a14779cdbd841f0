//! `round_robin`: each eligible endpoint in turn, by instance id.
//!
//! The cursor lives in the [`super::Balancer`] (one per upstream), not in the
//! snapshot, and a rebuild re-aims it at the instance that was next ([`rebase`]),
//! so a deploy that adds one instance neither resets the rotation nor sends
//! the next connection back to the first instance. The cursor starts at a
//! random offset so that sidecars started together do not all hit the same
//! instance first.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidates, Endpoint};

#[derive(Debug, Default)]
pub struct RoundRobin {
    /// Indices of the eligible endpoints, ascending (so by instance id).
    order: Box<[u32]>,
}

impl RoundRobin {
    pub fn build(members: &[u32]) -> Self {
        RoundRobin {
            order: members.into(),
        }
    }

    #[inline]
    pub fn pick(&self, cursor: &AtomicUsize, c: &Candidates<'_>) -> Option<usize> {
        let n = self.order.len();
        if n == 0 {
            return None;
        }
        let start = cursor.fetch_add(1, Ordering::Relaxed) % n;
        // The chosen slot, or the next usable one after it.
        (0..n)
            .map(|step| self.order[(start + step) % n] as usize)
            .find(|&i| c.usable(i))
    }
}

/// Where the cursor must point in `new` so that the next pick is the
/// instance that was next in `old` (or, if it left, the one after it by id).
pub fn rebase(
    cursor: usize,
    old: &RoundRobin,
    old_endpoints: &[Endpoint],
    new: &RoundRobin,
    new_endpoints: &[Endpoint],
) -> usize {
    if old.order.is_empty() || new.order.is_empty() {
        return cursor;
    }
    let next = &old_endpoints[old.order[cursor % old.order.len()] as usize]
        .instance
        .id;
    let position = new
        .order
        .binary_search_by(|&i| new_endpoints[i as usize].instance.id.cmp(next))
        .unwrap_or_else(|insert_at| insert_at);
    position % new.order.len()
}
