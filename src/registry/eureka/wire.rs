//! The JSON Eureka takes and gives (its REST operations' Jackson codec):
//! our instance document, the applications of a fetch or a delta, and the
//! apps hash code a client checks its copy against.
//!
//! squire's fields ride in the instance `metadata` (Eureka metadata values
//! are strings): `squire.tags` (a JSON array), `squire.version`,
//! `squire.weight` and `squire.status` (the exact state; Eureka's own
//! `status` is one of UP, DOWN, OUT_OF_SERVICE, STARTING). An instance
//! registered by another Eureka client has none of them: no tags, no
//! version, weight 100, its status read from Eureka's. The reported load
//! rides there too, as `squire_load_players`, `squire_load_capacity` and
//! `squire_load_at` (the keys every string-metadata backend uses).

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use crate::registry::{Instance, Status};

const TAGS: &str = "squire.tags";
const VERSION: &str = "squire.version";
const WEIGHT: &str = "squire.weight";
const STATUS: &str = "squire.status";

/// Eureka's status for one of ours.
pub(super) fn eureka_status(status: Status) -> &'static str {
    match status {
        Status::Healthy | Status::Warning => "UP",
        Status::Unhealthy | Status::Critical => "DOWN",
        Status::Draining => "OUT_OF_SERVICE",
        Status::Unknown => "STARTING",
    }
}

fn from_eureka_status(status: &str) -> Status {
    match status {
        "UP" => Status::Healthy,
        "DOWN" => Status::Unhealthy,
        "OUT_OF_SERVICE" => Status::Draining,
        // STARTING, UNKNOWN, anything else.
        _ => Status::Unknown,
    }
}

/// Eureka's application name of a service: upper case, as Eureka stores
/// it whatever a client sends.
pub(super) fn app_name(service: &str) -> String {
    service.to_ascii_uppercase()
}

/// The body of `POST /apps/{APP}`: our instance, its lease `ttl` seconds,
/// renewed every ttl/3.
pub(super) fn instance_document(instance: &Instance, ttl_secs: u64) -> Value {
    let mut metadata: Map<String, Value> = instance
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    metadata.insert(TAGS.into(), Value::String(json!(instance.tags).to_string()));
    metadata.insert(VERSION.into(), Value::String(instance.version.clone()));
    metadata.insert(WEIGHT.into(), Value::String(instance.weight.to_string()));
    metadata.insert(
        STATUS.into(),
        Value::String(instance.status.as_str().into()),
    );
    let mut load = BTreeMap::new();
    crate::registry::wire::load_to_meta(instance.load.as_ref(), &mut load);
    metadata.extend(load.into_iter().map(|(k, v)| (k, Value::String(v))));
    json!({
        "instance": {
            "instanceId": instance.id,
            "hostName": instance.host,
            "app": app_name(&instance.name),
            "ipAddr": instance.host,
            "vipAddress": instance.name,
            "secureVipAddress": instance.name,
            "status": eureka_status(instance.status),
            "port": { "$": instance.port, "@enabled": "true" },
            "securePort": { "$": 443, "@enabled": "false" },
            "dataCenterInfo": {
                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                "name": "MyOwn"
            },
            "leaseInfo": {
                "renewalIntervalInSecs": (ttl_secs / 3).max(1),
                "durationInSecs": ttl_secs
            },
            "metadata": metadata
        }
    })
}

/// One instance of a fetch, by instance id: what it holds, or why it
/// cannot be used; and the action of a delta.
pub(crate) struct Fetched {
    pub id: String,
    pub app: String,
    pub eureka_status: String,
    pub action: Option<String>,
    pub instance: Result<Instance, String>,
}

/// The applications of `GET /apps` or `GET /apps/delta`, and the server's
/// apps hash code. Jackson writes a one-element list as a bare object in
/// some Eureka versions: both are read.
pub(crate) fn applications(body: &[u8]) -> Result<(Vec<Fetched>, Option<String>), String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let apps = value
        .get("applications")
        .ok_or("no \"applications\" object")?;
    let hash = apps
        .get("apps__hashcode")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut out = Vec::new();
    for app in one_or_many(apps.get("application")) {
        let name = app.get("name").and_then(Value::as_str).unwrap_or_default();
        for instance in one_or_many(app.get("instance")) {
            out.push(fetched(name, instance));
        }
    }
    Ok((out, hash))
}

fn one_or_many(value: Option<&Value>) -> Vec<&Value> {
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(one) => vec![one],
    }
}

fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn fetched(app: &str, value: &Value) -> Fetched {
    let id = text(value, "instanceId")
        .or_else(|| text(value, "hostName"))
        .unwrap_or_default()
        .to_owned();
    let eureka_status = text(value, "status").unwrap_or("UNKNOWN").to_owned();
    Fetched {
        instance: instance(app, &id, &eureka_status, value),
        id,
        app: app.to_owned(),
        eureka_status,
        action: text(value, "actionType").map(str::to_owned),
    }
}

/// An entry as squire routes it. The service name is the lower-cased app
/// name (Eureka upper-cases it).
fn instance(app: &str, id: &str, status: &str, value: &Value) -> Result<Instance, String> {
    if id.is_empty() {
        return Err("no instanceId".into());
    }
    let host = text(value, "ipAddr")
        .filter(|h| !h.is_empty())
        .ok_or("no ipAddr")?;
    let port = value.get("port").ok_or("no port")?;
    let enabled = match port.get("@enabled") {
        Some(Value::String(s)) => s == "true",
        Some(Value::Bool(b)) => *b,
        _ => true,
    };
    if !enabled {
        return Err("its plain port is not enabled".into());
    }
    let port = match port.get("$") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .and_then(|p| u16::try_from(p).ok())
    .filter(|p| *p != 0)
    .ok_or("port is not a number in 1-65535")?;
    let mut metadata: BTreeMap<String, String> = match value.get("metadata") {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    // Eureka's own marker of an empty metadata map.
    metadata.remove("@class");
    let tags = match metadata.remove(TAGS) {
        Some(json) => serde_json::from_str(&json).map_err(|e| format!("{TAGS}: {e}"))?,
        None => Vec::new(),
    };
    let version = metadata.remove(VERSION).unwrap_or_default();
    let weight = match metadata.remove(WEIGHT) {
        Some(w) => w
            .parse()
            .map_err(|_| format!("{WEIGHT} {w:?} is not a number"))?,
        None => 100,
    };
    let finer = metadata.remove(STATUS).and_then(|s| Status::from_name(&s));
    let load = crate::registry::wire::load_from_meta(&mut metadata);
    // Eureka's status wins where it says more than ours could: an operator's
    // OUT_OF_SERVICE override, or DOWN.
    let status = match (from_eureka_status(status), finer) {
        (Status::Healthy, Some(finer @ (Status::Healthy | Status::Warning))) => finer,
        (Status::Unhealthy, Some(finer @ (Status::Unhealthy | Status::Critical))) => finer,
        (eureka, _) => eureka,
    };
    Ok(Instance {
        name: app.to_ascii_lowercase(),
        id: id.to_owned(),
        host: host.to_owned(),
        port,
        tags,
        metadata,
        version,
        weight,
        status,
        load,
    })
}

/// Eureka's reconcile hash code of a set of instance statuses:
/// `STATUS_count_` for each status, in status order (`DOWN_1_UP_2_`).
pub(super) fn hash_code<'a>(statuses: impl Iterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for status in statuses {
        *counts.entry(status).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(status, count)| format!("{status}_{count}_"))
        .collect()
}

/// The whole registry as a client keeps it between fetches: per app, per
/// instance id.
#[derive(Default, Clone)]
pub(crate) struct Apps {
    pub apps: HashMap<String, BTreeMap<String, Kept>>,
}

/// One instance as kept: Eureka's status (for the hash code) and ours.
#[derive(Clone)]
pub(crate) struct Kept {
    pub eureka_status: String,
    pub instance: Result<Instance, String>,
}

impl Apps {
    pub fn from_fetch(fetched: Vec<Fetched>) -> Apps {
        let mut apps = Apps::default();
        for f in fetched {
            apps.put(f);
        }
        apps
    }

    fn put(&mut self, f: Fetched) {
        self.apps.entry(f.app).or_default().insert(
            f.id,
            Kept {
                eureka_status: f.eureka_status,
                instance: f.instance,
            },
        );
    }

    /// Applies a delta: ADDED and MODIFIED replace, DELETED removes.
    pub fn apply(&mut self, delta: Vec<Fetched>) {
        for f in delta {
            match f.action.as_deref() {
                Some("DELETED") => {
                    if let Some(app) = self.apps.get_mut(&f.app) {
                        app.remove(&f.id);
                        if app.is_empty() {
                            self.apps.remove(&f.app);
                        }
                    }
                }
                _ => self.put(f),
            }
        }
    }

