//! A failover run (`benches/failover.sh`): steady connection churn through a
//! proxy while an instance behind it is killed, and what the proxy saw.
//!
//! Connections start at a fixed rate (open loop, at most `conns` in flight;
//! a start that would exceed it is skipped and counted), each one connect,
//! `PING\r\n`, the backend's `+PONG {name}\r\n`, close: every connection is
//! timestamped and knows which backend answered. At `before` the processes
//! `kill` are sent SIGKILL (the instant is taken right after, so it is
//! exact); the load runs on for `after`. The signal is asynchronous: a
//! connection started before the server process had exited (`gone_us`
//! later) may still have reached it, and counts as in flight at the kill. Meanwhile the proxy's admin
//! `/metrics` is polled every `poll`: the victim's pick counter (one per
//! connect attempt), the ejected-endpoints gauge and the discovered
//! instances per status. Times are from the kill to the poll that first
//! showed a change, so each is an upper bound within one poll interval
//! (`poll_ms` in the result says what was reached).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::net::{connect, PING};

/// Bound on one connection, and on one scrape.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest reply line read from a backend.
const MAX_REPLY: usize = 128;

pub struct Failover {
    /// The proxy's listener.
    pub target: SocketAddr,
    /// The proxy's admin address (`/metrics`).
    pub admin: SocketAddr,
    /// The upstream's service, as the metrics label it.
    pub service: String,
    /// The instance id of the victim (also the name its backend answers with).
    pub victim: String,
    /// Processes to SIGKILL, in this order; the last is the server.
    pub kill: Vec<i32>,
    /// Connections started per second.
    pub rate: f64,
    /// Connections in flight at most.
    pub conns: usize,
    pub before: Duration,
    pub after: Duration,
    pub poll: Duration,
}

/// One client connection.
struct Conn {
    start: Instant,
    end: Instant,
    /// The backend's name, or the error.
    answer: Result<String, String>,
}

/// One scrape of the proxy's metrics.
struct Sample {
    at: Instant,
    /// The victim's `squire_upstream_picks_total`.
    picks: u64,
    /// `squire_upstream_ejected_endpoints` of the upstream.
    ejected: u64,
    /// `squire_endpoints` of the service with status healthy, and of all statuses.
    healthy: u64,
    known: u64,
}

pub async fn run(run: Failover) -> Result<String, String> {
    if run.rate <= 0.0 || run.conns == 0 || run.kill.is_empty() {
        return Err("need --rate > 0, --conns > 0 and --kill PID,..".into());
    }
    let limit = run.before + run.after + OP_TIMEOUT + Duration::from_secs(10);
    let local = tokio::task::LocalSet::new();
    tokio::time::timeout(limit, local.run_until(drive(&run)))
        .await
        .map_err(|_| format!("the run did not finish within {limit:?}"))?
}

