//! End to end against a real etcd: registration, lease loss, discovery,
//! proxying, and what happens while etcd is down; and the harness reporting
//! an etcd that cannot start.

mod support;

use std::time::Duration;

use tokio::time::Instant;

use etcd_client::GetOptions;
use support::config::{AgentToml, Section};
use support::{eventually, session, Backend, Etcd, TestAgent, DEADLINE};

async fn value(etcd: &Etcd, key: &str) -> Option<(String, i64)> {
    let mut client = etcd.client().await;
    let response = client.get(key, None).await.ok()?;
    response
        .kvs()
        .first()
        .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
}

#[tokio::test]
async fn registration_is_the_exact_json_under_a_lease_and_leaves_at_once() {
    let etcd = Etcd::start().await;
    let addr = "127.0.0.1:7000".parse().expect("addr");
    let agent = TestAgent::start(
        &AgentToml::etcd(&etcd, "/reg").service(Section::game_service("battle", addr)),
    )
    .await;

    let key = "/reg/battle/battle-1";
    eventually("the key in etcd", DEADLINE, || async {
        value(&etcd, key).await.is_some()
    })
    .await;
    let (json, lease) = value(&etcd, key).await.expect("key present");
    assert_eq!(
        json,
        r#"{"name":"battle","id":"battle-1","host":"127.0.0.1","port":7000,"tags":["game"],"metadata":{"zone":"a"},"version":"1.0.0","weight":100,"status":"healthy"}"#
    );
    assert_ne!(lease, 0, "the key is attached to a lease");
    let ttl = etcd
        .client()
        .await
        .lease_time_to_live(lease, None)
        .await
        .expect("lease ttl")
        .granted_ttl();
    assert_eq!(ttl, 3);
    eventually("/ready", DEADLINE, || async {
        agent.get("/ready").await.0 == 200
    })
    .await;
    let this = agent.json("/v1/self").await;
    assert_eq!(
        this["registrations"][0]["name"], "etcd",
        "named after its kind"
    );
    assert_eq!(this["registrations"][0]["registry"], "etcd");
    assert_eq!(this["registrations"][0]["lease"], format!("{lease:x}"));

    agent.stop().await;
    assert!(
        value(&etcd, key).await.is_none(),
        "the lease is revoked on shutdown"
    );
}

