//! The HTTP listener end to end: real hyper backends on loopback, instances
//! in the embedded registry, a whole agent in-process.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::config::{AgentToml, Section};
use support::{eventually, TestAgent, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend speaking HTTP/1.1 and h2c: `/` answers its name, `/flaky`
/// answers 503, `/hang` never answers, `/upload` counts the body's bytes, `/download?n` sends n
/// bytes, `/ws` switches protocols and echoes. Counts connections and
/// requests, and keeps each request's version and headers.
struct Backend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(hyper::Version, hyper::HeaderMap)>>>,
}

impl Backend {
    /// The header fields of the last request it served.
    fn last_headers(&self) -> hyper::HeaderMap {
        let seen = self.seen.lock().expect("lock");
        seen.last().expect("a request").1.clone()
    }

    async fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicUsize::new(0));
        let (c, r, s, o) = (
            connections.clone(),
            requests.clone(),
            seen.clone(),
            open.clone(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (r, s, o) = (r.clone(), s.clone(), o.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        r.fetch_add(1, Ordering::SeqCst);
                        s.lock()
                            .expect("lock")
                            .push((request.version(), request.headers().clone()));
                        handle(name, request)
                    });
                    // How the connection ended does not matter here; that it
                    // ended is counted.
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            addr,
            connections,
            open,
            requests,
            seen,
        }
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(
    name: &'static str,
    mut request: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let full = |status: u16, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
        *response.status_mut() = StatusCode::from_u16(status).expect("status");
        Ok(response)
    };
    match request.uri().path() {
        "/flaky" => full(503, format!("{name} is overloaded")),
        "/hang" => std::future::pending().await,
        "/upload" => {
            let mut total = 0usize;
            let body = request.body_mut();
            while let Some(frame) = body.frame().await {
                if let Some(data) = frame.ok().and_then(|f| f.into_data().ok()) {
                    total += data.len();
                }
            }
            full(200, format!("{name} got {total}"))
        }
        "/download" => {
            let n: usize = request
                .uri()
                .query()
                .and_then(|q| q.parse().ok())
                .unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::iter((0..n.div_ceil(chunk.len())).map(move |i| {
                let len = chunk.len().min(n - i * chunk.len());
                Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
            }));
            Ok(Response::new(StreamBody::new(stream).boxed()))
        }
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut response = Response::new(Empty::new().boxed());
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            response
                .headers_mut()
                .insert("upgrade", "websocket".parse().expect("value"));
            response
                .headers_mut()
                .insert("connection", "upgrade".parse().expect("value"));
            Ok(response)
        }
        _ => full(200, name.to_owned()),
    }
}

fn announce(dir: &Path, service: &str, id: &str, addr: SocketAddr) {
    support::announce_local(dir, service, id, addr);
}

/// A keep-alive HTTP/1.1 client connection to `addr`.
async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection.with_upgrades());
    sender
}

