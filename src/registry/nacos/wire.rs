//! What goes over the wire to and from Nacos: our instance as Open API
//! parameters and metadata, the beat info, and the hosts of
//! `instance/list` (or one `instance` read) back as [`Instance`]s.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::registry::{Entry, Instance, RegistryError, Status};

/// The metadata keys that carry Knight's `ServiceInfo` fields Nacos has no
/// field for. A service's own metadata may not use them.
pub const RESERVED_METADATA: [&str; 8] = [
    "id",
    "tags",
    "version",
    "status",
    "squire_status",
    crate::registry::wire::LOAD_PLAYERS,
    crate::registry::wire::LOAD_CAPACITY,
    crate::registry::wire::LOAD_AT,
];

/// Nacos's per-instance heartbeat settings (milliseconds), from our ttl.
const BEAT_INTERVAL: &str = "preserved.heart.beat.interval";
const BEAT_TIMEOUT: &str = "preserved.heart.beat.timeout";
const DELETE_TIMEOUT: &str = "preserved.ip.delete.timeout";

/// The cluster squire registers in: Nacos's default one.
pub(super) const CLUSTER: &str = "DEFAULT";

/// Beat answer `code` for "no such instance" (Nacos's RESOURCE_NOT_FOUND).
pub(super) const BEAT_NOT_FOUND: i64 = 20404;

/// The metadata we write for `instance`: its own pairs, the reserved keys,
/// and the heartbeat settings of `ttl`.
pub(super) fn metadata_of(instance: &Instance, ttl: Duration) -> BTreeMap<String, String> {
    let mut metadata = instance.metadata.clone();
    // The registry value's own mapping of the status (Knight's four in
    // `status`, the finer state in `squire_status` when it differs).
    let value: Value = serde_json::from_str(&instance.to_json()).unwrap_or_default();
    for key in ["status", "squire_status"] {
        match value.get(key).and_then(Value::as_str) {
            Some(text) => metadata.insert(key.to_owned(), text.to_owned()),
            None => metadata.remove(key),
        };
    }
    metadata.insert("id".to_owned(), instance.id.clone());
    metadata.insert("version".to_owned(), instance.version.clone());
    crate::registry::wire::load_to_meta(instance.load.as_ref(), &mut metadata);
    // Serializing a list of strings cannot fail.
    metadata.insert(
        "tags".to_owned(),
        serde_json::to_string(&instance.tags).expect("tags serialize"),
    );
    let millis = |d: Duration| d.as_millis().to_string();
    metadata.insert(BEAT_INTERVAL.to_owned(), millis(ttl / 3));
    metadata.insert(BEAT_TIMEOUT.to_owned(), millis(ttl));
    metadata.insert(DELETE_TIMEOUT.to_owned(), millis(ttl * 2));
    metadata
}

/// Whether Nacos clients should count the instance as up.
fn serving(status: Status) -> bool {
    matches!(status, Status::Healthy | Status::Warning)
}

/// What names our instance: service, group, ip, port, cluster, ephemeral.
pub(super) fn key_params(instance: &Instance, group: &str) -> Vec<(&'static str, String)> {
    vec![
        ("serviceName", instance.name.clone()),
        ("groupName", group.to_owned()),
        ("ip", instance.host.clone()),
        ("port", instance.port.to_string()),
        ("clusterName", CLUSTER.to_owned()),
        ("ephemeral", "true".to_owned()),
    ]
}

/// `POST /nacos/v1/ns/instance`: every field of our instance.
pub(super) fn register_params(
    instance: &Instance,
    group: &str,
    ttl: Duration,
) -> Vec<(&'static str, String)> {
    let mut params = key_params(instance, group);
    // Serializing a string map cannot fail.
    let metadata = serde_json::to_string(&metadata_of(instance, ttl)).expect("metadata serializes");
    params.extend([
        ("weight", instance.weight.to_string()),
        ("enabled", (instance.status != Status::Draining).to_string()),
        ("healthy", serving(instance.status).to_string()),
        ("metadata", metadata),
    ]);
    params
}

