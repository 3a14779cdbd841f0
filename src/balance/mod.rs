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
//! - [`upstream`]: an upstream service as listeners see it: filter,
//!   balancer and the swapped snapshot.
//! - [`stats`]: per-instance live state and the process clock.
//! - [`ejection`]: passive failure handling (when and how long to eject).
//! - one file per strategy: `round_robin`, `random`, `weighted_round_robin`,
//!   `least_connections`, `consistent_hash` (Maglev), `ip_hash`,
//!   `response_time`.
//! - [`hash`]: the stable hash of affinity keys and instance ids.

mod consistent_hash;
pub mod ejection;
pub mod hash;
mod ip_hash;
mod least_connections;
mod random;
mod response_time;
mod round_robin;
pub mod stats;
pub mod upstream;
mod weighted_round_robin;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};

use crate::metrics as m;
use crate::registry::{Instance, Status};
use consistent_hash::Maglev;
use ejection::Census;
pub use ejection::EjectionPolicy;
use least_connections::LeastConnections;
use random::Random;
use response_time::ResponseTime;
use round_robin::RoundRobin;
pub use stats::{now_ms, ActiveGuard, EndpointStats};
pub use upstream::Upstream;
use weighted_round_robin::WeightedRoundRobin;

/// A load-balancing strategy, from `upstream.strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    Random,
    WeightedRoundRobin,
    LeastConnections,
    ConsistentHash,
    IpHash,
    ResponseTime,
}

impl Strategy {
    pub const ALL: [Strategy; 7] = [
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::WeightedRoundRobin,
        Strategy::LeastConnections,
        Strategy::ConsistentHash,
        Strategy::IpHash,
        Strategy::ResponseTime,
    ];

    pub fn from_name(name: &str) -> Result<Strategy, String> {
        Strategy::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown strategy {name:?}; expected one of round_robin, random, \
                     weighted_round_robin, least_connections, consistent_hash, ip_hash, response_time"
                )
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::WeightedRoundRobin => "weighted_round_robin",
            Strategy::LeastConnections => "least_connections",
            Strategy::ConsistentHash => "consistent_hash",
            Strategy::IpHash => "ip_hash",
            Strategy::ResponseTime => "response_time",
        }
    }

    /// Whether picks use [`Context::key`].
    pub fn uses_key(self) -> bool {
        matches!(self, Strategy::ConsistentHash | Strategy::IpHash)
    }
}

/// Where the affinity key of a connection or request comes from
/// (`upstream.hash_key`). It reaches the strategy as a hash in [`Context`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    ClientIp,
    /// The key of a `ROUTE <key>\n` line the client sends first (TCP).
    Preamble,
    /// A request header, by lower-case name (HTTP).
    Header(String),
    /// A cookie, by name (HTTP).
    Cookie(String),
    /// A query parameter, by name (HTTP).
    Query(String),
}

impl HashKey {
    /// As written in the configuration.
    pub fn name(&self) -> String {
        match self {
            HashKey::ClientIp => "client_ip".to_owned(),
            HashKey::Preamble => "preamble".to_owned(),
            HashKey::Header(name) => format!("header:{name}"),
            HashKey::Cookie(name) => format!("cookie:{name}"),
            HashKey::Query(name) => format!("query:{name}"),
        }
    }
}

/// The affinity key of a client address (for `ip_hash` and
/// `hash_key = "client_ip"`).
pub fn client_key(peer: SocketAddr) -> u64 {
    ip_hash::key(peer.ip())
}

/// The affinity key of arbitrary bytes (a `ROUTE` key, a header, cookie or
/// query value).
pub fn bytes_key(bytes: &[u8]) -> u64 {
    hash::key(bytes)
}

/// Which instances an upstream may route to: the seed's
/// `discover(tags=..., healthy_only=...)`, applied once per snapshot rebuild.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// Statuses that may take new connections (default: healthy only).
    pub statuses: Vec<Status>,
    /// Every one of these tags must be on the instance.
    pub tags: Vec<String>,
    /// Exact version, or a prefix when it ends in `*` (`"1.4.*"`).
    pub version: Option<String>,
    /// Every one of these pairs must be in the instance's metadata.
    pub metadata: BTreeMap<String, String>,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            statuses: vec![Status::Healthy],
            tags: Vec::new(),
            version: None,
            metadata: BTreeMap::new(),
        }
    }
}

