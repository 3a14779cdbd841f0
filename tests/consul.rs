//! End to end against the fake Consul (`tests/support/consul.rs`): whole
//! agents registering, heartbeating, discovering and proxying, and the
//! Consul backend's lease driven directly where the agent has no outside
//! handle yet (status changes), and a reported load carried in `Meta` to a
//! peer that picks by it (`support::load`). No real Consul is involved: see
//! the fake's own tests in `tests/consul_fake.rs`.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Mutex, Once};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::json;
use squire::registry::{Instance, RegistryError, Status, WatchEvent};
use support::config::{AgentToml, Section};
use support::consul::{Acl, AclToken, FakeConsul, FakeOptions, Level};
use support::{eventually, session, Backend, TestAgent, DEADLINE};

const TOKEN: &str = "s3cr3t-acl-token-7f9a2c";

/// Every log line of every agent in this test binary, at TRACE, so the
/// token test can prove the token never reaches one.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init()
            .expect("the only subscriber of this test binary");
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// An agent on its own runtime, so a test can kill it the way a crash
/// would: every task stops at once, nothing is deregistered.
struct CrashableAgent {
    runtime: Option<tokio::runtime::Runtime>,
    admin: SocketAddr,
}

impl CrashableAgent {
    async fn start(toml: &AgentToml) -> CrashableAgent {
        let config = squire::Config::from_toml(&toml.to_string()).unwrap_or_else(|e| panic!("{e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let (bound, admin) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            let agent = squire::Agent::bind(config).await.expect("agent binds");
            let _ = bound.send(agent.admin_addr()); // the test waits for it
            agent.run(std::future::pending()).await;
        });
        let admin = admin.await.expect("the agent bound");
        CrashableAgent {
            runtime: Some(runtime),
            admin,
        }
    }

