//! The immutable endpoint set of one upstream and the strategy structure
//! built over it, rebuilt whole when membership changes.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::consistent_hash::Maglev;
use super::ejection::Census;
use super::least_connections::LeastConnections;
use super::least_loaded::LeastLoaded;
use super::packed::Packed;
use super::random::Random;
use super::response_time::ResponseTime;
use super::round_robin::RoundRobin;
use super::stats::{self, now_ms, EndpointStats};
use super::weighted_round_robin::WeightedRoundRobin;
use super::{prefer, Balancer, Candidates, Filter, Resolved, Strategy};
use crate::registry::{Instance, Status};

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub instance: Instance,
    /// `host:port` as the registry has it, formatted once per rebuild: the
    /// `Host` of HTTP requests, the endpoint in logs and pools.
    pub authority: String,
    /// What to dial, in order: the host's address, or what its name
    /// resolved to when the snapshot was built. Connects never resolve.
    pub addrs: Arc<[SocketAddr]>,
    pub stats: Arc<EndpointStats>,
    /// The instance's reported load, with until when it is fresh on the
    /// process clock ([`now_ms`]), fixed at rebuild: picks compare, never
    /// read a wall clock.
    pub load: Option<EndpointLoad>,
}

/// A reported load as picks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointLoad {
    pub players: u32,
    /// Greater than zero.
    pub capacity: u32,
    /// [`now_ms`] from which on it counts as unknown.
    pub fresh_until: u64,
}

impl EndpointLoad {
    /// `load` as of `now` (process clock) and `wall` (the same moment on
    /// the wall clock), stale `ttl` after it was reported.
    pub fn of(load: &crate::load::Load, now: u64, wall: SystemTime, ttl: Duration) -> Self {
        let left = load.fresh_for(wall, ttl).as_millis();
        EndpointLoad {
            players: load.players,
            capacity: load.capacity,
            fresh_until: now.saturating_add(u64::try_from(left).unwrap_or(u64::MAX)),
        }
    }
}

impl Endpoint {
    /// The load if fresh at `now`: `(players, capacity)`; `None` is unknown.
    #[inline]
    pub fn load(&self, now: u64) -> Option<(u32, u32)> {
        self.load
            .filter(|l| now < l.fresh_until)
            .map(|l| (l.players, l.capacity))
    }

    /// Whether a fresh load says there is no room (players >= capacity).
    /// An unknown load is never full.
    #[inline]
    pub fn is_full(&self, now: u64) -> bool {
        self.load(now)
            .is_some_and(|(players, capacity)| players >= capacity)
    }
}

/// A strategy's structure over one set of endpoints, built at rebuild.
#[derive(Debug)]
pub(super) enum Selector {
    RoundRobin(RoundRobin),
    Random(Random),
    Weighted(WeightedRoundRobin),
    LeastConnections(LeastConnections),
    /// `consistent_hash` and `ip_hash` (which differ only in the key).
    Hash(Maglev),
    ResponseTime(ResponseTime),
    LeastLoaded(LeastLoaded),
    Packed(Packed),
}

impl Selector {
    fn build(strategy: Strategy, endpoints: &[Endpoint], members: &[u32]) -> Selector {
        let weights = || -> Vec<u32> {
            members
                .iter()
                .map(|&i| endpoints[i as usize].instance.weight)
                .collect()
        };
        match strategy {
            Strategy::RoundRobin => Selector::RoundRobin(RoundRobin::build(members)),
            Strategy::Random => Selector::Random(Random::build(members)),
            Strategy::WeightedRoundRobin => {
                Selector::Weighted(WeightedRoundRobin::build(members, &weights()))
            }
            Strategy::LeastConnections => {
                Selector::LeastConnections(LeastConnections::build(members))
            }
            Strategy::ConsistentHash | Strategy::IpHash => {
                Selector::Hash(Maglev::build(endpoints, members, &weights()))
            }
            Strategy::ResponseTime => Selector::ResponseTime(ResponseTime::build(members)),
            Strategy::LeastLoaded => Selector::LeastLoaded(LeastLoaded::build(members)),
            Strategy::Packed => Selector::Packed(Packed::build(members)),
        }
    }

    /// Whether the strategy weighs the slow-start ramp into its own score
    /// (the others are ramped by admission in the balancer).
    pub(super) fn weighs_slow_start(&self) -> bool {
        matches!(
            self,
            Selector::LeastConnections(_) | Selector::ResponseTime(_)
        )
    }

