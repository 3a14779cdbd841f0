//! One upstream's picking state: the strategy's cursor, ejection decisions,
//! panic mode and their gauges.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge};

use super::snapshot::Selector;
use super::stats::now_ms;
use super::{
    hash, random_u64, round_robin, weighted_round_robin, Candidates, Context, EjectionPolicy,
    Prefer, SlowStart, Snapshot, Strategy,
};

/// Keeps the slow-start draw of a key apart from its slot in a table.
const SLOW_START_SALT: u64 = 0x736c_6f77_7374_6172;
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
    /// The ramp of endpoints that just became routable.
    slow_start: SlowStart,
    /// Which endpoints to keep traffic within while enough are routable.
    prefer: Prefer,
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
    /// 1 while a preference does not hold and traffic spills over.
    spillover: Gauge,
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
            slow_start: SlowStart::default(),
            prefer: Prefer::default(),
            load_ttl: crate::load::DEFAULT_TTL,
            metrics: BalancerMetrics {
                labels: None,
                ejections: Counter::noop(),
                ejected: Gauge::noop(),
                panic: Gauge::noop(),
                spillover: Gauge::noop(),
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
            spillover: metrics::gauge!(m::SPILLOVER, &labels),
            full: metrics::gauge!(m::FULL, &labels),
            labels: Some((upstream.to_owned(), listen.to_string())),
        };
        self
    }

    /// Ramps the share of endpoints that just became routable.
    pub fn with_slow_start(mut self, slow_start: SlowStart) -> Self {
        self.slow_start = slow_start;
        self
    }

    /// Keeps traffic within the preferred endpoints while enough of them
    /// are routable.
    pub fn with_prefer(mut self, prefer: Prefer) -> Self {
        self.prefer = prefer;
        self
    }

    pub fn slow_start(&self) -> &SlowStart {
        &self.slow_start
    }

    pub fn prefer(&self) -> &Prefer {
        &self.prefer
    }

    /// Sets the spillover gauge from a new snapshot (at each rebuild).
    pub(super) fn note_spillover(&self, snapshot: &Snapshot) {
        if !self.prefer.is_empty() {
            let spilling = if snapshot.spilling { 1.0 } else { 0.0 };
            self.metrics.spillover.set(spilling);
        }
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
        let mut candidates = Candidates {
            endpoints: &snapshot.endpoints,
            tried: ctx.tried,
            now: ctx.now,
            skip_ejected: !panic,
            skip: None,
            slow_start: self.slow_start,
        };
        let (selector, normal) = match (&snapshot.panic, panic) {
            (Some(all), true) => (all, false),
            _ => (&snapshot.normal, true),
        };
        let picked = selector.pick(&self.cursor, ctx.key, &candidates);
        // A preference that holds: its endpoints all ejected or tried.
        let (selector, picked) = match (picked, &snapshot.fallback) {
            (None, Some(all)) if normal => (all, all.pick(&self.cursor, ctx.key, &candidates)),
            _ => (selector, picked),
        };
        let picked = picked?;
        if !self.slow_start.enabled() || selector.weighs_slow_start() {
            return Some(picked);
        }
        // Slow start by admission: a warming endpoint keeps the pick with
        // the probability of its factor (decided by the key when there is
        // one, so a key's choice is stable), else the pick goes elsewhere.
        let factor = self
            .slow_start
            .factor(snapshot.endpoints[picked].stats.ramp_start(), ctx.now);
        if factor >= 1.0 {
            return Some(picked);
        }
        let draw = match ctx.key {
            Some(key) => hash::mix(key ^ SLOW_START_SALT),
            None => random_u64(),
        };
        if (draw >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < factor {
            return Some(picked);
        }
        candidates.skip = Some(picked);
        selector
            .pick(&self.cursor, ctx.key, &candidates)
            .or(Some(picked))
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
