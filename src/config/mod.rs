//! `agent.toml`: loading, validation, and the validated [`Config`].
//!
//! Two layers. `raw` mirrors the file with every field optional; `validate`
//! checks all of it in one pass and collects every problem with its dotted
//! path (`upstream.gate.connect_timeout: ...`) so a user fixes a file in one
//! round instead of one error per run. Unknown keys are problems too (found
//! with `serde_ignored`, so all of them are reported, not just the first).
//! What comes out has defaults applied and no optional fields left except
//! where absence means something (no `[service]`: a consumer-only squire).

mod check;
mod consul;
mod http;
mod raw;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::balance::{EjectionPolicy, Filter, HashKey, Strategy};
use crate::registry::Status;
pub use check::{CheckConfig, HttpProbeConfig, ProbeConfig, ProbeTls};
pub use http::{HttpUpstreamConfig, RouteConfig};
use raw::{
    RawAgent, RawCheck, RawConfig, RawDiscovery, RawEjection, RawRegistries, RawRegistry,
    RawService, RawUpstream,
};

pub use consul::ConsulConfig;

/// The validated configuration of one squire.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent: AgentConfig,
    /// Every registry, in order of preference: we register into all of
    /// them; discovery reads them as [`DiscoveryConfig::mode`] says. Never
    /// empty.
    pub registries: Vec<RegistryConfig>,
    pub discovery: DiscoveryConfig,
    /// The local service this squire announces; `None` for a squire that only
    /// discovers and proxies.
    pub service: Option<ServiceConfig>,
    pub upstreams: Vec<UpstreamConfig>,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub admin: SocketAddr,
    /// A `tracing` filter directive; `RUST_LOG` overrides it.
    pub log: String,
    pub log_format: LogFormat,
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
    /// Runtime worker threads; 0 means one per core.
    pub threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Unique among the registries: labels metrics, `/v1/self` and logs.
    /// A single `[registry]` without a `name` is named after its kind.
    pub name: String,
    /// Lifetime of our registration without a refresh; refreshed every ttl/3.
    pub ttl: Duration,
    /// Bound on every single registry call.
    pub timeout: Duration,
    pub backend: RegistryBackend,
}

/// How discovery reads several registries.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub mode: DiscoveryMode,
    /// Failover: while a service is read from a later registry, how often to
    /// try the earlier ones again.
    pub failback: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryMode {
    /// Each service from the first registry, in order, that can be read;
    /// the next one while it cannot.
    Failover,
    /// Each service from every registry at once: the union of what they
    /// hold, one entry per instance id.
    Merge,
}

impl DiscoveryMode {
    pub fn name(self) -> &'static str {
        match self {
            DiscoveryMode::Failover => "failover",
            DiscoveryMode::Merge => "merge",
        }
    }
}

#[derive(Debug, Clone)]
pub enum RegistryBackend {
    Local { dir: PathBuf },
    Etcd(EtcdConfig),
    Consul(ConsulConfig),
}

impl RegistryBackend {
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryBackend::Local { .. } => "local",
            RegistryBackend::Etcd(_) => "etcd",
            RegistryBackend::Consul(_) => "consul",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `host:port` or `http://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix without a trailing slash, e.g. `/services`.
    pub prefix: String,
    pub credentials: Option<(String, Secret)>,
}

/// A value that must never reach a log line: `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// All must pass for the instance to be announced healthy. None: the
    /// instance is healthy as soon as it is registered.
    pub checks: Vec<CheckConfig>,
    /// An instance unhealthy for this long is removed from the registry until
    /// it recovers.
    pub deregister_critical_after: Option<Duration>,
    pub name: String,
    pub id: String,
    pub host: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub version: String,
    pub weight: u32,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub service: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub strategy: Strategy,
    /// Which instances may take new connections.
    pub filter: Filter,
    pub connect_timeout: Duration,
    /// Further connect attempts after the first, each on another instance.
    pub retries: u32,
    /// Delay before the first retry (jittered, doubling per retry).
    pub retry_backoff: Duration,
    /// Where `consistent_hash` takes its key from.
    pub hash_key: HashKey,
    /// How long a client may take to send its `ROUTE` line.
    pub preamble_timeout: Duration,
    /// The longest `ROUTE` line, newline included.
    pub preamble_max_bytes: usize,
    /// Below this share of healthy endpoints, route to all (0: never).
    pub panic_threshold: f64,
    pub ejection: EjectionPolicy,
}

#[derive(Debug, Clone)]
pub enum Protocol {
    Tcp,
    Http(Box<HttpUpstreamConfig>),
}

impl Protocol {
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http(_) => "http",
        }
    }
}

/// One thing wrong with the file: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not valid TOML: {0}")]
    Syntax(String),
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), ProblemList(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The problems found, empty for read and syntax errors.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            _ => &[],
        }
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {problem}")?;
        }
        Ok(())
    }
}

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
pub const DEFAULT_PREFIX: &str = "/services";

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let mut problems = Problems::default();
        let raw = read_sections(table, &mut problems);
        let config = validate(raw, &mut problems);
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems.0))
        }
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