    #[inline]
    pub(super) fn pick(
        &self,
        cursor: &AtomicUsize,
        key: Option<u64>,
        c: &Candidates<'_>,
    ) -> Option<usize> {
        match self {
            Selector::RoundRobin(s) => s.pick(cursor, c),
            Selector::Random(s) => s.pick(c),
            Selector::Weighted(s) => s.pick(cursor, c),
            Selector::LeastConnections(s) => s.pick(c),
            Selector::Hash(s) => s.pick(key, c),
            Selector::ResponseTime(s) => s.pick(c),
            Selector::LeastLoaded(s) => s.pick(c),
            Selector::Packed(s) => s.pick(c),
        }
    }
}

/// The endpoints of one upstream right now: routable ones first, then
/// standby ones, each part in instance-id order.
#[derive(Debug)]
pub struct Snapshot {
    pub(super) endpoints: Vec<Endpoint>,
    /// `endpoints[..routable]` are routable.
    pub(super) routable: usize,
    /// Routable endpoints that take new traffic (weight > 0).
    pub(super) eligible: Box<[u32]>,
    /// Endpoints of either part that take new traffic, for the panic share.
    pub(super) total: usize,
    pub(super) normal: Selector,
    /// Over every endpoint, built when panic mode is on and standby
    /// endpoints exist; otherwise panic mode uses `normal`.
    pub(super) panic: Option<Selector>,
    pub(super) census: Census,
    /// With a [preference](super::prefer) that holds, `normal` covers the
    /// preferred endpoints only and this one every eligible endpoint: a
    /// pick falls back to it when no preferred endpoint is usable.
    pub(super) fallback: Option<Selector>,
    /// A preference is configured and does not hold: traffic spills over.
    pub(super) spilling: bool,
    /// Ids of every instance discovery reported (also the filtered out,
    /// draining and refused ones), sorted: what a pinned pick may name.
    pub(super) discovered: Box<[Box<str>]>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            endpoints: Vec::new(),
            routable: 0,
            eligible: Box::default(),
            total: 0,
            normal: Selector::RoundRobin(RoundRobin::default()),
            panic: None,
            census: Census::default(),
            fallback: None,
            spilling: false,
            discovered: Box::default(),
        }
    }
}

impl Snapshot {
    /// Builds the snapshot for `instances` (sorted by id, as discovery
    /// publishes them), keeping the stats of every instance already in
    /// `previous` and building what `balancer`'s strategy needs. Instances
    /// without addresses are left out; the endpoint policy is applied
    /// before, by [`Upstream::refresh`](super::Upstream::refresh).
    pub fn rebuild(
        previous: &Snapshot,
        instances: &[Resolved],
        filter: &Filter,
        balancer: &Balancer,
    ) -> Snapshot {
        Snapshot::rebuild_with(previous, |_| None, instances, filter, balancer)
    }

    /// [`rebuild`](Snapshot::rebuild), also taking the stats of an instance
    /// not in `previous` from `departed` (one that left within the grace
    /// period and came back: its counters go on from where they were).
    pub fn rebuild_with(
        previous: &Snapshot,
        departed: impl Fn(&str) -> Option<Arc<EndpointStats>>,
        instances: &[Resolved],
        filter: &Filter,
        balancer: &Balancer,
    ) -> Snapshot {
        let now = now_ms();
        let wall = SystemTime::now();
        let load_ttl = balancer.load_ttl();
        let mut initial_rtt = None;
        let mut endpoint = |instance: &Instance, addrs: &Arc<[SocketAddr]>| {
            let known = previous
                .find(&instance.id)
                .map(|known| known.stats.clone())
                .or_else(|| departed(&instance.id));
            let stats = match known {
                Some(stats) => stats,
                None => {
                    let rtt = *initial_rtt.get_or_insert_with(|| previous.highest_rtt(now));
                    Arc::new(EndpointStats::new(rtt, now))
                }
            };
            Endpoint {
                instance: instance.clone(),
                authority: instance.authority(),
                addrs: addrs.clone(),
                stats,
                load: instance
                    .load
                    .as_ref()
                    .map(|load| EndpointLoad::of(load, now, wall, load_ttl)),
            }
        };
        let mut endpoints = Vec::with_capacity(instances.len());
        let mut standby = Vec::new();
        for resolved in instances.iter().filter(|r| filter.matches(&r.instance)) {
            let (instance, Ok(addrs)) = (&resolved.instance, &resolved.addrs) else {
                continue;
            };
            if filter.statuses.contains(&instance.status) {
                endpoints.push(endpoint(instance, addrs));
            } else if instance.status != Status::Draining {
                standby.push(endpoint(instance, addrs));
            }
        }
        let routable = endpoints.len();
        mark_ramps(previous, &endpoints, &standby, now);
        endpoints.append(&mut standby);
        let takes_traffic = |i: &usize| endpoints[*i].instance.weight > 0;
        let eligible: Vec<u32> = (0..routable)
            .filter(takes_traffic)
            .map(|i| i as u32)
            .collect();
        let everyone: Vec<u32> = (0..endpoints.len())
            .filter(takes_traffic)
            .map(|i| i as u32)
            .collect();
        let (preferred, spilling) = prefer::split(balancer.prefer(), &endpoints, &eligible);
        let (normal, fallback) = match preferred {
            Some(preferred) => (
                Selector::build(balancer.strategy(), &endpoints, &preferred),
                Some(Selector::build(balancer.strategy(), &endpoints, &eligible)),
            ),
            None => (
                Selector::build(balancer.strategy(), &endpoints, &eligible),
                None,
            ),
        };
        let panic = (balancer.panic_threshold() > 0.0 && everyone.len() > eligible.len())
            .then(|| Selector::build(balancer.strategy(), &endpoints, &everyone));
        let mut discovered: Vec<Box<str>> = instances
            .iter()
            .map(|r| Box::from(r.instance.id.as_str()))
            .collect();
        discovered.sort_unstable();
        Snapshot {
            fallback,
            spilling,
            discovered: discovered.into(),
            total: everyone.len(),
            endpoints,
            routable,
            eligible: eligible.into(),
            normal,
            panic,
            census: Census::default(),
        }
    }

