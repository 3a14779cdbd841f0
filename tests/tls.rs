//! TLS end to end, with certificates made in the test: squire and a real
//! etcd that requires client certificates (`--client-cert-auth`); squire
//! and a Consul agent that does; and two squire processes carrying game
//! traffic over mutual TLS (game client -> local squire, plain -> TLS ->
//! remote squire's TLS listener -> game server), a client certificate of
//! another CA refused, and a rotated certificate served after SIGHUP.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::certs::{Ca, Pair};
use support::config::{AgentToml, Section};
use support::consul::{FakeConsul, FakeOptions};
use support::process::Squire;
use support::{
    announce_local, eventually, free_port, session, Backend, Etcd, EtcdTls, TestAgent, DEADLINE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "n0t-pr1nted-pa55word";

fn client_tls(ca: &Path, client: Option<&Pair>) -> toml::Value {
    let mut table = toml::Table::new();
    table.insert("ca".into(), ca.display().to_string().into());
    if let Some(pair) = client {
        table.insert("client_cert".into(), pair.cert.display().to_string().into());
        table.insert("client_key".into(), pair.key.display().to_string().into());
    }
    table.into()
}

/// The registry keys `ca`, `client_cert`, `client_key` on `section`.
fn with_client_tls(mut section: Section, ca: &Path, client: Option<&Pair>) -> Section {
    if let toml::Value::Table(table) = client_tls(ca, client) {
        for (key, value) in table {
            section = section.set(&key, value);
        }
    }
    section
}

#[tokio::test]
async fn etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("etcd test CA");
    let tls = EtcdTls {
        ca: ca.write(dir.path(), "ca.pem"),
        server: ca.issue(dir.path(), "etcd", &["127.0.0.1", "localhost"]),
        client: ca.issue(dir.path(), "client", &["squire"]),
    };
    let etcd = Etcd::start_tls(tls.clone()).await;
    assert!(etcd.endpoint().starts_with("https://"));

    // With the client certificate: registers, and watches what another
    // instance registered.
    let backend = Backend::start("tls-game-1").await;
    let registry = with_client_tls(Section::etcd(&etcd, "/tls"), &tls.ca, Some(&tls.client));
    let a = TestAgent::start(
        &AgentToml::new(registry.clone()).service(Section::game_service("game", backend.addr)),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::new(registry).upstream(Section::fast_upstream("game"))).await;
    let mut client = etcd.client().await;
    eventually("the instance registered over TLS", DEADLINE, || {
        let mut client = client.clone();
        async move {
            client
                .get("/tls/game/game-1", None)
                .await
                .is_ok_and(|r| r.count() == 1)
        }
    })
    .await;
    eventually("B to route to A through the watch", DEADLINE, || async {
        b.routable().await == ["game-1"]
    })
    .await;
    let (greeting, echoed, _) = session(b.listen(), b"hello").await.expect("session");
    assert_eq!(
        (greeting.as_str(), echoed.as_slice()),
        ("tls-game-1", &b"hello"[..])
    );

    // Without one (a password set, to show it never prints): refused, and
    // the log says why.
    let config = dir.path().join("no-cert.toml");
    let no_cert = with_client_tls(Section::etcd(&etcd, "/tls"), &tls.ca, None)
        .set("username", "squire")
        .set("password", PASSWORD);
    let toml = AgentToml::new(no_cert).service(Section::game_service("other", backend.addr));
    std::fs::write(&config, toml.to_string()).expect("write config");
    let refused = Squire::spawn(&config, None, dir.path().join("no-cert.log"));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let log = refused.log();
        if let Some(line) = log.lines().find(|l| {
            l.contains("registration failed") && l.to_ascii_lowercase().contains("certificate")
        }) {
            eprintln!("refused as: {line}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no clear refusal logged:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = refused.log();
    assert!(!log.contains(PASSWORD), "the password shows:\n{log}");
    assert!(
        client
            .get(
                "/tls/other/",
                Some(etcd_client::GetOptions::new().with_prefix())
            )
            .await
            .expect("get")
            .count()
            == 0,
        "nothing registered without a certificate"
    );
    drop(refused);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn consul_over_https_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("consul test CA");
    let server = ca.issue(dir.path(), "consul", &["127.0.0.1"]);
    let client = ca.issue(dir.path(), "client", &["squire"]);
    let ca_file = ca.write(dir.path(), "ca.pem");
    let read = |p: &Path| std::fs::read_to_string(p).expect("read");
    let fake = FakeConsul::with_options(FakeOptions {
        tls: Some((read(&server.cert), read(&server.key))),
        tls_client_ca: Some(ca.pem()),
        ..FakeOptions::default()
    })
    .await;
    let backend = Backend::start("A").await;
    let registry = with_client_tls(Section::consul(&fake), &ca_file, Some(&client));
    let a = TestAgent::start(
        &AgentToml::new(registry.clone()).service(Section::game_service("mtls", backend.addr)),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::new(registry).upstream(Section::fast_upstream("mtls"))).await;
    eventually(
        "B to route to A through Consul over mTLS",
        DEADLINE,
        || async { b.routable().await == ["mtls-1"] },
    )
    .await;
    // Without the client certificate the agent refuses the handshake, and
    // the error says so.
    let toml = AgentToml::new(with_client_tls(Section::consul(&fake), &ca_file, None)).to_string();
    let config = squire::Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}"));
    let without = squire::agent::connect_registry(&config.registries[0]).expect("registry");
    let instance = squire::registry::Instance {
        name: "nocert".into(),
        id: "nocert-1".into(),
        host: "127.0.0.1".into(),
        port: 1,
        tags: Vec::new(),
        metadata: Default::default(),
        version: String::new(),
        weight: 1,
        status: squire::registry::Status::Healthy,
        load: None,
    };
    match without.register(&instance).await {
        Ok(_) => panic!("registered without a client certificate"),
        Err(e) => assert!(
            e.to_string().to_ascii_lowercase().contains("certificate"),
            "{e}"
        ),
    }
    a.stop().await;
    b.stop().await;
}

/// The remote squire: a TLS listener (mTLS with `client_ca`) forwarding to
/// the `game` instances.
fn remote_toml(
    registry: &Path,
    admin: SocketAddr,
    listen: SocketAddr,
    server: &Pair,
    client_ca: &Path,
) -> AgentToml {
    let mut listen_tls = toml::Table::new();
    listen_tls.insert("cert".into(), server.cert.display().to_string().into());
    listen_tls.insert("key".into(), server.key.display().to_string().into());
    listen_tls.insert("client_ca".into(), client_ca.display().to_string().into());
    listen_tls.insert("handshake_timeout".into(), "2s".into());
    AgentToml::local(registry)
        .agent("admin", admin.to_string())
        .upstream(
            Section::fast_upstream("game")
                .set("listen", listen.to_string())
                .set("listen_tls", listen_tls),
        )
}

/// A TLS client of `addr` trusting `ca`, presenting `client`: the
/// certificate the server presented, or why the exchange failed (a
/// refused client certificate shows on the first read in TLS 1.3).
async fn tls_hello(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Pair>,
) -> Result<(Vec<u8>, String), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA") {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(pair) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&pair.cert)
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert PEM"),
                PrivateKeyDer::from_pem_file(&pair.key).expect("key"),
            )
            .expect("client auth"),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("remote.squire.test").expect("name");
    let mut stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let served = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    stream.shutdown().await.ok();
    Ok((served, String::from_utf8_lossy(&line).into_owned()))
}

