//! Instance ids churning through the registry leave nothing behind: the
//! per-endpoint series (`squire_upstream_picks_total`,
//! `squire_http_requests_total`) and state of an instance that left stay
//! for the grace period, then go, and `/metrics` is back at its baseline.

mod support;

use std::path::Path;
use std::time::Duration;

use support::config::{AgentToml, Section};
use support::{announce_local, eventually, session, Backend, HttpBackend, TestAgent, DEADLINE};
use tokio::net::TcpStream;

/// Shortened for the test (5 minutes in service); long enough that the
/// checks made right after an instance left run well inside it.
const GRACE: Duration = Duration::from_secs(4);
/// Instance ids churned through each upstream.
const CHURN: usize = 300;

fn remove(dir: &Path, service: &str, id: &str) {
    std::fs::remove_file(dir.join(service).join(format!("{id}.json"))).expect("deregister");
}

/// Ids routable now through each upstream, in config order.
async fn routable(agent: &TestAgent) -> Vec<Vec<String>> {
    let services = agent.json("/v1/services").await;
    services["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .map(|u| {
            u["endpoints"]
                .as_array()
                .expect("endpoints")
                .iter()
                .filter_map(|e| e["id"].as_str().map(str::to_owned))
                .collect()
        })
        .collect()
}

async fn metrics(agent: &TestAgent) -> String {
    let (status, body) = agent.get("/metrics").await;
    assert_eq!(status, 200);
    body
}