/// Deserializes each section on its own so one section's type error does not
/// hide another's, and records every unknown key with its full path.
fn read_sections(table: toml::Table, problems: &mut Problems) -> RawConfig {
    let mut raw = RawConfig::default();
    for (key, value) in table {
        match key.as_str() {
            "agent" => raw.agent = section(&key, value, problems).unwrap_or_default(),
            "registry" => raw.registry = read_registries(value, problems),
            "discovery" => raw.discovery = section(&key, value, problems).unwrap_or_default(),
            // A section that failed to deserialize is left out rather than
            // defaulted, so its type error is not followed by bogus "required"s.
            "service" => {
                let mut value = value;
                if let Some(checks) = value.as_table_mut().and_then(|t| t.remove("check")) {
                    raw.checks = read_checks(checks, problems);
                }
                raw.service = section(&key, value, problems);
            }
            "upstream" => match value {
                toml::Value::Array(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        let path = upstream_path(i, item.get("service").and_then(|s| s.as_str()));
                        raw.upstream.extend(section(&path, item, problems));
                    }
                }
                _ => problems.push("upstream", "must be an array of tables ([[upstream]])"),
            },
            _ => problems.push(key, "unknown key"),
        }
    }
    raw
}

/// `[registry]` (one table) or `[[registry]]` (several, each named so its
/// problems say which: `registry.backup.ttl`, or `registry[1].ttl` while it
/// has no usable name).
fn read_registries(value: toml::Value, problems: &mut Problems) -> RawRegistries {
    match value {
        toml::Value::Array(items) => {
            let declared = items.len();
            let items = items
                .into_iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let path = registry_path(i, item.get("name").and_then(|n| n.as_str()));
                    section(&path, item, problems).map(|raw| (i, path, raw))
                })
                .collect();
            RawRegistries::List { items, declared }
        }
        table @ toml::Value::Table(_) => section("registry", table, problems)
            .map(|raw| RawRegistries::Single(Box::new(raw)))
            .unwrap_or_default(),
        _ => {
            problems.push(
                "registry",
                "must be a table ([registry]) or an array of tables ([[registry]])",
            );
            RawRegistries::Absent
        }
    }
}

/// `registry.primary` for a well-named registry, else `registry[0]`.
fn registry_path(index: usize, name: Option<&str>) -> String {
    match name {
        Some(name)
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')) =>
        {
            format!("registry.{name}")
        }
        _ => format!("registry[{index}]"),
    }
}

/// `[[service.check]]` (or a single `[service.check]` table), each named by
/// its `name` when it has one so problems point at the right check.
fn read_checks(value: toml::Value, problems: &mut Problems) -> Vec<(String, RawCheck)> {
    let items = match value {
        toml::Value::Array(items) => items,
        table @ toml::Value::Table(_) => vec![table],
        _ => {
            problems.push(
                "service.check",
                "must be a table or an array of tables ([[service.check]])",
            );
            return Vec::new();
        }
    };
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let path = match item.get("name").and_then(|n| n.as_str()) {
                Some(name) if !name.is_empty() => format!("service.check.{name}"),
                _ => format!("service.check[{i}]"),
            };
            section(&path, item, problems).map(|check| (path, check))
        })
        .collect()
}

fn section<T: DeserializeOwned>(
    path: &str,
    value: toml::Value,
    problems: &mut Problems,
) -> Option<T> {
    let mut unknown = Vec::new();
    let mut record = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
    let ignored = serde_ignored::Deserializer::new(value, &mut record);
    let result: Result<T, _> = serde_path_to_error::deserialize(ignored);
    for key in unknown {
        problems.push(format!("{path}.{key}"), "unknown key");
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let at = if inner == "." {
                path.to_owned()
            } else {
                format!("{path}.{inner}")
            };
            // Say "an integer", not Rust's "i64".
            let message = e
                .into_inner()
                .message()
                .replace("expected i64", "expected an integer");
            problems.push(at, message);
            None
        }
    }
}

fn validate(raw: RawConfig, problems: &mut Problems) -> Config {
    let agent = validate_agent(raw.agent, problems);
    let registries = validate_registries(raw.registry, problems);
    let discovery = validate_discovery(raw.discovery, problems);
    let checks = raw.checks;
    let service = raw.service.map(|s| validate_service(s, checks, problems));
    let consul = registries
        .iter()
        .any(|r| matches!(r.backend, RegistryBackend::Consul(_)));
    if let (true, Some(service)) = (consul, &service) {
        consul::check_service(service, problems);
    }
    let mut listens = HashSet::new();
    let upstreams = raw
        .upstream
        .into_iter()
        .enumerate()
        .map(|(i, u)| validate_upstream(i, u, &mut listens, problems))
        .collect();
    if listens.contains(&agent.admin) {
        problems.push(
            "agent.admin",
            format!("{} is also an upstream listen address", agent.admin),
        );
    }
    Config {
        agent,
        registries,
        discovery,
        service,
        upstreams,
    }
}

