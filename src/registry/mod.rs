//! The registry seam: where instances are announced and discovered.
//!
//! Six backends implement [`Registry`]: [`etcd`] (leases and watches),
//! [`local`] (files in a directory shared by the squires on one host),
//! [`consul`] (the agent API: a TTL check, blocking queries), [`eureka`]
//! (its REST operations, polled), [`zookeeper`] (ephemeral nodes in a
//! session, one-shot watches) and [`nacos`] (the Open API: an ephemeral
//! instance kept by heartbeats, lists polled and woken by its gRPC push).
//! A backend only moves data; the loops that survive outages live in
//! [`crate::registration`] and [`crate::discovery`] and treat every backend
//! the same way:
//!
//! - [`Registry::register`] writes our instance under a fresh lease and
//!   returns that [`Lease`]; the caller refreshes it every ttl/3 and on
//!   [`RegistryError::LeaseLost`] registers again.
//! - [`Registry::watch`] yields the full current set of one service first,
//!   then changes. On any error the caller drops the watch and calls `watch`
//!   again, which re-lists: a gap is never trusted.

pub mod consul;
pub mod etcd;
pub mod eureka;
mod http;
pub mod local;
pub mod nacos;
mod wire;
pub mod zookeeper;

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use crate::load::Load;

/// One announced instance of a service. Its JSON (serde, and so the
/// registry value, the local registry's files and the admin API) is Knight
/// Server's `ServiceInfo`; see [`wire`] for how squire's finer states and
/// Knight's loose typing travel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "wire::Wire", try_from = "wire::Wire")]
pub struct Instance {
    pub name: String,
    pub id: String,
    pub host: String,
    pub port: u16,
    pub tags: Vec<String>,
    /// Values as text: a non-string JSON value is kept as its JSON text.
    pub metadata: BTreeMap<String, String>,
    pub version: String,
    pub weight: u32,
    pub status: Status,
    /// What the game process last reported (`None`: never, or cleared).
    /// Whether it is still fresh is the reader's call ([`Load::is_fresh`]).
    pub load: Option<Load>,
}

impl Instance {
    /// Parses a registry value. The error text says what was wrong, for the
    /// log line and the skipped-entry counter.
    pub fn from_json(bytes: &[u8]) -> Result<Instance, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    pub fn to_json(&self) -> String {
        // Serializing plain strings, numbers and string maps cannot fail.
        serde_json::to_string(self).expect("instance serializes")
    }

    /// `host:port`, with brackets around an IPv6 host.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What an instance says of itself. By default only `healthy` instances get
/// new connections (an upstream may also accept `warning` and `unknown`);
/// `draining` ones keep their existing connections but get no new ones.
///
/// squire's own health checks announce `unknown` until `rise` passes, then
/// `healthy`, `warning` (a check reports degraded service, e.g. an exec check
/// exiting 1) or `unhealthy` (a check failed `fall` times: Consul's
/// "critical"). `critical` is read from registrants that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Unknown,
    Healthy,
    Warning,
    Unhealthy,
    Critical,
    Draining,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Unknown,
        Status::Healthy,
        Status::Warning,
        Status::Unhealthy,
        Status::Critical,
        Status::Draining,
    ];

    pub fn from_name(name: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Warning => "warning",
            Status::Unhealthy => "unhealthy",
            Status::Critical => "critical",
            Status::Draining => "draining",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One key under a service's prefix and what it holds. A value that does not
/// parse is carried as `Err` so discovery can skip, log and count it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Result<Instance, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The complete current set of the service; replaces all that was known.
    Reset(Vec<Entry>),
    /// Changes since the previous event, in order.
    Changes(Vec<Change>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Entry),
    Delete { key: String },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or did not answer in time.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// Our lease is gone (expired, revoked, or the registry forgot it): the
    /// registration must be written again under a new lease.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// The registry ended a watch (compaction, auth); re-list and watch again.
    #[error("watch canceled: {0}")]
    WatchCanceled(String),
    /// The registry refused the request (permissions, bad credentials, bad
    /// arguments); retrying soon will not help, an operator must act.
    #[error("registry refused the request: {0}")]
    Rejected(String),
}