/// An HTTP/2 (prior knowledge) client connection to `addr`, and the task
/// driving it (it ends when the connection does).
async fn h2c(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    (sender, tokio::spawn(connection))
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
    host: &str,
) -> (StatusCode, String) {
    let request = Request::get(path)
        .header("host", host)
        .body(Full::default())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn wait_routable(agent: &TestAgent, n: usize) {
    eventually("endpoints to be routable", DEADLINE, || async {
        agent.routable().await.len() == n
    })
    .await;
}

#[tokio::test]
async fn connections_to_the_instance_are_kept_alive_and_reused() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("login").await;
    announce(dir.path(), "login", "login-1", backend.addr);
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::http_upstream("login")))
            .await;
    wait_routable(&agent, 1).await;

    // 50 requests on 10 client connections: the instance sees one connection.
    for _ in 0..10 {
        let mut client = h1(agent.listen()).await;
        for _ in 0..5 {
            assert_eq!(
                get(&mut client, "/", "login.local").await,
                (StatusCode::OK, "login".into())
            );
        }
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 50);
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        1,
        "one pooled upstream connection"
    );
    let listen = agent.listen();
    let reused = agent
        .metric(&format!("squire_http_pool_connections_total{{upstream=\"login\",listen=\"{listen}\",event=\"reused\"}}"))
        .await;
    assert_eq!(reused, Some(49.0));

    // Headers: hop-by-hop gone, X-Forwarded-* added, Host kept.
    let mut client = h1(agent.listen()).await;
    let request = Request::get("/")
        .header("host", "login.game.local")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("x-game", "kept")
        .body(Full::default())
        .expect("request");
    client.send_request(request).await.expect("response");
    let headers = backend.last_headers();
    assert_eq!(headers["host"], "login.game.local");
    assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-game"], "kept");
    assert!(!headers.contains_key("x-hop"));

    // Without a chain of the client's, squire starts one; a proto the
    // client sent is kept.
    let request = Request::get("/")
        .header("host", "login.game.local")
        .header("x-forwarded-proto", "https")
        .body(Full::default())
        .expect("request");
    client.send_request(request).await.expect("response");
    let headers = backend.last_headers();
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(headers.get_all("x-forwarded-proto").iter().count(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn h2c_from_the_client_and_to_the_instance() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("match").await;
    announce(dir.path(), "match", "match-1", backend.addr);
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::http_upstream("match").set("upstream_protocol", "h2")),
    )
    .await;
    wait_routable(&agent, 1).await;

    let (mut sender, _connection) = h2c(agent.listen()).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let request = Request::get("http://match.game.local/")
            .body(Full::<Bytes>::default())
            .expect("request");
        streams.push(sender.send_request(request));
    }
    for response in futures_util::future::join_all(streams).await {
        let response = response.expect("h2 response");
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, "match");
    }
    let seen = backend.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 20);
    assert!(
        seen.iter()
            .all(|(version, _)| *version == hyper::Version::HTTP_2),
        "h2 to the instance"
    );
    assert!(
        seen.iter()
            .all(|(_, headers)| headers["x-forwarded-for"] == "127.0.0.1"
                && headers["x-forwarded-proto"] == "http"),
        "X-Forwarded-* reach an h2 instance too"
    );
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        1,
        "one multiplexed upstream connection"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_websocket_upgrade_becomes_a_byte_stream() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("chat").await;
    announce(dir.path(), "chat", "chat-1", backend.addr);
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::http_upstream("chat")))
            .await;
    wait_routable(&agent, 1).await;

    let mut stream = TcpStream::connect(agent.listen()).await.expect("connect");
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: chat\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.expect("read"),
            1,
            "response head"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in [&b"hello"[..], b"lobby 7 ready", &[0u8, 1, 2, 255]] {
        stream.write_all(message).await.expect("send");
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(echoed, message);
    }
    agent.stop().await;
}

/// Peak resident memory of a process, from /proc.
fn peak_resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Kills the child agent when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_100_mb_body_streams_through_both_ways_in_flat_memory() {
    // The agent runs as its own process so its memory is its own.
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("shop").await;
    announce(dir.path(), "shop", "shop-1", backend.addr);
    let admin: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .expect("addr");
    let listen: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .expect("addr");
    let config_path = dir.path().join("agent.toml");
    let text = AgentToml::local(dir.path())
        .agent("admin", admin.to_string())
        .upstream(Section::http_upstream("shop").set("listen", listen.to_string()))
        .to_string();
    std::fs::write(&config_path, text).expect("write config");
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_squire"))
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start squire"),
    );
    eventually("the agent to route", DEADLINE, || {
        if let Some(status) = child.0.try_wait().expect("squire's exit status") {
            panic!("squire exited ({status}) before it routed");
        }
        async move {
            match TcpStream::connect(listen).await {
                Ok(stream) => {
                    let Ok((mut sender, connection)) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                    else {
                        return false;
                    };
                    tokio::spawn(connection);
                    let request = Request::get("/")
                        .body(Full::<Bytes>::default())
                        .expect("request");
                    sender
                        .send_request(request)
                        .await
                        .is_ok_and(|r| r.status() == StatusCode::OK)
                }
                Err(_) => false,
            }
        }
    })
    .await;
    let before = peak_resident_kib(child.0.id());
    const SIZE: usize = 100 * 1024 * 1024;

    // Upload: the client streams 100 MB in 64 KiB frames.
    let stream = TcpStream::connect(listen).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let frames = futures_util::stream::iter(
        (0..SIZE / chunk.len()).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
    );
    let request = Request::post("/upload")
        .body(StreamBody::new(frames))
        .expect("request");
    let response = sender.send_request(request).await.expect("upload response");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, format!("shop got {SIZE}"));

    // Download: 100 MB back, read frame by frame.
    let mut client = h1(listen).await;
    let request = Request::get(format!("/download?{SIZE}"))
        .body(Full::default())
        .expect("request");
    let mut body = client
        .send_request(request)
        .await
        .expect("download response")
        .into_body();
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        total += frame
            .expect("frame")
            .into_data()
            .map(|d| d.len())
            .unwrap_or(0);
    }
    assert_eq!(total, SIZE);

    let peak = peak_resident_kib(child.0.id());
    eprintln!(
        "measured: agent peak resident memory {before} KiB before, {peak} KiB after moving 2 x 100 MiB"
    );
    assert!(
        peak < before + 16 * 1024,
        "peak memory grew from {before} to {peak} KiB: something buffered a whole body"
    );
}