fn validate_agent(raw: RawAgent, problems: &mut Problems) -> AgentConfig {
    let node = match raw.node {
        Some(node) if node.trim().is_empty() => {
            problems.push("agent.node", "must not be empty");
            node
        }
        Some(node) => node,
        None => hostname(),
    };
    let admin = socket_addr(
        "agent.admin",
        raw.admin.as_deref().unwrap_or(DEFAULT_ADMIN),
        problems,
    );
    let log = raw.log.unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
        problems.push("agent.log", format!("not a log filter: {e}"));
    }
    let log_format = match raw.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.push(
                "agent.log_format",
                format!("unknown format {other:?}; expected \"text\" or \"json\""),
            );
            LogFormat::Text
        }
    };
    AgentConfig {
        node,
        admin,
        log,
        log_format,
        drain_delay: duration("agent.drain_delay", raw.drain_delay, "2s", problems),
        drain_timeout: duration("agent.drain_timeout", raw.drain_timeout, "30s", problems),
        threads: match raw.threads {
            None => 0,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| *n <= 256)
                .unwrap_or_else(|| {
                    problems.push(
                        "agent.threads",
                        format!("{n} is out of range (0-256; 0 = one per core)"),
                    );
                    0
                }),
        },
    }
}

/// Every registry, named and in order; names unique, at least one.
fn validate_registries(raw: RawRegistries, problems: &mut Problems) -> Vec<RegistryConfig> {
    match raw {
        RawRegistries::Absent => vec![validate_registry(
            "registry",
            None,
            RawRegistry::default(),
            problems,
        )],
        RawRegistries::Single(mut raw) => {
            let name = raw.name.take().inspect(|name| {
                check_registry_name("registry.name", name, problems);
            });
            vec![validate_registry("registry", name, *raw, problems)]
        }
        RawRegistries::List { items, declared } => {
            if declared == 0 {
                problems.push(
                    "registry",
                    "must list at least one registry (or leave it out for the local one)",
                );
            }
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut registries = Vec::new();
            for (index, path, mut raw) in items {
                let name_path = format!("{path}.name");
                let name = required(&name_path, raw.name.take(), problems);
                check_registry_name(&name_path, &name, problems);
                if !name.is_empty() {
                    if let Some(first) = seen.get(&name) {
                        problems.push(
                            format!("registry[{index}].name"),
                            format!("{name:?} is already the name of registry[{first}]; names must be unique"),
                        );
                    } else {
                        seen.insert(name.clone(), index);
                    }
                }
                registries.push(validate_registry(&path, Some(name), raw, problems));
            }
            if registries.is_empty() {
                // Only the problems above matter; something valid to return.
                registries.push(validate_registry(
                    "registry",
                    None,
                    RawRegistry::default(),
                    &mut Problems::default(),
                ));
            }
            registries
        }
    }
}

/// Registry names label metrics and appear in problem paths: letters,
/// digits, `-` and `_`.
fn check_registry_name(path: &str, name: &str, problems: &mut Problems) {
    if name.is_empty() {
        return; // reported by `required`
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        problems.push(
            path,
            format!("{name:?} contains {bad:?}; use letters, digits, - and _"),
        );
    }
}

fn validate_discovery(raw: RawDiscovery, problems: &mut Problems) -> DiscoveryConfig {
    let mode = match raw.mode.as_deref() {
        None | Some("failover") => DiscoveryMode::Failover,
        Some("merge") => DiscoveryMode::Merge,
        Some(other) => {
            problems.push(
                "discovery.mode",
                format!("unknown mode {other:?}; expected \"failover\" or \"merge\""),
            );
            DiscoveryMode::Failover
        }
    };
    if raw.failback.is_some() && mode == DiscoveryMode::Merge {
        problems.push(
            "discovery.failback",
            "only applies to mode = \"failover\" (merge reads every registry all the time)",
        );
    }
    let failback = duration("discovery.failback", raw.failback, "30s", problems);
    if failback < Duration::from_millis(100) {
        problems.push("discovery.failback", "must be at least 100ms");
    }
    DiscoveryConfig { mode, failback }
}

/// One registry whose problems are reported under `base` (`registry`,
/// `registry.primary`, `registry[1]`). `name`: `None` names it after its kind.
fn validate_registry(
    base: &str,
    name: Option<String>,
    mut raw: RawRegistry,
    problems: &mut Problems,
) -> RegistryConfig {
    let at = |key: &str| format!("{base}.{key}");
    let ttl = duration(&at("ttl"), raw.ttl.take(), "10s", problems);
    if ttl < Duration::from_secs(2) {
        problems.push(at("ttl"), "must be at least 2s");
    } else if ttl.subsec_nanos() != 0 {
        problems.push(
            at("ttl"),
            "must be whole seconds (lease TTLs are in seconds)",
        );
    }
    let timeout = duration(&at("timeout"), raw.timeout.take(), "5s", problems);
    if timeout.is_zero() {
        problems.push(at("timeout"), "must be greater than zero");
    }
    let kind = raw.kind.as_deref().unwrap_or("local");
    let misplaced = |problems: &mut Problems, key: &str, set: bool, belongs: &str| {
        if set {
            problems.push(at(key), format!("only applies to kind = {belongs:?}"));
        }
    };
    let backend = match kind {
        "local" => {
            misplaced(problems, "endpoints", raw.endpoints.is_some(), "etcd");
            misplaced(problems, "prefix", raw.prefix.is_some(), "etcd");
            misplaced(problems, "username", raw.username.is_some(), "etcd");
            misplaced(problems, "password", raw.password.is_some(), "etcd");
            for key in consul::keys_set(&raw) {
                misplaced(problems, key, true, "consul");
            }
            let dir = match raw.dir {
                Some(dir) if dir.is_empty() => {
                    problems.push(at("dir"), "must not be empty");
                    PathBuf::from(dir)
                }
                Some(dir) => PathBuf::from(dir),
                None => default_local_dir(),
            };
            RegistryBackend::Local { dir }
        }
        "etcd" => {
            misplaced(problems, "dir", raw.dir.is_some(), "local");
            for key in consul::keys_set(&raw) {
                misplaced(problems, key, true, "consul");
            }
            RegistryBackend::Etcd(validate_etcd(base, raw, problems))
        }
        "consul" => {
            misplaced(problems, "dir", raw.dir.is_some(), "local");
            misplaced(problems, "endpoints", raw.endpoints.is_some(), "etcd");
            misplaced(problems, "prefix", raw.prefix.is_some(), "etcd");
            misplaced(problems, "username", raw.username.is_some(), "etcd");
            misplaced(problems, "password", raw.password.is_some(), "etcd");
            RegistryBackend::Consul(consul::validate(base, raw, problems))
        }
        other => {
            problems.push(
                at("kind"),
                format!("unknown kind {other:?}; expected \"local\", \"etcd\" or \"consul\""),
            );
            RegistryBackend::Local {
                dir: default_local_dir(),
            }
        }
    };
    RegistryConfig {
        name: name.unwrap_or_else(|| backend.kind().to_owned()),
        ttl,
        timeout,
        backend,
    }
}

