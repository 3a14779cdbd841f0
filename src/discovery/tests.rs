//! Unit tests of the discovery loops with an in-memory registry.

use std::sync::atomic::AtomicBool;

use async_trait::async_trait;

use super::*;
use crate::registry::{Entry, Lease};
use last_known::{LastKnown, Snapshot};

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

/// An instance of `svc` (also used by the sibling modules' tests).
pub(super) fn instance(id: &str, port: u16) -> Instance {
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
        load: None,
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

fn ids(service: &ServiceState) -> Vec<String> {
    service.instances().iter().map(|i| i.id.clone()).collect()
}

/// A snapshot of `svc` on disk in `dir`, listed at a known time.
fn saved(dir: &std::path::Path, instances: Vec<Instance>) -> SystemTime {
    let listed_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    LastKnown::new(dir, "svc")
        .save(&Snapshot {
            instances,
            listed_at,
        })
        .expect("save");
    listed_at
}

#[test]
fn merge_serves_the_snapshot_once_every_registry_failed_until_one_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listed_at = saved(dir.path(), vec![instance("old", 1)]);
    let mut d = discovery(
        DiscoveryMode::Merge,
        vec![fixed(false, Vec::new()), fixed(false, Vec::new())],
    )
    .with_last_known(dir.path());
    let down = || Feed::Down(RegistryError::Unavailable("down".into()));
    d.on_feed(0, down());
    assert!(ids(&d.service).is_empty(), "the other may still answer");
    d.on_feed(1, down());
    assert_eq!(ids(&d.service), ["old"]);
    assert!(d.service.stale_since().is_some());
    assert_eq!(d.service.listed_at(), Some(listed_at));
    // Read once: later failures keep what is in service.
    std::fs::remove_file(LastKnown::new(dir.path(), "svc").path()).expect("remove");
    d.on_feed(0, down());
    assert_eq!(ids(&d.service), ["old"]);

    let reset = WatchEvent::Reset(vec![Entry {
        key: "k/new".into(),
        value: Ok(instance("new", 2)),
    }]);
    d.on_feed(1, Feed::Up(reset));
    assert_eq!(ids(&d.service), ["new"]);
    assert!(d.service.stale_since().is_none());
    assert!(d.service.listed_at() > Some(listed_at));
}

#[tokio::test(start_paused = true)]
async fn failover_serves_the_snapshot_and_saves_the_first_listing() {
    let dir = tempfile::tempdir().expect("tempdir");
    saved(dir.path(), vec![instance("old", 1)]);
    let registry = fixed(false, vec![instance("new", 2)]);
    let d = discovery(DiscoveryMode::Failover, vec![registry.clone()]).with_last_known(dir.path());
    let service = d.service.clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(d.run(shutdown.clone()));
    while ids(&service) != ["old"] {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(service.stale_since().is_some());
    registry.up.store(true, Ordering::SeqCst);
    while ids(&service) != ["new"] {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(service.stale_since().is_none());
    shutdown.cancel();
    task.await.expect("discovery ends on shutdown");
    let on_disk = LastKnown::new(dir.path(), "svc")
        .load()
        .expect("load")
        .expect("a snapshot");
    assert_eq!(on_disk.instances, [instance("new", 2)]);
}

#[test]
fn without_a_snapshot_a_failed_first_listing_serves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d =
        discovery(DiscoveryMode::Merge, vec![fixed(false, Vec::new())]).with_last_known(dir.path());
    d.on_feed(0, Feed::Down(RegistryError::Unavailable("down".into())));
    assert!(ids(&d.service).is_empty());
    assert!(d.service.stale_since().is_none());
}
