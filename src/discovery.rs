//! Registry watches turned into endpoint snapshots.
//!
//! One [`Discovery`] task per distinct upstream service: it lists and watches
//! the service, keeps the instances it knows by registry key, and whenever
//! that set changes publishes it to the [`ServiceState`] (for `/v1/services`)
//! and rebuilds the [`Snapshot`] of every [`Pool`] (one per upstream listener,
//! each with its own filter). Nothing is published when nothing changed.
//!
//! On any watch error it re-lists and watches again after a backoff; until it
//! succeeds the last snapshot stays in service, so an unreachable registry
//! never takes working routes away.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::balance::{Balancer, Filter, Snapshot};
use crate::metrics as m;
use crate::registration::sleep_or_shutdown;
use crate::registry::{Change, Entry, Instance, Registry, Status, WatchEvent};

/// Everything known of one service, for the admin API.
pub struct ServiceState {
    pub name: String,
    instances: ArcSwap<Vec<Instance>>,
    watch_up: AtomicBool,
    updated_at: Mutex<Option<SystemTime>>,
}

impl ServiceState {
    pub fn new(name: String) -> Self {
        ServiceState {
            name,
            instances: ArcSwap::from_pointee(Vec::new()),
            watch_up: AtomicBool::new(false),
            updated_at: Mutex::new(None),
        }
    }

    /// Every known instance of the service, whatever its status, by id.
    pub fn instances(&self) -> Arc<Vec<Instance>> {
        self.instances.load_full()
    }

    pub fn watch_up(&self) -> bool {
        self.watch_up.load(Ordering::Relaxed)
    }

    pub fn updated_at(&self) -> Option<SystemTime> {
        *self.updated_at.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The endpoints of one upstream listener and the balancer that picks
/// among them.
pub struct Pool {
    filter: Filter,
    balancer: Balancer,
    snapshot: ArcSwap<Snapshot>,
}

impl Pool {
    pub fn new(filter: Filter, balancer: Balancer) -> Self {
        Pool {
            filter,
            balancer,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
        }
    }

    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// The current snapshot: one atomic load, no lock.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Rebuilds the snapshot (stats carried by instance id, the strategy's
    /// tables built here rather than per pick) and swaps it in.
    fn refresh(&self, instances: &[Instance]) {
        let previous = self.snapshot.load_full();
        let next = Snapshot::rebuild(&previous, instances, &self.filter, &self.balancer);
        self.balancer.rebase(&previous, &next);
        self.snapshot.store(Arc::new(next));
    }
}

pub struct Discovery {
    registry: Arc<dyn Registry>,
    service: Arc<ServiceState>,
    pools: Vec<Arc<Pool>>,
    /// Instances by registry key.
    known: BTreeMap<String, Instance>,
    /// Keys whose value did not parse, with the reason: each is logged and
    /// counted once, not again on every re-list.
    malformed: HashMap<String, String>,
}

impl Discovery {
    pub fn new(
        registry: Arc<dyn Registry>,
        service: Arc<ServiceState>,
        pools: Vec<Arc<Pool>>,
    ) -> Self {
        Discovery {
            registry,
            service,
            pools,
            known: BTreeMap::new(),
            malformed: HashMap::new(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let name = self.service.name.clone();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut first = true;
        loop {
            if !first {
                metrics::counter!(m::WATCH_RESTARTS, "service" => name.clone()).increment(1);
            }
            first = false;
            let watch = tokio::select! {
                _ = shutdown.cancelled() => return,
                w = self.registry.watch(&name) => w,
            };
            let mut watch = match watch {
                Ok(watch) => watch,
                Err(e) => {
                    let delay = backoff.next(e.is_retryable());
                    tracing::warn!(service = %name, error = %e, retry_in = ?delay, "cannot watch the registry; serving the last known endpoints");
                    if sleep_or_shutdown(delay, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            self.set_watch_up(true);
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = watch.next() => e,
                };
                match event {
                    Ok(event) => {
                        backoff.reset();
                        self.apply(event);
                    }
                    Err(e) => {
                        tracing::warn!(service = %name, error = %e, "registry watch broke; re-listing");
                        break;
                    }
                }
            }
            self.set_watch_up(false);
            let delay = backoff.next(true);
            if sleep_or_shutdown(delay, &shutdown).await {
                return;
            }
        }
    }

    fn set_watch_up(&self, up: bool) {
        self.service.watch_up.store(up, Ordering::Relaxed);
        metrics::gauge!(m::WATCH_UP, "service" => self.service.name.clone()).set(if up {
            1.0
        } else {
            0.0
        });
    }

    fn apply(&mut self, event: WatchEvent) {
        match event {
            WatchEvent::Reset(entries) => {
                let previous = std::mem::take(&mut self.malformed);
                self.known.clear();
                for entry in entries {
                    let reason = previous.get(&entry.key).cloned();
                    self.put(entry, reason);
                }
            }
            WatchEvent::Changes(changes) => {
                for change in changes {
                    match change {
                        Change::Put(entry) => {
                            let reason = self.malformed.remove(&entry.key);
                            self.put(entry, reason);
                        }
                        Change::Delete { key } => {
                            self.known.remove(&key);
                            self.malformed.remove(&key);
                        }
                    }
                }
            }
        }
        self.publish();
    }

    /// Takes in one entry. A value that cannot be used is skipped, and logged
    /// and counted unless it was already skipped for the same reason.
    fn put(&mut self, entry: Entry, skipped_before: Option<String>) {
        let reason = match entry.value {
            Ok(instance) if instance.name == self.service.name => {
                self.known.insert(entry.key, instance);
                return;
            }
            Ok(instance) => format!("names service {:?}", instance.name),
            Err(reason) => reason,
        };
        self.known.remove(&entry.key);
        if skipped_before.as_ref() != Some(&reason) {
            tracing::warn!(service = %self.service.name, key = %entry.key, %reason, "skipping a malformed registry entry");
            metrics::counter!(m::ENTRIES_SKIPPED, "service" => self.service.name.clone())
                .increment(1);
        }
        self.malformed.insert(entry.key, reason);
    }

    fn publish(&self) {
        let mut instances: Vec<Instance> = self.known.values().cloned().collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        if *self.service.instances.load_full() == instances {
            return;
        }
        for pool in &self.pools {
            pool.refresh(&instances);
        }
        for status in Status::ALL {
            let count = instances.iter().filter(|i| i.status == status).count();
            metrics::gauge!(m::ENDPOINTS, "service" => self.service.name.clone(), "status" => status.as_str())
                .set(count as f64);
        }
        tracing::info!(service = %self.service.name, instances = instances.len(), "endpoints changed");
        self.service.instances.store(Arc::new(instances));
        *self
            .service
            .updated_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(SystemTime::now());
    }
}
