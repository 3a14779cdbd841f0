//! The file as written: serde types that mirror `agent.toml` one to one.
//!
//! Every field is optional here so that one pass can report every problem;
//! [`super::validate`] turns these into the validated [`super::Config`].
//! Durations stay strings until validation so a bad one is reported with its
//! path like any other problem.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::secret::Secret;

/// Built section by section by `read_sections`, not deserialized whole.
#[derive(Debug, Default)]
pub struct RawConfig {
    pub agent: RawAgent,
    pub registry: RawRegistries,
    pub discovery: RawDiscovery,
    pub service: Option<RawService>,
    pub upstream: Vec<RawUpstream>,
    /// `[[service.check]]`, read apart from `[service]` so each check's
    /// problems get their own path.
    pub checks: Vec<(String, RawCheck)>,
}

/// `[registry]` (one table, the original shape) or `[[registry]]` (a list of
/// named ones).
#[derive(Debug, Default)]
pub enum RawRegistries {
    /// No registry section: one local registry with every default.
    #[default]
    Absent,
    /// `[registry]`: one registry, named after its kind unless it has a name.
    Single(Box<RawRegistry>),
    /// `[[registry]]`: each table that deserialized, with its problem path
    /// (`registry.primary`, or `registry[1]` while unnamed). `declared`
    /// counts the tables written, those that failed to deserialize included.
    List {
        items: Vec<(usize, String, RawRegistry)>,
        declared: usize,
    },
}

/// `[discovery]`: how several registries are read.
#[derive(Debug, Default, Deserialize)]
pub struct RawDiscovery {
    pub mode: Option<String>,
    pub failback: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAgent {
    pub node: Option<String>,
    pub admin: Option<String>,
    pub log: Option<String>,
    pub log_format: Option<String>,
    pub drain_delay: Option<String>,
    pub drain_timeout: Option<String>,
    pub drain_spread: Option<String>,
    pub threads: Option<i64>,
    pub backlog: Option<i64>,
    pub state_dir: Option<String>,
    // the endpoint policy
    pub dns_refresh: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub admin_token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRegistry {
    /// Required in `[[registry]]`; optional in a single `[registry]`.
    pub name: Option<String>,
    pub kind: Option<String>,
    pub ttl: Option<String>,
    // local
    pub dir: Option<String>,
    pub group: Option<String>,
    // etcd
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub timeout: Option<String>,
    // consul
    pub address: Option<String>,
    pub token: Option<Secret>,
    pub datacenter: Option<String>,
    pub wait: Option<String>,
    pub deregister_critical_after: Option<String>,
    pub tls_skip_verify: Option<bool>,
    // TLS, etcd and consul
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    // eureka
    pub url: Option<String>,
    /// eureka and nacos
    pub poll_interval: Option<String>,
    // nacos (also address, group, username, password, poll_interval)
    pub namespace: Option<String>,
    pub push: Option<bool>,
    pub grpc_port: Option<i64>,
    // zookeeper (with username, password and timeout above)
    pub servers: Option<Vec<String>>,
    pub root: Option<String>,
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
    pub deregister_critical_after: Option<String>,
    pub load_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawUpstream {
    pub service: Option<String>,
    pub backlog: Option<i64>,
    pub listen: Option<String>,
    pub protocol: Option<String>,
    pub strategy: Option<String>,
    pub tags: Option<Vec<String>>,
    pub version: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub statuses: Option<Vec<String>>,
    pub connect_timeout: Option<String>,
    pub endpoint_wait: Option<String>,
    pub retries: Option<i64>,
    /// Address ranges; each replaces the agent's when set.
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    // load balancing
    pub hash_key: Option<String>,
    pub preamble_timeout: Option<String>,
    pub preamble_max_bytes: Option<i64>,
    /// A number 0-1; integer or float in TOML, checked in validation.
    pub panic_threshold: Option<toml::Value>,
    pub load_ttl: Option<String>,
    pub retry_backoff: Option<String>,
    #[serde(default)]
    pub ejection: RawEjection,
    /// A table of metadata pairs, or an array of keys whose values come
    /// from `[service].metadata`; checked in validation.
    pub prefer: Option<toml::Value>,
    pub prefer_min_share: Option<toml::Value>,
    pub slow_start: Option<String>,
    pub slow_start_min: Option<toml::Value>,
    // connection limits, tcp and http
    pub idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub tcp_keepalive: Option<String>,
    // protocol = "http" only
    pub upstream_protocol: Option<String>,
    pub request_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub max_header_bytes: Option<i64>,
    pub pool_idle_timeout: Option<String>,
    pub pool_max_idle: Option<i64>,
    pub rewrite_host: Option<bool>,
    pub retry_budget: Option<f64>,
    pub route: Option<Vec<RawRoute>>,
    // protocol = "udp" only
    pub max_sessions: Option<i64>,
    pub strip: Option<bool>,
    // TLS, tcp only
    pub tls: Option<RawDialTls>,
    pub listen_tls: Option<RawListenTls>,
}

/// `[upstream.tls]`: dial the instances over TLS.
#[derive(Debug, Default, Deserialize)]
pub struct RawDialTls {
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub server_name: Option<String>,
    pub server_name_metadata: Option<String>,
}

/// `[upstream.listen_tls]`: terminate TLS on the listener.
#[derive(Debug, Default, Deserialize)]
pub struct RawListenTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub client_ca: Option<String>,
    pub handshake_timeout: Option<String>,
}

/// `[upstream.ejection]`: passive failure handling.
#[derive(Debug, Default, Deserialize)]
pub struct RawEjection {
    pub consecutive_failures: Option<i64>,
    pub base_time: Option<String>,
    pub max_time: Option<String>,
    pub max_share: Option<toml::Value>,
}

/// `[[upstream.route]]`: requests matching `host` and `path_prefix` go to
/// `service` instead of the upstream's own.
#[derive(Debug, Default, Deserialize)]
pub struct RawRoute {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub service: Option<String>,
}

/// One `[[service.check]]` table. Keys of other kinds are reported by
/// validation, so a check of one kind cannot silently carry another's options.
#[derive(Debug, Default, Deserialize)]
pub struct RawCheck {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub address: Option<String>,
    pub interval: Option<String>,
    pub unhealthy_interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
    // http, https
    pub method: Option<String>,
    pub path: Option<String>,
    /// Values may carry credentials (`Authorization`).
    pub headers: Option<BTreeMap<String, Secret>>,
    pub expect_status: Option<Vec<i64>>,
    pub body_contains: Option<String>,
    // https
    pub ca: Option<String>,
    pub server_name: Option<String>,
    pub tls_skip_verify: Option<bool>,
    // tcp
    pub send: Option<String>,
    pub expect: Option<String>,
    // grpc
    pub grpc_service: Option<String>,
    // exec
    pub command: Option<ExecCommand>,
    pub shell: Option<bool>,
    // exec, http, https
    pub load_from_output: Option<bool>,
}

/// An exec check's `command`: a program and its arguments, or (with
/// `shell = true`) one command line.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ExecCommand {
    Line(String),
    Argv(Vec<String>),
}
