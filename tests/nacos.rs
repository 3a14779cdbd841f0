//! End to end against a real Nacos server (r-nacos, `tests/support/nacos.rs`):
//! whole agents registering ephemeral instances, beating, draining,
//! deregistering, discovering and proxying, a server killed and restarted,
//! auth, instances written by other clients with garbage metadata, and a
//! reported load carried to a peer that picks by it (`support::load`).
//! Everything squire wrote is read back through the Open API.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Mutex, Once};
use std::time::Duration;

use serde_json::{json, Value};
use squire::registry::{Instance, RegistryError, Status, WatchEvent};
use support::config::{AgentToml, Section};
use support::nacos::Nacos;
use support::{eventually, http_with_token, session, Backend, TestAgent, DEADLINE};
use tokio::time::Instant;

const PASSWORD: &str = "s3cr3t-nacos-pw-4d1e";

/// Every log line of every agent in this test binary, at TRACE, so the
/// auth test can prove the password and the token never reach one.
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
}

impl CrashableAgent {
    async fn start(toml: &AgentToml) -> CrashableAgent {
        let config = squire::Config::from_toml(&toml.to_string()).unwrap_or_else(|e| panic!("{e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let (bound, ready) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            let agent = squire::Agent::bind(config).await.expect("agent binds");
            let _ = bound.send(()); // the test waits for it
            agent.run(std::future::pending()).await;
        });
        ready.await.expect("the agent bound");
        CrashableAgent {
            runtime: Some(runtime),
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

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
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

/// The Nacos backend alone, built from `registry` as the agent would.
fn nacos_registry(registry: Section) -> std::sync::Arc<dyn squire::registry::Registry> {
    let toml = AgentToml::new(registry).to_string();
    let config = squire::Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}"));
    squire::agent::connect_registry(&config.registries[0]).expect("registry")
}

/// The value of metric `name` for the series of the Nacos at `nacos` (and
/// of `service`, when given) that `agent` exports, if any. Every agent of
/// this test binary shares one recorder; each test's server has its own
/// address.
async fn push_metric(
    agent: &TestAgent,
    name: &str,
    nacos: &Nacos,
    service: Option<&str>,
) -> Option<f64> {
    let (_, body) = agent.get("/metrics").await;
    let server = format!("server=\"{}\"", nacos.address());
    body.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
        })
        .filter(|line| line.contains(&server))
        .filter(|line| service.is_none_or(|s| line.contains(&format!("service=\"{s}\""))))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

const PUSH_UP: &str = "squire_registry_push_up";
const PUSHES: &str = "squire_registry_pushes_total";
const PUSH_ACKS: &str = "squire_registry_push_acks_total";

async fn next_status(watch: &mut Box<dyn squire::registry::Watch>) -> Status {
    match tokio::time::timeout(DEADLINE, watch.next()).await {
        Ok(Ok(WatchEvent::Reset(entries))) => entries[0].value.as_ref().expect("valid").status,
        other => panic!("a reset expected, got {other:?}"),
    }
}

#[tokio::test]
async fn registration_is_the_exact_instance_and_leaves_on_stop() {
    capture_logs();
    let nacos = Nacos::start().await;
    let agent = TestAgent::start(
        &AgentToml::nacos(&nacos).service(Section::game_service("battle", addr(7100))),
    )
    .await;
    eventually("the instance in Nacos", DEADLINE, || async {
        nacos.instance("battle", "127.0.0.1", 7100).await.is_some()
    })
    .await;
    let read = nacos
        .instance("battle", "127.0.0.1", 7100)
        .await
        .expect("the instance");
    assert_eq!(read["ip"], "127.0.0.1");
    assert_eq!(read["port"], 7100);
    assert_eq!(read["weight"], 100.0);
    assert_eq!(read["healthy"], true);
    assert_eq!(read["enabled"], true);
    assert_eq!(read["ephemeral"], true);
    assert_eq!(read["clusterName"], "DEFAULT");
    assert_eq!(
        read["metadata"],
        json!({
            "id": "battle-1",
            "tags": "[\"game\"]",
            "version": "1.0.0",
            "status": "healthy",
            "zone": "a",
            "preserved.heart.beat.interval": "1000",
            "preserved.heart.beat.timeout": "3000",
            "preserved.ip.delete.timeout": "6000",
        })
    );
    // The list carries the same.
    let hosts = nacos.hosts("battle").await;
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(hosts[0]["metadata"], read["metadata"]);

    eventually("/ready", DEADLINE, || async {
        agent.get("/ready").await.0 == 200
    })
    .await;
    let this = agent.json("/v1/self").await;
    let registration = &this["registrations"][0];
    assert_eq!(registration["registry"], "nacos");
    assert_eq!(
        registration["lease"],
        "127.0.0.1#7100#DEFAULT#DEFAULT_GROUP@@battle"
    );
    assert_eq!(
        registration["target"],
        format!(
            "{} (namespace public, group DEFAULT_GROUP)",
            nacos.address()
        )
    );

    agent.stop().await;
    assert!(
        nacos.instance("battle", "127.0.0.1", 7100).await.is_none(),
        "deregistered on stop"
    );
}

#[tokio::test]
async fn heartbeats_keep_it_alive_and_a_crash_lets_it_expire() {
    capture_logs();
    let nacos = Nacos::start().await;
    let mut agent = CrashableAgent::start(
        &AgentToml::nacos(&nacos).service(Section::game_service("logic", addr(7101))),
    )
    .await;
    eventually("the instance in Nacos", DEADLINE, || async {
        nacos.instance("logic", "127.0.0.1", 7101).await.is_some()
    })
    .await;
    // Until r-nacos has expired an instance registered after ours that
    // gets no beats (a control: expiry has run, it is not just time
    // passing), ours is there and healthy at every read.
    nacos
        .register_unbeaten("logic-control", "127.0.0.1", 7201)
        .await;
    let control = Instant::now();
    let reads = std::cell::Cell::new(0);
    eventually("the unbeaten control to expire", DEADLINE, || async {
        let read = nacos.instance("logic", "127.0.0.1", 7101).await;
        let read = read.expect("kept alive by heartbeats");
        assert_eq!(read["healthy"], true, "{read}");
        reads.set(reads.get() + 1);
        nacos
            .instance("logic-control", "127.0.0.1", 7201)
            .await
            .is_none()
    })
    .await;
    let read = nacos.instance("logic", "127.0.0.1", 7101).await;
    assert_eq!(read.expect("still there")["healthy"], true);
    println!(
        "the control expired {:?} after registering; ours healthy at {} reads meanwhile",
        control.elapsed(),
        reads.get()
    );
    agent.crash();
    let crashed = Instant::now();
    eventually("the instance to expire", DEADLINE, || async {
        nacos.instance("logic", "127.0.0.1", 7101).await.is_none()
    })
    .await;
    println!("expired {:?} after the crash", crashed.elapsed());
}

#[tokio::test]
async fn two_agents_proxy_through_nacos_discovery() {
    capture_logs();
    let nacos = Nacos::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::nacos(&nacos).service(Section::game_service("lobby", backend.addr)),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::nacos(&nacos).upstream(Section::fast_upstream("lobby"))).await;
    eventually("B to route to A", DEADLINE, || async {
        b.routable().await == ["lobby-1"]
    })
    .await;
    let (greeting, echoed, farewell) = session(b.listen(), b"hello").await.expect("session");
    assert_eq!(
        (greeting.as_str(), echoed.as_slice(), farewell.as_str()),
        ("A", b"hello".as_slice(), "bye 5\n")
    );
    let services = b.json("/v1/services").await;
    let endpoint = &services["upstreams"][0]["endpoints"][0];
    assert_eq!(endpoint["status"], "healthy", "{services}");