async fn drive(run: &Failover) -> Result<String, String> {
    let start = Instant::now();
    let kill_at = start + run.before;
    let end = kill_at + run.after;

    let scraping = Rc::new(Cell::new(true));
    let samples = Rc::new(RefCell::new(Vec::new()));
    let scrape_errors = Rc::new(Cell::new(0u64));
    let poller = {
        let (scraping, samples, errors) =
            (scraping.clone(), samples.clone(), scrape_errors.clone());
        let (admin, service, victim, poll) =
            (run.admin, run.service.clone(), run.victim.clone(), run.poll);
        tokio::task::spawn_local(async move {
            while scraping.get() {
                match scrape(admin).await {
                    Ok(text) => samples.borrow_mut().push(parse(&text, &service, &victim)),
                    Err(_) => errors.set(errors.get() + 1),
                }
                tokio::time::sleep(poll).await;
            }
        })
    };

    let conns: Rc<RefCell<Vec<Conn>>> = Rc::default();
    let in_flight = Rc::new(Cell::new(0usize));
    let mut clients = JoinSet::new();
    let mut skipped = 0u64;
    let mut killed: Option<Instant> = None;
    let mut gone = None;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / run.rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(kill_at), if killed.is_none() => {
                for &pid in &run.kill {
                    // SAFETY: kill(2) with a pid and a signal number; no memory involved.
                    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                        return Err(format!("kill {pid}: {}", io::Error::last_os_error()));
                    }
                }
                let at = Instant::now();
                killed = Some(at);
                // The last one is the server, whose listener matters.
                let server = run.kill[run.kill.len() - 1];
                gone = Some(tokio::task::spawn_local(exit_of(server, at)));
                continue;
            }
        }
        if Instant::now() >= end {
            break;
        }
        if in_flight.get() >= run.conns {
            skipped += 1;
            continue;
        }
        in_flight.set(in_flight.get() + 1);
        let (conns, in_flight, target) = (conns.clone(), in_flight.clone(), run.target);
        n += 1;
        let number = n;
        clients.spawn_local(async move {
            let start = Instant::now();
            let answer = match tokio::time::timeout(OP_TIMEOUT, exchange(target, number)).await {
                Ok(Ok(name)) => Ok(name),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_owned()),
            };
            conns.borrow_mut().push(Conn {
                start,
                end: Instant::now(),
                answer,
            });
            in_flight.set(in_flight.get() - 1);
        });
    }
    while clients.join_next().await.is_some() {}
    scraping.set(false);
    poller.await.map_err(|e| e.to_string())?;
    let killed = killed.ok_or("the run ended before the kill")?;
    let gone = match gone {
        Some(task) => task.await.map_err(|e| e.to_string())?,
        None => killed,
    };
    let samples = samples.borrow();
    let conns = conns.borrow();
    Ok(summarize(
        run,
        killed,
        gone,
        &conns,
        &samples,
        skipped,
        scrape_errors.get(),
    ))
}

/// When process `pid` had exited after the SIGKILL at `killed`: the signal
/// is asynchronous, and until the server is gone it may still accept a
/// connection (which then dies with it). Checked between the other tasks'
/// turns, for at most 2 s.
async fn exit_of(pid: i32, killed: Instant) -> Instant {
    let limit = killed + Duration::from_secs(2);
    while !crate::procfs::exited(pid) && Instant::now() < limit {
        tokio::task::yield_now().await;
    }
    Instant::now()
}

/// Connect, one request, the backend's name, close.
async fn exchange(target: SocketAddr, n: u64) -> io::Result<String> {
    let mut stream = connect(target, n).await?;
    stream.write_all(PING).await?;
    let mut reply = Vec::with_capacity(32);
    let mut chunk = [0u8; 64];
    while !reply.ends_with(b"\r\n") {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the reply",
            ));
        }
        reply.extend_from_slice(&chunk[..read]);
        if reply.len() > MAX_REPLY {
            return Err(crate::net::invalid("reply too long"));
        }
    }
    let line = String::from_utf8_lossy(&reply[..reply.len() - 2]).into_owned();
    match line.strip_prefix("+PONG ") {
        Some(name) => Ok(name.to_owned()),
        None => Err(crate::net::invalid(&format!("unexpected reply {line:?}"))),
    }
}

/// `GET /metrics` over HTTP/1.0, so the body ends with the connection (no
/// chunked encoding to undo).
async fn scrape(admin: SocketAddr) -> io::Result<String> {
    let fetch = async {
        let mut stream = TcpStream::connect(admin).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: squire\r\n\r\n")
            .await?;
        let mut response = Vec::with_capacity(64 * 1024);
        stream.read_to_end(&mut response).await?;
        Ok::<_, io::Error>(response)
    };
    let response = tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let text = String::from_utf8_lossy(&response);
    if !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.0 200") {
        return Err(crate::net::invalid("not a 200"));
    }
    Ok(text.into_owned())
}