    /// Every endpoint, routable first, then standby.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The endpoints that take new connections when not in panic mode.
    pub fn routable(&self) -> &[Endpoint] {
        &self.endpoints[..self.routable]
    }

    /// Endpoints of this upstream whose status keeps them out (unhealthy,
    /// critical, not yet healthy): only panic mode routes to them.
    pub fn standby(&self) -> &[Endpoint] {
        &self.endpoints[self.routable..]
    }

    /// Routable endpoints taking traffic whose fresh load says they are
    /// full at `now`: what `squire_upstream_full_endpoints` shows.
    pub fn full(&self, now: u64) -> usize {
        self.eligible
            .iter()
            .filter(|&&i| self.endpoints[i as usize].is_full(now))
            .count()
    }

    /// Number of routable endpoints.
    pub fn len(&self) -> usize {
        self.routable
    }

    pub fn is_empty(&self) -> bool {
        self.routable == 0
    }

    pub(super) fn find(&self, id: &str) -> Option<&Endpoint> {
        self.position(id).map(|i| &self.endpoints[i])
    }

    /// The index of instance `id` among [`endpoints`](Snapshot::endpoints).
    pub fn position(&self, id: &str) -> Option<usize> {
        let search = |part: &'_ [Endpoint]| {
            part.binary_search_by(|e| e.instance.id.as_str().cmp(id))
                .ok()
        };
        let (routable, standby) = self.endpoints.split_at(self.routable);
        search(routable).or_else(|| search(standby).map(|i| i + self.routable))
    }

    /// Whether discovery reported instance `id`, whatever became of it.
    pub fn discovered(&self, id: &str) -> bool {
        self.discovered
            .binary_search_by(|known| (**known).cmp(id))
            .is_ok()
    }

    /// Replaces the discovered ids (the upstream's refresh knows also the
    /// instances its endpoint policy refused).
    pub(super) fn set_discovered(&mut self, ids: impl Iterator<Item = Box<str>>) {
        let mut ids: Vec<Box<str>> = ids.collect();
        ids.sort_unstable();
        self.discovered = ids.into();
    }

    /// Whether a configured preference does not hold, so traffic goes to
    /// every routable endpoint ([`prefer`](super::prefer)).
    pub fn spilling(&self) -> bool {
        self.spilling
    }

    /// The conservative estimate a new endpoint starts from: the highest of
    /// the known ones, at least [`stats::INITIAL_RTT`].
    fn highest_rtt(&self, now: u64) -> Duration {
        let highest = self
            .endpoints
            .iter()
            .map(|e| e.stats.rtt_estimate(now))
            .fold(0.0, f64::max);
        Duration::from_nanos(highest as u64).max(stats::INITIAL_RTT)
    }
}

/// Starts the slow-start ramp of every routable endpoint that was not
/// routable in `previous` (new, back from standby or from away), and stops
/// it for standby ones, so their ramp starts again when they return. The
/// first snapshot (nothing before it) starts everyone warm.
fn mark_ramps(previous: &Snapshot, routable: &[Endpoint], standby: &[Endpoint], now: u64) {
    let first = previous.endpoints.is_empty();
    for endpoint in routable {
        let was_routable = previous
            .position(&endpoint.instance.id)
            .is_some_and(|i| i < previous.routable);
        if first {
            endpoint.stats.set_routable_since(0);
        } else if !was_routable {
            endpoint.stats.set_routable_since(now);
        }
    }
    for endpoint in standby {
        endpoint.stats.set_routable_since(0);
    }
}
