//! Health checks of the local service, and the verdict they add up to.
//!
//! Each configured check runs in its own loop: probe (bounded by `timeout`),
//! feed the result to its [`Threshold`], publish. While a check is up it runs
//! every `interval`, otherwise every `unhealthy_interval`, both jittered by
//! ±10% so many squires started together do not probe in step. All checks must
//! pass: the verdict is the worst of them ([`verdict`]), published on a watch
//! channel that the registration loop follows.

mod exec;
mod grpc;
mod http;
mod probe;
mod tcp;
mod threshold;
mod udp;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use probe::{Probe, ProbeResult};
pub use threshold::{CheckStatus, Outcome, Threshold};

use crate::config::CheckConfig;
use crate::load::Load;
use crate::metrics as m;
use crate::registration::Reported;
use crate::registry::Status;
use crate::tls::TlsError;

/// What `/v1/self` shows of one check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub name: String,
    pub kind: &'static str,
    pub status: CheckStatus,
    #[serde(serialize_with = "crate::time::rfc3339")]
    pub since: Option<SystemTime>,
    /// Consecutive results of the current run, and whether they were up.
    pub streak: u32,
    pub streak_up: bool,
    pub last_outcome: Option<Outcome>,
    pub last_output: String,
    pub last_duration_seconds: f64,
    #[serde(serialize_with = "crate::time::rfc3339")]
    pub last_run: Option<SystemTime>,
    #[serde(with = "humantime_serde_str")]
    pub interval: Duration,
    #[serde(with = "humantime_serde_str")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

mod humantime_serde_str {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// The checks' shared state: their reports and the verdict.
pub struct HealthBoard {
    reports: Mutex<Vec<CheckReport>>,
    verdict: watch::Sender<Status>,
}

impl HealthBoard {
    pub fn reports(&self) -> Vec<CheckReport> {
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.verdict.subscribe()
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut CheckReport)) {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut reports[index]);
        let next = verdict(reports.iter().map(|r| r.status));
        drop(reports);
        self.verdict.send_if_modified(|current| {
            let changed = *current != next;
            *current = next;
            changed
        });
    }
}

/// The instance status that a set of check statuses adds up to: any failing
/// check makes it unhealthy, any still unknown keeps it unknown, any warning
/// makes it warning. No checks at all: healthy.
pub fn verdict(checks: impl IntoIterator<Item = CheckStatus>) -> Status {
    let mut status = Status::Healthy;
    for check in checks {
        let this = match check {
            CheckStatus::Critical => return Status::Unhealthy,
            CheckStatus::Unknown => Status::Unknown,
            CheckStatus::Warning => Status::Warning,
            CheckStatus::Passing => Status::Healthy,
        };
        status = match (status, this) {
            (Status::Unknown, _) | (_, Status::Unknown) => Status::Unknown,
            (Status::Warning, _) | (_, Status::Warning) => Status::Warning,
            _ => Status::Healthy,
        };
    }
    status
}

pub struct Health {
    checks: Vec<(CheckConfig, Probe)>,
    board: Arc<HealthBoard>,
    /// Where the checks with `load_from_output` report the game's load.
    load: Option<watch::Sender<Reported>>,
}

impl Health {
    /// Builds every probe (TLS settings are loaded here, so a bad CA file
    /// fails startup rather than every check).
    pub fn new(checks: &[CheckConfig]) -> Result<Health, TlsError> {
        let mut built = Vec::with_capacity(checks.len());
        let mut reports = Vec::with_capacity(checks.len());
        for check in checks {
            built.push((check.clone(), Probe::new(&check.probe)?));
            reports.push(CheckReport {
                name: check.name.clone(),
                kind: check.probe.kind(),
                status: CheckStatus::Unknown,
                since: Some(SystemTime::now()),
                streak: 0,
                streak_up: false,
                last_outcome: None,
                last_output: String::new(),
                last_duration_seconds: 0.0,
                last_run: None,
                interval: check.interval,
                timeout: check.timeout,
                rise: check.rise,
                fall: check.fall,
            });
        }
        let initial = verdict(reports.iter().map(|r| r.status));
        let (verdict, _) = watch::channel(initial);
        Ok(Health {
            checks: built,
            board: Arc::new(HealthBoard {
                reports: Mutex::new(reports),
                verdict,
            }),
            load: None,
        })
    }

