//! Several registries at once: a real etcd ("primary") and the fake Consul
//! ("backup", `tests/support/consul.rs`) in the same agents. Registration
//! goes into both and survives either one dying; discovery fails over from
//! etcd to Consul and back, or merges the two.

mod support;

use std::net::SocketAddr;
use std::time::SystemTime;

use tokio::time::Instant;

use etcd_client::GetOptions;
use support::config::{AgentToml, Section};
use support::consul::FakeConsul;
use support::{eventually, session, Backend, Etcd, TestAgent, DEADLINE};

/// An agent on both registries: etcd first ("primary"), then Consul
/// ("backup").
fn both(etcd: &Etcd, fake: &FakeConsul, prefix: &str) -> AgentToml {
    AgentToml::new(Section::etcd(etcd, prefix).set("name", "primary"))
        .registry(Section::consul(fake).set("name", "backup"))
}

/// `[service]` announcing `name` as `id` at `addr`.
fn service(name: &str, id: &str, addr: SocketAddr) -> Section {
    Section::service(name, addr).set("id", id)
}

async fn etcd_has(etcd: &Etcd, key: &str) -> bool {
    let mut client = etcd.client().await;
    client
        .get(key, None)
        .await
        .is_ok_and(|r| !r.kvs().is_empty())
}