impl Filter {
    /// Whether the instance may take new connections.
    pub fn admits(&self, instance: &Instance) -> bool {
        self.statuses.contains(&instance.status) && self.matches(instance)
    }

    /// Whether the instance is one this upstream is about at all (tags,
    /// version, metadata), whatever its status.
    pub fn matches(&self, instance: &Instance) -> bool {
        self.tags.iter().all(|t| instance.tags.contains(t))
            && self
                .version
                .as_deref()
                .is_none_or(|want| match want.strip_suffix('*') {
                    Some(prefix) => instance.version.starts_with(prefix),
                    None => instance.version == want,
                })
            && self
                .metadata
                .iter()
                .all(|(k, v)| instance.metadata.get(k) == Some(v))
    }
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub instance: Instance,
    /// `host:port` to dial, formatted once per rebuild rather than per
    /// connection.
    pub authority: String,
    pub stats: Arc<EndpointStats>,
}

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
}

impl Candidates<'_> {
    #[inline]
    fn usable(&self, i: usize) -> bool {
        if self.tried.contains(&i) {
            return false;
        }
        !self.skip_ejected || !self.endpoints[i].stats.is_ejected(self.now)
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

/// A strategy's structure over one set of endpoints, built at rebuild.
#[derive(Debug)]
enum Selector {
    RoundRobin(RoundRobin),
    Random(Random),
    Weighted(WeightedRoundRobin),
    LeastConnections(LeastConnections),
    /// `consistent_hash` and `ip_hash` (which differ only in the key).
    Hash(Maglev),
    ResponseTime(ResponseTime),
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
        }
    }

    #[inline]
    fn pick(&self, cursor: &AtomicUsize, key: Option<u64>, c: &Candidates<'_>) -> Option<usize> {
        match self {
            Selector::RoundRobin(s) => s.pick(cursor, c),
            Selector::Random(s) => s.pick(c),
            Selector::Weighted(s) => s.pick(cursor, c),
            Selector::LeastConnections(s) => s.pick(c),
            Selector::Hash(s) => s.pick(key, c),
            Selector::ResponseTime(s) => s.pick(c),
        }
    }
}

/// The endpoints of one upstream right now: routable ones first, then
/// standby ones, each part in instance-id order.
#[derive(Debug)]
pub struct Snapshot {
    endpoints: Vec<Endpoint>,
    /// `endpoints[..routable]` are routable.
    routable: usize,
    /// Routable endpoints that take new traffic (weight > 0).
    eligible: Box<[u32]>,
    /// Endpoints of either part that take new traffic, for the panic share.
    total: usize,
    normal: Selector,
    /// Over every endpoint, built when panic mode is on and standby
    /// endpoints exist; otherwise panic mode uses `normal`.
    panic: Option<Selector>,
    census: Census,
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
        }
    }
}

