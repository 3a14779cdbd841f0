//! The endpoint policy with real agents, registries and sockets: registry
//! entries that point at squire itself, at its admin API, at an
//! unspecified or link-local address, into a denied range, or with a host
//! that is not a host name are refused, logged and counted once and shown
//! in `/v1/services`; host names are resolved when the snapshot is built
//! and again every `agent.dns_refresh`, never per connect.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::config::{AgentToml, Section};
use support::process::Squire;
use support::{
    announce_local, announce_local_at, eventually, free_port, greeting, http_get, metric, Backend,
    Etcd, TestAgent, DEADLINE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// `(id, reason)` of every instance `/v1/services` shows refused for
/// `service`.
fn refused(services: &Value, service: &str) -> Vec<(String, String)> {
    let entry = services["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == service);
    entry
        .and_then(|s| s["refused"].as_array())
        .into_iter()
        .flatten()
        .map(|r| {
            let text = |key: &str| r[key].as_str().unwrap_or_default().to_owned();
            (text("id"), text("reason"))
        })
        .collect()
}

/// `(id, dials)` of the routable endpoints of the upstream at `index`.
fn dials(services: &Value, index: usize) -> Vec<(String, Vec<String>)> {
    services["upstreams"][index]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let id = e["id"].as_str().unwrap_or_default().to_owned();
            let dials = e["dials"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect();
            (id, dials)
        })
        .collect()
}

async fn services_of(admin: SocketAddr) -> Value {
    let (status, body) = http_get(admin, "/v1/services").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

async fn wait_refused(admin: SocketAddr, service: &str, want: &[(&str, &str)]) -> Value {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(id, reason)| ((*id).to_owned(), (*reason).to_owned()))
        .collect();
    eventually(
        &format!("{service}: refused {want:?}"),
        DEADLINE,
        || async { refused(&services_of(admin).await, service) == want },
    )
    .await;
    services_of(admin).await
}

/// Waits until a squire run as a process answers on `admin`.
async fn wait_admin(admin: SocketAddr) {
    eventually("the admin API", DEADLINE, || async {
        TcpStream::connect(admin).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn an_instance_at_our_own_listener_is_refused_and_clients_are_closed_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let config = AgentToml::local(dir.path())
        .agent("admin", admin.to_string())
        .upstream(Section::fast_upstream("mirror").set("listen", listen.to_string()))
        .to_string();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).expect("config");
    // The attack as it was reported: the only instance is squire's own
    // listener, one write to the registry.
    announce_local(dir.path(), "mirror", "mirror-self", listen);
    let squire = Squire::spawn(&path, Some(1024), dir.path().join("squire.log"));
    wait_admin(admin).await;
    wait_refused(admin, "mirror", &[("mirror-self", "self")]).await;
    let before = squire.open_fds();

    // Clients are closed at once (no endpoint), and nothing loops.
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(listen).await.expect("connect");
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .expect("closed within 2s, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        clients.push(stream); // held open on our side: squire must not be
    }
    let after = squire.open_fds();
    eprintln!(
        "measured: 200 clients closed in {:?}; squire fds {before} before, {after} after",
        started.elapsed()
    );
    assert!(after < 64, "squire holds {after} descriptors");

    // A rebuild (a real instance joins) neither admits it nor counts or
    // logs it again.
    let backend = Backend::start("mirror").await;
    announce_local(dir.path(), "mirror", "mirror-1", backend.addr);
    eventually("the real instance to serve", DEADLINE, || async {
        greeting(listen).await.is_ok_and(|g| g == "mirror")
    })
    .await;
    let services = services_of(admin).await;
    assert_eq!(
        refused(&services, "mirror"),
        [("mirror-self".to_owned(), "self".to_owned())]
    );
    assert_eq!(dials(&services, 0).len(), 1, "{services}");
    let counted = metric(
        admin,
        "squire_registry_entries_refused_total{service=\"mirror\",reason=\"self\"}",
    )
    .await;
    assert_eq!(counted, Some(1.0));
    let log = squire.log();
    assert_eq!(
        log.matches("refusing a registry entry").count(),
        1,
        "logged once:\n{log}"
    );
    assert!(squire.open_fds() < 64);
}

#[tokio::test]
async fn an_instance_at_the_admin_port_is_refused_and_game_clients_never_see_admin_replies() {
    let dir = tempfile::tempdir().expect("dir");
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::fast_upstream("lobby")))
            .await;
    announce_local(dir.path(), "lobby", "lobby-admin", agent.admin);
    wait_refused(agent.admin, "lobby", &[("lobby-admin", "self")]).await;
    let mut stream = TcpStream::connect(agent.listen()).await.expect("connect");
    // Written before squire closes us, or refused: either way no reply.
    let _ = stream
        .write_all(b"GET /v1/self HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
    assert!(
        reply.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&reply)
    );
    agent.stop().await;
}

