//! The embedded registry: squires on one host find each other through a
//! shared directory, and the agent's shutdown drains connections.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::config::{AgentToml, Section};
use support::process::Squire;
use support::{eventually, session, Backend, TestAgent, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[tokio::test]
async fn two_agents_on_one_host_find_each_other() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = Backend::start("gate-A").await;
    let a = TestAgent::start(
        &AgentToml::local(dir.path()).service(Section::service("gate", backend.addr)),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::upstream("gate"))).await;
    let id = format!("gate-127.0.0.1-{}", backend.addr.port());

    eventually("B to see A", DEADLINE, || async {
        b.routable().await == [id.clone()]
    })
    .await;
    let (greeting, echoed, farewell) = session(b.listen(), b"ping").await.expect("session");
    assert_eq!(
        (greeting.as_str(), echoed.as_slice(), farewell.as_str()),
        ("gate-A", &b"ping"[..], "bye 4\n")
    );
    eventually("A ready", DEADLINE, || async {
        a.get("/ready").await.0 == 200
    })
    .await;

    a.stop().await;
    eventually("B to drop A", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    assert!(!dir.path().join("gate").join(format!("{id}.json")).exists());
    b.stop().await;
}

#[tokio::test]
async fn stale_and_malformed_files_are_not_routed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = Backend::start("lobby").await;
    let service_dir = dir.path().join("lobby");
    std::fs::create_dir_all(&service_dir).expect("mkdir");
    // A squire that crashed: its lease runs out shortly and is never renewed.
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        + 700;
    let record = format!(
        r#"{{"expires_at_ms":{expires},"instance":{{"name":"lobby","id":"lobby-crashed","host":"127.0.0.1","port":{}}}}}"#,
        backend.addr.port()
    );
    std::fs::write(service_dir.join("lobby-crashed.json"), record).expect("write record");
    std::fs::write(service_dir.join("junk.json"), "{ not json").expect("write junk");

    let b =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::upstream("lobby"))).await;
    eventually("the live entry", DEADLINE, || async {
        b.routable().await == ["lobby-crashed"]
    })
    .await;
    assert_eq!(
        b.metric("squire_registry_entries_skipped_total{service=\"lobby\"}")
            .await,
        Some(1.0)
    );
    eventually("the entry to expire", DEADLINE, || async {
        b.routable().await.is_empty()
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn shutdown_drains_open_connections_then_cuts_at_the_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = Backend::start("chat").await;
    let a = TestAgent::start(
        &AgentToml::local(dir.path()).service(Section::service("chat", backend.addr)),
    )
    .await;
    let mut b = TestAgent::start(
        &AgentToml::local(dir.path())
            .agent("drain_timeout", "1s")
            .upstream(Section::upstream("chat")),
    )
    .await;
    eventually("B to see A", DEADLINE, || async {
        b.routable().await.len() == 1
    })
    .await;

    let mut open = TcpStream::connect(b.listen()).await.expect("connect");
    let mut greeting = [0u8; 5];
    open.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting, b"chat\n");

    b.begin_stop();
    eventually("B to stop accepting", DEADLINE, || async {
        TcpStream::connect(b.listen()).await.is_err()
    })
    .await;
    // The established connection still carries bytes both ways while draining.
    open.write_all(b"during drain")
        .await
        .expect("write while draining");
    let mut echoed = [0u8; 12];
    open.read_exact(&mut echoed)
        .await
        .expect("echo while draining");
    assert_eq!(&echoed, b"during drain");

    // drain_timeout is 1s: the connection is cut then, and B finishes.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, open.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "cut at the drain deadline: {read:?}"
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn the_maintenance_command_drains_and_restores_the_instance() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = Backend::start("patchy").await;
    let toml = AgentToml::local(dir.path()).service(Section::service("patchy", backend.addr));
    let a = TestAgent::start(&toml).await;
    // The command reads the agent's config, as an operator runs it, to
    // find the token the agent generated in its state_dir.
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml.to_string()).expect("write config");
    let record = dir
        .path()
        .join("patchy")
        .join(format!("patchy-127.0.0.1-{}.json", backend.addr.port()));
    let status = || {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            // As squire reads it: squire_status first.
            .and_then(|v| {
                serde_json::from_value::<squire::registry::Instance>(v["instance"].clone()).ok()
            })
            .map(|i| i.status.as_str().to_owned())
    };
    eventually("registered healthy", DEADLINE, || async {
        status().as_deref() == Some("healthy")
    })
    .await;

    // tokio's Command: the agent answering it runs on this test's thread.
    let squire = |args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
            .args(args)
            .args(["--admin", &a.admin.to_string()])
            .arg("-c")
            .arg(&config)
            .output()
    };
    let on = squire(&["maintenance", "on", "--reason", "patch 1.2"])
        .await
        .expect("run squire");
    assert!(
        on.status.success(),
        "{}",
        String::from_utf8_lossy(&on.stderr)
    );
    assert!(String::from_utf8_lossy(&on.stdout).contains("patch 1.2"));
    eventually("draining in the registry", DEADLINE, || async {
        status().as_deref() == Some("draining")
    })
    .await;
    assert_eq!(
        a.json("/v1/self").await["maintenance"]["reason"],
        "patch 1.2"
    );

    let off = squire(&["maintenance", "off"]).await.expect("run squire");
    assert!(
        off.status.success(),
        "{}",
        String::from_utf8_lossy(&off.stderr)
    );
    eventually("healthy again", DEADLINE, || async {
        status().as_deref() == Some("healthy")
    })
    .await;

    let unreachable = tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .args([
            "maintenance",
            "on",
            "--admin",
            &format!("127.0.0.1:{}", support::free_port()),
        ])
        .output()
        .await
        .expect("run squire");
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the admin API"));
    a.stop().await;
}

#[tokio::test]
async fn an_idle_squire_on_the_embedded_registry_uses_no_cpu() {
    let dir = tempfile::tempdir().expect("dir");
    let admin = format!("127.0.0.1:{}", support::free_port());
    let backend = support::Backend::start("lobby").await;
    let config = AgentToml::local(dir.path())
        .agent("admin", admin.as_str())
        .service(Section::service("lobby", backend.addr))
        .upstream(Section::upstream("chat"))
        .to_string();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).expect("config");
    let squire = Squire::spawn(&path, None, dir.path().join("squire.log"));
    let admin = admin.parse().expect("admin");
    eventually("squire to register", DEADLINE, || async {
        TcpStream::connect(admin).await.is_ok() && support::http_get(admin, "/ready").await.0 == 200
    })
    .await;
    let (cpu, started) = (squire.cpu_seconds(), Instant::now());
    tokio::time::sleep(IDLE_WINDOW).await;
    let busy = squire.cpu_seconds() - cpu;
    let wall = started.elapsed().as_secs_f64();
    eprintln!("measured: an idle squire used {busy:.3} s of CPU in {wall:.2} s");
    assert!(
        busy < wall / 10.0,
        "idle squire busy: {busy:.3} s CPU in {wall:.2} s"
    );
}

/// How long an idle squire's CPU use is measured over.
const IDLE_WINDOW: Duration = Duration::from_secs(2);
