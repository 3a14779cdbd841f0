//! A scrape of a busy agent (registered with a passing health check, a
//! TCP and an HTTP listener that carried traffic, a maintenance round)
//! checked the way `promtool check metrics` checks an exporter: every
//! family has HELP and TYPE once, before its samples; names and labels are
//! valid; counters end in `_total` and nothing else does; histograms have
//! their buckets up to `+Inf`, `_sum` and `_count`; no series twice. With
//! `promtool` on the PATH (Debian's `prometheus` package) it runs too.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use support::config::{AgentToml, Section};
use support::{eventually, http_exchange, session, Backend, HttpBackend, TestAgent, DEADLINE};
use tokio::net::TcpStream;

#[derive(Debug, Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: usize,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label(name: &str) -> bool {
    valid_name(name) && !name.contains(':') && !name.starts_with("__")
}

/// A sample's name, labels and value.
type Sample = (String, Vec<(String, String)>, f64);

/// Splits `name{a="x",b="y"} value` into the name, its labels, and value.
fn sample(line: &str) -> Result<Sample, String> {
    let (series, value) = line.rsplit_once(' ').ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("value {v:?}"))?,
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Ok((series.to_owned(), Vec::new(), value));
    };
    let body = rest.strip_suffix('}').ok_or("unclosed labels")?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return Err(format!("label {key} value not quoted"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        }
        labels.push((key, value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Ok((name.to_owned(), labels, value))
}

/// Every problem promtool's metrics check and the exposition format rules
/// find in `text`.
fn lint(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut buckets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let family = families.entry(name.to_owned()).or_default();
            if family.help.is_some() {
                problems.push(format!("{name}: HELP twice"));
            }
            if help.trim().is_empty() {
                problems.push(format!("{name}: empty HELP"));
            }
            family.help = Some(help.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let family = families.entry(name.to_owned()).or_default();
            if family.kind.is_some() {
                problems.push(format!("{name}: TYPE twice"));
            }
            if family.samples > 0 {
                problems.push(format!("{name}: TYPE after its samples"));
            }
            family.kind = Some(kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, labels, _) = match sample(line) {
            Ok(parsed) => parsed,
            Err(e) => {
                problems.push(format!("{line:?}: {e}"));
                continue;
            }
        };
        if !valid_name(&name) {
            problems.push(format!("{name}: invalid metric name"));
        }
        for (label, _) in &labels {
            if !valid_label(label) {
                problems.push(format!("{name}: invalid label name {label:?}"));
            }
        }
        let family_name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                let histogram = families
                    .get(base)
                    .is_some_and(|f| matches!(f.kind.as_deref(), Some("histogram" | "summary")));
                histogram.then(|| base.to_owned())
            })
            .unwrap_or_else(|| name.clone());
        let key = format!("{name}{labels:?}");
        if !seen.insert(key) {
            problems.push(format!("{name}: a series twice ({labels:?})"));
        }
        if name.ends_with("_bucket") && family_name != name {
            let mut others: Vec<_> = labels.iter().filter(|(k, _)| k != "le").collect();
            others.sort();
            if let Some((_, le)) = labels.iter().find(|(k, _)| k == "le") {
                if le == "+Inf" {
                    buckets
                        .entry(family_name.clone())
                        .or_default()
                        .insert(format!("{others:?}"));
                }
            } else {
                problems.push(format!("{name}: a bucket without le"));
            }
        }
        let family = families.entry(family_name.clone()).or_default();
        if family.kind.is_none() {
            problems.push(format!("{family_name}: a sample before its TYPE"));
        }
        family.samples += 1;
    }
    for (name, family) in &families {
        if family.help.is_none() {
            problems.push(format!("{name}: no HELP"));
        }
        match family.kind.as_deref() {
            Some("counter") if !name.ends_with("_total") => {
                problems.push(format!("{name}: a counter without the _total suffix"))
            }
            Some(kind) if kind != "counter" && name.ends_with("_total") => {
                problems.push(format!("{name}: a {kind} with the _total suffix"))
            }
            Some("histogram") if !buckets.contains_key(name) && family.samples > 0 => {
                problems.push(format!("{name}: a histogram without a +Inf bucket"))
            }
            Some("counter" | "gauge" | "histogram" | "summary" | "untyped") => {}
            other => problems.push(format!("{name}: TYPE {other:?}")),
        }
    }
    problems
}

