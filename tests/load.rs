//! The load a game process reports, end to end: `PUT /v1/load` (and
//! `squire load`) lands in the registry value on a real etcd and in a peer
//! squire's view, rate-limited; it needs the admin token; a full instance
//! gets no new connection under round_robin (and the gauge says so), a
//! stale load is unknown; `packed` fills the fullest with room; `squire
//! drain --wait` returns when the players reach 0, and fails when the
//! deadline passes first.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use support::config::{AgentToml, Section};
use support::{eventually, greeting, Backend, Etcd, TestAgent, DEADLINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// `method /v1/load` with `body`, and the bearer `token` when given.
async fn load_request(
    admin: SocketAddr,
    method: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.expect("connect to admin");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} /v1/load HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{auth}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn put_load(agent: &TestAgent, players: u32, capacity: u32) {
    let body = format!(r#"{{"players": {players}, "capacity": {capacity}}}"#);
    let (status, answer) =
        load_request(agent.admin, "PUT", &body, Some(agent.token.expose())).await;
    assert_eq!(status, 200, "{answer}");
}

async fn etcd_value(etcd: &Etcd, key: &str) -> Option<serde_json::Value> {
    let response = etcd.client().await.get(key, None).await.ok()?;
    let kv = response.kvs().first()?;
    serde_json::from_slice(kv.value()).ok()
}

#[tokio::test]
async fn a_reported_load_reaches_etcd_and_a_peer_rate_limited_and_needs_the_token() {
    let etcd = Etcd::start().await;
    let backend = Backend::start("battle").await;
    let a = TestAgent::start(
        &AgentToml::etcd(&etcd, "/load").service(Section::game_service("battle", backend.addr)),
    )
    .await;
    let key = "/load/battle/battle-1";
    eventually("A registered", DEADLINE, || async {
        etcd_value(&etcd, key).await.is_some()
    })
    .await;
    assert!(
        etcd_value(&etcd, key)
            .await
            .expect("value")
            .get("load")
            .is_none(),
        "no load until the game reports one"
    );

    // The token is required, and a bad body is a 400 with the reason.
    let body = r#"{"players": 37, "capacity": 100}"#;
    assert_eq!(load_request(a.admin, "PUT", body, None).await.0, 401);
    assert_eq!(
        load_request(a.admin, "PUT", body, Some(&"0".repeat(64)))
            .await
            .0,
        401
    );
    for bad in [
        r#"{"players": 37}"#,
        r#"{"players": 1, "capacity": 0}"#,
        r#"{"players": -1, "capacity": 10}"#,
        r#"37/100"#,
        r#"{"players": 1, "capacity": 2, "extra": 1}"#,
    ] {
        let (status, reason) = load_request(a.admin, "PUT", bad, Some(a.token.expose())).await;
        assert_eq!(status, 400, "{bad}: {reason}");
        assert!(!reason.is_empty(), "{bad}: a reason");
    }
    assert_eq!(a.json("/v1/self").await["load"], serde_json::Value::Null);

    put_load(&a, 37, 100).await;
    eventually("the load in the etcd value", DEADLINE, || async {
        etcd_value(&etcd, key).await.is_some_and(|v| {
            v["load"]["players"] == 37
                && v["load"]["capacity"] == 100
                && v["load"]["at"].is_string()
        })
    })
    .await;
    let value = etcd_value(&etcd, key).await.expect("value");
    assert_eq!(
        value["status"], "healthy",
        "Knight's fields unchanged: {value}"
    );
    let this = a.json("/v1/self").await;
    assert_eq!(this["load"]["players"], 37, "{this}");
    assert_eq!(this["load"]["fresh"], true, "{this}");

    // A peer reads it.
    let b = TestAgent::start(
        &AgentToml::etcd(&etcd, "/load").upstream(Section::fast_upstream("battle")),
    )
    .await;
    eventually("B sees A's load", DEADLINE, || async {
        b.get("/v1/catalog/battle")
            .await
            .1
            .contains(r#""players":37"#)
    })
    .await;

    // Many reports in a burst: few writes, and the last one wins.
    // The recorder is the process's: pin A's series (the only etcd one).
    let writes = || async {
        let (_, text) = a.get("/metrics").await;
        text.lines()
            .find(|l| l.starts_with("squire_load_writes_total{") && l.contains(r#"kind="etcd""#))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = writes().await;
    for players in 0..60 {
        put_load(&a, players, 100).await;
    }
    eventually("the last report in etcd", DEADLINE, || async {
        etcd_value(&etcd, key)
            .await
            .is_some_and(|v| v["load"]["players"] == 59)
    })
    .await;
    let made = writes().await - before;
    assert!(
        (1.0..=12.0).contains(&made),
        "60 reports, {made} writes: the token bucket holds them back"
    );
    // A report within 1% of the published one is not written at all.
    let before = writes().await;
    put_load(&a, 59, 100).await;
    put_load(&a, 59, 101).await; // a capacity change is
    eventually("the capacity change in etcd", DEADLINE, || async {
        etcd_value(&etcd, key)
            .await
            .is_some_and(|v| v["load"]["capacity"] == 101)
    })
    .await;
    assert_eq!(writes().await - before, 1.0);

    // Cleared: the load leaves the value.
    let (status, _) = load_request(a.admin, "DELETE", "", Some(a.token.expose())).await;
    assert_eq!(status, 200);
    eventually("the load gone from etcd", DEADLINE, || async {
        etcd_value(&etcd, key)
            .await
            .is_some_and(|v| v.get("load").is_none())
    })
    .await;
    b.stop().await;
    a.stop().await;
}

/// An instance record in the local registry under `dir` with a load
/// reported `age` ago, as another squire writes it.
fn announce_loaded(
    dir: &Path,
    service: &str,
    id: &str,
    addr: SocketAddr,
    load: (u32, u32, Duration),
) {
    let service_dir = dir.join(service);
    std::fs::create_dir_all(&service_dir).expect("mkdir");
    let now = SystemTime::now();
    let expires = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        + 600_000;
    let (players, capacity, age) = load;
    let at = humantime::format_rfc3339_millis(now - age);
    let record = format!(
        r#"{{"expires_at_ms":{expires},"instance":{{"name":"{service}","id":"{id}","host":"{}","port":{},"load":{{"players":{players},"capacity":{capacity},"at":"{at}"}}}}}}"#,
        addr.ip(),
        addr.port()
    );
    std::fs::write(service_dir.join(format!("{id}.json")), record).expect("write record");
}

/// Which backends `n` connections through `listen` reached, by greeting.
async fn reached(listen: SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        names.push(greeting(listen).await.expect("connect"));
    }
    names
}

#[tokio::test]
async fn a_full_instance_gets_no_connection_under_round_robin_and_a_stale_load_is_unknown() {
    let dir = tempfile::tempdir().expect("dir");
    let (full, stale, room) = (
        Backend::start("full").await,
        Backend::start("stale").await,
        Backend::start("room").await,
    );
    let hour = Duration::from_secs(3600);
    announce_loaded(
        dir.path(),
        "battle",
        "full",
        full.addr,
        (100, 100, Duration::ZERO),
    );
    // Reported full an hour ago: unknown now, so it routes.
    announce_loaded(dir.path(), "battle", "stale", stale.addr, (100, 100, hour));
    announce_loaded(
        dir.path(),
        "battle",
        "room",
        room.addr,
        (10, 100, Duration::ZERO),
    );
    let proxy = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::fast_upstream("battle").set("strategy", "round_robin")),
    )
    .await;
    eventually("the proxy sees the three", DEADLINE, || async {
        proxy.routable().await.len() == 3
    })
    .await;
    let names = reached(proxy.listen(), 30).await;
    assert!(!names.iter().any(|n| n == "full"), "{names:?}");
    assert!(names.iter().any(|n| n == "stale"), "{names:?}");
    assert!(names.iter().any(|n| n == "room"), "{names:?}");
    let gauge = format!(
        "squire_upstream_full_endpoints{{upstream=\"battle\",listen=\"{}\"}}",
        proxy.listen()
    );
    assert_eq!(proxy.metric(&gauge).await, Some(1.0));

    // The full one reports room: it routes again, the gauge drops.
    announce_loaded(
        dir.path(),
        "battle",
        "full",
        full.addr,
        (99, 100, Duration::ZERO),
    );
    eventually("the full one routes again", DEADLINE, || async {
        reached(proxy.listen(), 6).await.iter().any(|n| n == "full")
    })
    .await;
    assert_eq!(proxy.metric(&gauge).await, Some(0.0));
    proxy.stop().await;
}

#[tokio::test]
async fn packed_fills_the_fullest_with_room_and_least_loaded_the_emptiest() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    announce_loaded(dir.path(), "battle", "a", a.addr, (10, 100, Duration::ZERO));
    announce_loaded(dir.path(), "battle", "b", b.addr, (80, 100, Duration::ZERO));
    announce_loaded(
        dir.path(),
        "battle",
        "c",
        c.addr,
        (100, 100, Duration::ZERO),
    );
    let proxy = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::fast_upstream("battle").set("strategy", "packed"))
            .upstream(Section::fast_upstream("battle").set("strategy", "least_loaded")),
    )
    .await;
    eventually("the proxy sees the three", DEADLINE, || async {
        proxy.routable().await.len() == 3
    })
    .await;
    let packed = reached(proxy.listens[0], 20).await;
    assert!(packed.iter().all(|n| n == "b"), "packed: {packed:?}");
    let least = reached(proxy.listens[1], 20).await;
    assert!(least.iter().all(|n| n == "a"), "least_loaded: {least:?}");
    proxy.stop().await;
}

