//! [`ServiceState`] and [`SourceState`]: the admin read model of one
//! discovered service, written by its [`super::Discovery`] task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::Source;
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