    fn crash(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for CrashableAgent {
    fn drop(&mut self) {
        self.crash();
    }
}

fn heartbeats(fake: &FakeConsul, check: &str) -> usize {
    let path = format!("/v1/agent/check/pass/{check}");
    fake.requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path == path)
        .count()
}

#[tokio::test]
async fn registration_is_the_exact_service_definition_and_leaves_on_stop() {
    capture_logs();
    let fake = FakeConsul::start().await;
    let addr = "127.0.0.1:7000".parse().expect("addr");
    let agent =
        TestAgent::start(&AgentToml::consul(&fake).service(Section::game_service("battle", addr)))
            .await;
    eventually("the service in Consul", DEADLINE, || async {
        fake.service("battle-1").is_some()
    })
    .await;

    let register = fake
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/agent/service/register")
        .expect("a register request");
    assert_eq!(
        (register.method.as_str(), register.query.as_str()),
        ("PUT", "")
    );
    let body: serde_json::Value = serde_json::from_str(&register.body).expect("JSON body");
    assert_eq!(
        body,
        json!({
            "ID": "battle-1",
            "Name": "battle",
            "Tags": ["game"],
            "Address": "127.0.0.1",
            "Port": 7000,
            "Meta": {"version": "1.0.0", "zone": "a"},
            "Weights": {"Passing": 100, "Warning": 1},
            "Check": {
                "CheckID": "service:battle-1",
                "Name": "squire heartbeat",
                "Notes": "TTL check kept alive by the squire sidecar",
                "TTL": "2s",
                "Status": "passing",
                "DeregisterCriticalServiceAfter": "60s"
            }
        })
    );
    let check = fake.check("service:battle-1").expect("the TTL check");
    assert_eq!(check.ttl, Some(Duration::from_secs(2)));
    assert_eq!(check.dcsa, Some(Duration::from_secs(60)));
    assert_eq!(check.status, "passing");
    eventually("the first check update", DEADLINE, || async {
        heartbeats(&fake, "service:battle-1") >= 1
    })
    .await;
    // Right after registering: maintenance off, then the check state, since
    // re-registering an ID Consul still knows keeps its old state.
    let after: Vec<String> = fake
        .requests()
        .iter()
        .skip_while(|r| r.path != "/v1/agent/service/register")
        .skip(1)
        .take(2)
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
        .collect();
    assert_eq!(
        after,
        [
            "PUT /v1/agent/service/maintenance/battle-1?enable=false&reason=draining%3A%20squire%20takes%20no%20new%20sessions",
            "PUT /v1/agent/check/pass/service:battle-1?note=squire%20reports%20healthy",
        ]
    );

    eventually("/ready", DEADLINE, || async {
        agent.get("/ready").await.0 == 200
    })
    .await;
    let this = agent.json("/v1/self").await;
    assert_eq!(this["registrations"][0]["registry"], "consul");
    assert_eq!(this["registrations"][0]["lease"], "service:battle-1");
    assert_eq!(this["registrations"][0]["target"], fake.address());

    agent.stop().await;
    assert!(fake.service("battle-1").is_none(), "deregistered on stop");
    assert!(fake.check("service:battle-1").is_none());
}

#[tokio::test]
async fn heartbeats_keep_the_check_passing_and_a_crash_lets_it_expire() {
    capture_logs();
    let fake = FakeConsul::start().await;
    let addr = "127.0.0.1:7001".parse().expect("addr");
    let mut agent = CrashableAgent::start(
        &AgentToml::consul(&fake).service(Section::game_service("logic", addr)),
    )
    .await;
    eventually("the first heartbeat", DEADLINE, || async {
        heartbeats(&fake, "service:logic-1") >= 1
    })
    .await;
    let index = fake.service_index("logic");
    let registered_at = Instant::now();

    // ttl 2s, a heartbeat every 666 ms: well past one ttl, still passing,
    // and the heartbeats (constant output) never moved the index.
    eventually("three ttls of heartbeats", DEADLINE, || async {
        registered_at.elapsed() > Duration::from_secs(6)
            && heartbeats(&fake, "service:logic-1") >= 8
    })
    .await;
    assert_eq!(
        fake.check("service:logic-1").expect("check").status,
        "passing"
    );
    assert_eq!(
        fake.service_index("logic"),
        index,
        "heartbeats must cost the catalog nothing"
    );
    let (status, _) = support::http_get(agent.admin, "/ready").await;
    assert_eq!(status, 200);

    agent.crash();
    let crashed = Instant::now();
    eventually("the check to go critical", DEADLINE, || async {
        fake.check("service:logic-1")
            .is_some_and(|c| c.status == "critical")
    })
    .await;
    let took = crashed.elapsed();
    eprintln!("measured: check critical {took:?} after the crash (ttl 2s)");
    assert!(
        took <= Duration::from_millis(2500),
        "critical after {took:?}"
    );
    assert_eq!(
        fake.check("service:logic-1").expect("check").output,
        "TTL expired (last output before timeout follows): squire reports healthy"
    );
    // Then Consul reaps it: DCSA 1m, next 30 s reaper tick.
    fake.advance(Duration::from_secs(95));
    assert!(fake.service("logic-1").is_none(), "reaped");
}

fn instance(name: &str, port: u16) -> Instance {
    Instance {
        name: name.into(),
        id: format!("{name}-1"),
        host: "127.0.0.1".into(),
        port,
        tags: vec!["game".into()],
        metadata: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
        version: "1.0.0".into(),
        weight: 10,
        status: Status::Healthy,
        load: None,
    }
}

/// The Consul backend alone, built from `registry` as the agent would.
fn consul_registry(registry: Section) -> std::sync::Arc<dyn squire::registry::Registry> {
    let toml = AgentToml::new(registry).to_string();
    let config = squire::Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}"));
    squire::agent::connect_registry(&config.registries[0]).expect("registry")
}