#[test]
fn the_lint_finds_what_promtool_finds() {
    let bad = "# TYPE a_count counter\na_count 1\n# HELP b \n# TYPE b gauge\nb{x=\"1\"} 2\nb{x=\"1\"} 3\n# HELP c_total c\n# TYPE c_total gauge\nc_total 1\nd 4\n";
    let found = lint(bad);
    for expected in [
        "a_count: no HELP",
        "a_count: a counter without the _total suffix",
        "b: empty HELP",
        "b: a series twice",
        "c_total: a gauge with the _total suffix",
        "d: a sample before its TYPE",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "{expected} not in {found:#?}"
        );
    }
}

#[tokio::test]
async fn a_busy_agents_scrape_passes_the_metrics_checks() {
    let dir = tempfile::tempdir().expect("dir");
    let web = HttpBackend::start("web").await;
    let tcp = Backend::start("game").await;
    let check = Section::new()
        .set("kind", "http")
        .set("path", "/health")
        .set("interval", "200ms")
        .set("timeout", "150ms");
    let a = TestAgent::start(
        &AgentToml::local(dir.path())
            .service(Section::service("web", web.addr))
            .check(check)
            .upstream(Section::http_upstream("web"))
            .upstream(Section::fast_upstream("nothing")),
    )
    .await;
    let b =
        TestAgent::start(&AgentToml::local(dir.path()).service(Section::service("game", tcp.addr)))
            .await;
    let c =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::fast_upstream("game")))
            .await;
    eventually("the http listener routes", DEADLINE, || async {
        match TcpStream::connect(a.listens[0]).await {
            Ok(mut stream) => http_exchange(&mut stream, "/").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    eventually("the tcp listener routes", DEADLINE, || async {
        session(c.listen(), b"x")
            .await
            .is_ok_and(|(g, _, _)| g == "game")
    })
    .await;
    // A refused connection, and a maintenance round for the status series.
    let _ = support::greeting(a.listens[1]).await;
    squire::admin::set_maintenance(a.admin, Ok(&a.token), true, None)
        .await
        .expect("maintenance on");
    squire::admin::set_maintenance(a.admin, Ok(&a.token), false, None)
        .await
        .expect("maintenance off");

    for written in [
        "squire_status_writes_total",
        "squire_check_transitions_total",
    ] {
        eventually(written, DEADLINE, || async {
            a.metric(written).await.is_some()
        })
        .await;
    }

    for agent in [&a, &c] {
        let (status, text) = agent.get("/metrics").await;
        assert_eq!(status, 200);
        let problems = lint(&text);
        assert!(problems.is_empty(), "{problems:#?}\n{text}");
        let busy: &[&str] = if std::ptr::eq(agent, &a) {
            // The families that once went without HELP.
            &[
                "squire_check_status",
                "squire_check_results_total",
                "squire_check_duration_seconds",
                "squire_check_transitions_total",
                "squire_announced_status",
                "squire_status_writes_total",
            ]
        } else {
            &[
                "squire_upstream_picks_total",
                "squire_tcp_connections_accepted_total",
            ]
        };
        for family in busy.iter().copied().chain([
            "squire_build_info",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ]) {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing"
            );
        }
        assert!(text.contains(&format!(
            "squire_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            squire::COMMIT
        )));
        if let Ok(promtool) = which("promtool") {
            let mut child = std::process::Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run promtool");
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("feed promtool");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .ok_or(())
}