#[tokio::test]
async fn unspecified_addresses_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("void").await;
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::fast_upstream("void")))
            .await;
    // A connect to 0.0.0.0:P reaches whatever listens on P on this host.
    announce_local_at(
        dir.path(),
        "void",
        "void-v4",
        "0.0.0.0",
        backend.addr.port(),
    );
    announce_local_at(dir.path(), "void", "void-v6", "::", backend.addr.port());
    wait_refused(
        agent.admin,
        "void",
        &[("void-v4", "unspecified"), ("void-v6", "unspecified")],
    )
    .await;
    assert_eq!(greeting(agent.listen()).await.unwrap_or_default(), "");
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    agent.stop().await;
}

#[tokio::test]
async fn link_local_is_refused_by_default_and_dialled_only_when_allowed() {
    // No traffic: the address is only checked and shown, never dialled.
    let dir = tempfile::tempdir().expect("dir");
    announce_local_at(dir.path(), "meta", "meta-1", "169.254.169.254", 80);
    let strict =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::fast_upstream("meta")))
            .await;
    let services = wait_refused(strict.admin, "meta", &[("meta-1", "denied_range")]).await;
    assert!(dials(&services, 0).is_empty());
    let text = services.to_string();
    assert!(text.contains("169.254.169.254:80"), "address shown: {text}");

    // Allowed for one upstream: its own deny list replaces the agent's.
    let open = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::fast_upstream("meta").set("deny", toml::Value::Array(Vec::new()))),
    )
    .await;
    eventually("the allowed endpoint", DEADLINE, || async {
        dials(&open.json("/v1/services").await, 0)
            == [("meta-1".to_owned(), vec!["169.254.169.254:80".to_owned()])]
    })
    .await;
    assert!(refused(&open.json("/v1/services").await, "meta").is_empty());
    strict.stop().await;
    open.stop().await;
}

#[tokio::test]
async fn a_deny_range_refuses_its_instances_while_the_others_serve() {
    let dir = tempfile::tempdir().expect("dir");
    let good = Backend::start("good").await;
    let denied = Backend::start_on("denied", "127.0.0.2:0".parse().expect("addr")).await;
    announce_local(dir.path(), "arena", "arena-good", good.addr);
    announce_local(dir.path(), "arena", "arena-denied", denied.addr);
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::fast_upstream("arena").set("deny", vec!["127.0.0.2/32"])),
    )
    .await;
    let services = wait_refused(agent.admin, "arena", &[("arena-denied", "denied_range")]).await;
    assert_eq!(
        dials(&services, 0),
        [("arena-good".to_owned(), vec![good.addr.to_string()])]
    );
    for _ in 0..10 {
        assert_eq!(greeting(agent.listen()).await.expect("served"), "good");
    }
    assert_eq!(
        denied.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_100_kb_host_name_is_refused_and_shown_short() {
    let etcd = Etcd::start().await;
    let huge = "a".repeat(100 * 1024);
    let value = serde_json::json!({
        "name": "giant", "id": "giant-1", "host": huge, "port": 7000, "status": "healthy",
    });
    etcd.client()
        .await
        .put("/policy/giant/giant-1", value.to_string(), None)
        .await
        .expect("put");
    let agent = TestAgent::start(
        &AgentToml::etcd(&etcd, "/policy").upstream(Section::fast_upstream("giant")),
    )
    .await;
    let services = wait_refused(agent.admin, "giant", &[("giant-1", "bad_host")]).await;
    let address = services["services"][0]["refused"][0]["address"]
        .as_str()
        .expect("address")
        .to_owned();
    assert!(address.len() < 100, "{address}");
    assert!(address.ends_with("...(102400 bytes):7000"), "{address}");
    assert!(dials(&services, 0).is_empty());
    assert_eq!(
        agent
            .metric("squire_registry_entries_refused_total{service=\"giant\",reason=\"bad_host\"}")
            .await,
        Some(1.0)
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_host_name_is_dialled_at_the_address_it_resolved_to() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("named").await;
    announce_local_at(
        dir.path(),
        "named",
        "named-1",
        "localhost",
        backend.addr.port(),
    );
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::fast_upstream("named")))
            .await;
    let port = backend.addr.port();
    eventually("localhost resolved into the endpoint", DEADLINE, || async {
        dials(&agent.json("/v1/services").await, 0)
            .iter()
            .any(|(id, d)| id == "named-1" && d.contains(&format!("127.0.0.1:{port}")))
    })
    .await;
    let services = agent.json("/v1/services").await;
    let endpoint = &services["upstreams"][0]["endpoints"][0];
    assert_eq!(endpoint["address"], format!("localhost:{port}"));
    let resolved = &services["services"][0]["host_names"]["localhost"];
    assert!(
        resolved["addresses"]
            .as_array()
            .expect("addresses")
            .contains(&Value::from("127.0.0.1")),
        "{resolved}"
    );
    assert!(resolved["resolved_at"].is_string(), "{resolved}");
    assert_eq!(greeting(agent.listen()).await.expect("served"), "named");
    agent.stop().await;
}

