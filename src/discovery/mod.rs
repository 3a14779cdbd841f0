//! Registry watches turned into endpoint snapshots.
//!
//! One [`Discovery`] task per distinct upstream service: it lists and watches
//! the service, keeps the instances it knows by registry key, and whenever
//! that set changes publishes it to the [`ServiceState`] (for `/v1/services`)
//! and rebuilds the snapshot of every [`Upstream`] of the service (one per
//! listener and HTTP route, each with its own filter). Nothing is published when nothing changed.
//!
//! On any watch error it re-lists and watches again after a backoff; until it
//! succeeds the last snapshot stays in service, so an unreachable registry
//! never takes working routes away.
//!
//! With several registries ([`Source`]s, in order of preference) the
//! [`DiscoveryMode`] decides how they are read:
//!
//! - **failover**: one registry at a time, the first in order whose listing
//!   succeeds. When its watch breaks, the registries are tried again from
//!   the first; while a later one is in use, the earlier ones are probed
//!   every `failback` (beside the running watch, which keeps serving) and
//!   the first that answers takes over. The snapshot in service is replaced
//!   only by the full listing of the registry switched to.
//! - **merge**: every registry watched at once; the snapshot is the union of
//!   what they hold, one instance per id. When two hold the same id, the
//!   entry of a registry whose watch is up wins over one whose watch is
//!   down, then the earlier registry wins. A registry that is down keeps
//!   its last known instances in the union, as a single registry would.
//!
//! **Last known good**: every listed instance set is also written to
//! `agent.state_dir` (one file per service, see `last_known`). When at
//! startup no registry can list a service, those instances are served,
//! and the service is marked stale (`squire_discovery_stale`, `"stale"` in
//! `/v1/services`) until the first listing replaces them.
//!
//! **Endpoint policy**: what is published goes through `endpoints`, which
//! resolves host names (`resolve`: when the snapshot is built and every
//! `agent.dns_refresh`, never per connect) and has every upstream build its
//! snapshot, refusing what the [policy](crate::balance::policy) refuses:
//! logged and counted once per instance and reason, shown in
//! `/v1/services`.
//!
//! Here: the task and its failover and merge loops. `state`: the admin
//! read model ([`ServiceState`], [`SourceState`]). `catalog`: what
//! `/v1/catalog` answers, at an index blocking queries wait on
//! ([`CatalogFeed`]). `view`: what one
//! registry says, entry by entry. `last_known`: the snapshot files.
//! `endpoints` and `resolve`: instances to snapshots, as above.

mod catalog;
mod endpoints;
pub(crate) mod last_known;
mod resolve;
mod state;
mod view;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::balance::{OwnAddrs, Upstream};
use crate::config::{DiscoveryConfig, DiscoveryMode};
use crate::metrics as m;
use crate::registry::{Instance, Registry, RegistryError, Status, Watch, WatchEvent};
use crate::time::{sleep_or_shutdown, sleep_until_some};

pub use catalog::{CatalogFeed, CatalogView};
use endpoints::Endpoints;
use last_known::{LastKnown, Snapshot, Writer};
pub use resolve::{CONCURRENT_LOOKUPS, LOOKUP_TIMEOUT};
pub use state::{RefusedEntry, Resolution, ServiceState, SourceState};
use view::View;

/// The longest wait before re-listing a broken watch: a registry that
/// answers again is watched again within this.
const RELIST_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// `agent.dns_refresh` unless configured.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(30);

/// One registry discovery reads: its configured name and its backend.
#[derive(Clone)]
pub struct Source {
    pub name: String,
    pub registry: Arc<dyn Registry>,
}

/// A watch just opened and its first event (the full current set).
type Opened = (Box<dyn Watch>, WatchEvent);

/// A failback probe: the first earlier registry that answered, or what
/// each one said.
type Probe =
    Pin<Box<dyn Future<Output = Result<(usize, Opened), Vec<(usize, RegistryError)>>> + Send>>;