#[tokio::test]
async fn status_changes_reach_the_check_and_maintenance_mode_at_once() {
    capture_logs();
    let fake = FakeConsul::start().await;
    let registry = consul_registry(Section::consul(&fake));
    let mut me = instance("room", 7002);
    let mut lease = registry.register(&me).await.expect("register");
    let check = "service:room-1";
    assert_eq!(fake.check(check).expect("check").status, "passing");
    let mut watch = registry.watch("room").await.expect("watch");
    let first = watch.next().await.expect("first event");
    let WatchEvent::Reset(entries) = first else {
        panic!("a reset first");
    };
    let seen = entries[0].value.as_ref().expect("valid");
    assert_eq!(
        (seen.status, seen.weight, seen.version.as_str()),
        (Status::Healthy, 10, "1.0.0")
    );
    assert_eq!(seen.metadata.get("zone").map(String::as_str), Some("a"));

    let expect = |status: Status, check_status: &'static str, maintenance: bool| {
        let fake = &fake;
        async move {
            let got = fake.check(check).expect("check").status;
            assert_eq!(got, check_status, "{status}");
            assert_eq!(
                fake.check("_service_maintenance:room-1").is_some(),
                maintenance,
                "{status}"
            );
        }
    };
    for (status, check_status, maintenance) in [
        (Status::Warning, "warning", false),
        (Status::Unhealthy, "critical", false),
        (Status::Unknown, "critical", false),
        (Status::Healthy, "passing", false),
        (Status::Draining, "passing", true),
        (Status::Critical, "critical", false),
        (Status::Healthy, "passing", false),
    ] {
        me.status = status;
        lease.update(&me).await.expect("update");
        expect(status, check_status, maintenance).await;
    }

    // Discovery reads the status back from the checks.
    me.status = Status::Draining;
    lease.update(&me).await.expect("drain");
    let status = next_status(&mut watch).await;
    assert_eq!(status, Status::Draining);
    me.status = Status::Warning;
    lease.update(&me).await.expect("warn");
    assert_eq!(next_status(&mut watch).await, Status::Warning);
    lease.keep_alive().await.expect("heartbeat");
    assert_eq!(
        fake.check(check).expect("check").status,
        "warning",
        "heartbeats say warn"
    );

    // Other fields re-register the definition; the check keeps its state.
    me.metadata.insert("zone".into(), "b".into());
    me.weight = 20;
    lease.update(&me).await.expect("redefine");
    let service = fake.service("room-1").expect("service");
    assert_eq!(service["Meta"], json!({"version": "1.0.0", "zone": "b"}));
    assert_eq!(service["Weights"], json!({"Passing": 20, "Warning": 1}));
    assert_eq!(fake.check(check).expect("check").status, "warning");

    // The datacenter goes on queries; an unknown one is an error.
    let in_dc1 = consul_registry(Section::consul(&fake).set("datacenter", "dc1"));
    let mut dc_watch = in_dc1.watch("room").await.expect("watch in dc1");
    assert!(matches!(dc_watch.next().await, Ok(WatchEvent::Reset(e)) if e.len() == 1));
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.path == "/v1/health/service/room" && r.query == "dc=dc1"));
    match consul_registry(Section::consul(&fake).set("datacenter", "dc9"))
        .watch("room")
        .await
    {
        Err(RegistryError::Unavailable(e)) => assert!(e.contains("No path to datacenter"), "{e}"),
        Err(e) => panic!("unavailable expected, got {e:?}"),
        Ok(_) => panic!("an unknown datacenter must fail"),
    }

    // 404 on a heartbeat: the agent lost us.
    fake.restart_empty();
    match lease.keep_alive().await {
        Err(RegistryError::LeaseLost(_)) => {}
        other => panic!("lease lost expected, got {other:?}"),
    }
    // Deregistering what is already gone is success.
    lease.revoke().await.expect("404 on deregister is success");
}

async fn next_status(watch: &mut Box<dyn squire::registry::Watch>) -> Status {
    match tokio::time::timeout(DEADLINE, watch.next()).await {
        Ok(Ok(WatchEvent::Reset(entries))) => entries[0].value.as_ref().expect("valid").status,
        other => panic!("a reset expected, got {other:?}"),
    }
}