#[tokio::test]
async fn retries_go_to_another_instance_only_when_safe() {
    let dir = tempfile::tempdir().expect("dir");
    let good = Backend::start("good").await;
    let overloaded = Backend::start("overloaded").await;
    announce(dir.path(), "api", "api-1", good.addr);
    announce(dir.path(), "api", "api-2", overloaded.addr);
    // A registered instance whose process is gone: nothing listens there.
    let dead: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .expect("addr");
    announce(dir.path(), "api", "api-3", dead);
    let agent = TestAgent::start(
        &AgentToml::local(dir.path()).upstream(Section::http_upstream("api").set("retries", 2)),
    )
    .await;
    wait_routable(&agent, 3).await;

    // Connect failures are always retried, whatever the method.
    let mut client = h1(agent.listen()).await;
    for _ in 0..9 {
        let (status, body) = get(&mut client, "/", "api").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body == "good" || body == "overloaded", "{body}");
        let request = Request::post("/upload")
            .body(Full::new(Bytes::from_static(b"bid=5")))
            .expect("request");
        let response = client.send_request(request).await.expect("post response");
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "a POST is retried after a connect failure"
        );
        response.into_body().collect().await.expect("body");
    }

    // A 503 is retried for a GET (no body, idempotent) ...
    for _ in 0..6 {
        let before =
            overloaded.requests.load(Ordering::SeqCst) + good.requests.load(Ordering::SeqCst);
        let (status, body) = get(&mut client, "/flaky", "api").await;
        // Both live instances answer 503 on /flaky: the GET tried both.
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let after =
            overloaded.requests.load(Ordering::SeqCst) + good.requests.load(Ordering::SeqCst);
        assert!(after - before >= 1);
    }
    let retried = agent
        .metric(&format!(
            "squire_http_retries_total{{upstream=\"api\",listen=\"{}\"}}",
            agent.listen()
        ))
        .await
        .expect("retries counted");
    assert!(retried >= 6.0, "{retried}");
    // ... but never for a POST with a body: one instance, one attempt.
    for _ in 0..6 {
        let before =
            overloaded.requests.load(Ordering::SeqCst) + good.requests.load(Ordering::SeqCst);
        let request = Request::post("/flaky")
            .body(Full::new(Bytes::from_static(b"buy=sword")))
            .expect("request");
        let response = client.send_request(request).await.expect("post response");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        response.into_body().collect().await.expect("body");
        let after =
            overloaded.requests.load(Ordering::SeqCst) + good.requests.load(Ordering::SeqCst);
        assert_eq!(after - before, 1, "a POST reaches exactly one instance");
    }
    agent.stop().await;
}

