//! Reloading the configuration while running: SIGHUP to the real binary
//! (an invalid file rejected and counted, a listener added, one removed and
//! drained, a strategy changed under an open session) and
//! `POST /v1/reload` on an in-process agent.

mod support;

use std::fmt::Display;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::config::{AgentToml, Section};
use support::{eventually, free_port, Backend, TestAgent, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The real binary on a generated config file, killed on drop.
struct Squire {
    child: Child,
    config: PathBuf,
    stderr: PathBuf,
    admin: SocketAddr,
}

impl Squire {
    /// Starts `squire run` on `toml` (whose admin address must be `admin`)
    /// and waits for its admin API.
    async fn start(dir: &Path, admin: SocketAddr, toml: impl Display) -> Squire {
        let config = dir.join("agent.toml");
        fs::write(&config, toml.to_string()).expect("write config");
        let stderr = dir.join("stderr.log");
        let child = Command::new(env!("CARGO_BIN_EXE_squire"))
            .arg("run")
            .arg("-c")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("squire starts");
        let mut squire = Squire {
            child,
            config,
            stderr,
            admin,
        };
        let deadline = Instant::now() + DEADLINE;
        while TcpStream::connect(admin).await.is_err() {
            assert!(squire.alive(), "squire exited\n{}", squire.log());
            assert!(Instant::now() < deadline, "no admin API\n{}", squire.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        squire
    }

    fn write(&self, toml: impl Display) {
        fs::write(&self.config, toml.to_string()).expect("write config");
    }

    fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -HUP failed");
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        if TcpStream::connect(self.admin).await.is_err() {
            panic!("the admin API is gone\n{}", self.log());
        }
        support::http_get(self.admin, path).await
    }

    /// `squire_config_reloads_total{result}`, 0 before the first.
    async fn reloads(&self, result: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        let prefix = format!("squire_config_reloads_total{{result=\"{result}\"}}");
        body.lines()
            .find(|line| line.starts_with(&prefix))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The upstreams `/v1/services` lists.
    async fn upstreams(&self) -> Vec<serde_json::Value> {
        let (_, body) = self.get("/v1/services").await;
        let services: serde_json::Value = serde_json::from_str(&body).expect("json");
        services["upstreams"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Squire {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A backend announced as `battle` by an in-process agent on `dir`.
async fn battle(dir: &Path) -> (Backend, TestAgent) {
    let backend = Backend::start("battle-1").await;
    let announcer =
        TestAgent::start(&AgentToml::local(dir).service(Section::service("battle", backend.addr)))
            .await;
    (backend, announcer)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A proxy config on `dir` with its admin on `admin` (the binary cannot
/// report `:0` ports, so these are fixed free ones).
fn proxy_config(dir: &Path, admin: SocketAddr) -> AgentToml {
    AgentToml::local(&dir.join("registry"))
        .agent("admin", admin.to_string())
        .agent("drain_delay", "0s")
        .agent("drain_timeout", "2s")
}

fn battle_upstream(listen: SocketAddr) -> Section {
    Section::upstream("battle").set("listen", listen.to_string())
}

/// Waits until the upstream on `listen` routes to one instance.
async fn wait_routable(squire: &Squire, listen: SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let routable = squire.upstreams().await.iter().any(|u| {
            u["listen"] == listen.to_string()
                && u["endpoints"].as_array().is_some_and(|e| e.len() == 1)
        });
        if routable {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{listen} never routed\n{}",
            squire.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection through the proxy with the backend's greeting read.
async fn open(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(stream);
        }
    }
}

async fn echo(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 4];
    stream.write_all(b"ping").await?;
    stream.read_exact(&mut buf).await?;
    Ok(())
}

/// Echoes every 50 ms for at most `limit`: when it closed (if it did)
/// and the last successful echo.
async fn echo_for(mut stream: TcpStream, limit: Duration) -> (Option<Instant>, Option<Instant>) {
    let until = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < until {
        if echo(&mut stream).await.is_err() {
            return (Some(Instant::now()), last);
        }
        last = Some(Instant::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (None, last)
}

/// Before the change SIGHUP killed squire (exit 129, nothing logged).
#[tokio::test]
async fn sighup_with_an_invalid_file_keeps_running_and_counts_invalid() {
    let dir = tempfile::tempdir().expect("dir");
    let (_backend, announcer) = battle(&dir.path().join("registry")).await;
    let admin = loopback(free_port());
    let listen = loopback(free_port());
    let config = proxy_config(dir.path(), admin).upstream(battle_upstream(listen));
    let mut squire = Squire::start(dir.path(), admin, &config).await;
    wait_routable(&squire, listen).await;
    let mut session = open(listen).await.expect("session");

    squire.write(
        proxy_config(dir.path(), admin)
            .agent("drain_delay", "soon")
            .upstream(battle_upstream(listen).set("strategy", "fastest")),
    );
    squire.hangup();
    eventually("the invalid reload to be counted", DEADLINE, || async {
        squire.reloads("invalid").await == 1.0
    })
    .await;
    assert!(squire.alive(), "SIGHUP killed squire\n{}", squire.log());
    let log = squire.log();
    for line in [
        "reload rejected",
        "upstream.battle.strategy: unknown strategy \\\"fastest\\\"",
        "agent.drain_delay: \\\"soon\\\" is not a duration",
    ] {
        assert!(
            log.contains(line) || log.contains(&line.replace("\\\"", "\"")),
            "{line:?} not logged\n{log}"
        );
    }
    // The running configuration stays: the open session and new ones work.
    echo(&mut session)
        .await
        .expect("the open session still echoes");
    open(listen).await.expect("a new session");

    // A valid file afterwards is applied.
    squire.write(&config);
    squire.hangup();
    eventually("the valid reload to be counted", DEADLINE, || async {
        squire.reloads("ok").await == 1.0
    })
    .await;
    assert_eq!(squire.reloads("invalid").await, 1.0);
    echo(&mut session).await.expect("still echoes");
    drop(squire);
    announcer.stop().await;
}

#[tokio::test]
async fn sighup_adds_a_listener_and_drains_a_removed_one() {
    let dir = tempfile::tempdir().expect("dir");
    let (_backend, announcer) = battle(&dir.path().join("registry")).await;
    let admin = loopback(free_port());
    let (old, new) = (loopback(free_port()), loopback(free_port()));
    let squire = Squire::start(
        dir.path(),
        admin,
        proxy_config(dir.path(), admin).upstream(battle_upstream(old)),
    )
    .await;
    wait_routable(&squire, old).await;
    assert!(TcpStream::connect(new).await.is_err(), "{new} already open");
    let session = open(old).await.expect("session");
    let session = tokio::spawn(echo_for(session, DEADLINE));

    squire.write(proxy_config(dir.path(), admin).upstream(battle_upstream(new)));
    let reloaded_at = Instant::now();
    squire.hangup();
    // The new listener serves at once: the running discovery knows the
    // instance already.
    eventually("the added listener to serve", DEADLINE, || async {
        open(new).await.is_ok()
    })
    .await;
    eventually("the removed listener to refuse", DEADLINE, || async {
        TcpStream::connect(old).await.is_err()
    })
    .await;
    let (closed, last) = session.await.expect("session task");
    let closed = closed
        .expect("the removed listener's session is closed")
        .duration_since(reloaded_at);
    let last = last.expect("echoed").duration_since(reloaded_at);
    println!("removed listener: session echoed until {last:?}, closed {closed:?} after SIGHUP");
    let drain_timeout = Duration::from_secs(2);
    assert!(
        closed >= drain_timeout,
        "closed {closed:?} after the reload"
    );
    assert!(
        last >= drain_timeout - Duration::from_millis(300),
        "last echo {last:?}"
    );
    assert!(
        closed <= drain_timeout + Duration::from_secs(3),
        "closed {closed:?}"
    );
    assert_eq!(squire.reloads("ok").await, 1.0);
    let upstreams = squire.upstreams().await;
    assert_eq!(upstreams.len(), 1, "{upstreams:?}");
    assert_eq!(upstreams[0]["listen"], new.to_string());
    drop(squire);
    announcer.stop().await;
}

#[tokio::test]
async fn sighup_changing_the_strategy_keeps_the_open_session_and_the_port() {
    let dir = tempfile::tempdir().expect("dir");
    let (_backend, announcer) = battle(&dir.path().join("registry")).await;
    let admin = loopback(free_port());
    let listen = loopback(free_port());
    let config = proxy_config(dir.path(), admin).agent("drain_timeout", "500ms");
    let squire = Squire::start(
        dir.path(),
        admin,
        config.clone().upstream(battle_upstream(listen)),
    )
    .await;
    wait_routable(&squire, listen).await;
    let session = open(listen).await.expect("session");
    // Well past drain_timeout + drain_spread: a drained session would close.
    let session = tokio::spawn(echo_for(session, Duration::from_secs(3)));
    // New connects while the handler is swapped: none may be refused.
    let connects = tokio::spawn(async move {
        let mut failed = 0;
        for _ in 0..100 {
            if open(listen).await.is_err() {
                failed += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        failed
    });

    squire.write(
        config
            .clone()
            .upstream(battle_upstream(listen).set("strategy", "random")),
    );
    squire.hangup();
    eventually("the new strategy to be in service", DEADLINE, || async {
        squire
            .upstreams()
            .await
            .first()
            .is_some_and(|u| u["strategy"] == "random")
    })
    .await;
    assert_eq!(
        connects.await.expect("connects"),
        0,
        "connects refused during the reload"
    );
    let (closed, _) = session.await.expect("session task");
    assert!(
        closed.is_none(),
        "the open session was closed by the reload\n{}",
        squire.log()
    );
    assert_eq!(squire.reloads("ok").await, 1.0);
    drop(squire);
    announcer.stop().await;
}

/// An agent in this process that reloads from `path`.
struct InProcess {
    admin: SocketAddr,
    token: squire::config::Secret,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcess {
    async fn start(path: &Path) -> InProcess {
        let config = squire::Config::load(path).expect("valid");
        let agent = squire::Agent::bind(config)
            .await
            .expect("binds")
            .reload_from(path);
        let admin = agent.admin_addr();
        let token = agent.admin_token();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await; // a dropped sender also means stop
        }));
        InProcess {
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

/// `POST path` with an empty body and the agent's admin token: status and
/// body.
async fn post(agent: &InProcess, path: &str) -> (u16, String) {
    support::http_with_token(agent.admin, "POST", path, agent.token.expose()).await
}

#[tokio::test]
async fn post_v1_reload_applies_a_valid_file_and_rejects_an_invalid_one() {
    let dir = tempfile::tempdir().expect("dir");
    let registry = dir.path().join("registry");
    let (_backend, announcer) = battle(&registry).await;
    let path = dir.path().join("agent.toml");
    let base = AgentToml::local(&registry).upstream(Section::upstream("battle"));
    fs::write(&path, base.to_string()).expect("write");
    let agent = InProcess::start(&path).await;
    let admin = agent.admin;

    // Only POST.
    let (status, _) = support::http_get(admin, "/v1/reload").await;
    assert_eq!(status, 405);

    fs::write(
        &path,
        base.clone()
            .upstream(Section::upstream("lobby").set("protocol", "http"))
            .to_string(),
    )
    .expect("write");
    let (status, body) = post(&agent, "/v1/reload").await;
    assert_eq!(status, 200, "{body}");
    let summary: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(summary["result"], "ok", "{summary}");
    assert_eq!(summary["listeners"]["unchanged"], 1, "{summary}");
    let added = summary["listeners"]["added"].as_array().expect("added");
    assert_eq!(added.len(), 1, "{summary}");
    assert!(
        added[0]
            .as_str()
            .is_some_and(|a| a.starts_with("lobby@127.0.0.1:")),
        "{summary}"
    );
    assert_eq!(
        summary["discovery"]["started"],
        serde_json::json!(["lobby"]),
        "{summary}"
    );
    let (_, services) = support::http_get(admin, "/v1/services").await;
    let services: serde_json::Value = serde_json::from_str(&services).expect("json");
    assert_eq!(services["upstreams"].as_array().map(Vec::len), Some(2));

    fs::write(
        &path,
        base.clone()
            .upstream(Section::upstream("lobby").set("retries", 99))
            .to_string(),
    )
    .expect("write");
    let (status, body) = post(&agent, "/v1/reload").await;
    assert_eq!(status, 400, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["result"], "invalid");
    assert_eq!(
        answer["problems"],
        serde_json::json!(["upstream.lobby.retries: 99 is out of range (0-16)"])
    );
    // Still the last good configuration.
    let (_, services) = support::http_get(admin, "/v1/services").await;
    let services: serde_json::Value = serde_json::from_str(&services).expect("json");
    assert_eq!(services["upstreams"][1]["protocol"], "http");

    agent.stop().await;
    announcer.stop().await;
}

#[tokio::test]
async fn a_changed_service_registers_again() {
    let dir = tempfile::tempdir().expect("dir");
    let registry = dir.path().join("registry");
    let path = dir.path().join("agent.toml");
    let (old, new) = (loopback(7000), loopback(7001));
    let config = |addr: SocketAddr| {
        AgentToml::local(&registry)
            .service(Section::service("battle", addr))
            .to_string()
    };
    fs::write(&path, config(old)).expect("write");
    let agent = InProcess::start(&path).await;
    // The id is {name}-{host}-{port}: a new port is a new instance.
    let file = |addr: SocketAddr| {
        registry
            .join("battle")
            .join(format!("battle-127.0.0.1-{}.json", addr.port()))
    };
    eventually("the first registration", DEADLINE, || async {
        file(old).exists()
    })
    .await;

    fs::write(&path, config(new)).expect("write");
    let (status, body) = post(&agent, "/v1/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"reregistered\":true"), "{body}");
    eventually("the new registration", DEADLINE, || async {
        file(new).exists()
    })
    .await;
    assert!(!file(old).exists(), "the old instance is still registered");

    agent.stop().await;
    assert!(!file(new).exists(), "deregistered at shutdown");
}
