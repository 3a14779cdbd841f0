//! One upstream service as listeners see it: which of its instances they
//! may use ([`Filter`]), the [`Balancer`] that picks among them, and the
//! current [`Snapshot`].
//!
//! The agent builds one per `[[upstream]]` and one per HTTP route service,
//! discovery writes it ([`Upstream::refresh`]) and listeners read it
//! ([`Upstream::snapshot`], one atomic load). Whoever keeps state per
//! instance beyond the snapshot (the HTTP connection pool) follows
//! [`Upstream::changes`] to let go of instances that left.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{Balancer, Filter, Snapshot};
use crate::registry::Instance;

pub struct Upstream {
    service: String,
    filter: Filter,
    balancer: Balancer,
    snapshot: ArcSwap<Snapshot>,
    /// Bumped after every rebuild.
    generation: watch::Sender<u64>,
}

impl Upstream {
    pub fn new(service: impl Into<String>, filter: Filter, balancer: Balancer) -> Self {
        Upstream {
            service: service.into(),
            filter,
            balancer,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            generation: watch::Sender::new(0),
        }
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
        self.snapshot.load_full()
    }

    /// Rebuilds the snapshot from every known instance of the service
    /// (sorted by id; stats carried by instance id, the strategy's tables
    /// built here rather than per pick), swaps it in and tells whoever
    /// follows [`changes`](Upstream::changes).
    pub fn refresh(&self, instances: &[Instance]) {
        let previous = self.snapshot.load_full();
        let next = Snapshot::rebuild(&previous, instances, &self.filter, &self.balancer);
        self.balancer.rebase(&previous, &next);
        self.snapshot.store(Arc::new(next));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Marks every rebuild: `changed()` on the receiver resolves after the
    /// next one.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
