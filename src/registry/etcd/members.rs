//! The members of one etcd cluster, one client each, and which one calls
//! go to.
//!
//! Every call and stream goes to the *active* member while it works. A
//! call that fails with [`RegistryError::Unavailable`] (refused, timed out,
//! HTTP/2 keep-alive lost, "no leader") marks its member down; the next
//! [`Members::pick`] then probes every member at once with a linearizable
//! read (which only a member in a quorum with a leader can answer) and the
//! first to answer becomes active. Nothing runs in the background: a member
//! that is down costs nothing while another works, and the probe is the
//! reconnect.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, KvClient, WatchClient};
use futures_util::stream::{FuturesUnordered, StreamExt};
use rand::Rng;

use super::error::{bounded, is_member_fault};
use crate::registry::RegistryError;

/// Largest response the client decodes: far above gRPC's default 4 MiB, so
/// a listing page of large values is read, not refused. Listings are paged
/// too (see `watch.rs`), so this bounds one page, not a whole service.
pub(super) const MAX_DECODE: usize = 64 * 1024 * 1024;

/// One member's client, with the kv and watch clients that decode up to
/// [`MAX_DECODE`].
#[derive(Clone)]
pub(super) struct Conn {
    pub index: usize,
    pub client: Client,
    pub kv: KvClient,
    pub watch: WatchClient,
}

struct Member {
    /// `host:port`.
    endpoint: String,
    /// Built on first use: `Client::connect` does I/O when credentials are
    /// set, and then must be retried while the member is down.
    conn: tokio::sync::Mutex<Option<Conn>>,
    down: AtomicBool,
}

pub(super) struct Members {
    members: Vec<Member>,
    options: ConnectOptions,
    active: AtomicUsize,
    /// Bounds connecting and one probe.
    probe_timeout: Duration,
    /// An exact key under our prefix (readable with prefix-scoped auth).
    probe_key: String,
}

impl Members {
    /// The first active member is chosen at random, so the squires of a
    /// fleet with the same endpoint list spread over the members.
    pub fn new(
        endpoints: &[String],
        options: ConnectOptions,
        probe_timeout: Duration,
        probe_key: String,
    ) -> Members {
        let members: Vec<Member> = endpoints
            .iter()
            .map(|e| Member {
                endpoint: e.strip_prefix("http://").unwrap_or(e).to_owned(),
                conn: tokio::sync::Mutex::new(None),
                down: AtomicBool::new(false),
            })
            .collect();
        let first = rand::rng().random_range(0..members.len().max(1));
        Members {
            members,
            options,
            active: AtomicUsize::new(first),
            probe_timeout,
            probe_key,
        }
    }

    pub fn endpoint(&self, index: usize) -> &str {
        &self.members[index].endpoint
    }

    /// A working member: the active one unless it was marked down, else the
    /// first member to answer a probe.
    pub async fn pick(&self) -> Result<Conn, RegistryError> {
        let active = self.active.load(Ordering::Relaxed);
        if !self.members[active].down.load(Ordering::Relaxed) {
            return match self.conn(active).await {
                Ok(conn) => Ok(conn),
                Err(e) => {
                    self.failed(active, &e);
                    Err(e)
                }
            };
        }
        let mut probes: FuturesUnordered<_> = (0..self.members.len())
            .map(|i| async move { (i, self.probe(i).await) })
            .collect();
        let mut errors = Vec::new();
        while let Some((i, probed)) = probes.next().await {
            match probed {
                Ok(conn) => {
                    self.members[i].down.store(false, Ordering::Relaxed);
                    if self.active.swap(i, Ordering::Relaxed) != i {
                        tracing::info!(endpoint = %self.endpoint(i), "using etcd member");
                    }
                    return Ok(conn);
                }
                Err(e) => errors.push(format!("{}: {e}", self.endpoint(i))),
            }
        }
        errors.sort();
        Err(RegistryError::Unavailable(format!(
            "no etcd member answers ({})",
            errors.join("; ")
        )))
    }

    /// Runs `call` on a working member, bounded by `timeout`; if that
    /// member fails it, once more on another. For idempotent calls (a
    /// second lease grant only leaves an unused lease to expire).
    pub async fn call<T, F, Fut>(&self, timeout: Duration, mut call: F) -> Result<T, RegistryError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut tries = 2;
        loop {
            let conn = self.pick().await?;
            let index = conn.index;
            match bounded(timeout, call(conn)).await {
                Ok(value) => return Ok(value),
                Err(e) => {
                    tries -= 1;
                    if !self.failed(index, &e) || tries == 0 {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Records that a call to member `index` failed with `error`. True if
    /// that marked the member down (the error was the member's fault), so a
    /// retry goes elsewhere.
    pub fn failed(&self, index: usize, error: &RegistryError) -> bool {
        if !is_member_fault(error) {
            return false;
        }
        if !self.members[index].down.swap(true, Ordering::Relaxed) {
            tracing::debug!(endpoint = %self.endpoint(index), error = %error, "etcd member marked down");
        }
        true
    }

    async fn probe(&self, index: usize) -> Result<Conn, RegistryError> {
        let conn = self.conn(index).await?;
        let mut kv = conn.kv.clone();
        let read = kv.get(
            self.probe_key.as_str(),
            Some(GetOptions::new().with_count_only()),
        );
        bounded(self.probe_timeout, read).await?;
        Ok(conn)
    }

    async fn conn(&self, index: usize) -> Result<Conn, RegistryError> {
        let member = &self.members[index];
        let mut slot = member.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let connect = Client::connect([member.endpoint.as_str()], Some(self.options.clone()));
        let client = bounded(self.probe_timeout, connect).await?;
        let conn = Conn {
            index,
            kv: client.kv_client().max_decoding_message_size(MAX_DECODE),
            watch: client.watch_client().max_decoding_message_size(MAX_DECODE),
            client,
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }
}