#[tokio::test]
async fn a_revoked_lease_is_replaced_within_one_keep_alive() {
    let etcd = Etcd::start().await;
    let addr = "127.0.0.1:7001".parse().expect("addr");
    let agent = TestAgent::start(
        &AgentToml::etcd(&etcd, "/revoke").service(Section::game_service("logic", addr)),
    )
    .await;
    let key = "/revoke/logic/logic-1";
    eventually("the key in etcd", DEADLINE, || async {
        value(&etcd, key).await.is_some()
    })
    .await;
    let (_, old_lease) = value(&etcd, key).await.expect("key present");

    etcd.client()
        .await
        .lease_revoke(old_lease)
        .await
        .expect("revoke behind the agent's back");
    let revoked = Instant::now();
    // Revoking removed the key; the watch of our own key may already have
    // written it again, under a new lease.
    assert!(
        value(&etcd, key)
            .await
            .is_none_or(|(_, lease)| lease != old_lease),
        "revoking removed the key"
    );
    eventually("the key to come back", DEADLINE, || async {
        value(&etcd, key)
            .await
            .is_some_and(|(_, lease)| lease != old_lease)
    })
    .await;
    // ttl 3s: a keep-alive every second, so the loss is seen within a second.
    let took = revoked.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "took {took:?}, more than one keep-alive"
    );
    // The agent counts the registration once etcd has answered its put,
    // which may be just after the key is visible to us.
    eventually(
        "the agent to count the second registration",
        DEADLINE,
        || async { agent.json("/v1/self").await["registrations"][0]["registrations"] == 2 },
    )
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn a_key_deleted_under_a_live_lease_is_written_again_at_once() {
    let etcd = Etcd::start().await;
    let addr = "127.0.0.1:7002".parse().expect("addr");
    // ttl 30s: the next keep-alive is 10 s away, so only the watch of our
    // own key can bring it back within the bound below.
    let registry = Section::etcd(&etcd, "/deleted").set("ttl", "30s");
    let agent =
        TestAgent::start(&AgentToml::new(registry).service(Section::game_service("logic", addr)))
            .await;
    let key = "/deleted/logic/logic-1";
    eventually("the key in etcd", DEADLINE, || async {
        value(&etcd, key).await.is_some()
    })
    .await;
    let (_, old_lease) = value(&etcd, key).await.expect("key present");

    // As a resumed stale leader's revocation or an operator's etcdctl del
    // does: the key goes, the lease stays alive.
    let deleted = etcd
        .client()
        .await
        .delete(key, None)
        .await
        .expect("delete behind the agent's back");
    assert_eq!(deleted.deleted(), 1);
    let at = Instant::now();
    eventually("the key to come back", DEADLINE, || async {
        value(&etcd, key).await.is_some()
    })
    .await;
    let took = at.elapsed();
    println!("measured: key back {took:?} after it was deleted");
    assert!(took < Duration::from_millis(500), "took {took:?}");
    let (_, lease) = value(&etcd, key).await.expect("key present");
    assert_ne!(lease, old_lease, "written again under a new lease");
    let (_, metrics) = agent.get("/metrics").await;
    assert!(
        metrics.contains(r#"squire_registration_deleted_total{registry="etcd",kind="etcd"} 1"#),
        "{metrics}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_peer_proxies_to_an_announced_instance_and_stops_when_it_leaves() {
    let etcd = Etcd::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::etcd(&etcd, "/proxy").service(Section::game_service("echo", backend.addr)),
    )
    .await;
    let b = TestAgent::start(
        &AgentToml::etcd(&etcd, "/proxy").upstream(Section::fast_upstream("echo")),
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
    assert_eq!(
        farewell, "bye 20\n",
        "the half-close reached the backend and its reply came back"
    );
    let listen = b.listen().to_string();
    let sent = b
        .metric(&format!(
            "squire_tcp_received_bytes_total{{upstream=\"echo\",listen=\"{listen}\"}}"
        ))
        .await;
    assert_eq!(sent, Some(20.0));

    a.stop().await;
    eventually("B to drop A", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    let before = backend
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    let greeting = support::greeting(b.listen()).await.expect("connect to B");
    assert_eq!(greeting, "", "B closes the client: nothing to route to");
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    let failed = b
        .metric(&format!(
            "squire_tcp_connections_failed_total{{upstream=\"echo\",listen=\"{listen}\",reason=\"no_healthy_endpoint\"}}"
        ))
        .await;
    assert_eq!(failed, Some(1.0), "{}", b.get("/metrics").await.1);
    b.stop().await;
}

#[tokio::test]
async fn an_etcd_outage_keeps_routes_and_registration_recovers() {
    let mut etcd = Etcd::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::etcd(&etcd, "/outage").service(Section::game_service("room", backend.addr)),
    )
    .await;
    let b = TestAgent::start(
        &AgentToml::etcd(&etcd, "/outage").upstream(Section::fast_upstream("room")),
    )
    .await;
    eventually("B to see A", DEADLINE, || async {
        b.routable().await == ["room-1"]
    })
    .await;

    etcd.kill();
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
            .expect("session while etcd is down");
        assert_eq!(greeting, "A", "B serves from its last snapshot");
        assert_eq!(farewell, "bye 10\n");
    }
    eventually("an outage longer than the 3s ttl", DEADLINE, || async {
        let this = a.json("/v1/self").await;
        this["registrations"][0]["last_keep_alive"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|since| since > Duration::from_millis(3500))
    })
    .await;

    let outage_ended = std::time::SystemTime::now();
    etcd.restart().await;
    let key = "/outage/room/room-1";
    eventually("A registered again", DEADLINE, || async {
        let this = a.json("/v1/self").await;
        let registration = &this["registrations"][0];
        let refreshed_since = registration["last_keep_alive"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .is_some_and(|t| t > outage_ended);
        registration["registered"] == true && refreshed_since && value(&etcd, key).await.is_some()
    })
    .await;
    eventually("B's watch back", DEADLINE, || async {
        b.json("/v1/services").await["services"][0]["watch_up"] == true
    })
    .await;
    assert_eq!(b.routable().await, ["room-1"]);
    let (greeting, _, _) = session(b.listen(), b"after")
        .await
        .expect("session after the outage");
    assert_eq!(greeting, "A");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_garbage_value_is_skipped_and_counted() {
    let etcd = Etcd::start().await;
    let backend = Backend::start("good").await;
    let mut client = etcd.client().await;
    client
        .put("/garbage/shop/bad-1", "not json at all", None)
        .await
        .expect("put");
    client
        .put("/garbage/shop/bad-2", r#"{"name":"shop"}"#, None)
        .await
        .expect("put");
    let good = format!(
        r#"{{"name":"shop","id":"shop-1","host":"127.0.0.1","port":{},"status":"healthy"}}"#,
        backend.addr.port()
    );
    client
        .put("/garbage/shop/shop-1", good, None)
        .await
        .expect("put");

    let b = TestAgent::start(
        &AgentToml::etcd(&etcd, "/garbage").upstream(Section::fast_upstream("shop")),
    )
    .await;
    eventually("the good instance", DEADLINE, || async {
        b.routable().await == ["shop-1"]
    })
    .await;
    let skipped = "squire_registry_entries_skipped_total{service=\"shop\"}";
    assert_eq!(b.metric(skipped).await, Some(2.0));

    client
        .put("/garbage/shop/bad-3", "[1,2", None)
        .await
        .expect("put");
    eventually("the third to be counted", DEADLINE, || async {
        b.metric(skipped).await == Some(3.0)
    })
    .await;
    let (greeting, _, _) = session(b.listen(), b"x").await.expect("still routing");
    assert_eq!(greeting, "good");
    let listing = client
        .get("/garbage/shop/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    assert_eq!(listing.kvs().len(), 4, "squire never touches other entries");
    b.stop().await;
}

#[tokio::test]
async fn credentials_authenticate_and_a_wrong_password_is_reported_not_fatal() {
    use etcd_client::{ConnectOptions, Permission};
    let etcd = Etcd::start().await;
    let mut admin = etcd.client().await;
    admin
        .user_add("root", "rootpw", None)
        .await
        .expect("root user");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("root role");
    admin.role_add("svc").await.expect("role");
    admin
        .role_grant_permission("svc", Permission::read_write("/auth/").with_prefix())
        .await
        .expect("grant");
    admin
        .user_add("squire", "squirepw", None)
        .await
        .expect("user");
    admin
        .user_grant_role("squire", "svc")
        .await
        .expect("user role");
    admin.auth_enable().await.expect("auth on");

    let with = |password: &str| {
        let registry = Section::etcd(&etcd, "/auth")
            .set("username", "squire")
            .set("password", password);
        AgentToml::new(registry).service(Section::game_service(
            "vault",
            "127.0.0.1:7400".parse().expect("addr"),
        ))
    };
    let good = TestAgent::start(&with("squirepw")).await;
    let root = ConnectOptions::new()
        .with_user("root", "rootpw")
        .with_timeout(Duration::from_secs(5));
    let mut reader = etcd_client::Client::connect([etcd.endpoint()], Some(root))
        .await
        .expect("root client");
    eventually(
        "the key written with the user's credentials",
        DEADLINE,
        || {
            let mut reader = reader.clone();
            async move {
                reader
                    .get("/auth/vault/vault-1", None)
                    .await
                    .is_ok_and(|r| r.kvs().len() == 1)
            }
        },
    )
    .await;
    good.stop().await;
    assert!(
        reader
            .get("/auth/vault/vault-1", None)
            .await
            .expect("get")
            .kvs()
            .is_empty(),
        "revoked on stop"
    );

    let bad = TestAgent::start(&with("not-the-password")).await;
    eventually("the failure in /v1/self", DEADLINE, || async {
        let this = bad.json("/v1/self").await;
        let registration = &this["registrations"][0];
        registration["registered"] == false
            && registration["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("authentication failed"))
    })
    .await;
    let (status, _) = bad.get("/ready").await;
    assert_eq!(status, 503, "not registered, not ready; and still running");
    let this = bad.json("/v1/self").await;
    assert!(
        !this.to_string().contains("not-the-password"),
        "the password never shows"
    );
    bad.stop().await;
}

#[tokio::test]
async fn an_etcd_that_exits_at_start_fails_the_harness_at_once() {
    // The client port is taken: etcd cannot listen and exits.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let started = Instant::now();
    let error = match Etcd::try_start_on(port).await {
        Ok(_) => panic!("etcd served on a port the test holds"),
        Err(e) => e,
    };
    let took = started.elapsed();
    assert!(
        took < DEADLINE / 4,
        "took {took:?}: the harness waited instead of seeing the exit"
    );
    assert!(error.contains("etcd exited (exit status: "), "{error}");
    assert!(
        error.contains("address already in use"),
        "the end of etcd's log says why: {error}"
    );
    drop(taken);
}