#[tokio::test]
async fn a_blocking_watch_routes_to_a_new_instance_within_a_second() {
    capture_logs();
    let fake = FakeConsul::start().await;
    let backend = Backend::start("A").await;
    let b =
        TestAgent::start(&AgentToml::consul(&fake).upstream(Section::fast_upstream("echo"))).await;
    eventually("B's watch to block", DEADLINE, || async {
        b.json("/v1/services").await["services"][0]["watch_up"] == true
            && !fake.blocked().is_empty()
    })
    .await;
    let queries_before = fake.requests().len();

    let a = TestAgent::start(
        &AgentToml::consul(&fake).service(Section::game_service("echo", backend.addr)),
    )
    .await;
    eventually("A in Consul", DEADLINE, || async {
        fake.service("echo-1").is_some()
    })
    .await;
    let registered = Instant::now();
    eventually("B to route to A", DEADLINE, || async {
        b.routable().await == ["echo-1"]
    })
    .await;
    let took = registered.elapsed();
    eprintln!("measured: B routes to A {took:?} after A appeared in Consul");
    assert!(took < Duration::from_secs(1), "B saw A after {took:?}");
    let health_queries = fake.requests()[queries_before..]
        .iter()
        .filter(|r| r.path == "/v1/health/service/echo")
        .count();
    assert!(
        health_queries <= 3,
        "B polls instead of blocking: {health_queries} queries"
    );
    let (greeting, echoed, farewell) = session(b.listen(), b"via consul").await.expect("session");
    assert_eq!(
        (greeting.as_str(), echoed.as_slice()),
        ("A", &b"via consul"[..])
    );
    assert_eq!(farewell, "bye 10\n");

    a.stop().await;
    eventually("B to drop A", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn an_agent_restarted_empty_gets_registered_again_and_watched_again() {
    capture_logs();
    let fake = FakeConsul::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::consul(&fake).service(Section::game_service("gate", backend.addr)),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::consul(&fake).upstream(Section::fast_upstream("gate"))).await;
    eventually("B to route to A", DEADLINE, || async {
        b.routable().await == ["gate-1"]
    })
    .await;

    fake.restart_empty();
    let restarted = Instant::now();
    eventually("A registered again", DEADLINE, || async {
        fake.service("gate-1").is_some()
    })
    .await;
    // ttl 2s: the next heartbeat (within 666 ms) gets the 404.
    let took = restarted.elapsed();
    eprintln!("measured: registered again {took:?} after Consul restarted empty");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    // register() returns after the maintenance and check calls that follow
    // the PUT the fake already shows, so /v1/self may lag a moment.
    eventually(
        "/v1/self to count the second registration",
        DEADLINE,
        || async { a.json("/v1/self").await["registrations"][0]["registrations"] == 2 },
    )
    .await;
    assert_eq!(
        fake.check("service:gate-1").expect("check").status,
        "passing"
    );
    eventually("B to route to A again", DEADLINE, || async {
        b.routable().await == ["gate-1"]
            && b.json("/v1/services").await["services"][0]["watch_up"] == true
    })
    .await;
    let (greeting, _, _) = session(b.listen(), b"x").await.expect("session");
    assert_eq!(greeting, "A");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_unreachable_consul_keeps_the_last_snapshot_in_service() {
    capture_logs();
    let fake = FakeConsul::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::consul(&fake).service(Section::game_service("lobby", backend.addr)),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::consul(&fake).upstream(Section::fast_upstream("lobby"))).await;
    eventually("B to route to A", DEADLINE, || async {
        b.routable().await == ["lobby-1"]
    })
    .await;
    drop(fake); // listener closed, connections cut: connection refused from now on
    eventually("B's watch to notice", DEADLINE, || async {
        b.json("/v1/services").await["services"][0]["watch_up"] == false
    })
    .await;
    eventually("A's heartbeat to fail", DEADLINE, || async {
        a.json("/v1/self").await["registrations"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Connect") || e.contains("refused"))
    })
    .await;
    for _ in 0..3 {
        let (greeting, _, _) = session(b.listen(), b"still").await.expect("session");
        assert_eq!(greeting, "A", "B serves from its last snapshot");
    }
    let restarts = b
        .metric("squire_watch_restarts_total{service=\"lobby\"}")
        .await
        .unwrap_or(0.0);
    eventually("B to keep retrying with backoff", DEADLINE, || async {
        b.metric("squire_watch_restarts_total{service=\"lobby\"}")
            .await
            .is_some_and(|n| n > restarts)
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_rewound_index_resets_the_watch() {
    capture_logs();
    let fake = FakeConsul::start().await;
    let first = Backend::start("A").await;
    let second = Backend::start("C").await;
    let a = TestAgent::start(
        &AgentToml::consul(&fake).service(Section::game_service("shop", first.addr)),
    )
    .await;
    // Pad the index so the rewind goes well below what B is blocked on.
    for i in 0..5 {
        let body = format!(r#"{{"Name":"pad","ID":"pad-{i}","Port":1}}"#);
        assert_eq!(
            fake.call("PUT", "/v1/agent/service/register", Some(&body))
                .await
                .status,
            200
        );
    }
    let b = TestAgent::start(
        &AgentToml::new(Section::consul(&fake).set("wait", "1s"))
            .upstream(Section::fast_upstream("shop")),
    )
    .await;
    eventually("B to route to A", DEADLINE, || async {
        b.routable().await == ["shop-1"]
    })
    .await;
    let high = fake.service_index("shop");
    eventually("B to block on the index", DEADLINE, || async {
        fake.requests().iter().any(|r| {
            r.path == "/v1/health/service/shop" && r.query.contains(&format!("index={high}&"))
        })
    })
    .await;

    fake.rewind_index(1);
    let rewound_at = fake.requests().len();
    let c = format!(
        r#"{{"Name":"shop","ID":"shop-2","Address":"127.0.0.1","Port":{},"Check":{{"TTL":"1h","Status":"passing"}}}}"#,
        second.addr.port()
    );
    assert_eq!(
        fake.call("PUT", "/v1/agent/service/register", Some(&c))
            .await
            .status,
        200
    );
    assert!(fake.service_index("shop") < high);
    eventually("B to route to both", DEADLINE, || async {
        b.routable().await == ["shop-1", "shop-2"]
    })
    .await;
    // After the answer that went backwards, B started over from index 0.
    let queries: Vec<String> = fake.requests()[rewound_at..]
        .iter()
        .filter(|r| r.path == "/v1/health/service/shop")
        .map(|r| r.query.clone())
        .collect();
    assert!(
        queries.iter().any(|q| !q.contains("index=")),
        "no query from index 0 after the rewind: {queries:?}"
    );
    let greetings: std::collections::BTreeSet<String> = {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let (greeting, _, _) = session(b.listen(), b"x").await.expect("session");
            seen.insert(greeting);
        }
        seen
    };
    assert_eq!(greetings.into_iter().collect::<Vec<_>>(), ["A", "C"]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_token_is_sent_and_never_logged() {
    capture_logs();
    let fake = FakeConsul::with_options(FakeOptions {
        acl: Some(Acl::deny_by_default(vec![AclToken::all_services(
            TOKEN,
            "accessor-squire",
            Level::Write,
        )])),
        ..FakeOptions::default()
    })
    .await;
    let backend = Backend::start("A").await;
    let with_token = Section::consul(&fake).set("token", TOKEN);
    let a_toml =
        AgentToml::new(with_token.clone()).service(Section::game_service("chat", backend.addr));
    let a = TestAgent::start(&a_toml).await;
    let b = TestAgent::start(&AgentToml::new(with_token).upstream(Section::fast_upstream("chat")))
        .await;
    eventually("B to route to A through ACLs", DEADLINE, || async {
        b.routable().await == ["chat-1"]
    })
    .await;
    let requests = fake.requests();
    assert!(requests.len() >= 4);
    assert!(
        requests.iter().all(|r| r.token.as_deref() == Some(TOKEN)),
        "every request carries the token in X-Consul-Token"
    );
    assert!(requests
        .iter()
        .all(|r| !r.query.contains(TOKEN) && !r.path.contains(TOKEN)));

    // A wrong token: refused, reported, and not logged either.
    let wrong = "wr0ng-t0ken-91c3";
    let c = TestAgent::start(
        &AgentToml::new(Section::consul(&fake).set("token", wrong))
            .service(Section::game_service("other", backend.addr)),
    )
    .await;
    eventually("C's registration to fail", DEADLINE, || async {
        c.json("/v1/self").await["registrations"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("ACL not found"))
    })
    .await;

    let config = squire::Config::from_toml(&a_toml.to_string()).expect("valid");
    assert!(
        !format!("{config:?}").contains(TOKEN),
        "Debug of the config"
    );
    for agent in [&a, &b, &c] {
        for path in ["/v1/self", "/v1/services", "/metrics"] {
            let (_, body) = agent.get(path).await;
            assert!(!body.contains(TOKEN) && !body.contains(wrong), "{path}");
        }
    }
    a.stop().await;
    b.stop().await;
    c.stop().await;
    let logs = logs();
    assert!(
        logs.contains("registered") && logs.contains("registration failed"),
        "the capture works"
    );
    assert!(!logs.contains(TOKEN), "the token is in the logs");
    assert!(!logs.contains(wrong), "the wrong token is in the logs");
}

#[tokio::test]
async fn https_with_a_custom_ca() {
    capture_logs();
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "squire test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("server key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("server params")
        .signed_by(&key, &ca)
        .expect("server certificate");
    let fake = FakeConsul::with_options(FakeOptions {
        tls: Some((cert.pem(), key.serialize_pem())),
        ..FakeOptions::default()
    })
    .await;
    assert!(fake.address().starts_with("https://"));
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write the CA");

    let backend = Backend::start("A").await;
    let with_ca = Section::consul(&fake).set("ca", ca_file.display().to_string());
    let a = TestAgent::start(
        &AgentToml::new(with_ca.clone()).service(Section::game_service("tls", backend.addr)),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::new(with_ca).upstream(Section::fast_upstream("tls"))).await;
    eventually("B to route to A over https", DEADLINE, || async {
        b.routable().await == ["tls-1"]
    })
    .await;

    // Without the CA the system roots do not know it.
    let untrusted = backend_registry_error(Section::consul(&fake)).await;
    assert!(
        matches!(&untrusted, RegistryError::Unavailable(e) if e.contains("certificate")),
        "{untrusted:?}"
    );
    // tls_skip_verify, explicitly.
    consul_registry(Section::consul(&fake).set("tls_skip_verify", true))
        .register(&instance("skip", 1))
        .await
        .expect("skip verify registers");
    a.stop().await;
    b.stop().await;
}

async fn backend_registry_error(registry: Section) -> RegistryError {
    match consul_registry(registry).register(&instance("x", 1)).await {
        Ok(_) => panic!("registration should fail"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_reported_load_round_trips_to_a_peer_and_steers_its_picks() {
    capture_logs();
    let fake = FakeConsul::start().await;
    support::load::round_trip(|| Section::consul(&fake)).await;
}
