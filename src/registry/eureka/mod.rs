//! Eureka backend, through its REST operations (JSON).
//!
//! **Registration**: `POST {url}/apps/{APP}` with our instance document
//! (app name upper-cased, `instanceId` our id, `ipAddr`, `port` with
//! `@enabled`, a lease of `ttl` seconds renewed every ttl/3, and `metadata`
//! carrying our metadata plus `squire.tags`, `squire.version`,
//! `squire.weight` and `squire.status`). The "lease" is Eureka's: a renewal
//! `PUT {url}/apps/{APP}/{id}` every ttl/3, and a 404 there means Eureka
//! forgot us (expired, evicted, restarted): the registration loop registers
//! again. Our status is Eureka's UP (healthy, warning), DOWN (unhealthy,
//! critical), STARTING (unknown), written by registering the document
//! again; `draining` is Eureka's OUT_OF_SERVICE status override (`PUT
//! .../status?value=OUT_OF_SERVICE`, removed with `DELETE .../status`), the
//! way Eureka operators take an instance out of traffic. Deregistering is
//! `DELETE {url}/apps/{APP}/{id}`.
//!
//! **Discovery** polls, since Eureka has no watch (see [`poll`]): a full
//! fetch, then deltas checked against the apps hash code, every
//! `poll_interval` (default 5 s).
//!
//! No Eureka server can be installed on the machines this is tested on: the
//! tests run against an in-process fake that follows the Eureka REST
//! operations documentation (`tests/support/eureka.rs`, itself checked in
//! `tests/eureka_fake.rs`).

mod api;
mod lease;
mod poll;
pub(crate) mod wire;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{Instance, Lease, Registry, RegistryError, Watch};
use crate::config::EurekaConfig;
use api::Api;
use lease::EurekaLease;
use poll::Poller;

pub struct EurekaRegistry {
    api: Arc<Api>,
    ttl: Duration,
    poll_interval: Duration,
    /// Started by the first watch: an agent that only registers never polls.
    poller: Mutex<Option<Arc<Poller>>>,
}

impl EurekaRegistry {
    pub fn new(config: &EurekaConfig, ttl: Duration, timeout: Duration) -> Self {
        EurekaRegistry {
            api: Arc::new(Api::new(&config.url, timeout)),
            ttl,
            poll_interval: config.poll_interval,
            poller: Mutex::new(None),
        }
    }

    fn poller(&self) -> Arc<Poller> {
        // Plain data: a panic elsewhere mid-update leaves it usable.
        let mut poller = self.poller.lock().unwrap_or_else(|p| p.into_inner());
        poller
            .get_or_insert_with(|| Arc::new(Poller::start(self.api.clone(), self.poll_interval)))
            .clone()
    }
}

#[async_trait]
impl Registry for EurekaRegistry {
    fn kind(&self) -> &'static str {
        "eureka"
    }

    fn target(&self) -> String {
        self.api.url.clone()
    }

    async fn register(&self, instance: &Instance) -> Result<Box<dyn Lease>, RegistryError> {
        let lease = EurekaLease::register(self.api.clone(), instance, self.ttl.as_secs()).await?;
        Ok(Box::new(lease))
    }

    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError> {
        // A poll is a timeout at most, plus the wait for it to start.
        let wait = self.api.timeout + self.poll_interval;
        Ok(Box::new(self.poller().watch(service, wait).await?))
    }
}