fn validate_etcd(base: &str, raw: RawRegistry, problems: &mut Problems) -> EtcdConfig {
    let at = |key: &str| format!("{base}.{key}");
    let endpoints = raw
        .endpoints
        .unwrap_or_else(|| vec!["http://127.0.0.1:2379".to_owned()]);
    if endpoints.is_empty() {
        problems.push(at("endpoints"), "must list at least one endpoint");
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        let path = format!("{base}.endpoints[{i}]");
        if endpoint.starts_with("https://") {
            problems.push(path, "TLS to etcd is not supported yet; use http://");
            continue;
        }
        let authority = endpoint.strip_prefix("http://").unwrap_or(endpoint);
        let valid = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            problems.push(
                path,
                format!("{endpoint:?} is not host:port or http://host:port"),
            );
        }
    }
    let prefix = raw.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
    let prefix = prefix.trim_end_matches('/').to_owned();
    if !prefix.starts_with('/') {
        problems.push(at("prefix"), "must start with '/'");
    }
    let credentials = match (raw.username, raw.password) {
        (Some(user), Some(password)) => Some((user, Secret::new(password))),
        (None, None) => None,
        (Some(_), None) => {
            problems.push(at("password"), "required when username is set");
            None
        }
        (None, Some(_)) => {
            problems.push(at("username"), "required when password is set");
            None
        }
    };
    EtcdConfig {
        endpoints,
        prefix,
        credentials,
    }
}