pub struct Discovery {
    sources: Vec<Source>,
    mode: DiscoveryMode,
    failback: Duration,
    service: Arc<ServiceState>,
    /// Every upstream of the service (one per listener and route).
    upstreams: Vec<Arc<Upstream>>,
    /// Hands each instance set put in service to [`Endpoints`].
    published: watch::Sender<Arc<Vec<Instance>>>,
    /// This squire's own addresses, which no endpoint may be.
    own: watch::Receiver<Arc<OwnAddrs>>,
    dns_refresh: Duration,
    /// What each registry last said, in the order of `sources`.
    views: Vec<View>,
    /// Failover: the registry whose view is in service.
    serving: Option<usize>,
    /// This service's snapshot file, when persisting.
    last_known: Option<Arc<LastKnown>>,
    /// Writes the snapshots while `run` runs.
    writer: Option<Writer>,
    /// Whether a registry has listed the service since startup.
    listed: bool,
    /// Whether the snapshot on disk was read (once, at the first failure).
    loaded: bool,
    /// The set last handed to the writer.
    saved: Option<Vec<Instance>>,
}

/// What a merge-mode feed tells the task that merges.
enum Feed {
    /// The watch is (again) established; the event is the full current set.
    Up(WatchEvent),
    Event(WatchEvent),
    Down(RegistryError),
}

impl Discovery {
    /// `sources` in order of preference; at least one.
    pub fn new(
        sources: Vec<Source>,
        config: &DiscoveryConfig,
        service: Arc<ServiceState>,
        upstreams: Vec<Arc<Upstream>>,
    ) -> Self {
        // Without `with_policy`, no own addresses: the sender is gone.
        let (_, own) = watch::channel(Arc::default());
        Discovery {
            views: sources.iter().map(|_| View::default()).collect(),
            sources,
            mode: config.mode,
            failback: config.failback,
            published: watch::Sender::new(service.instances()),
            service,
            upstreams,
            own,
            dns_refresh: DEFAULT_DNS_REFRESH,
            serving: None,
            last_known: None,
            writer: None,
            listed: false,
            loaded: false,
            saved: None,
        }
    }

    /// Keeps the last listed instances in `state_dir` and serves them when
    /// no registry can list the service at startup.
    pub fn with_last_known(mut self, state_dir: &Path) -> Self {
        self.last_known = Some(Arc::new(LastKnown::new(state_dir, &self.service.name)));
        self
    }

    /// Refuses endpoints at this squire's `own` addresses (as they are
    /// now and whenever they change) and looks host names up again every
    /// `dns_refresh` (default 30s).
    pub fn with_policy(
        mut self,
        own: watch::Receiver<Arc<OwnAddrs>>,
        dns_refresh: Duration,
    ) -> Self {
        self.own = own;
        self.dns_refresh = dns_refresh;
        self
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        m::zero_discovery_series(&self.service.name);
        self.writer = self.last_known.clone().map(Writer::start);
        let endpoints = Endpoints::new(
            self.service.clone(),
            self.upstreams.clone(),
            self.published.subscribe(),
            self.own.clone(),
            self.dns_refresh,
        );
        let building = endpoints.run(shutdown.clone());
        let watching = async {
            match self.mode {
                DiscoveryMode::Failover => self.failover(&shutdown).await,
                DiscoveryMode::Merge => self.merge(&shutdown).await,
            }
        };
        tokio::join!(watching, building);
        if let Some(writer) = self.writer.take() {
            writer.finish().await;
        }
    }

