//! Nacos backend, through the server's 1.x HTTP Open API (which Nacos 2.x
//! and r-nacos still serve): plain requests over the same hyper client the
//! Consul backend uses, no gRPC connection to keep.
//!
//! **Registration** is an *ephemeral* instance:
//! `POST /nacos/v1/ns/instance` with `ephemeral=true`, the service name,
//! group, namespace, ip, port, weight, `enabled` (false while draining, so
//! Nacos clients stop picking it), `healthy` and the metadata below. The
//! "lease" is the heartbeat: every refresh first reads our instance back
//! (`GET /nacos/v1/ns/instance`) and then beats
//! (`PUT /nacos/v1/ns/instance/beat`, with the full beat info). The read
//! is what tells a lost registration: Nacos (and r-nacos) re-create a
//! missing instance from a beat alone, with the beat's metadata but not
//! its `enabled` or weight, so beating blindly after a server restart
//! would bring a draining instance back into rotation. A read that finds
//! nothing (404, or the 500 Nacos 1.x and r-nacos answer for a missing
//! instance), or finds other fields than we wrote, is
//! [`RegistryError::LeaseLost`] and the registration loop registers
//! again, which rewrites every field. A beat answered with code 20404 is
//! the same. Status changes register again (the Open API's register is an
//! upsert). Deregistering is `DELETE /nacos/v1/ns/instance`.
//!
//! squire's ttl travels as Nacos's per-instance heartbeat settings
//! (`preserved.heart.beat.interval` ttl/3, `preserved.heart.beat.timeout`
//! ttl, `preserved.ip.delete.timeout` 2×ttl), which Nacos honours; r-nacos
//! uses its server-wide `RNACOS_NAMING_HEALTH_TIMEOUT_SECOND` (15 s) and
//! `RNACOS_NAMING_INSTANCE_TIMEOUT_SECOND` (30 s) instead.
//!
//! **The value**: Nacos instances are ip, port, weight, healthy, enabled
//! and a flat string map, so Knight's `ServiceInfo` fields that Nacos has
//! no field for travel in the metadata: `id`, `version`, `tags` (a JSON
//! array), `status` (Knight's four) and `squire_status` (squire's finer
//! state, only when it differs), beside the service's own pairs (config
//! validation refuses those reserved keys). Reading builds the
//! `ServiceInfo` JSON back and parses it with the registry value's own
//! rules (`registry::wire`), so an unknown status or tags that are not a
//! JSON array make the entry an error (skipped and counted), and an
//! instance registered by a plain Nacos client (no such keys) reads as
//! healthy with its Nacos `instanceId` as id. Nacos's own flags then
//! weigh in: `enabled=false` is draining, `healthy=false` (no heartbeat for
//! the server's health timeout) is unhealthy.
//!
//! **Discovery** polls `GET /nacos/v1/ns/instance/list` every
//! `poll_interval` (`healthyOnly=false`) and yields a
//! [`WatchEvent::Reset`](super::WatchEvent::Reset) whenever the set
//! changed. The Open API's push is UDP to an address the server must
//! reach, and its gRPC push needs Nacos's own bidirectional protocol; a
//! poll works through any proxy, and a broken one re-lists as every
//! watch does. Nacos lists only enabled instances, so a draining instance
//! leaves the snapshot rather than showing as draining (it gets no new
//! connections either way).
//!
//! **Auth**: with `username`/`password`, `POST /nacos/v1/auth/login`
//! (form body) gives an `accessToken`, sent as the `accessToken` query
//! parameter on every call and renewed before its `tokenTtl` runs out, or
//! at once when a call is answered 403. The password goes only in that
//! body; errors name the method and path, never the query.
//!
//! # Layout
//!
//! - `api`: the HTTP client, the token, one request and its answer.
//! - `wire`: instances to Open API parameters and metadata, and back.
//! - `lease`: our instance and its heartbeat.
//! - `watch`: the polling loop of one service.

mod api;
mod lease;
mod watch;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Instance, Lease, Registry, RegistryError, Watch};
use crate::config::NacosConfig;
use api::Api;
use lease::NacosLease;
use watch::NacosWatch;
pub use wire::RESERVED_METADATA;

/// Nacos refuses weights above this.
pub const MAX_WEIGHT: u32 = 10_000;

pub struct NacosRegistry {
    api: Arc<Api>,
    ttl: Duration,
    poll_interval: Duration,
}

impl NacosRegistry {
    pub fn new(config: &NacosConfig, ttl: Duration, timeout: Duration) -> Self {
        NacosRegistry {
            api: Arc::new(Api::new(config, timeout)),
            ttl,
            poll_interval: config.poll_interval,
        }
    }
}

#[async_trait]
impl Registry for NacosRegistry {
    fn kind(&self) -> &'static str {
        "nacos"
    }

    fn target(&self) -> String {
        let namespace = self.api.namespace.as_deref().unwrap_or("public");
        format!(
            "{} (namespace {namespace}, group {})",
            self.api.address, self.api.group
        )
    }

    async fn register(&self, instance: &Instance) -> Result<Box<dyn Lease>, RegistryError> {
        Ok(Box::new(
            NacosLease::register(self.api.clone(), instance, self.ttl).await?,
        ))
    }

    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError> {
        Ok(Box::new(
            NacosWatch::start(self.api.clone(), service, self.poll_interval).await?,
        ))
    }
}
