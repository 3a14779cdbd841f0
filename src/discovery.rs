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

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::balance::Upstream;
use crate::config::{DiscoveryConfig, DiscoveryMode};
use crate::metrics as m;
use crate::registry::{
    Change, Entry, Instance, Registry, RegistryError, Status, Watch, WatchEvent,
};
use crate::time::{sleep_or_shutdown, sleep_until_some};

/// The longest wait before re-listing a broken watch: a registry that
/// answers again is watched again within this.
const RELIST_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// One registry discovery reads: its configured name and its backend.
#[derive(Clone)]
pub struct Source {
    pub name: String,
    pub registry: Arc<dyn Registry>,
}

/// Everything known of one service, for the admin API.
pub struct ServiceState {
    pub name: String,
    pub mode: DiscoveryMode,
    instances: ArcSwap<Vec<Instance>>,
    watch_up: AtomicBool,
    updated_at: Mutex<Option<SystemTime>>,
    sources: Vec<SourceState>,
}

/// What one registry gives one service, for the admin API.
pub struct SourceState {
    pub name: String,
    pub kind: &'static str,
    watch_up: AtomicBool,
    serving: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl SourceState {
    /// Whether this registry's watch of the service is established.
    pub fn watch_up(&self) -> bool {
        self.watch_up.load(Ordering::Relaxed)
    }

    /// Whether the service is served from this registry: in failover mode
    /// the registry in use, in merge mode each whose watch is up.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Why the last listing or watch of this registry failed, until one
    /// succeeds.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ServiceState {
    pub fn new(name: String, mode: DiscoveryMode, sources: &[Source]) -> Self {
        ServiceState {
            name,
            mode,
            instances: ArcSwap::from_pointee(Vec::new()),
            watch_up: AtomicBool::new(false),
            updated_at: Mutex::new(None),
            sources: sources
                .iter()
                .map(|source| SourceState {
                    name: source.name.clone(),
                    kind: source.registry.kind(),
                    watch_up: AtomicBool::new(false),
                    serving: AtomicBool::new(false),
                    last_error: Mutex::new(None),
                })
                .collect(),
        }
    }

    /// Every known instance of the service, whatever its status, by id.
    pub fn instances(&self) -> Arc<Vec<Instance>> {
        self.instances.load_full()
    }

    /// Whether the service is being watched: in failover mode the registry
    /// in use, in merge mode at least one.
    pub fn watch_up(&self) -> bool {
        self.watch_up.load(Ordering::Relaxed)
    }

    pub fn updated_at(&self) -> Option<SystemTime> {
        *self.updated_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every registry, in configured order.
    pub fn sources(&self) -> &[SourceState] {
        &self.sources
    }

    /// Names of the registries the service is served from now.
    pub fn served_from(&self) -> Vec<&str> {
        self.sources
            .iter()
            .filter(|s| s.serving())
            .map(|s| s.name.as_str())
            .collect()
    }
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
    /// What each registry last said, in the order of `sources`.
    views: Vec<View>,
    /// Failover: the registry whose view is in service.
    serving: Option<usize>,
}

/// What one registry says of the service.
#[derive(Default)]
struct View {
    /// Instances by registry key.
    known: BTreeMap<String, Instance>,
    /// Keys whose value did not parse, with the reason: each is logged and
    /// counted once, not again on every re-list.
    malformed: HashMap<String, String>,
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
        Discovery {
            views: sources.iter().map(|_| View::default()).collect(),
            sources,
            mode: config.mode,
            failback: config.failback,
            service,
            upstreams,
            serving: None,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        match self.mode {
            DiscoveryMode::Failover => self.failover(&shutdown).await,
            DiscoveryMode::Merge => self.merge(&shutdown).await,
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

    fn publish_serving(&self) {
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
                self.set_source_watch_up(index, true);
                self.set_merge_serving(index, true);
                self.clear_error(index);
            }
            Feed::Event(event) => self.views[index].apply(event, &name),
            Feed::Down(e) => {
                self.source_failed(index, &e);
                self.set_merge_serving(index, false);
            }
        }
        let up = self.service.sources.iter().any(SourceState::watch_up);
        self.set_watch_up(up);
        self.publish(self.merged());
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

    fn publish(&self, mut instances: Vec<Instance>) {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        if *self.service.instances.load_full() == instances {
            return;
        }
        for upstream in &self.upstreams {
            upstream.refresh(&instances);
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

impl View {
    fn apply(&mut self, event: WatchEvent, service: &str) {
        match event {
            WatchEvent::Reset(entries) => {
                let previous = std::mem::take(&mut self.malformed);
                self.known.clear();
                for entry in entries {
                    let reason = previous.get(&entry.key).cloned();
                    self.put(entry, reason, service);
                }
            }
            WatchEvent::Changes(changes) => {
                for change in changes {
                    match change {
                        Change::Put(entry) => {
                            let reason = self.malformed.remove(&entry.key);
                            self.put(entry, reason, service);
                        }
                        Change::Delete { key } => {
                            self.known.remove(&key);
                            self.malformed.remove(&key);
                        }
                    }
                }
            }
        }
    }

    /// Takes in one entry. A value that cannot be used is skipped, and logged
    /// and counted unless it was already skipped for the same reason.
    fn put(&mut self, entry: Entry, skipped_before: Option<String>, service: &str) {
        let reason = match entry.value {
            Ok(instance) if instance.name == service => {
                self.known.insert(entry.key, instance);
                return;
            }
            Ok(instance) => format!("names service {:?}", instance.name),
            Err(reason) => reason,
        };
        self.known.remove(&entry.key);
        if skipped_before.as_ref() != Some(&reason) {
            tracing::warn!(service, key = %entry.key, %reason, "skipping a malformed registry entry");
            metrics::counter!(m::ENTRIES_SKIPPED, "service" => service.to_owned()).increment(1);
        }
        self.malformed.insert(entry.key, reason);
    }
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
mod tests {
    use super::*;
    use async_trait::async_trait;

    use crate::registry::Lease;

    /// A registry that holds a fixed set of instances, or is down.
    struct Fixed {
        up: AtomicBool,
        instances: Vec<Instance>,
    }

    #[async_trait]
    impl Registry for Fixed {
        fn kind(&self) -> &'static str {
            "local"
        }
        fn target(&self) -> String {
            "fixed".into()
        }
        async fn register(&self, _: &Instance) -> Result<Box<dyn Lease>, RegistryError> {
            Err(RegistryError::Rejected("read-only".into()))
        }
        async fn watch(&self, _: &str) -> Result<Box<dyn Watch>, RegistryError> {
            if !self.up.load(Ordering::SeqCst) {
                return Err(RegistryError::Unavailable("down".into()));
            }
            let entries = self
                .instances
                .iter()
                .map(|i| Entry {
                    key: i.id.clone(),
                    value: Ok(i.clone()),
                })
                .collect();
            Ok(Box::new(FixedWatch(Some(entries))))
        }
    }

    struct FixedWatch(Option<Vec<Entry>>);

    #[async_trait]
    impl Watch for FixedWatch {
        async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
            match self.0.take() {
                Some(entries) => Ok(WatchEvent::Reset(entries)),
                None => std::future::pending().await,
            }
        }
    }

    fn instance(id: &str, port: u16) -> Instance {
        Instance {
            name: "svc".into(),
            id: id.into(),
            host: "127.0.0.1".into(),
            port,
            tags: Vec::new(),
            metadata: BTreeMap::new(),
            version: String::new(),
            weight: 100,
            status: Status::Healthy,
        }
    }

    fn discovery(mode: DiscoveryMode, registries: Vec<Arc<Fixed>>) -> Discovery {
        let sources: Vec<Source> = registries
            .into_iter()
            .enumerate()
            .map(|(i, registry)| Source {
                name: format!("r{i}"),
                registry,
            })
            .collect();
        let service = Arc::new(ServiceState::new("svc".into(), mode, &sources));
        let config = DiscoveryConfig {
            mode,
            failback: Duration::from_secs(30),
        };
        Discovery::new(sources, &config, service, Vec::new())
    }

    fn fixed(up: bool, instances: Vec<Instance>) -> Arc<Fixed> {
        Arc::new(Fixed {
            up: AtomicBool::new(up),
            instances,
        })
    }

    #[test]
    fn merge_prefers_live_registries_then_the_earlier_one() {
        let mut d = discovery(
            DiscoveryMode::Merge,
            vec![fixed(true, Vec::new()), fixed(true, Vec::new())],
        );
        let first = vec![instance("a", 1), instance("both", 2)];
        let second = vec![instance("b", 3), instance("both", 4)];
        let reset = |instances: &[Instance]| {
            WatchEvent::Reset(
                instances
                    .iter()
                    .map(|i| Entry {
                        key: format!("k/{}", i.id),
                        value: Ok(i.clone()),
                    })
                    .collect(),
            )
        };
        d.on_feed(0, Feed::Up(reset(&first)));
        d.on_feed(1, Feed::Up(reset(&second)));
        let seen = |d: &Discovery| -> Vec<(String, u16)> {
            d.service
                .instances()
                .iter()
                .map(|i| (i.id.clone(), i.port))
                .collect()
        };
        assert_eq!(
            seen(&d),
            [("a".into(), 1), ("b".into(), 3), ("both".into(), 2)]
        );
        assert_eq!(d.service.served_from(), ["r0", "r1"]);
        // The first goes down: its instances stay, the live entry wins.
        d.on_feed(0, Feed::Down(RegistryError::Unavailable("gone".into())));
        assert_eq!(
            seen(&d),
            [("a".into(), 1), ("b".into(), 3), ("both".into(), 4)]
        );
        assert_eq!(d.service.served_from(), ["r1"]);
        assert!(d.service.watch_up());
        assert_eq!(
            d.service.sources()[0].last_error().as_deref(),
            Some("registry unavailable: gone")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failover_uses_the_first_that_answers_and_fails_back() {
        let primary = fixed(false, vec![instance("p", 1)]);
        let backup = fixed(true, vec![instance("b", 2)]);
        let d = discovery(DiscoveryMode::Failover, vec![primary.clone(), backup]);
        let service = d.service.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(d.run(shutdown.clone()));
        let ids = || -> Vec<String> { service.instances().iter().map(|i| i.id.clone()).collect() };
        while ids() != ["b"] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(service.served_from(), ["r1"]);
        primary.up.store(true, Ordering::SeqCst);
        // Not before the failback interval, then promptly.
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(ids(), ["b"]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(ids(), ["p"]);
        assert_eq!(service.served_from(), ["r0"]);
        assert!(!service.sources()[1].watch_up());
        shutdown.cancel();
        task.await.expect("discovery ends on shutdown");
    }
}
