//! Choosing an instance for a new connection.
//!
//! A [`Snapshot`] is the immutable list of endpoints one upstream may route
//! to (healthy, matching its filters), rebuilt only when discovery sees a
//! change and swapped in whole. Each [`Endpoint`] carries live
//! [`EndpointStats`] that are looked up by instance id at rebuild, so a deploy
//! that adds one instance keeps every other endpoint's counters. A
//! [`Balancer`] picks from a snapshot synchronously: no lock, no `.await`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use crate::registry::{Instance, Status};

/// A load-balancing strategy, from `upstream.strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    Random,
}

impl Strategy {
    /// Strategies the configuration may name, with the ones not built yet
    /// reported as such rather than as unknown.
    pub fn from_name(name: &str) -> Result<Strategy, String> {
        match name {
            "round_robin" => Ok(Strategy::RoundRobin),
            "random" => Ok(Strategy::Random),
            "weighted_round_robin"
            | "least_connections"
            | "consistent_hash"
            | "ip_hash"
            | "response_time" => Err(format!(
                "strategy {name:?} is not available yet; use \"round_robin\" or \"random\""
            )),
            other => Err(format!(
                "unknown strategy {other:?}; expected one of round_robin, random, \
                 weighted_round_robin, least_connections, consistent_hash, ip_hash, response_time"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
        }
    }
}

/// Live counters of one instance, shared by every snapshot that holds it.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Connections open through this endpoint right now.
    pub active: AtomicU64,
    /// Connections ever opened to it.
    pub total: AtomicU64,
    /// Connect failures since the last success.
    pub consecutive_failures: AtomicU64,
}

impl EndpointStats {
    /// Counts a connection as open until the returned guard drops.
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    pub fn connect_failed(&self) {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct ActiveGuard(Arc<EndpointStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub instance: Instance,
    pub stats: Arc<EndpointStats>,
}

/// Which instances an upstream may route to: the seed's
/// `discover(tags=..., healthy_only=...)`, applied once per snapshot rebuild.
#[derive(Debug, Clone)]
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
    pub fn admits(&self, instance: &Instance) -> bool {
        self.statuses.contains(&instance.status)
            && self.tags.iter().all(|t| instance.tags.contains(t))
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

/// The endpoints one upstream may route to right now, in instance-id order.
#[derive(Debug, Default)]
pub struct Snapshot {
    endpoints: Vec<Endpoint>,
}

impl Snapshot {
    /// Builds the snapshot for `instances` (sorted by id), keeping the stats
    /// of every instance already in `previous`.
    pub fn rebuild(previous: &Snapshot, instances: &[Instance], filter: &Filter) -> Snapshot {
        let endpoints = instances
            .iter()
            .filter(|instance| filter.admits(instance))
            .map(|instance| {
                let stats = previous
                    .find(&instance.id)
                    .map(|e| e.stats.clone())
                    .unwrap_or_default();
                Endpoint {
                    instance: instance.clone(),
                    stats,
                }
            })
            .collect();
        Snapshot { endpoints }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    fn find(&self, id: &str) -> Option<&Endpoint> {
        self.endpoints
            .binary_search_by(|e| e.instance.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.endpoints[i])
    }
}

/// A strategy plus the state it keeps between picks; one per upstream, so it
/// outlives every snapshot.
#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    cursor: AtomicUsize,
}

impl Balancer {
    pub fn new(strategy: Strategy) -> Self {
        Balancer {
            strategy,
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Picks an endpoint index from `snapshot`, never one in `tried` (the
    /// endpoints a retry already failed on). `None` when nothing is left.
    pub fn pick(&self, snapshot: &Snapshot, tried: &[usize]) -> Option<usize> {
        let n = snapshot.len();
        if n == 0 || tried.len() >= n {
            return None;
        }
        let start = match self.strategy {
            Strategy::RoundRobin => self.cursor.fetch_add(1, Ordering::Relaxed) % n,
            Strategy::Random => rand::rng().random_range(0..n),
        };
        // Walk on from the chosen slot to the first endpoint not yet tried.
        (0..n)
            .map(|step| (start + step) % n)
            .find(|i| !tried.contains(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, status: Status, tags: &[&str]) -> Instance {
        Instance {
            name: "svc".into(),
            id: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            metadata: Default::default(),
            version: String::new(),
            weight: 100,
            status,
        }
    }

    #[test]
    fn round_robin_visits_each_endpoint_in_turn() {
        let instances: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| instance(id, Status::Healthy, &[]))
            .collect();
        let snapshot = Snapshot::rebuild(&Snapshot::default(), &instances, &Filter::default());
        let balancer = Balancer::new(Strategy::RoundRobin);
        let picks: Vec<_> = (0..6)
            .map(|_| balancer.pick(&snapshot, &[]).expect("pick"))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_retry_never_repeats_an_endpoint() {
        let instances: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| instance(id, Status::Healthy, &[]))
            .collect();
        let snapshot = Snapshot::rebuild(&Snapshot::default(), &instances, &Filter::default());
        for strategy in [Strategy::RoundRobin, Strategy::Random] {
            let balancer = Balancer::new(strategy);
            let mut tried = Vec::new();
            while let Some(i) = balancer.pick(&snapshot, &tried) {
                assert!(!tried.contains(&i));
                tried.push(i);
            }
            tried.sort();
            assert_eq!(tried, [0, 1, 2]);
        }
    }

    #[test]
    fn only_healthy_instances_with_the_tags_are_routable() {
        let instances = vec![
            instance("a", Status::Healthy, &["game", "eu"]),
            instance("b", Status::Unhealthy, &["game"]),
            instance("c", Status::Draining, &["game"]),
            instance("d", Status::Healthy, &["eu"]),
            instance("e", Status::Healthy, &["game"]),
        ];
        let filter = Filter {
            tags: vec!["game".into()],
            ..Filter::default()
        };
        let snapshot = Snapshot::rebuild(&Snapshot::default(), &instances, &filter);
        let ids: Vec<_> = snapshot
            .endpoints()
            .iter()
            .map(|e| e.instance.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "e"]);
        let opted_in = Filter {
            statuses: vec![Status::Healthy, Status::Draining],
            ..filter
        };
        let snapshot = Snapshot::rebuild(&Snapshot::default(), &instances, &opted_in);
        assert_eq!(snapshot.len(), 3);
    }

    #[test]
    fn version_and_metadata_filters() {
        let mut a = instance("a", Status::Healthy, &[]);
        a.version = "1.4.2".into();
        a.metadata.insert("zone".into(), "eu".into());
        let mut b = instance("b", Status::Healthy, &[]);
        b.version = "1.5.0".into();
        let exact = Filter {
            version: Some("1.4.2".into()),
            ..Filter::default()
        };
        let prefix = Filter {
            version: Some("1.*".into()),
            ..Filter::default()
        };
        let zone = Filter {
            metadata: BTreeMap::from([("zone".into(), "eu".into())]),
            ..Filter::default()
        };
        assert!(exact.admits(&a) && !exact.admits(&b));
        assert!(prefix.admits(&a) && prefix.admits(&b));
        assert!(zone.admits(&a) && !zone.admits(&b));
    }

    #[test]
    fn stats_survive_a_rebuild() {
        let before = vec![
            instance("a", Status::Healthy, &[]),
            instance("b", Status::Healthy, &[]),
        ];
        let first = Snapshot::rebuild(&Snapshot::default(), &before, &Filter::default());
        let _open = first.endpoints()[1].stats.open();
        let after = vec![
            instance("a", Status::Healthy, &[]),
            instance("a2", Status::Healthy, &[]),
            instance("b", Status::Healthy, &[]),
        ];
        let second = Snapshot::rebuild(&first, &after, &Filter::default());
        assert_eq!(second.endpoints()[2].instance.id, "b");
        assert_eq!(
            second.endpoints()[2].stats.active.load(Ordering::Relaxed),
            1
        );
        assert!(Arc::ptr_eq(
            &first.endpoints()[0].stats,
            &second.endpoints()[0].stats
        ));
        assert_eq!(
            second.endpoints()[1].stats.active.load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn empty_snapshot_picks_nothing() {
        assert_eq!(
            Balancer::new(Strategy::RoundRobin).pick(&Snapshot::default(), &[]),
            None
        );
    }
}
