//! One upstream service as listeners see it: which of its instances they
//! may dial at all ([`Ranges`], with the rest of the [endpoint
//! policy](super::policy)) and may use ([`Filter`]), the [`Balancer`] that
//! picks among them, and the current [`Snapshot`].
//!
//! The agent builds one per `[[upstream]]` and one per HTTP route service,
//! discovery writes it ([`Upstream::refresh`], which applies the policy to
//! every snapshot it builds) and listeners read it
//! ([`Upstream::snapshot`], one atomic load). Whoever keeps state per
//! instance beyond the snapshot (the HTTP connection pool) follows
//! [`Upstream::changes`] to let go of instances that left.
//!
//! An instance that leaves keeps its [`EndpointStats`] for the grace period
//! ([`metrics::departed_grace`](crate::metrics::departed_grace)): its
//! `squire_upstream_picks_total` series is still rendered, and if it comes
//! back meanwhile it counts on from where it was. After that it is
//! forgotten, so churning instance ids cost nothing once they are gone.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::policy::{self, OwnAddrs, Ranges, Refused, Resolved};
use super::stats::{now_ms, EndpointStats};
use super::{Balancer, Filter, Snapshot};
use crate::metrics::{self as m, LiveSamples, LiveSeries};

pub struct Upstream {
    service: String,
    filter: Filter,
    ranges: Ranges,
    balancer: Balancer,
    live: Arc<Live>,
    /// Bumped after every rebuild.
    generation: watch::Sender<u64>,
}

/// What the request path and the metrics scrape share.
struct Live {
    /// `upstream` and `listen` labels of the picks series; `None` (nothing
    /// rendered) for a balancer without metrics.
    labels: Option<(String, String)>,
    snapshot: ArcSwap<Snapshot>,
    /// Instances that left within the grace period, by id. Locked only by
    /// a refresh and a scrape, never by a pick.
    departed: Mutex<HashMap<String, Departed>>,
}

struct Departed {
    stats: Arc<EndpointStats>,
    /// When it left, ms on [`now_ms`]'s clock.
    at: u64,
}

impl Upstream {
    pub fn new(service: impl Into<String>, filter: Filter, balancer: Balancer) -> Self {
        let live = Arc::new(Live {
            labels: balancer
                .labels()
                .map(|(upstream, listen)| (upstream.to_owned(), listen.to_owned())),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            departed: Mutex::new(HashMap::new()),
        });
        if live.labels.is_some() {
            let weak = Arc::downgrade(&live);
            m::register_live(weak);
        }
        Upstream {
            service: service.into(),
            filter,
            ranges: Ranges::default(),
            balancer,
            live,
            generation: watch::Sender::new(0),
        }
    }

    /// The address ranges it may dial (default: [`Ranges::default`]).
    pub fn with_ranges(mut self, ranges: Ranges) -> Self {
        self.ranges = ranges;
        self
    }

