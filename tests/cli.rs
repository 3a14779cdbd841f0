//! `squire status` against running agents, as an operator reads it.

mod support;

use support::config::{AgentToml, Section};
use support::{eventually, free_port, Backend, TestAgent, DEADLINE};

async fn squire_status(args: &[&str]) -> std::process::Output {
    // tokio's Command: the agents answering it run on this test's runtime.
    tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .arg("status")
        .args(args)
        .output()
        .await
        .expect("run squire")
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
    let registry = Section::new()
        .set("kind", "etcd")
        .set(
            "endpoints",
            vec![format!("http://127.0.0.1:{}", free_port())],
        )
        .set("ttl", "3s")
        .set("timeout", "500ms");
    let c = TestAgent::start(
        &AgentToml::new(registry).service(Section::service("lonely", backend.addr)),
    )
    .await;
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
