//! The discovery API for game processes (`/v1/catalog`), on agents reading
//! the embedded registry: filters over the Knight `ServiceInfo` JSON, the
//! index and blocking queries, a pick that agrees with the proxy's own
//! `ROUTE` hashing, failures reported by the application ejecting an
//! instance, and the Python example client following a service.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::config::{AgentToml, Section};
use support::{eventually, free_port, http_call, http_with_token, Backend, TestAgent, DEADLINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A Knight `ServiceInfo` of `service` on 127.0.0.1.
fn info(service: &str, id: &str, port: u16) -> Value {
    json!({
        "name": service, "id": id, "host": "127.0.0.1", "port": port,
        "tags": ["game"], "metadata": {"zone": "a"}, "version": "1.0.0",
        "weight": 100, "status": "healthy",
    })
}

/// Writes `instance` into the embedded registry under `dir` as another
/// squire would (a record with a lease that outlives the test), through a
/// rename so the watcher never reads half a file.
fn announce(dir: &Path, instance: &Value) {
    let service = instance["name"].as_str().expect("name");
    let id = instance["id"].as_str().expect("id");
    let service_dir = dir.join(service);
    std::fs::create_dir_all(&service_dir).expect("mkdir");
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        + 600_000;
    let record = json!({ "expires_at_ms": expires, "instance": instance });
    let temp = service_dir.join(format!(".{id}.tmp"));
    std::fs::write(&temp, record.to_string()).expect("write record");
    std::fs::rename(&temp, service_dir.join(format!("{id}.json"))).expect("rename record");
}

fn withdraw(dir: &Path, service: &str, id: &str) {
    std::fs::remove_file(dir.join(service).join(format!("{id}.json"))).expect("remove record");
}

/// A catalog answer: status, JSON body, `X-Squire-Index`.
struct Answer {
    status: u16,
    body: Value,
    index: Option<u64>,
}

impl Answer {
    fn ids(&self) -> Vec<String> {
        self.body["instances"]
            .as_array()
            .unwrap_or_else(|| panic!("no instances: {}", self.body))
            .iter()
            .map(|i| i["id"].as_str().expect("id").to_owned())
            .collect()
    }

    fn body_index(&self) -> u64 {
        self.body["index"].as_u64().expect("index in the body")
    }
}

async fn call(admin: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let answer = http_call(admin, method, path, headers).await;
    let index = answer.head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("x-squire-index")
            .then(|| value.trim().parse().expect("numeric index"))
    });
    let body = serde_json::from_str(&answer.body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {answer:?}"));
    Answer {
        status: answer.status,
        body,
        index,
    }
}

async fn get(admin: SocketAddr, path: &str) -> Answer {
    call(admin, "GET", path, &[]).await
}

/// The ids `path` lists, asserting a 200 whose header and body agree on
/// the index.
async fn ids(admin: SocketAddr, path: &str) -> Vec<String> {
    let answer = get(admin, path).await;
    assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    assert_eq!(answer.index, Some(answer.body_index()), "{path}");
    answer.ids()
}