impl Snapshot {
    /// Builds the snapshot for `instances` (sorted by id, as discovery
    /// publishes them), keeping the stats of every instance already in
    /// `previous` and building what `balancer`'s strategy needs.
    pub fn rebuild(
        previous: &Snapshot,
        instances: &[Instance],
        filter: &Filter,
        balancer: &Balancer,
    ) -> Snapshot {
        let now = now_ms();
        let mut initial_rtt = None;
        let mut endpoint = |instance: &Instance| {
            let stats = match previous.find(&instance.id) {
                Some(known) => known.stats.clone(),
                None => {
                    let rtt = *initial_rtt.get_or_insert_with(|| previous.highest_rtt(now));
                    Arc::new(EndpointStats::new(
                        rtt,
                        now,
                        balancer.picks_counter(&instance.id),
                    ))
                }
            };
            Endpoint {
                instance: instance.clone(),
                authority: instance.authority(),
                stats,
            }
        };
        let mut endpoints = Vec::with_capacity(instances.len());
        let mut standby = Vec::new();
        for instance in instances.iter().filter(|i| filter.matches(i)) {
            if filter.statuses.contains(&instance.status) {
                endpoints.push(endpoint(instance));
            } else if instance.status != Status::Draining {
                standby.push(endpoint(instance));
            }
        }
        let routable = endpoints.len();
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
        let normal = Selector::build(balancer.strategy, &endpoints, &eligible);
        let panic = (balancer.panic_threshold > 0.0 && everyone.len() > eligible.len())
            .then(|| Selector::build(balancer.strategy, &endpoints, &everyone));
        Snapshot {
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

    /// Number of routable endpoints.
    pub fn len(&self) -> usize {
        self.routable
    }

    pub fn is_empty(&self) -> bool {
        self.routable == 0
    }

    fn find(&self, id: &str) -> Option<&Endpoint> {
        let search = |part: &'_ [Endpoint]| {
            part.binary_search_by(|e| e.instance.id.as_str().cmp(id))
                .ok()
        };
        let (routable, standby) = self.endpoints.split_at(self.routable);
        search(routable)
            .map(|i| &routable[i])
            .or_else(|| search(standby).map(|i| &standby[i]))
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

/// One upstream's strategy, failure policy and the state its picks share.
#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    ejection: EjectionPolicy,
    /// Below this share of healthy endpoints, pick among all (0: never).
    panic_threshold: f64,
    /// Round-robin position, shared by every snapshot.
    cursor: AtomicUsize,
    /// Counts ejections (never 0), so snapshots know their census is stale.
    generation: AtomicU32,
    /// Held while deciding one ejection, so two cannot both pass the cap.
    ejecting: AtomicBool,
    in_panic: AtomicBool,
    metrics: BalancerMetrics,
}

#[derive(Debug)]
struct BalancerMetrics {
    /// `upstream` and `listen` labels; `None` until [`Balancer::with_metrics`].
    labels: Option<(String, String)>,
    ejections: Counter,
    ejected: Gauge,
    panic: Gauge,
}

impl Balancer {
    pub fn new(strategy: Strategy, ejection: EjectionPolicy, panic_threshold: f64) -> Self {
        Balancer {
            strategy,
            ejection,
            panic_threshold,
            // A random start, so sidecars started together spread out.
            cursor: AtomicUsize::new(random_u64() as usize),
            generation: AtomicU32::new(1),
            ejecting: AtomicBool::new(false),
            in_panic: AtomicBool::new(false),
            metrics: BalancerMetrics {
                labels: None,
                ejections: Counter::noop(),
                ejected: Gauge::noop(),
                panic: Gauge::noop(),
            },
        }
    }

    /// Reports to the upstream's metrics (labels `upstream`, `listen`).
    pub fn with_metrics(mut self, upstream: &str, listen: SocketAddr) -> Self {
        let labels = [
            ("upstream", upstream.to_owned()),
            ("listen", listen.to_string()),
        ];
        self.metrics = BalancerMetrics {
            ejections: metrics::counter!(m::EJECTIONS, &labels),
            ejected: metrics::gauge!(m::EJECTED, &labels),
            panic: metrics::gauge!(m::PANIC_MODE, &labels),
            labels: Some((upstream.to_owned(), listen.to_string())),
        };
        self
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn ejection(&self) -> &EjectionPolicy {
        &self.ejection
    }

    pub fn panic_threshold(&self) -> f64 {
        self.panic_threshold
    }

    /// Whether the last pick was made in panic mode.
    pub fn in_panic(&self) -> bool {
        self.in_panic.load(Ordering::Relaxed)
    }

    fn picks_counter(&self, id: &str) -> Counter {
        match &self.metrics.labels {
            Some((upstream, listen)) => metrics::counter!(
                m::PICKS,
                "upstream" => upstream.clone(),
                "listen" => listen.clone(),
                "endpoint" => id.to_owned(),
            ),
            None => Counter::noop(),
        }
    }

    /// Picks an endpoint index from `snapshot`: never one in `ctx.tried`,
    /// never an ejected one (except in panic mode), never one with weight 0.
    /// `None` when nothing is left: the caller fails fast.
    pub fn pick(&self, snapshot: &Snapshot, ctx: &Context<'_>) -> Option<usize> {
        let panic = self.panic_threshold > 0.0 && self.below_panic_threshold(snapshot, ctx.now);
        if panic != self.in_panic.load(Ordering::Relaxed) {
            self.in_panic.store(panic, Ordering::Relaxed);
            self.metrics.panic.set(if panic { 1.0 } else { 0.0 });
        }
        let candidates = Candidates {
            endpoints: &snapshot.endpoints,
            tried: ctx.tried,
            now: ctx.now,
            skip_ejected: !panic,
        };
        let selector = match (&snapshot.panic, panic) {
            (Some(all), true) => all,
            _ => &snapshot.normal,
        };
        selector.pick(&self.cursor, ctx.key, &candidates)
    }

    /// Whether fewer than `panic_threshold` of the endpoints that take
    /// traffic are routable and not ejected.
    fn below_panic_threshold(&self, snapshot: &Snapshot, now: u64) -> bool {
        if snapshot.total == 0 {
            return false;
        }
        let ejected = self.ejected(snapshot, now) as usize;
        let healthy = snapshot.eligible.len().saturating_sub(ejected);
        (healthy as f64) < self.panic_threshold * snapshot.total as f64
    }

    /// Ejected routable endpoints now, from the snapshot's census.
    fn ejected(&self, snapshot: &Snapshot, now: u64) -> u32 {
        let generation = self.generation.load(Ordering::Acquire);
        let (count, recounted) =
            snapshot
                .census
                .ejected(&snapshot.endpoints, &snapshot.eligible, generation, now);
        if recounted {
            self.metrics.ejected.set(f64::from(count));
        }
        count
    }

    /// An attempt on `snapshot.endpoints()[index]` failed (a connect; for
    /// HTTP also a failed exchange or a 5xx). Ejects the endpoint when it failed often enough in a row
    /// and the cap allows; returns how long it is out. Takes effect on the
    /// next pick.
    pub fn record_failure(&self, snapshot: &Snapshot, index: usize, now: u64) -> Option<Duration> {
        let endpoint = &snapshot.endpoints[index];
        let failures = endpoint.stats.record_failure();
        let policy = &self.ejection;
        if !policy.enabled()
            || failures < u64::from(policy.consecutive_failures)
            || index >= snapshot.routable
            || endpoint.stats.is_ejected(now)
        {
            return None;
        }
        if self
            .ejecting
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // Another ejection is being decided; the next failure retries.
            return None;
        }
        let ejected = snapshot
            .eligible
            .iter()
            .filter(|&&i| snapshot.endpoints[i as usize].stats.is_ejected(now))
            .count();
        let outcome = if ejected < policy.cap(snapshot.eligible.len()) {
            let duration = endpoint.stats.eject(policy.base_time, policy.max_time, now);
            self.generation.fetch_add(1, Ordering::Release);
            self.metrics.ejections.increment(1);
            self.metrics.ejected.set((ejected + 1) as f64);
            Some(duration)
        } else {
            None
        };
        self.ejecting.store(false, Ordering::Release);
        outcome
    }

    /// Brings the ejection and panic gauges up to date (ejections end
    /// without an event; the admin API calls this before rendering metrics).
    pub fn refresh_gauges(&self, snapshot: &Snapshot) {
        let now = now_ms();
        let count = self.ejected(snapshot, now);
        self.metrics.ejected.set(f64::from(count));
        let panic = self.panic_threshold > 0.0 && self.below_panic_threshold(snapshot, now);
        self.in_panic.store(panic, Ordering::Relaxed);
        self.metrics.panic.set(if panic { 1.0 } else { 0.0 });
    }

    /// Ejected routable endpoints at `now` (for the admin API).
    pub fn ejected_now(&self, snapshot: &Snapshot) -> usize {
        self.ejected(snapshot, now_ms()) as usize
    }

    /// Keeps the rotation where it was across a rebuild: round robin
    /// continues with the instance that was next, weighted round robin at
    /// the same phase of its period.
    pub(crate) fn rebase(&self, old: &Snapshot, new: &Snapshot) {
        let cursor = self.cursor.load(Ordering::Relaxed);
        let next = match (&old.normal, &new.normal) {
            (Selector::RoundRobin(a), Selector::RoundRobin(b)) => {
                round_robin::rebase(cursor, a, &old.endpoints, b, &new.endpoints)
            }
            (Selector::Weighted(a), Selector::Weighted(b)) => {
                weighted_round_robin::rebase(cursor, a, b)
            }
            _ => return,
        };
        self.cursor.store(next, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