    /// The checks with `load_from_output` set the load through `load` (the
    /// channel `PUT /v1/load` writes too): each output that carries one.
    pub fn with_load(mut self, load: watch::Sender<Reported>) -> Self {
        self.load = Some(load);
        self
    }

    pub fn board(&self) -> Arc<HealthBoard> {
        self.board.clone()
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut tasks = JoinSet::new();
        for (index, (config, probe)) in self.checks.into_iter().enumerate() {
            let load = self.load.clone().filter(|_| config.load_from_output);
            tasks.spawn(run_check(
                index,
                config,
                probe,
                self.board.clone(),
                load,
                shutdown.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn run_check(
    index: usize,
    config: CheckConfig,
    probe: Probe,
    board: Arc<HealthBoard>,
    load: Option<watch::Sender<Reported>>,
    shutdown: CancellationToken,
) {
    let name = config.name.clone();
    let duration = metrics::histogram!(m::CHECK_SECONDS, "check" => name.clone());
    set_status_gauge(&name, CheckStatus::Unknown);
    let mut threshold = Threshold::new(config.rise, config.fall, tokio::time::Instant::now());
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = probe.run(config.timeout) => r,
        };
        let took = started.elapsed();
        duration.record(took.as_secs_f64());
        metrics::counter!(m::CHECK_RESULTS, "check" => name.clone(), "outcome" => result.outcome.as_str()).increment(1);
        let changed = threshold.record(result.outcome, tokio::time::Instant::now());
        if let Some(status) = changed {
            metrics::counter!(m::CHECK_TRANSITIONS, "check" => name.clone(), "to" => status.as_str()).increment(1);
            set_status_gauge(&name, status);
            let status = status.as_str();
            if threshold.status().is_up() {
                tracing::info!(check = %name, status, output = %result.output, "check changed");
            } else {
                tracing::warn!(check = %name, status, output = %result.output, "check changed");
            }
        }
        if let Some(sink) = &load {
            // An output without a load leaves the last one to go stale.
            if let Some((players, capacity)) = crate::load::from_output(&result.output) {
                sink.send_replace(Load::new(players, capacity, SystemTime::now()).ok());
            }
        }
        let (streak, streak_up) = threshold.streak();
        board.update(index, |report| {
            report.status = threshold.status();
            if changed.is_some() {
                report.since = Some(SystemTime::now());
            }
            report.streak = streak;
            report.streak_up = streak_up;
            report.last_outcome = Some(result.outcome);
            report.last_output = result.output;
            report.last_duration_seconds = took.as_secs_f64();
            report.last_run = Some(SystemTime::now());
        });
        let base = if threshold.status().is_up() {
            config.interval
        } else {
            config.unhealthy_interval
        };
        let wait = jitter(base).saturating_sub(took);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// `base` ± 10%.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.9..=1.1))
}

fn set_status_gauge(check: &str, current: CheckStatus) {
    for status in CheckStatus::ALL {
        let value = if status == current { 1.0 } else { 0.0 };
        metrics::gauge!(m::CHECK_STATUS, "check" => check.to_owned(), "status" => status.as_str())
            .set(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CheckStatus::*;

    #[test]
    fn the_verdict_is_the_worst_check() {
        assert_eq!(verdict([]), Status::Healthy);
        assert_eq!(verdict([Passing, Passing]), Status::Healthy);
        assert_eq!(verdict([Passing, Warning]), Status::Warning);
        assert_eq!(verdict([Warning, Unknown]), Status::Unknown);
        assert_eq!(verdict([Unknown, Critical]), Status::Unhealthy);
        assert_eq!(verdict([Critical, Passing]), Status::Unhealthy);
    }
}