    /// The service whose instances this upstream routes to.
    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// The current snapshot: one atomic load, no lock.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.snapshot.load_full()
    }

    /// The listen address of the listener it serves, as its metrics label
    /// it (`None` for one built without metrics).
    pub fn listen(&self) -> Option<&str> {
        self.balancer.labels().map(|(_, listen)| listen)
    }

    pub fn ranges(&self) -> &Ranges {
        &self.ranges
    }

    /// Rebuilds the snapshot from every known instance of the service
    /// (sorted by id; stats carried by instance id, also from instances
    /// that left within the grace period; the strategy's tables built here
    /// rather than per pick), swaps it in and tells whoever follows
    /// [`changes`](Upstream::changes). Only instances the [endpoint
    /// policy](super::policy) admits, given this squire's `own` addresses,
    /// get in; the others are returned, with the reason.
    pub fn refresh(&self, instances: &[Resolved], own: &OwnAddrs) -> Vec<Refused> {
        let mut refused = Vec::new();
        let admitted: Vec<Resolved> = instances
            .iter()
            .filter(|resolved| {
                let verdict = match &resolved.addrs {
                    Ok(addrs) => policy::check(addrs, own, &self.ranges),
                    Err(refusal) => Err(*refusal),
                };
                let Err(reason) = verdict else { return true };
                refused.push(Refused {
                    id: resolved.instance.id.clone(),
                    address: policy::shown_address(&resolved.instance),
                    reason,
                });
                false
            })
            .cloned()
            .collect();
        let mut departed = self.live.lock_departed();
        let now = now_ms();
        departed.retain(|_, d| !m::grace_expired(d.at, now));
        let previous = self.live.snapshot.load_full();
        let mut next = Snapshot::rebuild_with(
            &previous,
            |id| departed.get(id).map(|d| d.stats.clone()),
            &admitted,
            &self.filter,
            &self.balancer,
        );
        for endpoint in next.endpoints() {
            departed.remove(&endpoint.instance.id);
        }
        for endpoint in previous.endpoints() {
            if next.find(&endpoint.instance.id).is_none() {
                let stats = endpoint.stats.clone();
                departed.insert(endpoint.instance.id.clone(), Departed { stats, at: now });
            }
        }
        drop(departed);
        // Pinned picks tell "refused" from "unknown": every id counts.
        next.set_discovered(instances.iter().map(|r| r.instance.id.as_str().into()));
        self.balancer.note_spillover(&next);
        self.balancer.rebase(&previous, &next);
        self.balancer.refresh_gauges(&next);
        self.live.snapshot.store(Arc::new(next));
        self.generation.send_modify(|g| *g += 1);
        refused
    }

    /// Ids of the instances that left within the grace period (for tests).
    pub fn departed(&self) -> Vec<String> {
        let now = now_ms();
        let departed = self.live.lock_departed();
        let mut ids: Vec<_> = departed
            .iter()
            .filter(|(_, d)| !m::grace_expired(d.at, now))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Marks every rebuild: `changed()` on the receiver resolves after the
    /// next one.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

impl Live {
    fn lock_departed(&self) -> std::sync::MutexGuard<'_, HashMap<String, Departed>> {
        // Plain data: a panic elsewhere mid-update leaves it usable.
        self.departed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LiveSeries for Live {
    fn collect(&self, now: u64, out: &mut LiveSamples) {
        let Some((upstream, listen)) = &self.labels else {
            return;
        };
        let mut add = |id: &str, stats: &EndpointStats| {
            let labels = [
                ("upstream", upstream.as_str()),
                ("listen", listen.as_str()),
                ("endpoint", id),
            ];
            out.add(m::PICKS, &labels, stats.picks.load(Ordering::Relaxed));
        };
        for endpoint in self.snapshot.load().endpoints() {
            add(&endpoint.instance.id, &endpoint.stats);
        }
        for (id, departed) in self.lock_departed().iter() {
            if !m::grace_expired(departed.at, now) {
                add(id, &departed.stats);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{EjectionPolicy, Refusal, Strategy};
    use crate::registry::Instance;

    fn instances(ids: &[&str]) -> Vec<Resolved> {
        ids.iter()
            .map(|id| Instance::for_tests(id))
            .filter_map(Resolved::literal)
            .collect()
    }

    fn upstream() -> Upstream {
        let balancer = Balancer::new(Strategy::RoundRobin, EjectionPolicy::default(), 0.0)
            .with_metrics("svc", "127.0.0.1:1".parse().expect("addr"));
        Upstream::new("svc", Filter::default(), balancer)
    }

    #[test]
    fn an_instance_back_within_the_grace_period_keeps_its_counts() {
        let upstream = upstream();
        upstream.refresh(&instances(&["a", "b"]), &OwnAddrs::default());
        let a = upstream.snapshot().endpoints()[0].stats.clone();
        a.picked();
        a.picked();
        upstream.refresh(&instances(&["b"]), &OwnAddrs::default());
        assert_eq!(upstream.departed(), vec!["a".to_owned()]);
        // Still rendered while it is away.
        let mut samples = LiveSamples::default();
        upstream.live.collect(now_ms(), &mut samples);
        assert!(
            samples.render().contains("endpoint=\"a\"} 2"),
            "{}",
            samples.render()
        );
        upstream.refresh(&instances(&["a", "b"]), &OwnAddrs::default());
        assert!(upstream.departed().is_empty());
        let snapshot = upstream.snapshot();
        let back = &snapshot.endpoints()[0];
        assert!(Arc::ptr_eq(&back.stats, &a), "the same stats came back");
        assert_eq!(back.stats.picks.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn refused_instances_stay_out_of_the_snapshot_and_are_returned() {
        let upstream = upstream();
        let mut all = instances(&["a", "b", "c"]);
        // "b" points at our own listener, "c" is unresolvable.
        all[1].addrs = Ok(Arc::from(["127.0.0.1:7000".parse().expect("addr")]));
        all[2].addrs = Err(Refusal::Unresolvable);
        let own = OwnAddrs {
            listeners: vec!["127.0.0.1:7000".parse().expect("addr")],
            local: Vec::new(),
        };
        let refused = upstream.refresh(&all, &own);
        let reasons: Vec<_> = refused.iter().map(|r| (r.id.as_str(), r.reason)).collect();
        assert_eq!(reasons, [("b", Refusal::Own), ("c", Refusal::Unresolvable)]);
        let snapshot = upstream.snapshot();
        let ids: Vec<_> = snapshot
            .endpoints()
            .iter()
            .map(|e| e.instance.id.as_str())
            .collect();
        assert_eq!(ids, ["a"]);
    }

    #[test]
    fn a_departed_instance_past_the_grace_period_is_not_rendered() {
        let upstream = upstream();
        upstream.refresh(&instances(&["a", "b"]), &OwnAddrs::default());
        upstream.refresh(&instances(&["b"]), &OwnAddrs::default());
        let later = now_ms() + m::departed_grace().as_millis() as u64;
        let mut samples = LiveSamples::default();
        upstream.live.collect(later, &mut samples);
        let text = samples.render();
        assert!(text.contains("endpoint=\"b\"} 0"), "{text}");
        assert!(!text.contains("endpoint=\"a\""), "{text}");
    }
}
