//! `packed`: the fullest endpoint that still has room, like Agones'
//! Packed scheduling: players gather on as few servers as possible, so the
//! empty ones can be scaled down (and their hosts reclaimed) instead of
//! every server running a few players.
//!
//! - Every eligible endpoint is compared (a sample would defeat packing);
//!   the scan reads one load per endpoint and allocates nothing.
//! - Full endpoints are never candidates (the rule of every strategy), so
//!   once the fullest reports full the next fullest fills.
//! - An unknown load (never reported, or older than `load_ttl`) counts as
//!   half full, as in `least_loaded`: a fuller known server is filled
//!   first, an emptier one after it.
//! - Equal shares go to the first by instance id, the same on every
//!   sidecar, so sidecars pack onto the same server rather than spreading.
//! - Weights are not used: capacity is what the game says it can take.

use super::least_loaded::share;
use super::Candidates;

#[derive(Debug, Default)]
pub struct Packed {
    members: Box<[u32]>,
}

impl Packed {
    pub fn build(members: &[u32]) -> Self {
        Packed {
            members: members.into(),
        }
    }

    #[inline]
    pub fn pick(&self, c: &Candidates<'_>) -> Option<usize> {
        let mut best: Option<(usize, (u64, u64))> = None;
        for &i in self.members.iter() {
            let i = i as usize;
            if !c.usable(i) {
                continue;
            }
            let (players, capacity) = share(&c.endpoints[i], c.now);
            match best {
                // Strictly fuller wins; ties keep the first by id.
                Some((_, (bp, bc))) if players * bc <= bp * capacity => {}
                _ => best = Some((i, (players, capacity))),
            }
        }
        best.map(|(i, _)| i)
    }
}
