//! ZooKeeper backend: an ephemeral znode per instance, children and data
//! watches per service.
//!
//! Node `{root}/{service}/{id}` (parents created as persistent nodes),
//! data the [`Instance`] JSON, as etcd's value. The client is
//! [zookeeper-client] (kezhuw): async on tokio, maintained, with ephemeral
//! nodes, one-shot watches, session state and digest auth; no blocking
//! client runs on the runtime threads.
//!
//! # The session is the lease
//!
//! Each registration opens its own session (timeout: the registry's `ttl`,
//! as the server negotiates it) and creates its node in it; the client
//! pings to keep the session alive on its own, and moves to another server
//! of the ensemble when one fails. [`Lease::keep_alive`] only reads the
//! session's state and checks our node is there: `Unavailable` while
//! disconnected, `LeaseLost` once the session expired or the node is gone.
//! [`Lease::gone`] resolves as soon as the client says the session expired
//! or the node was deleted, so the registration loop writes it again at
//! once in a new session (counted as a lease re-grant). The client gives a
//! session up by itself after 7/5 of its timeout without reaching a
//! server. Deregistration deletes the node, then closes the session.
//!
//! A node with our id held by another session is replaced only when that
//! session is one of ours we gave up (a server that was out of reach may
//! keep it a while); anyone else's is left to expire (see
//! `ZooKeeperRegistry::create`). No call is sent while the client is
//! reconnecting: it would only wait in the client's queue, and each retry
//! would add one more to send on reconnect.
//!
//! # Discovery
//!
//! Watches of all services share one session, opened on first use and
//! replaced once it has expired. See `watch`: a children watch on the
//! service's node and a data watch on each child, re-armed by the read
//! that follows every event; any change of the session's state ends the
//! watch, so the caller re-lists on reconnect rather than trusting a gap.
//!
//! # Digest auth
//!
//! With `username` and `password`, every session adds the digest identity
//! `username:password`, and every node we create gets the ACL "all to this
//! identity, read to anyone": only squires with the same credentials can
//! change or delete our nodes, or add instances under the parents we made,
//! while any client may discover.
//!
//! [zookeeper-client]: https://crates.io/crates/zookeeper-client

mod error;
mod lease;
mod watch;

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use zookeeper_client::{Acl, Acls, Client, CreateMode, CreateOptions, Permission};

use super::{Instance, Lease, Registry, RegistryError, Watch};
use crate::config::ZooKeeperConfig;
use error::bounded;

/// Our nodes with credentials: the creator's identity may do anything,
/// anyone may read.
static AUTHED_ACL: [Acl; 2] = [
    Acl::new_const(Permission::ALL, "auth", ""),
    Acl::new_const(Permission::READ, "world", "anyone"),
];

pub struct ZooKeeperRegistry {
    config: ZooKeeperConfig,
    /// The servers as a connect string: `h1:p1,h2:p2`.
    connect: String,
    ttl: Duration,
    timeout: Duration,
    /// The session discovery's watches share; `None` until first used.
    shared: Mutex<Option<Client>>,
    /// The sessions of our last registrations, to tell our own stale node
    /// from another's.
    sessions: std::sync::Mutex<VecDeque<i64>>,
}

/// How many of our registrations' sessions are remembered.
const REMEMBERED_SESSIONS: usize = 8;

impl ZooKeeperRegistry {
    pub fn new(config: ZooKeeperConfig, ttl: Duration, timeout: Duration) -> Self {
        ZooKeeperRegistry {
            connect: config.servers.join(","),
            config,
            ttl,
            timeout,
            shared: Mutex::new(None),
            sessions: std::sync::Mutex::new(VecDeque::new()),
        }
    }

    fn service_path(&self, service: &str) -> String {
        format!("{}/{}", self.config.root, service)
    }

