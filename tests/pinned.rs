//! Issue 15, points 3-5 end to end on the embedded registry with real
//! sockets: pinned routing (`ROUTE @id` on TCP, `X-Squire-Instance` on
//! HTTP) reaching exactly the named instance or refused with its reason;
//! preferred instances (zones) that keep traffic in the zone and spill
//! over below `prefer_min_share`; slow start giving a joining instance
//! less than its share at first.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use support::config::{AgentToml, Section};
use support::{eventually, greeting, http_call, Backend, HttpBackend, TestAgent, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes an instance record into the embedded registry under `dir`, as
/// another squire would, with a status and a zone.
fn announce(dir: &Path, service: &str, id: &str, addr: SocketAddr, status: &str, zone: &str) {
    let service_dir = dir.join(service);
    std::fs::create_dir_all(&service_dir).expect("mkdir");
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        + 600_000;
    let record = serde_json::json!({
        "expires_at_ms": expires,
        "instance": {
            "name": service, "id": id, "host": addr.ip().to_string(), "port": addr.port(),
            "status": status, "metadata": {"zone": zone},
        },
    });
    // Written whole, then renamed: the agent never reads half a record.
    let tmp = service_dir.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, record.to_string()).expect("write record");
    std::fs::rename(&tmp, service_dir.join(format!("{id}.json"))).expect("rename record");
}

/// The sum of the `name` series whose labels contain every one of `labels`.
async fn metric(agent: &TestAgent, name: &str, labels: &[&str]) -> f64 {
    let (_, body) = agent.get("/metrics").await;
    body.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends `ROUTE {target}\n` and returns the backend's greeting, or `""`
/// when squire closed the connection.
async fn routed_greeting(addr: SocketAddr, target: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("ROUTE {target}\n").as_bytes())
        .await
        .expect("send");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await.unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// An agent proxying `service` through `upstream`, once it routes to `n`.
async fn proxy(dir: &Path, upstream: Section, n: usize) -> TestAgent {
    let agent = TestAgent::start(&AgentToml::local(dir).upstream(upstream)).await;
    eventually(
        "the proxy to see every routable instance",
        DEADLINE,
        || async { agent.routable().await.len() == n },
    )
    .await;
    agent
}

#[tokio::test]
async fn route_at_id_reaches_exactly_that_instance_or_is_closed_with_the_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let mut backends = Vec::new();
    for i in 0..3 {
        let backend = Backend::start(&format!("room-{i}")).await;
        announce(
            dir.path(),
            "room",
            &format!("room-{i}"),
            backend.addr,
            "healthy",
            "a",
        );
        backends.push(backend);
    }
    let sick = Backend::start("room-sick").await;
    announce(dir.path(), "room", "room-sick", sick.addr, "unhealthy", "a");
    let upstream = Section::fast_upstream("room")
        .set("strategy", "consistent_hash")
        .set("hash_key", "preamble");
    let agent = proxy(dir.path(), upstream, 3).await;
    let listen = agent.listens[0];
    for round in 0..5 {
        for i in 0..3 {
            let id = format!("room-{i}");
            assert_eq!(
                routed_greeting(listen, &format!("@{id}")).await,
                id,
                "round {round}"
            );
        }
    }
    assert_eq!(
        backends[1]
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        5
    );
    // A plain key still hashes.
    assert!(routed_greeting(listen, "some-room")
        .await
        .starts_with("room-"));

    assert_eq!(
        routed_greeting(listen, "@room-9").await,
        "",
        "unknown: closed"
    );
    assert_eq!(
        routed_greeting(listen, "@room-sick").await,
        "",
        "unhealthy: closed"
    );
    assert_eq!(
        sick.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let failed = "squire_tcp_connections_failed_total";
    assert_eq!(
        metric(&agent, failed, &["reason=\"pinned_unknown\""]).await,
        1.0
    );
    assert_eq!(
        metric(&agent, failed, &["reason=\"pinned_unavailable\""]).await,
        1.0
    );
}

#[tokio::test]
async fn the_instance_header_pins_an_http_request_and_is_not_forwarded() {
    let dir = tempfile::tempdir().expect("dir");
    let web: Vec<HttpBackend> = futures_util::future::join_all(
        (0..2).map(|i| HttpBackend::start(Box::leak(format!("web-{i}").into_boxed_str()))),
    )
    .await;
    for (i, backend) in web.iter().enumerate() {
        announce(
            dir.path(),
            "web",
            &format!("web-{i}"),
            backend.addr,
            "healthy",
            "a",
        );
    }
    let sick = HttpBackend::start("web-sick").await;
    announce(dir.path(), "web", "web-sick", sick.addr, "unhealthy", "a");
    let agent = proxy(dir.path(), Section::http_upstream("web"), 2).await;
    let listen = agent.listens[0];
    for _ in 0..6 {
        let answer = http_call(listen, "GET", "/play", &[("X-Squire-Instance", "web-1")]).await;
        assert_eq!((answer.status, answer.body.as_str()), (200, "web-1"));
    }
    // The header stays with squire.
    let answer = http_call(listen, "GET", "/health", &[("X-Squire-Instance", "web-0")]).await;
    assert_eq!(answer.status, 200);
    let seen = web[0].last_health_headers.lock().expect("headers").clone();
    assert!(!seen.is_empty(), "web-0 got the request");
    assert!(
        seen.iter().all(|(name, _)| name != "x-squire-instance"),
        "{seen:?}"
    );

    let unknown = http_call(listen, "GET", "/play", &[("X-Squire-Instance", "web-9")]).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(
        unknown
            .head
            .to_lowercase()
            .contains("x-squire-reason: pinned_unknown"),
        "{unknown:?}"
    );
    let down = http_call(listen, "GET", "/play", &[("X-Squire-Instance", "web-sick")]).await;
    assert_eq!(down.status, 503, "{down:?}");
    assert!(
        down.head
            .to_lowercase()
            .contains("x-squire-reason: pinned_unavailable"),
        "{down:?}"
    );
    let errors = "squire_http_errors_total";
    assert_eq!(
        metric(&agent, errors, &["kind=\"pinned_unknown\""]).await,
        1.0
    );
    assert_eq!(
        metric(&agent, errors, &["kind=\"pinned_unavailable\""]).await,
        1.0
    );
}

#[tokio::test]
async fn traffic_stays_in_the_preferred_zone_and_spills_below_min_share() {
    let dir = tempfile::tempdir().expect("dir");
    let zone_a: Vec<Backend> =
        futures_util::future::join_all((0..3).map(|i| Backend::start(["a-0", "a-1", "a-2"][i])))
            .await;
    for (i, backend) in zone_a.iter().enumerate() {
        announce(
            dir.path(),
            "game",
            &format!("a-{i}"),
            backend.addr,
            "healthy",
            "a",
        );
    }
    let zone_b = Backend::start("b-0").await;
    announce(dir.path(), "game", "b-0", zone_b.addr, "healthy", "b");
    let zone = toml::Table::from_iter([("zone".to_owned(), "a".into())]);
    let upstream = Section::fast_upstream("game").set("prefer", zone);
    let agent = proxy(dir.path(), upstream, 4).await;
    let listen = agent.listens[0];
    for _ in 0..20 {
        let who = greeting(listen).await.expect("greeting");
        assert!(who.starts_with("a-"), "{who} is outside zone a");
    }
    assert_eq!(metric(&agent, "squire_upstream_spillover", &[]).await, 0.0);

    // 1 of 3 in zone a healthy is below 0.5: spill over.
    announce(dir.path(), "game", "a-1", zone_a[1].addr, "unhealthy", "a");
    announce(dir.path(), "game", "a-2", zone_a[2].addr, "unhealthy", "a");
    eventually("the proxy to see zone a mostly down", DEADLINE, || async {
        agent.routable().await.len() == 2
    })
    .await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        seen.insert(greeting(listen).await.expect("greeting"));
    }
    assert_eq!(seen, ["a-0".to_owned(), "b-0".to_owned()].into());
    assert_eq!(metric(&agent, "squire_upstream_spillover", &[]).await, 1.0);
}

