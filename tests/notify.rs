//! systemd readiness against a fake `NOTIFY_SOCKET` (a datagram socket the
//! test binds, as systemd does): READY=1 once registered, WATCHDOG=1 at
//! half `WATCHDOG_USEC`, RELOADING=1 then READY=1 around a SIGHUP, and
//! STOPPING=1 at SIGTERM.

mod support;

use std::time::Duration;

use support::config::{AgentToml, Section};
use support::{Backend, DEADLINE};
use tokio::net::UnixDatagram;

/// The next message that starts with `prefix`, skipping others (watchdog
/// pings arrive in between).
async fn expect(socket: &UnixDatagram, prefix: &str, seen: &mut Vec<String>) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {prefix} within {DEADLINE:?}; saw {seen:?}"))
            .expect("recv");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(message.clone());
        if message.starts_with(prefix) {
            return message;
        }
    }
}

#[tokio::test]
async fn systemd_is_told_ready_reloading_stopping_and_fed_the_watchdog() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("game").await;
    let config = dir.path().join("agent.toml");
    let toml = AgentToml::local(dir.path())
        .agent("admin", format!("127.0.0.1:{}", support::free_port()))
        .service(Section::service("game", backend.addr));
    std::fs::write(&config, toml.to_string()).expect("config");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .args(["run", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn squire");
    let pid = child.id().expect("pid") as libc::pid_t;
    let mut seen = Vec::new();

    let ready = expect(&socket, "READY=1", &mut seen).await;
    assert!(ready.contains("STATUS=ready"), "{ready}");
    let started = tokio::time::Instant::now();
    expect(&socket, "WATCHDOG=1", &mut seen).await;
    expect(&socket, "WATCHDOG=1", &mut seen).await;
    // Two pings at half of 200 ms each.
    assert!(started.elapsed() < Duration::from_secs(2), "{seen:?}");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let reloading = expect(&socket, "RELOADING=1", &mut seen).await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    expect(&socket, "READY=1", &mut seen).await;

    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    expect(&socket, "STOPPING=1", &mut seen).await;
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_watchdog_for_another_pid_is_not_fed() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("agent.toml");
    let toml =
        AgentToml::local(dir.path()).agent("admin", format!("127.0.0.1:{}", support::free_port()));
    std::fs::write(&config, toml.to_string()).expect("config");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .args(["run", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "100000")
        .env("WATCHDOG_PID", "1")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn squire");
    let mut seen = Vec::new();
    expect(&socket, "READY=1", &mut seen).await;
    // Ten watchdog periods: nothing but what was already seen.
    let mut buf = [0u8; 256];
    let quiet = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await;
    assert!(
        quiet.is_err(),
        "a message after READY: {:?}",
        quiet.map(|r| r.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()))
    );
    child.kill().await.expect("kill");
}
