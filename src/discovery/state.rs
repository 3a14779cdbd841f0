//! [`ServiceState`] and [`SourceState`]: the admin read model of one
//! discovered service, written by its [`super::Discovery`] task.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::catalog::CatalogFeed;
use super::Source;
use crate::balance::{Refusal, Resolved};
use crate::config::DiscoveryMode;
use crate::registry::Instance;

/// Everything known of one service, for the admin API.
pub struct ServiceState {
    pub name: String,
    pub mode: DiscoveryMode,
    pub(super) instances: ArcSwap<Vec<Instance>>,
    pub(super) watch_up: AtomicBool,
    pub(super) updated_at: Mutex<Option<SystemTime>>,
    pub(super) listed_at: Mutex<Option<SystemTime>>,
    pub(super) stale_since: Mutex<Option<SystemTime>>,
    pub(super) sources: Vec<SourceState>,
    /// The instances as last handed to the upstreams, with their addresses.
    pub(super) resolved: ArcSwap<Vec<Resolved>>,
    /// What each host name of the instances resolves to, by name. Kept
    /// here so a discovery restarted by a reload starts from them.
    pub(super) names: Mutex<BTreeMap<String, Resolution>>,
    /// Instances the endpoint policy refuses now, by id and reason.
    pub(super) refused: Mutex<Vec<RefusedEntry>>,
    /// What `/v1/catalog` answers, and its index.
    pub(super) catalog: CatalogFeed,
}

/// What one host name resolved to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// The addresses of the last lookup that gave some; a later failure
    /// keeps them (a DNS outage takes no working route away).
    pub addrs: Option<Arc<[IpAddr]>>,
    /// Why the last lookup failed, until one succeeds.
    pub error: Option<String>,
    /// When the last lookup ended.
    pub at: Option<SystemTime>,
}

/// An instance the endpoint policy refuses, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedEntry {
    pub id: String,
    pub address: String,
    pub reason: Refusal,
    /// Listen addresses of the upstreams that refuse it (several may
    /// read the service, each with its own ranges).
    pub listeners: Vec<String>,
}

/// What one registry gives one service, for the admin API.
pub struct SourceState {
    pub name: String,
    pub kind: &'static str,
    pub(super) watch_up: AtomicBool,
    pub(super) serving: AtomicBool,
    pub(super) last_error: Mutex<Option<String>>,
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
            listed_at: Mutex::new(None),
            stale_since: Mutex::new(None),
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
            resolved: ArcSwap::from_pointee(Vec::new()),
            names: Mutex::new(BTreeMap::new()),
            refused: Mutex::new(Vec::new()),
            catalog: CatalogFeed::default(),
        }
    }

    /// Takes over what `other` (the state of the same service before the
    /// registries changed) knows of host names, so they need not resolve
    /// again before the instances using them are routed.
    pub fn with_names_of(self, other: &ServiceState) -> Self {
        *lock(&self.names) = lock(&other.names).clone();
        self
    }

    /// Starts from `other`'s catalog view (index included), so a reload
    /// that gives the service a new state does not set its index back or
    /// show its instances gone before the new registries list them.
    pub fn with_catalog_of(self, other: &ServiceState) -> Self {
        self.catalog.take_over(&other.catalog);
        self
    }

    /// The catalog of the service: the instances the endpoint policy
    /// admits, at an index that grows with every change (`/v1/catalog`).
    pub fn catalog(&self) -> &CatalogFeed {
        &self.catalog
    }

    /// The instances with the addresses last handed to the upstreams: what
    /// a new upstream of the service starts from.
    pub fn resolved(&self) -> Arc<Vec<Resolved>> {
        self.resolved.load_full()
    }

    /// Every host name of the instances and what it resolved to.
    pub fn names(&self) -> BTreeMap<String, Resolution> {
        lock(&self.names).clone()
    }

    /// The instances refused now, by id.
    pub fn refused(&self) -> Vec<RefusedEntry> {
        lock(&self.refused).clone()
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

    /// When a registry gave the instance set in service (its last change);
    /// while stale, when the set on disk was listed.
    pub fn listed_at(&self) -> Option<SystemTime> {
        *self.listed_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Since when the service is served from the last known instances on
    /// disk, because no registry has listed it since startup.
    pub fn stale_since(&self) -> Option<SystemTime> {
        *self.stale_since.lock().unwrap_or_else(|p| p.into_inner())
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data: a panic elsewhere mid-update leaves it usable.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
