//! squire out of its own resources: a squire started with a low open-files
//! limit (`ulimit -n`) and flooded with connections on its listener and
//! its admin port. It must pause instead of spinning, log once instead of
//! per accept, count the errors as its own, and never blame (eject) a
//! healthy upstream for them.

mod support;

use std::time::Duration;

use support::config::{AgentToml, Section};
use support::process::Squire;
use support::{announce_local, eventually, free_port, http_get, Backend, DEADLINE};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long CPU use is measured over.
const WINDOW: Duration = Duration::from_secs(2);

#[tokio::test]
async fn out_of_file_descriptors_squire_pauses_logs_once_and_blames_no_upstream() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("gate").await;
    announce_local(dir.path(), "gate", "gate-1", backend.addr);
    let admin = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let config = AgentToml::local(dir.path())
        .agent("admin", admin.as_str())
        .upstream(Section::fast_upstream("gate").set("listen", listen.as_str()))
        .to_string();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, &config).expect("config");
    let squire = Squire::spawn(&path, Some(48), dir.path().join("squire.log"));
    let admin = admin.parse().expect("admin");
    let listen: std::net::SocketAddr = listen.parse().expect("listen");
    eventually("squire to route to gate", DEADLINE, || async {
        support::greeting(listen).await.is_ok_and(|g| g == "gate")
    })
    .await;

    // Far more connections than 48 descriptors: squire accepts until it
    // runs out, the rest wait in the kernel's queues.
    let mut flood = Vec::new();
    for addr in [listen, admin, listen, admin] {
        for _ in 0..40 {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
            {
                flood.push(stream);
            }
        }
    }
    // Out of descriptors for a while: squire must be idle, not spinning.
    let (cpu, started) = (squire.cpu_seconds(), Instant::now());
    tokio::time::sleep(WINDOW).await;
    let busy = squire.cpu_seconds() - cpu;
    let wall = started.elapsed().as_secs_f64();
    eprintln!("measured: {busy:.2} s of CPU in {wall:.2} s out of descriptors");
    assert!(
        busy < wall / 4.0,
        "squire spun: {busy:.2} s CPU in {wall:.2} s"
    );
    drop(flood);

    // Back to normal: it routes again, counts the errors as its own, and
    // the healthy instance was never held responsible.
    eventually("squire to route again", DEADLINE, || async {
        support::greeting(listen).await.is_ok_and(|g| g == "gate")
    })
    .await;
    let (_, metrics) = http_get(admin, "/metrics").await;
    let local: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("squire_local_errors_total{kind=\"file_descriptors\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(local > 0.0, "local errors counted:\n{metrics}");
    let (_, services) = http_get(admin, "/v1/services").await;
    let services: serde_json::Value = serde_json::from_str(&services).expect("json");
    let endpoint = &services["upstreams"][0]["endpoints"][0];
    assert_eq!(endpoint["id"], "gate-1", "{services}");
    assert_eq!(
        endpoint["ejections"], 0,
        "never ejected for squire's own errors"
    );
    assert_eq!(endpoint["failures"], 0, "no failure recorded against it");
    let log = squire.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("out of resources"))
        .count();
    eprintln!("measured: {lines} log lines about running out, {local} local errors counted");
    assert!(
        (1..=6).contains(&lines),
        "logged once per kind and interval, not per error: {lines} lines"
    );
}
