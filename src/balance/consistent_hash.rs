//! `consistent_hash`: a key always goes to the same endpoint while the
//! membership stays the same, and when one of N endpoints joins or leaves
//! only about 1/N of the keys move.
//!
//! Maglev hashing (Eisenbud et al., NSDI 2016): a lookup table of
//! [`TABLE_SIZE`] slots is filled once per snapshot rebuild. Each endpoint walks its own permutation of the slots, derived
//! from its instance id, taking turns to claim the next free slot; turns
//! follow the smooth weighted round robin order, so an endpoint with twice
//! the weight claims twice the slots. A pick is one hash and one array read.
//!
//! Everything derives from instance ids and weights, never from addresses or
//! the order events arrived in: every sidecar that sees the same instances
//! builds the same table and sends a key to the same instance.
//!
//! When the key's endpoint is ejected (or a retry already failed on it) the
//! key is re-hashed with a counter, so all its connections move to the same
//! second choice. A pick without a key (a `ROUTE` line with an empty key)
//! takes a random endpoint.

use super::{first_usable, hash, random_below, weighted_round_robin, Candidates, Endpoint};

/// Slots in the table: a prime (so every skip walks all slots), the same
/// for every pool size. A size that followed the endpoint count would move
/// nearly every key whenever the count crossed a size boundary. 65,537 keeps
/// each endpoint's share within about 1.5% of its weight up to 1,000
/// endpoints (Maglev's rule of thumb is 100 slots per endpoint).
pub const TABLE_SIZE: usize = 65537;
/// Re-hashes tried before walking the member list.
const REHASHES: u64 = 8;

const SEED_OFFSET: u64 = 0x6f66_6673_6574;
const SEED_SKIP: u64 = 0x736b_6970;

#[derive(Debug, Default)]
pub struct Maglev {
    /// Slot -> endpoint index.
    table: Box<[u32]>,
    members: Box<[u32]>,
}

impl Maglev {
    /// `members` are endpoint indices, `weights` theirs (all > 0).
    pub fn build(endpoints: &[Endpoint], members: &[u32], weights: &[u32]) -> Self {
        let n = members.len();
        if n == 0 {
            return Maglev::default();
        }
        let size = TABLE_SIZE;
        // Each member's permutation: offset, offset + skip, ... (mod size).
        let mut position: Vec<u64> = Vec::with_capacity(n);
        let mut skip: Vec<u64> = Vec::with_capacity(n);
        for &i in members {
            let id = endpoints[i as usize].instance.id.as_bytes();
            position.push(hash::hash(SEED_OFFSET, id) % size as u64);
            skip.push(hash::hash(SEED_SKIP, id) % (size as u64 - 1) + 1);
        }
        let turns = weighted_round_robin::schedule(weights);
        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; size].into_boxed_slice();
        let mut filled = 0;
        'fill: loop {
            for &k in &turns {
                let k = k as usize;
                let mut slot = position[k];
                while table[slot as usize] != EMPTY {
                    slot = step(slot, skip[k], size as u64);
                }
                table[slot as usize] = members[k];
                position[k] = step(slot, skip[k], size as u64);
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Maglev {
            table,
            members: members.into(),
        }
    }

    #[inline]
    pub fn pick(&self, key: Option<u64>, c: &Candidates<'_>) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let Some(key) = key else {
            return first_usable(&self.members, random_below(self.members.len()), c);
        };
        for attempt in 0..REHASHES {
            let h = if attempt == 0 {
                key
            } else {
                hash::mix(key ^ attempt)
            };
            let i = self.table[slot_of(h, self.table.len())] as usize;
            if c.usable(i) {
                return Some(i);
            }
        }
        // Deterministic too: the same key walks the same way.
        first_usable(&self.members, (key % self.members.len() as u64) as usize, c)
    }
}

#[inline]
fn step(slot: u64, skip: u64, size: u64) -> u64 {
    let next = slot + skip;
    if next >= size {
        next - size
    } else {
        next
    }
}

/// `h` scaled onto `0..len` (Lemire's multiply-shift, no division).
#[inline]
fn slot_of(h: u64, len: usize) -> usize {
    ((u128::from(h) * len as u128) >> 64) as usize
}