#[tokio::test]
async fn the_catalog_filters_like_an_upstream_and_shows_the_registry_json() {
    let dir = tempfile::tempdir().expect("dir");
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::upstream("battle"))).await;
    let admin = agent.admin;
    let mut one = info("battle", "battle-1", 7001);
    one["tags"] = json!(["game", "eu"]);
    one["version"] = json!("1.4.2");
    let mut two = info("battle", "battle-2", 7002);
    two["version"] = json!("1.5.0");
    two["metadata"] = json!({"zone": "b"});
    two["status"] = json!("unhealthy");
    let mut three = info("battle", "battle-3", 7003);
    three["tags"] = json!(["game", "eu"]);
    three["version"] = json!("1.4.0");
    three["metadata"] = json!({"zone": "b", "room": "42"});
    three["squire_status"] = json!("warning"); // "status": "healthy" for Knight
    let mut refused = info("battle", "battle-metadata", 7004);
    refused["host"] = json!("169.254.169.254");
    for instance in [&one, &two, &three, &refused] {
        announce(dir.path(), instance);
    }
    eventually("the three admitted instances", DEADLINE, || async {
        ids(admin, "/v1/catalog/battle").await.len() == 3
    })
    .await;

    let all = get(admin, "/v1/catalog/battle").await;
    assert_eq!(all.ids(), ["battle-1", "battle-2", "battle-3"]);
    // Exactly the JSON in the registry, field for field.
    assert_eq!(all.body["instances"][0], one);
    assert_eq!(all.body["instances"][1], two);
    assert_eq!(all.body["instances"][2], three);
    // Byte for byte what squire writes into a registry (Knight's field order).
    let raw = http_call(admin, "GET", "/v1/catalog/battle", &[])
        .await
        .body;
    for instance in [&one, &two, &three] {
        let text = squire::registry::Instance::from_json(instance.to_string().as_bytes())
            .expect("an instance")
            .to_json();
        assert!(text.starts_with(r#"{"name":"battle","id":"#), "{text}");
        assert!(raw.contains(&text), "{text} in {raw}");
    }
    assert_eq!(all.body["service"], "battle");
    assert_eq!(
        all.body["refused"],
        json!([{"id": "battle-metadata", "reason": "denied_range"}]),
        "a refused entry is no instance, only listed apart"
    );
    assert!(all.body_index() >= 1);

    for (query, expected) in [
        ("tag=eu", &["battle-1", "battle-3"][..]),
        ("tag=eu&tag=game", &["battle-1", "battle-3"]),
        ("tag=nope", &[]),
        ("status=healthy", &["battle-1"]),
        ("status=unhealthy", &["battle-2"]),
        ("status=healthy,warning", &["battle-1", "battle-3"]),
        ("status=healthy&status=unhealthy", &["battle-1", "battle-2"]),
        ("version=1.4.*", &["battle-1", "battle-3"]),
        ("version=1.5.0", &["battle-2"]),
        ("version=1.4", &[]),
        ("meta.zone=b", &["battle-2", "battle-3"]),
        ("meta.zone=b&tag=eu", &["battle-3"]),
        ("meta.room=42&status=warning", &["battle-3"]),
        ("meta.zone=a&meta.room=42", &[]),
        (
            "tag=game&meta.zone=b&version=1.5.*&status=unhealthy",
            &["battle-2"],
        ),
    ] {
        let path = format!("/v1/catalog/battle?{query}");
        assert_eq!(ids(admin, &path).await, expected, "{query}");
    }

    let unknown = get(admin, "/v1/catalog/lobby").await;
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("\"lobby\" is not discovered")),
        "{}",
        unknown.body
    );
    for query in [
        "wait=soon&index=1",
        "index=abc",
        "index=-3",
        "status=sleepy",
        "colour=blue",
        "tag=",
        "index=1&index=2",
    ] {
        let bad = get(admin, &format!("/v1/catalog/battle?{query}")).await;
        assert_eq!(bad.status, 400, "{query}: {}", bad.body);
        assert!(bad.body["error"].is_string(), "{query}: {}", bad.body);
    }
    let post = call(admin, "POST", "/v1/catalog/battle", &[]).await;
    assert_eq!(post.status, 405);
    let nothing = get(admin, "/v1/catalog/battle/battle-1/other").await;
    assert_eq!(nothing.status, 404);
    agent.stop().await;
}