/// The figures of one scrape; a series missing from it reads 0.
fn parse(text: &str, service: &str, victim: &str) -> Sample {
    let mut sample = Sample {
        at: Instant::now(),
        picks: 0,
        ejected: 0,
        healthy: 0,
        known: 0,
    };
    let upstream = format!("upstream=\"{service}\"");
    let endpoint = format!("endpoint=\"{victim}\"");
    let of_service = format!("service=\"{service}\"");
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let value = value as u64;
        if series.starts_with("squire_upstream_picks_total{")
            && series.contains(&upstream)
            && series.contains(&endpoint)
        {
            sample.picks = value;
        } else if series.starts_with("squire_upstream_ejected_endpoints{")
            && series.contains(&upstream)
        {
            sample.ejected = value;
        } else if series.starts_with("squire_endpoints{") && series.contains(&of_service) {
            sample.known += value;
            if series.contains("status=\"healthy\"") {
                sample.healthy = value;
            }
        }
    }
    sample
}

fn summarize(
    run: &Failover,
    killed: Instant,
    gone: Instant,
    conns: &[Conn],
    samples: &[Sample],
    skipped: u64,
    scrape_errors: u64,
) -> String {
    // In flight: started before the victim was gone, ended after the kill.
    let after: Vec<&Conn> = conns.iter().filter(|c| c.start >= gone).collect();
    let failed = |c: &&&Conn| c.answer.is_err();
    let failed_after = after.iter().filter(failed).count();
    let in_flight: Vec<&Conn> = conns
        .iter()
        .filter(|c| c.start < gone && c.end >= killed)
        .collect();
    let failed_in_flight = in_flight.iter().filter(failed).count();
    let failed_before = conns
        .iter()
        .filter(|c| c.end < killed && c.answer.is_err())
        .count();
    let mut answers: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &after {
        if let Ok(name) = &c.answer {
            *answers.entry(name.as_str()).or_default() += 1;
        }
    }

    // The proxy's view: the last scrape before the kill is the baseline.
    let split = samples.partition_point(|s| s.at < killed);
    let ms = |at: Instant| format!("{:.0}", (at - killed).as_secs_f64() * 1e3);
    let never = || "-".to_owned();
    let (mut last_attempt, mut ejected, mut unhealthy, mut removed) =
        (never(), never(), never(), never());
    let (mut attempts, mut healthy_at_kill, mut known_at_kill) = (0, 0, 0);
    if split > 0 && split < samples.len() {
        let base = &samples[split - 1];
        healthy_at_kill = base.healthy;
        known_at_kill = base.known;
        let mut previous = base.picks;
        for s in &samples[split..] {
            if s.picks > previous {
                last_attempt = ms(s.at);
            }
            previous = s.picks;
            if s.ejected > base.ejected && ejected == "-" {
                ejected = ms(s.at);
            }
            if s.healthy < base.healthy && unhealthy == "-" {
                unhealthy = ms(s.at);
            }
            if s.known < base.known && removed == "-" {
                removed = ms(s.at);
            }
        }
        attempts = previous.saturating_sub(base.picks);
        if last_attempt == "-" && attempts == 0 {
            last_attempt = "0".to_owned();
        }
    }
    let mut gaps: Vec<f64> = samples
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64() * 1e3)
        .collect();
    gaps.sort_by(f64::total_cmp);
    let poll_ms = gaps.get(gaps.len() / 2).copied().unwrap_or(0.0);
    let answered: String = answers
        .iter()
        .map(|(name, n)| format!("{name}:{n}"))
        .collect::<Vec<_>>()
        .join(",");

    let mut line = String::new();
    let _ = write!(
        line,
        "conns={} gone_us={:.0} conns_after={} failed_after={failed_after} in_flight={} failed_in_flight={failed_in_flight} \
         failed_before={failed_before} skipped={skipped} victim_answers_after={} attempts_after={attempts} \
         last_attempt_ms={last_attempt} ejected_ms={ejected} unhealthy_ms={unhealthy} removed_ms={removed} \
         healthy_at_kill={healthy_at_kill} known_at_kill={known_at_kill} poll_ms={poll_ms:.1} \
         scrapes={} scrape_errors={scrape_errors} answers_after={}",
        conns.len(),
        (gone - killed).as_secs_f64() * 1e6,
        after.len(),
        in_flight.len(),
        answers.get(run.victim.as_str()).copied().unwrap_or(0),
        samples.len(),
        if answered.is_empty() { "-" } else { &answered },
    );
    // Each failed connection around the kill (a few), to tell why.
    let offset = |at: Instant| {
        if at >= killed {
            format!("+{:.1}", (at - killed).as_secs_f64() * 1e3)
        } else {
            format!("-{:.1}", (killed - at).as_secs_f64() * 1e3)
        }
    };
    let failures = conns.iter().filter(|c| c.end >= killed);
    for (c, e) in failures
        .filter_map(|c| Some((c, c.answer.as_ref().err()?)))
        .take(10)
    {
        eprintln!(
            "squire-loadgen: failed connection, started {} ms, ended {} ms from the kill: {e}",
            offset(c.start),
            offset(c.end)
        );
    }
    line
}