#[tokio::test]
async fn a_joining_instance_gets_less_than_its_share_at_first() {
    let dir = tempfile::tempdir().expect("dir");
    let mut backends = Vec::new();
    for i in 0..4 {
        let backend = Backend::start(&format!("s-{i}")).await;
        announce(
            dir.path(),
            "slow",
            &format!("s-{i}"),
            backend.addr,
            "healthy",
            "a",
        );
        backends.push(backend);
    }
    // A long ramp, so the few seconds the test takes stay near its start.
    let upstream = Section::fast_upstream("slow")
        .set("slow_start", "10m")
        .set("slow_start_min", 0.1);
    let agent = proxy(dir.path(), upstream, 4).await;
    let listen = agent.listens[0];
    let newcomer = Backend::start("s-new").await;
    announce(dir.path(), "slow", "s-new", newcomer.addr, "healthy", "a");
    eventually("the proxy to see the newcomer", DEADLINE, || async {
        agent.routable().await.len() == 5
    })
    .await;
    let mut hits = 0;
    let picks = 200;
    for _ in 0..picks {
        hits += usize::from(greeting(listen).await.expect("greeting") == "s-new");
    }
    // Its full share is 1/5 (40 of 200); at 10% of it, about 4.
    assert!(
        hits < 15,
        "the newcomer took {hits} of {picks}: no slow start"
    );
}
