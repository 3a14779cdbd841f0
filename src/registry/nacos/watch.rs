//! Discovery from Nacos: `instance/list` every `poll_interval`, each answer
//! that differs from the last one [`WatchEvent::Reset`] with the full set.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::{Method, StatusCode};

use super::api::Api;
use super::wire::list_entries;
use crate::registry::{Entry, RegistryError, Watch, WatchEvent};

const LIST: &str = "/nacos/v1/ns/instance/list";

pub(super) struct NacosWatch {
    api: Arc<Api>,
    service: String,
    poll_interval: Duration,
    /// The last set yielded; `initial` until the first `next`.
    last: Vec<Entry>,
    initial: bool,
}

impl NacosWatch {
    /// Lists `service` once: an unreachable server shows up here, as a
    /// failed listing does for the other backends.
    pub(super) async fn start(
        api: Arc<Api>,
        service: &str,
        poll_interval: Duration,
    ) -> Result<NacosWatch, RegistryError> {
        let mut watch = NacosWatch {
            api,
            service: service.to_owned(),
            poll_interval,
            last: Vec::new(),
            initial: true,
        };
        watch.last = watch.list().await?;
        Ok(watch)
    }

    async fn list(&self) -> Result<Vec<Entry>, RegistryError> {
        let params = [
            ("serviceName", self.service.clone()),
            ("groupName", self.api.group.clone()),
            ("healthyOnly", "false".to_owned()),
        ];
        let answer = self.api.call(Method::GET, LIST, &params).await?;
        if answer.status != StatusCode::OK {
            return Err(answer.error("listing the service"));
        }
        list_entries(&self.service, &answer.body)
    }
}

#[async_trait]
impl Watch for NacosWatch {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        if std::mem::take(&mut self.initial) {
            return Ok(WatchEvent::Reset(self.last.clone()));
        }
        loop {
            tokio::time::sleep(self.poll_interval).await;
            let entries = self.list().await?;
            if entries != self.last {
                self.last = entries.clone();
                return Ok(WatchEvent::Reset(entries));
            }
        }
    }
}
