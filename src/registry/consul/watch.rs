//! Discovery from Consul: a blocking-query loop on
//! `/v1/health/service/:name`, rate-limited by a token bucket, each answer
//! whose index moved one [`WatchEvent::Reset`] with the full set.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::{Method, StatusCode};

use super::api::{encode, Api};
use super::wire::{go_duration, health_entries};
use crate::registry::{Entry, RegistryError, Watch, WatchEvent};
use crate::time::TokenBucket;

/// The token bucket of a watch: this many queries back to back...
const QUERY_BURST: u32 = 2;
/// ...then one more per interval. A watch is one service of one agent; a
/// second bounds its load on a churning service while a change that follows
/// a quiet period is still seen at once.
const QUERY_INTERVAL: Duration = Duration::from_secs(1);

pub(super) struct ConsulWatch {
    api: Arc<Api>,
    service: String,
    /// The index of the last answer, 0 before the first and after a reset.
    index: u64,
    bucket: TokenBucket,
    initial: Option<Vec<Entry>>,
}

impl ConsulWatch {
    /// Starts watching `service` with its first query, answered at once
    /// (index 0): an unreachable agent shows up here, as a failed listing
    /// does for etcd.
    pub(super) async fn start(api: Arc<Api>, service: &str) -> Result<ConsulWatch, RegistryError> {
        let mut watch = ConsulWatch {
            api,
            service: service.to_owned(),
            index: 0,
            bucket: TokenBucket::new(QUERY_BURST, QUERY_INTERVAL),
            initial: None,
        };
        watch.bucket.acquire().await;
        let (index, entries) = watch.query().await?;
        watch.index = index;
        watch.initial = Some(entries);
        Ok(watch)
    }

    /// One query from `self.index`: the answer's index (at least 1) and
    /// entries.
    async fn query(&self) -> Result<(u64, Vec<Entry>), RegistryError> {
        let mut path = format!("/v1/health/service/{}", self.service);
        let mut timeout = self.api.timeout;
        let mut params = Vec::new();
        if self.index > 0 {
            let wait = self.api.wait;
            params.push(format!("index={}", self.index));
            params.push(format!("wait={}", go_duration(wait)));
            // Consul adds up to wait/16 of jitter before answering.
            timeout += wait + wait / 16;
        }
        if let Some(dc) = &self.api.datacenter {
            params.push(format!("dc={}", encode(dc)));
        }
        if !params.is_empty() {
            path = format!("{path}?{}", params.join("&"));
        }
        let answer = self
            .api
            .call_within(Method::GET, path, None, timeout)
            .await?;
        if answer.status != StatusCode::OK {
            return Err(answer.error("querying service health"));
        }
        let index = answer.index.ok_or_else(|| {
            RegistryError::Unavailable("health answer without X-Consul-Index".into())
        })?;
        let entries = health_entries(&answer.body)?;
        Ok((index.max(1), entries))
    }
}

#[async_trait]
impl Watch for ConsulWatch {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        if let Some(entries) = self.initial.take() {
            return Ok(WatchEvent::Reset(entries));
        }
        loop {
            self.bucket.acquire().await;
            let (index, entries) = self.query().await?;
            if index < self.index {
                // A restored snapshot or a rebuilt cluster: the answer is the
                // current state, and the next query starts over from 0.
                tracing::info!(service = %self.service, from = self.index, to = index, "Consul index went backwards; resetting");
                self.index = 0;
                return Ok(WatchEvent::Reset(entries));
            }
            if index == self.index {
                continue; // the wait ran out with no change
            }
            self.index = index;
            return Ok(WatchEvent::Reset(entries));
        }
    }
}