/// `resolved_at` of `name` in `/v1/services`, and the endpoint's dials.
async fn resolution(admin: SocketAddr, name: &str) -> (Option<String>, Vec<String>) {
    let services = services_of(admin).await;
    let at = services["services"][0]["host_names"][name]["resolved_at"]
        .as_str()
        .map(str::to_owned);
    let dials = dials(&services, 0)
        .into_iter()
        .next()
        .map(|(_, d)| d)
        .unwrap_or_default();
    (at, dials)
}

#[tokio::test]
async fn a_changed_name_is_picked_up_at_the_refresh_and_never_per_connect() {
    // squire runs in a mount namespace with a hosts file of the test's: the
    // name's resolution changes only when the test says so.
    let dir = tempfile::tempdir().expect("dir");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.2 game.test\n").expect("hosts");
    let old = Backend::start_on("old", "127.0.0.2:0".parse().expect("addr")).await;
    let port = old.addr.port();
    let new = Backend::start_on("new", SocketAddr::from(([127, 0, 0, 3], port))).await;
    let refresh = Duration::from_secs(4);
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let config = AgentToml::local(dir.path())
        .agent("admin", admin.to_string())
        .agent("dns_refresh", "4s")
        .upstream(Section::fast_upstream("game").set("listen", listen.to_string()))
        .to_string();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).expect("config");
    announce_local_at(dir.path(), "game", "game-1", "game.test", port);
    // A name nothing resolves: refused, no packet leaves loopback.
    announce_local_at(dir.path(), "game", "game-2", "nowhere.test", port);
    let squire = Squire::spawn_with_hosts(&path, dir.path(), dir.path().join("squire.log"));
    wait_admin(admin).await;
    wait_refused(admin, "game", &[("game-2", "unresolvable")]).await;
    let want_old = vec![format!("127.0.0.2:{port}")];
    eventually("game.test resolved to 127.0.0.2", DEADLINE, || async {
        resolution(admin, "game.test").await.1 == want_old
    })
    .await;

    // Right after a refresh, change the name and connect: every connection
    // still goes where the name resolved, the address /v1/services shows.
    let (first, _) = resolution(admin, "game.test").await;
    eventually("a refresh", DEADLINE, || async {
        resolution(admin, "game.test").await.0 != first
    })
    .await;
    let (refreshed, _) = resolution(admin, "game.test").await;
    let changed_at = Instant::now();
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.3 game.test\n").expect("hosts");
    for _ in 0..20 {
        assert_eq!(greeting(listen).await.expect("served"), "old");
    }
    let (still, dials_now) = resolution(admin, "game.test").await;
    assert_eq!(
        still,
        refreshed,
        "no refresh within the check ({:?}; refresh every {refresh:?})",
        changed_at.elapsed()
    );
    assert_eq!(dials_now, want_old);

    // At the next refresh, and not before, it moves.
    let want_new = vec![format!("127.0.0.3:{port}")];
    eventually("game.test resolved to 127.0.0.3", DEADLINE, || async {
        resolution(admin, "game.test").await.1 == want_new
    })
    .await;
    let moved_after = changed_at.elapsed();
    eprintln!("measured: the new address was taken {moved_after:?} after the change");
    assert!(
        moved_after > refresh / 2,
        "moved after {moved_after:?}, before a refresh could have run"
    );
    eventually("connections to follow", DEADLINE, || async {
        greeting(listen).await.is_ok_and(|g| g == "new")
    })
    .await;
    assert!(new.connections.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(
        metric(
            admin,
            "squire_registry_entries_refused_total{service=\"game\",reason=\"unresolvable\"}"
        )
        .await,
        Some(1.0)
    );
    drop(squire);
}