/// `PUT /nacos/v1/ns/instance/beat`: the key and the full beat info, which
/// is what Nacos re-creates a missing instance from.
pub(super) fn beat_params(
    instance: &Instance,
    group: &str,
    ttl: Duration,
) -> Vec<(&'static str, String)> {
    let mut params = key_params(instance, group);
    let beat = json!({
        "serviceName": format!("{group}@@{}", instance.name),
        "ip": instance.host,
        "port": instance.port,
        "cluster": CLUSTER,
        "weight": instance.weight,
        "metadata": metadata_of(instance, ttl),
        "scheduled": true,
        "period": (ttl / 3).as_millis() as u64,
        "stopped": false,
    });
    params.push(("beat", beat.to_string()));
    params
}

/// One host of an `instance/list` answer, or an `instance` read: the
/// fields squire reads. `enabled` is absent in Nacos 1.x's single read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Host {
    #[serde(default)]
    instance_id: Option<String>,
    ip: String,
    port: i64,
    #[serde(default = "one")]
    weight: f64,
    #[serde(default = "yes")]
    healthy: bool,
    #[serde(default)]
    pub(super) enabled: Option<bool>,
    #[serde(default)]
    cluster_name: Option<String>,
    #[serde(default)]
    pub(super) metadata: Option<BTreeMap<String, String>>,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

impl Host {
    /// Whether this is what we wrote: the same metadata, weight and (where
    /// the server says) enabled flag.
    pub(super) fn is_as_written(&self, instance: &Instance, ttl: Duration) -> bool {
        self.metadata.as_ref() == Some(&metadata_of(instance, ttl))
            && (self.weight - f64::from(instance.weight)).abs() < 0.001
            && self
                .enabled
                .is_none_or(|enabled| enabled == (instance.status != Status::Draining))
    }
}

#[derive(Deserialize)]
struct ListAnswer {
    #[serde(default)]
    hosts: Option<Vec<Value>>,
}

/// Parses an `instance/list` answer. Each host is read on its own, so a
/// malformed one becomes an `Err` entry (skipped and counted by discovery)
/// and the rest still count. Entries come sorted by key, so two answers
/// with the same hosts compare equal.
pub(super) fn list_entries(service: &str, body: &[u8]) -> Result<Vec<Entry>, RegistryError> {
    let not_an_object = |e: String| {
        RegistryError::Unavailable(format!("instance list answer is not a JSON object: {e}"))
    };
    let value: Value = serde_json::from_slice(body).map_err(|e| not_an_object(e.to_string()))?;
    if !value.is_object() {
        return Err(not_an_object(format!("found {value}")));
    }
    let answer: ListAnswer =
        serde_json::from_value(value).map_err(|e| not_an_object(e.to_string()))?;
    let mut entries: Vec<Entry> = answer
        .hosts
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            let key = match (
                value.get("instanceId").and_then(Value::as_str),
                value.get("ip").and_then(Value::as_str),
                value.get("port").and_then(Value::as_i64),
            ) {
                (Some(id), _, _) if !id.is_empty() => id.to_owned(),
                (_, Some(ip), Some(port)) => format!("{ip}#{port}"),
                _ => format!("host {i}"),
            };
            let value = serde_json::from_value::<Host>(value)
                .map_err(|e| e.to_string())
                .and_then(|host| instance_of(service, &key, host));
            Entry { key, value }
        })
        .collect();
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(entries)
}