    async fn failover(&mut self, shutdown: &CancellationToken) {
        let name = self.service.name.clone();
        let mut backoff = Backoff::new(Duration::from_millis(200), RELIST_BACKOFF_MAX);
        let mut first = true;
        loop {
            if !first {
                metrics::counter!(m::WATCH_RESTARTS, "service" => name.clone()).increment(1);
            }
            first = false;
            // The first registry, in order, that answers.
            let mut opened = None;
            let mut retryable = false;
            for index in 0..self.sources.len() {
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = open(&self.sources[index], &name) => r,
                };
                match result {
                    Ok(watch) => {
                        opened = Some((index, watch));
                        break;
                    }
                    Err(e) => {
                        retryable |= e.is_retryable();
                        self.source_failed(index, &e);
                        tracing::warn!(service = %name, registry = %self.sources[index].name, error = %e, "cannot watch the registry");
                    }
                }
            }
            let Some((mut index, (mut watch, event))) = opened else {
                self.serve_last_known();
                let delay = backoff.next(retryable);
                tracing::warn!(service = %name, retry_in = ?delay, "no registry can be watched; serving the last known endpoints");
                if sleep_or_shutdown(delay, shutdown).await {
                    return;
                }
                continue;
            };
            backoff.reset();
            self.take_over(index, event);

            // While on a later registry, probe the earlier ones now and then.
            let mut failback_at = (index > 0).then(|| Instant::now() + self.failback);
            let mut probe: Option<Probe> = None;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    event = watch.next() => match event {
                        Ok(event) => {
                            backoff.reset();
                            self.views[index].apply(event, &name);
                            self.publish_serving();
                        }
                        Err(e) => {
                            tracing::warn!(service = %name, registry = %self.sources[index].name, error = %e, "registry watch broke; re-listing");
                            self.source_failed(index, &e);
                            self.set_watch_up(false);
                            break;
                        }
                    },
                    _ = sleep_until_some(failback_at), if probe.is_none() => {
                        failback_at = None;
                        probe = Some(Box::pin(probe_earlier(self.sources[..index].to_vec(), name.clone())));
                    }
                    probed = poll_some(&mut probe) => {
                        probe = None;
                        match probed {
                            Ok((earlier, (new_watch, event))) => {
                                // The replaced watch ends here.
                                self.set_source_watch_up(index, false);
                                watch = new_watch;
                                index = earlier;
                                self.take_over(index, event);
                            }
                            Err(failures) => {
                                for (i, e) in failures {
                                    tracing::debug!(service = %name, registry = %self.sources[i].name, error = %e, "failback probe failed");
                                    self.record_error(i, &e);
                                }
                            }
                        }
                        failback_at = (index > 0).then(|| Instant::now() + self.failback);
                    }
                }
            }
            let delay = backoff.next(true);
            if sleep_or_shutdown(delay, shutdown).await {
                return;
            }
        }
    }

    /// Failover: `index` answered with the full set `event`; serve from it.
    fn take_over(&mut self, index: usize, event: WatchEvent) {
        let name = self.service.name.clone();
        self.views[index].apply(event, &name);
        self.listed_now();
        self.set_source_watch_up(index, true);
        self.clear_error(index);
        if self.serving != Some(index) {
            let to = &self.sources[index].name;
            match self.serving {
                Some(from) => {
                    let from = &self.sources[from].name;
                    tracing::warn!(service = %name, %from, %to, "discovery switched registry");
                }
                None => {
                    tracing::info!(service = %name, registry = %to, "discovery reads the registry")
                }
            }
            metrics::counter!(m::DISCOVERY_SWITCHES, "service" => name.clone(), "registry" => to.clone())
                .increment(1);
            for (i, (source, state)) in self.sources.iter().zip(&self.service.sources).enumerate() {
                let serving = i == index;
                state.serving.store(serving, Ordering::Relaxed);
                metrics::gauge!(m::DISCOVERY_SOURCE, "service" => name.clone(), "registry" => source.name.clone())
                    .set(if serving { 1.0 } else { 0.0 });
            }
            self.serving = Some(index);
        }
        self.set_watch_up(true);
        self.publish_serving();
    }

    fn publish_serving(&mut self) {
        if let Some(index) = self.serving {
            self.publish(self.views[index].known.values().cloned().collect());
        }
    }

    async fn merge(&mut self, shutdown: &CancellationToken) {
        let name = self.service.name.clone();
        let (tx, mut rx) = mpsc::channel(16);
        let feeds: Vec<_> = self
            .sources
            .iter()
            .enumerate()
            .map(|(index, source)| {
                feed(
                    index,
                    source.clone(),
                    name.clone(),
                    tx.clone(),
                    shutdown.clone(),
                )
            })
            .collect();
        drop(tx); // the feeds hold the senders: the channel ends when they do
        let merging = async {
            while let Some((index, feed)) = rx.recv().await {
                self.on_feed(index, feed);
            }
        };
        tokio::join!(futures_util::future::join_all(feeds), merging);
    }

    fn on_feed(&mut self, index: usize, feed: Feed) {
        let name = self.service.name.clone();
        match feed {
            Feed::Up(event) => {
                self.views[index].apply(event, &name);
                self.listed_now();
                self.set_source_watch_up(index, true);
                self.set_merge_serving(index, true);
                self.clear_error(index);
            }
            Feed::Event(event) => self.views[index].apply(event, &name),
            Feed::Down(e) => {
                self.source_failed(index, &e);
                self.set_merge_serving(index, false);
                self.serve_last_known();
            }
        }
        let up = self.service.sources.iter().any(SourceState::watch_up);
        self.set_watch_up(up);
        // Until a registry lists the service, the views are empty: what is
        // in service is the snapshot from disk, or nothing.
        if self.listed {
            self.publish(self.merged());
        }
    }

    fn set_merge_serving(&self, index: usize, serving: bool) {
        let state = &self.service.sources[index];
        state.serving.store(serving, Ordering::Relaxed);
        metrics::gauge!(m::DISCOVERY_SOURCE, "service" => self.service.name.clone(), "registry" => state.name.clone())
            .set(if serving { 1.0 } else { 0.0 });
    }

    /// The union of every view, one instance per id: registries whose watch
    /// is up first, then in configured order.
    fn merged(&self) -> Vec<Instance> {
        let up = |i: &usize| self.service.sources[*i].watch_up();
        let (mut ranked, down): (Vec<usize>, Vec<usize>) = (0..self.views.len()).partition(up);
        ranked.extend(down);
        let mut by_id: BTreeMap<&str, &Instance> = BTreeMap::new();
        for index in ranked {
            for instance in self.views[index].known.values() {
                by_id.entry(instance.id.as_str()).or_insert(instance);
            }
        }
        by_id.into_values().cloned().collect()
    }

    /// A listing or watch of `index` failed: its watch is down.
    fn source_failed(&self, index: usize, e: &RegistryError) {
        self.set_source_watch_up(index, false);
        self.record_error(index, e);
    }

    fn record_error(&self, index: usize, e: &RegistryError) {
        *self.service.sources[index]
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    fn clear_error(&self, index: usize) {
        *self.service.sources[index]
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn set_source_watch_up(&self, index: usize, up: bool) {
        self.service.sources[index]
            .watch_up
            .store(up, Ordering::Relaxed);
    }

    fn set_watch_up(&self, up: bool) {
        self.service.watch_up.store(up, Ordering::Relaxed);
        metrics::gauge!(m::WATCH_UP, "service" => self.service.name.clone()).set(if up {
            1.0
        } else {
            0.0
        });
    }

    /// Puts `instances` in service. A set listed by a registry is also
    /// saved, when it differs from the one saved last.
    fn publish(&mut self, mut instances: Vec<Instance>) {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        if self.listed && self.saved.as_ref() != Some(&instances) {
            if let Some(writer) = &self.writer {
                writer.save(Snapshot {
                    instances: instances.clone(),
                    listed_at: SystemTime::now(),
                });
            }
            self.saved = Some(instances.clone());
        }
        if *self.service.instances.load_full() == instances {
            return;
        }
        if self.listed {
            *lock(&self.service.listed_at) = Some(SystemTime::now());
        }
        self.published.send_replace(Arc::new(instances.clone()));
        for status in Status::ALL {
            let count = instances.iter().filter(|i| i.status == status).count();
            metrics::gauge!(m::ENDPOINTS, "service" => self.service.name.clone(), "status" => status.as_str())
                .set(count as f64);
        }
        tracing::info!(service = %self.service.name, instances = instances.len(), "endpoints changed");
        self.service.instances.store(Arc::new(instances));
        *lock(&self.service.updated_at) = Some(SystemTime::now());
    }

    /// No registry could list the service. The first time, and only if none
    /// ever has: serve the snapshot on disk, marked stale. Read here,
    /// synchronously: once per service, a file of a few kilobytes, and
    /// nothing else to do meanwhile.
    fn serve_last_known(&mut self) {
        let every_one_failed = self
            .service
            .sources
            .iter()
            .all(|s| s.last_error().is_some());
        if self.listed || self.loaded || !every_one_failed {
            return;
        }
        self.loaded = true;
        let Some(last_known) = self.last_known.clone() else {
            return;
        };
        let name = self.service.name.clone();
        let snapshot = match last_known.load() {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => {
                tracing::info!(service = %name, path = %last_known.path().display(), "no registry answers and no last known endpoints on disk");
                return;
            }
            Err(e) => {
                tracing::warn!(service = %name, error = %e, "ignoring the last known endpoints on disk");
                metrics::counter!(m::SNAPSHOT_FAILURES, "service" => name, "op" => "load")
                    .increment(1);
                return;
            }
        };
        let listed_at = humantime::format_rfc3339_millis(snapshot.listed_at);
        tracing::warn!(service = %name, instances = snapshot.instances.len(), %listed_at, "no registry answers; serving the last known endpoints from disk (stale)");
        *lock(&self.service.stale_since) = Some(SystemTime::now());
        *lock(&self.service.listed_at) = Some(snapshot.listed_at);
        metrics::gauge!(m::DISCOVERY_STALE, "service" => name).set(1.0);
        self.publish(snapshot.instances);
    }

    /// A registry listed the service: from now on what is in service comes
    /// from registries, and is saved.
    fn listed_now(&mut self) {
        if self.listed {
            return;
        }
        self.listed = true;
        if lock(&self.service.stale_since).take().is_some() {
            tracing::info!(service = %self.service.name, "a registry listed the service; the last known endpoints from disk are replaced");
        }
        *lock(&self.service.listed_at) = Some(SystemTime::now());
        metrics::gauge!(m::DISCOVERY_STALE, "service" => self.service.name.clone()).set(0.0);
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Watches `service` in `source` and waits for the first event, the full
/// current set: a registry that gives it is reachable.
async fn open(source: &Source, service: &str) -> Result<Opened, RegistryError> {
    let mut watch = source.registry.watch(service).await?;
    let first = watch.next().await?;
    Ok((watch, first))
}

/// Failover: tries `earlier` (the registries before the one in use) in
/// order; the first that answers, with its index.
async fn probe_earlier(
    earlier: Vec<Source>,
    service: String,
) -> Result<(usize, Opened), Vec<(usize, RegistryError)>> {
    let mut failures = Vec::new();
    for (index, source) in earlier.iter().enumerate() {
        match open(source, &service).await {
            Ok(opened) => return Ok((index, opened)),
            Err(e) => failures.push((index, e)),
        }
    }
    Err(failures)
}

/// Merge: keeps one registry's watch of `service` going, re-listing after
/// errors with backoff, and sends what it sees to the merging task.
async fn feed(
    index: usize,
    source: Source,
    service: String,
    tx: mpsc::Sender<(usize, Feed)>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), RELIST_BACKOFF_MAX);
    let mut first = true;
    let send = |feed: Feed| tx.send((index, feed));
    loop {
        if !first {
            metrics::counter!(m::WATCH_RESTARTS, "service" => service.clone()).increment(1);
        }
        first = false;
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = open(&source, &service) => r,
        };
        let delay = match opened {
            Ok((mut watch, event)) => {
                backoff.reset();
                if send(Feed::Up(event)).await.is_err() {
                    return;
                }
                loop {
                    let event = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        e = watch.next() => e,
                    };
                    let feed = match event {
                        Ok(event) => {
                            backoff.reset();
                            Feed::Event(event)
                        }
                        Err(e) => {
                            tracing::warn!(%service, registry = %source.name, error = %e, "registry watch broke; re-listing");
                            Feed::Down(e)
                        }
                    };
                    let down = matches!(feed, Feed::Down(_));
                    if send(feed).await.is_err() {
                        return;
                    }
                    if down {
                        break backoff.next(true);
                    }
                }
            }
            Err(e) => {
                let delay = backoff.next(e.is_retryable());
                tracing::warn!(%service, registry = %source.name, error = %e, retry_in = ?delay, "cannot watch the registry; keeping its last known endpoints");
                if send(Feed::Down(e)).await.is_err() {
                    return;
                }
                delay
            }
        };
        if sleep_or_shutdown(delay, &shutdown).await {
            return;
        }
    }
}

/// Awaits the future in `slot`, or forever when there is none.
async fn poll_some<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
