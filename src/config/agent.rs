//! `[agent]`: this squire's own settings (node name, admin address, logging,
//! shutdown timing, runtime threads).

use std::net::SocketAddr;
use std::time::Duration;

use super::problems::{duration, socket_addr, Problems};
use super::raw::RawAgent;

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub node: String,
    pub admin: SocketAddr,
    /// A `tracing` filter directive; `RUST_LOG` overrides it.
    pub log: String,
    pub log_format: LogFormat,
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
    /// After `drain_timeout`, the connections still open are closed in
    /// batches spread over this window (not all in the same millisecond).
    pub drain_spread: Duration,
    /// Runtime worker threads; 0 means one per core.
    pub threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

pub(super) fn validate_agent(raw: RawAgent, problems: &mut Problems) -> AgentConfig {
    let node = match raw.node {
        Some(node) if node.trim().is_empty() => {
            problems.push("agent.node", "must not be empty");
            node
        }
        Some(node) => node,
        None => hostname(),
    };
    let admin = socket_addr(
        "agent.admin",
        raw.admin.as_deref().unwrap_or(DEFAULT_ADMIN),
        problems,
    );
    let log = raw.log.unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
        problems.push("agent.log", format!("not a log filter: {e}"));
    }
    let log_format = match raw.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.push(
                "agent.log_format",
                format!("unknown format {other:?}; expected \"text\" or \"json\""),
            );
            LogFormat::Text
        }
    };
    let drain_timeout = duration("agent.drain_timeout", raw.drain_timeout, "30s", problems);
    let drain_spread = match raw.drain_spread {
        Some(text) => duration("agent.drain_spread", Some(text), "1s", problems),
        None => default_drain_spread(drain_timeout),
    };
    AgentConfig {
        node,
        admin,
        log,
        log_format,
        drain_delay: duration("agent.drain_delay", raw.drain_delay, "2s", problems),
        drain_timeout,
        drain_spread,
        threads: match raw.threads {
            None => 0,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| *n <= 256)
                .unwrap_or_else(|| {
                    problems.push(
                        "agent.threads",
                        format!("{n} is out of range (0-256; 0 = one per core)"),
                    );
                    0
                }),
        },
    }
}

/// 10% of `drain_timeout`, at least one second.
pub fn default_drain_spread(drain_timeout: Duration) -> Duration {
    (drain_timeout / 10).max(Duration::from_secs(1))
}

fn hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|raw| raw.to_string_lossy().into_owned())
}