/// The instance a host describes: Knight's `ServiceInfo` rebuilt from the
/// Nacos fields and the reserved metadata, read by the registry value's
/// own rules, then Nacos's `enabled` and `healthy` flags.
fn instance_of(service: &str, key: &str, host: Host) -> Result<Instance, String> {
    let port = u16::try_from(host.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {} is out of range", host.port))?;
    if !host.weight.is_finite() || host.weight <= 0.0 {
        return Err(format!(
            "weight {} is not positive (Nacos sends it no traffic)",
            host.weight
        ));
    }
    let weight = (host.weight.round() as u32).max(1);
    let mut metadata = host.metadata.unwrap_or_default();
    for reserved in [BEAT_INTERVAL, BEAT_TIMEOUT, DELETE_TIMEOUT] {
        metadata.remove(reserved);
    }
    let load = crate::registry::wire::load_from_meta(&mut metadata);
    let tags: Value = match metadata.remove("tags") {
        None => json!([]),
        Some(text) => {
            let tags: Vec<String> = serde_json::from_str(&text)
                .map_err(|e| format!("metadata tags is not a JSON array of strings: {e}"))?;
            json!(tags)
        }
    };
    let id = metadata
        .remove("id")
        .filter(|id| !id.is_empty())
        .or(host.instance_id)
        .unwrap_or_else(|| key.to_owned());
    let mut value = json!({
        "name": service,
        "id": id,
        "host": host.ip,
        "port": port,
        "tags": tags,
        "version": metadata.remove("version").unwrap_or_default(),
        "weight": weight,
    });
    for field in ["status", "squire_status"] {
        if let Some(text) = metadata.remove(field) {
            value[field] = json!(text);
        }
    }
    value["metadata"] = json!(metadata);
    let _ = host.cluster_name; // every cluster of the service is served
    let mut instance = Instance::from_json(value.to_string().as_bytes())?;
    instance.load = load;
    if host.enabled == Some(false) {
        instance.status = Status::Draining;
    } else if !host.healthy && serving(instance.status) {
        instance.status = Status::Unhealthy;
    }
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(9);

    fn game() -> Instance {
        Instance {
            name: "logic".into(),
            id: "logic-1".into(),
            host: "10.0.0.5".into(),
            port: 8001,
            tags: vec!["game".into(), "a,b".into()],
            metadata: BTreeMap::from([("zone".into(), "a".into())]),
            version: "1.0.0".into(),
            weight: 100,
            status: Status::Healthy,
            load: None,
        }
    }

    /// The host Nacos would list for what `register_params` wrote.
    fn listed(instance: &Instance, enabled: bool, healthy: bool) -> Value {
        json!({
            "instanceId": format!("{}#{}#DEFAULT#DEFAULT_GROUP@@{}", instance.host, instance.port, instance.name),
            "ip": instance.host, "port": instance.port, "weight": f64::from(instance.weight),
            "healthy": healthy, "enabled": enabled, "ephemeral": true, "clusterName": "DEFAULT",
            "serviceName": format!("DEFAULT_GROUP@@{}", instance.name),
            "metadata": metadata_of(instance, TTL),
        })
    }

    fn read(hosts: Vec<Value>) -> Vec<Entry> {
        let body = json!({"name": "DEFAULT_GROUP@@logic", "hosts": hosts}).to_string();
        list_entries("logic", body.as_bytes()).expect("a list")
    }

    #[test]
    fn every_status_reads_back_as_written() {
        for status in Status::ALL {
            let instance = Instance { status, ..game() };
            let enabled = status != Status::Draining;
            let entries = read(vec![listed(&instance, enabled, true)]);
            assert_eq!(entries[0].value, Ok(instance.clone()), "{status}");
            assert_eq!(entries[0].key, "10.0.0.5#8001#DEFAULT#DEFAULT_GROUP@@logic");
        }
    }

    #[test]
    fn metadata_carries_knight_fields_and_heartbeat_settings() {
        let draining = Instance {
            status: Status::Draining,
            ..game()
        };
        let metadata = metadata_of(&draining, TTL);
        assert_eq!(metadata["id"], "logic-1");
        assert_eq!(metadata["tags"], r#"["game","a,b"]"#);
        assert_eq!(metadata["version"], "1.0.0");
        assert_eq!(metadata["status"], "unhealthy");
        assert_eq!(metadata["squire_status"], "draining");
        assert_eq!(metadata["zone"], "a");
        assert_eq!(metadata["preserved.heart.beat.interval"], "3000");
        assert_eq!(metadata["preserved.heart.beat.timeout"], "9000");
        assert_eq!(metadata["preserved.ip.delete.timeout"], "18000");
        assert!(!metadata_of(&game(), TTL).contains_key("squire_status"));
        let params = register_params(&draining, "G", TTL);
        let get = |k: &str| {
            params
                .iter()
                .find(|(p, _)| *p == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("enabled"), Some("false"));
        assert_eq!(get("healthy"), Some("false"));
        assert_eq!(get("ephemeral"), Some("true"));
        assert_eq!(get("groupName"), Some("G"));
        assert_eq!(get("weight"), Some("100"));
    }

    #[test]
    fn nacos_flags_weigh_in() {
        let entries = read(vec![listed(&game(), false, true)]);
        assert_eq!(
            entries[0].value.as_ref().map(|i| i.status),
            Ok(Status::Draining)
        );
        let entries = read(vec![listed(&game(), true, false)]);
        assert_eq!(
            entries[0].value.as_ref().map(|i| i.status),
            Ok(Status::Unhealthy)
        );
    }

    #[test]
    fn plain_nacos_instances_read_as_healthy() {
        let entries = read(vec![json!({
            "instanceId": "10.0.0.7#80#DEFAULT#DEFAULT_GROUP@@logic",
            "ip": "10.0.0.7", "port": 80, "weight": 1.0, "healthy": true, "enabled": true,
            "metadata": {"zone": "b"}
        })]);
        let instance = entries[0].value.as_ref().expect("valid");
        assert_eq!(instance.id, "10.0.0.7#80#DEFAULT#DEFAULT_GROUP@@logic");
        assert_eq!(instance.status, Status::Healthy);
        assert_eq!(instance.weight, 1);
        assert!(instance.tags.is_empty() && instance.version.is_empty());
        assert_eq!(
            instance.metadata,
            BTreeMap::from([("zone".into(), "b".into())])
        );
    }

    #[test]
    fn garbage_hosts_are_errors_and_the_rest_still_count() {
        let mut bad_status = listed(&game(), true, true);
        bad_status["metadata"]["status"] = json!("sleepy");
        let mut bad_tags = listed(&Instance { port: 2, ..game() }, true, true);
        bad_tags["metadata"]["tags"] = json!("game,pvp");
        let entries = read(vec![
            bad_status,
            bad_tags,
            json!({"ip": "10.0.0.9", "port": 70000}),
            json!({"ip": "10.0.0.9", "port": 1, "weight": 0.0}),
            json!({"port": 1}),
            listed(&Instance { port: 3, ..game() }, true, true),
        ]);
        assert_eq!(entries.len(), 6);
        let errors: Vec<&String> = entries
            .iter()
            .filter_map(|e| e.value.as_ref().err())
            .collect();
        assert_eq!(errors.len(), 5, "{entries:#?}");
        assert!(errors.iter().any(|e| e.contains("unknown status")));
        assert!(errors.iter().any(|e| e.contains("tags")));
        assert!(errors.iter().any(|e| e.contains("port 70000")));
        assert!(errors.iter().any(|e| e.contains("weight 0")));
        assert!(list_entries("logic", b"[]").is_err());
        assert!(read(vec![]).is_empty());
    }

    #[test]
    fn a_read_back_host_is_compared_with_what_was_written() {
        let host: Host = serde_json::from_value(listed(&game(), true, true)).expect("host");
        assert!(host.is_as_written(&game(), TTL));
        let draining = Instance {
            status: Status::Draining,
            ..game()
        };
        assert!(
            !host.is_as_written(&draining, TTL),
            "status and enabled differ"
        );
        let recreated: Host = serde_json::from_value(json!({
            "ip": "10.0.0.5", "port": 8001, "weight": 1.0, "enabled": true,
            "metadata": metadata_of(&game(), TTL)
        }))
        .expect("host");
        assert!(!recreated.is_as_written(&game(), TTL), "weight differs");
    }

    #[test]
    fn beat_info_names_the_grouped_service() {
        let params = beat_params(&game(), "G", TTL);
        let beat: Value = serde_json::from_str(&params.last().expect("beat").1).expect("json");
        assert_eq!(beat["serviceName"], "G@@logic");
        assert_eq!(beat["period"], 3000);
        assert_eq!(beat["metadata"]["id"], "logic-1");
    }
}
