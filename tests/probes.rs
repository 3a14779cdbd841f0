//! Each health probe against a real server on loopback.

mod support;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use squire::config::{HttpProbeConfig, ProbeConfig, ProbeTls};
use squire::health::{Outcome, Probe};
use support::{eventually, HttpBackend, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_secs(2);

fn http(address: String) -> HttpProbeConfig {
    HttpProbeConfig {
        address,
        tls: None,
        method: "GET".into(),
        path: "/health".into(),
        headers: Vec::new(),
        expect_status: Vec::new(),
        body_contains: None,
    }
}

async fn run(config: ProbeConfig) -> (Outcome, String) {
    let result = Probe::new(&config)
        .expect("probe builds")
        .run(TIMEOUT)
        .await;
    (result.outcome, result.output)
}

#[tokio::test]
async fn http_status_decides_and_headers_are_sent() {
    let backend = HttpBackend::start("web").await;
    let mut config = http(backend.addr.to_string());
    config.headers = vec![("X-Probe".into(), squire::config::Secret::new("squire"))];
    let (outcome, output) = run(ProbeConfig::Http(config.clone())).await;
    assert_eq!(outcome, Outcome::Passing, "{output}");
    assert_eq!(output, "HTTP 200 OK: health 200");
    let headers = backend.last_health_headers.lock().expect("lock").clone();
    assert!(
        headers.contains(&("x-probe".into(), "squire".into())),
        "{headers:?}"
    );

    backend.set_health(503);
    assert_eq!(
        run(ProbeConfig::Http(config.clone())).await.0,
        Outcome::Critical
    );
    backend.set_health(429);
    assert_eq!(
        run(ProbeConfig::Http(config.clone())).await.0,
        Outcome::Warning
    );
    backend.set_health(302);
    assert_eq!(
        run(ProbeConfig::Http(config.clone())).await.0,
        Outcome::Passing
    );

    config.expect_status = vec![204];
    assert_eq!(
        run(ProbeConfig::Http(config.clone())).await.0,
        Outcome::Critical
    );
    backend.set_health(204);
    assert_eq!(
        run(ProbeConfig::Http(config.clone())).await.0,
        Outcome::Passing
    );

    backend.set_health(200);
    config.expect_status = Vec::new();
    config.body_contains = Some("health 200".into());
    assert_eq!(
        run(ProbeConfig::Http(config.clone())).await.0,
        Outcome::Passing
    );
    config.body_contains = Some("all good".into());
    let (outcome, output) = run(ProbeConfig::Http(config)).await;
    assert_eq!(outcome, Outcome::Critical);
    assert!(output.contains("does not contain \"all good\""), "{output}");
}

#[tokio::test]
async fn http_to_a_closed_port_is_critical() {
    let port = support::free_port();
    let (outcome, output) = run(ProbeConfig::Http(http(format!("127.0.0.1:{port}")))).await;
    assert_eq!(outcome, Outcome::Critical);
    assert!(output.starts_with("connect"), "{output}");
}

/// An HTTPS server with a certificate for 127.0.0.1 signed by its own CA;
/// returns its address and the CA's PEM.
async fn https_server() -> (std::net::SocketAddr, String) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut request = [0u8; 1024];
                let _ = tls.read(&mut request).await;
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecure",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, ca.pem())
}

#[tokio::test]
async fn https_verifies_against_the_configured_ca() {
    let (addr, ca_pem) = https_server().await;
    let mut ca_file = tempfile::NamedTempFile::new().expect("temp file");
    ca_file.write_all(ca_pem.as_bytes()).expect("write ca");
    let with = |tls: ProbeTls| {
        let mut config = http(addr.to_string());
        config.tls = Some(tls);
        ProbeConfig::Http(config)
    };

    let (outcome, output) = run(with(ProbeTls {
        ca: Some(ca_file.path().to_owned()),
        server_name: None,
        skip_verify: false,
    }))
    .await;
    assert_eq!(
        (outcome, output.as_str()),
        (Outcome::Passing, "HTTP 200 OK: secure")
    );

    let (outcome, output) = run(with(ProbeTls {
        ca: None,
        server_name: None,
        skip_verify: false,
    }))
    .await;
    assert_eq!(
        outcome,
        Outcome::Critical,
        "an unknown issuer must fail: {output}"
    );
    assert!(output.contains("TLS handshake"), "{output}");

    let (outcome, _) = run(with(ProbeTls {
        ca: Some(ca_file.path().to_owned()),
        server_name: Some("other.example".into()),
        skip_verify: false,
    }))
    .await;
    assert_eq!(
        outcome,
        Outcome::Critical,
        "a name the certificate does not carry must fail"
    );

    let (outcome, _) = run(with(ProbeTls {
        ca: None,
        server_name: None,
        skip_verify: true,
    }))
    .await;
    assert_eq!(
        outcome,
        Outcome::Passing,
        "only when verification is explicitly off"
    );
}

