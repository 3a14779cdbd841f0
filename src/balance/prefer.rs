//! Preferred instances (zones): `prefer = { zone = "a" }` on an upstream
//! routes within the instances whose metadata has every one of the pairs
//! while at least `min_share` of those are routable, and spills over to
//! all routable instances below that (or when none matches).
//!
//! The decision is made once per snapshot rebuild, from the instances'
//! statuses ([`Snapshot::spilling`](super::Snapshot::spilling), and the
//! `squire_upstream_spillover` gauge): a pick only uses the selector the
//! rebuild chose. Endpoints ejected between two rebuilds do not change it;
//! when every preferred endpoint is ejected (or was tried) a pick falls
//! back to the whole routable set rather than failing.

use std::collections::BTreeMap;

use super::Endpoint;
use crate::registry::Instance;

#[derive(Debug, Clone, PartialEq)]
pub struct Prefer {
    /// Every pair must be in the instance's metadata; empty: no preference.
    pub metadata: BTreeMap<String, String>,
    /// The share (0-1) of the preferred instances that must be routable
    /// for traffic to stay within them.
    pub min_share: f64,
}

impl Default for Prefer {
    fn default() -> Self {
        Prefer {
            metadata: BTreeMap::new(),
            min_share: 0.5,
        }
    }
}

impl Prefer {
    pub fn is_empty(&self) -> bool {
        self.metadata.is_empty()
    }

    /// Whether the instance is one of the preferred.
    pub fn matches(&self, instance: &Instance) -> bool {
        self.metadata
            .iter()
            .all(|(k, v)| instance.metadata.get(k) == Some(v))
    }

    /// Whether traffic spills over to every routable instance, given how
    /// many preferred ones are routable out of how many there are.
    pub fn spills(&self, routable: usize, total: usize) -> bool {
        routable == 0 || (routable as f64) < self.min_share * total as f64 - 1e-9
    }
}

/// The preferred members among `eligible` when `prefer` holds, and whether
/// it spills: `(None, false)` without a preference, `(None, true)` when it
/// does not hold. Standby endpoints count towards the preferred total.
pub(super) fn split(
    prefer: &Prefer,
    endpoints: &[Endpoint],
    eligible: &[u32],
) -> (Option<Vec<u32>>, bool) {
    if prefer.is_empty() {
        return (None, false);
    }
    let preferred: Vec<u32> = eligible
        .iter()
        .copied()
        .filter(|&i| prefer.matches(&endpoints[i as usize].instance))
        .collect();
    let total = endpoints
        .iter()
        .filter(|e| e.instance.weight > 0 && prefer.matches(&e.instance))
        .count();
    if prefer.spills(preferred.len(), total) {
        return (None, true);
    }
    if preferred.len() == eligible.len() {
        // Every eligible endpoint is preferred: one selector does.
        return (None, false);
    }
    (Some(preferred), false)
}
