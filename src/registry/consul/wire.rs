//! What goes over the wire to and from Consul: the service definition we
//! register, the entries of `/v1/health/service` we read and how they
//! become [`Instance`]s, and Consul's rules for Meta and durations.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::MAX_META_PAIRS;
use crate::registry::{Entry, Instance, RegistryError, Status};

/// `PUT /v1/agent/service/register`: the fields squire sets, in Consul's
/// spelling.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ServiceDefinition<'a> {
    #[serde(rename = "ID")]
    pub(super) id: &'a str,
    pub(super) name: &'a str,
    pub(super) tags: &'a [String],
    pub(super) address: &'a str,
    pub(super) port: u16,
    pub(super) meta: BTreeMap<String, String>,
    pub(super) weights: Weights,
    pub(super) check: CheckDefinition,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Weights {
    pub(super) passing: i64,
    #[serde(default)]
    pub(super) warning: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct CheckDefinition {
    #[serde(rename = "CheckID")]
    pub(super) check_id: String,
    pub(super) name: &'static str,
    pub(super) notes: &'static str,
    #[serde(rename = "TTL")]
    pub(super) ttl: String,
    pub(super) status: &'static str,
    pub(super) deregister_critical_service_after: String,
}

/// One entry of `/v1/health/service`: the fields squire reads.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: NodeEntry,
    service: ServiceEntry,
    #[serde(default)]
    checks: Vec<CheckEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeEntry {
    #[serde(default)]
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    weights: Option<Weights>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckEntry {
    #[serde(rename = "CheckID")]
    check_id: String,
    status: String,
}

/// Parses a health answer. Each entry is read on its own, so a malformed one
/// becomes an `Err` entry (skipped and counted by discovery) and the rest
/// still count.
pub(crate) fn health_entries(body: &[u8]) -> Result<Vec<Entry>, RegistryError> {
    let raw: Vec<serde_json::Value> = serde_json::from_slice(body).map_err(|e| {
        RegistryError::Unavailable(format!("health answer is not a JSON array: {e}"))
    })?;
    Ok(raw
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            let key = match (
                value.pointer("/Node/Node").and_then(|v| v.as_str()),
                value.pointer("/Service/ID").and_then(|v| v.as_str()),
            ) {
                (Some(node), Some(id)) => format!("{node}/{id}"),
                _ => format!("entry {i}"),
            };
            let value = serde_json::from_value::<HealthEntry>(value)
                .map_err(|e| e.to_string())
                .and_then(instance_of);
            Entry { key, value }
        })
        .collect())
}

fn instance_of(entry: HealthEntry) -> Result<Instance, String> {
    let service = entry.service;
    let host = if service.address.is_empty() {
        entry.node.address
    } else {
        service.address
    };
    if host.is_empty() {
        return Err("neither the service nor its node has an address".into());
    }
    if service.port == 0 {
        return Err("port 0".into());
    }
    let weight = match service.weights {
        None => 1,
        Some(w) => u32::try_from(w.passing)
            .ok()
            .filter(|w| *w > 0)
            .ok_or_else(|| format!("Weights.Passing {} is not positive", w.passing))?,
    };
    let mut metadata = service.meta.unwrap_or_default();
    let version = metadata.remove("version").unwrap_or_default();
    let load = crate::registry::wire::load_from_meta(&mut metadata);
    Ok(Instance {
        name: service.service,
        id: service.id,
        host,
        port: service.port,
        tags: service.tags.unwrap_or_default(),
        metadata,
        version,
        weight,
        status: status_of(&entry.checks),
        load,
    })
}

/// The status an entry's checks (its own and its node's) add up to: any
/// maintenance check → draining, else the worst of them.
fn status_of(checks: &[CheckEntry]) -> Status {
    let maintenance = checks.iter().any(|c| {
        c.check_id == "_node_maintenance"
            || c.check_id.starts_with("_service_maintenance:")
            || c.status == "maintenance"
    });
    if maintenance {
        return Status::Draining;
    }
    let mut status = Status::Healthy;
    for check in checks {
        match check.status.as_str() {
            "passing" => {}
            "warning" => status = Status::Warning,
            // "critical", and anything Consul may add: not serving.
            _ => return Status::Unhealthy,
        }
    }
    status
}

/// The Meta squire sends: the metadata plus `version` and the reported
/// load's `squire_load_*` keys (see [`crate::registry::wire`]). Keys Consul would
/// refuse (validation rejects them for kind = "consul") are left out with a
/// warning rather than failing the whole registration.
pub(super) fn service_meta(instance: &Instance) -> BTreeMap<String, String> {
    let mut meta = BTreeMap::new();
    // `version` and the load's three keys are always sent.
    let ours = 1 + if instance.load.is_some() { 3 } else { 0 };
    for (key, value) in &instance.metadata {
        if key == "version" || key.starts_with("squire_load_") {
            continue; // the version field and the load win
        }
        if let Some(reason) = meta_problem(key, value) {
            tracing::warn!(id = %instance.id, key = %key, %reason, "metadata pair left out of the Consul registration");
            continue;
        }
        if meta.len() + ours >= MAX_META_PAIRS {
            tracing::warn!(id = %instance.id, key = %key, "metadata pair left out: Consul takes at most 64 pairs");
            continue;
        }
        meta.insert(key.clone(), value.clone());
    }
    meta.insert("version".to_owned(), instance.version.clone());
    crate::registry::wire::load_to_meta(instance.load.as_ref(), &mut meta);
    meta
}

