//! Discovery from Eureka, which has no watch: one poller per registry
//! keeps a copy of the whole registry, as Eureka's own clients do, and
//! each service's [`EurekaWatch`] reads its application from it.
//!
//! The poller fetches everything once (`GET /apps`), then every
//! `poll_interval` only the recent changes (`GET /apps/delta`), applies
//! them, and checks the copy's apps hash code against the server's: a
//! mismatch (a delta missed or applied out of order) fetches everything
//! again. A failed poll publishes the error, and the next poll fetches
//! everything: a gap is never trusted. Watches keep nothing of their own
//! beyond what they last reported, so any number of upstreams of any
//! number of services cost one request per interval.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::{Method, StatusCode};
use tokio::sync::watch;

use super::api::Api;
use super::wire::{app_name, applications, Apps};
use crate::registry::{Entry, RegistryError, Watch, WatchEvent};

/// What the poller last learnt: the registry's copy, or why the last poll
/// failed. Every poll publishes one, so a watch opened after a failure
/// waits for the next poll instead of repeating the same error.
#[derive(Clone)]
pub(super) struct Polled {
    pub apps: Result<Arc<Apps>, String>,
}

pub(super) struct Poller {
    polled: watch::Receiver<Option<Polled>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Poller {
    pub fn start(api: Arc<Api>, interval: Duration) -> Poller {
        let (tx, polled) = watch::channel(None);
        let task = tokio::spawn(run(api, interval, tx));
        Poller {
            polled,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// A watch of `service`: once the poller has a copy, its entries first.
    pub async fn watch(&self, service: &str, wait: Duration) -> Result<EurekaWatch, RegistryError> {
        let mut polled = self.polled.clone();
        let first = {
            let now = polled.borrow_and_update().clone();
            match now {
                Some(Polled { apps: Ok(apps) }) => Ok(apps),
                // No copy yet, or the last poll failed: the next poll says.
                _ => {
                    let next = tokio::time::timeout(wait, polled.changed()).await;
                    match (next, polled.borrow_and_update().clone()) {
                        (Ok(Ok(())), Some(Polled { apps })) => apps,
                        (Err(_), _) => Err(format!("no poll of Eureka answered within {wait:?}")),
                        _ => Err("the Eureka poller stopped".to_owned()),
                    }
                }
            }
        }
        .map_err(RegistryError::Unavailable)?;
        let app = app_name(service);
        let entries = entries(&first, &app);
        Ok(EurekaWatch {
            polled,
            app,
            last: entries.clone(),
            initial: Some(entries),
        })
    }
}

async fn run(api: Arc<Api>, interval: Duration, tx: watch::Sender<Option<Polled>>) {
    let mut copy: Option<Apps> = None;
    loop {
        let result = poll(&api, copy.take()).await;
        let apps = match result {
            Ok(apps) => {
                let shared = Arc::new(apps.clone());
                copy = Some(apps);
                Ok(shared)
            }
            Err(e) => {
                tracing::debug!(url = %api.url, error = %e, "polling Eureka failed");
                Err(e.to_string())
            }
        };
        tx.send_replace(Some(Polled { apps }));
        tokio::time::sleep(interval).await;
    }
}

/// One poll: a delta applied to `copy` if the hash codes then agree, else
/// (or without a copy) a full fetch.
async fn poll(api: &Api, copy: Option<Apps>) -> Result<Apps, RegistryError> {
    if let Some(mut copy) = copy {
        let (delta, hash) = fetch(api, "/apps/delta").await?;
        copy.apply(delta);
        let ours = copy.hash_code();
        if hash.as_deref() == Some(ours.as_str()) {
            return Ok(copy);
        }
        tracing::debug!(url = %api.url, server = ?hash, ours, "Eureka apps hash codes differ after a delta; fetching everything");
    }
    let (all, _) = fetch(api, "/apps").await?;
    Ok(Apps::from_fetch(all))
}

async fn fetch(
    api: &Api,
    path: &str,
) -> Result<(Vec<super::wire::Fetched>, Option<String>), RegistryError> {
    let answer = api.call(Method::GET, path, None).await?;
    if answer.status != StatusCode::OK {
        return Err(answer.error("fetching applications"));
    }
    applications(&answer.body).map_err(|e| RegistryError::Unavailable(format!("GET {path}: {e}")))
}

/// The entries of `app` in a copy, sorted by key.
fn entries(apps: &Apps, app: &str) -> Vec<Entry> {
    let empty = BTreeMap::new();
    apps.apps
        .get(app)
        .unwrap_or(&empty)
        .iter()
        .map(|(id, kept)| Entry {
            key: format!("{app}/{id}"),
            value: kept.instance.clone(),
        })
        .collect()
}

pub(super) struct EurekaWatch {
    polled: watch::Receiver<Option<Polled>>,
    app: String,
    /// What the watch last reported: a poll that leaves the app as it was
    /// wakes nobody.
    last: Vec<Entry>,
    initial: Option<Vec<Entry>>,
}

#[async_trait]
impl Watch for EurekaWatch {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        if let Some(entries) = self.initial.take() {
            return Ok(WatchEvent::Reset(entries));
        }
        loop {
            if self.polled.changed().await.is_err() {
                return Err(RegistryError::Unavailable(
                    "the Eureka poller stopped".into(),
                ));
            }
            let polled = self.polled.borrow_and_update().clone();
            let Some(polled) = polled else { continue };
            let apps = polled.apps.map_err(RegistryError::Unavailable)?;
            let entries = entries(&apps, &self.app);
            if entries != self.last {
                self.last = entries.clone();
                return Ok(WatchEvent::Reset(entries));
            }
        }
    }
}
