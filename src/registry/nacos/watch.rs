//! Discovery from Nacos: `instance/list` every `poll_interval`, and at
//! once on each push for the service (`push.rs`); each answer that
//! differs from the last one is a [`WatchEvent::Reset`] with the full set.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::{Method, StatusCode};

use tokio::sync::watch;

use super::api::Api;
use super::push::Push;
use super::wire::list_entries;
use crate::registry::{Entry, RegistryError, Watch, WatchEvent};

const LIST: &str = "/nacos/v1/ns/instance/list";

pub(super) struct NacosWatch {
    api: Arc<Api>,
    service: String,
    poll_interval: Duration,
    /// Changes on each push for the service; `None` with push off (or
    /// once the subscription is gone with its registry).
    pushes: Option<(Arc<Push>, watch::Receiver<u64>)>,
    /// The last set yielded; `initial` until the first `next`.
    last: Vec<Entry>,
    initial: bool,
}

impl NacosWatch {
    /// Subscribes `service` (with `push`), then lists it once: an
    /// unreachable server shows up here, as a failed listing does for the
    /// other backends. Subscribing first means a change between the list
    /// and the server's subscription still makes the watch list again.
    pub(super) async fn start(
        api: Arc<Api>,
        push: Option<Arc<Push>>,
        service: &str,
        poll_interval: Duration,
    ) -> Result<NacosWatch, RegistryError> {
        let pushes = push.map(|push| {
            let changes = push.subscribe(service);
            (push, changes)
        });
        let mut watch = NacosWatch {
            api,
            service: service.to_owned(),
            poll_interval,
            pushes,
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
            // A push or the poll interval, whichever comes first. Both are
            // cancel-safe: a push seen and then canceled is seen again.
            let poll_interval = self.poll_interval;
            let pushes = &mut self.pushes;
            let pushed = async {
                match pushes {
                    Some((_, changes)) => changes.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let alive = tokio::select! {
                () = tokio::time::sleep(poll_interval) => true,
                alive = pushed => alive,
            };
            if !alive {
                // The subscription is gone: poll only.
                self.pushes = None;
                continue;
            }
            let entries = self.list().await?;
            if entries != self.last {
                self.last = entries.clone();
                return Ok(WatchEvent::Reset(entries));
            }
        }
    }
}
