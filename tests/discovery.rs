//! Last known good on disk: a squire restarted while its registry is down
//! routes to the instances it last saw, says they are stale, and takes the
//! registry's listing as soon as there is one. Against a real etcd.

mod support;

use std::path::Path;

use tokio::time::Instant;

use support::config::{AgentToml, Section};
use support::{eventually, session, Backend, Etcd, TestAgent, DEADLINE};

/// An instance of `service` as Knight's `ServiceInfo` JSON, written straight
/// into etcd (no lease: it survives the agents).
async fn put_instance(etcd: &Etcd, prefix: &str, service: &str, id: &str, backend: &Backend) {
    let value = serde_json::json!({
        "name": service, "id": id, "host": "127.0.0.1", "port": backend.addr.port(),
        "tags": ["game"], "metadata": {"zone": "a"}, "version": "1.0.0",
        "weight": 100, "status": "healthy",
    });
    etcd.client()
        .await
        .put(format!("{prefix}/{service}/{id}"), value.to_string(), None)
        .await
        .expect("put the instance");
}

/// An agent that proxies `service` from etcd, keeping its state in `state`.
fn proxying(etcd: &Etcd, prefix: &str, service: &str, state: &Path) -> AgentToml {
    AgentToml::etcd(etcd, prefix)
        .agent("state_dir", state.display().to_string())
        .upstream(Section::fast_upstream(service))
}

/// Waits until a connection through `agent` reaches the backend `name`.
async fn routes_to(agent: &TestAgent, name: &str, what: &str) {
    eventually(what, DEADLINE, || async {
        session(agent.listen(), b"ping")
            .await
            .is_ok_and(|(greeting, _, _)| greeting == name)
    })
    .await;
}

/// The first service of `/v1/services`.
async fn service(agent: &TestAgent) -> serde_json::Value {
    agent.json("/v1/services").await["services"][0].clone()
}

#[tokio::test]
async fn a_restart_during_an_outage_routes_to_the_last_known_instances() {
    let mut etcd = Etcd::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let first = Backend::start("first").await;
    put_instance(&etcd, "/lkg", "battle", "battle-1", &first).await;

    // A discovers the instance, then stops.
    let a = TestAgent::start(&proxying(&etcd, "/lkg", "battle", state.path())).await;
    eventually("A to see battle-1", DEADLINE, || async {
        a.routable().await == ["battle-1"]
    })
    .await;
    assert_eq!(service(&a).await["stale"], false);
    eventually("A to save the listing", DEADLINE, || async {
        a.metric("squire_discovery_snapshot_writes_total{service=\"battle\"}")
            .await
            == Some(1.0)
    })
    .await;
    a.stop().await;

    // etcd dies; B starts on the same state directory and routes at once.
    etcd.kill();
    let started = Instant::now();
    let b = TestAgent::start(&proxying(&etcd, "/lkg", "battle", state.path())).await;
    routes_to(&b, "first", "B to route while etcd is down").await;
    let routed_after = started.elapsed();
    eprintln!("restarted during the outage: routed after {routed_after:?}");
    let battle = service(&b).await;
    assert_eq!(battle["stale"], true, "{battle}");
    assert_eq!(battle["watch_up"], false, "{battle}");
    assert!(battle["stale_since"].is_string(), "{battle}");
    let listed_at = battle["listed_at"].as_str().expect("listed_at");
    assert!(humantime::parse_rfc3339(listed_at).is_ok(), "{listed_at}");
    assert_eq!(battle["instances"][0]["id"], "battle-1");
    assert_eq!(
        b.metric("squire_discovery_stale{service=\"battle\"}").await,
        Some(1.0)
    );

    // etcd comes back with another instance set: the listing replaces the
    // snapshot and the flag clears.
    etcd.restart().await;
    let recovered = Instant::now();
    let second = Backend::start("second").await;
    let mut client = etcd.client().await;
    client
        .delete("/lkg/battle/battle-1", None)
        .await
        .expect("delete battle-1");
    put_instance(&etcd, "/lkg", "battle", "battle-2", &second).await;
    eventually("B to take the real listing", DEADLINE, || async {
        b.routable().await == ["battle-2"] && service(&b).await["stale"] == false
    })
    .await;
    eprintln!("etcd back: listing taken after {:?}", recovered.elapsed());
    let battle = service(&b).await;
    assert!(battle["stale_since"].is_null(), "{battle}");
    assert_eq!(battle["watch_up"], true);
    assert_eq!(
        b.metric("squire_discovery_stale{service=\"battle\"}").await,
        Some(0.0)
    );
    let (greeting, _, _) = session(b.listen(), b"ping").await.expect("session");
    assert_eq!(greeting, "second");
    b.stop().await;

    // The snapshot on disk is now the new set: a third restart during an
    // outage routes to battle-2.
    etcd.kill();
    let c = TestAgent::start(&proxying(&etcd, "/lkg", "battle", state.path())).await;
    routes_to(&c, "second", "C to route to battle-2 from disk").await;
    c.stop().await;
}

#[tokio::test]
async fn a_garbage_state_file_is_ignored_and_others_are_left_alone() {
    let mut etcd = Etcd::start().await;
    etcd.kill();
    let state = tempfile::tempdir().expect("state dir");
    let garbage = state.path().join("bazaar.json");
    std::fs::write(&garbage, "{\"version\":1,\"instances\":[{\"na").expect("write garbage");
    let other = state.path().join("elsewhere.json");
    std::fs::write(&other, "not ours").expect("write another service's file");

    let agent = TestAgent::start(&proxying(&etcd, "/junk", "bazaar", state.path())).await;
    let prefix = "squire_discovery_snapshot_failures_total{service=\"bazaar\",op=\"load\"}";
    eventually(
        "the garbage file to be read and refused",
        DEADLINE,
        || async { agent.metric(prefix).await == Some(1.0) },
    )
    .await;
    let bazaar = service(&agent).await;
    assert_eq!(bazaar["stale"], false, "{bazaar}");
    assert_eq!(bazaar["instances"], serde_json::json!([]), "{bazaar}");
    assert_eq!(agent.routable().await, Vec::<String>::new());
    let greeting = support::greeting(agent.listen()).await.expect("connect");
    assert_eq!(greeting, "", "nothing to route to");
    assert_eq!(
        std::fs::read_to_string(&other).expect("the other file"),
        "not ours",
        "a file for a service not configured is left alone"
    );
    // The re-lists after the failed listing do not read the file again.
    let restarts = "squire_watch_restarts_total{service=\"bazaar\"}";
    eventually("two re-lists", DEADLINE, || async {
        agent.metric(restarts).await.is_some_and(|n| n >= 2.0)
    })
    .await;
    assert_eq!(agent.metric(prefix).await, Some(1.0), "refused once");
    agent.stop().await;
}
