//! The CLI against running agents, as an operator (or a container
//! runtime, or a preStop hook) runs it: `squire status`, `squire health`,
//! `squire drain`; and `squire completions`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::config::{AgentToml, Section};
use support::{eventually, free_port, Backend, TestAgent, DEADLINE};

async fn squire_status(args: &[&str]) -> std::process::Output {
    squire(&["status"], args).await
}

async fn squire(command: &[&str], args: &[&str]) -> std::process::Output {
    // tokio's Command: the agents answering it run on this test's runtime.
    tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .args(command)
        .args(args)
        .output()
        .await
        .expect("run squire")
}

/// An agent that cannot register (its etcd is not there): live, not ready.
async fn unregistered_agent(backend: SocketAddr) -> TestAgent {
    let registry = Section::new()
        .set("kind", "etcd")
        .set(
            "endpoints",
            vec![format!("http://127.0.0.1:{}", free_port())],
        )
        .set("ttl", "3s")
        .set("timeout", "500ms");
    TestAgent::start(&AgentToml::new(registry).service(Section::service("lonely", backend))).await
}

#[tokio::test]
async fn status_shows_registrations_and_endpoints_and_fails_when_not_ready() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("gate").await;
    let a = TestAgent::start(
        &AgentToml::local(dir.path()).service(Section::game_service("gate", backend.addr)),
    )
    .await;
    let b = TestAgent::start(
        &AgentToml::local(dir.path())
            .service(Section::service(
                "lobby",
                "127.0.0.1:7500".parse().expect("addr"),
            ))
            .upstream(Section::fast_upstream("gate")),
    )
    .await;
    eventually("B routes to gate-1", DEADLINE, || async {
        b.routable().await == ["gate-1"]
    })
    .await;
    let admin = b.admin.to_string();
    let out = squire_status(&["--admin", &admin]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(text.starts_with(&format!("agent {admin}: ready")), "{text}");
    assert!(
        text.contains("REGISTRY") && text.contains("LAST KEEP-ALIVE"),
        "{text}"
    );
    assert!(text.contains("lobby-127.0.0.1-7500"), "{text}");
    assert!(
        text.contains(&format!("upstream gate on {}", b.listen())),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("gate-1"))
        .unwrap_or_else(|| panic!("no gate-1 row in {text}"));
    assert!(
        row.contains(&backend.addr.to_string()) && row.contains("healthy"),
        "{row}"
    );

    let json = squire_status(&["--admin", &admin, "--json"]).await;
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(value["ready"], true);
    assert_eq!(
        value["services"]["upstreams"][0]["endpoints"][0]["id"],
        "gate-1"
    );
    assert_eq!(value["self"]["registrations"][0]["registered"], true);

    let nobody = format!("127.0.0.1:{}", free_port());
    let unreachable = squire_status(&["--admin", &nobody]).await;
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the admin API"));

    // An agent that cannot register is not ready: exit 1, and why.
    let c = unregistered_agent(backend.addr).await;
    let not_ready = squire_status(&["--admin", &c.admin.to_string()]).await;
    let text = String::from_utf8_lossy(&not_ready.stdout);
    assert_eq!(not_ready.status.code(), Some(1), "{text}");
    assert!(
        text.contains("NOT READY") && text.contains("/ready: "),
        "{text}"
    );
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn health_exits_0_when_ready_and_1_when_not_ready_or_unreachable() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("gate").await;
    let ready = TestAgent::start(
        &AgentToml::local(dir.path()).service(Section::game_service("gate", backend.addr)),
    )
    .await;
    let admin = ready.admin.to_string();
    eventually("the agent to be ready", DEADLINE, || async {
        ready.get("/ready").await.0 == 200
    })
    .await;
    let out = squire(&["health"], &["--admin", &admin]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "quiet: {out:?}"
    );

    // The address read from a configuration file, as the Dockerfile's
    // HEALTHCHECK reads /etc/squire/agent.toml.
    let config = dir.path().join("ready.toml");
    std::fs::write(
        &config,
        AgentToml::local(dir.path())
            .agent("admin", admin.as_str())
            .to_string(),
    )
    .expect("write config");
    let from_config = squire(&["health"], &["-c", config.to_str().expect("utf-8")]).await;
    assert_eq!(from_config.status.code(), Some(0), "{from_config:?}");

    let not_ready = unregistered_agent(backend.addr).await;
    let admin = not_ready.admin.to_string();
    let out = squire(&["health"], &["--admin", &admin]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not registered"), "{stderr}");
    let live = squire(&["health", "--live"], &["--admin", &admin]).await;
    assert_eq!(
        live.status.code(),
        Some(0),
        "live though not ready: {live:?}"
    );

    let nobody = format!("127.0.0.1:{}", free_port());
    let unreachable = squire(&["health"], &["--admin", &nobody]).await;
    assert_eq!(unreachable.status.code(), Some(1), "{unreachable:?}");
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the admin API"));

    // Draining: no longer ready.
    let mut ready = ready;
    ready.begin_stop();
    let admin = ready.admin.to_string();
    eventually("health to fail while draining", DEADLINE, || async {
        squire(&["health"], &["--admin", &admin])
            .await
            .status
            .code()
            == Some(1)
    })
    .await;
    not_ready.stop().await;
}

#[tokio::test]
async fn drain_announces_draining_and_peers_stop_routing_to_us() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("battle").await;
    let battle = TestAgent::start(
        &AgentToml::local(dir.path()).service(Section::game_service("battle", backend.addr)),
    )
    .await;
    let gate =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::fast_upstream("battle")))
            .await;
    eventually("the gate routes to battle-1", DEADLINE, || async {
        gate.routable().await == ["battle-1"]
    })
    .await;
    let token = dir.path().join("token");
    support::certs::write_private(&token, battle.token.expose());
    let admin = battle.admin.to_string();
    let token_arg = token.to_str().expect("utf-8");

    // Without the token the agent refuses, and drain says so.
    let wrong = dir.path().join("wrong-token");
    support::certs::write_private(&wrong, "not-the-token-0123456789");
    let refused = squire(
        &["drain"],
        &[
            "--admin",
            &admin,
            "--token-file",
            wrong.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert_eq!(
        gate.routable().await,
        ["battle-1"],
        "a refused drain changes nothing"
    );

    let started = tokio::time::Instant::now();
    let out = squire(
        &["drain"],
        &[
            "--admin",
            &admin,
            "--token-file",
            token_arg,
            "--wait",
            "300ms",
            "--timeout",
            "10s",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        battle.json("/v1/self").await
    );
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");
    assert!(
        stdout.contains("draining announced in 1 registry"),
        "{stdout}"
    );
    let this = battle.json("/v1/self").await;
    assert_eq!(this["maintenance"]["reason"], "drain");
    assert_eq!(this["status"], "draining");
    assert_eq!(
        this["registrations"][0]["instance"]["squire_status"],
        "draining"
    );
    eventually("the gate to stop routing to battle-1", DEADLINE, || async {
        gate.routable().await.is_empty()
    })
    .await;
    battle.stop().await;
    gate.stop().await;
}

#[test]
fn completions_name_every_subcommand_in_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_squire"))
            .args(["completions", shell])
            .output()
            .expect("run squire");
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.len() > 200, "{shell}: {script}");
        for subcommand in [
            "run",
            "check",
            "init",
            "status",
            "health",
            "maintenance",
            "drain",
            "completions",
        ] {
            assert!(
                script.contains(subcommand),
                "{shell} completion lacks {subcommand}"
            );
        }
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .args(["completions", "tcsh"])
        .output()
        .expect("run squire");
    assert_eq!(bad.status.code(), Some(2), "clap refuses an unknown shell");
}