/// The results file of `benches/failover.sh` as Markdown. Lines are
/// tab-separated: `meta  key  value`, or `scenario  rep  key=value ...` (a
/// `failover` result line).
pub fn report(text: &str) -> Result<String, String> {
    let mut meta = Vec::new();
    let mut runs: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    let mut order = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.splitn(3, '\t').collect();
        let [kind, key, rest] = cols[..] else {
            return Err(format!("line {}: expected 3 tab-separated columns", i + 1));
        };
        if kind == "meta" {
            meta.push((key.to_owned(), rest.to_owned()));
            continue;
        }
        if !order.iter().any(|s| s == kind) {
            order.push(kind.to_owned());
        }
        let fields = rest
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        runs.entry(kind.to_owned()).or_default().push(fields);
    }
    let mut out = String::new();
    for (key, value) in &meta {
        let _ = writeln!(out, "- {key}: {value}");
    }
    let _ = writeln!(
        out,
        "\n| Scenario | runs | connections after the kill | failed, started after the kill | \
         failed, in flight at the kill | connect attempts to the dead instance | last attempt to it \
         (passive ejection) | gate ejected it | gate's discovery: not healthy | gate's discovery: gone |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for scenario in &order {
        let reps = &runs[scenario];
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            scenario_label(scenario),
            reps.len(),
            spread(reps, "conns_after", ""),
            total(reps, "failed_after"),
            total(reps, "failed_in_flight"),
            spread(reps, "attempts_after", ""),
            spread(reps, "last_attempt_ms", " ms"),
            spread(reps, "ejected_ms", " ms"),
            spread(reps, "unhealthy_ms", " ms"),
            spread(reps, "removed_ms", " ms"),
        );
    }
    Ok(out)
}

/// The scenarios of `benches/failover.sh` in words.
fn scenario_label(scenario: &str) -> &str {
    match scenario {
        "server" => "game server killed, its squire runs on (health check)",
        "host" => "game server and its squire killed (lease expiry)",
        other => other,
    }
}

/// The numeric values of `key` over the runs, and how many runs had none.
fn values(reps: &[BTreeMap<String, String>], key: &str) -> (Vec<f64>, usize) {
    let mut values: Vec<f64> = reps
        .iter()
        .filter_map(|r| r.get(key)?.parse().ok())
        .collect();
    values.sort_by(f64::total_cmp);
    let missing = reps.len() - values.len();
    (values, missing)
}

/// `median (min-max)`, `never` when no run had a value, and how many runs
/// had none when some did.
fn spread(reps: &[BTreeMap<String, String>], key: &str, unit: &str) -> String {
    let (v, missing) = values(reps, key);
    if v.is_empty() {
        return "never".to_owned();
    }
    let median = v[v.len() / 2];
    let mut text = if v.len() == 1 {
        format!("{median:.0}{unit}")
    } else {
        format!("{median:.0}{unit} ({:.0}-{:.0})", v[0], v[v.len() - 1])
    };
    if missing > 0 {
        let _ = write!(text, ", never in {missing}");
    }
    text
}

/// The sum over the runs, and each run's count in run order.
fn total(reps: &[BTreeMap<String, String>], key: &str) -> String {
    let each: Vec<&str> = reps
        .iter()
        .map(|r| r.get(key).map_or("?", String::as_str))
        .collect();
    let sum: u64 = each.iter().filter_map(|v| v.parse::<u64>().ok()).sum();
    format!("{sum} ({})", each.join(", "))
}