fn validate_service(
    raw: RawService,
    checks: Vec<(String, RawCheck)>,
    problems: &mut Problems,
) -> ServiceConfig {
    let name = required("service.name", raw.name, problems);
    check_name("service.name", &name, problems);
    let host = required("service.host", raw.host, problems);
    let hostname = |h: &str| {
        h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    if !host.is_empty() && host.parse::<std::net::IpAddr>().is_err() && !hostname(&host) {
        problems.push(
            "service.host",
            format!("{host:?} is not an IP address or a host name"),
        );
    }
    let port = match raw.port {
        Some(port) => u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .unwrap_or_else(|| {
                problems.push("service.port", format!("{port} is not a port (1-65535)"));
                0
            }),
        None => {
            problems.push("service.port", "required");
            0
        }
    };
    let id = match raw.id {
        Some(id) => {
            check_name("service.id", &id, problems);
            id
        }
        None => format!("{name}-{host}-{port}"),
    };
    let weight = match raw.weight {
        None => 100,
        Some(w) => u32::try_from(w).unwrap_or_else(|_| {
            problems.push(
                "service.weight",
                format!("{w} is out of range (0-{})", u32::MAX),
            );
            100
        }),
    };
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let checks = check::validate_checks(checks, &address, problems);
    let deregister_critical_after = raw.deregister_critical_after.map(|text| {
        let after = duration(
            "service.deregister_critical_after",
            Some(text),
            "1m",
            problems,
        );
        if after.is_zero() {
            problems.push(
                "service.deregister_critical_after",
                "must be greater than zero",
            );
        }
        after
    });
    ServiceConfig {
        checks,
        deregister_critical_after,
        name,
        id,
        host,
        port,
        tags: raw.tags.unwrap_or_default(),
        version: raw.version.unwrap_or_else(|| "1.0.0".to_owned()),
        weight,
        metadata: raw.metadata.unwrap_or_default(),
    }
}

fn validate_upstream(
    index: usize,
    mut raw: RawUpstream,
    listens: &mut HashSet<SocketAddr>,
    problems: &mut Problems,
) -> UpstreamConfig {
    let base = upstream_path(index, raw.service.as_deref());
    let at = |key: &str| format!("{base}.{key}");
    let raw_balancing = RawBalancing {
        hash_key: raw.hash_key.take(),
        preamble_timeout: raw.preamble_timeout.take(),
        preamble_max_bytes: raw.preamble_max_bytes.take(),
        panic_threshold: raw.panic_threshold.take(),
        retry_backoff: raw.retry_backoff.take(),
        ejection: std::mem::take(&mut raw.ejection),
    };
    let service = required(&at("service"), raw.service.take(), problems);
    check_name(&at("service"), &service, problems);
    let listen = match raw.listen.take() {
        Some(listen) => socket_addr(&at("listen"), &listen, problems),
        None => {
            problems.push(at("listen"), "required");
            unspecified()
        }
    };
    if listen.port() != 0 && !listens.insert(listen) {
        problems.push(
            at("listen"),
            format!("{listen} is used by another upstream"),
        );
    }
    let is_http = match raw.protocol.as_deref() {
        None | Some("tcp") => false,
        Some("http") => true,
        Some(other) => {
            problems.push(
                at("protocol"),
                format!("unknown protocol {other:?}; expected \"tcp\" or \"http\""),
            );
            false
        }
    };
    let protocol = match http::validate(&base, &mut raw, is_http, problems) {
        Some(http) => Protocol::Http(Box::new(http)),
        None => Protocol::Tcp,
    };
    let strategy = match raw.strategy.as_deref() {
        None => Strategy::RoundRobin,
        Some(name) => Strategy::from_name(name).unwrap_or_else(|reason| {
            problems.push(at("strategy"), reason);
            Strategy::RoundRobin
        }),
    };
    let statuses = match raw.statuses {
        None => vec![Status::Healthy],
        Some(names) => names
            .iter()
            .filter_map(|name| match Status::from_name(name) {
                Some(s @ (Status::Healthy | Status::Warning | Status::Unknown)) => Some(s),
                _ => {
                    problems.push(
                        at("statuses"),
                        format!("{name:?} cannot take new connections; use \"healthy\", \"warning\" or \"unknown\""),
                    );
                    None
                }
            })
            .collect(),
    };
    if statuses.is_empty() {
        problems.push(at("statuses"), "must list at least one status");
    }
    let filter = Filter {
        statuses,
        tags: raw.tags.unwrap_or_default(),
        version: raw.version,
        metadata: raw.metadata.unwrap_or_default(),
    };
    let connect_timeout = duration(&at("connect_timeout"), raw.connect_timeout, "1s", problems);
    if connect_timeout.is_zero() {
        problems.push(at("connect_timeout"), "must be greater than zero");
    }
    let retries = match raw.retries {
        None => 2,
        Some(r) => u32::try_from(r)
            .ok()
            .filter(|r| *r <= 16)
            .unwrap_or_else(|| {
                problems.push(at("retries"), format!("{r} is out of range (0-16)"));
                0
            }),
    };
    let is_http = matches!(protocol, Protocol::Http(_));
    let mut raw_balancing = raw_balancing;
    let balancing = validate_balancing(&base, strategy, is_http, &mut raw_balancing, problems);
    UpstreamConfig {
        service,
        listen,
        protocol,
        strategy,
        filter,
        connect_timeout,
        retries,
        retry_backoff: balancing.retry_backoff,
        hash_key: balancing.hash_key,
        preamble_timeout: balancing.preamble_timeout,
        preamble_max_bytes: balancing.preamble_max_bytes,
        panic_threshold: balancing.panic_threshold,
        ejection: balancing.ejection,
    }
}

/// The load-balancing keys of one upstream, taken out of [`RawUpstream`]
/// before the rest is consumed.
#[derive(Default)]
struct RawBalancing {
    hash_key: Option<String>,
    preamble_timeout: Option<String>,
    preamble_max_bytes: Option<i64>,
    panic_threshold: Option<toml::Value>,
    retry_backoff: Option<String>,
    ejection: RawEjection,
}

struct Balancing {
    retry_backoff: Duration,
    hash_key: HashKey,
    preamble_timeout: Duration,
    preamble_max_bytes: usize,
    panic_threshold: f64,
    ejection: EjectionPolicy,
}

fn validate_balancing(
    base: &str,
    strategy: Strategy,
    http: bool,
    raw: &mut RawBalancing,
    problems: &mut Problems,
) -> Balancing {
    let at = |key: &str| format!("{base}.{key}");
    let hash_key = match raw.hash_key.as_deref() {
        None | Some("client_ip") => HashKey::ClientIp,
        Some("preamble") if !http => HashKey::Preamble,
        Some("preamble") => {
            problems.push(
                at("hash_key"),
                "\"preamble\" is for tcp listeners; an http listener hashes \"client_ip\", header:NAME, cookie:NAME or query:NAME",
            );
            HashKey::ClientIp
        }
        Some(other) => {
            let named = |prefix: &str| other.strip_prefix(prefix).filter(|n| !n.is_empty());
            match (named("header:"), named("cookie:"), named("query:")) {
                (Some(name), _, _)
                    if http && hyper::header::HeaderName::from_bytes(name.as_bytes()).is_ok() =>
                {
                    HashKey::Header(name.to_ascii_lowercase())
                }
                (_, Some(name), _) if http => HashKey::Cookie(name.to_owned()),
                (_, _, Some(name)) if http => HashKey::Query(name.to_owned()),
                (None, None, None) => {
                    problems.push(
                        at("hash_key"),
                        format!(
                            "unknown hash key {other:?}; expected \"client_ip\", \"preamble\" (tcp), \
                             or header:NAME, cookie:NAME, query:NAME (http)"
                        ),
                    );
                    HashKey::ClientIp
                }
                _ if !http => {
                    problems.push(
                        at("hash_key"),
                        format!("{other:?} needs protocol = \"http\"; a tcp listener hashes \"client_ip\" or \"preamble\""),
                    );
                    HashKey::ClientIp
                }
                _ => {
                    problems.push(
                        at("hash_key"),
                        format!("{other:?} does not name a valid header"),
                    );
                    HashKey::ClientIp
                }
            }
        }
    };
    if raw.hash_key.is_some() && strategy != Strategy::ConsistentHash {
        let reason = if strategy == Strategy::IpHash {
            "ip_hash always hashes the client address; use strategy = \"consistent_hash\" to choose the key".to_owned()
        } else {
            format!(
                "only applies to strategy = \"consistent_hash\" (this upstream uses {:?})",
                strategy.name()
            )
        };
        problems.push(at("hash_key"), reason);
    }
    let preamble = hash_key == HashKey::Preamble && strategy == Strategy::ConsistentHash;
    for (key, set) in [
        ("preamble_timeout", raw.preamble_timeout.is_some()),
        ("preamble_max_bytes", raw.preamble_max_bytes.is_some()),
    ] {
        if set && !preamble {
            problems.push(at(key), "only applies to hash_key = \"preamble\"");
        }
    }
    let preamble_timeout = duration(
        &at("preamble_timeout"),
        raw.preamble_timeout.take(),
        "1s",
        problems,
    );
    if preamble_timeout.is_zero() {
        problems.push(at("preamble_timeout"), "must be greater than zero");
    }
    let preamble_max_bytes = match raw.preamble_max_bytes {
        None => 256,
        Some(n) if (8..=4096).contains(&n) => n as usize,
        Some(n) => {
            problems.push(
                at("preamble_max_bytes"),
                format!("{n} is out of range (8-4096)"),
            );
            256
        }
    };
    let panic_threshold = fraction(
        &at("panic_threshold"),
        raw.panic_threshold.take(),
        0.0,
        problems,
    );
    let retry_backoff = duration(
        &at("retry_backoff"),
        raw.retry_backoff.take(),
        "10ms",
        problems,
    );
    let ejection = validate_ejection(base, std::mem::take(&mut raw.ejection), problems);
    Balancing {
        retry_backoff,
        hash_key,
        preamble_timeout,
        preamble_max_bytes,
        panic_threshold,
        ejection,
    }
}

fn validate_ejection(base: &str, raw: RawEjection, problems: &mut Problems) -> EjectionPolicy {
    let at = |key: &str| format!("{base}.ejection.{key}");
    let defaults = EjectionPolicy::default();
    let consecutive_failures = match raw.consecutive_failures {
        None => defaults.consecutive_failures,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n <= 1000)
            .unwrap_or_else(|| {
                problems.push(
                    at("consecutive_failures"),
                    format!("{n} is out of range (0-1000; 0 turns ejection off)"),
                );
                defaults.consecutive_failures
            }),
    };
    let base_time = duration(&at("base_time"), raw.base_time, "10s", problems);
    if base_time.is_zero() {
        problems.push(at("base_time"), "must be greater than zero");
    }
    let max_time = duration(&at("max_time"), raw.max_time, "5m", problems);
    if max_time < base_time {
        problems.push(
            at("max_time"),
            format!(
                "must be at least base_time ({})",
                humantime::format_duration(base_time)
            ),
        );
    }
    let max_share = fraction(
        &at("max_share"),
        raw.max_share,
        defaults.max_share,
        problems,
    );
    EjectionPolicy {
        consecutive_failures,
        base_time,
        max_time,
        max_share,
    }
}

