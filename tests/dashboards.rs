//! `deploy/grafana/squire.json` and `deploy/prometheus/squire-alerts.yml`
//! against what squire really exports: every metric name their PromQL
//! names is in the scrape of a busy agent (registered, discovering, health
//! checked, TCP, TLS and HTTP traffic, an ejection, refusals); the dashboard
//! charts every family `src/metrics.rs` defines; the dashboard is a
//! Grafana dashboard with a Prometheus datasource variable; the rules are
//! well formed (and `promtool check rules` / `promtool test rules` pass
//! when promtool is on the PATH, Debian's `prometheus` package).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use support::config::{AgentToml, Section};
use support::{
    announce_local, eventually, free_port, http_exchange, http_with_token, session, Backend,
    HttpBackend, TestAgent, DEADLINE,
};
use tokio::net::TcpStream;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(repo("deploy/grafana/squire.json")).expect("dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

fn rules() -> serde_yaml::Value {
    let text =
        std::fs::read_to_string(repo("deploy/prometheus/squire-alerts.yml")).expect("alert rules");
    serde_yaml::from_str(&text).expect("the rules are YAML")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        for nested in panel["panels"].as_array().into_iter().flatten() {
            out.push(nested);
        }
    }
    out
}

/// The PromQL of every dashboard target.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    panels(dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().expect("a target has an expr").to_owned())
        .collect()
}

/// The PromQL of every rule.
fn rule_exprs(rules: &serde_yaml::Value) -> Vec<String> {
    rules["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .map(|r| r["expr"].as_str().expect("a rule has an expr").to_owned())
        .collect()
}

/// PromQL words that are not metric names: operators, modifiers, and the
/// aggregations (which may be followed by `by (...)` before their `(`).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// The metric names an expression selects: identifiers outside strings,
/// label matchers (`{...}`), ranges (`[...]`) and grouping lists (`by
/// (...)`), that are neither keywords nor function calls.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut last_word = String::new();
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' || c == '[' {
            let close = if c == '{' { '}' } else { ']' };
            while i < chars.len() && chars[i] != close {
                if chars[i] == '"' {
                    i += 1;
                    while i < chars.len() && chars[i] != '"' {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                }
                i += 1;
            }
            i += 1;
        } else if c == '(' && GROUPING.contains(&last_word.as_str()) {
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            i += 1;
            last_word.clear();
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = chars.get(next) == Some(&'(');
            if !call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word.clone());
            }
            last_word = word;
        } else if c.is_ascii_digit() || c == '.' {
            // A number (1, 0.99, 1e3): its letters are not a name.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            if !c.is_whitespace() {
                last_word.clear();
            }
            i += 1;
        }
    }
    names
}

/// Words followed by a list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The family a sample name belongs to, given the histogram families of
/// the scrape: `x_bucket`, `x_sum`, `x_count` of a histogram `x` are `x`.
fn family_of(name: &str, histograms: &BTreeSet<String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if histograms.contains(base) {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

/// Every metric family `src/metrics.rs` defines (its constants and the
/// process families it renders).
fn defined_families() -> BTreeSet<String> {
    let source = std::fs::read_to_string(repo("src/metrics.rs")).expect("src/metrics.rs");
    let mut families = BTreeSet::new();
    for piece in source.split('"').skip(1).step_by(2) {
        let is_name = piece
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if is_name && (piece.starts_with("squire_") || piece.starts_with("process_")) {
            families.insert(piece.to_owned());
        }
    }
    families
}

#[test]
fn names_are_parsed_out_of_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, check) (rate(squire_check_duration_seconds_bucket{job=~"$job",x="a{b}"}[$__rate_interval]))) / on (instance) group_left(version) squire_build_info or vector(0) and up == 1e3"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "squire_build_info",
            "squire_check_duration_seconds_bucket",
            "up"
        ]
    );
    let histograms = BTreeSet::from(["squire_check_duration_seconds".to_owned()]);
    assert_eq!(
        family_of("squire_check_duration_seconds_bucket", &histograms),
        "squire_check_duration_seconds"
    );
    assert_eq!(
        family_of("squire_tcp_connections_failed_total", &histograms),
        "squire_tcp_connections_failed_total"
    );
    // A bare histogram name selects nothing; it stays itself, so the scrape
    // check below refuses it.
    assert_eq!(
        family_of("squire_check_duration_seconds", &histograms),
        "squire_check_duration_seconds"
    );
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable() {
    let dashboard = dashboard();
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let name = datasource["name"].as_str().expect("its name");
    let uid = format!("${{{name}}}");
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(variable["datasource"]["uid"], uid.as_str(), "{variable}");
    }

    let all = panels(&dashboard);
    let rows: Vec<&str> = all
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().expect("row title"))
        .collect();
    for wanted in [
        "Registration",
        "Discovery",
        "Health checks",
        "Traffic per upstream",
        "Errors",
        "Ejections and panic mode",
        "Process",
    ] {
        assert!(rows.contains(&wanted), "no row {wanted} in {rows:?}");
    }
    let mut ids = BTreeSet::new();
    let mut charts = 0;
    for panel in &all {
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "duplicate id: {panel}"
        );
        let grid = &panel["gridPos"];
        for key in ["h", "w", "x", "y"] {
            assert!(grid[key].is_u64(), "{key} of {}", panel["title"]);
        }
        assert!(grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24);
        if panel["type"] == "row" {
            continue;
        }
        charts += 1;
        assert_eq!(
            panel["datasource"]["type"], "prometheus",
            "{}",
            panel["title"]
        );
        assert_eq!(
            panel["datasource"]["uid"],
            uid.as_str(),
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        let mut refs = BTreeSet::new();
        for target in targets {
            assert!(refs.insert(target["refId"].as_str().expect("refId")));
            let expr = target["expr"].as_str().expect("expr");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "unbalanced: {expr}"
            );
        }
    }
    assert!(charts >= 40, "only {charts} charts");
}

