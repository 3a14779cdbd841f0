//! `[registry]` / `[[registry]]`: where we register and discover, and
//! `[discovery]`: how several registries are read. Each backend's own keys
//! are validated in its module ([`super::etcd`], [`super::consul`],
//! [`super::eureka`], [`super::zookeeper`], [`super::nacos`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::consul::{self, ConsulConfig};
use super::etcd::{validate_etcd, EtcdConfig};
use super::eureka::{self, EurekaConfig};
use super::nacos::{self, NacosConfig};
use super::problems::{duration, required, Problems};
use super::raw::{RawDiscovery, RawRegistries, RawRegistry};
use super::section;
use super::zookeeper::{self, ZooKeeperConfig};

#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone, PartialEq)]
pub enum RegistryBackend {
    Local {
        dir: PathBuf,
        /// A group whose members may read the directory (mode 0750);
        /// `None`: only squire's own user (0700).
        group: Option<String>,
    },
    Etcd(EtcdConfig),
    Consul(ConsulConfig),
    Eureka(EurekaConfig),
    ZooKeeper(ZooKeeperConfig),
    Nacos(NacosConfig),
}

impl RegistryBackend {
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryBackend::Local { .. } => "local",
            RegistryBackend::Etcd(_) => "etcd",
            RegistryBackend::Consul(_) => "consul",
            RegistryBackend::Eureka(_) => "eureka",
            RegistryBackend::ZooKeeper(_) => "zookeeper",
            RegistryBackend::Nacos(_) => "nacos",
        }
    }
}

/// `[registry]` (one table) or `[[registry]]` (several, each named so its
/// problems say which: `registry.backup.ttl`, or `registry[1].ttl` while it
/// has no usable name).
pub(super) fn read_registries(value: toml::Value, problems: &mut Problems) -> RawRegistries {
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
        Some(name) if !name.is_empty() && name.chars().all(registry_name_char) => {
            format!("registry.{name}")
        }
        _ => format!("registry[{index}]"),
    }
}

/// Every registry, named and in order; names unique, at least one.
pub(super) fn validate_registries(
    raw: RawRegistries,
    problems: &mut Problems,
) -> Vec<RegistryConfig> {
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
fn registry_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_')
}

/// Reports a name with a character outside that alphabet.
fn check_registry_name(path: &str, name: &str, problems: &mut Problems) {
    if name.is_empty() {
        return; // reported by `required`
    }
    if let Some(bad) = name.chars().find(|c| !registry_name_char(*c)) {
        problems.push(
            path,
            format!("{name:?} contains {bad:?}; use letters, digits, - and _"),
        );
    }
}

pub(super) fn validate_discovery(raw: RawDiscovery, problems: &mut Problems) -> DiscoveryConfig {
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
    let misplaced = |problems: &mut Problems, key: &str, set: bool, belongs: &[&str]| {
        if set {
            let kinds: Vec<String> = belongs.iter().map(|kind| format!("{kind:?}")).collect();
            problems.push(
                at(key),
                format!("only applies to kind = {}", kinds.join(" or ")),
            );
        }
    };
    // Each key that only some kinds take, and those kinds.
    let mut foreign: Vec<(&'static str, bool, &[&str])> = vec![
        ("dir", raw.dir.is_some(), &["local"]),
        ("group", raw.group.is_some(), &["local", "nacos"]),
        ("endpoints", raw.endpoints.is_some(), &["etcd"]),
        ("prefix", raw.prefix.is_some(), &["etcd"]),
        (
            "username",
            raw.username.is_some(),
            &["etcd", "zookeeper", "nacos"],
        ),
        (
            "password",
            raw.password.is_some(),
            &["etcd", "zookeeper", "nacos"],
        ),
        ("ca", raw.ca.is_some(), &["etcd", "consul"]),
        (
            "client_cert",
            raw.client_cert.is_some(),
            &["etcd", "consul"],
        ),
        ("client_key", raw.client_key.is_some(), &["etcd", "consul"]),
        ("address", raw.address.is_some(), &["consul", "nacos"]),
        (
            "poll_interval",
            raw.poll_interval.is_some(),
            &["eureka", "nacos"],
        ),
    ];
    // The keys only one kind takes.
    let own: [(&str, Vec<&'static str>); 4] = [
        ("consul", consul::keys_set(&raw)),
        ("eureka", eureka::keys_set(&raw)),
        ("zookeeper", zookeeper::keys_set(&raw)),
        ("nacos", nacos::keys_set(&raw)),
    ];
    for (kind, keys) in own {
        for key in keys {
            if !foreign.iter().any(|(k, _, _)| *k == key) {
                foreign.push((key, true, kind_slice(kind)));
            }
        }
    }
    let report_foreign = |problems: &mut Problems| {
        for (key, set, belongs) in &foreign {
            if !belongs.contains(&kind) {
                misplaced(problems, key, *set, belongs);
            }
        }
    };
    let backend = match kind {
        "local" => {
            report_foreign(problems);
            let dir = match raw.dir {
                Some(dir) if dir.is_empty() => {
                    problems.push(at("dir"), "must not be empty");
                    PathBuf::from(dir)
                }
                Some(dir) => PathBuf::from(dir),
                None => default_local_dir(),
            };
            let group = raw.group.filter(|group| {
                let valid = !group.is_empty()
                    && group
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !valid {
                    problems.push(
                        at("group"),
                        "must be a group name (letters, digits, -, _, .)",
                    );
                }
                valid
            });
            RegistryBackend::Local { dir, group }
        }
        "etcd" => {
            report_foreign(problems);
            RegistryBackend::Etcd(validate_etcd(base, raw, problems))
        }
        "consul" => {
            report_foreign(problems);
            RegistryBackend::Consul(consul::validate(base, raw, problems))
        }
        "eureka" => {
            report_foreign(problems);
            RegistryBackend::Eureka(eureka::validate(base, &mut raw, problems))
        }
        "zookeeper" => {
            report_foreign(problems);
            RegistryBackend::ZooKeeper(zookeeper::validate(base, raw, problems))
        }
        "nacos" => {
            report_foreign(problems);
            RegistryBackend::Nacos(nacos::validate(base, raw, problems))
        }
        other => {
            problems.push(
                at("kind"),
                format!(
                    "unknown kind {other:?}; expected \"local\", \"etcd\", \"consul\", \"eureka\", \"zookeeper\" or \"nacos\""
                ),
            );
            RegistryBackend::Local {
                dir: default_local_dir(),
                group: None,
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

/// `[kind]` as a `'static` slice.
fn kind_slice(kind: &str) -> &'static [&'static str] {
    match kind {
        "consul" => &["consul"],
        "eureka" => &["eureka"],
        "zookeeper" => &["zookeeper"],
        _ => &["nacos"],
    }
}

/// `$XDG_RUNTIME_DIR/squire` when the session has one, else
/// `/tmp/squire-registry`: a place every squire of this user on the host finds.
pub fn default_local_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("squire"),
        _ => PathBuf::from("/tmp/squire-registry"),
    }
}
