//! Reloading `agent.toml` while running: what a reload asks for
//! ([`Reloader`]), what it answers ([`ReloadOutcome`]), and which running
//! listeners a new file keeps, replaces, adds or removes ([`diff`]).
//!
//! The agent applies the outcome (see `agent.rs`); SIGHUP (`main.rs`) and
//! `POST /v1/reload` (`admin.rs`) both ask through a [`Reloader`], so they
//! are handled one at a time, by the same code.

use std::net::SocketAddr;

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::config::{ConfigError, UpstreamConfig};

/// Asks the running agent to read its configuration file again.
#[derive(Clone)]
pub struct Reloader(pub(crate) mpsc::Sender<oneshot::Sender<ReloadOutcome>>);

impl Reloader {
    /// Reloads and waits for the outcome (the agent logs and counts it).
    pub async fn reload(&self) -> ReloadOutcome {
        let (reply, answer) = oneshot::channel();
        if self.0.send(reply).await.is_err() {
            tracing::warn!("reload ignored: the agent is shutting down");
            return ReloadOutcome::Failed("the agent is shutting down".into());
        }
        answer
            .await
            .unwrap_or_else(|_| ReloadOutcome::Failed("the agent is shutting down".into()))
    }
}

/// What a reload did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The new file is in service.
    Applied(ReloadSummary),
    /// The new file is not valid; the running configuration stays.
    Invalid(ConfigError),
    /// The new file is valid but could not be put in service (a listen
    /// address taken, a CA file unreadable...); the running configuration
    /// stays.
    Failed(String),
}

impl ReloadOutcome {
    /// The `result` label of `squire_config_reloads_total`.
    pub fn result(&self) -> &'static str {
        match self {
            ReloadOutcome::Applied(_) => "ok",
            ReloadOutcome::Invalid(_) => "invalid",
            ReloadOutcome::Failed(_) => "failed",
        }
    }

    /// The answer of `POST /v1/reload`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ReloadOutcome::Applied(summary) => json!({
                "result": "ok",
                "listeners": {
                    "added": summary.added,
                    "removed": summary.removed,
                    "changed": summary.changed,
                    "unchanged": summary.unchanged,
                },
                "discovery": {
                    "started": summary.discovery_started,
                    "stopped": summary.discovery_stopped,
                    "restarted": summary.discovery_restarted,
                },
                "reregistered": summary.reregistered,
                "restart_required": summary.restart_required,
            }),
            ReloadOutcome::Invalid(error) => {
                let problems: Vec<String> = match error.problems() {
                    [] => vec![error.to_string()],
                    problems => problems.iter().map(ToString::to_string).collect(),
                };
                json!({ "result": "invalid", "problems": problems })
            }
            ReloadOutcome::Failed(reason) => json!({ "result": "failed", "problems": [reason] }),
        }
    }
}

/// What an applied reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// `service@listen` of each listener.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: usize,
    /// Services whose discovery started, stopped, or started again (its
    /// listeners or the registries changed).
    pub discovery_started: Vec<String>,
    pub discovery_stopped: Vec<String>,
    pub discovery_restarted: Vec<String>,
    /// `[service]` or the registries changed: deregistered and registered
    /// again.
    pub reregistered: bool,
    /// Keys that changed but take effect only after a restart.
    pub restart_required: Vec<String>,
}

/// What a reload does with one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerChange {
    /// Same address, same settings: untouched.
    Keep { old: usize, new: usize },
    /// Same address, other settings: the socket goes to a new handler.
    Replace { old: usize, new: usize },
    /// A new address: bound.
    Add { new: usize },
    /// An address no longer configured: drained and closed.
    Remove { old: usize },
}

