//! Health checks end to end with a real etcd: what the registry shows, and
//! where a peer routes, as the local service's health changes.

mod support;

use std::time::Duration;

use tokio::time::Instant;

use etcd_client::{EventType, WatchOptions};
use support::config::{AgentToml, Section};
use support::{eventually, http_exchange, Etcd, HttpBackend, TestAgent, DEADLINE};
use tokio::net::TcpStream;

const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;
const RISE: u64 = 2;

/// Agent A's `[service]`: `name` (id `{name}-1`) on the HTTP backend.
fn service(name: &str, backend: &HttpBackend) -> Section {
    Section::service(name, backend.addr).set("id", format!("{name}-1"))
}

/// A's check: GET `/health` every 200 ms, rise 2, fall 2.
fn http_check() -> Section {
    Section::new()
        .set("kind", "http")
        .set("path", "/health")
        .set("interval", format!("{INTERVAL_MS}ms"))
        .set("timeout", "150ms")
        .set("rise", RISE as i64)
        .set("fall", FALL as i64)
}

/// Agent B proxies `service`, without retries.
fn proxying(etcd: &Etcd, prefix: &str, service: &str) -> AgentToml {
    let upstream = Section::upstream(service)
        .set("connect_timeout", "500ms")
        .set("retries", 0);
    AgentToml::etcd(etcd, prefix).upstream(upstream)
}

async fn registered_status(etcd: &Etcd, key: &str) -> Option<String> {
    let mut client = etcd.client().await;
    let response = client.get(key, None).await.ok()?;
    let kv = response.kvs().first()?;
    // As squire reads it: squire_status first (Knight sees "unhealthy"
    // for draining).
    let instance = squire::registry::Instance::from_json(kv.value()).ok()?;
    Some(instance.status.as_str().to_owned())
}