#[tokio::test]
async fn tcp_connects_and_checks_the_reply_prefix() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(n) = stream.read(&mut buf).await {
                    if &buf[..n] == b"PING\r\n" {
                        let _ = stream.write_all(b"+PONG\r\n").await;
                    }
                }
            });
        }
    });
    let tcp = |send: Option<&str>, expect: Option<&str>| ProbeConfig::Tcp {
        address: addr.clone(),
        send: send.map(|s| s.as_bytes().to_vec()),
        expect: expect.map(|s| s.as_bytes().to_vec()),
    };
    assert_eq!(run(tcp(None, None)).await.0, Outcome::Passing);
    assert_eq!(
        run(tcp(Some("PING\r\n"), Some("+PONG"))).await.0,
        Outcome::Passing
    );
    let (outcome, output) = run(tcp(Some("HELLO\r\n"), Some("+PONG"))).await;
    assert_eq!(outcome, Outcome::Critical, "{output}");
    let closed = ProbeConfig::Tcp {
        address: format!("127.0.0.1:{}", support::free_port()),
        send: None,
        expect: None,
    };
    assert_eq!(run(closed).await.0, Outcome::Critical);
}

#[tokio::test]
async fn grpc_health_follows_the_serving_status() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("game.Battle", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let grpc = |service: &str| ProbeConfig::Grpc {
        address: addr.clone(),
        service: service.into(),
    };
    assert_eq!(
        run(grpc("game.Battle")).await,
        (Outcome::Passing, "SERVING".into())
    );
    assert_eq!(
        run(grpc("")).await.0,
        Outcome::Passing,
        "the server as a whole"
    );
    reporter
        .set_service_status("game.Battle", tonic_health::ServingStatus::NotServing)
        .await;
    assert_eq!(
        run(grpc("game.Battle")).await,
        (Outcome::Critical, "NOT_SERVING".into())
    );
    let (outcome, output) = run(grpc("game.Unknown")).await;
    assert_eq!(outcome, Outcome::Critical);
    assert!(output.contains("NotFound"), "{output}");
}

fn script(dir: &std::path::Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path.display().to_string()
}

#[tokio::test]
async fn exec_exit_codes_map_to_outcomes_and_output_is_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let exec = |program: String, args: &[&str]| ProbeConfig::Exec {
        program,
        args: args.iter().map(|a| a.to_string()).collect(),
    };
    let ok = script(dir.path(), "ok.sh", "echo \"players: $1\"; exit 0");
    assert_eq!(
        run(exec(ok, &["42"])).await,
        (Outcome::Passing, "players: 42\n".into())
    );
    let warn = script(dir.path(), "warn.sh", "echo degraded >&2; exit 1");
    assert_eq!(
        run(exec(warn, &[])).await,
        (Outcome::Warning, "degraded\n".into())
    );
    let bad = script(dir.path(), "bad.sh", "echo broken; exit 2");
    assert_eq!(
        run(exec(bad, &[])).await,
        (Outcome::Critical, "exit 2: broken\n".into())
    );
    let chatty = script(
        dir.path(),
        "chatty.sh",
        "yes squire | head -c 100000; exit 0",
    );
    let (outcome, output) = run(exec(chatty, &[])).await;
    assert_eq!(outcome, Outcome::Passing);
    assert!(
        output.len() <= 4096 + '…'.len_utf8(),
        "output is truncated: {}",
        output.len()
    );
    let (outcome, output) = run(exec("/nonexistent/check".into(), &[])).await;
    assert_eq!(outcome, Outcome::Critical);
    assert!(output.contains("cannot run"), "{output}");
    // Shell mode as the configuration builds it.
    let shell = exec("/bin/sh".into(), &["-c", "test 1 -eq 1 && echo shell"]);
    assert_eq!(run(shell).await, (Outcome::Passing, "shell\n".into()));
}

#[tokio::test]
async fn exec_that_hangs_is_killed_at_the_timeout_with_its_children() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pids = dir.path().join("pids");
    let hang = script(
        dir.path(),
        "hang.sh",
        &format!(
            "sleep 300 & echo $! > {p}; echo $$ >> {p}; wait",
            p = pids.display()
        ),
    );
    let probe = Probe::new(&ProbeConfig::Exec {
        program: hang,
        args: Vec::new(),
    })
    .expect("probe");
    let started = tokio::time::Instant::now();
    let result = probe.run(Duration::from_millis(500)).await;
    assert_eq!(result.outcome, Outcome::Critical);
    assert_eq!(result.output, "timed out after 500ms");
    assert!(started.elapsed() < Duration::from_secs(5));
    let pids: Vec<String> = std::fs::read_to_string(&pids)
        .expect("the script wrote its pids")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(pids.len(), 2, "the sleep and the shell");
    for pid in pids {
        // Gone, or a zombie waiting for its reaper (init).
        eventually(&format!("process {pid} to be killed"), DEADLINE, || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            async move { stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z") }
        })
        .await;
    }
}
