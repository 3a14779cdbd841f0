//! One upstream's picking state: the strategy's cursor, ejection decisions,
//! panic mode and their gauges.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge};

use super::snapshot::Selector;
use super::stats::now_ms;
use super::{
    random_u64, round_robin, weighted_round_robin, Candidates, Context, EjectionPolicy, Snapshot,
    Strategy,
};
use crate::metrics as m;

/// One upstream's strategy, failure policy and the state its picks share.
#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    ejection: EjectionPolicy,
    /// Below this share of healthy endpoints, pick among all (0: never).
    panic_threshold: f64,
    /// Round-robin position, shared by every snapshot.
    pub(super) cursor: AtomicUsize,
    /// Counts ejections (never 0), so snapshots know their census is stale.
    generation: AtomicU32,
    /// Held while deciding one ejection, so two cannot both pass the cap.
    ejecting: AtomicBool,
    in_panic: AtomicBool,
    /// A load an endpoint reported longer ago than this is unknown.
    load_ttl: Duration,
    metrics: BalancerMetrics,
}

#[derive(Debug)]
struct BalancerMetrics {
    /// `upstream` and `listen` labels; `None` until [`Balancer::with_metrics`].
    labels: Option<(String, String)>,
    ejections: Counter,
    ejected: Gauge,
    panic: Gauge,
    full: Gauge,
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
            load_ttl: crate::load::DEFAULT_TTL,
            metrics: BalancerMetrics {
                labels: None,
                ejections: Counter::noop(),
                ejected: Gauge::noop(),
                panic: Gauge::noop(),
                full: Gauge::noop(),
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
            full: metrics::gauge!(m::FULL, &labels),
            labels: Some((upstream.to_owned(), listen.to_string())),
        };
        self
    }

    /// Reads the endpoints' reported loads as stale `ttl` after they were
    /// reported (`upstream.load_ttl`; default [`crate::load::DEFAULT_TTL`]).
    pub fn with_load_ttl(mut self, ttl: Duration) -> Self {
        self.load_ttl = ttl;
        self
    }

    pub fn load_ttl(&self) -> Duration {
        self.load_ttl
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

    /// The `upstream` and `listen` labels given to [`Balancer::with_metrics`].
    pub(super) fn labels(&self) -> Option<(&str, &str)> {
        self.metrics
            .labels
            .as_ref()
            .map(|(upstream, listen)| (upstream.as_str(), listen.as_str()))
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
        // Loads go stale and come back without an event too.
        self.metrics.full.set(snapshot.full(now) as f64);
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
