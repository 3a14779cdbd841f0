//! squire's Eureka backend against the fake Eureka server
//! (`tests/support/eureka.rs`, checked against the Eureka REST operations
//! in `tests/eureka_fake.rs`): the instance document, renewals, a server
//! that forgot us, draining as the OUT_OF_SERVICE override, polled
//! discovery with deltas and the hash-code check, an unreachable server,
//! and a reported load carried in the metadata to a peer that picks by it
//! (`support::load`).

mod support;

use serde_json::Value;
use support::config::{AgentToml, Section};
use support::eureka::{call, FakeEureka};
use support::{eventually, session, Backend, TestAgent, DEADLINE};

fn registry(fake: &FakeEureka) -> Section {
    Section::new()
        .set("kind", "eureka")
        .set("url", fake.url())
        .set("ttl", "3s")
        .set("timeout", "2s")
        .set("poll_interval", "200ms")
}

fn renewals(fake: &FakeEureka, id: &str) -> usize {
    let path = format!("PUT /eureka/apps/BATTLE/{id}");
    fake.requests().iter().filter(|r| **r == path).count()
}

async fn watch_up(agent: &TestAgent) -> bool {
    agent.json("/v1/services").await["services"][0]["watch_up"] == true
}

#[tokio::test]
async fn registration_is_the_instance_document_renewed_and_cancelled_on_stop() {
    let fake = FakeEureka::start().await;
    let addr = "127.0.0.1:7400".parse().expect("addr");
    let agent = TestAgent::start(
        &AgentToml::new(registry(&fake)).service(Section::game_service("battle", addr)),
    )
    .await;
    eventually("registered", DEADLINE, || async {
        !fake.instances("BATTLE").is_empty()
    })
    .await;
    let instance = fake.instances("BATTLE")[0].clone();
    assert_eq!(instance["instanceId"], "battle-1");
    assert_eq!(instance["app"], "BATTLE");
    assert_eq!(instance["ipAddr"], "127.0.0.1");
    assert_eq!(instance["status"], "UP");
    assert_eq!(
        instance["port"],
        serde_json::json!({"$": 7400, "@enabled": "true"})
    );
    assert_eq!(instance["leaseInfo"]["durationInSecs"], 3);
    assert_eq!(instance["leaseInfo"]["renewalIntervalInSecs"], 1);
    let metadata = &instance["metadata"];
    assert_eq!(metadata["zone"], "a");
    assert_eq!(metadata["squire.tags"], r#"["game"]"#);
    assert_eq!(metadata["squire.version"], "1.0.0");
    assert_eq!(metadata["squire.weight"], "100");
    assert_eq!(metadata["squire.status"], "healthy");
    eventually("renewals every ttl/3", DEADLINE, || async {
        renewals(&fake, "battle-1") >= 2
    })
    .await;

    // Maintenance is Eureka's OUT_OF_SERVICE override, and back.
    squire::admin::set_maintenance(agent.admin, Ok(&agent.token), true, None)
        .await
        .expect("maintenance on");
    eventually("OUT_OF_SERVICE", DEADLINE, || async {
        fake.instances("BATTLE")[0]["status"] == "OUT_OF_SERVICE"
    })
    .await;
    assert!(fake
        .requests()
        .contains(&"PUT /eureka/apps/BATTLE/battle-1/status?value=OUT_OF_SERVICE".to_owned()));
    squire::admin::set_maintenance(agent.admin, Ok(&agent.token), false, None)
        .await
        .expect("maintenance off");
    eventually("UP again", DEADLINE, || async {
        fake.instances("BATTLE")[0]["status"] == "UP"
    })
    .await;

    // Forgotten by the server (restarted empty): the renewal's 404 brings
    // the registration back.
    fake.restart_empty();
    eventually("registered again after a 404", DEADLINE, || async {
        !fake.instances("BATTLE").is_empty()
    })
    .await;

    agent.stop().await;
    assert!(fake.instances("BATTLE").is_empty(), "cancelled on stop");
    assert!(fake
        .requests()
        .contains(&"DELETE /eureka/apps/BATTLE/battle-1".to_owned()));
}

#[tokio::test]
async fn a_peer_routes_through_polled_discovery_and_keeps_its_view_while_eureka_is_down() {
    let fake = FakeEureka::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::new(registry(&fake)).service(Section::game_service("battle", backend.addr)),
    )
    .await;
    let b = TestAgent::start(
        &AgentToml::new(registry(&fake)).upstream(Section::fast_upstream("battle")),
    )
    .await;
    eventually("B to see A", DEADLINE, || async {
        b.routable().await == ["battle-1"]
    })
    .await;
    let (greeting, _, _) = session(b.listen(), b"hi").await.expect("session");
    assert_eq!(greeting, "A");

    // An instance registered by another Eureka client (no squire metadata).
    let other = Backend::start("S").await;
    let spring = serde_json::json!({ "instance": {
        "instanceId": "spring-1", "hostName": "spring", "app": "BATTLE", "ipAddr": "127.0.0.1",
        "status": "UP", "port": { "$": other.addr.port(), "@enabled": "true" },
        "leaseInfo": { "durationInSecs": 90 },
        "metadata": { "@class": "java.util.Collections$EmptyMap" }
    }});
    let (status, _) = call(
        fake.addr(),
        "POST",
        "/eureka/apps/BATTLE",
        Some(&spring.to_string()),
        "application/json",
    )
    .await;
    assert_eq!(status, 204);
    eventually(
        "B to see the Spring instance from a delta",
        DEADLINE,
        || async { b.routable().await == ["battle-1", "spring-1"] },
    )
    .await;

    // A delta the client never saw (the instance dropped without one): the
    // hash code differs and B fetches everything.
    fake.forget("BATTLE", "spring-1");
    eventually("B to drop the forgotten instance", DEADLINE, || async {
        b.routable().await == ["battle-1"]
    })
    .await;
    let full_fetches = fake
        .requests()
        .iter()
        .filter(|r| *r == "GET /eureka/apps")
        .count();
    assert!(
        full_fetches >= 2,
        "a full fetch after the mismatch: {full_fetches}"
    );

    // Eureka down: B keeps routing from its last view.
    fake.stop();
    eventually("B's watch to notice", DEADLINE, || async {
        !watch_up(&b).await
    })
    .await;
    assert_eq!(b.routable().await, ["battle-1"]);
    let (greeting, _, _) = session(b.listen(), b"still").await.expect("session");
    assert_eq!(greeting, "A");
    fake.start_again().await;
    eventually("B's watch back", DEADLINE, || async { watch_up(&b).await }).await;

    a.stop().await;
    eventually("B to drop A after its cancel", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn a_garbage_instance_is_skipped_and_counted() {
    let fake = FakeEureka::start().await;
    let backend = Backend::start("A").await;
    let good = serde_json::json!({ "instance": {
        "instanceId": "good", "app": "BATTLE", "ipAddr": "127.0.0.1", "status": "UP",
        "port": { "$": backend.addr.port(), "@enabled": "true" }, "metadata": {}
    }});
    let bad = serde_json::json!({ "instance": {
        "instanceId": "bad", "app": "BATTLE", "ipAddr": "127.0.0.1", "status": "UP",
        "port": { "$": 1, "@enabled": "true" }, "metadata": { "squire.tags": "not json" }
    }});
    for document in [good, bad] {
        let (status, _) = call(
            fake.addr(),
            "POST",
            "/eureka/apps/BATTLE",
            Some(&document.to_string()),
            "application/json",
        )
        .await;
        assert_eq!(status, 204);
    }
    let b = TestAgent::start(
        &AgentToml::new(registry(&fake)).upstream(Section::fast_upstream("battle")),
    )
    .await;
    eventually("B routes the good one only", DEADLINE, || async {
        b.routable().await == ["good"]
    })
    .await;
    let skipped = b
        .metric(r#"squire_registry_entries_skipped_total{service="battle"}"#)
        .await;
    assert_eq!(skipped, Some(1.0));
    let services: Value = b.json("/v1/services").await;
    assert_eq!(services["services"][0]["summary"]["total"], 1, "{services}");
    b.stop().await;
}

#[tokio::test]
async fn a_reported_load_round_trips_to_a_peer_and_steers_its_picks() {
    let fake = FakeEureka::start().await;
    support::load::round_trip(|| registry(&fake)).await;
}

/// The unchanged PyPI client py-eureka-client against the fake and
/// squire, both ways:
///
/// ```text
/// python3 -m venv /tmp/pyeureka && /tmp/pyeureka/bin/pip install py-eureka-client==0.13.3
/// SQUIRE_EUREKA_PYTHON=/tmp/pyeureka/bin/python cargo test --test eureka -- --ignored
/// ```
#[tokio::test]
#[ignore = "needs py-eureka-client; see the doc comment"]
async fn py_eureka_client_works_unchanged_with_the_fake_and_squire() {
    let python = std::env::var("SQUIRE_EUREKA_PYTHON").expect("SQUIRE_EUREKA_PYTHON");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/eureka/python_client.py"
    );
    let fake = FakeEureka::start().await;
    let addr = "127.0.0.1:7401".parse().expect("addr");
    let a = TestAgent::start(
        &AgentToml::new(registry(&fake)).service(Section::game_service("battle", addr)),
    )
    .await;
    eventually("squire registered", DEADLINE, || async {
        !fake.instances("BATTLE").is_empty()
    })
    .await;
    let backend = Backend::start("P").await;
    let run = tokio::process::Command::new(&python)
        .args([script, &fake.url(), &backend.addr.port().to_string()])
        .output()
        .await
        .expect("run python");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let seen: Value = serde_json::from_slice(&run.stdout).expect("one JSON line");
    assert_eq!(seen["out_of_service_status"], "OUT_OF_SERVICE");
    assert_eq!(seen["battle"][0]["id"], "battle-1");
    assert_eq!(seen["battle"][0]["ip"], "127.0.0.1");
    assert_eq!(seen["battle"][0]["port"], 7401);
    assert_eq!(seen["battle"][0]["status"], "UP");
    assert_eq!(seen["battle"][0]["metadata"]["squire.version"], "1.0.0");
    assert_eq!(seen["apps_hashcode"], "UP_2_");

    let b = TestAgent::start(
        &AgentToml::new(registry(&fake)).upstream(Section::fast_upstream("pyapp")),
    )
    .await;
    eventually(
        "squire routes the Python client's instance",
        DEADLINE,
        || async { b.routable().await == ["py-1"] },
    )
    .await;
    let (greeting, _, _) = session(b.listen(), b"hi").await.expect("session");
    assert_eq!(greeting, "P");
    a.stop().await;
    b.stop().await;
}
