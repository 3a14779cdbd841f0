//! The registry value: Knight Server's `ServiceInfo` JSON, readable both
//! ways.
//!
//! Knight processes and squires share one registry, so the value is
//! Knight's shape, field for field, and its `status` carries only the four
//! values Knight's `ServiceStatus` enum accepts (`unknown`, `healthy`,
//! `unhealthy`, `critical`; anything else makes Knight skip the instance).
//! squire's finer state travels in `squire_status`, a field Knight ignores
//! and squire reads first, written only when it differs from `status`:
//!
//! | squire state | `status` (what Knight sees) | `squire_status` |
//! |---|---|---|
//! | unknown, healthy, unhealthy, critical | the same | absent |
//! | warning (degraded, still serving) | `healthy` | `warning` |
//! | draining (maintenance, shutting down) | `unhealthy` | `draining` |
//!
//! Read leniently, as Knight writes: `tags` and `metadata` may be `null`
//! (empty), metadata values may be any JSON type (a string stays itself,
//! anything else becomes its JSON text, which is what filters compare),
//! `version` may be `null`, unknown fields are ignored. An unknown status
//! is an error (the entry is skipped and counted); an unknown
//! `squire_status` is ignored in favour of `status`.
//!
//! The load the game process reports travels in `load`, absent when there
//! is none (Knight entries and older squires never have one; Knight ignores
//! it): `{"players":37,"capacity":100,"at":"2026-12-03T14:00:00.000Z"}`,
//! `at` RFC 3339. A `load` that does not parse (missing fields, capacity 0,
//! a bad time) is read as no load, never as a bad entry.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use super::{Instance, Load, Status};

/// The JSON object, in Knight's field order.
#[derive(Serialize, Deserialize)]
pub(super) struct Wire {
    name: String,
    id: String,
    host: String,
    port: u16,
    #[serde(default, deserialize_with = "null_as_default")]
    tags: Vec<String>,
    #[serde(default, deserialize_with = "any_metadata")]
    metadata: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    version: String,
    #[serde(default = "default_weight", deserialize_with = "null_as_weight")]
    weight: u32,
    /// Absent in entries written by registrants without health checks,
    /// which are taken as healthy (as Consul treats a service with no
    /// checks).
    #[serde(default)]
    status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    squire_status: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_load"
    )]
    load: Option<Load>,
}

/// A `load` object, or `None` for anything else (see the module doc).
fn lenient_load<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Load>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(value.as_ref().and_then(load_from_json))
}

pub(crate) fn load_from_json(value: &serde_json::Value) -> Option<Load> {
    let number = |name: &str| {
        value
            .get(name)?
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
    };
    let at = humantime::parse_rfc3339_weak(value.get("at")?.as_str()?).ok()?;
    Load::new(number("players")?, number("capacity")?, at).ok()
}

/// The load as flat text fields, for backends that carry string metadata
/// (Consul `Meta`, Nacos and Eureka metadata): `squire_load_players`,
/// `squire_load_capacity`, `squire_load_at` (RFC 3339).
pub(crate) const LOAD_PLAYERS: &str = "squire_load_players";
pub(crate) const LOAD_CAPACITY: &str = "squire_load_capacity";
pub(crate) const LOAD_AT: &str = "squire_load_at";

/// Adds the load's three keys to `meta` (nothing without a load).
pub(crate) fn load_to_meta(load: Option<&Load>, meta: &mut BTreeMap<String, String>) {
    if let Some(load) = load {
        meta.insert(LOAD_PLAYERS.to_owned(), load.players.to_string());
        meta.insert(LOAD_CAPACITY.to_owned(), load.capacity.to_string());
        meta.insert(
            LOAD_AT.to_owned(),
            humantime::format_rfc3339_millis(load.at).to_string(),
        );
    }
}

/// Takes the load's keys out of `meta` (so they do not show as metadata)
/// and reads them; `None` when absent or invalid.
pub(crate) fn load_from_meta(meta: &mut BTreeMap<String, String>) -> Option<Load> {
    let players = meta.remove(LOAD_PLAYERS);
    let capacity = meta.remove(LOAD_CAPACITY);
    let at = meta.remove(LOAD_AT);
    let at = humantime::parse_rfc3339_weak(&at?).ok()?;
    Load::new(players?.parse().ok()?, capacity?.parse().ok()?, at).ok()
}