/// A share between 0 and 1, written as a float or an integer.
fn fraction(path: &str, value: Option<toml::Value>, default: f64, problems: &mut Problems) -> f64 {
    let number = match value {
        None => return default,
        Some(toml::Value::Float(f)) => f,
        Some(toml::Value::Integer(i)) => i as f64,
        Some(other) => {
            problems.push(
                path,
                format!(
                    "expected a number between 0 and 1, found {}",
                    other.type_str()
                ),
            );
            return default;
        }
    };
    if !(0.0..=1.0).contains(&number) {
        problems.push(path, format!("{number} is out of range (0-1)"));
        return default;
    }
    number
}

/// `upstream.gate` when the upstream names its service, else `upstream[0]`.
fn upstream_path(index: usize, service: Option<&str>) -> String {
    match service {
        Some(name) if !name.is_empty() => format!("upstream.{name}"),
        _ => format!("upstream[{index}]"),
    }
}

fn required(path: &str, value: Option<String>, problems: &mut Problems) -> String {
    match value {
        Some(v) if !v.is_empty() => v,
        Some(v) => {
            problems.push(path, "must not be empty");
            v
        }
        None => {
            problems.push(path, "required");
            String::new()
        }
    }
}

/// Service names and ids become registry keys and file names: keep them to a
/// safe alphabet.
fn check_name(path: &str, value: &str, problems: &mut Problems) {
    if value.is_empty() {
        return; // reported by `required`
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        problems.push(
            path,
            format!("{value:?} contains {bad:?}; use letters, digits and - _ . :"),
        );
    } else if value.starts_with('.') {
        problems.push(path, format!("{value:?} must not start with '.'"));
    }
}

