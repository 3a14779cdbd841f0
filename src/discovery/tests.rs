//! Unit tests of the discovery loops with an in-memory registry.

use std::sync::atomic::AtomicBool;

use async_trait::async_trait;

use super::*;
use crate::registry::{Entry, Lease};

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
