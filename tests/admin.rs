//! The admin API under abuse: a slow-header client is cut, a flood of
//! connections is refused at the limit and counted, and the API answers
//! again once the flood is gone. The admin token: mutating endpoints need
//! it (401 without, counted), reads stay open, a non-loopback admin without
//! a token file is a config error, a token file others can read is
//! refused, `squire maintenance` finds the generated token, and a reload
//! reads the token file again.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use support::config::AgentToml;
use support::process::Squire;
use support::{eventually, free_port, http_call, http_get, http_with_token, TestAgent, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const EXIT_CONFIG: i32 = 64;

#[tokio::test]
async fn a_slow_header_client_is_cut() {
    let dir = tempfile::tempdir().expect("dir");
    let agent = TestAgent::start(&AgentToml::local(dir.path())).await;
    let mut slow = TcpStream::connect(agent.admin).await.expect("connect");
    slow.write_all(b"GET /v1/services HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("partial head");
    let started = Instant::now();
    let mut rest = Vec::new();
    // Cut by the server: the read ends (EOF or an error response), it does
    // not hang until the test's deadline.
    let read = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the slow client was never cut");
    let took = started.elapsed();
    eprintln!("measured: a slow-header admin client cut after {took:?}");
    assert!(took >= squire::admin::HEADER_READ_TIMEOUT / 2, "{took:?}");
    assert_eq!(http_get(agent.admin, "/live").await.0, 200);
    agent.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_admin_limit_are_refused_and_counted() {
    let dir = tempfile::tempdir().expect("dir");
    let agent = TestAgent::start(&AgentToml::local(dir.path())).await;
    let mut flood = Vec::new();
    for _ in 0..squire::admin::MAX_CONNECTIONS {
        flood.push(TcpStream::connect(agent.admin).await.expect("connect"));
    }
    // Every slot is taken (the accept loop has seen them all once one more
    // is closed at once without an answer).
    eventually(
        "a connection beyond the limit to be refused",
        DEADLINE,
        || async {
            let Ok(mut extra) = TcpStream::connect(agent.admin).await else {
                return false;
            };
            if extra
                .write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
            {
                return true;
            }
            let mut answer = Vec::new();
            let _ = extra.read_to_end(&mut answer).await; // a reset is a refusal too
            answer.is_empty()
        },
    )
    .await;
    drop(flood);
    eventually("the admin API to answer again", DEADLINE, || async {
        TcpStream::connect(agent.admin).await.is_ok()
            && http_get(agent.admin, "/live").await.0 == 200
    })
    .await;
    let refused = agent
        .metric("squire_admin_connections_rejected_total ")
        .await
        .expect("counted");
    assert!(refused >= 1.0, "{refused}");
    agent.stop().await;
}

/// `squire ARGS`, which must exit within the deadline.
async fn squire_cli(args: &[&str]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .args(args)
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(DEADLINE, child)
        .await
        .expect("squire exits")
        .expect("squire runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `text` in `dir/name` with `mode`.
fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// The value of the metric line that starts with `prefix`, 0 without one.
async fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await;
    body.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn maintenance_enabled(admin: SocketAddr) -> bool {
    let (status, body) = http_get(admin, "/v1/maintenance").await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    answer["enabled"] == true
}

#[tokio::test]
async fn mutating_endpoints_need_the_token_and_reads_stay_open() {
    let dir = tempfile::tempdir().expect("dir");
    let agent = TestAgent::start(&AgentToml::local(dir.path())).await;
    let admin = agent.admin;
    let token = agent.token.expose().to_owned();
    assert_eq!(token.len(), 64, "a generated token");

    for path in [
        "/live",
        "/metrics",
        "/v1/services",
        "/v1/self",
        "/v1/maintenance",
    ] {
        let (status, body) = http_get(admin, path).await;
        assert_eq!(status, 200, "GET {path} without a token: {body}");
    }
    let (status, _) = http_get(admin, "/ready").await;
    assert_ne!(status, 401, "/ready needs no token");

    let on = "/v1/maintenance?enable=true&reason=drill";
    let missing = http_call(admin, "PUT", on, &[]).await;
    assert_eq!(missing.status, 401, "{missing:?}");
    assert!(
        missing
            .head
            .to_ascii_lowercase()
            .contains("\r\nwww-authenticate: bearer"),
        "{missing:?}"
    );
    assert!(
        missing.body.contains("Authorization: Bearer"),
        "{missing:?}"
    );
    let basic = http_call(
        admin,
        "PUT",
        on,
        &[("Authorization", &format!("Basic {token}"))],
    )
    .await;
    assert_eq!(basic.status, 401, "another scheme is no bearer token");
    // One character off, and one short.
    let mut near = token.clone().into_bytes();
    near[63] = if near[63] == b'0' { b'1' } else { b'0' };
    let near = String::from_utf8(near).expect("hex");
    assert_eq!(http_with_token(admin, "PUT", on, &near).await.0, 401);
    assert_eq!(http_with_token(admin, "PUT", on, &token[..63]).await.0, 401);
    let reload = http_call(admin, "POST", "/v1/reload", &[]).await;
    assert_eq!(reload.status, 401, "reload needs the token too");
    assert!(
        !maintenance_enabled(admin).await,
        "nothing denied took effect"
    );

    let (status, body) = http_with_token(admin, "PUT", on, &token).await;
    assert_eq!(status, 200, "{body}");
    assert!(maintenance_enabled(admin).await);

    let missing = metric(admin, "squire_admin_denied_total{reason=\"missing\"}").await;
    let wrong = metric(admin, "squire_admin_denied_total{reason=\"wrong\"}").await;
    assert_eq!((missing, wrong), (3.0, 2.0), "denials counted by reason");
    agent.stop().await;
}

#[tokio::test]
async fn a_non_loopback_admin_needs_a_private_token_file() {
    let dir = tempfile::tempdir().expect("dir");
    let write = |name: &str, toml: AgentToml| {
        let path = dir.path().join(name);
        std::fs::write(&path, toml.to_string()).expect("write");
        path.display().to_string()
    };
    let base = AgentToml::local(&dir.path().join("registry")).agent("admin", "0.0.0.0:0");
    let without = write("without.toml", base.clone());
    for command in ["check", "run"] {
        let out = squire_cli(&[command, "-c", &without]).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{command}: {stderr}");
        assert!(
            stderr.contains(
                "agent.admin_token_file: required because agent.admin (0.0.0.0:0) is not a \
                 loopback address"
            ) && stderr.contains("chmod 600")
                && stderr.contains("listen on 127.0.0.1"),
            "{command}: the field, the reason and the fix: {stderr}"
        );
    }

    let open = secret_file(dir.path(), "open.token", "a-token-of-twenty-chars\n", 0o644);
    let refused = write(
        "open.toml",
        base.clone()
            .agent("admin_token_file", open.display().to_string()),
    );
    for command in ["check", "run"] {
        let out = squire_cli(&[command, "-c", &refused]).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{command}: {stderr}");
        assert!(
            stderr.contains("agent.admin_token_file:")
                && stderr.contains("mode 0644")
                && stderr.contains(&format!("chmod 600 {}", open.display())),
            "{command}: {stderr}"
        );
        assert!(
            !stderr.contains("twenty-chars"),
            "never the token: {stderr}"
        );
    }

    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = squire_cli(&["check", "-c", &refused]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[tokio::test]
async fn squire_maintenance_sends_the_token_the_agent_generated() {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.path().join("agent.toml");
    let toml = AgentToml::local(&dir.path().join("registry"))
        .agent("admin", admin.to_string())
        .agent("state_dir", state.display().to_string());
    std::fs::write(&config, toml.to_string()).expect("write");
    let config = config.display().to_string();
    let mut squire = Squire::spawn(Path::new(&config), None, dir.path().join("squire.log"));
    // Answering (not only listening: the kernel accepts connects from the
    // bind on) means the agent runs, its token written.
    eventually("the admin API", DEADLINE, || async {
        TcpStream::connect(admin).await.is_ok() && http_get(admin, "/live").await.0 == 200
    })
    .await;

    let generated = state.join(format!("admin-{}.token", admin.port()));
    assert_eq!(mode(&generated), 0o600, "private to squire's user");
    let token = std::fs::read_to_string(&generated).expect("token");
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "32 random bytes in hex"
    );

    let out = squire_cli(&["maintenance", "on", "--reason", "patch 7", "-c", &config]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("patch 7"),
        "{}",
        text(&out.stdout)
    );
    assert!(maintenance_enabled(admin).await);

    let addr = admin.to_string();
    let wrong = secret_file(dir.path(), "wrong.token", &"f".repeat(64), 0o600);
    let wrong = wrong.display().to_string();
    let out = squire_cli(&[
        "maintenance",
        "off",
        "--admin",
        &addr,
        "--token-file",
        &wrong,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));
    assert!(
        maintenance_enabled(admin).await,
        "a wrong token changes nothing"
    );

    let open = secret_file(dir.path(), "open.token", &token, 0o644);
    let open = open.display().to_string();
    let out = squire_cli(&[
        "maintenance",
        "off",
        "--admin",
        &addr,
        "--token-file",
        &open,
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("mode 0644"),
        "{}",
        text(&out.stderr)
    );

    let out = squire_cli(&["maintenance", "off", "-c", &config]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!maintenance_enabled(admin).await);

    let status = squire.stop(DEADLINE).await;
    assert!(status.success(), "{status}\n{}", squire.log());
    assert!(
        !generated.exists(),
        "the generated token goes with the agent"
    );
}

#[tokio::test]
async fn a_reload_reads_the_token_file_again() {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state");
    let port = free_port();
    let admin = SocketAddr::from(([127, 0, 0, 1], port));
    let first = "first-token-0123456789";
    let file = secret_file(dir.path(), "admin.token", first, 0o600);
    let config = dir.path().join("agent.toml");
    // Beyond loopback, as the shipped container configs; the test talks to
    // it on 127.0.0.1 only.
    let toml = AgentToml::local(&dir.path().join("registry"))
        .agent("admin", format!("0.0.0.0:{port}"))
        .agent("admin_token_file", file.display().to_string())
        .agent("state_dir", state.display().to_string());
    std::fs::write(&config, toml.to_string()).expect("write");
    let _squire = Squire::spawn(&config, None, dir.path().join("squire.log"));
    // Answering (not only listening: the kernel accepts connects from the
    // bind on) means the agent runs, its token written.
    eventually("the admin API", DEADLINE, || async {
        TcpStream::connect(admin).await.is_ok() && http_get(admin, "/live").await.0 == 200
    })
    .await;
    assert!(
        !state.join(format!("admin-{port}.token")).exists(),
        "nothing generated when a file is configured"
    );

    let on = "/v1/maintenance?enable=true";
    assert_eq!(http_with_token(admin, "PUT", on, first).await.0, 200);
    let second = "second-token-9876543210";
    std::fs::write(&file, format!("{second}\n")).expect("rewrite");
    let (status, body) = http_with_token(admin, "POST", "/v1/reload", first).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_with_token(admin, "PUT", on, first).await.0, 401);
    assert_eq!(http_with_token(admin, "PUT", on, second).await.0, 200);
}