/// A handshake or first read that failed, or a connection closed at once.
fn was_refused(hello: &Result<(Vec<u8>, String), String>) -> bool {
    match hello {
        Err(_) => true,
        Ok((_, line)) => line.is_empty(),
    }
}

fn first_cert(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .expect("cert")
        .next()
        .expect("one certificate")
        .expect("cert PEM")
        .to_vec()
}

async fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = support::http_get(admin, "/metrics").await;
    body.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_admin(squire: &mut Squire, admin: SocketAddr) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while TcpStream::connect(admin).await.is_err() {
        assert!(squire.exited().is_none(), "squire exited\n{}", squire.log());
        assert!(
            tokio::time::Instant::now() < deadline,
            "no admin API\n{}",
            squire.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn two_squires_carry_game_traffic_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = dir.path().join("registry");
    let ca = Ca::new("fleet CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let remote_cert = ca.issue(dir.path(), "remote", &["remote.squire.test"]);
    let local_cert = ca.issue(dir.path(), "local", &["local.squire.test"]);

    // The game server, and the remote squire's TLS listener in front of it,
    // announced as `game-tls` with the name its certificate carries.
    let game = Backend::start("game-server-1").await;
    announce_local(&registry, "game", "game-1", game.addr);
    let remote_listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let remote_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let remote_config = dir.path().join("remote.toml");
    std::fs::write(
        &remote_config,
        remote_toml(
            &registry,
            remote_admin,
            remote_listen,
            &remote_cert,
            &ca_file,
        )
        .to_string(),
    )
    .expect("write config");
    let mut remote = Squire::spawn(&remote_config, None, dir.path().join("remote.log"));
    wait_admin(&mut remote, remote_admin).await;
    let record = format!(
        r#"{{"expires_at_ms":{},"instance":{{"name":"game-tls","id":"remote-1","host":"127.0.0.1","port":{},"metadata":{{"tls_name":"remote.squire.test"}}}}}}"#,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
            + 600_000,
        remote_listen.port()
    );
    std::fs::create_dir_all(registry.join("game-tls")).expect("mkdir");
    std::fs::write(registry.join("game-tls").join("remote-1.json"), record).expect("announce");

    // The local squire: plain for the game client, TLS to the remote one.
    let local_listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let local_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut dial = match client_tls(&ca_file, Some(&local_cert)) {
        toml::Value::Table(table) => table,
        _ => unreachable!(),
    };
    dial.insert("server_name_metadata".into(), "tls_name".into());
    let local_toml = AgentToml::local(&registry)
        .agent("admin", local_admin.to_string())
        .upstream(
            Section::fast_upstream("game-tls")
                .set("listen", local_listen.to_string())
                .set("tls", dial),
        );
    let local_config = dir.path().join("local.toml");
    std::fs::write(&local_config, local_toml.to_string()).expect("write config");
    let mut local = Squire::spawn(&local_config, None, dir.path().join("local.log"));
    wait_admin(&mut local, local_admin).await;

    // Game traffic crosses both, encrypted between them, half-close too.
    eventually("a session through both squires", DEADLINE, || async {
        session(local_listen, b"move north")
            .await
            .is_ok_and(|(greeting, echoed, bye)| {
                greeting == "game-server-1" && echoed == b"move north" && bye == "bye 10\n"
            })
    })
    .await;
    // What goes to the remote listener is TLS: a plain client gets nothing.
    let mut plain = TcpStream::connect(remote_listen).await.expect("connect");
    plain.write_all(b"hello\n").await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"game-server-1"),
        "plain text went through"
    );

    // A client certificate of another CA is refused by the TLS listener,
    // and so is none; each refusal is counted.
    let other = Ca::new("another CA");
    let stranger = other.issue(dir.path(), "stranger", &["stranger.test"]);
    let refused = tls_hello(remote_listen, &ca_file, Some(&stranger)).await;
    assert!(
        was_refused(&refused),
        "a foreign client certificate was accepted: {refused:?}"
    );
    let refused = tls_hello(remote_listen, &ca_file, None).await;
    assert!(
        was_refused(&refused),
        "no client certificate was accepted: {refused:?}"
    );
    let failures = "squire_tls_handshake_failures_total{";
    eventually("the refused handshakes to be counted", DEADLINE, || async {
        metric(remote_admin, failures).await >= 3.0
    })
    .await;
    assert!(
        remote.log().contains("TLS handshake with a client failed"),
        "{}",
        remote.log()
    );
    // The right certificate still works, and the served one is the file's.
    let (served, line) = tls_hello(remote_listen, &ca_file, Some(&local_cert))
        .await
        .expect("mTLS hello");
    assert_eq!(line, "game-server-1");
    assert_eq!(served, first_cert(&remote_cert.cert));

    // Rotation: new files in place, SIGHUP, the new certificate is served.
    let rotated = ca.issue(dir.path(), "rotated", &["remote.squire.test"]);
    std::fs::rename(&rotated.cert, &remote_cert.cert).expect("replace cert");
    std::fs::rename(&rotated.key, &remote_cert.key).expect("replace key");
    let new_cert = first_cert(&remote_cert.cert);
    remote.hangup();
    eventually("the rotated certificate to be served", DEADLINE, || async {
        tls_hello(remote_listen, &ca_file, Some(&local_cert))
            .await
            .is_ok_and(|(served, line)| served == new_cert && line == "game-server-1")
    })
    .await;
    // And the game path goes on over it.
    let (greeting, _, _) = session(local_listen, b"again").await.expect("session");
    assert_eq!(greeting, "game-server-1");
    for log in [remote.log(), local.log()] {
        assert!(!log.contains("PRIVATE KEY"), "a key shows:\n{log}");
    }
}
