//! Our own key, watched: etcd may delete it while our lease is still kept
//! alive, and the registration should write it again at once rather than
//! when the next refresh finds the lease gone, a third of the ttl later.
//!
//! It happens: a leader that was frozen (stopped, swapped out, stuck in
//! fsync) past the ttl resumes believing it still leads, sees every lease
//! expired by its own clock, and its revocations reach the new leader
//! (etcd-io/etcd#15247, fixed in etcd 3.4.28 and 3.5.11; Debian 12 ships
//! 3.4.23). An operator's `etcdctl del` looks the same, and is answered
//! the same way a Consul agent's anti-entropy answers it: we are still
//! here, so our entry is written again.
//!
//! The watch is one key, from the revision a read found it at, on a
//! working member. A member failure only costs the watch until the retry:
//! the keep-alive refresh still finds a lost lease on its own.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use tokio::time::Instant;

use super::error::{bounded, map_error};
use super::members::Members;
use crate::registry::RegistryError;

pub(super) struct OwnKey {
    key: String,
    /// The watch and the member it is on.
    stream: Option<(usize, WatchStream)>,
    /// When to open the watch again after it failed.
    retry_at: Option<Instant>,
}

impl OwnKey {
    pub fn new(key: String) -> OwnKey {
        OwnKey {
            key,
            stream: None,
            retry_at: None,
        }
    }

    /// Resolves once the key is found deleted or absent; pends otherwise,
    /// opening the watch again `retry` after it fails. Cancel-safe: the
    /// stream lives here between calls.
    pub async fn gone(&mut self, members: &Members, timeout: Duration, retry: Duration) {
        loop {
            let Some((member, stream)) = self.stream.as_mut() else {
                if let Some(at) = self.retry_at {
                    tokio::time::sleep_until(at).await;
                }
                match self.open(members, timeout).await {
                    Ok(Some(opened)) => {
                        self.stream = Some(opened);
                        self.retry_at = None;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(key = %self.key, error = %e, "cannot watch our own key; trying again later");
                        self.retry_at = Some(Instant::now() + retry);
                    }
                }
                continue;
            };
            let failure = match stream.message().await {
                Ok(Some(response)) if response.canceled() => {
                    RegistryError::WatchCanceled(response.cancel_reason().to_owned())
                }
                Ok(Some(response)) => {
                    let deleted = response
                        .events()
                        .iter()
                        .any(|event| event.event_type() == EventType::Delete);
                    if deleted {
                        self.stream = None;
                        return;
                    }
                    continue; // our own writes, progress
                }
                Ok(None) => RegistryError::Unavailable("watch stream ended".into()),
                Err(e) => map_error(e),
            };
            members.failed(*member, &failure);
            tracing::debug!(key = %self.key, error = %failure, "the watch of our own key ended; trying again later");
            self.stream = None;
            self.retry_at = Some(Instant::now() + retry);
        }
    }

    /// Reads the key and watches it from there: `None` if it is absent.
    async fn open(
        &self,
        members: &Members,
        timeout: Duration,
    ) -> Result<Option<(usize, WatchStream)>, RegistryError> {
        let conn = members.pick().await?;
        let opened = async {
            let mut kv = conn.kv.clone();
            let read = bounded(timeout, kv.get(self.key.as_str(), None)).await?;
            if read.kvs().is_empty() {
                return Ok(None);
            }
            let revision = read.header().map(|h| h.revision()).ok_or_else(|| {
                RegistryError::Unavailable("get response without a header".into())
            })?;
            let options = WatchOptions::new().with_start_revision(revision + 1);
            let mut watch = conn.watch.clone();
            let stream = bounded(timeout, watch.watch(self.key.as_str(), Some(options))).await?;
            Ok(Some((conn.index, stream)))
        }
        .await;
        if let Err(e) = &opened {
            members.failed(conn.index, e);
        }
        opened
    }
}
