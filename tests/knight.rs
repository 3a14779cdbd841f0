//! The registry contract with Knight Server processes, both ways, on a
//! real etcd: what squire writes parses as Knight's `ServiceInfo` (whose
//! `ServiceStatus` accepts only unknown, healthy, unhealthy, critical), and
//! what Knight writes (`to_dict()` with typed metadata, `dataclasses.asdict`
//! with `None` tags and metadata) is routed by squire.
//!
//! The Rust tests always run, with the exact JSON values the Python side
//! writes; `knight_python_reads_and_writes_the_registry` drives the same
//! through Knight's shape in Python with the PyPI `aetcd` client:
//!
//! ```text
//! python3 -m venv /tmp/knight && /tmp/knight/bin/pip install aetcd==1.0.0
//! SQUIRE_KNIGHT_PYTHON=/tmp/knight/bin/python cargo test --test knight -- --ignored
//! ```

mod support;

use std::sync::atomic::Ordering;

use squire::registry::{Instance, Status};
use support::config::{AgentToml, Section};
use support::{eventually, Backend, Etcd, TestAgent, DEADLINE};

/// What Knight's `to_dict()` writes, metadata typed as in its docstring.
const KNIGHT_TO_DICT: &str = r#"{"name": "knight", "id": "knight-typed", "host": "127.0.0.1", "port": PORT, "tags": ["game"], "metadata": {"weight": 100, "zone": "a"}, "version": "1.0.0", "weight": 100, "status": "healthy"}"#;
/// What `dataclasses.asdict()` writes for an instance without tags and
/// metadata.
const KNIGHT_ASDICT: &str = r#"{"name": "knight", "id": "knight-nulls", "host": "127.0.0.1", "port": PORT, "tags": null, "metadata": null, "version": "1.0.0", "weight": 100, "status": "healthy"}"#;

const KNIGHT_STATUSES: [&str; 4] = ["unknown", "healthy", "unhealthy", "critical"];

async fn value(etcd: &Etcd, key: &str) -> Option<serde_json::Value> {
    let response = etcd.client().await.get(key, None).await.ok()?;
    let kv = response.kvs().first()?;
    serde_json::from_slice(kv.value()).ok()
}

