//! End to end against a real ZooKeeper (Debian's 3.8): the ephemeral node
//! and its data, a deleted node and an expired session answered at once,
//! discovery and proxying between two agents, a server killed and
//! restarted, garbage data, digest auth with its ACL, and a reported load
//! carried to a peer that picks by it (`support::load`).

mod support;

use std::time::Duration;

use tokio::time::Instant;

use support::config::{AgentToml, Section};
use support::zookeeper::ZooKeeper;
use support::{eventually, session, Backend, TestAgent, DEADLINE};
use zookeeper_client::{Acls, Client, CreateMode};

/// The data and ephemeral owner of the node at `path`, if it exists.
async fn node(client: &Client, path: &str) -> Option<(String, i64)> {
    let (data, stat) = client.get_data(path).await.ok()?;
    Some((
        String::from_utf8_lossy(&data).into_owned(),
        stat.ephemeral_owner,
    ))
}

/// Creates a persistent node at `path` with `data`, its parents first.
async fn put(client: &Client, path: &str, data: &str) {
    let options = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let parent = &path[..path.rfind('/').expect("absolute path")];
    client.mkdir(parent, &options).await.expect("mkdir");
    client
        .create(path, data.as_bytes(), &options)
        .await
        .expect("create");
}

#[tokio::test]
async fn registration_is_an_ephemeral_node_with_the_exact_json_and_leaves_at_once() {
    let zk = ZooKeeper::start().await;
    let client = zk.client().await;
    let addr = "127.0.0.1:7000".parse().expect("addr");
    let agent = TestAgent::start(
        &AgentToml::zookeeper(&zk, "/reg").service(Section::game_service("battle", addr)),
    )
    .await;

    let path = "/reg/battle/battle-1";
    eventually("the node in ZooKeeper", DEADLINE, || async {
        node(&client, path).await.is_some()
    })
    .await;
    let (json, owner) = node(&client, path).await.expect("node present");
    assert_eq!(
        json,
        r#"{"name":"battle","id":"battle-1","host":"127.0.0.1","port":7000,"tags":["game"],"metadata":{"zone":"a"},"version":"1.0.0","weight":100,"status":"healthy"}"#
    );
    assert_ne!(owner, 0, "the node is ephemeral");
    let (_, parent) = client.get_data("/reg/battle").await.expect("parent");
    assert_eq!(parent.ephemeral_owner, 0, "parents are persistent");
    eventually("/ready", DEADLINE, || async {
        agent.get("/ready").await.0 == 200
    })
    .await;
    let this = agent.json("/v1/self").await;
    let registration = &this["registrations"][0];
    assert_eq!(registration["name"], "zookeeper", "named after its kind");
    assert_eq!(registration["registry"], "zookeeper");
    assert_eq!(registration["target"], zk.server());
    assert_eq!(
        registration["lease"],
        format!("{owner:x}"),
        "the session is the lease"
    );

    agent.stop().await;
    assert!(
        node(&client, path).await.is_none(),
        "the node is deleted on shutdown"
    );
    let children = client.list_children("/reg/battle").await.expect("list");
    assert!(children.is_empty(), "{children:?}");
}