#[tokio::test]
async fn a_get_is_retried_past_a_503_to_a_healthy_instance() {
    let dir = tempfile::tempdir().expect("dir");
    let good = Backend::start("good").await;
    let sick = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sick_addr = sick.local_addr().expect("addr");
    let sick_hits = Arc::new(AtomicUsize::new(0));
    let hits = sick_hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = sick.accept().await {
            let hits = hits.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let mut response = Response::new(Full::new(Bytes::from_static(b"busy")));
                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    async { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    announce(dir.path(), "api", "api-1", good.addr);
    announce(dir.path(), "api", "api-2", sick_addr);
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::http_upstream("api")))
            .await;
    wait_routable(&agent, 2).await;
    let mut client = h1(agent.listen()).await;
    for _ in 0..10 {
        assert_eq!(
            get(&mut client, "/", "api").await,
            (StatusCode::OK, "good".into())
        );
    }
    // Three 503s in a row eject the sick instance (passive health): the
    // rest of the GETs never go there.
    let hits = sick_hits.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&hits),
        "{hits} requests reached the sick instance"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_slow_header_client_is_cut_while_others_are_served() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("gate").await;
    announce(dir.path(), "gate", "gate-1", backend.addr);
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::http_upstream("gate").set("header_read_timeout", "500ms")),
    )
    .await;
    wait_routable(&agent, 1).await;

    let mut slow = TcpStream::connect(agent.listen()).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: gate\r\n")
        .await
        .expect("partial head");
    // And one that sends nothing at all.
    let mut silent = TcpStream::connect(agent.listen()).await.expect("connect");
    let started = Instant::now();
    let mut client = h1(agent.listen()).await;
    for _ in 0..5 {
        assert_eq!(
            get(&mut client, "/", "gate").await.0,
            StatusCode::OK,
            "others are served meanwhile"
        );
    }
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut rest)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "the slow client was cut");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "cut after {took:?}"
    );
    let read = tokio::time::timeout(DEADLINE, silent.read_to_end(&mut rest)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "the silent client was cut");
    assert!(
        took < Duration::from_secs(5),
        "silent client cut after {took:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn only_discovered_instances_are_ever_reached() {
    let dir = tempfile::tempdir().expect("dir");
    let shop = Backend::start("shop").await;
    let outsider = Backend::start("outsider").await;
    announce(dir.path(), "shop", "shop-1", shop.addr);
    let routes = r#"
        [[upstream.route]]
        host = "shop.game.local"
        service = "shop"
        [[upstream.route]]
        path_prefix = "/chat/"
        service = "chat"
    "#;
    let agent = TestAgent::start(
        &AgentToml::local(dir.path()).upstream(Section::http_upstream("lobby").raw(routes)),
    )
    .await;
    eventually("shop to be discovered", DEADLINE, || async {
        agent.json("/v1/services").await["services"]
            .as_array()
            .is_some_and(|s| {
                s.iter().any(|s| {
                    s["name"] == "shop" && s["instances"].as_array().is_some_and(|i| i.len() == 1)
                })
            })
    })
    .await;

    let mut client = h1(agent.listen()).await;
    assert_eq!(
        get(&mut client, "/", "shop.game.local").await,
        (StatusCode::OK, "shop".into())
    );
    assert_eq!(
        get(&mut client, "/", "SHOP.game.local:80").await.0,
        StatusCode::OK,
        "host match ignores case and port"
    );
    // A host nobody announced falls to the listener's own service, which has
    // no instance: 503, and no connection anywhere.
    let (status, body) = get(&mut client, "/", &outsider.addr.to_string()).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
    );
    // An absolute-form target names a destination; it is never used as one.
    let request = Request::get(format!("http://{}/", outsider.addr))
        .body(Full::default())
        .expect("request");
    let response = client.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    response.into_body().collect().await.expect("body");
    assert_eq!(
        get(&mut client, "/chat/room/1", "anything").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        outsider.connections.load(Ordering::SeqCst),
        0,
        "the proxy never connected to an undiscovered host"
    );
    assert_eq!(shop.requests.load(Ordering::SeqCst), 2);
    agent.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_and_counted() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("gate").await;
    announce(dir.path(), "gate", "gate-1", backend.addr);
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::http_upstream("gate").set("max_connections", 2)),
    )
    .await;
    wait_routable(&agent, 1).await;
    let mut first = h1(agent.listen()).await;
    let mut second = h1(agent.listen()).await;
    assert_eq!(get(&mut first, "/", "gate").await.0, StatusCode::OK);
    assert_eq!(get(&mut second, "/", "gate").await.0, StatusCode::OK);
    let mut third = TcpStream::connect(agent.listen())
        .await
        .expect("the kernel accepts");
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: gate\r\n\r\n")
        .await
        .ok();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, third.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "refused without an answer: {read:?} {rest:?}"
    );
    let rejected = agent
        .metric(&format!(
            "squire_http_connections_rejected_total{{upstream=\"gate\",listen=\"{}\"}}",
            agent.listen()
        ))
        .await;
    assert_eq!(rejected, Some(1.0));
    drop(first);
    // A slot frees once a connection closes.
    eventually("a slot to free up", DEADLINE, || async {
        let mut client = h1(agent.listen()).await;
        let request = Request::get("/")
            .header("host", "gate")
            .body(Full::<Bytes>::default())
            .expect("request");
        client.send_request(request).await.is_ok()
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn a_hash_key_header_keeps_a_room_on_one_instance() {
    let dir = tempfile::tempdir().expect("dir");
    let names = ["r1", "r2", "r3"];
    let mut backends = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let backend = Backend::start(name).await;
        announce(dir.path(), "room", &format!("room-{i}"), backend.addr);
        backends.push(backend);
    }
    let upstream = Section::http_upstream("room")
        .set("strategy", "consistent_hash")
        .set("hash_key", "header:x-room");
    let agent = TestAgent::start(&AgentToml::local(dir.path()).upstream(upstream)).await;
    wait_routable(&agent, 3).await;

    let mut client = h1(agent.listen()).await;
    let mut homes = std::collections::HashMap::new();
    for round in 0..5 {
        for room in 0..30 {
            let request = Request::get("/")
                .header("host", "room")
                .header("x-room", format!("room-{room}"))
                .body(Full::default())
                .expect("request");
            let response = client.send_request(request).await.expect("response");
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            let served_by = String::from_utf8_lossy(&body).into_owned();
            let home = homes.entry(room).or_insert_with(|| served_by.clone());
            assert_eq!(*home, served_by, "room-{room} moved in round {round}");
        }
    }
    let used: std::collections::HashSet<_> = homes.values().collect();
    assert_eq!(
        used.len(),
        3,
        "30 rooms spread over all three instances: {homes:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn an_idle_client_connection_is_closed_and_a_busy_one_is_not() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("lobby").await;
    announce(dir.path(), "lobby", "lobby-1", backend.addr);
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::http_upstream("lobby").set("idle_timeout", "300ms")),
    )
    .await;
    wait_routable(&agent, 1).await;

    let mut idle = TcpStream::connect(agent.listen()).await.expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: lobby\r\n\r\n")
        .await
        .expect("request");
    let started = Instant::now();
    let mut busy = h1(agent.listen()).await;
    // The busy connection sends a request every 100 ms: never idle that long.
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    while started.elapsed() < Duration::from_millis(900) {
        pace.tick().await;
        assert_eq!(get(&mut busy, "/", "lobby").await.0, StatusCode::OK);
    }
    let mut everything = Vec::new();
    let read = tokio::time::timeout(DEADLINE, idle.read_to_end(&mut everything)).await;
    assert!(read.is_ok(), "the idle connection was closed");
    assert!(
        String::from_utf8_lossy(&everything).starts_with("HTTP/1.1 200"),
        "after its response"
    );
    assert_eq!(
        get(&mut busy, "/", "lobby").await.0,
        StatusCode::OK,
        "the busy one still works"
    );
    agent.stop().await;
}

