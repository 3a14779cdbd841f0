//! Choosing an instance for a new connection.
//!
//! A [`Snapshot`] is the immutable set of endpoints one upstream knows,
//! rebuilt only when discovery sees a change and swapped in whole: first the
//! routable ones (status admitted by the upstream's [`Filter`]), then the
//! standby ones (matching the filter's tags, version and metadata but not
//! its statuses, and not draining) that only panic mode routes to. Whatever
//! a strategy needs beyond the list (a Maglev table, a smooth weighted round
//! robin period) is built into the snapshot at rebuild, never per pick.
//!
//! Each [`Endpoint`] carries live [`EndpointStats`] (connections in flight,
//! latency estimate, failures, ejection) looked up by instance id at
//! rebuild, so a deploy that adds one instance keeps every other endpoint's
//! state. The [`Balancer`] (one per upstream, outliving every snapshot)
//! holds the strategy's cursor and picks synchronously: no lock, no
//! `.await`, no allocation.
//!
//! # Layout
//!
//! - `strategy`: the configured [`Strategy`] and [`HashKey`], and the
//!   affinity keys ([`client_key`], [`bytes_key`]).
//! - `filter`: which instances an upstream routes to.
//! - [`policy`]: which instances an upstream may dial at all: the checks of
//!   every address (unspecified, our own, denied ranges) and host name.
//! - `snapshot`: the [`Endpoint`]s of one upstream and the strategy's
//!   structure over them, rebuilt on membership changes.
//! - `balancer`: picking, ejection reporting, panic mode and gauges.
//! - [`upstream`]: an upstream service as listeners see it: filter,
//!   balancer and the swapped snapshot.
//! - [`stats`]: per-instance live state and the process clock.
//! - [`ejection`]: passive failure handling (when and how long to eject).
//! - one file per strategy: `round_robin`, `random`, `weighted_round_robin`,
//!   `least_connections`, `consistent_hash` (Maglev), `ip_hash`,
//!   `response_time`.
//! - [`pinned`]: picks that name one instance (`ROUTE @id`,
//!   `X-Squire-Instance`), refused with a reason rather than rerouted.
//! - [`prefer`]: keeping traffic within preferred instances (a zone)
//!   while enough are routable, and spilling over below that.
//! - [`slow_start`]: the ramp of an instance that just became routable.
//! - `least_loaded` and `packed` pick over the load the instances report
//!   (see [`crate::load`]).
//! - [`hash`]: the stable hash of affinity keys and instance ids.
//! - here: what one pick knows ([`Context`]), what a strategy picks from
//!   (`Candidates`) and the per-thread random numbers strategies share.
//!
//! Under every strategy an endpoint whose fresh reported load is full
//! (players >= capacity) gets no new connection: the one test of
//! `Candidates::usable`. An unknown (never reported, or stale) load is
//! never full.

mod balancer;
mod consistent_hash;
pub mod ejection;
mod filter;
pub mod hash;
mod ip_hash;
mod least_connections;
mod least_loaded;
mod packed;
pub mod pinned;
pub mod policy;
pub mod prefer;
mod random;
mod response_time;
mod round_robin;
pub mod slow_start;
mod snapshot;
pub mod stats;
mod strategy;
pub mod upstream;
mod weighted_round_robin;

use std::cell::Cell;

pub use balancer::Balancer;
pub use ejection::EjectionPolicy;
pub use filter::Filter;
pub use pinned::PinRefusal;
pub use policy::{OwnAddrs, Ranges, Refusal, Refused, Resolved};
pub use prefer::Prefer;
pub use slow_start::SlowStart;
pub use snapshot::{Endpoint, EndpointLoad, Snapshot};
pub use stats::{now_ms, ActiveGuard, EndpointStats};
pub use strategy::{bytes_key, client_key, HashKey, Strategy};
pub use upstream::Upstream;

/// What one pick knows besides the snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The hash of the affinity key ([`client_key`], [`bytes_key`]); `None`
    /// when there is none. Only `consistent_hash` and `ip_hash` use it.
    pub key: Option<u64>,
    /// Endpoints (indices into the snapshot) a retry already failed on.
    pub tried: &'a [usize],
    /// [`now_ms`], read once per pick by the caller.
    pub now: u64,
}

impl<'a> Context<'a> {
    pub fn new(now: u64) -> Self {
        Context {
            key: None,
            tried: &[],
            now,
        }
    }

    pub fn with_key(mut self, key: Option<u64>) -> Self {
        self.key = key;
        self
    }

    pub fn with_tried(mut self, tried: &'a [usize]) -> Self {
        self.tried = tried;
        self
    }
}

/// The endpoints a strategy picks from and which of them it may take now.
pub(crate) struct Candidates<'a> {
    endpoints: &'a [Endpoint],
    tried: &'a [usize],
    now: u64,
    /// False in panic mode, which ignores ejections.
    skip_ejected: bool,
    /// One more endpoint not to take: a warming one slow start turned down.
    skip: Option<usize>,
    /// For the strategies that weigh the ramp in their score.
    slow_start: SlowStart,
}

impl Candidates<'_> {
    /// The one test every strategy applies to an endpoint: not tried yet,
    /// not full by its fresh reported load (under every strategy, panic
    /// mode included), not ejected (except in panic mode).
    #[inline]
    fn usable(&self, i: usize) -> bool {
        if self.tried.contains(&i) || self.skip == Some(i) {
            return false;
        }
        let endpoint = &self.endpoints[i];
        if endpoint.is_full(self.now) {
            return false;
        }
        !self.skip_ejected || !endpoint.stats.is_ejected(self.now)
    }
}

/// The first usable member from `start` on, wrapping around.
fn first_usable(members: &[u32], start: usize, c: &Candidates<'_>) -> Option<usize> {
    let n = members.len();
    (0..n)
        .map(|step| members[(start + step) % n] as usize)
        .find(|&i| c.usable(i))
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(rand::random::<u64>());
}

/// A fast per-thread random number (wyrand): picks need speed and spread,
/// not secrecy.
#[inline]
fn random_u64() -> u64 {
    RNG.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    })
}

/// A random number in `0..n` (`n > 0`).
#[inline]
fn random_below(n: usize) -> usize {
    ((u128::from(random_u64()) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests;