#[tokio::test]
async fn a_node_deleted_under_a_live_session_is_created_again_at_once() {
    let zk = ZooKeeper::start().await;
    let client = zk.client().await;
    let addr = "127.0.0.1:7002".parse().expect("addr");
    // ttl 30s: the next keep-alive is 10 s away, so only the watch of our
    // node can bring it back within the bound below.
    // Named: the metrics of every agent in this process are one registry's.
    let registry = Section::zookeeper(&zk, "/deleted")
        .set("ttl", "30s")
        .set("name", "deleted");
    let agent =
        TestAgent::start(&AgentToml::new(registry).service(Section::game_service("logic", addr)))
            .await;
    let path = "/deleted/logic/logic-1";
    eventually("the node in ZooKeeper", DEADLINE, || async {
        node(&client, path).await.is_some()
    })
    .await;
    let (_, old_owner) = node(&client, path).await.expect("node present");

    client
        .delete(path, None)
        .await
        .expect("delete behind the agent's back");
    let at = Instant::now();
    eventually("the node to come back", DEADLINE, || async {
        node(&client, path).await.is_some()
    })
    .await;
    let took = at.elapsed();
    println!("measured: node back {took:?} after it was deleted");
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    let (_, owner) = node(&client, path).await.expect("node present");
    assert_ne!(owner, old_owner, "created again in a new session");
    let (_, metrics) = agent.get("/metrics").await;
    assert!(
        metrics.contains(
            r#"squire_registration_deleted_total{registry="deleted",kind="zookeeper"} 1"#
        ),
        "{metrics}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn an_expired_session_is_replaced_and_the_node_is_back_within_a_second() {
    let zk = ZooKeeper::start().await;
    let client = zk.client().await;
    let addr = "127.0.0.1:7003".parse().expect("addr");
    // Named: the metrics of every agent in this process are one registry's.
    let registry = Section::zookeeper(&zk, "/expiry").set("name", "expiry");
    let agent =
        TestAgent::start(&AgentToml::new(registry).service(Section::game_service("logic", addr)))
            .await;
    let path = "/expiry/logic/logic-1";
    eventually("the node in ZooKeeper", DEADLINE, || async {
        node(&client, path).await.is_some()
    })
    .await;
    let (_, old_owner) = node(&client, path).await.expect("node present");

    // Frozen past the 3 s session timeout: the client gives the session up
    // (7/5 of its timeout without an answer), and the server, once it
    // wakes, expires it and so deletes its node.
    zk.freeze();
    let gave_up = r#"squire_registration_deleted_total{registry="expiry",kind="zookeeper"}"#;
    eventually("the session given up", DEADLINE, || async {
        agent.metric(gave_up).await == Some(1.0)
    })
    .await;
    let this = agent.json("/v1/self").await;
    assert_eq!(this["registrations"][0]["registered"], false, "{this}");
    zk.thaw();
    let thawed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = node(&client, path).await;
        if now.as_ref().is_some_and(|(_, owner)| *owner != old_owner) {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "old {old_owner:x} now {now:?} self {}",
                agent.json("/v1/self").await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = thawed.elapsed();
    println!("measured: node back {took:?} after the server woke");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    eventually("registered again", DEADLINE, || async {
        agent.json("/v1/self").await["registrations"][0]["registered"] == true
    })
    .await;
    let regrants = agent
        .metric(r#"squire_lease_regrants_total{registry="expiry",kind="zookeeper"}"#)
        .await;
    assert_eq!(regrants, Some(1.0), "{}", agent.get("/metrics").await.1);
    let this = agent.json("/v1/self").await;
    assert_eq!(this["registrations"][0]["registrations"], 2);
    agent.stop().await;
    assert!(node(&client, path).await.is_none());
}

#[tokio::test]
async fn a_peer_proxies_through_zookeeper_discovery_and_follows_status_and_leaving() {
    let zk = ZooKeeper::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::zookeeper(&zk, "/proxy").service(Section::game_service("echo", backend.addr)),
    )
    .await;
    let b = TestAgent::start(
        &AgentToml::zookeeper(&zk, "/proxy").upstream(Section::fast_upstream("echo")),
    )
    .await;

    eventually("B to see A", DEADLINE, || async {
        b.routable().await == ["echo-1"]
    })
    .await;
    let (greeting, echoed, farewell) = session(b.listen(), b"hello through squire")
        .await
        .expect("session");
    assert_eq!(greeting, "A");
    assert_eq!(echoed, b"hello through squire");
    assert_eq!(farewell, "bye 20\n");

    // Maintenance rewrites the node's data: B stops routing to a draining A.
    let (status, body) = support::http_with_token(
        a.admin,
        "PUT",
        "/v1/maintenance?enable=true&reason=drill",
        a.token.expose(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let client = zk.client().await;
    eventually("the node to say draining", DEADLINE, || async {
        node(&client, "/proxy/echo/echo-1")
            .await
            .and_then(|(json, _)| squire::registry::Instance::from_json(json.as_bytes()).ok())
            .is_some_and(|instance| instance.status == squire::registry::Status::Draining)
    })
    .await;
    eventually("B to stop routing to A", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    let (status, body) = support::http_with_token(
        a.admin,
        "PUT",
        "/v1/maintenance?enable=false",
        a.token.expose(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eventually("B to route to A again", DEADLINE, || async {
        b.routable().await == ["echo-1"]
    })
    .await;

    a.stop().await;
    eventually("B to drop A", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    let greeting = support::greeting(b.listen()).await.expect("connect to B");
    assert_eq!(greeting, "", "B closes the client: nothing to route to");
    b.stop().await;
}

#[tokio::test]
async fn a_server_outage_keeps_routes_and_both_sides_recover_after_the_restart() {
    let mut zk = ZooKeeper::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::zookeeper(&zk, "/outage").service(Section::game_service("room", backend.addr)),
    )
    .await;
    let b = TestAgent::start(
        &AgentToml::zookeeper(&zk, "/outage").upstream(Section::fast_upstream("room")),
    )
    .await;
    eventually("B to see A", DEADLINE, || async {
        b.routable().await == ["room-1"]
    })
    .await;

    zk.kill();
    eventually("B's watch to notice", DEADLINE, || async {
        b.json("/v1/services").await["services"][0]["watch_up"] == false
    })
    .await;
    eventually("A's keep-alive to fail", DEADLINE, || async {
        !a.json("/v1/self").await["registrations"][0]["last_error"].is_null()
    })
    .await;
    for _ in 0..5 {
        let (greeting, _, farewell) = session(b.listen(), b"still here")
            .await
            .expect("session while ZooKeeper is down");
        assert_eq!(greeting, "A", "B serves from its last snapshot");
        assert_eq!(farewell, "bye 10\n");
    }
    eventually("an outage longer than the 3s ttl", DEADLINE, || async {
        a.json("/v1/self").await["registrations"][0]["registered"] == false
    })
    .await;

    zk.restart().await;
    let restarted = Instant::now();
    let client = zk.client().await;
    eventually("A's node back", DEADLINE, || async {
        node(&client, "/outage/room/room-1").await.is_some()
            && a.json("/v1/self").await["registrations"][0]["registered"] == true
    })
    .await;
    println!(
        "measured: A registered again {:?} after the restart",
        restarted.elapsed()
    );
    // An instance that appears after the restart proves B listed again.
    let other = Backend::start("C").await;
    let c = format!(
        r#"{{"name":"room","id":"room-2","host":"127.0.0.1","port":{}}}"#,
        other.addr.port()
    );
    put(&client, "/outage/room/room-2", &c).await;
    eventually("B's watch back with both", DEADLINE, || async {
        let mut ids = b.routable().await;
        ids.sort();
        ids == ["room-1", "room-2"]
    })
    .await;
    println!(
        "measured: B routes both {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(
        b.json("/v1/services").await["services"][0]["watch_up"],
        true
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn garbage_data_is_skipped_and_counted() {
    let zk = ZooKeeper::start().await;
    let backend = Backend::start("good").await;
    let client = zk.client().await;
    put(&client, "/garbage/shop/bad-1", "not json at all").await;
    put(&client, "/garbage/shop/bad-2", r#"{"name":"shop"}"#).await;
    let good = format!(
        r#"{{"name":"shop","id":"shop-1","host":"127.0.0.1","port":{},"status":"healthy"}}"#,
        backend.addr.port()
    );
    put(&client, "/garbage/shop/shop-1", &good).await;

    let b = TestAgent::start(
        &AgentToml::zookeeper(&zk, "/garbage").upstream(Section::fast_upstream("shop")),
    )
    .await;
    eventually("the good instance", DEADLINE, || async {
        b.routable().await == ["shop-1"]
    })
    .await;
    let skipped = "squire_registry_entries_skipped_total{service=\"shop\"}";
    assert_eq!(b.metric(skipped).await, Some(2.0));

    put(&client, "/garbage/shop/bad-3", "[1,2").await;
    eventually("the third to be counted", DEADLINE, || async {
        b.metric(skipped).await == Some(3.0)
    })
    .await;
    // A good node turned bad is dropped and counted too.
    client
        .set_data("/garbage/shop/shop-1", b"{", None)
        .await
        .expect("set");
    eventually("the spoiled one dropped and counted", DEADLINE, || async {
        b.routable().await.is_empty() && b.metric(skipped).await == Some(4.0)
    })
    .await;
    client
        .set_data("/garbage/shop/shop-1", good.as_bytes(), None)
        .await
        .expect("set");
    eventually("the good one back", DEADLINE, || async {
        b.routable().await == ["shop-1"]
    })
    .await;
    let (greeting, _, _) = session(b.listen(), b"x").await.expect("still routing");
    assert_eq!(greeting, "good");
    let children = client.list_children("/garbage/shop").await.expect("list");
    assert_eq!(children.len(), 4, "squire never touches other nodes");
    b.stop().await;
}

#[tokio::test]
async fn digest_credentials_put_an_acl_on_our_nodes() {
    let zk = ZooKeeper::start().await;
    let addr = "127.0.0.1:7004".parse().expect("addr");
    let registry = Section::zookeeper(&zk, "/secure")
        .set("username", "squire")
        .set("password", "s3cret-pw");
    let agent =
        TestAgent::start(&AgentToml::new(registry).service(Section::game_service("logic", addr)))
            .await;
    let anonymous = zk.client().await;
    let path = "/secure/logic/logic-1";
    eventually("the node in ZooKeeper", DEADLINE, || async {
        node(&anonymous, path).await.is_some()
    })
    .await;
    let (acl, _) = anonymous.get_acl(path).await.expect("acl");
    let shown: Vec<String> = acl
        .iter()
        .map(|a| format!("{}:{}:{}", a.scheme(), a.id(), a.permission()))
        .collect();
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert!(
        shown[0].starts_with("digest:squire:") && shown[0].ends_with(":ALL"),
        "{shown:?}"
    );
    assert_eq!(shown[1], "world:anyone:READ", "{shown:?}");
    let (parent_acl, _) = anonymous.get_acl("/secure/logic").await.expect("acl");
    assert_eq!(parent_acl, acl, "the parents we made get the same ACL");

    // Anyone reads (and so discovers); only the same identity may change it.
    assert_eq!(
        anonymous.delete(path, None).await,
        Err(zookeeper_client::Error::NoAuth)
    );
    assert_eq!(
        anonymous.set_data(path, b"x", None).await.map(|_| ()),
        Err(zookeeper_client::Error::NoAuth)
    );
    let options = CreateMode::Persistent.with_acls(Acls::anyone_all());
    assert_eq!(
        anonymous
            .create("/secure/logic/intruder", b"x", &options)
            .await
            .map(|_| ()),
        Err(zookeeper_client::Error::NoAuth)
    );
    let same = zk.client_as("squire", "s3cret-pw").await;
    same.set_data(path, b"{}", None)
        .await
        .expect("the same identity writes");

    // Another squire with a wrong password is another identity: refused
    // under the parents we made, reported, never fatal, never shown.
    let wrong = Section::zookeeper(&zk, "/secure")
        .set("username", "squire")
        .set("password", "not-the-pw");
    let other_addr = "127.0.0.1:7005".parse().expect("addr");
    let other = TestAgent::start(
        &AgentToml::new(wrong)
            .service(Section::game_service("logic", other_addr).set("id", "logic-2")),
    )
    .await;
    eventually("the refusal reported", DEADLINE, || async {
        other.json("/v1/self").await["registrations"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused") && e.contains("not authorized"))
    })
    .await;
    let (_, body) = other.get("/v1/self").await;
    assert!(!body.contains("not-the-pw"), "{body}");
    assert!(node(&anonymous, "/secure/logic/logic-2").await.is_none());
    other.stop().await;

    let (_, body) = agent.get("/v1/self").await;
    assert!(!body.contains("s3cret-pw"), "{body}");
    agent.stop().await;
    assert!(
        node(&anonymous, path).await.is_none(),
        "deleted with our identity"
    );
}

#[tokio::test]
async fn zookeeper_in_a_registry_list_registers_and_fails_over() {
    let mut zk = ZooKeeper::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("A").await;
    let registries = |toml: AgentToml| {
        toml.registry(Section::local(dir.path()).set("name", "lan"))
            .discovery("failback", "200ms")
    };
    let zk_section = Section::zookeeper(&zk, "/multi").set("name", "zk");
    let a = TestAgent::start(
        &registries(AgentToml::new(zk_section.clone()))
            .service(Section::game_service("room", backend.addr)),
    )
    .await;
    let b = TestAgent::start(
        &registries(AgentToml::new(zk_section)).upstream(Section::fast_upstream("room")),
    )
    .await;
    let client = zk.client().await;
    eventually("A in both registries", DEADLINE, || async {
        let this = a.json("/v1/self").await;
        node(&client, "/multi/room/room-1").await.is_some()
            && this["registrations"][0]["registered"] == true
            && this["registrations"][1]["registered"] == true
    })
    .await;
    let served_from = |services: serde_json::Value| services["services"][0]["served_from"].clone();
    eventually("B routing from ZooKeeper", DEADLINE, || async {
        b.routable().await == ["room-1"]
            && served_from(b.json("/v1/services").await) == serde_json::json!(["zk"])
    })
    .await;

    zk.kill();
    eventually("B on the local registry", DEADLINE, || async {
        served_from(b.json("/v1/services").await) == serde_json::json!(["lan"])
    })
    .await;
    let (greeting, _, _) = session(b.listen(), b"x").await.expect("session");
    assert_eq!(greeting, "A");

    zk.restart().await;
    eventually("B back on ZooKeeper", DEADLINE, || async {
        served_from(b.json("/v1/services").await) == serde_json::json!(["zk"])
            && b.routable().await == ["room-1"]
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// The backend alone, under the registration loop's calls: the session's
/// state is what `keep_alive` reports.
#[tokio::test]
async fn the_lease_is_unavailable_while_disconnected_and_lost_once_the_session_expired() {
    use squire::config::ZooKeeperConfig;
    use squire::registry::zookeeper::ZooKeeperRegistry;
    use squire::registry::{Instance, Registry, RegistryError, Status, WatchEvent};

    let mut zk = ZooKeeper::start().await;
    let config = ZooKeeperConfig {
        servers: vec![zk.server()],
        root: "/lease".into(),
        credentials: None,
    };
    let registry = ZooKeeperRegistry::new(config, Duration::from_secs(3), Duration::from_secs(1));
    let instance = Instance {
        name: "svc".into(),
        id: "svc-1".into(),
        host: "127.0.0.1".into(),
        port: 7006,
        tags: Vec::new(),
        metadata: Default::default(),
        version: String::new(),
        weight: 100,
        status: Status::Healthy,
        load: None,
    };
    let mut lease = registry.register(&instance).await.expect("register");
    lease.keep_alive().await.expect("a fresh session is alive");
    let mut watch = registry.watch("svc").await.expect("watch");
    let Ok(WatchEvent::Reset(entries)) = watch.next().await else {
        panic!("a watch starts with the full set");
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].key, "/lease/svc/svc-1");
    assert_eq!(entries[0].value, Ok(instance.clone()));

    // Killed and back within the session timeout: the same session goes on
    // (the server restores it), disconnected meanwhile.
    zk.kill();
    let deadline = Instant::now() + DEADLINE;
    while !matches!(lease.keep_alive().await, Err(RegistryError::Unavailable(_))) {
        assert!(Instant::now() < deadline, "keep_alive never unavailable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        watch.next().await.is_err(),
        "the watch ends on a disconnect"
    );
    zk.restart().await;
    let deadline = Instant::now() + DEADLINE;
    while let Err(e) = lease.keep_alive().await {
        assert!(
            Instant::now() < deadline,
            "the session never came back: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Frozen until the client gives the session up: lost, and `gone` says so.
    zk.freeze();
    let deadline = Instant::now() + DEADLINE;
    while !matches!(lease.keep_alive().await, Err(RegistryError::LeaseLost(_))) {
        assert!(Instant::now() < deadline, "keep_alive never lost");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::timeout(Duration::from_secs(1), lease.gone())
        .await
        .expect("gone resolves once the session expired");
    zk.thaw();
    let lease = registry.register(&instance).await.expect("register again");
    lease.revoke().await.expect("revoke");
    let client = zk.client().await;
    assert!(node(&client, "/lease/svc/svc-1").await.is_none());
}

/// Discovery races `next` against timers and probes: cancelled anywhere,
/// the watch still ends up with what ZooKeeper holds.
#[tokio::test]
async fn a_watch_cancelled_at_every_turn_still_sees_every_change() {
    use std::collections::BTreeMap;

    use squire::config::ZooKeeperConfig;
    use squire::registry::zookeeper::ZooKeeperRegistry;
    use squire::registry::{Change, Registry, WatchEvent};

    let zk = ZooKeeper::start().await;
    let client = zk.client().await;
    let config = ZooKeeperConfig {
        servers: vec![zk.server()],
        root: "/cancel".into(),
        credentials: None,
    };
    let registry = ZooKeeperRegistry::new(config, Duration::from_secs(3), Duration::from_secs(2));
    let mut watch = registry.watch("svc").await.expect("watch");
    let mut view: BTreeMap<String, bool> = BTreeMap::new();
    let apply = |view: &mut BTreeMap<String, bool>, event: WatchEvent| match event {
        WatchEvent::Reset(entries) => {
            *view = entries
                .into_iter()
                .map(|e| (e.key, e.value.is_ok()))
                .collect();
        }
        WatchEvent::Changes(changes) => {
            for change in changes {
                match change {
                    Change::Put(e) => {
                        view.insert(e.key, e.value.is_ok());
                    }
                    Change::Delete { key } => {
                        view.remove(&key);
                    }
                }
            }
        }
    };
    let event = watch.next().await.expect("reset");
    apply(&mut view, event);
    assert!(view.is_empty(), "no service node yet: {view:?}");

    let instance = |i: u16| {
        format!(
            r#"{{"name":"svc","id":"svc-{i}","host":"127.0.0.1","port":{}}}"#,
            7100 + i
        )
    };
    let (mut cancelled, mut completed) = (0, 0);
    for i in 0..20u16 {
        put(&client, &format!("/cancel/svc/svc-{i}"), &instance(i)).await;
        if i % 3 == 0 {
            client
                .set_data(&format!("/cancel/svc/svc-{i}"), b"garbage", None)
                .await
                .expect("set");
        }
        if i % 4 == 1 {
            client
                .delete(&format!("/cancel/svc/svc-{}", i - 1), None)
                .await
                .expect("delete");
        }
        // A few polls of next(), cut short at different points.
        for cut in [300, 2_000, 10_000] {
            match tokio::time::timeout(Duration::from_micros(cut), watch.next()).await {
                Ok(event) => {
                    completed += 1;
                    apply(&mut view, event.expect("no error"));
                }
                Err(_) => cancelled += 1,
            }
        }
    }
    let mut want = BTreeMap::new();
    for name in client.list_children("/cancel/svc").await.expect("list") {
        let path = format!("/cancel/svc/{name}");
        let (data, _) = client.get_data(&path).await.expect("data");
        want.insert(path, data != b"garbage");
    }
    let deadline = Instant::now() + DEADLINE;
    while view != want {
        assert!(Instant::now() < deadline, "view {view:?}\nwant {want:?}");
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
            apply(&mut view, event.expect("no error"));
        }
    }
    println!("measured: {cancelled} calls of next() cancelled, {completed} completed; the view equals ZooKeeper's");
    assert!(
        cancelled > 0,
        "nothing was cancelled: the test proves nothing"
    );
}

#[tokio::test]
async fn a_reported_load_round_trips_to_a_peer_and_steers_its_picks() {
    let zk = ZooKeeper::start().await;
    support::load::round_trip(|| Section::zookeeper(&zk, "/load")).await;
}