#[tokio::test]
async fn pooled_connections_to_an_instance_that_left_are_closed() {
    for protocol in ["http1", "h2"] {
        let dir = tempfile::tempdir().expect("dir");
        let staying = Backend::start("staying").await;
        let leaving = Backend::start("leaving").await;
        announce(dir.path(), "shop", "shop-1", staying.addr);
        announce(dir.path(), "shop", "shop-2", leaving.addr);
        let agent = TestAgent::start(
            &AgentToml::local(dir.path())
                .upstream(Section::http_upstream("shop").set("upstream_protocol", protocol)),
        )
        .await;
        wait_routable(&agent, 2).await;
        let mut client = h1(agent.listen()).await;
        let deadline = Instant::now() + DEADLINE;
        while staying.open.load(Ordering::SeqCst) + leaving.open.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "both instances to hold a pooled connection"
            );
            assert_eq!(get(&mut client, "/", "shop").await.0, StatusCode::OK);
        }
        assert_eq!(
            leaving.open.load(Ordering::SeqCst),
            1,
            "{protocol}: one connection each"
        );

        std::fs::remove_file(dir.path().join("shop/shop-2.json")).expect("deregister");
        wait_routable(&agent, 1).await;
        eventually(
            &format!("{protocol}: the departed instance's connection to close"),
            DEADLINE,
            || async { leaving.open.load(Ordering::SeqCst) == 0 },
        )
        .await;
        assert_eq!(
            get(&mut client, "/", "shop").await,
            (StatusCode::OK, "staying".into())
        );
        assert_eq!(
            staying.open.load(Ordering::SeqCst),
            1,
            "{protocol}: the other one stays pooled"
        );
        agent.stop().await;
    }
}