    // A leaves: B sees it go within a poll.
    a.stop().await;
    eventually("B to drop A", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn draining_sets_enabled_false_and_takes_the_instance_out_of_rotation() {
    capture_logs();
    let nacos = Nacos::start().await;
    let backend = Backend::start("A").await;
    let port = backend.addr.port();
    let a = TestAgent::start(
        &AgentToml::nacos(&nacos).service(Section::game_service("room", backend.addr)),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::nacos(&nacos).upstream(Section::fast_upstream("room"))).await;
    eventually("B to route to A", DEADLINE, || async {
        b.routable().await == ["room-1"]
    })
    .await;

    let (status, body) = http_with_token(
        a.admin,
        "PUT",
        "/v1/maintenance?enable=true&reason=drill",
        a.token.expose(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eventually("enabled=false in Nacos", DEADLINE, || async {
        nacos
            .instance("room", "127.0.0.1", port)
            .await
            .is_some_and(|i| i["enabled"] == false)
    })
    .await;
    let read = nacos
        .instance("room", "127.0.0.1", port)
        .await
        .expect("instance");
    assert_eq!(read["metadata"]["status"], "unhealthy");
    assert_eq!(read["metadata"]["squire_status"], "draining");
    // Nacos lists only enabled instances: B stops routing to A.
    eventually("B to stop routing to A", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    // Heartbeats keep the drained instance as it is, without registering
    // it again: until an unbeaten control registered now has gone
    // unhealthy (the server's health check has run since), every read
    // finds ours registered and disabled.
    let registrations = a.json("/v1/self").await["registrations"][0]["registrations"].clone();
    nacos
        .register_unbeaten("room-control", "127.0.0.1", 7202)
        .await;
    eventually("the unbeaten control to go unhealthy", DEADLINE, || async {
        let read = nacos.instance("room", "127.0.0.1", port).await;
        assert_eq!(read.expect("still registered")["enabled"], false);
        nacos
            .instance("room-control", "127.0.0.1", 7202)
            .await
            .is_none_or(|control| control["healthy"] == false)
    })
    .await;
    assert_eq!(
        a.json("/v1/self").await["registrations"][0]["registrations"],
        registrations
    );

    let (status, body) = http_with_token(
        a.admin,
        "PUT",
        "/v1/maintenance?enable=false",
        a.token.expose(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eventually("B to route to A again", DEADLINE, || async {
        b.routable().await == ["room-1"]
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn status_changes_are_written_and_read_back() {
    capture_logs();
    let nacos = Nacos::start().await;
    let registry = nacos_registry(Section::nacos(&nacos));
    let mut me = instance("hall", 7102);
    let mut lease = registry.register(&me).await.expect("register");
    let mut watch = registry.watch("hall").await.expect("watch");
    let WatchEvent::Reset(entries) = watch.next().await.expect("first event") else {
        panic!("a reset first");
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].value,
        Ok(me.clone()),
        "read back field for field"
    );

    for status in [
        Status::Warning,
        Status::Unhealthy,
        Status::Unknown,
        Status::Critical,
        Status::Healthy,
    ] {
        me.status = status;
        lease.update(&me).await.expect("update");
        assert_eq!(next_status(&mut watch).await, status);
        lease.keep_alive().await.expect("heartbeat");
    }
    // Other fields are rewritten too.
    me.metadata.insert("zone".into(), "b".into());
    me.weight = 20;
    me.tags.push("pvp".into());
    lease.update(&me).await.expect("redefine");
    let read = nacos
        .instance("hall", "127.0.0.1", 7102)
        .await
        .expect("instance");
    assert_eq!(read["weight"], 20.0);
    assert_eq!(read["metadata"]["zone"], "b");
    assert_eq!(read["metadata"]["tags"], "[\"game\",\"pvp\"]");
    lease
        .keep_alive()
        .await
        .expect("what was written is what is read");

    // Deleted behind our back: the next heartbeat says lost.
    let (status, body) = nacos
        .request(
            "DELETE",
            "/nacos/v1/ns/instance",
            &[
                ("serviceName", "hall"),
                ("ip", "127.0.0.1"),
                ("port", "7102"),
                ("ephemeral", "true"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    match lease.keep_alive().await {
        Err(RegistryError::LeaseLost(_)) => {}
        other => panic!("lease lost expected, got {other:?}"),
    }
    // Deregistering what is already gone is success.
    lease.revoke().await.expect("already gone is success");
}

#[tokio::test]
async fn a_killed_server_keeps_the_last_snapshot_and_both_recover_after_restart() {
    capture_logs();
    let mut nacos = Nacos::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::nacos(&nacos).service(Section::game_service("lobby", backend.addr)),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::nacos(&nacos).upstream(Section::fast_upstream("lobby"))).await;
    eventually("B to route to A", DEADLINE, || async {
        b.routable().await == ["lobby-1"]
    })
    .await;

    nacos.kill();
    let killed = Instant::now();
    eventually("B's watch to notice", DEADLINE, || async {
        b.json("/v1/services").await["services"][0]["watch_up"] == false
    })
    .await;
    println!("B's watch down {:?} after the kill", killed.elapsed());
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
    eventually("B's push subscription down", DEADLINE, || async {
        push_metric(&b, PUSH_UP, &nacos, None).await == Some(0.0)
    })
    .await;

    // Restarted empty (ephemeral instances live in memory): A's next
    // heartbeat finds it gone and registers again, B lists it again.
    nacos.restart().await;
    let restarted = Instant::now();
    eventually("A registered again", DEADLINE, || async {
        nacos
            .instance("lobby", "127.0.0.1", backend.addr.port())
            .await
            .is_some_and(|i| i["metadata"]["id"] == "lobby-1")
    })
    .await;
    println!(
        "A registered again {:?} after the restart",
        restarted.elapsed()
    );
    eventually("B's watch up again", DEADLINE, || async {
        b.json("/v1/services").await["services"][0]["watch_up"] == true
    })
    .await;
    println!("B's watch up {:?} after the restart", restarted.elapsed());
    eventually("B's push subscription up again", DEADLINE, || async {
        push_metric(&b, PUSH_UP, &nacos, None).await == Some(1.0)
    })
    .await;
    assert!(
        a.json("/v1/self").await["registrations"][0]["registrations"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "a second registration"
    );
    eventually("B to route to A", DEADLINE, || async {
        b.routable().await == ["lobby-1"]
    })
    .await;
    let (greeting, _, _) = session(b.listen(), b"again").await.expect("session");
    assert_eq!(greeting, "A");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn garbage_metadata_is_skipped_and_counted() {
    capture_logs();
    let nacos = Nacos::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::nacos(&nacos).service(Section::game_service("shop", backend.addr)),
    )
    .await;
    // Written by other clients: a status Knight does not know, tags that
    // are not a JSON array; and a plain Nacos instance, which is fine.
    nacos
        .register("shop", "127.0.0.1", 7103, r#"{"status":"sleepy"}"#)
        .await;
    nacos
        .register("shop", "127.0.0.1", 7104, r#"{"tags":"game,pvp"}"#)
        .await;
    nacos
        .register("shop", "127.0.0.1", 7105, r#"{"zone":"b"}"#)
        .await;
    let b =
        TestAgent::start(&AgentToml::nacos(&nacos).upstream(Section::fast_upstream("shop"))).await;
    let plain = "127.0.0.1#7105"; // r-nacos's instanceId
    eventually("B to route to the valid two", DEADLINE, || async {
        let mut ids = b.routable().await;
        ids.sort();
        ids == [plain, "shop-1"]
    })
    .await;
    let skipped = "squire_registry_entries_skipped_total{service=\"shop\"}";
    eventually("both garbage entries counted", DEADLINE, || async {
        b.metric(skipped).await == Some(2.0)
    })
    .await;
    // Counted once per entry and reason, not once per list: B lists again
    // (it routes to an instance added since, twice) and the count stays.
    for port in [7109, 7110] {
        nacos
            .register("shop", "127.0.0.1", port, r#"{"zone":"c"}"#)
            .await;
        let id = format!("127.0.0.1#{port}");
        eventually("B to list again", DEADLINE, || async {
            b.routable().await.contains(&id)
        })
        .await;
        assert_eq!(b.metric(skipped).await, Some(2.0));
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn auth_logs_in_and_never_shows_the_password_or_token() {
    capture_logs();
    let nacos = Nacos::start_with_auth("squire", PASSWORD).await;
    let with = |password: &str| {
        Section::nacos(&nacos)
            .set("username", "squire")
            .set("password", password)
    };
    let a = TestAgent::start(
        &AgentToml::new(with(PASSWORD)).service(Section::game_service("vault", addr(7106))),
    )
    .await;
    eventually("the instance in Nacos", DEADLINE, || async {
        nacos.instance("vault", "127.0.0.1", 7106).await.is_some()
    })
    .await;
    let b =
        TestAgent::start(&AgentToml::new(with(PASSWORD)).upstream(Section::fast_upstream("vault")))
            .await;
    eventually("B to see A", DEADLINE, || async {
        b.routable().await == ["vault-1"]
    })
    .await;
    // The gRPC subscription carries the token too.
    eventually("B's push subscription up under auth", DEADLINE, || async {
        push_metric(&b, PUSH_UP, &nacos, None).await == Some(1.0)
    })
    .await;

    // No credentials, or wrong ones: refused, and said so.
    let anonymous = nacos_registry(Section::nacos(&nacos));
    match anonymous.register(&instance("vault", 7107)).await {
        Err(RegistryError::Rejected(e)) => assert!(e.contains("403"), "{e}"),
        Err(e) => panic!("rejected expected, got {e:?}"),
        Ok(_) => panic!("no credentials must be refused"),
    }
    match nacos_registry(with("wrong-password")).watch("vault").await {
        Err(RegistryError::Rejected(e)) => assert!(e.contains("logging in"), "{e}"),
        Err(e) => panic!("rejected expected, got {e:?}"),
        Ok(_) => panic!("a wrong password must be refused"),
    }

    let shown = [
        a.get("/v1/self").await.1,
        a.get("/metrics").await.1,
        b.get("/v1/services").await.1,
        logs(),
    ];
    for text in &shown {
        assert!(!text.contains(PASSWORD), "the password leaked");
        assert!(!text.contains("accessToken="), "a token leaked");
    }
    a.stop().await;
    b.stop().await;
}

/// `[[registry]]` failover: a dead Nacos first, a live one second.
#[tokio::test]
async fn a_registry_list_fails_over_to_a_second_nacos() {
    capture_logs();
    let mut dead = Nacos::start().await;
    let live = Nacos::start().await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::nacos(&live).service(Section::game_service("arena", backend.addr)),
    )
    .await;
    eventually("the instance in the live Nacos", DEADLINE, || async {
        live.instance("arena", "127.0.0.1", backend.addr.port())
            .await
            .is_some()
    })
    .await;
    dead.kill();
    let b = TestAgent::start(
        &AgentToml::new(Section::nacos(&dead).set("name", "first"))
            .registry(Section::nacos(&live).set("name", "second"))
            .upstream(Section::fast_upstream("arena")),
    )
    .await;
    eventually("B to route to A through the second", DEADLINE, || async {
        b.routable().await == ["arena-1"]
    })
    .await;
    let services: Value = b.json("/v1/services").await;
    assert_eq!(
        services["services"][0]["served_from"],
        json!(["second"]),
        "{services}"
    );
    a.stop().await;
    b.stop().await;
}

/// With a poll interval of a minute, only a push can explain B seeing A
/// come and go within the deadline (20 s): rnacos pushes a
/// `NotifySubscriberRequest` over B's gRPC stream, B acknowledges it and
/// lists at once. C, configured the same but with push off, has not seen
/// A when B has.
#[tokio::test]
async fn a_change_arrives_by_push_well_before_the_poll() {
    capture_logs();
    let nacos = Nacos::start().await;
    let poll = Duration::from_secs(60);
    assert!(
        DEADLINE < poll,
        "the waits below must be shorter than a poll"
    );
    let b = TestAgent::start(
        &AgentToml::new(Section::nacos(&nacos).set("poll_interval", "60s"))
            .upstream(Section::fast_upstream("lobby")),
    )
    .await;
    // C: the same, push off. It lists once at start and not again within
    // the test: the control that B's prompt updates are pushes.
    let c = TestAgent::start(
        &AgentToml::new(
            Section::nacos(&nacos)
                .set("poll_interval", "60s")
                .set("push", false),
        )
        .upstream(Section::fast_upstream("lobby")),
    )
    .await;
    eventually("B's push subscription up", DEADLINE, || async {
        push_metric(&b, PUSH_UP, &nacos, None).await == Some(1.0)
    })
    .await;
    eventually("C's watch up", DEADLINE, || async {
        c.json("/v1/services").await["services"][0]["watch_up"] == true
    })
    .await;
    assert!(b.routable().await.is_empty());

    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::nacos(&nacos).service(Section::game_service("lobby", backend.addr)),
    )
    .await;
    eventually("A in Nacos", DEADLINE, || async {
        nacos
            .instance("lobby", "127.0.0.1", backend.addr.port())
            .await
            .is_some()
    })
    .await;
    let registered = Instant::now();
    eventually("B to route to A, by push", DEADLINE, || async {
        b.routable().await == ["lobby-1"]
    })
    .await;
    let joined = registered.elapsed();
    assert!(
        c.routable().await.is_empty(),
        "C, polling only, has not listed again"
    );
    let (greeting, _, _) = session(b.listen(), b"hi").await.expect("session");
    assert_eq!(greeting, "A");
    let pushes = push_metric(&b, PUSHES, &nacos, Some("lobby")).await;
    assert!(
        pushes.is_some_and(|n| n >= 1.0),
        "pushes counted: {pushes:?}"
    );
    let acks = push_metric(&b, PUSH_ACKS, &nacos, None).await;
    assert!(
        acks.is_some_and(|n| n >= 1.0),
        "pushes acknowledged: {acks:?}"
    );

    // A deregisters on stop: B drops it, again long before a poll.
    a.stop().await;
    let left = Instant::now();
    eventually("B to drop A, by push", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    let dropped = left.elapsed();
    println!("by push (poll every {poll:?}): joined after {joined:?}, left after {dropped:?}");
    assert_eq!(push_metric(&b, PUSH_UP, &nacos, None).await, Some(1.0));
    b.stop().await;
    c.stop().await;
}

/// `push = false`: no gRPC connection, discovery polls as before.
#[tokio::test]
async fn with_push_off_the_poll_still_discovers() {
    capture_logs();
    let nacos = Nacos::start().await;
    let b = TestAgent::start(
        &AgentToml::new(
            Section::nacos(&nacos)
                .set("push", false)
                .set("poll_interval", "2s"),
        )
        .upstream(Section::fast_upstream("lobby")),
    )
    .await;
    let backend = Backend::start("A").await;
    let a = TestAgent::start(
        &AgentToml::nacos(&nacos).service(Section::game_service("lobby", backend.addr)),
    )
    .await;
    eventually("A in Nacos", DEADLINE, || async {
        nacos
            .instance("lobby", "127.0.0.1", backend.addr.port())
            .await
            .is_some()
    })
    .await;
    let registered = Instant::now();
    eventually("B to route to A, by poll", DEADLINE, || async {
        b.routable().await == ["lobby-1"]
    })
    .await;
    let joined = registered.elapsed();
    a.stop().await;
    let left = Instant::now();
    eventually("B to drop A, by poll", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    println!(
        "by poll (every 2s): joined after {joined:?}, left after {:?}",
        left.elapsed()
    );
    for name in [PUSH_UP, PUSHES, PUSH_ACKS] {
        assert_eq!(push_metric(&b, name, &nacos, None).await, None, "{name}");
    }
    b.stop().await;
}

/// A gRPC port where no Nacos listens: the subscription fails (logged,
/// `push_up` 0) and discovery goes on by poll.
#[tokio::test]
async fn a_push_that_cannot_connect_leaves_the_poll_working() {
    capture_logs();
    let nacos = Nacos::start().await;
    let closed = support::free_port();
    let b = TestAgent::start(
        &AgentToml::new(Section::nacos(&nacos).set("grpc_port", i64::from(closed)))
            .upstream(Section::fast_upstream("lobby")),
    )
    .await;
    nacos
        .register("lobby", "127.0.0.1", 7108, r#"{"zone":"b"}"#)
        .await;
    eventually("B to route by poll", DEADLINE, || async {
        b.routable().await == ["127.0.0.1#7108"]
    })
    .await;
    let target = format!("127.0.0.1:{closed}");
    eventually("the failed subscription logged", DEADLINE, || async {
        logs()
            .lines()
            .any(|line| line.contains("Nacos push subscription failed") && line.contains(&target))
    })
    .await;
    assert_eq!(push_metric(&b, PUSH_UP, &nacos, None).await, Some(0.0));
    // Polling still: a change arrives at the next list.
    nacos
        .register("lobby", "127.0.0.1", 7111, r#"{"zone":"b"}"#)
        .await;
    eventually("B to route to the second by poll", DEADLINE, || async {
        b.routable().await.len() == 2
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn a_reported_load_round_trips_to_a_peer_and_steers_its_picks() {
    capture_logs();
    let nacos = Nacos::start().await;
    support::load::round_trip(|| Section::nacos(&nacos)).await;
}