#[tokio::test]
async fn a_blocking_query_returns_at_a_change_or_after_its_wait() {
    let dir = tempfile::tempdir().expect("dir");
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::upstream("gate"))).await;
    let admin = agent.admin;
    announce(dir.path(), &info("gate", "gate-1", 7101));
    eventually("gate-1 listed", DEADLINE, || async {
        ids(admin, "/v1/catalog/gate").await == ["gate-1"]
    })
    .await;
    let first = get(admin, "/v1/catalog/gate").await.body_index();

    // Nothing changes: answered after the wait (plus at most wait/16), with
    // the same index.
    let started = Instant::now();
    let same = get(admin, &format!("/v1/catalog/gate?index={first}&wait=400ms")).await;
    let took = started.elapsed();
    assert_eq!(same.status, 200);
    assert_eq!((same.index, same.body_index()), (Some(first), first));
    assert_eq!(same.ids(), ["gate-1"]);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // A change: a query waiting up to 60 s returns as soon as it is seen.
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let answer = get(admin, &format!("/v1/catalog/gate?index={first}&wait=60s")).await;
        (answer, started.elapsed())
    });
    // It is waiting (a query that answered at once would hold only gate-1).
    announce(dir.path(), &info("gate", "gate-2", 7102));
    let (added, took) = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the blocking query returns before the deadline")
        .expect("query task");
    assert_eq!(added.status, 200);
    assert_eq!(added.ids(), ["gate-1", "gate-2"]);
    let second = added.body_index();
    assert!(second > first, "{second} > {first}");
    assert_eq!(added.index, Some(second));
    eprintln!("measured: a blocking query answered {took:?} after it was sent, at the change");

    // Monotonic through removal and a status change.
    let waiting = tokio::spawn(async move {
        get(admin, &format!("/v1/catalog/gate?index={second}&wait=60s")).await
    });
    withdraw(dir.path(), "gate", "gate-1");
    let removed = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("returns at the removal")
        .expect("query task");
    assert_eq!(removed.ids(), ["gate-2"]);
    let third = removed.body_index();
    assert!(third > second, "{third} > {second}");
    let mut down = info("gate", "gate-2", 7102);
    down["status"] = json!("unhealthy");
    announce(dir.path(), &down);
    let changed = get(admin, &format!("/v1/catalog/gate?index={third}&wait=60s")).await;
    assert_eq!(changed.body["instances"][0]["status"], "unhealthy");
    let fourth = changed.body_index();
    assert!(fourth > third, "{fourth} > {third}");

    // A client ahead of the index (squire restarted under it) and index 0
    // are answered at once.
    for index in [fourth + 1000, 0] {
        let started = Instant::now();
        let at_once = get(admin, &format!("/v1/catalog/gate?index={index}&wait=60s")).await;
        assert_eq!(at_once.body_index(), fourth, "index={index}");
        assert!(started.elapsed() < Duration::from_secs(5), "index={index}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn blocking_queries_beyond_the_limit_are_refused_and_a_hung_up_one_frees_its_slot() {
    let dir = tempfile::tempdir().expect("dir");
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::upstream("hall"))).await;
    let admin = agent.admin;
    let index = get(admin, "/v1/catalog/hall").await.body_index();
    let blocking = format!("/v1/catalog/hall?index={index}&wait=10m");
    let mut waiting = Vec::new();
    for _ in 0..squire::admin::MAX_BLOCKING_QUERIES {
        let mut stream = TcpStream::connect(admin).await.expect("connect");
        let request = format!("GET {blocking} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        waiting.push(stream);
    }
    // Once all of them wait, one more is refused at once (until then it
    // waits its 50 ms and is answered 200).
    let short = format!("/v1/catalog/hall?index={index}&wait=50ms");
    eventually(
        "a blocking query beyond the limit refused",
        DEADLINE,
        || async { get(admin, &short).await.status == 429 },
    )
    .await;
    let refused = get(admin, &short).await;
    assert!(
        refused.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("blocking queries")),
        "{}",
        refused.body
    );
    // Plain queries and probes are still answered meanwhile.
    assert_eq!(get(admin, "/v1/catalog/hall").await.status, 200);
    assert_eq!(http_call(admin, "GET", "/live", &[]).await.status, 200);
    drop(waiting);
    eventually(
        "the hung-up queries to free their slots",
        DEADLINE,
        || async { get(admin, &short).await.status == 200 },
    )
    .await;
    agent.stop().await;
}

/// An agent in this process that reloads from `path`.
struct Reloadable {
    admin: SocketAddr,
    token: squire::config::Secret,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Reloadable {
    async fn start(path: &Path) -> Reloadable {
        let config = squire::Config::load(path).expect("valid");
        let agent = squire::Agent::bind(config)
            .await
            .expect("binds")
            .reload_from(path);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let admin = agent.admin_addr();
        let token = agent.admin_token();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await; // a dropped sender also means stop
        }));
        Reloadable {
            admin,
            token,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("stops")
            .expect("no panic");
    }
}