/// The token of `agent` in a private file, for the CLI's `--token-file`.
fn token_file(dir: &Path, agent: &TestAgent) -> PathBuf {
    let path = dir.join("admin.token");
    std::fs::write(&path, agent.token.expose()).expect("write token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn squire() -> tokio::process::Command {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
}

#[tokio::test]
async fn squire_load_reports_and_drain_wait_returns_when_the_players_leave() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("battle").await;
    let agent = TestAgent::start(
        &AgentToml::local(&dir.path().join("registry"))
            .service(Section::service("battle", backend.addr)),
    )
    .await;
    eventually("registered", DEADLINE, || async {
        agent.get("/ready").await.0 == 200
    })
    .await;
    let admin = agent.admin.to_string();
    let token = token_file(dir.path(), &agent).display().to_string();
    let cli = ["--admin", admin.as_str(), "--token-file", token.as_str()];

    let out = squire()
        .arg("load")
        .arg("2/10")
        .args(cli)
        .output()
        .await
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(agent.json("/v1/self").await["load"]["players"], 2);
    let bad = squire()
        .arg("load")
        .arg("2 of 10")
        .args(cli)
        .output()
        .await
        .expect("run");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a bad fraction is a usage error"
    );

    // --wait: waits while players are on, printing progress.
    let mut drain = squire()
        .args(["drain", "--settle", "0s", "--wait", "--deadline", "60s"])
        .args(cli)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn drain");
    let mut progress = BufReader::new(drain.stderr.take().expect("stderr")).lines();
    let line = tokio::time::timeout(DEADLINE, progress.next_line())
        .await
        .expect("progress within the deadline")
        .expect("read")
        .expect("a line");
    assert!(line.contains("waiting: 2/10 players"), "{line}");
    assert!(drain.try_wait().expect("status").is_none(), "still waiting");
    assert_eq!(agent.json("/v1/self").await["status"], "draining");
    let out = squire()
        .arg("load")
        .arg("0/10")
        .args(cli)
        .output()
        .await
        .expect("run");
    assert!(out.status.success());
    let status = tokio::time::timeout(DEADLINE, drain.wait())
        .await
        .expect("drain returns once the players are gone")
        .expect("status");
    assert!(status.success());
    let mut stdout = String::new();
    drain
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .await
        .expect("read");
    assert!(stdout.contains("players reached 0"), "{stdout}");

    // The deadline passes with a player on: exit 1, saying so.
    let out = squire()
        .arg("load")
        .arg("1/10")
        .args(cli)
        .output()
        .await
        .expect("run");
    assert!(out.status.success());
    let out = squire()
        .args(["drain", "--settle", "0s", "--wait", "--deadline", "300ms"])
        .args(cli)
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 player(s) still on"), "{stderr}");
    agent.stop().await;
}
