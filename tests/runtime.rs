//! `agent.threads = 1` runs the whole agent on a current-thread runtime
//! (src/main.rs): the real binary registers, proxies TCP and HTTP through
//! its listeners, serves the admin API while a client holds a proxied
//! connection open, reloads on SIGHUP and stops on SIGTERM with its
//! registration removed. Nothing may rely on a second worker thread.

mod support;

use std::net::SocketAddr;

use support::config::{AgentToml, Section};
use support::process::Squire;
use support::{eventually, free_port, http_get, metric, Backend, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A one-request HTTP/1.1 server answering every request with `body`.
async fn http_backend(body: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                // The client's end does not matter to the test.
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn one_thread_registers_proxies_reloads_and_stops() {
    let dir = tempfile::tempdir().expect("dir");
    let registry = dir.path().join("registry");
    let game = Backend::start("game").await;
    let web = http_backend("from-web").await;
    support::announce_local(&registry, "web", "web-1", web);
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let (tcp, http) = (free_port(), free_port());
    let toml = |drain_delay: &str| {
        AgentToml::local(&registry)
            .agent("admin", admin.to_string())
            .agent("threads", 1)
            .agent("drain_delay", drain_delay)
            .agent("drain_timeout", "1s")
            .agent("drain_spread", "0s")
            .service(Section::service("game", game.addr))
            .upstream(Section::fast_upstream("game").set("listen", format!("127.0.0.1:{tcp}")))
            .upstream(Section::http_upstream("web").set("listen", format!("127.0.0.1:{http}")))
            .to_string()
    };
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml("0s")).expect("config");
    let mut squire = Squire::spawn(&config, None, dir.path().join("squire.log"));
    eventually("squire to be ready", DEADLINE, || async {
        tokio::net::TcpStream::connect(admin).await.is_ok()
            && http_get(admin, "/ready").await.0 == 200
    })
    .await;
    let registration = registry.join("game");
    assert!(
        std::fs::read_dir(&registration).is_ok_and(|mut d| d.next().is_some()),
        "registered:\n{}",
        squire.log()
    );

    // TCP: through the listener to the registered game server.
    let tcp_listen: SocketAddr = format!("127.0.0.1:{tcp}").parse().expect("addr");
    eventually("a greeting through the TCP listener", DEADLINE, || async {
        support::greeting(tcp_listen)
            .await
            .is_ok_and(|g| g == "game")
    })
    .await;
    // A proxied connection held open does not stop the admin API or HTTP.
    let mut held = tokio::net::TcpStream::connect(tcp_listen)
        .await
        .expect("connect");
    let mut line = [0u8; 5];
    held.read_exact(&mut line).await.expect("greeting");
    assert_eq!(&line, b"game\n");
    let http_listen: SocketAddr = format!("127.0.0.1:{http}").parse().expect("addr");
    eventually("an answer through the HTTP listener", DEADLINE, || async {
        http_get(http_listen, "/").await == (200, "from-web".to_owned())
    })
    .await;
    assert_eq!(http_get(admin, "/live").await.0, 200);

    // SIGHUP: a reload that changes a key applies.
    std::fs::write(&config, toml("1ms")).expect("config");
    squire.hangup();
    eventually("the reload", DEADLINE, || async {
        metric(admin, "squire_config_reloads_total{result=\"ok\"}").await == Some(1.0)
    })
    .await;
    assert_eq!(
        http_get(http_listen, "/").await,
        (200, "from-web".to_owned())
    );

    // SIGTERM: deregistered, the held connection cut by the drain, exit 0.
    let status = squire.stop(DEADLINE).await;
    assert!(status.success(), "{status}\n{}", squire.log());
    assert!(
        std::fs::read_dir(&registration).is_ok_and(|mut d| d.next().is_none()),
        "deregistered:\n{}",
        squire.log()
    );
    drop(held);
}