#[tokio::test]
async fn a_reload_that_replaces_the_registries_keeps_the_index_and_wakes_waiting_queries() {
    let dir = tempfile::tempdir().expect("dir");
    let registry = dir.path().join("registry");
    std::fs::create_dir_all(&registry).expect("mkdir");
    let path = dir.path().join("agent.toml");
    let config = |ttl: &str| {
        AgentToml::new(Section::local(&registry).set("ttl", ttl))
            .upstream(Section::upstream("arena"))
            .to_string()
    };
    std::fs::write(&path, config("3s")).expect("write config");
    let agent = Reloadable::start(&path).await;
    let admin = agent.admin;
    announce(&registry, &info("arena", "arena-1", 7501));
    eventually("arena-1 listed", DEADLINE, || async {
        ids(admin, "/v1/catalog/arena").await == ["arena-1"]
    })
    .await;
    let before = get(admin, "/v1/catalog/arena").await.body_index();
    let waiting = tokio::spawn(async move {
        get(admin, &format!("/v1/catalog/arena?index={before}&wait=60s")).await
    });

    // Another registry configuration: discovery restarts on a new state.
    std::fs::write(&path, config("4s")).expect("write config");
    let (status, body) = http_with_token(admin, "POST", "/v1/reload", agent.token.expose()).await;
    assert_eq!(status, 200, "{body}");
    let summary: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        summary["discovery"]["restarted"],
        json!(["arena"]),
        "{summary}"
    );
    eventually(
        "the new discovery to list the registry",
        DEADLINE,
        || async {
            let services = http_call(admin, "GET", "/v1/services", &[]).await.body;
            let services: Value = serde_json::from_str(&services).expect("json");
            services["services"][0]["listed_at"].is_string()
                && services["services"][0]["instances"]
                    .as_array()
                    .map(Vec::len)
                    == Some(1)
        },
    )
    .await;
    // The same instances, the same index: nothing changed for a client.
    let after = get(admin, "/v1/catalog/arena").await;
    assert_eq!(after.ids(), ["arena-1"]);
    assert_eq!(after.body_index(), before, "{}", after.body);
    assert!(!waiting.is_finished(), "the waiting query saw no change");

    // The query that waited across the reload wakes at the next change.
    announce(&registry, &info("arena", "arena-2", 7502));
    let woke = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the query waiting across the reload returns at the change")
        .expect("query task");
    assert_eq!(woke.ids(), ["arena-1", "arena-2"]);
    assert!(woke.body_index() > before);
    agent.stop().await;
}

/// The first line a `ROUTE {key}` session through `listen` reads: the
/// greeting of the backend it reached.
async fn routed_to(listen: SocketAddr, key: &str) -> String {
    let mut stream = TcpStream::connect(listen).await.expect("connect");
    stream
        .write_all(format!("ROUTE {key}\n").as_bytes())
        .await
        .expect("preamble");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await.expect("read") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).expect("greeting")
}

