//! `agent.toml`: loading, validation, and the validated [`Config`].
//!
//! Two layers. `raw` mirrors the file with every field optional; `validate`
//! checks all of it in one pass and collects every problem with its dotted
//! path (`upstream.gate.connect_timeout: ...`) so a user fixes a file in one
//! round instead of one error per run. Unknown keys are problems too (found
//! with `serde_ignored`, so all of them are reported, not just the first).
//! What comes out has defaults applied and no optional fields left except
//! where absence means something (no `[service]`: a consumer-only squire).
//!
//! # Layout
//! - this file: [`Config`], loading (`Config::load`, `Config::from_toml`),
//!   reading the file section by section and `validate`, which calls each
//!   section's validation and checks what spans sections.
//! - `raw`: the serde types that mirror the file.
//! - `problems`: [`Problem`], [`ConfigError`] and the field readers every
//!   section shares (`required`, `check_name`, `duration`, `socket_addr`).
//! - a file per section: `agent` (`[agent]`), `registry` (`[registry]` or
//!   `[[registry]]`, and `[discovery]`), `etcd`, `consul` and `zookeeper`
//!   (each backend's own keys), `service` (`[service]`), `check` (`[[service.check]]`),
//!   `upstream` (`[[upstream]]`), `balancing` (its balancing, ejection,
//!   preferred-instance and slow-start keys), `http`
//!   (the keys of `protocol = "http"` upstreams), `udp` (those of
//!   `protocol = "udp"`, and the keys it refuses).
//! - `tls`: the TLS keys (CA, client certificate, a listener's
//!   certificate), whose files are read and checked at load.
//! - `secret`: [`Secret`], for passwords and tokens, and
//!   [`read_secret_file`], which refuses a file others can read.
//! - `tests`: whole-file validation tests, and the helpers the sections'
//!   tests share.

mod agent;
mod balancing;
mod check;
mod consul;
mod etcd;
mod eureka;
mod http;
mod nacos;
mod problems;
mod raw;
mod registry;
mod secret;
mod service;
#[cfg(test)]
mod tests;
mod tls;
mod udp;
mod upstream;
mod zookeeper;

use std::collections::HashSet;
use std::path::Path;

use serde::de::DeserializeOwned;

pub use agent::{AgentConfig, LogFormat, DEFAULT_ADMIN};
pub use check::{CheckConfig, HttpProbeConfig, ProbeConfig, ProbeTls};
pub use consul::ConsulConfig;
pub use etcd::{EtcdConfig, EtcdTls, DEFAULT_PREFIX};
pub use eureka::EurekaConfig;
pub use http::{HttpUpstreamConfig, RouteConfig};
pub use nacos::NacosConfig;
pub use problems::{ConfigError, Problem};
pub use registry::{
    default_local_dir, DiscoveryConfig, DiscoveryMode, RegistryBackend, RegistryConfig,
};
pub use secret::{check_private, read_secret_file, Secret, MAX_SECRET_FILE_BYTES};
pub use service::ServiceConfig;
pub use tls::{DialTls, ListenTls};
pub use udp::UdpUpstreamConfig;
pub use upstream::{Protocol, UpstreamConfig};
pub use zookeeper::ZooKeeperConfig;

use agent::validate_agent;
use check::read_checks;
use problems::Problems;
use raw::RawConfig;
use registry::{read_registries, validate_discovery, validate_registries};
use service::validate_service;
use upstream::{upstream_path, validate_upstream};

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

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Parses and validates `text`, reporting every problem at once.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(syntax_error(text, &e)))?;
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
    let nacos = registries
        .iter()
        .any(|r| matches!(r.backend, RegistryBackend::Nacos(_)));
    if let (true, Some(service)) = (nacos, &service) {
        nacos::check_service(service, problems);
    }
    let mut listens = HashSet::new();
    let upstreams = raw
        .upstream
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            let own = service.as_ref().map(|s| &s.metadata);
            let mut upstream = validate_upstream(i, u, &agent.ranges, own, &mut listens, problems);
            if upstream.backlog == 0 {
                upstream.backlog = agent.backlog;
            }
            upstream
        })
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

/// Where the file stops being TOML, and why, without the offending line:
/// the line may hold a password or a token.
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let reason = error.message().trim_end();
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {reason}")
        }
        None => reason.to_owned(),
    }
}
