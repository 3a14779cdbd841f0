//! Nacos backend, through the server's 1.x HTTP Open API (which Nacos 2.x
//! and r-nacos still serve): plain requests over the same hyper client the
//! Consul backend uses; and, for discovery by push only, Nacos 2.x's gRPC
//! connection.
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
//! **Discovery** lists `GET /nacos/v1/ns/instance/list`
//! (`healthyOnly=false`) and yields a
//! [`WatchEvent::Reset`](super::WatchEvent::Reset) whenever the set
//! changed. It lists every `poll_interval`, and, with `push` on (the
//! default for an `http://` address), at once when the server pushes a
//! change of the service over its Nacos 2.x gRPC connection (`push`: one
//! connection per registry, on the HTTP port plus 1000 unless
//! `grpc_port` says otherwise). A push only wakes the watch; the list is
//! the one source of the snapshot, so push and poll cannot disagree. With
//! the gRPC connection down the watch polls as before, and with the
//! server down the list fails and discovery keeps the last snapshot.
//! Nacos lists only enabled instances, so a draining instance leaves the
//! snapshot rather than showing as draining (it gets no new connections
//! either way).
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
//! - `push`: the gRPC subscription of a registry's watched services.
//! - `watch`: the list loop of one service: polled, woken by pushes.

mod api;
mod lease;
mod push;
mod watch;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Instance, Lease, Registry, RegistryError, Watch};
use crate::config::NacosConfig;
use api::Api;
use lease::NacosLease;
use push::Push;
use watch::NacosWatch;
pub use wire::RESERVED_METADATA;

/// Nacos refuses weights above this.
pub const MAX_WEIGHT: u32 = 10_000;

pub struct NacosRegistry {
    api: Arc<Api>,
    ttl: Duration,
    poll_interval: Duration,
    /// The push subscription its watches share; `None` with `push = false`.
    push: Option<Arc<Push>>,
}

impl NacosRegistry {
    pub fn new(config: &NacosConfig, ttl: Duration, timeout: Duration) -> Self {
        let api = Arc::new(Api::new(config, timeout));
        let push = config
            .push
            .then(|| Arc::new(Push::new(api.clone(), config.grpc_port, timeout)));
        NacosRegistry {
            api,
            ttl,
            poll_interval: config.poll_interval,
            push,
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
            NacosWatch::start(
                self.api.clone(),
                self.push.clone(),
                service,
                self.poll_interval,
            )
            .await?,
        ))
    }
}