/// Matches the listeners of the new configuration to the running ones by
/// configured `listen` address. Port 0 (tests) binds anew on every start,
/// so two such listeners are the same only with the same service too; a
/// key that repeats matches in order. The result lists every new listener
/// in order, then the removed ones.
pub fn diff(old: &[UpstreamConfig], new: &[UpstreamConfig]) -> Vec<ListenerChange> {
    let key = |c: &UpstreamConfig| -> (SocketAddr, Option<String>) {
        (c.listen, (c.listen.port() == 0).then(|| c.service.clone()))
    };
    let mut taken = vec![false; old.len()];
    let mut changes = Vec::new();
    for (n, config) in new.iter().enumerate() {
        let wanted = key(config);
        let matched = (0..old.len()).find(|&o| !taken[o] && key(&old[o]) == wanted);
        changes.push(match matched {
            Some(o) => {
                taken[o] = true;
                if old[o] == *config {
                    ListenerChange::Keep { old: o, new: n }
                } else {
                    ListenerChange::Replace { old: o, new: n }
                }
            }
            None => ListenerChange::Add { new: n },
        });
    }
    changes.extend(
        taken
            .iter()
            .enumerate()
            .filter(|(_, taken)| !**taken)
            .map(|(o, _)| ListenerChange::Remove { old: o }),
    );
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Strategy;
    use crate::Config;

    fn upstreams(toml: &str) -> Vec<UpstreamConfig> {
        Config::from_toml(toml).expect("valid").upstreams
    }

    #[test]
    fn listeners_match_by_address_and_compare_settings() {
        let old = upstreams(
            r#"
            [[upstream]]
            service = "gate"
            listen = "127.0.0.1:7001"
            [[upstream]]
            service = "chat"
            listen = "127.0.0.1:7002"
            [[upstream]]
            service = "shop"
            listen = "127.0.0.1:7003"
            "#,
        );
        let new = upstreams(
            r#"
            [[upstream]]
            service = "lobby"
            listen = "127.0.0.1:7004"
            [[upstream]]
            service = "chat"
            listen = "127.0.0.1:7002"
            strategy = "least_connections"
            [[upstream]]
            service = "gate"
            listen = "127.0.0.1:7001"
            "#,
        );
        assert_eq!(new[1].strategy, Strategy::LeastConnections);
        assert_eq!(
            diff(&old, &new),
            vec![
                ListenerChange::Add { new: 0 },
                ListenerChange::Replace { old: 1, new: 1 },
                ListenerChange::Keep { old: 0, new: 2 },
                ListenerChange::Remove { old: 2 },
            ]
        );
    }

    #[test]
    fn prefer_and_slow_start_changes_replace_the_listener() {
        let base = "[service]\nname = \"lobby\"\nhost = \"10.0.0.5\"\nport = 8001\n";
        let with = |service_metadata: &str, keys: &str| {
            upstreams(&format!(
                "{base}metadata = {{ zone = \"{service_metadata}\" }}\n\
                 [[upstream]]\nservice = \"gate\"\nlisten = \"127.0.0.1:7001\"\n{keys}\n"
            ))
        };
        let old = with("a", "prefer = [\"zone\"]\nslow_start = \"30s\"");
        let same = with("a", "prefer = [\"zone\"]\nslow_start = \"30s\"");
        assert_eq!(
            diff(&old, &same),
            vec![ListenerChange::Keep { old: 0, new: 0 }]
        );
        for new in [
            with("a", "prefer = [\"zone\"]\nslow_start = \"1m\""),
            with(
                "a",
                "prefer = [\"zone\"]\nslow_start = \"30s\"\nslow_start_min = 0.3",
            ),
            with(
                "a",
                "prefer = [\"zone\"]\nslow_start = \"30s\"\nprefer_min_share = 0.7",
            ),
            // The squire's own zone moved: the preference follows it.
            with("b", "prefer = [\"zone\"]\nslow_start = \"30s\""),
        ] {
            assert_eq!(
                diff(&old, &new),
                vec![ListenerChange::Replace { old: 0, new: 0 }]
            );
        }
    }

    #[test]
    fn port_zero_listeners_match_by_service() {
        let old = upstreams(
            r#"
            [[upstream]]
            service = "gate"
            listen = "127.0.0.1:0"
            [[upstream]]
            service = "chat"
            listen = "127.0.0.1:0"
            "#,
        );
        let new = upstreams(
            r#"
            [[upstream]]
            service = "chat"
            listen = "127.0.0.1:0"
            "#,
        );
        assert_eq!(
            diff(&old, &new),
            vec![
                ListenerChange::Keep { old: 1, new: 0 },
                ListenerChange::Remove { old: 0 },
            ]
        );
    }
}
