//! Consul backend, through the local agent's HTTP API.
//!
//! **Registration** goes through the agent, not the catalog:
//! `PUT /v1/agent/service/register` with our ID, Name, Address, Port, Tags,
//! Meta (the metadata plus `version`), Weights and one TTL check of `ttl`
//! carrying `DeregisterCriticalServiceAfter`. The "lease" is that check:
//! every refresh is `PUT /v1/agent/check/{pass|warn|fail}/service:<id>` by our
//! status, with an output that never changes for a status (Consul defers an
//! output-only change by minutes, and an unchanged one costs the catalog
//! nothing). A 404 there means the agent forgot us (restarted empty, or
//! reaped us after `deregister_critical_after`): [`RegistryError::LeaseLost`],
//! and the registration loop registers again. `draining` is Consul's
//! maintenance mode (`PUT /v1/agent/service/maintenance/:id`), which takes
//! the instance out of `?passing` while its own check keeps passing.
//! Deregistering treats 404 as success: the service is already gone.
//!
//! **Discovery** is a blocking query loop on `/v1/health/service/:name`
//! (`index` + `wait`), following the rules of Consul's blocking-query
//! documentation: the index is clamped to at least 1, reset to 0 when it goes
//! backwards (a restored or rebuilt cluster), each query is bounded by
//! `wait + wait/16` plus the registry timeout, and queries are rate-limited
//! by a token bucket. Every answer whose index moved becomes one
//! [`WatchEvent::Reset`](super::WatchEvent::Reset) with the full set.
//!
//! We ask for every instance, not `?passing`: Consul's filter drops
//! `warning` instances, which an upstream may opt into
//! (`statuses = ["healthy", "warning"]`), and hides unhealthy ones from
//! `/v1/services`. The status is derived from each entry's checks and the
//! upstream's filter decides, as with the other backends; `?passing` would
//! not save wake-ups either, since Consul applies it after the blocking step.
//! Tags are filtered by the upstream too: one watch serves every upstream of
//! a service, each with its own tags.
//!
//! The ACL token goes in the `X-Consul-Token` header, marked sensitive, and
//! nowhere else: not in URLs, errors or logs.
//!
//! # Layout
//!
//! - `api`: the HTTP client (plain or rustls), one request, its answer.
//! - `wire`: the JSON Consul takes and gives, and its rules for Meta.
//! - `lease`: our service and its TTL check, kept passing by status.
//! - `watch`: the blocking-query loop of one service.

mod api;
mod lease;
mod watch;
pub(crate) mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Instance, Lease, Registry, RegistryError, Watch};
use crate::config::ConsulConfig;
use api::Api;
use lease::ConsulLease;
use watch::ConsulWatch;
pub use wire::meta_problem;

/// Consul caps `wait` at 10 minutes.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's limit on Meta pairs (ours carry the metadata and `version`).
pub const MAX_META_PAIRS: usize = 64;

pub struct ConsulRegistry {
    api: Arc<Api>,
    ttl: Duration,
    deregister_critical_after: Duration,
}

impl ConsulRegistry {
    pub fn new(config: &ConsulConfig, ttl: Duration, timeout: Duration) -> Self {
        ConsulRegistry {
            api: Arc::new(Api::new(config, timeout)),
            ttl,
            deregister_critical_after: config.deregister_critical_after,
        }
    }
}

#[async_trait]
impl Registry for ConsulRegistry {
    fn kind(&self) -> &'static str {
        "consul"
    }

    fn target(&self) -> String {
        match &self.api.datacenter {
            Some(dc) => format!("{} (dc {dc})", self.api.address),
            None => self.api.address.clone(),
        }
    }

    async fn register(&self, instance: &Instance) -> Result<Box<dyn Lease>, RegistryError> {
        let lease = ConsulLease::register(
            self.api.clone(),
            instance,
            self.ttl,
            self.deregister_critical_after,
        )
        .await?;
        Ok(Box::new(lease))
    }

    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError> {
        Ok(Box::new(
            ConsulWatch::start(self.api.clone(), service).await?,
        ))
    }
}