/// True if a new connection through `listen` reaches the backend.
async fn routes(listen: std::net::SocketAddr) -> bool {
    match TcpStream::connect(listen).await {
        Ok(mut stream) => http_exchange(&mut stream, "/").await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn failing_health_takes_the_instance_out_of_rotation_and_recovery_brings_it_back() {
    let etcd = Etcd::start().await;
    let backend = HttpBackend::start("game").await;
    let key = "/hc/game/game-1";
    let a = TestAgent::start(
        &AgentToml::etcd(&etcd, "/hc")
            .service(service("game", &backend))
            .check(http_check()),
    )
    .await;
    let b = TestAgent::start(&proxying(&etcd, "/hc", "game")).await;

    eventually("healthy after rise", DEADLINE, || async {
        registered_status(&etcd, key).await.as_deref() == Some("healthy")
    })
    .await;
    eventually("B routes to A", DEADLINE, || async {
        b.routable().await == ["game-1"]
    })
    .await;
    assert!(routes(b.listen()).await);

    backend.set_health(503);
    let failed = Instant::now();
    eventually("the registry to show unhealthy", DEADLINE, || async {
        registered_status(&etcd, key).await.as_deref() == Some("unhealthy")
    })
    .await;
    let to_registry = failed.elapsed();
    eventually("B to stop routing", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    let to_peer = failed.elapsed();
    assert!(
        !routes(b.listen()).await,
        "no new connection reaches an unhealthy instance"
    );
    // interval × fall (each interval jittered by up to 10%), one probe's
    // time, and margin for a loaded machine.
    let bound = Duration::from_millis(INTERVAL_MS * FALL * 11 / 10)
        + Duration::from_millis(150)
        + Duration::from_secs(1);
    assert!(
        to_registry <= bound,
        "took {to_registry:?} to reach the registry, bound {bound:?}"
    );
    eprintln!("measured: failure -> registry unhealthy {to_registry:?}, -> peer stops routing {to_peer:?}");

    let this = a.json("/v1/self").await;
    assert_eq!(this["status"], "unhealthy");
    let check = &this["checks"][0];
    assert_eq!(check["status"], "critical");
    assert_eq!(check["streak_up"], false);
    assert!(
        check["streak"].as_u64().is_some_and(|s| s >= FALL),
        "{check}"
    );
    assert!(
        check["last_output"]
            .as_str()
            .is_some_and(|o| o.starts_with("HTTP 503")),
        "{check}"
    );
    assert!(check["since"].is_string());

    backend.set_health(200);
    let recovered = Instant::now();
    eventually("healthy again after rise", DEADLINE, || async {
        registered_status(&etcd, key).await.as_deref() == Some("healthy")
    })
    .await;
    eventually("B routes again", DEADLINE, || async {
        b.routable().await == ["game-1"]
    })
    .await;
    eprintln!(
        "measured: recovery -> peer routes again {:?}",
        recovered.elapsed()
    );
    assert!(routes(b.listen()).await);
    let services = b.json("/v1/services").await;
    assert_eq!(services["summary"]["total"], 1);
    assert_eq!(services["summary"]["health_rate"], 1.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn maintenance_stops_new_connections_while_open_ones_keep_flowing() {
    let etcd = Etcd::start().await;
    let backend = HttpBackend::start("lobby").await;
    let key = "/mt/lobby/lobby-1";
    let a = TestAgent::start(
        &AgentToml::etcd(&etcd, "/mt")
            .service(service("lobby", &backend))
            .check(http_check()),
    )
    .await;
    let b = TestAgent::start(&proxying(&etcd, "/mt", "lobby")).await;
    eventually("B routes to A", DEADLINE, || async {
        b.routable().await == ["lobby-1"]
    })
    .await;

    let mut open = TcpStream::connect(b.listen())
        .await
        .expect("connect through B");
    assert_eq!(
        http_exchange(&mut open, "/").await.expect("first request"),
        "lobby"
    );

    let answer = squire::admin::set_maintenance(a.admin, Ok(&a.token), true, Some("patch 1.2"))
        .await
        .expect("maintenance on");
    assert!(answer.contains("patch 1.2"), "{answer}");
    eventually("the registry to show draining", DEADLINE, || async {
        registered_status(&etcd, key).await.as_deref() == Some("draining")
    })
    .await;
    eventually("B to stop routing", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    assert!(
        !routes(b.listen()).await,
        "nothing new goes to a draining instance"
    );
    for _ in 0..3 {
        assert_eq!(
            http_exchange(&mut open, "/")
                .await
                .expect("the open connection flows"),
            "lobby"
        );
    }
    let failed = b
        .metric(&format!(
            "squire_tcp_connections_failed_total{{upstream=\"lobby\",listen=\"{}\",reason=\"no_healthy_endpoint\"}}",
            b.listen()
        ))
        .await;
    assert_eq!(failed, Some(1.0), "B closed the new connection itself");
    let this = a.json("/v1/self").await;
    assert_eq!(this["maintenance"]["enabled"], true);
    assert_eq!(this["maintenance"]["reason"], "patch 1.2");

    squire::admin::set_maintenance(a.admin, Ok(&a.token), false, None)
        .await
        .expect("maintenance off");
    eventually("healthy again", DEADLINE, || async {
        registered_status(&etcd, key).await.as_deref() == Some("healthy")
    })
    .await;
    eventually("B routes again", DEADLINE, || async {
        b.routable().await == ["lobby-1"]
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_new_instance_starts_unknown_and_a_flapping_one_cannot_flood_the_registry() {
    let etcd = Etcd::start().await;
    let backend = HttpBackend::start("chat").await;
    let mut client = etcd.client().await;
    let mut watch = client
        .watch("/flap/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    let check = http_check()
        .set("interval", "50ms")
        .set("timeout", "40ms")
        .set("rise", 1)
        .set("fall", 1);
    let config = AgentToml::etcd(&etcd, "/flap")
        .service(service("chat", &backend))
        .check(check);
    let a = TestAgent::start(&config).await;

    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        let response = tokio::time::timeout(DEADLINE, watch.message())
            .await
            .expect("an event in time")
            .expect("watch ok")
            .expect("stream open");
        for event in response.events() {
            if event.event_type() == EventType::Put {
                let value: serde_json::Value =
                    serde_json::from_slice(event.kv().expect("kv").value()).expect("json");
                statuses.push(value["status"].as_str().expect("status").to_owned());
            }
        }
    }
    assert_eq!(
        statuses,
        ["unknown", "healthy"],
        "registered as unknown, healthy only after the check passed"
    );

    // Flap for 3 s: every probe (every ~50 ms) sees the other answer, so
    // without a limit the status would change some 60 times.
    let flapping = Instant::now();
    let mut writes = 0;
    let mut flips = 0;
    while flapping.elapsed() < Duration::from_secs(3) {
        flips += 1;
        backend.set_health(if flips % 2 == 0 { 200 } else { 503 });
        if let Ok(Some(Ok(Some(response)))) =
            tokio::time::timeout(Duration::from_millis(60), async {
                Some(watch.message().await)
            })
            .await
        {
            writes += response
                .events()
                .iter()
                .filter(|e| e.event_type() == EventType::Put)
                .count();
        }
    }
    backend.set_health(200);
    eprintln!("measured: {flips} flips in 3 s -> {writes} status writes");
    // A burst of 3, then one a second: at most 3 + 3 in 3 s (+1 for timing).
    assert!(
        writes <= 7,
        "{writes} writes in 3 s: the rate limit did not hold"
    );
    assert!(
        writes >= 2,
        "status changes still reach the registry ({writes})"
    );
    eventually("the latest verdict to win", DEADLINE, || async {
        registered_status(&etcd, "/flap/chat/chat-1")
            .await
            .as_deref()
            == Some("healthy")
    })
    .await;
    let deferred = a
        .metric("squire_status_writes_deferred_total{registry=\"etcd\",kind=\"etcd\"}")
        .await;
    assert!(
        deferred.is_some_and(|d| d >= 1.0),
        "deferred writes are counted: {deferred:?}"
    );
    a.stop().await;
}

#[tokio::test]
async fn an_instance_unhealthy_past_the_limit_is_deregistered_until_it_recovers() {
    let etcd = Etcd::start().await;
    let backend = HttpBackend::start("match").await;
    let key = "/dca/match/match-1";
    let a = TestAgent::start(
        &AgentToml::etcd(&etcd, "/dca")
            .service(service("match", &backend).set("deregister_critical_after", "1s"))
            .check(http_check()),
    )
    .await;
    eventually("healthy", DEADLINE, || async {
        registered_status(&etcd, key).await.as_deref() == Some("healthy")
    })
    .await;

    backend.set_health(500);
    eventually("unhealthy", DEADLINE, || async {
        registered_status(&etcd, key).await.as_deref() == Some("unhealthy")
    })
    .await;
    let unhealthy = Instant::now();
    eventually("the key to be removed", DEADLINE, || async {
        registered_status(&etcd, key).await.is_none()
    })
    .await;
    assert!(
        unhealthy.elapsed() >= Duration::from_millis(700),
        "not before the limit: {:?}",
        unhealthy.elapsed()
    );
    let this = a.json("/v1/self").await;
    assert_eq!(this["registrations"][0]["deregistered_unhealthy"], true);
    assert_eq!(this["registrations"][0]["registered"], false);

    backend.set_health(200);
    eventually("registered again once healthy", DEADLINE, || async {
        registered_status(&etcd, key).await.as_deref() == Some("healthy")
    })
    .await;
    a.stop().await;
}