    /// The ACL of every node we create.
    fn acls(&self) -> Acls<'static> {
        if self.config.credentials.is_some() {
            Acls::new(&AUTHED_ACL)
        } else {
            Acls::anyone_all()
        }
    }

    /// A new session, with our digest identity. Fails at once when no
    /// server accepts a connection, and within `timeout` in any case.
    async fn session(&self) -> Result<Client, RegistryError> {
        let mut connector = Client::connector()
            .with_session_timeout(self.ttl)
            .with_fail_eagerly();
        if let Some((user, password)) = &self.config.credentials {
            let identity = format!("{user}:{}", password.expose());
            connector = connector.with_auth("digest", identity.as_bytes());
        }
        bounded(self.timeout, connector.connect(&self.connect)).await
    }

    /// The shared session, opened anew if there is none or it has ended
    /// (expired, closed). A session that is only disconnected is kept: the
    /// client reconnects it, and calls wait for that within their bound.
    async fn shared(&self) -> Result<Client, RegistryError> {
        let mut shared = self.shared.lock().await;
        if let Some(client) = shared.as_ref() {
            if !client.state().is_terminated() {
                return Ok(client.clone());
            }
            tracing::info!(session = %client.session_id(), state = %client.state(), "the ZooKeeper session of discovery ended; opening a new one");
        }
        let client = self.session().await?;
        *shared = Some(client.clone());
        Ok(client)
    }

    /// Creates our node in `client`'s session, its parents first.
    ///
    /// A node already there with our id is another session's. If it is a
    /// session this registry opened and gave up (its lease lost while the
    /// server was out of reach, the server kept it alive a while longer)
    /// the node is deleted and created anew. Any other session's is left
    /// alone and reported: an earlier run's (a crash) until the server
    /// expires it, or another squire's with the same id — replacing that
    /// would have two squires delete each other's node for ever. The
    /// registration loop tries again within half a second.
    async fn create(&self, client: &Client, path: &str, data: &[u8]) -> Result<(), RegistryError> {
        let acls = self.acls();
        let parent = &path[..path.rfind('/').unwrap_or(0)];
        let persistent = CreateMode::Persistent.with_acls(acls);
        bounded(self.timeout, client.mkdir(parent, &persistent)).await?;
        let ephemeral: CreateOptions<'_> = CreateMode::Ephemeral.with_acls(acls);
        let mut replaced = false;
        loop {
            let created = tokio::time::timeout(self.timeout, client.create(path, data, &ephemeral))
                .await
                .map_err(|_| {
                    RegistryError::Unavailable(format!(
                        "no answer from ZooKeeper within {:?}",
                        self.timeout
                    ))
                })?;
            match created {
                Ok(_) => return Ok(()),
                Err(zookeeper_client::Error::NodeExists) => {}
                Err(e) => return Err(error::map_error(e)),
            }
            let Some(stat) = bounded(self.timeout, client.check_stat(path)).await? else {
                continue; // gone meanwhile
            };
            let owner = stat.ephemeral_owner;
            if replaced || !self.given_up(owner) {
                return Err(RegistryError::Unavailable(format!(
                    "{path} exists in session {owner:x}: an earlier run's until ZooKeeper expires it, or another squire's with our id"
                )));
            }
            replaced = true;
            tracing::info!(path, session = %format!("{owner:x}"), "our node is still held by a session we gave up; replacing it");
            match tokio::time::timeout(self.timeout, client.delete(path, Some(stat.version))).await
            {
                Ok(
                    Ok(())
                    | Err(zookeeper_client::Error::NoNode | zookeeper_client::Error::BadVersion),
                ) => {}
                Ok(Err(e)) => return Err(error::map_error(e)),
                Err(_) => {
                    return Err(RegistryError::Unavailable(format!(
                        "no answer from ZooKeeper within {:?}",
                        self.timeout
                    )))
                }
            }
        }
    }

    /// Whether `session` is one this registry opened for a registration.
    /// Only abandoned ones can hold our node: a lease is dropped before
    /// the next registration.
    fn given_up(&self, session: i64) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&session)
    }

    /// Remembers `session` as one of our registrations' (the last few).
    fn remember(&self, session: i64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.len() == REMEMBERED_SESSIONS {
            sessions.pop_front();
        }
        sessions.push_back(session);
    }
}

#[async_trait]
impl Registry for ZooKeeperRegistry {
    fn kind(&self) -> &'static str {
        "zookeeper"
    }

    fn target(&self) -> String {
        self.connect.clone()
    }

    async fn register(&self, instance: &Instance) -> Result<Box<dyn Lease>, RegistryError> {
        let client = self.session().await?;
        self.remember(client.session_id().0);
        if client.session_timeout() != self.ttl {
            tracing::warn!(asked = ?self.ttl, negotiated = ?client.session_timeout(), "ZooKeeper gave our session another timeout than the ttl (its min/maxSessionTimeout)");
        }
        let path = format!("{}/{}", self.service_path(&instance.name), instance.id);
        let created = self
            .create(&client, &path, instance.to_json().as_bytes())
            .await;
        if let Err(e) = created {
            // Dropping the client closes the session, which would have
            // removed the node anyway.
            return Err(match e {
                // Our new session cannot be lost yet; the server went away.
                RegistryError::LeaseLost(reason) => RegistryError::Unavailable(reason),
                other => other,
            });
        }
        Ok(Box::new(lease::ZooKeeperLease::new(
            client,
            path,
            self.timeout,
        )))
    }

    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError> {
        let client = self.shared().await?;
        if !lease::connected(client.state()) {
            // Fail at once rather than queue a listing in the client for
            // every retry; the caller tries again within half a second.
            return Err(RegistryError::Unavailable(format!(
                "the ZooKeeper session of discovery is {}; the client is reconnecting",
                client.state()
            )));
        }
        let opened =
            watch::ZooKeeperWatch::open(client, self.service_path(service), self.timeout).await;
        if let Err(RegistryError::LeaseLost(reason)) = opened {
            // The shared session expired under us: the next try opens a new one.
            return Err(RegistryError::Unavailable(reason));
        }
        Ok(Box::new(opened?))
    }
}

/// A session's id in hex, as ZooKeeper logs it: the lease id in `/v1/self`.
fn session_id(client: &Client) -> String {
    format!("{:x}", client.session_id().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_root_service_id_and_auth_gets_an_acl() {
        let config = ZooKeeperConfig {
            servers: vec!["127.0.0.1:2181".into(), "127.0.0.2:2181".into()],
            root: "/services".into(),
            credentials: None,
        };
        let registry = ZooKeeperRegistry::new(
            config.clone(),
            Duration::from_secs(10),
            Duration::from_secs(5),
        );
        assert_eq!(registry.target(), "127.0.0.1:2181,127.0.0.2:2181");
        assert_eq!(registry.service_path("battle"), "/services/battle");
        assert_eq!(&*registry.acls(), &*Acls::anyone_all());
        let authed = ZooKeeperRegistry::new(
            ZooKeeperConfig {
                credentials: Some(("squire".into(), crate::config::Secret::new("pw"))),
                ..config
            },
            Duration::from_secs(10),
            Duration::from_secs(5),
        );
        assert_eq!(authed.acls().len(), 2);
    }
}