#[tokio::test]
async fn a_pick_follows_the_strategy_and_the_route_hashing_and_503_without_endpoints() {
    let dir = tempfile::tempdir().expect("dir");
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(
                Section::fast_upstream("room")
                    .set("strategy", "consistent_hash")
                    .set("hash_key", "preamble"),
            )
            .upstream(Section::fast_upstream("ghost")),
    )
    .await;
    let admin = agent.admin;
    let mut backends = Vec::new();
    for name in ["room-a", "room-b", "room-c"] {
        let backend = Backend::start(name).await;
        announce(dir.path(), &info("room", name, backend.addr.port()));
        backends.push(backend);
    }
    eventually("three rooms routable", DEADLINE, || async {
        agent.routable().await.len() == 3
    })
    .await;

    let mut chosen = std::collections::BTreeSet::new();
    for n in 0..24 {
        let key = format!("room-key-{n}");
        let pick = get(admin, &format!("/v1/catalog/room/pick?key={key}")).await;
        assert_eq!(pick.status, 200, "{}", pick.body);
        assert_eq!(pick.body["strategy"], "consistent_hash");
        let id = pick.body["instance"]["id"].as_str().expect("id").to_owned();
        // The whole ServiceInfo, and where to connect.
        assert_eq!(pick.body["instance"]["name"], "room");
        let port = pick.body["instance"]["port"].as_u64().expect("port");
        assert_eq!(pick.body["address"], format!("127.0.0.1:{port}"));
        // The same key, the same instance, and the one a ROUTE line reaches.
        let again = get(admin, &format!("/v1/catalog/room/pick?key={key}")).await;
        assert_eq!(again.body["instance"]["id"], id.as_str(), "{key}");
        assert_eq!(routed_to(agent.listen(), &key).await, id, "{key}");
        chosen.insert(id);
    }
    assert!(chosen.len() >= 2, "keys spread: {chosen:?}");
    let picks = agent.json("/v1/services").await["upstreams"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["picks"].as_u64().expect("picks"))
        .sum::<u64>();
    assert!(
        picks >= 24 * 3,
        "API picks and proxied ones counted: {picks}"
    );

    let none = get(admin, "/v1/catalog/ghost/pick").await;
    assert_eq!(none.status, 503, "{}", none.body);
    assert!(
        none.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("no endpoint of ghost")),
        "{}",
        none.body
    );
    assert_eq!(get(admin, "/v1/catalog/lobby/pick").await.status, 404);
    assert_eq!(get(admin, "/v1/catalog/room/pick?tag=x").await.status, 400);
    let elsewhere = get(admin, "/v1/catalog/room/pick?listen=127.0.0.1:1").await;
    assert_eq!(elsewhere.status, 404, "{}", elsewhere.body);
    let listen = agent.listen().to_string();
    let here = get(
        admin,
        &format!("/v1/catalog/room/pick?key=x&listen={listen}"),
    )
    .await;
    assert_eq!(here.status, 200, "{}", here.body);
    assert_eq!(here.body["listen"], listen.as_str());
    agent.stop().await;
}

