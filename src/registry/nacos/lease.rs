//! Our ephemeral instance in Nacos and its heartbeat: read back, then beat.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::{Method, StatusCode};
use serde::Deserialize;

use super::api::Api;
use super::wire::{beat_params, key_params, register_params, Host, BEAT_NOT_FOUND, CLUSTER};
use crate::registry::{Instance, Lease, RegistryError};

const INSTANCE: &str = "/nacos/v1/ns/instance";
const BEAT: &str = "/nacos/v1/ns/instance/beat";

pub(super) struct NacosLease {
    api: Arc<Api>,
    instance: Instance,
    ttl: Duration,
}

#[derive(Deserialize)]
struct BeatAnswer {
    #[serde(default)]
    code: Option<i64>,
}

impl NacosLease {
    pub(super) async fn register(
        api: Arc<Api>,
        instance: &Instance,
        ttl: Duration,
    ) -> Result<NacosLease, RegistryError> {
        let lease = NacosLease {
            api,
            instance: instance.clone(),
            ttl,
        };
        lease.put().await?;
        Ok(lease)
    }

    /// Registers (or rewrites) every field of our instance.
    async fn put(&self) -> Result<(), RegistryError> {
        let params = register_params(&self.instance, &self.api.group, self.ttl);
        let answer = self.api.call(Method::POST, INSTANCE, &params).await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            _ => Err(answer.error("registering the instance")),
        }
    }

    /// Reads our instance back: `LeaseLost` when Nacos does not have it,
    /// or has other fields than we wrote.
    async fn check(&self) -> Result<(), RegistryError> {
        let params = key_params(&self.instance, &self.api.group);
        let answer = self.api.call(Method::GET, INSTANCE, &params).await?;
        let lost = |why: String| {
            Err(RegistryError::LeaseLost(format!(
                "Nacos {why} instance {}:{} of {}",
                self.instance.host, self.instance.port, self.instance.name
            )))
        };
        match answer.status {
            StatusCode::OK => {}
            // Nacos 2.x says 404; Nacos 1.x and r-nacos a 500 for a missing
            // instance. Registering again is harmless if it was something
            // else.
            StatusCode::NOT_FOUND | StatusCode::INTERNAL_SERVER_ERROR => {
                return lost(format!("does not have ({})", answer.text()))
            }
            _ => return Err(answer.error("reading the instance back")),
        }
        match serde_json::from_slice::<Host>(&answer.body) {
            Ok(host) if host.is_as_written(&self.instance, self.ttl) => Ok(()),
            Ok(_) => lost("holds other fields than squire wrote for".to_owned()),
            Err(e) => Err(RegistryError::Unavailable(format!(
                "reading the instance back: not an instance: {e}"
            ))),
        }
    }

    async fn beat(&self) -> Result<(), RegistryError> {
        let params = beat_params(&self.instance, &self.api.group, self.ttl);
        let answer = self.api.call(Method::PUT, BEAT, &params).await?;
        if answer.status != StatusCode::OK {
            return Err(answer.error("sending the heartbeat"));
        }
        let code = serde_json::from_slice::<BeatAnswer>(&answer.body)
            .ok()
            .and_then(|a| a.code);
        if code == Some(BEAT_NOT_FOUND) {
            return Err(RegistryError::LeaseLost(format!(
                "Nacos does not know instance {}:{} of {}",
                self.instance.host, self.instance.port, self.instance.name
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Lease for NacosLease {
    fn id(&self) -> String {
        format!(
            "{}#{}#{CLUSTER}#{}@@{}",
            self.instance.host, self.instance.port, self.api.group, self.instance.name
        )
    }

    async fn keep_alive(&mut self) -> Result<(), RegistryError> {
        self.check().await?;
        self.beat().await
    }

    async fn update(&mut self, instance: &Instance) -> Result<(), RegistryError> {
        self.instance = instance.clone();
        self.put().await
    }

    async fn revoke(self: Box<Self>) -> Result<(), RegistryError> {
        let params = key_params(&self.instance, &self.api.group);
        let answer = self.api.call(Method::DELETE, INSTANCE, &params).await?;
        match answer.status {
            // 404: already gone (expired, or the server restarted empty).
            StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(answer.error("deregistering the instance")),
        }
    }
}