    pub fn hash_code(&self) -> String {
        hash_code(
            self.apps
                .values()
                .flat_map(|app| app.values().map(|c| c.eureka_status.as_str())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(status: Status) -> Instance {
        Instance {
            name: "battle".into(),
            id: "battle-1".into(),
            host: "10.0.0.5".into(),
            port: 7000,
            tags: vec!["game".into(), "a,b".into()],
            metadata: [("zone".to_owned(), "a".to_owned())].into(),
            version: "1.2.0".into(),
            weight: 50,
            status,
            load: None,
        }
    }

    fn read_back(document: &Value, eureka_status: &str) -> Instance {
        let mut value = document["instance"].clone();
        value["status"] = eureka_status.into();
        instance("BATTLE", "battle-1", eureka_status, &value).expect("reads")
    }

    #[test]
    fn our_document_reads_back_as_the_same_instance() {
        for status in Status::ALL {
            let document = instance_document(&ours(status), 9);
            assert_eq!(document["instance"]["app"], "BATTLE");
            assert_eq!(document["instance"]["port"]["$"], 7000);
            assert_eq!(document["instance"]["leaseInfo"]["durationInSecs"], 9);
            assert_eq!(
                document["instance"]["leaseInfo"]["renewalIntervalInSecs"],
                3
            );
            let eureka = eureka_status(status);
            assert_eq!(document["instance"]["status"], eureka);
            assert_eq!(read_back(&document, eureka), ours(status), "{status}");
        }
    }

    #[test]
    fn eurekas_override_wins_over_our_status() {
        let document = instance_document(&ours(Status::Healthy), 9);
        assert_eq!(
            read_back(&document, "OUT_OF_SERVICE").status,
            Status::Draining
        );
        assert_eq!(read_back(&document, "DOWN").status, Status::Unhealthy);
        let warning = instance_document(&ours(Status::Warning), 9);
        assert_eq!(read_back(&warning, "UP").status, Status::Warning);
    }

    #[test]
    fn a_spring_client_instance_and_bare_objects_are_read() {
        let body = br#"{"applications":{"versions__delta":"1","apps__hashcode":"UP_1_","application":{"name":"GATE","instance":{"instanceId":"host:gate:8080","hostName":"host","app":"GATE","ipAddr":"10.0.0.9","status":"UP","port":{"$":"8080","@enabled":"true"},"metadata":{"@class":"java.util.Collections$EmptyMap"}}}}}"#;
        let (fetched, hash) = applications(body).expect("parses");
        assert_eq!(hash.as_deref(), Some("UP_1_"));
        let instance = fetched[0].instance.clone().expect("usable");
        assert_eq!(
            (instance.name.as_str(), instance.port, instance.weight),
            ("gate", 8080, 100)
        );
        assert!(instance.metadata.is_empty() && instance.tags.is_empty());
        assert_eq!(instance.status, Status::Healthy);
    }

    #[test]
    fn unusable_instances_say_why() {
        let body = br#"{"applications":{"application":[{"name":"A","instance":[{"instanceId":"a1","ipAddr":"10.0.0.1","status":"UP","port":{"$":8080,"@enabled":"false"}},{"instanceId":"a2","status":"UP","port":{"$":1}},{"instanceId":"a3","ipAddr":"h","port":{"$":70000}},{"instanceId":"a4","ipAddr":"h","port":{"$":1},"metadata":{"squire.weight":"lots"}}]}]}}"#;
        let (fetched, _) = applications(body).expect("parses");
        let errors: Vec<String> = fetched
            .into_iter()
            .map(|f| f.instance.expect_err("unusable"))
            .collect();
        assert_eq!(
            errors,
            [
                "its plain port is not enabled",
                "no ipAddr",
                "port is not a number in 1-65535",
                "squire.weight \"lots\" is not a number"
            ]
        );
    }

    #[test]
    fn hash_code_is_eurekas() {
        assert_eq!(hash_code(["UP", "DOWN", "UP"].into_iter()), "DOWN_1_UP_2_");
        assert_eq!(hash_code(std::iter::empty()), "");
    }

    #[test]
    fn a_delta_adds_modifies_and_deletes() {
        let full = br#"{"applications":{"application":[{"name":"A","instance":[{"instanceId":"a1","ipAddr":"h","status":"UP","port":{"$":1}},{"instanceId":"a2","ipAddr":"h","status":"UP","port":{"$":2}}]}]}}"#;
        let mut apps = Apps::from_fetch(applications(full).expect("full").0);
        assert_eq!(apps.hash_code(), "UP_2_");
        let delta = br#"{"applications":{"apps__hashcode":"DOWN_1_UP_1_","application":[{"name":"A","instance":[{"instanceId":"a1","ipAddr":"h","status":"DOWN","port":{"$":1},"actionType":"MODIFIED"},{"instanceId":"a2","actionType":"DELETED"},{"instanceId":"a3","ipAddr":"h","status":"UP","port":{"$":3},"actionType":"ADDED"}]}]}}"#;
        let (changes, hash) = applications(delta).expect("delta");
        apps.apply(changes);
        assert_eq!(Some(apps.hash_code()), hash);
    }
}
