//! Secrets never leave squire: one run of the real binary with every secret
//! it takes (an etcd password against a real etcd with auth, a Consul ACL
//! token against the fake Consul, a ZooKeeper digest password against a
//! real ZooKeeper, the admin token from a file, a health
//! check's `Authorization` header), logging at debug level in JSON, goes
//! through a wrong password, a reload, a maintenance toggle, denied admin
//! requests and `squire check` of broken files holding the secrets. Then
//! every log line, every admin answer, the metrics scrape, every CLI output
//! and the config's `Debug` are searched for each secret.
//!
//! To cover another secret (a TLS private key), add its text to `secrets`
//! and its key to the config: the searches run over every entry.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use etcd_client::{ConnectOptions, Permission};
use support::config::{AgentToml, Section};
use support::consul::{Acl, AclToken, FakeConsul, FakeOptions, Level};
use support::process::Squire;
use support::zookeeper::ZooKeeper;
use support::{eventually, free_port, http_call, http_get, Etcd, HttpBackend, DEADLINE};

const PASSWORD: &str = "etcd-pw-Zq81vX";
const WRONG_PASSWORD: &str = "etcd-pw-Zq81vY";
const CONSUL_TOKEN: &str = "consul-acl-7f3e9b2c";
const ADMIN_TOKEN: &str = "admin-token-4d1a8c6e0b";
const WRONG_TOKEN: &str = "admin-token-4d1a8c6e0c";
const HEADER_SECRET: &str = "probe-bearer-55e0aa";
const ZK_PASSWORD: &str = "zk-digest-pw-3c9d71";

/// An etcd with auth on: root, and user `squire` (password [`PASSWORD`])
/// who may write under `/secrets/`.
async fn etcd_with_auth() -> Etcd {
    let etcd = Etcd::start().await;
    let mut admin = etcd.client().await;
    admin.user_add("root", "rootpw", None).await.expect("root");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("root role");
    admin.role_add("svc").await.expect("role");
    admin
        .role_grant_permission("svc", Permission::read_write("/secrets/").with_prefix())
        .await
        .expect("grant");
    admin
        .user_add("squire", PASSWORD, None)
        .await
        .expect("user");
    admin
        .user_grant_role("squire", "svc")
        .await
        .expect("user role");
    admin.auth_enable().await.expect("auth on");
    etcd
}

fn private_file(dir: &Path, name: &str, text: &str, mode: u32) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path.display().to_string()
}