/// `POST /v1/reload` with the token the agent generated in its state_dir
/// (`{dir}/.state` on the local registry), as `squire` would send it.
async fn reload(dir: &std::path::Path, admin: SocketAddr) -> (u16, String) {
    let file = squire::admin::generated_path(&dir.join(".state"), admin.port());
    let token = std::fs::read_to_string(&file).expect("generated admin token");
    support::http_with_token(admin, "POST", "/v1/reload", token.trim()).await
}

#[tokio::test]
async fn a_listener_bound_by_a_reload_is_refused_as_an_endpoint_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    // Nothing listens here yet: an instance at it is admitted.
    let later: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    announce_local(dir.path(), "relay", "relay-1", later);
    let config = |extra: bool, deny: &[&str]| {
        let relay = Section::fast_upstream("relay").set("listen", listen.to_string());
        let relay = match deny {
            [] => relay,
            deny => relay.set("deny", deny.to_vec()),
        };
        let toml = AgentToml::local(dir.path())
            .agent("admin", admin.to_string())
            .upstream(relay);
        let toml = if extra {
            toml.upstream(Section::fast_upstream("other").set("listen", later.to_string()))
        } else {
            toml
        };
        toml.to_string()
    };
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config(false, &[])).expect("config");
    let squire = Squire::spawn(&path, Some(1024), dir.path().join("squire.log"));
    wait_admin(admin).await;
    eventually("relay-1 admitted", DEADLINE, || async {
        dials(&services_of(admin).await, 0).len() == 1
    })
    .await;

    // The reload binds a listener at the instance's address and leaves
    // the relay upstream (and its discovery) as they are.
    std::fs::write(&path, config(true, &[])).expect("config");
    let (status, body) = reload(dir.path(), admin).await;
    assert_eq!(status, 200, "{body}");
    let services = wait_refused(admin, "relay", &[("relay-1", "self")]).await;
    assert!(dials(&services, 0).is_empty(), "{services}");
    assert_eq!(greeting(listen).await.unwrap_or_default(), "");
    assert!(squire.open_fds() < 64);

    // A reload that changes the relay's ranges replaces its upstream: the
    // new one is built from what is in service, refusals reported.
    let backend = Backend::start("relay").await;
    announce_local(dir.path(), "relay", "relay-2", backend.addr);
    eventually("relay-2 serving", DEADLINE, || async {
        greeting(listen).await.is_ok_and(|g| g == "relay")
    })
    .await;
    std::fs::write(&path, config(true, &["127.0.0.0/8"])).expect("config");
    let (status, body) = reload(dir.path(), admin).await;
    assert_eq!(status, 200, "{body}");
    wait_refused(
        admin,
        "relay",
        &[("relay-1", "self"), ("relay-2", "denied_range")],
    )
    .await;
    let answer = greeting(listen).await.unwrap_or_default();
    assert_eq!(
        answer,
        "",
        "a denied instance answered; services: {}; log: {}",
        services_of(admin).await,
        std::fs::read_to_string(dir.path().join("squire.log")).unwrap_or_default()
    );
}
