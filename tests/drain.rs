//! Draining that long sessions survive: on shutdown open TCP sessions and
//! upgraded (WebSocket) connections keep flowing until `drain_timeout`,
//! then are closed in batches spread over `drain_spread`; and the TCP
//! listener's own limits: `max_connections` and `idle_timeout`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::config::{AgentToml, Section};
use support::{eventually, Backend, TestAgent, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// `drain_timeout` of the proxies below; `drain_spread` is left to its
/// default, 10% of it but at least 1s.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
const DRAIN_SPREAD: Duration = Duration::from_secs(1);

/// An agent announcing `service` at `addr` in the embedded registry.
async fn announce(dir: &Path, service: &str, addr: SocketAddr) -> TestAgent {
    TestAgent::start(&AgentToml::local(dir).service(Section::service(service, addr))).await
}

/// A proxy agent with `upstream`, once it routes to one instance.
async fn proxy(dir: &Path, upstream: Section) -> TestAgent {
    let agent = TestAgent::start(
        &AgentToml::local(dir)
            .agent("drain_timeout", "2s")
            .upstream(upstream),
    )
    .await;
    eventually("the proxy to see the backend", DEADLINE, || async {
        agent.routable().await.len() == 1
    })
    .await;
    agent
}

/// A connection through the proxy with the backend's greeting read.
async fn open(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut byte = [0u8; 1];
    loop {
        assert_eq!(stream.read(&mut byte).await.expect("greeting"), 1);
        if byte[0] == b'\n' {
            return stream;
        }
    }
}

/// Echoes `ping` every 50 ms until the connection closes: when it closed,
/// and the last successful echo.
async fn echo_until_closed(mut stream: TcpStream) -> (Instant, Option<Instant>) {
    let mut last = None;
    let mut buf = [0u8; 4];
    // Bounded: the drain closes it within a few seconds.
    for _ in 0..400 {
        let echoed = async {
            stream.write_all(b"ping").await?;
            stream.read_exact(&mut buf).await
        };
        if echoed.await.is_err() {
            return (Instant::now(), last);
        }
        last = Some(Instant::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the session was never closed");
}

/// A counter of the `battle` upstream listening on `listen`.
async fn counter(agent: &TestAgent, name: &str, listen: SocketAddr) -> Option<f64> {
    agent
        .metric(&format!(
            "{name}{{upstream=\"battle\",listen=\"{listen}\"}}"
        ))
        .await
}

/// Measured before the change: all 20 sessions were cut within 2 ms of the
/// deadline.
#[tokio::test]
async fn sigterm_closes_long_sessions_spread_over_the_window() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("battle-1").await;
    let announcer = announce(dir.path(), "battle", backend.addr).await;
    let mut agent = proxy(dir.path(), Section::upstream("battle")).await;

    let mut sessions = Vec::new();
    for _ in 0..20 {
        let stream = open(agent.listen()).await;
        sessions.push(tokio::spawn(echo_until_closed(stream)));
    }
    let stopped_at = Instant::now();
    agent.begin_stop();
    let mut closes = Vec::new();
    for session in sessions {
        let (closed, last_echo) = tokio::time::timeout(DEADLINE, session)
            .await
            .expect("closed within the deadline")
            .expect("session task");
        let last_echo = last_echo
            .expect("echoed at least once")
            .duration_since(stopped_at);
        assert!(
            last_echo >= DRAIN_TIMEOUT - Duration::from_millis(300),
            "the session stopped echoing {last_echo:?} into the drain"
        );
        closes.push(closed.duration_since(stopped_at));
    }
    let first = *closes.iter().min().expect("closes");
    let last = *closes.iter().max().expect("closes");
    println!("20 sessions closed from {first:?} to {last:?} after SIGTERM");
    assert!(
        first >= DRAIN_TIMEOUT,
        "a session closed {first:?} after shutdown began, before drain_timeout"
    );
    assert!(
        last - first >= DRAIN_SPREAD / 2,
        "closes spread over {:?} only (window {DRAIN_SPREAD:?})",
        last - first
    );
    assert!(
        last <= DRAIN_TIMEOUT + DRAIN_SPREAD + Duration::from_secs(1),
        "the last session closed {last:?} after shutdown began"
    );
    agent.stop().await;
    announcer.stop().await;
}

/// A backend that answers any request head with `101 Switching Protocols`
/// and then echoes.
async fn upgrade_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await? == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    head.push(byte[0]);
                }
                stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .await?;
                let mut buf = [0u8; 1024];
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    stream.write_all(&buf[..n]).await?;
                }
            });
        }
    });
    addr
}

