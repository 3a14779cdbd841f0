//! Our registration in ZooKeeper: an ephemeral node in a session of its
//! own. The session is the lease; the client keeps it alive.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use zookeeper_client::{Client, EventType, SessionState, StateWatcher, WatchedEvent};

use super::error::{bounded, map_error};
use super::session_id;
use crate::registry::{Instance, Lease, RegistryError};

/// The wait before watching our node again after the watch could not be
/// set (the server unreachable): the state watch still sees an expiry.
const REWATCH: Duration = Duration::from_millis(500);

type NodeEvent = Pin<Box<dyn Future<Output = WatchedEvent> + Send>>;

pub(super) struct ZooKeeperLease {
    client: Client,
    path: String,
    timeout: Duration,
    /// The session's state changes, for [`Lease::gone`].
    state: StateWatcher,
    /// The watch of our node, set by `gone` and kept between its calls.
    node: Option<NodeEvent>,
    /// When to set the watch of our node again after it failed.
    rewatch_at: Option<Instant>,
}

impl ZooKeeperLease {
    pub fn new(client: Client, path: String, timeout: Duration) -> Self {
        ZooKeeperLease {
            state: client.state_watcher(),
            client,
            path,
            timeout,
            node: None,
            rewatch_at: None,
        }
    }

    /// The session's state as an error, if it is not connected.
    ///
    /// Checked before each call: while the client reconnects a call waits
    /// in its queue (the bound only stops our waiting), and every retry
    /// would add one more to send on reconnect.
    fn session_problem(&self) -> Option<RegistryError> {
        let id = session_id(&self.client);
        match self.client.state() {
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => None,
            SessionState::Disconnected => Some(RegistryError::Unavailable(format!(
                "session {id} is disconnected from ZooKeeper; the client is reconnecting"
            ))),
            SessionState::AuthFailed => Some(RegistryError::Rejected(
                "ZooKeeper refused our credentials".to_owned(),
            )),
            ended => Some(RegistryError::LeaseLost(format!("session {id} {ended}"))),
        }
    }

    /// Whether a node whose ephemeral owner is `owner` is ours.
    fn owned(&self, owner: Option<i64>) -> bool {
        owner == Some(self.client.session_id().0)
    }
}

#[async_trait]
impl Lease for ZooKeeperLease {
    fn id(&self) -> String {
        session_id(&self.client)
    }

    /// The client pings the session by itself; this says whether it is
    /// still ours, and reads our node to prove a server answers.
    async fn keep_alive(&mut self) -> Result<(), RegistryError> {
        if let Some(problem) = self.session_problem() {
            return Err(problem);
        }
        let stat = bounded(self.timeout, self.client.check_stat(&self.path)).await?;
        match stat {
            Some(stat) if self.owned(Some(stat.ephemeral_owner)) => Ok(()),
            Some(stat) => Err(RegistryError::LeaseLost(format!(
                "our node {} belongs to session {:x} now",
                self.path, stat.ephemeral_owner
            ))),
            None => Err(RegistryError::LeaseLost(format!(
                "our node {} is gone",
                self.path
            ))),
        }
    }

    /// Resolves when the session ended (expired, closed) or our node was
    /// deleted or found absent.
    async fn gone(&mut self) {
        loop {
            if self.client.state().is_terminated() {
                return;
            }
            let Some(node) = self.node.as_mut() else {
                if !connected(self.client.state()) {
                    // A call now would only queue until the client is
                    // connected again; wait for that instead.
                    self.state.changed().await;
                    continue;
                }
                if let Some(at) = self.rewatch_at {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.state.changed() => continue,
                    }
                }
                let watched = tokio::time::timeout(
                    self.timeout,
                    self.client.check_and_watch_stat(&self.path),
                )
                .await;
                match watched {
                    Ok(Ok((None, _))) => return,
                    Ok(Ok((Some(_), watcher))) => {
                        self.node = Some(Box::pin(watcher.changed()));
                        self.rewatch_at = None;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(path = %self.path, error = %map_error(e), "cannot watch our node; trying again later");
                        self.rewatch_at = Some(Instant::now() + REWATCH);
                    }
                    Err(_) => self.rewatch_at = Some(Instant::now() + REWATCH),
                }
                continue;
            };
            tokio::select! {
                event = node => {
                    self.node = None;
                    match event.event_type {
                        EventType::NodeDeleted => return,
                        EventType::Session if event.session_state.is_terminated() => return,
                        _ => {} // our own writes: watch again
                    }
                }
                state = self.state.changed() => if state.is_terminated() {
                    return;
                },
            }
        }
    }

    async fn update(&mut self, instance: &Instance) -> Result<(), RegistryError> {
        // Not sent while disconnected: it would wait in the client's queue
        // and arrive late; the registration loop writes again later.
        if let Some(problem) = self.session_problem() {
            return Err(problem);
        }
        let data = instance.to_json();
        let written = tokio::time::timeout(
            self.timeout,
            self.client.set_data(&self.path, data.as_bytes(), None),
        )
        .await;
        match written {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(zookeeper_client::Error::NoNode)) => Err(RegistryError::LeaseLost(format!(
                "our node {} is gone",
                self.path
            ))),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(RegistryError::Unavailable(format!(
                "no answer from ZooKeeper within {:?}",
                self.timeout
            ))),
        }
    }

    /// Deletes our node, then closes the session (which would remove the
    /// node too, but only once the close reaches a server).
    async fn revoke(self: Box<Self>) -> Result<(), RegistryError> {
        let this = *self;
        let deleted =
            tokio::time::timeout(this.timeout, this.client.delete(&this.path, None)).await;
        let result = match deleted {
            Ok(Ok(())) => Ok(()),
            // Gone already: with the session, or deleted by someone else.
            Ok(Err(zookeeper_client::Error::NoNode | zookeeper_client::Error::SessionExpired)) => {
                Ok(())
            }
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(RegistryError::Unavailable(format!(
                "no answer from ZooKeeper within {:?}",
                this.timeout
            ))),
        };
        // Dropping the last client of the session sends the close; wait
        // for it to be answered, within the bound.
        let mut state = this.state;
        drop(this.node);
        drop(this.client);
        let closed = async {
            while !state.state().is_terminated() {
                state.changed().await;
            }
        };
        if tokio::time::timeout(this.timeout, closed).await.is_err() {
            tracing::debug!(path = %this.path, "closing the ZooKeeper session was not answered in time; it expires instead");
        }
        result
    }
}

pub(super) fn connected(state: SessionState) -> bool {
    matches!(
        state,
        SessionState::SyncConnected | SessionState::ConnectedReadOnly
    )
}