fn duration(path: &str, value: Option<String>, default: &str, problems: &mut Problems) -> Duration {
    let text = value.as_deref().unwrap_or(default);
    humantime::parse_duration(text).unwrap_or_else(|e| {
        problems.push(
            path,
            format!("{text:?} is not a duration ({e}); write e.g. \"5s\" or \"250ms\""),
        );
        humantime::parse_duration(default).unwrap_or_default()
    })
}

fn socket_addr(path: &str, text: &str, problems: &mut Problems) -> SocketAddr {
    text.parse().unwrap_or_else(|_| {
        problems.push(
            path,
            format!("{text:?} is not an address like 127.0.0.1:7001"),
        );
        unspecified()
    })
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|raw| raw.to_string_lossy().into_owned())
}

/// `$XDG_RUNTIME_DIR/squire` when the session has one, else
/// `/tmp/squire-registry`: a place every squire of this user on the host finds.
pub fn default_local_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("squire"),
        _ => PathBuf::from("/tmp/squire-registry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every problem `text` has, as `path: reason` lines.
    pub(super) fn problems(text: &str) -> Vec<String> {
        match Config::from_toml(text) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems().iter().map(ToString::to_string).collect(),
        }
    }

    /// `found` holds exactly one line starting with each of `expected`.
    pub(super) fn assert_problems(found: &[String], expected: &[&str]) {
        for want in expected {
            assert!(
                found.iter().any(|p| p.starts_with(want)),
                "missing {want:?} in {found:#?}"
            );
        }
        assert_eq!(found.len(), expected.len(), "{found:#?}");
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let config = Config::from_toml("").expect("empty file is valid");
        assert_eq!(config.agent.admin.to_string(), DEFAULT_ADMIN);
        assert_eq!(config.registries.len(), 1);
        assert_eq!(config.registries[0].name, "local");
        assert_eq!(config.registries[0].ttl, Duration::from_secs(10));
        assert!(matches!(
            config.registries[0].backend,
            RegistryBackend::Local { .. }
        ));
        assert_eq!(config.discovery.mode, DiscoveryMode::Failover);
        assert!(config.service.is_none());
        assert!(config.upstreams.is_empty());
    }

    #[test]
    fn service_id_defaults_to_name_host_port() {
        let config =
            Config::from_toml("[service]\nname = \"logic\"\nhost = \"10.0.0.5\"\nport = 8001\n")
                .expect("valid");
        let service = config.service.expect("service section");
        assert_eq!(service.id, "logic-10.0.0.5-8001");
        assert_eq!(service.weight, 100);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found = problems(
            r#"
            bogus = 1
            [agent]
            drain_delay = "soon"
            intreval = "5s"
            [registry]
            kind = "etcd"
            ttl = "1s"
            dir = "/tmp/x"
            [service]
            name = "a/b"
            port = 70000
            [[upstream]]
            service = "gate"
            listen = "nowhere"
            strategy = "fastest"
            retries = -1
            [[upstream]]
            listen = 5
            "#,
        );
        let expected = [
            "bogus: unknown key",
            "agent.intreval: unknown key",
            "agent.drain_delay: \"soon\" is not a duration",
            "registry.ttl: must be at least 2s",
            "registry.dir: only applies to kind = \"local\"",
            "service.name: \"a/b\" contains '/'",
            "service.host: required",
            "service.port: 70000 is not a port",
            "upstream.gate.listen: \"nowhere\" is not an address",
            "upstream.gate.strategy: unknown strategy \"fastest\"",
            "upstream.gate.retries: -1 is out of range",
            "upstream[1].listen: invalid type: integer `5`, expected a string",
        ];
        assert_problems(&found, &expected);
    }

    #[test]
    fn balancing_keys_get_defaults_and_parse() {
        let config =
            Config::from_toml("[[upstream]]\nservice = \"gate\"\nlisten = \"127.0.0.1:7001\"\n")
                .expect("valid");
        let gate = &config.upstreams[0];
        assert_eq!(gate.strategy, Strategy::RoundRobin);
        assert_eq!(gate.panic_threshold, 0.0);
        assert_eq!(gate.ejection, EjectionPolicy::default());
        assert_eq!(gate.retry_backoff, Duration::from_millis(10));
        let config = Config::from_toml(
            r#"
            [[upstream]]
            service = "battle"
            listen = "127.0.0.1:7002"
            strategy = "consistent_hash"
            hash_key = "preamble"
            preamble_timeout = "500ms"
            preamble_max_bytes = 64
            panic_threshold = 1
            retry_backoff = "0s"
            ejection = { consecutive_failures = 0, base_time = "1s", max_time = "1s", max_share = 0.25 }
            "#,
        )
        .expect("valid");
        let battle = &config.upstreams[0];
        assert_eq!(battle.hash_key, HashKey::Preamble);
        assert_eq!(battle.preamble_timeout, Duration::from_millis(500));
        assert_eq!(battle.preamble_max_bytes, 64);
        assert_eq!(battle.panic_threshold, 1.0);
        assert!(!battle.ejection.enabled());
        assert_eq!(battle.ejection.max_share, 0.25);
    }

    #[test]
    fn every_strategy_is_accepted() {
        for strategy in Strategy::ALL {
            let text = format!(
                "[[upstream]]\nservice = \"gate\"\nlisten = \"127.0.0.1:7001\"\nstrategy = \"{}\"\n",
                strategy.name()
            );
            let config = Config::from_toml(&text).expect("valid");
            assert_eq!(config.upstreams[0].strategy, strategy);
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let config = Config::from_toml(
            "[registry]\nkind = \"etcd\"\nusername = \"u\"\npassword = \"hunter2\"\n",
        )
        .expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn a_single_registry_table_is_a_list_of_one_named_after_its_kind() {
        let config = Config::from_toml("[registry]\nkind = \"etcd\"\n").expect("valid");
        assert_eq!(config.registries.len(), 1);
        assert_eq!(config.registries[0].name, "etcd");
        let config = Config::from_toml("[registry]\nname = \"main\"\n").expect("valid");
        assert_eq!(config.registries[0].name, "main");
        assert_eq!(config.registries[0].backend.kind(), "local");
    }

    #[test]
    fn several_registries_in_order_with_their_own_keys() {
        let config = Config::from_toml(
            r#"
            [discovery]
            mode = "merge"
            [[registry]]
            name = "primary"
            kind = "etcd"
            endpoints = ["http://10.0.0.1:2379"]
            ttl = "6s"
            [[registry]]
            name = "backup"
            kind = "consul"
            wait = "1m"
            "#,
        )
        .expect("valid");
        let names: Vec<_> = config.registries.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["primary", "backup"]);
        assert_eq!(config.registries[0].ttl, Duration::from_secs(6));
        assert_eq!(config.registries[1].ttl, Duration::from_secs(10));
        let RegistryBackend::Consul(consul) = &config.registries[1].backend else {
            panic!("consul expected");
        };
        assert_eq!(consul.wait, Duration::from_secs(60));
        assert_eq!(config.discovery.mode, DiscoveryMode::Merge);

        let config =
            Config::from_toml("[discovery]\nfailback = \"5s\"\n[[registry]]\nname = \"only\"\n")
                .expect("valid");
        assert_eq!(config.discovery.mode, DiscoveryMode::Failover);
        assert_eq!(config.discovery.failback, Duration::from_secs(5));
        assert_eq!(config.registries[0].name, "only");
    }

    #[test]
    fn registry_list_problems_name_the_registry() {
        let found = problems(
            r#"
            [discovery]
            mode = "fastest"
            typo = 1
            [[registry]]
            name = "primary"
            kind = "etcd"
            ttl = "1s"
            [[registry]]
            kind = "consul"
            wait = "11m"
            dir = "/tmp/x"
            [[registry]]
            name = "primary"
            kind = "local"
            [[registry]]
            name = "back up"
            kind = "consul"
            [[registry]]
            name = "backup"
            kind = "consul"
            colour = "red"
            timeout = 5
            "#,
        );
        let expected = [
            "discovery.typo: unknown key",
            "discovery.mode: unknown mode \"fastest\"",
            "registry.primary.ttl: must be at least 2s",
            "registry[1].name: required",
            "registry[1].wait: must be between 1s and 10m",
            "registry[1].dir: only applies to kind = \"local\"",
            "registry[2].name: \"primary\" is already the name of registry[0]",
            "registry[3].name: \"back up\" contains ' '",
            "registry.backup.colour: unknown key",
            "registry.backup.timeout: invalid type: integer `5`, expected a string",
        ];
        assert_problems(&found, &expected);
    }

    #[test]
    fn an_empty_registry_list_and_failback_with_merge_are_refused() {
        assert_eq!(
            problems("registry = []\n"),
            ["registry: must list at least one registry (or leave it out for the local one)"]
        );
        assert_eq!(
            problems("registry = 5\n"),
            ["registry: must be a table ([registry]) or an array of tables ([[registry]])"]
        );
        assert_eq!(
            problems("[discovery]\nmode = \"merge\"\nfailback = \"1s\"\n"),
            ["discovery.failback: only applies to mode = \"failover\" (merge reads every registry all the time)"]
        );
        assert_eq!(
            problems("[discovery]\nfailback = \"10ms\"\n"),
            ["discovery.failback: must be at least 100ms"]
        );
    }

    #[test]
    fn consul_rules_apply_to_the_service_when_any_registry_is_consul() {
        let found = problems(
            r#"
            [[registry]]
            name = "primary"
            kind = "etcd"
            [[registry]]
            name = "backup"
            kind = "consul"
            [service]
            name = "a"
            host = "10.0.0.1"
            port = 1
            weight = 0
            "#,
        );
        assert_eq!(
            found,
            ["service.weight: 0 is out of range for Consul weights (1-65535)"]
        );
    }

    #[test]
    fn prefix_is_normalized() {
        let config =
            Config::from_toml("[registry]\nkind = \"etcd\"\nprefix = \"/game/\"\n").expect("valid");
        let RegistryBackend::Etcd(etcd) = &config.registries[0].backend else {
            panic!("etcd backend expected");
        };
        assert_eq!(etcd.prefix, "/game");
    }
}