/// Before the change the spliced stream ran outside the drain: shutdown
/// returned at once and the stream outlived the agent.
#[tokio::test]
async fn an_upgraded_connection_lives_until_drain_timeout_and_is_then_closed() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = upgrade_backend().await;
    let announcer = announce(dir.path(), "lobby", backend).await;
    let agent = proxy(dir.path(), Section::http_upstream("lobby")).await;

    let mut stream = TcpStream::connect(agent.listen()).await.expect("connect");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: lobby\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.expect("read"), 1, "head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );

    let session = tokio::spawn(echo_until_closed(stream));
    let stopped_at = Instant::now();
    agent.stop().await;
    let stop_took = stopped_at.elapsed();
    let (closed, last_echo) = tokio::time::timeout(Duration::from_secs(2), session)
        .await
        .expect("the upgraded connection is closed when the agent has stopped")
        .expect("session task");
    let closed = closed.duration_since(stopped_at);
    let last_echo = last_echo.expect("echoed").duration_since(stopped_at);
    println!("upgraded connection: last echo {last_echo:?}, closed {closed:?}, agent stopped after {stop_took:?}");
    assert!(stop_took >= DRAIN_TIMEOUT, "shutdown took {stop_took:?}");
    assert!(closed >= DRAIN_TIMEOUT, "closed {closed:?} into the drain");
    assert!(
        last_echo >= DRAIN_TIMEOUT - Duration::from_millis(300),
        "last echo {last_echo:?}"
    );
    assert!(
        closed <= DRAIN_TIMEOUT + DRAIN_SPREAD + Duration::from_secs(1),
        "closed {closed:?}"
    );
    announcer.stop().await;
}

/// Before the change `max_connections` was an http-only key.
#[tokio::test]
async fn tcp_max_connections_refuses_and_counts() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("battle-1").await;
    let announcer = announce(dir.path(), "battle", backend.addr).await;
    let agent = proxy(
        dir.path(),
        Section::upstream("battle").set("max_connections", 2),
    )
    .await;
    let listen = agent.listen();

    let first = open(listen).await;
    let _second = open(listen).await;
    // The third is accepted and closed at once: no greeting.
    let mut third = TcpStream::connect(listen).await.expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, third.read(&mut buf))
        .await
        .expect("closed, not left hanging")
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection got {:?}", &buf[..n]);
    assert_eq!(
        counter(&agent, "squire_tcp_connections_rejected_total", listen).await,
        Some(1.0)
    );
    // A slot freed is a slot again.
    drop(first);
    eventually("a connection to be taken again", DEADLINE, || async {
        let mut stream = TcpStream::connect(listen).await.expect("connect");
        let mut byte = [0u8; 1];
        matches!(stream.read(&mut byte).await, Ok(1))
    })
    .await;
    agent.stop().await;
    announcer.stop().await;
}

/// Before the change `idle_timeout` was an http-only key.
#[tokio::test]
async fn tcp_idle_timeout_closes_a_silent_session_and_keeps_a_busy_one() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("battle-1").await;
    let announcer = announce(dir.path(), "battle", backend.addr).await;
    let idle = Duration::from_millis(400);
    let agent = proxy(
        dir.path(),
        Section::upstream("battle").set("idle_timeout", "400ms"),
    )
    .await;
    let listen = agent.listen();

    let mut silent = open(listen).await;
    let silent_since = Instant::now();
    let busy = open(listen).await;
    let busy = tokio::spawn(async move {
        let mut busy = busy;
        let mut buf = [0u8; 4];
        // Busy for three idle timeouts: a ping every 100 ms.
        let mut pace = tokio::time::interval(Duration::from_millis(100));
        for _ in 0..12 {
            pace.tick().await;
            busy.write_all(b"ping").await.expect("busy send");
            busy.read_exact(&mut buf).await.expect("busy echo");
        }
        busy
    });
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(DEADLINE, silent.read(&mut byte))
        .await
        .expect("the silent session is closed")
        .unwrap_or(0);
    let closed_after = silent_since.elapsed();
    assert_eq!(n, 0);
    assert!(
        closed_after >= idle - Duration::from_millis(50),
        "closed after {closed_after:?}"
    );
    assert!(closed_after < idle * 4, "closed after {closed_after:?}");
    let mut busy = busy.await.expect("the busy session kept going");
    let mut buf = [0u8; 4];
    busy.write_all(b"ping").await.expect("still open");
    busy.read_exact(&mut buf).await.expect("still echoing");
    assert_eq!(
        counter(&agent, "squire_tcp_connections_idle_closed_total", listen).await,
        Some(1.0)
    );
    drop(busy);
    agent.stop().await;
    announcer.stop().await;
}
