//! The file as written: serde types that mirror `agent.toml` one to one.
//!
//! Every field is optional here so that one pass can report every problem;
//! [`super::validate`] turns these into the validated [`super::Config`].
//! Durations stay strings until validation so a bad one is reported with its
//! path like any other problem.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub registry: RawRegistry,
    pub service: Option<RawService>,
    #[serde(default)]
    pub upstream: Vec<RawUpstream>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAgent {
    pub node: Option<String>,
    pub admin: Option<String>,
    pub log: Option<String>,
    pub log_format: Option<String>,
    pub drain_delay: Option<String>,
    pub drain_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRegistry {
    pub kind: Option<String>,
    pub ttl: Option<String>,
    // local
    pub dir: Option<String>,
    // etcd
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawService {
    pub name: Option<String>,
    pub id: Option<String>,
    pub host: Option<String>,
    pub port: Option<i64>,
    pub tags: Option<Vec<String>>,
    pub version: Option<String>,
    pub weight: Option<i64>,
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawUpstream {
    pub service: Option<String>,
    pub listen: Option<String>,
    pub protocol: Option<String>,
    pub strategy: Option<String>,
    pub tags: Option<Vec<String>>,
    pub version: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub statuses: Option<Vec<String>>,
    pub connect_timeout: Option<String>,
    pub retries: Option<i64>,
    // load balancing (issue 4)
    pub hash_key: Option<String>,
    pub preamble_timeout: Option<String>,
    pub preamble_max_bytes: Option<i64>,
    /// A number 0-1; integer or float in TOML, checked in validation.
    pub panic_threshold: Option<toml::Value>,
    pub retry_backoff: Option<String>,
    #[serde(default)]
    pub ejection: RawEjection,
}

/// `[upstream.ejection]`: passive failure handling.
#[derive(Debug, Default, Deserialize)]
pub struct RawEjection {
    pub consecutive_failures: Option<i64>,
    pub base_time: Option<String>,
    pub max_time: Option<String>,
    pub max_share: Option<toml::Value>,
}