#[tokio::test]
async fn failures_reported_by_the_application_eject_after_the_threshold() {
    let dir = tempfile::tempdir().expect("dir");
    let ejection = toml::Table::from_iter([("consecutive_failures".to_owned(), 2.into())]);
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::fast_upstream("duel").set("ejection", ejection)),
    )
    .await;
    let admin = agent.admin;
    let token = agent.token.expose().to_owned();
    for (id, port) in [("duel-1", 7301), ("duel-2", 7302), ("duel-3", 7303)] {
        announce(dir.path(), &info("duel", id, port));
    }
    eventually("three duels routable", DEADLINE, || async {
        agent.routable().await.len() == 3
    })
    .await;
    let failed = "/v1/catalog/duel/duel-2/failed";

    // Mutating: the admin token, as PUT /v1/maintenance.
    let denied = http_call(admin, "POST", failed, &[]).await;
    assert_eq!(denied.status, 401, "{denied:?}");
    let wrong = http_with_token(admin, "POST", failed, "not-the-token-at-all").await;
    assert_eq!(wrong.0, 401);
    let unknown = http_with_token(admin, "POST", "/v1/catalog/duel/duel-9/failed", &token).await;
    assert_eq!(unknown.0, 404, "{}", unknown.1);
    let lobby = http_with_token(admin, "POST", "/v1/catalog/lobby/duel-2/failed", &token).await;
    assert_eq!(lobby.0, 404, "{}", lobby.1);
    let get_failed = get(admin, failed).await;
    assert_eq!(get_failed.status, 405);

    let endpoint = |services: &Value, id: &str| -> Value {
        services["upstreams"][0]["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (status, body) = http_with_token(admin, "POST", failed, &token).await;
    assert_eq!(status, 200, "{body}");
    let first: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(first["consecutive_failures"], 1);
    assert_eq!(first["ejection_threshold"], 2);
    assert_eq!(
        first["ejected_for_ms"],
        Value::Null,
        "one failure is not enough"
    );
    let services = agent.json("/v1/services").await;
    assert_eq!(endpoint(&services, "duel-2")["ejected_for_ms"], Value::Null);
    assert_eq!(endpoint(&services, "duel-2")["consecutive_failures"], 1);

    let (status, body) = http_with_token(admin, "POST", failed, &token).await;
    assert_eq!(status, 200, "{body}");
    let second: Value = serde_json::from_str(&body).expect("json");
    assert!(
        second["ejected_for_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{second}"
    );
    let services = agent.json("/v1/services").await;
    let ejected = endpoint(&services, "duel-2");
    assert!(
        ejected["ejected_for_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{ejected}"
    );
    assert_eq!(ejected["ejections"], 1);
    assert_eq!(
        services["upstreams"][0]["balancing"]["ejected_endpoints"], 1,
        "{services}"
    );
    // Picks avoid it from now on.
    for _ in 0..12 {
        let pick = get(admin, "/v1/catalog/duel/pick").await;
        assert_eq!(pick.status, 200, "{}", pick.body);
        assert_ne!(pick.body["instance"]["id"], "duel-2");
    }
    agent.stop().await;
}

/// Lines of a child's pipe, as they come.
fn lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    pipe: R,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next line of `rx` containing `needle`, within the deadline; every
/// line read is kept in `seen`.
async fn line_with(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
    seen: &mut Vec<String>,
) -> String {
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = rx.recv().await {
            seen.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        _ => panic!("no line with {needle:?}; read: {seen:#?}"),
    }
}

#[tokio::test]
async fn the_python_example_prints_each_change_and_rides_out_an_absent_squire() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/catalog_watch.py");
    let mut watcher = tokio::process::Command::new("python3")
        .arg(script)
        .arg("chat")
        .args(["--admin", &format!("127.0.0.1:{port}")])
        .args(["--count", "3", "--wait", "30s", "--tag", "game"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut stdout = lines(watcher.stdout.take().expect("stdout"));
    let mut stderr = lines(watcher.stderr.take().expect("stderr"));
    let mut log = Vec::new();
    // No squire yet: it retries.
    line_with(&mut stderr, "unreachable", &mut log).await;

    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .agent("admin", format!("127.0.0.1:{port}"))
            .upstream(Section::upstream("chat")),
    )
    .await;
    assert_eq!(agent.admin.port(), port);
    let watching = line_with(&mut stderr, "watching chat", &mut log).await;
    assert!(watching.contains("0 instance(s)"), "{watching}");

    let mut out = Vec::new();
    announce(dir.path(), &info("chat", "chat-1", 7401));
    let added = line_with(&mut stdout, "added", &mut out).await;
    assert_eq!(added, "added chat-1 127.0.0.1:7401 healthy");
    let mut draining = info("chat", "chat-1", 7401);
    draining["status"] = json!("unhealthy");
    draining["squire_status"] = json!("draining");
    announce(dir.path(), &draining);
    let changed = line_with(&mut stdout, "status", &mut out).await;
    assert_eq!(changed, "status chat-1 healthy -> draining");
    // Filtered out (no "game" tag): no line for it.
    let mut other = info("chat", "chat-2", 7402);
    other["tags"] = json!(["lobby"]);
    announce(dir.path(), &other);
    eventually("chat-2 listed", DEADLINE, || async {
        ids(agent.admin, "/v1/catalog/chat").await.len() == 2
    })
    .await;
    withdraw(dir.path(), "chat", "chat-1");
    let removed = line_with(&mut stdout, "removed", &mut out).await;
    assert_eq!(removed, "removed chat-1");
    assert_eq!(out, [added, changed, removed], "nothing else printed");

    let exit = tokio::time::timeout(DEADLINE, watcher.wait())
        .await
        .expect("exits after --count changes")
        .expect("wait");
    assert!(exit.success(), "{exit:?}; stderr: {log:#?}");

    // Without --count it follows until Ctrl-C, and exits 130 on it.
    let mut command = tokio::process::Command::new("python3");
    command
        .arg(script)
        .arg("chat")
        .args(["--admin", &agent.admin.to_string()])
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only signal(2), async-signal-safe, between fork and exec. A
    // test run from a shell's background job inherits SIGINT ignored, and
    // Python then leaves it ignored: give the child the default, as a
    // terminal would.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut watcher = command.spawn().expect("python3 runs");
    let mut stderr = lines(watcher.stderr.take().expect("stderr"));
    let mut log = Vec::new();
    line_with(&mut stderr, "watching chat", &mut log).await;
    let pid = watcher.id().expect("running") as libc::pid_t;
    // SAFETY: kill(2) on our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let exit = tokio::time::timeout(DEADLINE, watcher.wait())
        .await
        .expect("exits at Ctrl-C")
        .expect("wait");
    assert_eq!(exit.code(), Some(130), "{exit:?}; stderr: {log:#?}");
    agent.stop().await;
}