#[tokio::test]
async fn a_reset_stream_leaves_no_request_in_flight() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("lobby").await;
    announce(dir.path(), "lobby", "lobby-1", backend.addr);
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::http_upstream("lobby").set("idle_timeout", "300ms")),
    )
    .await;
    wait_routable(&agent, 1).await;

    let (mut sender, connection) = h2c(agent.listen()).await;
    let request = Request::get("http://lobby/hang")
        .body(Full::<Bytes>::default())
        .expect("request");
    let pending = tokio::spawn(sender.send_request(request));
    eventually("the request to reach the instance", DEADLINE, || async {
        backend.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    // Dropping the response future resets the stream (RST_STREAM).
    pending.abort();
    let active = format!(
        "squire_http_requests_active{{upstream=\"lobby\",listen=\"{}\"}}",
        agent.listen()
    );
    eventually("the active-requests gauge back to 0", DEADLINE, || async {
        agent.metric(&active).await == Some(0.0)
    })
    .await;
    // Nothing in flight any more: the idle timeout closes the connection.
    let closed = tokio::time::timeout(DEADLINE, connection).await;
    assert!(closed.is_ok(), "the idle h2 connection was closed");
    agent.stop().await;
}

/// Counts how often each metric is registered (looked up by its labels).
#[derive(Default, Clone)]
struct Registrations(Arc<Mutex<std::collections::HashMap<String, usize>>>);

impl metrics::Recorder for Registrations {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        *self
            .0
            .lock()
            .expect("lock")
            .entry(key.name().to_owned())
            .or_default() += 1;
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

// A current-thread runtime: the agent's tasks run on this thread and see
// its local recorder.
#[tokio::test(flavor = "current_thread")]
async fn request_counters_are_resolved_once_per_endpoint_not_per_request() {
    let recorder = Registrations::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("bank").await;
    announce(dir.path(), "bank", "bank-1", backend.addr);
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::http_upstream("bank")))
            .await;
    wait_routable(&agent, 1).await;
    let mut client = h1(agent.listen()).await;
    let registered = || -> usize { recorder.0.lock().expect("lock").values().sum() };
    assert_eq!(get(&mut client, "/", "bank").await.0, StatusCode::OK);
    let after_first = registered();
    for _ in 1..100 {
        assert_eq!(get(&mut client, "/", "bank").await.0, StatusCode::OK);
    }
    // The request counters are atomics of squire's own, rendered at scrape
    // time: the per-request path registers no counter at all.
    assert_eq!(registered(), after_first, "counters registered per request");
    let lookups = recorder
        .0
        .lock()
        .expect("lock")
        .get("squire_http_requests_total")
        .copied();
    assert_eq!(
        lookups, None,
        "request counters never go through the recorder"
    );
    let counted = agent
        .metric("squire_http_requests_total{upstream=\"bank\"")
        .await;
    assert_eq!(counted, Some(100.0), "100 requests counted");
    agent.stop().await;
}