fn default_weight() -> u32 {
    100
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn null_as_weight<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    Ok(Option::<u32>::deserialize(deserializer)?.unwrap_or_else(default_weight))
}

fn any_metadata<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let map = Option::<BTreeMap<String, serde_json::Value>>::deserialize(deserializer)?;
    Ok(map
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (key, text)
        })
        .collect())
}

/// What Knight's `ServiceStatus` can hold for `status`.
fn knight(status: Status) -> Status {
    match status {
        Status::Warning => Status::Healthy,
        Status::Draining => Status::Unhealthy,
        other => other,
    }
}

impl From<Instance> for Wire {
    fn from(instance: Instance) -> Wire {
        let announced = knight(instance.status);
        Wire {
            name: instance.name,
            id: instance.id,
            host: instance.host,
            port: instance.port,
            tags: instance.tags,
            metadata: instance.metadata,
            version: instance.version,
            weight: instance.weight,
            status: Some(announced.as_str().to_owned()),
            squire_status: (announced != instance.status)
                .then(|| instance.status.as_str().to_owned()),
            load: instance.load,
        }
    }
}

impl TryFrom<Wire> for Instance {
    type Error = String;

    fn try_from(wire: Wire) -> Result<Instance, String> {
        if wire.host.is_empty() || wire.port == 0 {
            return Err("host and port must be set".to_owned());
        }
        let finer = wire.squire_status.as_deref().and_then(Status::from_name);
        let status = match (finer, wire.status.as_deref()) {
            (Some(status), _) => status,
            (None, None) => Status::Healthy,
            // Every status squire knows: entries of older squires carried
            // warning and draining here.
            (None, Some(name)) => {
                Status::from_name(name).ok_or_else(|| format!("unknown status {name:?}"))?
            }
        };
        Ok(Instance {
            name: wire.name,
            id: wire.id,
            host: wire.host,
            port: wire.port,
            tags: wire.tags,
            metadata: wire.metadata,
            version: wire.version,
            weight: wire.weight,
            status,
            load: wire.load,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNIGHT_STATUSES: [&str; 4] = ["unknown", "healthy", "unhealthy", "critical"];

    fn field(json: &str, name: &str) -> serde_json::Value {
        let value: serde_json::Value = serde_json::from_str(json).expect("json");
        value[name].clone()
    }

    #[test]
    fn every_state_announces_a_knight_status_and_reads_back_the_same() {
        for status in Status::ALL {
            let instance = Instance {
                status,
                ..Instance::for_tests("a")
            };
            let json = instance.to_json();
            let announced = field(&json, "status");
            assert!(
                KNIGHT_STATUSES.contains(&announced.as_str().unwrap_or_default()),
                "{status}: {json}"
            );
            assert_eq!(Instance::from_json(json.as_bytes()), Ok(instance), "{json}");
        }
        let draining = Instance {
            status: Status::Draining,
            ..Instance::for_tests("a")
        };
        let json = draining.to_json();
        assert_eq!(field(&json, "status"), "unhealthy");
        assert_eq!(field(&json, "squire_status"), "draining");
        let warning = Instance {
            status: Status::Warning,
            ..Instance::for_tests("a")
        };
        assert_eq!(field(&warning.to_json(), "status"), "healthy");
        // The common case is byte for byte what Knight writes.
        assert!(!Instance::for_tests("a").to_json().contains("squire_status"));
    }

    #[test]
    fn knight_to_dict_with_typed_metadata_is_read() {
        // Knight's docstring example: metadata {"weight": 100}.
        let json = br#"{"name":"logic","id":"logic-1","host":"10.0.0.5","port":8001,"tags":["game"],"metadata":{"weight":100,"zone":"a","pvp":true,"limits":{"max":5}},"version":"1.0.0","weight":100,"status":"healthy"}"#;
        let instance = Instance::from_json(json).expect("parses");
        assert_eq!(instance.metadata["weight"], "100");
        assert_eq!(instance.metadata["zone"], "a");
        assert_eq!(instance.metadata["pvp"], "true");
        assert_eq!(instance.metadata["limits"], r#"{"max":5}"#);
        assert_eq!(instance.status, Status::Healthy);
    }

    #[test]
    fn dataclasses_asdict_nulls_are_empty() {
        let json = br#"{"name":"logic","id":"logic-1","host":"10.0.0.5","port":8001,"tags":null,"metadata":null,"version":null,"weight":null,"status":"critical","extra":{"ignored":1}}"#;
        let instance = Instance::from_json(json).expect("parses");
        assert!(instance.tags.is_empty());
        assert!(instance.metadata.is_empty());
        assert_eq!(instance.version, "");
        assert_eq!(instance.weight, 100);
        assert_eq!(instance.status, Status::Critical);
    }

    #[test]
    fn the_load_round_trips_and_is_optional_and_lenient_on_read() {
        let at = humantime::parse_rfc3339("2026-12-03T14:00:00.250Z").expect("time");
        let instance = Instance {
            load: Some(Load::new(37, 100, at).expect("valid")),
            ..Instance::for_tests("a")
        };
        let json = instance.to_json();
        assert_eq!(
            field(&json, "load"),
            serde_json::json!({"players": 37, "capacity": 100, "at": "2026-12-03T14:00:00.250Z"})
        );
        assert_eq!(Instance::from_json(json.as_bytes()), Ok(instance));
        // Knight entries and older squires have none; none is written.
        assert!(!Instance::for_tests("a").to_json().contains("load"));
        let base = r#""name":"a","id":"a","host":"h","port":1"#;
        for bad in [
            r#"null"#,
            r#"{"players":1}"#,
            r#"{"players":1,"capacity":0,"at":"2026-12-03T14:00:00Z"}"#,
            r#"{"players":1,"capacity":2,"at":"yesterday"}"#,
            r#"{"players":-1,"capacity":2,"at":"2026-12-03T14:00:00Z"}"#,
            r#""37/100""#,
        ] {
            let read = Instance::from_json(format!(r#"{{{base},"load":{bad}}}"#).as_bytes())
                .expect("a bad load never makes a bad entry");
            assert_eq!(read.load, None, "{bad}");
        }
    }

    #[test]
    fn the_load_as_string_metadata_round_trips() {
        let at = humantime::parse_rfc3339("2026-12-03T14:00:00Z").expect("time");
        let load = Load::new(3, 8, at).expect("valid");
        let mut meta = BTreeMap::from([("zone".to_owned(), "a".to_owned())]);
        load_to_meta(Some(&load), &mut meta);
        assert_eq!(meta[LOAD_PLAYERS], "3");
        assert_eq!(meta[LOAD_CAPACITY], "8");
        assert_eq!(meta[LOAD_AT], "2026-12-03T14:00:00.000Z");
        assert_eq!(load_from_meta(&mut meta), Some(load));
        assert_eq!(meta.len(), 1, "the load keys are taken out of the metadata");
        assert_eq!(load_from_meta(&mut meta), None);
    }

    #[test]
    fn squire_status_is_read_first_and_an_unknown_one_falls_back() {
        let read = |json: &str| Instance::from_json(json.as_bytes()).map(|i| i.status);
        let base = r#""name":"a","id":"a","host":"h","port":1"#;
        assert_eq!(
            read(&format!(
                r#"{{{base},"status":"unhealthy","squire_status":"draining"}}"#
            )),
            Ok(Status::Draining)
        );
        assert_eq!(
            read(&format!(
                r#"{{{base},"status":"unhealthy","squire_status":"sleepy"}}"#
            )),
            Ok(Status::Unhealthy)
        );
        // Entries of older squires.
        assert_eq!(
            read(&format!(r#"{{{base},"status":"draining"}}"#)),
            Ok(Status::Draining)
        );
        assert_eq!(read(&format!(r#"{{{base}}}"#)), Ok(Status::Healthy));
        assert!(read(&format!(r#"{{{base},"status":"sleepy"}}"#))
            .is_err_and(|e| e.contains("unknown status")));
    }
}
