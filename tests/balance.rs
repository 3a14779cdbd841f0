//! Load balancing end to end on the embedded registry: preamble affinity
//! across many connections, and a dead backend hidden from clients by
//! retries and ejection.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use support::config::{AgentToml, Section};
use support::{eventually, greeting, session, Backend, TestAgent, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `n` backends named `battle-0`.., each announced by its own agent.
async fn fleet(dir: &Path, n: usize) -> (Vec<Backend>, Vec<TestAgent>) {
    let mut backends = Vec::new();
    let mut agents = Vec::new();
    for i in 0..n {
        let backend = Backend::start(&format!("battle-{i}")).await;
        let service = Section::service("battle", backend.addr).set("id", format!("battle-{i}"));
        agents.push(TestAgent::start(&AgentToml::local(dir).service(service)).await);
        backends.push(backend);
    }
    (backends, agents)
}

/// An agent proxying `battle` through `upstream`, once it sees `n` instances.
async fn proxy(dir: &Path, upstream: Section, n: usize) -> TestAgent {
    let agent = TestAgent::start(&AgentToml::local(dir).upstream(upstream)).await;
    eventually("the proxy to see every backend", DEADLINE, || async {
        agent.routable().await.len() == n
    })
    .await;
    agent
}

/// One session that opens with `ROUTE {key}`: returns the greeting, and
/// checks the payload is echoed and the backend counted only the payload
/// (the ROUTE line was stripped before forwarding).
async fn routed_session(addr: SocketAddr, key: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("ROUTE {key}\nping").as_bytes())
        .await
        .expect("send");
    // The greeting line, then the 4 echoed bytes; then half-close.
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    let mut after_greeting = None;
    while after_greeting != Some(4) {
        let n = stream.read(&mut byte).await.expect("read");
        assert_eq!(n, 1, "closed early after {received:?}");
        received.push(byte[0]);
        after_greeting = match after_greeting {
            Some(k) => Some(k + 1),
            None if byte[0] == b'\n' => Some(0),
            None => None,
        };
    }
    stream.shutdown().await.expect("half-close");
    stream
        .read_to_end(&mut received)
        .await
        .expect("read the rest");
    let text = String::from_utf8_lossy(&received).into_owned();
    let (greeting, rest) = text.split_once('\n').expect("a greeting line");
    assert_eq!(rest, "pingbye 4\n", "echo and farewell for {key}");
    greeting.to_owned()
}

/// The value of `name` for the upstream listening on `listen`.
async fn metric(agent: &TestAgent, name: &str, listen: SocketAddr) -> f64 {
    let (_, body) = agent.get("/metrics").await;
    let label = format!("listen=\"{listen}\"");
    body.lines()
        .filter(|line| line.starts_with(name) && line.contains(&label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_route_preamble_sticks_to_one_backend_and_keys_spread() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_backends, announcers) = fleet(dir.path(), 3).await;
    let upstream = Section::upstream("battle")
        .set("strategy", "consistent_hash")
        .set("hash_key", "preamble")
        .set("preamble_timeout", "5s");
    let agent = proxy(dir.path(), upstream, 3).await;
    let listen = agent.listen();

    let first = routed_session(listen, "room-42").await;
    assert!(first.starts_with("battle-"), "{first}");
    for _ in 0..30 {
        assert_eq!(routed_session(listen, "room-42").await, first);
    }
    let mut spread = HashSet::new();
    for room in 0..30 {
        spread.insert(routed_session(listen, &format!("room-{room}")).await);
    }
    assert!(spread.len() >= 2, "30 rooms all on {spread:?}");

    // A client that does not open with a ROUTE line is closed, not routed.
    let mut stray = TcpStream::connect(listen).await.expect("connect");
    stray.write_all(b"hello there\n").await.expect("send");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stray.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}: {rest:?}");
    eventually("the bad preamble counted", DEADLINE, || async {
        metric(&agent, "squire_tcp_connections_failed_total", listen).await >= 1.0
    })
    .await;

    agent.stop().await;
    for announcer in announcers {
        announcer.stop().await;
    }
}