/// B proxies to the Knight-written instances under `prefix`, routing
/// `knight` with a metadata filter on a typed value.
async fn squire_routes_knight_instances(etcd: &Etcd, prefix: &str, backend: &Backend) {
    let upstream = Section::fast_upstream("knight").set(
        "metadata",
        toml::Table::from_iter([("zone".to_owned(), "a".into())]),
    );
    let b = TestAgent::start(&AgentToml::etcd(etcd, prefix).upstream(upstream)).await;
    eventually("B routes the typed Knight instance", DEADLINE, || async {
        b.routable().await == ["knight-typed"]
    })
    .await;
    let before = backend.connections.load(Ordering::SeqCst);
    let (greeting, _, _) = support::session(b.listen(), b"from squire")
        .await
        .expect("session");
    assert_eq!(greeting, "K");
    assert_eq!(backend.connections.load(Ordering::SeqCst), before + 1);
    let services = b.json("/v1/services").await;
    let knight = services["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "knight"))
        .cloned()
        .unwrap_or_default();
    let ids: Vec<&str> = knight["instances"]
        .as_array()
        .map(|all| all.iter().filter_map(|i| i["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["knight-nulls", "knight-typed"], "{services}");
    let skipped = b
        .metric(r#"squire_registry_entries_skipped_total{service="knight"}"#)
        .await;
    assert_eq!(skipped.unwrap_or(0.0), 0.0, "no Knight entry skipped");
    b.stop().await;
}

#[tokio::test]
async fn squire_announces_only_knight_statuses_and_routes_knight_entries() {
    let etcd = Etcd::start().await;
    let backend = Backend::start("K").await;
    let port = backend.addr.port().to_string();
    let mut client = etcd.client().await;
    for (id, json) in [
        ("knight-typed", KNIGHT_TO_DICT),
        ("knight-nulls", KNIGHT_ASDICT),
    ] {
        client
            .put(
                format!("/knight/knight/{id}"),
                json.replace("PORT", &port),
                None,
            )
            .await
            .expect("put");
    }
    squire_routes_knight_instances(&etcd, "/knight", &backend).await;

    // A live squire in maintenance: Knight sees unhealthy, squire draining.
    let addr = "127.0.0.1:7300".parse().expect("addr");
    let a = TestAgent::start(
        &AgentToml::etcd(&etcd, "/knight").service(Section::game_service("battle", addr)),
    )
    .await;
    let key = "/knight/battle/battle-1";
    eventually("registered healthy", DEADLINE, || async {
        value(&etcd, key)
            .await
            .is_some_and(|v| v["status"] == "healthy")
    })
    .await;
    squire::admin::set_maintenance(a.admin, Ok(&a.token), true, Some("patch"))
        .await
        .expect("maintenance on");
    eventually("draining, announced as unhealthy", DEADLINE, || async {
        value(&etcd, key)
            .await
            .is_some_and(|v| v["status"] == "unhealthy" && v["squire_status"] == "draining")
    })
    .await;
    a.stop().await;
}

#[tokio::test]
#[ignore = "needs Python with aetcd; see the module doc"]
async fn knight_python_reads_and_writes_the_registry() {
    let python = std::env::var("SQUIRE_KNIGHT_PYTHON").expect("SQUIRE_KNIGHT_PYTHON");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/knight/knight.py"
    );
    let etcd = Etcd::start().await;
    let target = etcd.endpoint().trim_start_matches("http://").to_owned();

    // squire -> Knight: every state squire can announce, as it writes it,
    // and one live registration.
    let mut client = etcd.client().await;
    for status in Status::ALL {
        let instance = Instance {
            name: "battle".into(),
            id: format!("battle-{status}"),
            host: "127.0.0.1".into(),
            port: 7000,
            tags: vec!["game".into()],
            metadata: [("zone".to_owned(), "a".to_owned())].into(),
            version: "1.0.0".into(),
            weight: 100,
            status,
            load: None,
        };
        client
            .put(
                format!("/read/battle/{}", instance.id),
                instance.to_json(),
                None,
            )
            .await
            .expect("put");
    }
    let addr = "127.0.0.1:7301".parse().expect("addr");
    let a = TestAgent::start(
        &AgentToml::etcd(&etcd, "/read").service(Section::game_service("battle", addr)),
    )
    .await;
    eventually("registered", DEADLINE, || async {
        value(&etcd, "/read/battle/battle-1").await.is_some()
    })
    .await;
    let read = tokio::process::Command::new(&python)
        .args([script, "read", &target, "/read/battle/"])
        .output()
        .await
        .expect("run python");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&read.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    assert_eq!(lines.len(), Status::ALL.len() + 1, "{lines:?}");
    for line in &lines {
        assert!(line["error"].is_null(), "Knight could not read {line}");
        let status = line["status"].as_str().unwrap_or_default();
        assert!(KNIGHT_STATUSES.contains(&status), "{line}");
    }
    let of = |id: &str| {
        lines
            .iter()
            .find(|l| l["id"] == id)
            .map(|l| l["status"].clone())
    };
    assert_eq!(of("battle-draining"), Some("unhealthy".into()));
    assert_eq!(of("battle-warning"), Some("healthy".into()));
    assert_eq!(of("battle-critical"), Some("critical".into()));
    assert_eq!(of("battle-1"), Some("healthy".into()));
    a.stop().await;

    // Knight -> squire.
    let backend = Backend::start("K").await;
    let write = tokio::process::Command::new(&python)
        .args([
            script,
            "write",
            &target,
            "/write",
            &backend.addr.port().to_string(),
        ])
        .output()
        .await
        .expect("run python");
    assert!(
        write.status.success(),
        "{}",
        String::from_utf8_lossy(&write.stderr)
    );
    squire_routes_knight_instances(&etcd, "/write", &backend).await;
}
