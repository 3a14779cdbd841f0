//! Keeps our instance registered, whatever the registry goes through.
//!
//! One loop: register under a new lease, refresh it every ttl/3, and
//!
//! - on a refresh error (registry unreachable, stream broken) retry the
//!   refresh with a jittered backoff, on the same lease: a lease survives an
//!   outage shorter than its ttl, and etcd even extends leases across its own
//!   restart;
//! - on [`RegistryError::LeaseLost`] (revoked, expired while we were cut
//!   off) register again at once under a new lease, then back off if that
//!   fails. Registering writes the whole value, so doing it twice is harmless;
//! - on shutdown revoke the lease so peers see us leave at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::metrics as m;
use crate::registry::{Instance, Lease, Registry, RegistryError};

/// What `/v1/self` shows of our registration.
#[derive(Debug, Clone, Serialize)]
pub struct RegistrationState {
    pub registry: &'static str,
    pub target: String,
    pub registered: bool,
    pub lease: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub registered_at: Option<SystemTime>,
    #[serde(serialize_with = "rfc3339")]
    pub last_keep_alive: Option<SystemTime>,
    pub last_error: Option<String>,
    pub registrations: u64,
    pub instance: Instance,
}

fn rfc3339<S: serde::Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(t) => s.collect_str(&humantime::format_rfc3339_millis(*t)),
        None => s.serialize_none(),
    }
}

/// Shared view of the registration, updated by the loop, read by admin.
pub type SharedState = Arc<Mutex<RegistrationState>>;

pub struct Registration {
    registry: Arc<dyn Registry>,
    instance: Instance,
    refresh: Duration,
    timeout: Duration,
    state: SharedState,
}

impl Registration {
    pub fn new(
        registry: Arc<dyn Registry>,
        instance: Instance,
        ttl: Duration,
        timeout: Duration,
    ) -> Self {
        let state = Arc::new(Mutex::new(RegistrationState {
            registry: registry.kind(),
            target: registry.target(),
            registered: false,
            lease: None,
            registered_at: None,
            last_keep_alive: None,
            last_error: None,
            registrations: 0,
            instance: instance.clone(),
        }));
        Registration {
            registry,
            instance,
            refresh: ttl / 3,
            timeout,
            state,
        }
    }

    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// Runs until `shutdown`, then revokes the registration and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let kind = self.registry.kind();
        let mut backoff = Backoff::new(
            Duration::from_millis(200),
            self.refresh.max(Duration::from_secs(1)),
        );
        let mut lost_before = false;
        loop {
            let registered = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.registry.register(&self.instance) => r,
            };
            let lease = match registered {
                Ok(lease) => lease,
                Err(e) => {
                    metrics::counter!(m::REGISTRATION_FAILURES, "registry" => kind).increment(1);
                    let delay = backoff.next(e.is_retryable());
                    tracing::warn!(registry = kind, error = %e, retry_in = ?delay, "registration failed");
                    self.update(|s| s.last_error = Some(e.to_string()));
                    if sleep_or_shutdown(delay, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            metrics::counter!(m::REGISTRATIONS, "registry" => kind).increment(1);
            if lost_before {
                metrics::counter!(m::LEASE_REGRANTS, "registry" => kind).increment(1);
            }
            metrics::gauge!(m::REGISTERED, "registry" => kind).set(1.0);
            tracing::info!(registry = kind, lease = %lease.id(), id = %self.instance.id, "registered");
            self.update(|s| {
                let now = SystemTime::now();
                s.registered = true;
                s.lease = Some(lease.id());
                s.registered_at = Some(now);
                s.last_keep_alive = Some(now);
                s.last_error = None;
                s.registrations += 1;
            });

            match self.keep_alive(lease, &shutdown, &mut backoff).await {
                Some(lease) => {
                    self.deregister(lease).await;
                    return;
                }
                None => {
                    lost_before = true;
                    metrics::gauge!(m::REGISTERED, "registry" => kind).set(0.0);
                    self.update(|s| s.registered = false);
                }
            }
        }
    }

    /// Refreshes `lease` until shutdown (returns it, to be revoked) or until it
    /// is lost (returns `None`).
    async fn keep_alive(
        &self,
        mut lease: Box<dyn Lease>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Option<Box<dyn Lease>> {
        let kind = self.registry.kind();
        let mut delay = self.refresh;
        loop {
            if sleep_or_shutdown(delay, shutdown).await {
                return Some(lease);
            }
            let refreshed = tokio::select! {
                _ = shutdown.cancelled() => return Some(lease),
                r = tokio::time::timeout(self.timeout, lease.keep_alive()) => r
                    .unwrap_or_else(|_| Err(RegistryError::Unavailable("keep-alive timed out".into()))),
            };
            match refreshed {
                Ok(()) => {
                    backoff.reset();
                    delay = self.refresh;
                    self.update(|s| s.last_keep_alive = Some(SystemTime::now()));
                }
                Err(RegistryError::LeaseLost(reason)) => {
                    tracing::warn!(registry = kind, %reason, "lease lost; registering again");
                    metrics::counter!(m::KEEPALIVE_FAILURES, "registry" => kind).increment(1);
                    self.update(|s| s.last_error = Some(format!("lease lost: {reason}")));
                    return None;
                }
                Err(e) => {
                    metrics::counter!(m::KEEPALIVE_FAILURES, "registry" => kind).increment(1);
                    // Never wait longer than one refresh period between tries,
                    // or an outage shorter than the ttl would still lose us.
                    delay = backoff.next(e.is_retryable()).min(self.refresh);
                    tracing::warn!(registry = kind, error = %e, retry_in = ?delay, "keep-alive failed");
                    self.update(|s| s.last_error = Some(e.to_string()));
                }
            }
        }
    }

    async fn deregister(&self, lease: Box<dyn Lease>) {
        let kind = self.registry.kind();
        match tokio::time::timeout(self.timeout, lease.revoke()).await {
            Ok(Ok(())) => tracing::info!(registry = kind, id = %self.instance.id, "deregistered"),
            Ok(Err(e)) => {
                tracing::warn!(registry = kind, error = %e, "deregistration failed; the lease will expire")
            }
            Err(_) => tracing::warn!(
                registry = kind,
                "deregistration timed out; the lease will expire"
            ),
        }
        metrics::gauge!(m::REGISTERED, "registry" => kind).set(0.0);
        self.update(|s| {
            s.registered = false;
            s.lease = None;
        });
    }

    fn update(&self, change: impl FnOnce(&mut RegistrationState)) {
        // A poisoned lock only means a panic elsewhere mid-update; the state
        // is plain data and still usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut state);
    }
}

/// Sleeps for `delay`; true if shutdown came first.
pub(crate) async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}
