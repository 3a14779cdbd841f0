//! The reported load's round trip through a registry, the one scenario
//! every registry's test file runs on its own server (or fake): two squires
//! announce `battle` and report their load (`PUT /v1/load`), a third
//! discovers both and must see each load as reported, updated and cleared,
//! and pick by it: its `packed` listener never sends a connection to the
//! full instance, and once that one has room again, fills it first.

use std::net::SocketAddr;

use super::config::{AgentToml, Section};
use super::{eventually, greeting, Backend, TestAgent, DEADLINE};

/// `PUT /v1/load` on `agent` (with its token), as `squire load` sends it;
/// `None` is `DELETE`.
pub async fn report(agent: &TestAgent, load: Option<(u32, u32)>) {
    squire::admin::set_load(agent.admin, Ok(&agent.token), load)
        .await
        .unwrap_or_else(|e| panic!("reporting {load:?}: {e}"));
}

/// The load `agent`'s first upstream sees for instance `id`: `(players,
/// capacity, full)` when fresh, `None` when it has none.
pub async fn seen(agent: &TestAgent, id: &str) -> Option<(u64, u64, bool)> {
    let services = agent.json("/v1/services").await;
    let endpoint = services["upstreams"][0]["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["id"] == id)?
        .clone();
    let load = &endpoint["load"];
    if load["fresh"] != true {
        return None;
    }
    Some((
        load["players"].as_u64()?,
        load["capacity"].as_u64()?,
        load["full"].as_bool()?,
    ))
}

/// The backends `n` connections through `listen` reached.
async fn reached(listen: SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        names.push(greeting(listen).await.expect("connect through the peer"));
    }
    names
}

/// The scenario on the registry `registry()` gives (a fresh section for
/// each agent: the same server, the same settings).
pub async fn round_trip(registry: impl Fn() -> Section) {
    let (full, room) = (Backend::start("full").await, Backend::start("room").await);
    let announce = |id: &str, addr: SocketAddr| {
        AgentToml::new(registry()).service(Section::game_service("battle", addr).set("id", id))
    };
    let a = TestAgent::start(&announce("battle-full", full.addr)).await;
    let b = TestAgent::start(&announce("battle-room", room.addr)).await;
    for agent in [&a, &b] {
        eventually("registered", DEADLINE, || async {
            agent.get("/ready").await.0 == 200
        })
        .await;
    }
    report(&a, Some((100, 100))).await;
    report(&b, Some((40, 100))).await;

    let peer = TestAgent::start(
        &AgentToml::new(registry())
            .upstream(Section::fast_upstream("battle").set("strategy", "packed")),
    )
    .await;
    eventually("the peer to see both loads", DEADLINE, || async {
        seen(&peer, "battle-full").await == Some((100, 100, true))
            && seen(&peer, "battle-room").await == Some((40, 100, false))
    })
    .await;
    // The catalog shows the load in the instance JSON, and only there: the
    // string-metadata backends' `squire_load_*` keys are not metadata.
    let catalog: serde_json::Value = peer.json("/v1/catalog/battle").await;
    let instances = catalog["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2, "{catalog}");
    for instance in instances {
        assert_eq!(
            instance["metadata"],
            serde_json::json!({"zone": "a"}),
            "{catalog}"
        );
        assert!(instance["load"]["at"].is_string(), "{catalog}");
    }
    assert_eq!(instances[0]["load"]["players"], 100, "{catalog}");
    assert_eq!(instances[1]["load"]["players"], 40, "{catalog}");
    // Unknown loads would tie and go to battle-full, the first id: every
    // connection reaching `room` shows the full one was seen as full.
    let names = reached(peer.listen(), 10).await;
    assert!(names.iter().all(|n| n == "room"), "{names:?}");

    // An update travels too: with room again, the fuller one fills first.
    report(&a, Some((90, 100))).await;
    eventually("the peer to see the update", DEADLINE, || async {
        seen(&peer, "battle-full").await == Some((90, 100, false))
    })
    .await;
    let names = reached(peer.listen(), 10).await;
    assert!(names.iter().all(|n| n == "full"), "{names:?}");

    // Cleared: the load leaves the registry, not just this squire.
    report(&a, None).await;
    eventually("the peer to see the load gone", DEADLINE, || async {
        let services = peer.json("/v1/services").await;
        services["upstreams"][0]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["id"] == "battle-full" && e["load"].is_null())
    })
    .await;
    assert_eq!(seen(&peer, "battle-room").await, Some((40, 100, false)));
    let catalog: serde_json::Value = peer.json("/v1/catalog/battle").await;
    assert!(catalog["instances"][0].get("load").is_none(), "{catalog}");
    assert_eq!(
        catalog["instances"][0]["metadata"],
        serde_json::json!({"zone": "a"}),
        "{catalog}"
    );

    peer.stop().await;
    b.stop().await;
    a.stop().await;
}
