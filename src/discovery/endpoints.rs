//! [`Endpoints`]: the instance set discovery publishes, turned into the
//! snapshots of the service's upstreams, with every address resolved and
//! checked.
//!
//! It runs beside the registry loops of [`super::Discovery`] and rebuilds
//! when the instance set changes, when a host name resolves to something
//! else (see [`super::resolve`]), and when this squire's own addresses
//! change (a reload bound a listener). Each upstream applies the endpoint
//! policy as it builds its snapshot ([`crate::balance::policy`]); what they
//! refuse is logged and counted once per instance and reason, not at every
//! rebuild, and shown in `/v1/services`. What they admit is the service's
//! catalog (`/v1/catalog`), published last.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::resolve::Resolver;
use super::state::{RefusedEntry, ServiceState};
use crate::balance::{OwnAddrs, Refusal, Resolved, Upstream};
use crate::metrics as m;
use crate::registry::Instance;

pub(super) struct Endpoints {
    service: Arc<ServiceState>,
    upstreams: Vec<Arc<Upstream>>,
    instances: watch::Receiver<Arc<Vec<Instance>>>,
    own: watch::Receiver<Arc<OwnAddrs>>,
    resolver: Resolver,
    /// What the upstreams were last built from.
    built: Option<(Vec<Resolved>, Arc<OwnAddrs>)>,
}

impl Endpoints {
    pub(super) fn new(
        service: Arc<ServiceState>,
        upstreams: Vec<Arc<Upstream>>,
        instances: watch::Receiver<Arc<Vec<Instance>>>,
        own: watch::Receiver<Arc<OwnAddrs>>,
        dns_refresh: Duration,
    ) -> Self {
        Endpoints {
            resolver: Resolver::new(service.clone(), dns_refresh),
            service,
            upstreams,
            instances,
            own,
            built: None,
        }
    }

    /// Rebuilds whenever something it builds from changes, until
    /// `shutdown` or until discovery stops publishing.
    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        // Restarted (a reload gave the service new upstreams): build them
        // from what is in service, so their refusals are reported. A first
        // start has nothing in service yet, and builds nothing until the
        // registries say something: an outage never empties an upstream.
        if !self.instances.borrow().is_empty() {
            self.rebuild();
        }
        // Agent-less uses (tests) have no sender of our own addresses.
        let mut own_open = true;
        loop {
            let refresh_at = self.resolver.refresh_at();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = self.instances.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.rebuild();
                }
                changed = self.own.changed(), if own_open => {
                    match changed {
                        Ok(()) => self.rebuild(),
                        Err(_) => own_open = false,
                    }
                }
                changed = self.resolver.next() => if changed {
                    self.rebuild();
                },
                _ = tokio::time::sleep_until(refresh_at) => self.resolver.refresh(),
            }
        }
    }

    /// Resolves what it can now and rebuilds every upstream, unless
    /// nothing they are built from changed.
    fn rebuild(&mut self) {
        let instances = self.instances.borrow_and_update().clone();
        let own = self.own.borrow_and_update().clone();
        let resolved = self.resolver.resolve(&instances);
        if let Some((last, last_own)) = &self.built {
            if *last == resolved && **last_own == *own {
                return;
            }
        }
        let mut refused: BTreeMap<(String, Refusal), RefusedEntry> = BTreeMap::new();
        for upstream in &self.upstreams {
            for r in upstream.refresh(&resolved, &own) {
                let entry =
                    refused
                        .entry((r.id.clone(), r.reason))
                        .or_insert_with(|| RefusedEntry {
                            id: r.id,
                            address: r.address,
                            reason: r.reason,
                            listeners: Vec::new(),
                        });
                entry.listeners.extend(upstream.listen().map(str::to_owned));
            }
        }
        let catalog: Vec<Instance> = resolved
            .iter()
            .filter(|r| !refused.keys().any(|(id, _)| *id == r.instance.id))
            .map(|r| r.instance.clone())
            .collect();
        let refused_ids = refused.keys().cloned().collect();
        self.report(refused);
        self.service.resolved.store(Arc::new(resolved.clone()));
        self.service.catalog.publish(catalog, refused_ids);
        self.built = Some((resolved, own));
    }

    /// Logs and counts the refusals not already refused for the same
    /// reason, and shows them all.
    fn report(&self, refused: BTreeMap<(String, Refusal), RefusedEntry>) {
        let name = &self.service.name;
        let mut shown = self
            .service
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for entry in refused.values() {
            let before = shown
                .iter()
                .any(|s| s.id == entry.id && s.reason == entry.reason);
            if !before {
                tracing::warn!(service = %name, instance = %entry.id, address = %entry.address, reason = %entry.reason, listeners = ?entry.listeners, "refusing a registry entry: it will not be dialled");
                metrics::counter!(m::ENTRIES_REFUSED, "service" => name.clone(), "reason" => entry.reason.as_str())
                    .increment(1);
            }
        }
        *shown = refused.into_values().collect();
    }
}