impl RegistryError {
    /// Whether retrying soon may succeed. The backoff loops use this alone to
    /// pick their delay: a rejected request waits the longest delay.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, RegistryError::Rejected(_))
    }
}

/// A healthy instance `id` of service `svc` at 127.0.0.1:1, weight 100,
/// for the unit tests that only need one to exist.
#[cfg(test)]
impl Instance {
    pub(crate) fn for_tests(id: &str) -> Instance {
        Instance {
            name: "svc".into(),
            id: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            tags: Vec::new(),
            metadata: Default::default(),
            version: String::new(),
            weight: 100,
            status: Status::Healthy,
            load: None,
        }
    }
}

/// A registry backend. See the module doc for the contract.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// `"etcd"`, `"local"`, ...: for logs, metrics and `/v1/self`.
    fn kind(&self) -> &'static str;

    /// Where it is: endpoints or directory, for `/v1/self`.
    fn target(&self) -> String;

    /// Writes `instance` under a new lease.
    async fn register(&self, instance: &Instance) -> Result<Box<dyn Lease>, RegistryError>;

    /// Watches one service: first event is [`WatchEvent::Reset`].
    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError>;
}

/// Our registration, alive while it is refreshed.
#[async_trait]
pub trait Lease: Send {
    /// The backend's id of this lease, for `/v1/self`.
    fn id(&self) -> String;

    /// Refreshes the lease. `Err(LeaseLost)` means register again.
    async fn keep_alive(&mut self) -> Result<(), RegistryError>;

    /// Resolves when the registry says our entry is gone although this
    /// lease was kept alive (deleted by someone else, or revoked by the
    /// registry on its own), so it is written again at once rather than
    /// when the next refresh fails. Pends otherwise. Cancel-safe. The
    /// default, for a backend that cannot tell, pends forever.
    async fn gone(&mut self) {
        std::future::pending::<()>().await
    }

    /// Rewrites the instance (e.g. a status change) under the same lease.
    async fn update(&mut self, instance: &Instance) -> Result<(), RegistryError>;

    /// Removes the registration now, so peers see us leave at once. A lease
    /// that is already gone is success.
    async fn revoke(self: Box<Self>) -> Result<(), RegistryError>;
}

#[async_trait]
pub trait Watch: Send {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_json_has_the_service_info_shape() {
        let instance = Instance {
            name: "logic".into(),
            id: "logic-10.0.0.5-8001".into(),
            host: "10.0.0.5".into(),
            port: 8001,
            tags: vec!["game".into()],
            metadata: BTreeMap::from([("zone".into(), "a".into())]),
            version: "1.0.0".into(),
            weight: 100,
            status: Status::Healthy,
            load: None,
        };
        assert_eq!(
            instance.to_json(),
            r#"{"name":"logic","id":"logic-10.0.0.5-8001","host":"10.0.0.5","port":8001,"tags":["game"],"metadata":{"zone":"a"},"version":"1.0.0","weight":100,"status":"healthy"}"#
        );
        assert_eq!(
            Instance::from_json(instance.to_json().as_bytes()),
            Ok(instance)
        );
    }

    #[test]
    fn minimal_and_extended_values_parse() {
        let minimal =
            Instance::from_json(br#"{"name":"a","id":"a1","host":"h","port":1,"extra":true}"#)
                .expect("unknown fields are ignored");
        assert_eq!(minimal.status, Status::Healthy);
        assert_eq!(minimal.weight, 100);
        assert!(Instance::from_json(b"not json").is_err());
        assert!(Instance::from_json(
            br#"{"name":"a","id":"a1","host":"h","port":1,"status":"weird"}"#
        )
        .is_err());
        assert!(Instance::from_json(br#"{"name":"a","id":"a1","host":"","port":1}"#).is_err());
    }
}