/// The value of the one series of `family` whose labels contain `label`.
fn value(metrics: &str, family: &str, label: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{family}{{")) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Checks the text format by eye's rules: every sample belongs to a family
/// declared once with `# TYPE`, its samples together, each series once.
fn assert_valid_text(metrics: &str) {
    let mut declared = std::collections::HashSet::new();
    let mut series = std::collections::HashSet::new();
    let mut current = String::new();
    for line in metrics.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().expect("name").to_owned();
            assert!(declared.insert(name.clone()), "{name} declared twice");
            current = name;
        } else if !line.starts_with('#') {
            let (key, value) = line.rsplit_once(' ').expect("sample has a value");
            assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
            let name = key.split('{').next().expect("name");
            assert!(
                name.starts_with(current.as_str()),
                "{name} outside its family block ({current})"
            );
            assert!(series.insert(key.to_owned()), "series twice: {key}");
        }
    }
    assert!(!series.is_empty(), "no samples at all");
}

/// This process's resident set, kB (0 where /proc is missing): printed,
/// not asserted (the backends and the test's own buffers are in it).
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn series_of_departed_instances_go_after_the_grace_period() {
    squire::metrics::set_departed_grace(GRACE);
    let dir = tempfile::tempdir().expect("dir");
    let tcp = Backend::start("game").await;
    let mut http = HttpBackend::start("web").await;
    announce_local(dir.path(), "game", "game-0", tcp.addr);
    announce_local(dir.path(), "web", "web-0", http.addr);
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .upstream(Section::fast_upstream("game"))
            .upstream(Section::http_upstream("web")),
    )
    .await;
    let (game, web) = (agent.listens[0], agent.listens[1]);
    let (mut baseline, mut rss_start) = (0, 0);
    let mut previous_web = http.addr;
    // Every web backend stays open to the end: a closed one's port could be
    // handed to a later one within the grace period, and the two would share
    // an endpoint label (the address) and its counts.
    let mut retired = Vec::with_capacity(CHURN);
    for i in 0..CHURN {
        let (game_id, web_id) = (format!("game-{i}"), format!("web-{i}"));
        if i > 0 {
            // A fresh port per web instance: its endpoint label is its address.
            let next = HttpBackend::start("web").await;
            announce_local(dir.path(), "game", &game_id, tcp.addr);
            announce_local(dir.path(), "web", &web_id, next.addr);
            remove(dir.path(), "game", &format!("game-{}", i - 1));
            remove(dir.path(), "web", &format!("web-{}", i - 1));
            previous_web = http.addr;
            retired.push(std::mem::replace(&mut http, next));
        }
        let want = vec![vec![game_id.clone()], vec![web_id.clone()]];
        eventually("the new instances alone routable", DEADLINE, || async {
            routable(&agent).await == want
        })
        .await;
        let (greeting, _, _) = session(game, b"hi").await.expect("tcp session");
        assert_eq!(greeting, "game");
        let mut stream = TcpStream::connect(web).await.expect("connect");
        let body = support::http_exchange(&mut stream, "/")
            .await
            .expect("http");
        assert_eq!(body, "web");
        drop(stream);
        let text = metrics(&agent).await;
        if i == 0 {
            baseline = text.lines().count();
            rss_start = rss_kb();
            assert_valid_text(&text);
        }
        if i > 0 && i % 50 == 0 {
            // Just left, within the grace period: still rendered, counts kept.
            let departed = format!("game-{}", i - 1);
            let label = format!("endpoint=\"{departed}\"");
            let picks = value(&text, "squire_upstream_picks_total", &label);
            assert_eq!(picks, Some(1), "picks of {departed} in its grace period");
            let requests = value(
                &text,
                "squire_http_requests_total",
                &format!("endpoint=\"{previous_web}\""),
            );
            assert_eq!(requests, Some(1), "requests of {previous_web} in grace");
            assert_valid_text(&text);
        }
    }
    let last = CHURN - 1;

    // Back within the grace period: the instance counts on from where it was.
    let back = format!("game-{}", last - 1);
    announce_local(dir.path(), "game", &back, tcp.addr);
    eventually("the returning instance routable", DEADLINE, || async {
        routable(&agent).await[0].contains(&back)
    })
    .await;
    let label = format!("endpoint=\"{back}\"");
    assert_eq!(
        value(
            &metrics(&agent).await,
            "squire_upstream_picks_total",
            &label
        ),
        Some(1),
        "{back} came back within the grace period with its count"
    );
    eventually("its picks to go on from 1", DEADLINE, || async {
        session(game, b"hi").await.expect("tcp session");
        value(
            &metrics(&agent).await,
            "squire_upstream_picks_total",
            &label,
        )
        .is_some_and(|picks| picks >= 2)
    })
    .await;
    remove(dir.path(), "game", &back);
    eventually("the returning instance gone again", DEADLINE, || async {
        routable(&agent).await[0] == vec![format!("game-{last}")]
    })
    .await;

    // After the grace period only the present instances are rendered.
    let expected_web = format!("endpoint=\"{}\"", http.addr);
    eventually("departed series to go", GRACE + DEADLINE, || async {
        let text = metrics(&agent).await;
        let picks: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("squire_upstream_picks_total{"))
            .collect();
        let requests: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("squire_http_requests_total{"))
            .collect();
        picks.len() == 2 && requests.len() == 1 && requests[0].contains(&expected_web)
    })
    .await;
    let text = metrics(&agent).await;
    assert_valid_text(&text);
    for i in 0..last {
        assert!(
            !text.contains(&format!("endpoint=\"game-{i}\"")),
            "game-{i} still rendered"
        );
    }
    // The present one keeps its series (its count includes the sessions
    // round robin gave it while the returning one was back).
    let present = format!("endpoint=\"game-{last}\"");
    assert!(value(&text, "squire_upstream_picks_total", &present).is_some_and(|n| n >= 1));
    for i in 0..last {
        assert!(
            !text.contains(&format!("endpoint=\"web-{i}\"")),
            "web-{i} still rendered"
        );
    }
    let lines = text.lines().count();
    println!(
        "/metrics: {baseline} lines at the start, {lines} after {CHURN} ids churned; \
         test process RSS {rss_start} kB at the start, {} kB at the end",
        rss_kb()
    );
    assert!(
        lines <= baseline + 5,
        "/metrics has {lines} lines after {CHURN} instances churned, {baseline} at the start"
    );
    agent.stop().await;
}
