//! `log_format = "json"`: the real binary, at its default level, through
//! startup (registered), a reload (SIGHUP), a burst of client connections
//! refused for want of an endpoint, and shutdown (SIGTERM): every line it
//! writes, on stderr and stdout, is one JSON object; and the refused
//! connections, each counted, are logged once (the hot-path warnings go
//! through `time::LogThrottle`).

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::config::{AgentToml, Section};
use support::{eventually, free_port, http_get, metric, Backend, DEADLINE};

/// How many clients are refused: far more than the one line logged for
/// them.
const REFUSED: usize = 40;

#[tokio::test]
async fn every_line_is_json_through_start_reload_refusals_and_stop() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("game").await;
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let toml = |upstream: &str| {
        AgentToml::local(dir.path())
            .agent("admin", admin.to_string())
            .agent("log_format", "json")
            .service(Section::service("game", backend.addr))
            .upstream(Section::fast_upstream(upstream))
            .to_string()
    };
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml("nobody")).expect("config");
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_squire"))
        .args(["run", "-c"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout"))
        .stderr(std::fs::File::create(&stderr).expect("stderr"))
        .spawn()
        .expect("squire starts");
    let log = || std::fs::read_to_string(&stderr).unwrap_or_default();
    eventually("squire to be ready", DEADLINE, || async {
        tokio::net::TcpStream::connect(admin).await.is_ok()
            && http_get(admin, "/ready").await.0 == 200
    })
    .await;

    // Clients of an upstream with no instance: each closed and counted.
    let (_, services) = http_get(admin, "/v1/services").await;
    let services: serde_json::Value = serde_json::from_str(&services).expect("JSON");
    let listen: std::net::SocketAddr = services["upstreams"][0]["listen"]
        .as_str()
        .expect("listen")
        .parse()
        .expect("addr");
    for _ in 0..REFUSED {
        // Closed without a byte: the greeting is empty.
        assert_eq!(support::greeting(listen).await.expect("connect"), "");
    }
    let failed = format!("squire_tcp_connections_failed_total{{upstream=\"nobody\",listen=\"{listen}\",reason=\"no_healthy_endpoint\"}}");
    eventually("every refusal counted", DEADLINE, || async {
        metric(admin, &failed).await == Some(REFUSED as f64)
    })
    .await;

    // A reload that changes the upstream.
    std::fs::write(&config, toml("game")).expect("config");
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    eventually("the reload", DEADLINE, || async {
        metric(admin, "squire_config_reloads_total{result=\"ok\"}").await == Some(1.0)
    })
    .await;

    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "squire did not stop:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}\n{}", log());

    let out = std::fs::read_to_string(&stdout).expect("stdout");
    let err = log();
    let mut lines = Vec::new();
    for (stream, text) in [("stdout", &out), ("stderr", &err)] {
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{stream}: not JSON ({e}): {line}"));
            assert!(
                value["timestamp"].is_string() && value["level"].is_string(),
                "{stream}: {line}"
            );
            lines.push(value);
        }
    }
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    for event in [
        "registered",
        "SIGHUP received: reloading the configuration",
        "configuration reloaded",
        "closing client connection",
        "SIGTERM received",
        "shutting down",
        "deregistered",
    ] {
        assert!(messages.contains(&event), "no {event:?} in {messages:#?}");
    }
    let refusals: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "closing client connection")
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "{REFUSED} refusals within the log interval are one line: {refusals:#?}"
    );
    assert_eq!(refusals[0]["level"], "WARN");
    assert_eq!(refusals[0]["fields"]["since_last_log"], 0);
}
