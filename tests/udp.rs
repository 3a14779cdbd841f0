//! `protocol = "udp"` listeners and the `kind = "udp"` health check, with
//! real sockets: UDP echo backends that tag each reply with their name, an
//! in-process agent on the embedded registry, clients on their own
//! ephemeral ports.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::config::{AgentToml, Section};
use support::{announce_local, eventually, TestAgent, DEADLINE};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// How long a client waits for one reply before it counts as lost.
const REPLY_WAIT: Duration = Duration::from_millis(300);

/// A UDP backend: answers every datagram with `{name}:{datagram}`.
struct UdpBackend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl UdpBackend {
    async fn start(name: &str) -> UdpBackend {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = socket.local_addr().expect("backend addr");
        let tag = format!("{name}:").into_bytes();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let mut reply = tag.clone();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        UdpBackend { addr, task }
    }

    /// Closes the backend's socket: its port answers ICMP port unreachable.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A client on its own ephemeral port, connected to the listener.
async fn client(listen: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    socket.connect(listen).await.expect("connect client");
    socket
}

/// Sends `payload` and returns the reply, or `None` if none came within
/// [`REPLY_WAIT`].
async fn ask(socket: &UdpSocket, payload: &str) -> Option<String> {
    socket.send(payload.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(REPLY_WAIT, socket.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

/// The backend name a reply came from.
fn backend_of(reply: &str) -> &str {
    reply.split(':').next().unwrap_or_default()
}

/// Asks until a reply comes (the agent discovers its instances first).
async fn first_reply(socket: &UdpSocket, payload: &str) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(reply) = ask(socket, payload).await {
            return reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reply to {payload:?} within {DEADLINE:?}"
        );
    }
}

fn udp_upstream(service: &str) -> Section {
    Section::upstream(service).set("protocol", "udp")
}

async fn agent_with(dir: &std::path::Path, upstream: Section) -> TestAgent {
    TestAgent::start(&AgentToml::local(dir).upstream(upstream)).await
}

#[tokio::test]
async fn fifty_clients_each_get_only_their_own_replies() {
    let dir = tempfile::tempdir().expect("dir");
    let a = UdpBackend::start("a").await;
    let b = UdpBackend::start("b").await;
    announce_local(dir.path(), "many", "many-a", a.addr);
    announce_local(dir.path(), "many", "many-b", b.addr);
    let agent = agent_with(dir.path(), udp_upstream("many")).await;
    let listen = agent.listen();
    let probe = client(listen).await;
    first_reply(&probe, "hello").await;
    eventually("both instances discovered", DEADLINE, || async {
        agent.routable().await.len() == 2
    })
    .await;

    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(client(listen).await);
    }
    // Every client sends before any reads: the replies of all sessions
    // are in flight at once.
    for round in 0..3 {
        for (i, socket) in clients.iter().enumerate() {
            socket
                .send(format!("client-{i}-round-{round}").as_bytes())
                .await
                .expect("send");
        }
        let mut buf = vec![0u8; 1024];
        for (i, socket) in clients.iter().enumerate() {
            let n = tokio::time::timeout(DEADLINE, socket.recv(&mut buf))
                .await
                .expect("a reply in time")
                .expect("recv");
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            let (backend, body) = reply.split_once(':').expect("tagged reply");
            assert!(backend == "a" || backend == "b", "{reply}");
            assert_eq!(body, format!("client-{i}-round-{round}"));
        }
    }
    let created = agent
        .metric("squire_udp_sessions_created_total{upstream=\"many\"")
        .await;
    assert_eq!(created, Some(51.0), "one session per client address");
    assert_eq!(
        agent
            .metric("squire_udp_sessions_active{upstream=\"many\"")
            .await,
        Some(51.0)
    );
    let datagrams = agent
        .metric("squire_udp_sent_datagrams_total{upstream=\"many\"")
        .await
        .expect("datagrams out");
    assert!(datagrams >= 150.0, "{datagrams}");
    agent.stop().await;
}

#[tokio::test]
async fn an_idle_session_expires_and_the_next_datagram_opens_a_new_one() {
    let dir = tempfile::tempdir().expect("dir");
    let a = UdpBackend::start("a").await;
    announce_local(dir.path(), "idle", "idle-a", a.addr);
    let agent = agent_with(
        dir.path(),
        udp_upstream("idle").set("idle_timeout", "300ms"),
    )
    .await;
    let socket = client(agent.listen()).await;
    assert_eq!(first_reply(&socket, "one").await, "a:one");
    eventually("the session expires", DEADLINE, || async {
        agent
            .metric("squire_udp_sessions_expired_total{upstream=\"idle\"")
            .await
            .is_some_and(|n| n >= 1.0)
            && agent
                .metric("squire_udp_sessions_active{upstream=\"idle\"")
                .await
                == Some(0.0)
    })
    .await;
    let created = agent
        .metric("squire_udp_sessions_created_total{upstream=\"idle\"")
        .await
        .expect("created");
    assert_eq!(first_reply(&socket, "two").await, "a:two");
    assert_eq!(
        agent
            .metric("squire_udp_sessions_created_total{upstream=\"idle\"")
            .await,
        Some(created + 1.0)
    );
    agent.stop().await;
}

#[tokio::test]
async fn max_sessions_refuses_a_new_client_and_counts_it() {
    let dir = tempfile::tempdir().expect("dir");
    let a = UdpBackend::start("a").await;
    announce_local(dir.path(), "full", "full-a", a.addr);
    let agent = agent_with(dir.path(), udp_upstream("full").set("max_sessions", 1)).await;
    let first = client(agent.listen()).await;
    assert_eq!(first_reply(&first, "in").await, "a:in");
    let second = client(agent.listen()).await;
    assert_eq!(ask(&second, "out").await, None);
    assert_eq!(
        agent
            .metric("squire_udp_sessions_rejected_total{upstream=\"full\"")
            .await,
        Some(1.0)
    );
    // The session that holds the slot still works.
    assert_eq!(ask(&first, "still").await.as_deref(), Some("a:still"));
    agent.stop().await;
}

/// Three instances under consistent_hash on a 4-byte token.
async fn token_agent(
    dir: &std::path::Path,
    service: &str,
    strip: bool,
) -> (TestAgent, Vec<UdpBackend>) {
    let mut backends = Vec::new();
    for name in ["a", "b", "c"] {
        let backend = UdpBackend::start(name).await;
        announce_local(dir, service, &format!("{service}-{name}"), backend.addr);
        backends.push(backend);
    }
    let mut upstream = udp_upstream(service)
        .set("strategy", "consistent_hash")
        .set("hash_key", "prefix:4");
    if strip {
        upstream = upstream.set("strip", true);
    }
    let agent = agent_with(dir, upstream).await;
    eventually("three instances discovered", DEADLINE, || async {
        agent.routable().await.len() == 3
    })
    .await;
    (agent, backends)
}

#[tokio::test]
async fn a_token_keeps_its_instance_across_a_new_client_address() {
    let dir = tempfile::tempdir().expect("dir");
    let (agent, _backends) = token_agent(dir.path(), "match", false).await;
    let mut seen = std::collections::BTreeSet::new();
    for token in [
        "m001", "m002", "m003", "m004", "m005", "m006", "m007", "m008",
    ] {
        let before = client(agent.listen()).await;
        let first = first_reply(&before, &format!("{token}hello")).await;
        // Not stripped: the instance got the token.
        assert!(first.ends_with(&format!(":{token}hello")), "{first}");
        // The client's address changes (a new socket, a new port); the
        // token is the same.
        drop(before);
        let after = client(agent.listen()).await;
        let again = first_reply(&after, &format!("{token}again")).await;
        assert_eq!(backend_of(&again), backend_of(&first), "token {token}");
        seen.insert(backend_of(&first).to_owned());
    }
    assert!(seen.len() >= 2, "the tokens all hashed to {seen:?}");
    agent.stop().await;
}

#[tokio::test]
async fn strip_removes_the_token_and_a_short_datagram_is_dropped() {
    let dir = tempfile::tempdir().expect("dir");
    let (agent, _backends) = token_agent(dir.path(), "strip", true).await;
    let socket = client(agent.listen()).await;
    let reply = first_reply(&socket, "tok1payload").await;
    assert_eq!(reply.split_once(':').map(|(_, body)| body), Some("payload"));
    let reply = ask(&socket, "tok1more").await.expect("a reply");
    assert_eq!(reply.split_once(':').map(|(_, body)| body), Some("more"));
    let short = client(agent.listen()).await;
    assert_eq!(ask(&short, "ab").await, None);
    let (_, scrape) = agent.get("/metrics").await;
    assert!(
        scrape.lines().any(|l| l
            .starts_with("squire_udp_datagrams_dropped_total{upstream=\"strip\"")
            && l.contains("reason=\"short\"")
            && l.ends_with(" 1")),
        "{scrape}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_dead_instance_is_ejected_and_its_session_moves_on_the_next_datagram() {
    let dir = tempfile::tempdir().expect("dir");
    let a = UdpBackend::start("a").await;
    let b = UdpBackend::start("b").await;
    announce_local(dir.path(), "dead", "dead-a", a.addr);
    announce_local(dir.path(), "dead", "dead-b", b.addr);
    let agent = agent_with(
        dir.path(),
        udp_upstream("dead")
            .raw("[upstream.ejection]\nconsecutive_failures = 1\nmax_share = 0.5\n"),
    )
    .await;
    eventually("both instances discovered", DEADLINE, || async {
        agent.routable().await.len() == 2
    })
    .await;
    let socket = client(agent.listen()).await;
    let first = first_reply(&socket, "before").await;
    let (dead, alive) = if backend_of(&first) == "a" {
        (a, b)
    } else {
        (b, a)
    };
    let alive_name = if backend_of(&first) == "a" { "b" } else { "a" };
    dead.kill().await;
    // The first datagram after the kill is lost (the ICMP refusal ends the
    // session); a later one from the same client address reaches the
    // other instance.
    let moved = first_reply(&socket, "after").await;
    assert_eq!(backend_of(&moved), alive_name);
    assert_eq!(
        agent
            .metric("squire_upstream_ejections_total{upstream=\"dead\"")
            .await,
        Some(1.0)
    );
    // Ejected: every new client goes to the live one at once.
    for i in 0..10 {
        let other = client(agent.listen()).await;
        let reply = ask(&other, &format!("new-{i}")).await;
        assert_eq!(reply.as_deref().map(backend_of), Some(alive_name));
    }
    drop(alive);
    agent.stop().await;
}

#[tokio::test]
async fn shutdown_ends_the_sessions() {
    let dir = tempfile::tempdir().expect("dir");
    let a = UdpBackend::start("a").await;
    announce_local(dir.path(), "stop", "stop-a", a.addr);
    let agent = agent_with(dir.path(), udp_upstream("stop")).await;
    let socket = client(agent.listen()).await;
    first_reply(&socket, "x").await;
    // A session open with the default 60s idle_timeout does not hold the
    // agent's stop (within the test's DEADLINE).
    agent.stop().await;
    assert_eq!(ask(&socket, "gone").await, None);
}

mod check {
    use super::*;
    use squire::config::ProbeConfig;
    use squire::health::{Outcome, Probe};

    async fn probe(address: SocketAddr, expect: &str) -> Outcome {
        let config = ProbeConfig::Udp {
            address: address.to_string(),
            send: b"ping".to_vec(),
            expect: Some(expect.as_bytes().to_vec()),
        };
        let probe = Probe::new(&config).expect("probe");
        probe.run(Duration::from_millis(300)).await.outcome
    }

    #[tokio::test]
    async fn a_reply_with_the_expected_prefix_passes() {
        let backend = UdpBackend::start("pong").await;
        assert_eq!(probe(backend.addr, "pong:ping").await, Outcome::Passing);
        assert_eq!(probe(backend.addr, "pong").await, Outcome::Passing);
    }

    #[tokio::test]
    async fn a_reply_with_another_prefix_fails() {
        let backend = UdpBackend::start("pong").await;
        assert_eq!(probe(backend.addr, "PONG").await, Outcome::Critical);
    }

    #[tokio::test]
    async fn no_reply_fails() {
        // Bound and silent: the datagram arrives, nothing answers.
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        assert_eq!(
            probe(silent.local_addr().expect("addr"), "pong").await,
            Outcome::Critical
        );
        // Closed: an ICMP port unreachable.
        let closed = silent.local_addr().expect("addr");
        drop(silent);
        assert_eq!(probe(closed, "pong").await, Outcome::Critical);
    }
}

#[tokio::test]
async fn a_reload_hands_the_socket_to_a_new_handler_and_a_removal_closes_it() {
    let dir = tempfile::tempdir().expect("dir");
    let registry = dir.path().join("registry");
    let a = UdpBackend::start("a").await;
    announce_local(&registry, "reload", "reload-a", a.addr);
    let path = dir.path().join("agent.toml");
    let base = AgentToml::local(&registry);
    let with = |idle: &str| {
        base.clone()
            .upstream(udp_upstream("reload").set("idle_timeout", idle))
            .to_string()
    };
    std::fs::write(&path, with("60s")).expect("write");
    let config = squire::Config::load(&path).expect("valid");
    let agent = squire::Agent::bind(config)
        .await
        .expect("binds")
        .reload_from(&path);
    let (admin, token) = (agent.admin_addr(), agent.admin_token());
    let listen = agent.listen_addrs()[0];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    let reload = || async {
        let (status, body) =
            support::http_with_token(admin, "POST", "/v1/reload", token.expose()).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("json")
    };

    let socket = client(listen).await;
    assert_eq!(first_reply(&socket, "before").await, "a:before");
    std::fs::write(&path, with("30s")).expect("write");
    let summary = reload().await;
    assert_eq!(
        summary["listeners"]["changed"].as_array().map(Vec::len),
        Some(1),
        "{summary}"
    );
    // The same address, served by the new handler.
    assert_eq!(first_reply(&socket, "after").await, "a:after");

    std::fs::write(&path, base.to_string()).expect("write");
    let summary = reload().await;
    assert_eq!(
        summary["listeners"]["removed"].as_array().map(Vec::len),
        Some(1),
        "{summary}"
    );
    eventually("the removed listener stops answering", DEADLINE, || async {
        ask(&socket, "gone").await.is_none()
    })
    .await;

    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("stops")
        .expect("no panic");
}