/// `squire ARGS`: what it printed, both streams, and its exit code.
async fn squire_cli(args: &[&str]) -> (Option<i32>, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .args(args)
        .env("RUST_LOG", "debug")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(DEADLINE, output)
        .await
        .expect("squire exits")
        .expect("squire runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

async fn registration(admin: SocketAddr, name: &str) -> serde_json::Value {
    let (_, body) = http_get(admin, "/v1/self").await;
    let this: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    this["registrations"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["name"] == name).cloned())
        .unwrap_or_default()
}

#[tokio::test]
async fn no_secret_reaches_a_log_line_an_answer_or_an_error() {
    let etcd = etcd_with_auth().await;
    let fake = FakeConsul::with_options(FakeOptions {
        acl: Some(Acl::deny_by_default(vec![AclToken::all_services(
            CONSUL_TOKEN,
            "accessor-squire",
            Level::Write,
        )])),
        ..FakeOptions::default()
    })
    .await;
    let zk = ZooKeeper::start().await;
    let backend = HttpBackend::start("vault").await;
    let dir = tempfile::tempdir().expect("dir");
    let token_file = private_file(
        dir.path(),
        "admin.token",
        &format!("{ADMIN_TOKEN}\n"),
        0o600,
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let headers = toml::Table::from_iter([(
        "Authorization".to_owned(),
        toml::Value::from(format!("Bearer {HEADER_SECRET}")),
    )]);
    let toml = |password: &str| {
        AgentToml::new(
            Section::etcd(&etcd, "/secrets")
                .set("name", "etcd")
                .set("username", "squire")
                .set("password", password),
        )
        .registry(
            Section::consul(&fake)
                .set("name", "consul")
                .set("token", CONSUL_TOKEN),
        )
        .registry(
            Section::zookeeper(&zk, "/secrets")
                .set("name", "zookeeper")
                .set("username", "squire")
                .set("password", ZK_PASSWORD),
        )
        .agent("admin", admin.to_string())
        .agent("admin_token_file", token_file.clone())
        .agent("state_dir", dir.path().join("state").display().to_string())
        .agent("log", "debug")
        .agent("log_format", "json")
        .service(Section::game_service("vault", backend.addr))
        .check(
            Section::new()
                .set("name", "http")
                .set("kind", "http")
                .set("address", backend.addr.to_string())
                .set("path", "/health")
                .set("interval", "200ms")
                .set("timeout", "100ms")
                .set("headers", headers.clone()),
        )
        .upstream(Section::fast_upstream("vault"))
    };
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml(WRONG_PASSWORD).to_string()).expect("write");
    let config_arg = config.display().to_string();
    let log = dir.path().join("squire.log");
    let mut squire = Squire::spawn_logging(&config, None, "debug", log.clone());
    let mut answers: Vec<(String, String)> = Vec::new();
    let up = tokio::time::Instant::now() + DEADLINE;
    while !(tokio::net::TcpStream::connect(admin).await.is_ok()
        && http_get(admin, "/live").await.0 == 200)
    {
        assert!(
            squire.exited().is_none(),
            "squire exited:\n{}",
            squire.log()
        );
        assert!(
            tokio::time::Instant::now() < up,
            "no admin API:\n{}",
            squire.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A wrong password: refused by etcd, reported.
    eventually("the wrong password to be refused", DEADLINE, || async {
        registration(admin, "etcd").await["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("authentication failed"))
    })
    .await;
    eventually(
        "the Consul registration with the token",
        DEADLINE,
        || async { registration(admin, "consul").await["registered"] == true },
    )
    .await;
    eventually(
        "the ZooKeeper registration with the password",
        DEADLINE,
        || async { registration(admin, "zookeeper").await["registered"] == true },
    )
    .await;

    // The right one, by a reload (with the admin token).
    std::fs::write(&config, toml(PASSWORD).to_string()).expect("write");
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let reload = http_call(admin, "POST", "/v1/reload", &[("Authorization", &bearer)]).await;
    assert_eq!(reload.status, 200, "{reload:?}");
    answers.push((
        "POST /v1/reload".into(),
        format!("{}\n{}", reload.head, reload.body),
    ));
    eventually("registered in etcd with the password", DEADLINE, || async {
        registration(admin, "etcd").await["registered"] == true
    })
    .await;

    // Maintenance on and off with the token; denied without it and with a
    // wrong one.
    for (method, path, auth) in [
        (
            "PUT",
            "/v1/maintenance?enable=true&reason=drill",
            Some(bearer.clone()),
        ),
        ("PUT", "/v1/maintenance?enable=false", Some(bearer.clone())),
        (
            "PUT",
            "/v1/maintenance?enable=true",
            Some(format!("Bearer {WRONG_TOKEN}")),
        ),
        ("PUT", "/v1/maintenance?enable=true", None),
        ("POST", "/v1/reload", Some(format!("Bearer {WRONG_TOKEN}"))),
    ] {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let answer = http_call(admin, method, path, &headers).await;
        let expected = if auth.as_deref() == Some(bearer.as_str()) {
            200
        } else {
            401
        };
        assert_eq!(answer.status, expected, "{method} {path}: {answer:?}");
        answers.push((
            format!("{method} {path}"),
            format!("{}\n{}", answer.head, answer.body),
        ));
    }
    let (code, out) = squire_cli(&["maintenance", "on", "-c", &config_arg]).await;
    assert_eq!(code, Some(0), "{out}");
    answers.push(("squire maintenance on".into(), out));
    let wrong_file = private_file(dir.path(), "wrong.token", WRONG_TOKEN, 0o600);
    let (code, out) = squire_cli(&[
        "maintenance",
        "off",
        "-c",
        &config_arg,
        "--token-file",
        &wrong_file,
    ])
    .await;
    assert_eq!(code, Some(1), "{out}");
    answers.push(("squire maintenance off (wrong token)".into(), out));
    let (code, out) = squire_cli(&["maintenance", "off", "-c", &config_arg]).await;
    assert_eq!(code, Some(0), "{out}");
    answers.push(("squire maintenance off".into(), out));

    // Everything the admin API shows.
    eventually("the check to have sent its header", DEADLINE, || async {
        backend
            .last_health_headers
            .lock()
            .expect("headers")
            .iter()
            .any(|(name, value)| {
                name.eq_ignore_ascii_case("authorization") && value.contains(HEADER_SECRET)
            })
    })
    .await;
    for path in [
        "/live",
        "/ready",
        "/metrics",
        "/v1/services",
        "/v1/self",
        "/v1/maintenance",
    ] {
        let (status, body) = http_get(admin, path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        answers.push((format!("GET {path}"), body));
    }
    let metrics = &answers
        .iter()
        .find(|(what, _)| what == "GET /metrics")
        .expect("scraped")
        .1;
    assert!(
        metrics.contains("squire_admin_denied_total{reason=\"wrong\"} 3")
            && metrics.contains("squire_admin_denied_total{reason=\"missing\"} 1"),
        "the scrape holds the denials (two wrong over HTTP, one from the CLI): {metrics}"
    );

    // squire check of files that hold the secrets: valid, a syntax error,
    // validation errors with each secret where it is refused.
    let (code, out) = squire_cli(&["check", "-c", &config_arg]).await;
    assert_eq!(code, Some(0), "{out}");
    answers.push(("squire check (valid)".into(), out));
    let text = toml(PASSWORD).to_string();
    let broken = text.replace(
        &format!("password = \"{PASSWORD}\""),
        &format!("password = \"{PASSWORD}"),
    );
    assert_ne!(broken, text, "the password line was broken");
    let syntax = dir.path().join("syntax.toml");
    std::fs::write(&syntax, broken).expect("write");
    let (code, out) = squire_cli(&["check", "-c", &syntax.display().to_string()]).await;
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("not valid TOML: line "), "{out}");
    answers.push(("squire check (syntax error)".into(), out));
    let open_token = private_file(dir.path(), "open.token", ADMIN_TOKEN, 0o644);
    let invalid = text
        .replace(&token_file, &open_token)
        .replace(
            &format!("token = \"{CONSUL_TOKEN}\""),
            &format!("token = \"{CONSUL_TOKEN} x\""),
        )
        .replace(
            &format!("Bearer {HEADER_SECRET}\""),
            &format!("Bearer {HEADER_SECRET}\\n\""),
        )
        .replace(
            &format!("password = \"{PASSWORD}\""),
            &format!("password = [\"{PASSWORD}\"]"),
        )
        .replace(
            &format!("password = \"{ZK_PASSWORD}\""),
            &format!("password = [\"{ZK_PASSWORD}\"]"),
        );
    let invalid_path = dir.path().join("invalid.toml");
    std::fs::write(&invalid_path, invalid).expect("write");
    let (code, out) = squire_cli(&["check", "-c", &invalid_path.display().to_string()]).await;
    assert_eq!(code, Some(64), "{out}");
    for field in [
        "agent.admin_token_file",
        "registry.consul.token",
        "registry.etcd.password",
        "registry.zookeeper.password",
        "service.check.http.headers",
    ] {
        assert!(out.contains(field), "{field} is reported: {out}");
    }
    answers.push(("squire check (invalid)".into(), out));
    let loaded = squire::Config::load(&config).expect("valid");
    answers.push(("Debug of the Config".into(), format!("{loaded:?}")));

    let status = squire.stop(DEADLINE).await;
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<&str> = log.lines().collect();

    // The run was seen: many lines, all JSON, the events this test made.
    assert!(lines.len() >= 50, "only {} log lines:\n{log}", lines.len());
    for line in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object()),
            "not a JSON log line: {line}"
        );
    }
    for event in [
        "authentication failed",
        "configuration reloaded",
        "maintenance on",
        "admin request denied",
        "\"level\":\"DEBUG\"",
    ] {
        assert!(log.contains(event), "no log line has {event:?}");
    }
    // The secrets were in use: sent to Consul, and to the health check.
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.token.as_deref() == Some(CONSUL_TOKEN)),
        "the Consul token was sent"
    );
    let root = ConnectOptions::new()
        .with_user("root", "rootpw")
        .with_timeout(Duration::from_secs(5));
    let mut reader = etcd_client::Client::connect([etcd.endpoint()], Some(root))
        .await
        .expect("root client");
    let written = reader
        .get("/secrets/vault/vault-1", None)
        .await
        .expect("get");
    assert!(
        written.kvs().is_empty(),
        "registered with the password, deregistered at stop"
    );

    let zk_client = zk.client_as("squire", ZK_PASSWORD).await;
    assert_eq!(
        zk_client.check_stat("/secrets/vault/vault-1").await,
        Ok(None),
        "registered with the digest password, deregistered at stop"
    );
    assert!(
        zk_client
            .check_stat("/secrets/vault")
            .await
            .ok()
            .flatten()
            .is_some(),
        "the parent was made with the ACL of our identity"
    );

    let secrets = [
        ("the etcd password", PASSWORD),
        ("the ZooKeeper password", ZK_PASSWORD),
        ("the wrong etcd password", WRONG_PASSWORD),
        ("the Consul token", CONSUL_TOKEN),
        ("the admin token", ADMIN_TOKEN),
        ("the wrong admin token", WRONG_TOKEN),
        ("the health check's header", HEADER_SECRET),
    ];
    let mut leaks = Vec::new();
    for (what, secret) in secrets {
        for line in &lines {
            if line.contains(secret) {
                leaks.push(format!("{what} in a log line: {line}"));
            }
        }
        for (source, text) in &answers {
            if text.contains(secret) {
                leaks.push(format!("{what} in {source}: {text}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leak(s):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
    eprintln!(
        "measured: {} log lines and {} answers searched for {} secrets, none found",
        lines.len(),
        answers.len(),
        secrets.len()
    );
}
