//! One service's prefix: a paged listing, then a watch from the listing's
//! revision, both on the same working member, with a liveness check on the
//! watch.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{EventType, GetOptions, KvClient, WatchOptions, WatchStream};

use super::error::{bounded, is_too_large, map_error};
use super::members::{Conn, Members};
use crate::registry::{Change, Entry, Instance, RegistryError, Watch, WatchEvent};

/// Keys per listing page; halved while a page is too large to decode.
const PAGE: i64 = 500;

/// Lists `prefix` page by page at one revision (the first page's), as
/// etcd's own clients do: no response has to hold a whole service, so a few
/// large values cannot make every listing fail.
pub(super) async fn list(
    kv: &mut KvClient,
    prefix: &str,
    timeout: Duration,
) -> Result<(i64, Vec<Entry>), RegistryError> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut page = PAGE;
    let mut entries = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let response =
            match tokio::time::timeout(timeout, kv.get(from.clone(), Some(options))).await {
                Err(_) => {
                    return Err(RegistryError::Unavailable(format!(
                        "no listing within {timeout:?}"
                    )))
                }
                Ok(Err(e)) if is_too_large(&e) && page > 1 => {
                    page /= 2;
                    continue;
                }
                Ok(Err(e)) => return Err(map_error(e)),
                Ok(Ok(response)) => response,
            };
        if revision == 0 {
            revision = response.header().map(|h| h.revision()).ok_or_else(|| {
                RegistryError::Unavailable("get response without a header".into())
            })?;
        }
        entries.extend(response.kvs().iter().map(|kv| Entry {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: Instance::from_json(kv.value()),
        }));
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((revision, entries)),
        }
    }
}

/// The end of the range of keys starting with `prefix` (etcd's prefix rule).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

pub(super) struct EtcdWatch {
    pub members: Arc<Members>,
    pub conn: Conn,
    pub initial: Option<Vec<Entry>>,
    pub stream: WatchStream,
    /// Silence after which the watch asks for progress.
    pub quiet: Duration,
    /// How long a progress request may go unanswered before the watch (and
    /// its member) count as stalled.
    pub reply_timeout: Duration,
}

impl EtcdWatch {
    /// The next message, asking for progress after [`Self::quiet`]: a
    /// frozen or cut-off member is found in `quiet + reply_timeout`, not
    /// after HTTP/2 keep-alive's seconds or never.
    async fn message(&mut self) -> Result<etcd_client::WatchResponse, RegistryError> {
        let received = match tokio::time::timeout(self.quiet, self.stream.message()).await {
            Ok(received) => received,
            Err(_) => {
                self.stream.request_progress().await.map_err(map_error)?;
                match tokio::time::timeout(self.reply_timeout, self.stream.message()).await {
                    Ok(received) => received,
                    Err(_) => {
                        return Err(RegistryError::Unavailable(format!(
                            "watch stalled: no answer to a progress request within {:?}",
                            self.reply_timeout
                        )))
                    }
                }
            }
        };
        match received {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(RegistryError::Unavailable("watch stream ended".into())),
            Err(e) => Err(map_error(e)),
        }
    }
}

#[async_trait]
impl Watch for EtcdWatch {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        if let Some(entries) = self.initial.take() {
            return Ok(WatchEvent::Reset(entries));
        }
        loop {
            let response = match self.message().await {
                Ok(response) => response,
                Err(e) => {
                    self.members.failed(self.conn.index, &e);
                    return Err(e);
                }
            };
            if response.canceled() {
                // Compaction and auth cancels arrive as a normal message on a
                // stream that stays open; waiting for the stream to end hangs.
                let reason = response.cancel_reason();
                if reason.contains("auth token") {
                    if let Err(e) = self.conn.client.refresh_token().await {
                        tracing::warn!(error = %e, "refreshing the etcd auth token failed");
                    }
                }
                return Err(RegistryError::WatchCanceled(format!(
                    "compact_revision={} reason={:?}",
                    response.compact_revision(),
                    reason
                )));
            }
            if response.events().is_empty() {
                continue; // created or progress notification
            }
            let changes = response
                .events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    Some(match event.event_type() {
                        EventType::Put => Change::Put(Entry {
                            key,
                            value: Instance::from_json(kv.value()),
                        }),
                        EventType::Delete => Change::Delete { key },
                    })
                })
                .collect();
            return Ok(WatchEvent::Changes(changes));
        }
    }
}

/// Opens the listing and watch of `prefix` on `conn`.
pub(super) async fn open(
    conn: &Conn,
    prefix: &str,
    timeout: Duration,
) -> Result<(Vec<Entry>, WatchStream), RegistryError> {
    let mut kv = conn.kv.clone();
    let (revision, entries) = list(&mut kv, prefix, timeout).await?;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut watch = conn.watch.clone();
    let stream = bounded(timeout, watch.watch(prefix, Some(options))).await?;
    Ok((entries, stream))
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/s/a/"), b"/s/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