#[test]
fn the_dashboard_charts_every_family_squire_defines() {
    let defined = defined_families();
    assert!(
        defined.len() >= 55,
        "read only {defined:?} from src/metrics.rs"
    );
    let histograms: BTreeSet<String> = defined
        .iter()
        .filter(|f| f.ends_with("_seconds") && !f.starts_with("process_"))
        .cloned()
        .collect();
    let charted: BTreeSet<String> = dashboard_exprs(&dashboard())
        .iter()
        .flat_map(|e| metric_names(e))
        .map(|n| family_of(&n, &histograms))
        .collect();
    let missing: Vec<_> = defined.difference(&charted).collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

#[test]
fn every_rule_has_for_severity_summary_and_description() {
    let rules = rules();
    let groups = rules["groups"].as_sequence().expect("groups");
    assert!(!groups.is_empty());
    let mut alerts = BTreeSet::new();
    for group in groups {
        assert!(group["name"].as_str().is_some_and(|n| !n.is_empty()));
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("only alerting rules");
            assert!(alerts.insert(name.to_owned()), "{name} twice");
            let expr = rule["expr"].as_str().expect("expr");
            assert!(!metric_names(expr).is_empty(), "{name}: {expr}");
            let wait = rule["for"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no for"));
            let digits = wait.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            assert!(
                digits.parse::<u32>().is_ok() && ["s", "m", "h"].contains(&&wait[digits.len()..]),
                "{name}: for {wait}"
            );
            let severity = rule["labels"]["severity"].as_str().expect("severity");
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}"
            );
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation]
                        .as_str()
                        .is_some_and(|t| t.len() > 10),
                    "{name}: {annotation}"
                );
            }
        }
    }
    for wanted in [
        "SquireNotRegistered",
        "SquireRegistryUnreachable",
        "SquireLeaseRegrants",
        "SquireNoHealthyEndpoint",
        "SquirePanicMode",
        "SquireEjections",
    ] {
        assert!(alerts.contains(wanted), "no {wanted} in {alerts:?}");
    }
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    let Some(promtool) = which("promtool") else {
        eprintln!("promtool is not on the PATH: the rules were checked structurally only");
        return;
    };
    for args in [
        ["check", "rules", "deploy/prometheus/squire-alerts.yml"],
        ["test", "rules", "deploy/prometheus/squire-alerts.test.yml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Names Prometheus makes itself, not squire.
const PROMETHEUS_OWN: &[&str] = &["up"];

/// Families only an agent on a Nacos registry exports (its push
/// subscription, labelled by server): tests/nacos.rs sees the first three
/// on such an agent against a real server; the malformed count is unit
/// tested in src/registry/nacos/push.rs.
const NACOS_ONLY: &[&str] = &[
    "squire_registry_push_up",
    "squire_registry_pushes_total",
    "squire_registry_push_acks_total",
    "squire_registry_pushes_malformed_total",
];

#[tokio::test]
async fn every_name_the_dashboard_and_the_alerts_query_is_in_a_busy_agents_scrape() {
    let dir = tempfile::tempdir().expect("dir");
    let web = HttpBackend::start("web").await;
    let game = Backend::start("game").await;
    let check = Section::new()
        .set("kind", "http")
        .set("path", "/health")
        .set("interval", "200ms")
        .set("timeout", "150ms");
    // One agent does everything: it announces `web` with a health check,
    // proxies `game` over TCP (and again behind a TLS listener, and over
    // UDP), `web` over
    // HTTP, and `dead`, whose only instance refuses connections (connect
    // failures, an ejection).
    let ca = support::certs::Ca::new("dashboards test CA");
    let pair = ca.issue(dir.path(), "listener", &["127.0.0.1"]);
    let mut listen_tls = toml::Table::new();
    listen_tls.insert("cert".into(), pair.cert.display().to_string().into());
    listen_tls.insert("key".into(), pair.key.display().to_string().into());
    let dead = free_port();
    announce_local(
        dir.path(),
        "dead",
        "dead-1",
        format!("127.0.0.1:{dead}").parse().expect("addr"),
    );
    // An instance at an unspecified address, which the endpoint policy
    // refuses (squire_registry_entries_refused_total).
    support::announce_local_at(dir.path(), "dead", "dead-0", "0.0.0.0", dead);
    let game_agent = TestAgent::start(
        &AgentToml::local(dir.path()).service(Section::service("game", game.addr)),
    )
    .await;
    let agent = TestAgent::start(
        &AgentToml::local(dir.path())
            .service(Section::service("web", web.addr))
            .check(check)
            .upstream(Section::fast_upstream("game"))
            .upstream(Section::http_upstream("web"))
            .upstream(
                Section::fast_upstream("dead")
                    .set("retries", 0)
                    .raw("[upstream.ejection]\nconsecutive_failures = 1\nmax_share = 1.0\n"),
            )
            .upstream(Section::fast_upstream("game").set("listen_tls", listen_tls))
            // Its families are registered with the listener (no traffic).
            .upstream(Section::upstream("game").set("protocol", "udp")),
    )
    .await;
    let (tcp, http, dead_listen, tls) = (
        agent.listens[0],
        agent.listens[1],
        agent.listens[2],
        agent.listens[3],
    );
    eventually("the tcp listener routes", DEADLINE, || async {
        session(tcp, b"x").await.is_ok_and(|(g, _, _)| g == "game")
    })
    .await;
    eventually("the http listener routes", DEADLINE, || async {
        match TcpStream::connect(http).await {
            Ok(mut stream) => http_exchange(&mut stream, "/")
                .await
                .is_ok_and(|b| b == "web"),
            Err(_) => false,
        }
    })
    .await;
    eventually("an ejection", DEADLINE, || async {
        let _ = support::greeting(dead_listen).await;
        agent
            .metric("squire_upstream_ejections_total{upstream=\"dead\"")
            .await
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    // A client that does not speak TLS to the TLS listener.
    eventually("a failed TLS handshake", DEADLINE, || async {
        if let Ok(mut stream) = TcpStream::connect(tls).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        }
        agent
            .metric("squire_tls_handshake_failures_total{upstream=\"game\"")
            .await
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    // A refused admin request and a reload (the in-process agent has no
    // file to read again, so it is counted as failed).
    let (status, _) = support::http_request(agent.admin, "POST", "/v1/reload").await;
    assert_eq!(status, 401);
    let _ = http_with_token(agent.admin, "POST", "/v1/reload", agent.token.expose()).await;
    for written in [
        "squire_status_writes_total",
        "squire_check_transitions_total",
    ] {
        eventually(written, DEADLINE, || async {
            agent.metric(written).await.is_some()
        })
        .await;
    }

    let (status, scrape) = agent.get("/metrics").await;
    assert_eq!(status, 200);
    let mut histograms = BTreeSet::new();
    let mut samples = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            if let (Some(name), Some("histogram")) = (words.next(), words.next()) {
                histograms.insert(name.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_owned());
        }
    }
    assert!(histograms.len() >= 3, "{histograms:?}");

    let dashboard = dashboard();
    let rules = rules();
    let mut queried = BTreeSet::new();
    for (source, exprs) in [
        ("deploy/grafana/squire.json", dashboard_exprs(&dashboard)),
        ("deploy/prometheus/squire-alerts.yml", rule_exprs(&rules)),
    ] {
        assert!(exprs.len() >= 8, "{source}: {} expressions", exprs.len());
        for expr in exprs {
            for name in metric_names(&expr) {
                queried.insert((name, source, expr.clone()));
            }
        }
    }
    let missing: Vec<String> = queried
        .iter()
        .filter(|(name, _, _)| !PROMETHEUS_OWN.contains(&name.as_str()))
        .filter(|(name, _, _)| !NACOS_ONLY.contains(&name.as_str()))
        .filter(|(name, _, _)| !samples.contains(name))
        .map(|(name, source, expr)| {
            format!(
                "{name} ({source}: {expr}) [family {}]",
                family_of(name, &histograms)
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not in the scrape:\n{}\n\n{scrape}",
        missing.join("\n")
    );
    agent.stop().await;
    game_agent.stop().await;
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