async fn etcd_keys(etcd: &Etcd, prefix: &str) -> Vec<String> {
    let mut client = etcd.client().await;
    match client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
    {
        Ok(r) => r
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn consul_passing(fake: &FakeConsul, id: &str) -> bool {
    fake.service(id).is_some()
        && fake
            .check(&format!("service:{id}"))
            .is_some_and(|c| c.status == "passing")
}

fn heartbeats(fake: &FakeConsul, id: &str) -> usize {
    let path = format!("/v1/agent/check/pass/service:{id}");
    fake.requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path == path)
        .count()
}

/// `served_from` of the first discovered service.
async fn served_from(agent: &TestAgent) -> Vec<String> {
    let services = agent.json("/v1/services").await;
    services["services"][0]["served_from"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The greetings of `n` sessions through `agent`'s first listener.
async fn greetings(agent: &TestAgent, n: usize) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let (greeting, _, _) = session(agent.listen(), b"x").await.expect("session");
        seen.insert(greeting);
    }
    seen
}

#[tokio::test]
async fn both_hold_the_registration_and_discovery_fails_over_to_consul_and_back() {
    let mut etcd = Etcd::start().await;
    let fake = FakeConsul::start().await;
    let first = Backend::start("A").await;
    let second = Backend::start("C").await;
    let a =
        TestAgent::start(&both(&etcd, &fake, "/fo").service(service("room", "room-1", first.addr)))
            .await;
    let peer = TestAgent::start(
        &both(&etcd, &fake, "/fo")
            .discovery("mode", "failover")
            .discovery("failback", "500ms")
            .upstream(Section::fast_upstream("room")),
    )
    .await;

    // Both registries hold A.
    eventually("A in etcd and in Consul", DEADLINE, || async {
        etcd_has(&etcd, "/fo/room/room-1").await && consul_passing(&fake, "room-1")
    })
    .await;
    eventually("A registered in both", DEADLINE, || async {
        let this = a.json("/v1/self").await;
        let registrations = this["registrations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        registrations.len() == 2
            && registrations.iter().all(|r| r["registered"] == true)
            && this["ready"] == true
    })
    .await;
    let this = a.json("/v1/self").await;
    let registrations = &this["registrations"];
    assert_eq!(
        (
            &registrations[0]["name"],
            &registrations[0]["registry"],
            &registrations[1]["name"],
            &registrations[1]["registry"]
        ),
        (
            &"primary".into(),
            &"etcd".into(),
            &"backup".into(),
            &"consul".into()
        )
    );
    assert_eq!(registrations[0]["target"], etcd.endpoint());
    assert_eq!(registrations[1]["target"], fake.address());
    assert_eq!(registrations[1]["lease"], "service:room-1");

    // The peer reads etcd, the first registry.
    eventually("the peer to route to A from etcd", DEADLINE, || async {
        peer.routable().await == ["room-1"] && served_from(&peer).await == ["primary"]
    })
    .await;
    assert_eq!(
        greetings(&peer, 1).await.into_iter().collect::<Vec<_>>(),
        ["A"]
    );

    // etcd dies.
    etcd.kill();
    let killed = Instant::now();
    let beats = heartbeats(&fake, "room-1");
    eventually("A's etcd registration to notice", DEADLINE, || async {
        !a.json("/v1/self").await["registrations"][0]["last_error"].is_null()
    })
    .await;
    eventually("the peer to fail over to Consul", DEADLINE, || async {
        served_from(&peer).await == ["backup"]
    })
    .await;
    eprintln!(
        "measured: the peer on Consul {:?} after etcd died",
        killed.elapsed()
    );
    assert_eq!(
        peer.metric("squire_discovery_source{service=\"room\",registry=\"backup\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        peer.metric("squire_discovery_source{service=\"room\",registry=\"primary\"}")
            .await,
        Some(0.0)
    );
    let services = peer.json("/v1/services").await;
    let registries = &services["services"][0]["registries"];
    assert_eq!(registries[0]["watch_up"], false);
    assert!(registries[0]["last_error"].is_string(), "{registries}");
    assert_eq!(registries[1]["watch_up"], true);
    assert_eq!(peer.routable().await, ["room-1"]);
    assert_eq!(
        greetings(&peer, 2).await.into_iter().collect::<Vec<_>>(),
        ["A"]
    );

    // Consul's registration is untouched by etcd's death: the heartbeats go
    // on and the check keeps passing; A stays ready.
    eventually("more heartbeats to Consul", DEADLINE, || async {
        heartbeats(&fake, "room-1") >= beats + 3
    })
    .await;
    assert!(consul_passing(&fake, "room-1"));
    assert_eq!(
        a.json("/v1/self").await["registrations"][1]["registered"],
        true
    );
    assert_eq!(a.get("/ready").await.0, 200);

    // An instance that starts while etcd is down registers into Consul only,
    // is ready, and the peer routes to it through Consul.
    let c = TestAgent::start(&both(&etcd, &fake, "/fo").service(service(
        "room",
        "room-2",
        second.addr,
    )))
    .await;
    eventually("C in Consul, and ready", DEADLINE, || async {
        consul_passing(&fake, "room-2") && c.get("/ready").await.0 == 200
    })
    .await;
    let this = c.json("/v1/self").await;
    assert_eq!(this["registrations"][0]["registered"], false);
    assert!(this["registrations"][0]["last_error"].is_string());
    assert_eq!(this["registrations"][1]["registered"], true);
    eventually("the peer to route to A and C", DEADLINE, || async {
        peer.routable().await == ["room-1", "room-2"]
    })
    .await;
    assert_eq!(
        greetings(&peer, 4).await.into_iter().collect::<Vec<_>>(),
        ["A", "C"]
    );

    // etcd returns: both registrations go back into it, and the peer
    // returns to etcd.
    let restarted = SystemTime::now();
    etcd.restart().await;
    let serving = Instant::now();
    eventually("A and C back in etcd", DEADLINE, || async {
        etcd_keys(&etcd, "/fo/room/").await == ["/fo/room/room-1", "/fo/room/room-2"]
    })
    .await;
    eventually("A's etcd registration refreshed", DEADLINE, || async {
        let this = a.json("/v1/self").await;
        let primary = &this["registrations"][0];
        primary["registered"] == true
            && primary["last_keep_alive"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .is_some_and(|t| t > restarted)
    })
    .await;
    eventually("the peer back on etcd", DEADLINE, || async {
        served_from(&peer).await == ["primary"] && peer.routable().await == ["room-1", "room-2"]
    })
    .await;
    eprintln!(
        "measured: the peer back on etcd {:?} after it served again (failback 500ms)",
        serving.elapsed()
    );
    assert!(
        peer.metric("squire_discovery_switches_total{service=\"room\",registry=\"primary\"}")
            .await
            .is_some_and(|n| n >= 2.0),
        "the first read and the return both count"
    );
    assert_eq!(
        greetings(&peer, 4).await.into_iter().collect::<Vec<_>>(),
        ["A", "C"]
    );

    // Stopping deregisters from both at once.
    a.stop().await;
    c.stop().await;
    assert!(etcd_keys(&etcd, "/fo/room/").await.is_empty());
    assert!(fake.service("room-1").is_none() && fake.service("room-2").is_none());
    eventually("the peer to drop both", DEADLINE, || async {
        peer.routable().await.is_empty()
    })
    .await;
    peer.stop().await;
}

#[tokio::test]
async fn merge_routes_to_instances_that_are_in_only_one_registry() {
    let etcd = Etcd::start().await;
    let fake = FakeConsul::start().await;
    let only_etcd = Backend::start("E").await;
    let only_consul = Backend::start("K").await;
    // Each announcer is on one registry only.
    let in_etcd = TestAgent::start(&AgentToml::etcd(&etcd, "/merge").service(service(
        "lobby",
        "lobby-e",
        only_etcd.addr,
    )))
    .await;
    let in_consul = TestAgent::start(&AgentToml::consul(&fake).service(service(
        "lobby",
        "lobby-k",
        only_consul.addr,
    )))
    .await;
    let merging = TestAgent::start(
        &both(&etcd, &fake, "/merge")
            .discovery("mode", "merge")
            .upstream(Section::fast_upstream("lobby")),
    )
    .await;
    let failing_over =
        TestAgent::start(&both(&etcd, &fake, "/merge").upstream(Section::fast_upstream("lobby")))
            .await;

    eventually("the merging peer to route to both", DEADLINE, || async {
        merging.routable().await == ["lobby-e", "lobby-k"]
    })
    .await;
    assert_eq!(
        greetings(&merging, 4).await.into_iter().collect::<Vec<_>>(),
        ["E", "K"]
    );
    let services = merging.json("/v1/services").await;
    assert_eq!(services["services"][0]["discovery"], "merge");
    assert_eq!(
        services["services"][0]["served_from"],
        serde_json::json!(["primary", "backup"])
    );
    // In failover mode only the first registry is read.
    eventually(
        "the failover peer to route to etcd's only",
        DEADLINE,
        || async { failing_over.routable().await == ["lobby-e"] },
    )
    .await;

    // One registry leaving takes only its own instances with it.
    in_consul.stop().await;
    eventually("the merging peer to drop Consul's", DEADLINE, || async {
        merging.routable().await == ["lobby-e"]
    })
    .await;
    in_etcd.stop().await;
    merging.stop().await;
    failing_over.stop().await;
}

#[tokio::test]
async fn each_registry_reports_the_status_it_was_last_told() {
    let mut etcd = Etcd::start().await;
    let fake = FakeConsul::start().await;
    let backend = Backend::start("G").await;
    // Registry names of this test only: the metrics recorder is shared by
    // every agent in this binary.
    let config = AgentToml::new(
        Section::etcd(&etcd, "/gauge")
            .set("name", "gauge-etcd")
            .set("timeout", "1s"),
    )
    .registry(
        Section::consul(&fake)
            .set("name", "gauge-consul")
            .set("timeout", "1s"),
    )
    .service(service("gauge", "gauge-1", backend.addr));
    let agent = TestAgent::start(&config).await;
    eventually("registered in both", DEADLINE, || async {
        let this = agent.json("/v1/self").await;
        this["registrations"]
            .as_array()
            .is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["registered"] == true))
    })
    .await;
    let healthy = (Some(1.0), Some(0.0));
    assert_eq!(announced(&agent, "gauge-etcd", "etcd").await, healthy);
    assert_eq!(announced(&agent, "gauge-consul", "consul").await, healthy);

    // With etcd gone, draining reaches Consul only: each series keeps what
    // its own registry holds.
    etcd.kill();
    squire::admin::set_maintenance(agent.admin, Ok(&agent.token), true, None)
        .await
        .expect("maintenance on");
    eventually("Consul told draining", DEADLINE, || async {
        announced(&agent, "gauge-consul", "consul").await == (Some(0.0), Some(1.0))
    })
    .await;
    assert_eq!(announced(&agent, "gauge-etcd", "etcd").await, healthy);
    agent.stop().await;
}

/// One registry's `squire_announced_status`: its healthy and draining series.
async fn announced(agent: &TestAgent, registry: &str, kind: &str) -> (Option<f64>, Option<f64>) {
    let series = |status: &str| {
        format!("squire_announced_status{{registry=\"{registry}\",kind=\"{kind}\",status=\"{status}\"}} ")
    };
    (
        agent.metric(&series("healthy")).await,
        agent.metric(&series("draining")).await,
    )
}