/// Why Consul would refuse one Meta pair (its own wording), if it would.
pub fn meta_problem(key: &str, value: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("Key cannot be blank")
    } else if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Some("Key contains invalid characters")
    } else if key.len() > 128 {
        Some("Key is too long (limit: 128 characters)")
    } else if key.starts_with("consul-") {
        Some("Key prefix 'consul-' is reserved for internal use")
    } else if value.len() > 512 {
        Some("Value is too long (limit: 512 characters)")
    } else {
        None
    }
}

/// A duration as Go's `time.ParseDuration` reads it.
pub(super) fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &str, status: &str) -> CheckEntry {
        CheckEntry {
            check_id: id.into(),
            status: status.into(),
        }
    }

    #[test]
    fn status_follows_the_worst_check_and_maintenance_drains() {
        assert_eq!(status_of(&[]), Status::Healthy);
        let serf = check("serfHealth", "passing");
        assert_eq!(
            status_of(&[
                check("serfHealth", "passing"),
                check("service:a", "passing")
            ]),
            Status::Healthy
        );
        assert_eq!(
            status_of(&[
                check("serfHealth", "passing"),
                check("service:a", "warning")
            ]),
            Status::Warning
        );
        assert_eq!(
            status_of(&[
                check("serfHealth", "critical"),
                check("service:a", "passing")
            ]),
            Status::Unhealthy
        );
        assert_eq!(
            status_of(&[
                serf,
                check("service:a", "passing"),
                check("_service_maintenance:a", "critical")
            ]),
            Status::Draining
        );
        assert_eq!(
            status_of(&[check("_node_maintenance", "critical")]),
            Status::Draining
        );
    }

    #[test]
    fn entries_map_to_instances_and_bad_ones_are_kept_as_errors() {
        let body = br#"[
          {"Node":{"Node":"n1","Address":"10.0.0.1"},
           "Service":{"ID":"web-1","Service":"web","Tags":["v1"],"Address":"","Port":8080,
                      "Meta":{"version":"1.2.3","zone":"a"},"Weights":{"Passing":10,"Warning":1}},
           "Checks":[{"CheckID":"serfHealth","Status":"passing"},{"CheckID":"service:web-1","Status":"warning"}]},
          {"Node":{"Node":"n1","Address":"10.0.0.1"},
           "Service":{"ID":"web-2","Service":"web","Tags":null,"Address":"10.0.0.9","Port":8081,"Meta":null},
           "Checks":[]},
          {"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"web-3","Service":"web","Port":"x"},"Checks":[]},
          {"Node":{"Node":"n2","Address":""},"Service":{"ID":"web-4","Service":"web","Port":1},"Checks":[]}
        ]"#;
        let entries = health_entries(body).expect("an array");
        assert_eq!(entries.len(), 4);
        let first = entries[0].value.as_ref().expect("valid");
        assert_eq!(entries[0].key, "n1/web-1");
        assert_eq!(first.host, "10.0.0.1", "falls back to the node address");
        assert_eq!(first.weight, 10);
        assert_eq!(first.version, "1.2.3");
        assert_eq!(
            first.metadata,
            BTreeMap::from([("zone".to_owned(), "a".to_owned())])
        );
        assert_eq!(first.status, Status::Warning);
        let second = entries[1].value.as_ref().expect("valid");
        assert_eq!(
            (second.host.as_str(), second.weight, second.status),
            ("10.0.0.9", 1, Status::Healthy)
        );
        assert!(second.tags.is_empty() && second.version.is_empty());
        assert!(entries[2].value.is_err());
        assert!(entries[3]
            .value
            .as_ref()
            .is_err_and(|e| e.contains("address")));
        assert!(health_entries(b"{}").is_err());
    }

    #[test]
    fn meta_rules_match_consul() {
        assert_eq!(meta_problem("zone", "a"), None);
        assert_eq!(meta_problem("a-b_C9", "a"), None);
        assert!(meta_problem("", "a").is_some());
        assert!(meta_problem("a.b", "a").is_some());
        assert!(meta_problem(&"k".repeat(129), "a").is_some());
        assert!(meta_problem("consul-x", "a").is_some());
        assert!(meta_problem("k", &"v".repeat(513)).is_some());
        let instance = Instance {
            name: "a".into(),
            id: "a-1".into(),
            host: "h".into(),
            port: 1,
            tags: vec![],
            metadata: BTreeMap::from([
                ("ok".to_owned(), "1".to_owned()),
                ("not ok".to_owned(), "2".to_owned()),
                ("version".to_owned(), "shadowed".to_owned()),
            ]),
            version: "1.0.0".into(),
            weight: 1,
            status: Status::Healthy,
            load: None,
        };
        assert_eq!(
            service_meta(&instance),
            BTreeMap::from([
                ("ok".to_owned(), "1".to_owned()),
                ("version".to_owned(), "1.0.0".to_owned())
            ])
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_nanos(5)), "5ns");
    }
}