#[tokio::test]
async fn a_dead_backend_is_retried_around_then_ejected_without_client_failures() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (backends, announcers) = fleet(dir.path(), 3).await;
    let upstream = Section::upstream("battle")
        .set("strategy", "round_robin")
        .set("retries", 1)
        .set("connect_timeout", "2s");
    let agent = proxy(dir.path(), upstream, 3).await;
    let listen = agent.listen();
    for _ in 0..6 {
        assert!(greeting(listen)
            .await
            .expect("greeting")
            .starts_with("battle-"));
    }

    // battle-1's process dies; its registration stays (its agent lives on),
    // so only passive failure handling can route around it.
    let dead = &backends[1];
    dead.stop();
    eventually(
        "the dead backend to refuse connections",
        DEADLINE,
        || async { TcpStream::connect(dead.addr).await.is_err() },
    )
    .await;
    for i in 0..30 {
        let (greeting, echoed, farewell) = session(listen, b"ping")
            .await
            .unwrap_or_else(|e| panic!("session {i} failed: {e}"));
        assert!(
            greeting == "battle-0" || greeting == "battle-2",
            "session {i} reached {greeting:?}"
        );
        assert_eq!(
            (echoed.as_slice(), farewell.as_str()),
            (&b"ping"[..], "bye 4\n")
        );
    }
    assert!(metric(&agent, "squire_upstream_retries_total", listen).await >= 1.0);
    assert_eq!(
        metric(&agent, "squire_upstream_ejections_total", listen).await,
        1.0
    );
    assert_eq!(
        metric(&agent, "squire_upstream_ejected_endpoints", listen).await,
        1.0
    );
    let services = agent.json("/v1/services").await;
    let upstream = &services["upstreams"][0];
    assert_eq!(upstream["balancing"]["strategy"], "round_robin");
    assert_eq!(upstream["balancing"]["ejected_endpoints"], 1);
    let ejected: Vec<&str> = upstream["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter(|e| !e["ejected_for_ms"].is_null())
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(ejected, ["battle-1"]);

    agent.stop().await;
    for announcer in announcers {
        announcer.stop().await;
    }
}

/// Writes an instance of `battle` into the embedded registry directly (as
/// another tool would), with `status`, valid for a minute.
fn announce(dir: &Path, id: &str, addr: SocketAddr, status: &str) {
    let service = dir.join("battle");
    std::fs::create_dir_all(&service).expect("mkdir");
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        + 60_000;
    let record = format!(
        r#"{{"expires_at_ms":{expires},"instance":{{"name":"battle","id":"{id}","host":"127.0.0.1","port":{},"status":"{status}"}}}}"#,
        addr.port()
    );
    // Write, then rename: the registry's readers never see half a file.
    let tmp = service.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, record).expect("write record");
    std::fs::rename(&tmp, service.join(format!("{id}.json"))).expect("rename record");
}

#[tokio::test]
async fn panic_mode_routes_to_unhealthy_instances_and_off_fails_fast() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backends = [
        Backend::start("battle-ok").await,
        Backend::start("battle-sick-1").await,
        Backend::start("battle-sick-2").await,
    ];
    announce(dir.path(), "battle-ok", backends[0].addr, "healthy");
    announce(dir.path(), "battle-sick-1", backends[1].addr, "unhealthy");
    let calm = proxy(
        dir.path(),
        Section::upstream("battle").set("panic_threshold", 0.5),
        1,
    )
    .await;
    let strict = proxy(dir.path(), Section::upstream("battle"), 1).await;
    // 1 of 2 healthy is not below 0.5: only the healthy one.
    for _ in 0..6 {
        assert_eq!(
            greeting(calm.listen()).await.expect("greeting"),
            "battle-ok"
        );
    }
    assert_eq!(
        metric(&calm, "squire_upstream_panic_mode", calm.listen()).await,
        0.0
    );

    // 1 of 3: below the threshold, every instance takes connections.
    announce(dir.path(), "battle-sick-2", backends[2].addr, "critical");
    eventually("the third instance as standby", DEADLINE, || async {
        let services = calm.json("/v1/services").await;
        services["upstreams"][0]["balancing"]["standby"]
            .as_array()
            .is_some_and(|standby| standby.len() == 2)
    })
    .await;
    let mut reached = HashSet::new();
    for _ in 0..30 {
        reached.insert(greeting(calm.listen()).await.expect("greeting"));
    }
    assert_eq!(reached.len(), 3, "{reached:?}");
    assert_eq!(
        metric(&calm, "squire_upstream_panic_mode", calm.listen()).await,
        1.0
    );

    // Without a threshold nothing changes for the healthy one...
    assert_eq!(
        greeting(strict.listen()).await.expect("greeting"),
        "battle-ok"
    );
    // ...and with no healthy instance left, the client is closed at once.
    announce(dir.path(), "battle-ok", backends[0].addr, "unhealthy");
    eventually("no routable instance", DEADLINE, || async {
        strict.routable().await.is_empty()
    })
    .await;
    assert_eq!(
        greeting(strict.listen()).await.expect("closed, not reset"),
        ""
    );
    assert!(
        metric(
            &strict,
            "squire_tcp_connections_failed_total",
            strict.listen()
        )
        .await
            >= 1.0
    );

    calm.stop().await;
    strict.stop().await;
}
