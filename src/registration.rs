//! Keeps our instance registered, whatever the registry goes through, and
//! announces the status our health checks and maintenance mode decide.
//!
//! One [`Registration`] per configured registry, each its own task fed by
//! the same health verdict and maintenance channels: one registry being
//! down, slow or refusing us never delays what the others get.
//!
//! Each is one loop: register under a new lease, refresh it every ttl/3, and
//!
//! - on a refresh error (registry unreachable, stream broken) retry the
//!   refresh with a jittered backoff of at most `RETRY_MAX`, on the same
//!   lease: a lease survives an outage shorter than its ttl, etcd even
//!   extends leases across its own restart, and a registry that answers
//!   again is refreshed within `RETRY_MAX`;
//! - once a ttl has passed since the last successful refresh, say we are
//!   not registered (`registered` false, the gauge 0, `/ready` 503): the
//!   lease has expired unless the registry kept it for us. Keep refreshing
//!   the same lease; the first refresh that succeeds says registered again,
//!   and "lease lost" registers anew;
//! - on [`RegistryError::LeaseLost`] (revoked, expired while we were cut
//!   off) register again at once under a new lease, then back off if that
//!   fails. Registering writes the whole value, so doing it twice is harmless;
//! - when the wanted status changes, write it, at most as fast as a token
//!   bucket allows (a flapping service cannot flood the registry). Whatever
//!   is written is the latest status at the time of the write;
//! - when the game process reports a load that is worth publishing
//!   ([`crate::load::worth_publishing`]: a meaningful change, or a refresh
//!   due before peers take the published one as stale), write it with the
//!   status, through the same token bucket: a load is part of the value;
//! - when the health verdict stays `unhealthy` for `deregister_critical_after`,
//!   remove the registration, and register again once the verdict recovers;
//! - on shutdown revoke the lease so peers see us leave at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::load::{worth_publishing, Load};
use crate::metrics as m;
use crate::registry::{Instance, Lease, Registry, RegistryError, Status};
use crate::time::{rfc3339, sleep_or_shutdown, sleep_until_some, TokenBucket};

/// The longest wait between two tries of a registration or refresh while
/// the registry fails: bounds how long after it answers again we are
/// registered again.
const RETRY_MAX: Duration = Duration::from_millis(500);

/// The wait after the registry refused us (permissions, credentials):
/// retrying soon will not help.
const REJECTED_WAIT: Duration = Duration::from_secs(5);

/// Status writes allowed in a burst, then one per [`WRITE_REFILL`].
const WRITE_BURST: u32 = 3;
const WRITE_REFILL: Duration = Duration::from_secs(1);

/// What `/v1/self` shows of our registration in one registry.
#[derive(Debug, Clone, Serialize)]
pub struct RegistrationState {
    /// The registry's configured name (`primary`, ...).
    pub name: String,
    /// Its kind: `etcd`, `consul`, `eureka`, `zookeeper`, `nacos`, `local`.
    pub registry: &'static str,
    pub target: String,
    pub registered: bool,
    /// Removed because the instance stayed unhealthy past
    /// `deregister_critical_after`; registered again when it recovers.
    pub deregistered_unhealthy: bool,
    pub lease: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub registered_at: Option<SystemTime>,
    #[serde(serialize_with = "rfc3339")]
    pub last_keep_alive: Option<SystemTime>,
    pub last_error: Option<String>,
    pub registrations: u64,
    /// The instance as last written, with the status the registry holds.
    pub instance: Instance,
}

/// Shared view of the registration, updated by the loop, read by admin.
pub type SharedState = Arc<Mutex<RegistrationState>>;

/// Maintenance mode: `Some(reason)` while on.
pub type Maintenance = Option<String>;

/// The load the game process last reported (`PUT /v1/load`, a check's
/// output); `None` until it reports one, or once it clears it.
pub type Reported = Option<Load>;

pub struct Registration {
    name: String,
    registry: Arc<dyn Registry>,
    /// `registry` (the name) and `kind`, on every metric (the announced
    /// status adds `status`).
    labels: Vec<metrics::Label>,
    instance: Instance,
    ttl: Duration,
    refresh: Duration,
    timeout: Duration,
    health: watch::Receiver<Status>,
    maintenance: watch::Receiver<Maintenance>,
    load: watch::Receiver<Reported>,
    /// What [`worth_publishing`] judges a load change by: `service.load_ttl`.
    load_ttl: Duration,
    deregister_unhealthy_after: Option<Duration>,
    /// Since when the health verdict has been `unhealthy`, across leases.
    unhealthy_since: Option<Instant>,
    writes: TokenBucket,
    state: SharedState,
}

/// How holding one lease ended.
enum Ended {
    Shutdown(Box<dyn Lease>),
    Lost,
    UnhealthyTooLong(Box<dyn Lease>),
}

impl Registration {
    #[allow(clippy::too_many_arguments)] // each is a distinct part of the wiring
    pub fn new(
        name: String,
        registry: Arc<dyn Registry>,
        instance: Instance,
        ttl: Duration,
        timeout: Duration,
        health: watch::Receiver<Status>,
        maintenance: watch::Receiver<Maintenance>,
        (load, load_ttl): (watch::Receiver<Reported>, Duration),
        deregister_unhealthy_after: Option<Duration>,
    ) -> Self {
        let state = Arc::new(Mutex::new(RegistrationState {
            name: name.clone(),
            registry: registry.kind(),
            target: registry.target(),
            registered: false,
            deregistered_unhealthy: false,
            lease: None,
            registered_at: None,
            last_keep_alive: None,
            last_error: None,
            registrations: 0,
            instance: instance.clone(),
        }));
        let labels = vec![
            metrics::Label::new("registry", name.clone()),
            metrics::Label::new("kind", registry.kind()),
        ];
        m::zero_registration_series(&labels);
        Registration {
            name,
            registry,
            labels,
            instance,
            ttl,
            refresh: ttl / 3,
            timeout,
            health,
            maintenance,
            load,
            load_ttl,
            deregister_unhealthy_after,
            unhealthy_since: None,
            writes: TokenBucket::new(WRITE_BURST, WRITE_REFILL),
            state,
        }
    }

    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// The status to announce now: maintenance wins over the health verdict.
    fn wanted(&mut self) -> Status {
        let health = *self.health.borrow_and_update();
        match health {
            Status::Unhealthy => {
                self.unhealthy_since.get_or_insert_with(Instant::now);
            }
            _ => self.unhealthy_since = None,
        }
        if self.maintenance.borrow_and_update().is_some() {
            Status::Draining
        } else {
            health
        }
    }

    /// The load to announce now: the latest reported.
    fn wanted_load(&mut self) -> Reported {
        *self.load.borrow_and_update()
    }

    /// Runs until `shutdown`, then revokes the registration and returns.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let kind = self.registry.kind();
        let mut backoff = Backoff::new(Duration::from_millis(100), RETRY_MAX);
        let mut lost_before = false;
        loop {
            self.instance.status = self.wanted();
            self.instance.load = self.wanted_load();
            // A registration in flight when shutdown comes may still land
            // (and would then linger until its ttl): it gets one registry
            // timeout to finish, and is revoked at once.
            let registered = {
                let register = self.registry.register(&self.instance);
                tokio::pin!(register);
                tokio::select! {
                    r = &mut register => r,
                    _ = shutdown.cancelled() => {
                        match tokio::time::timeout(self.timeout, &mut register).await {
                            Ok(r) => r,
                            Err(_) => return,
                        }
                    }
                }
            };
            if shutdown.is_cancelled() {
                if let Ok(lease) = registered {
                    self.deregister(lease).await;
                }
                return;
            }
            let lease = match registered {
                Ok(lease) => lease,
                Err(e) => {
                    metrics::counter!(m::REGISTRATION_FAILURES, self.labels.iter()).increment(1);
                    let delay = retry_delay(&mut backoff, &e);
                    tracing::warn!(registry = %self.name, kind, error = %e, retry_in = ?delay, "registration failed");
                    self.update(|s| s.last_error = Some(e.to_string()));
                    if sleep_or_shutdown(delay, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            metrics::counter!(m::REGISTRATIONS, self.labels.iter()).increment(1);
            if lost_before {
                metrics::counter!(m::LEASE_REGRANTS, self.labels.iter()).increment(1);
            }
            metrics::gauge!(m::REGISTERED, self.labels.iter()).set(1.0);
            self.set_announced_gauge(self.instance.status);
            tracing::info!(registry = %self.name, kind, lease = %lease.id(), id = %self.instance.id, status = %self.instance.status, "registered");
            let instance = self.instance.clone();
            self.update(|s| {
                let now = SystemTime::now();
                s.registered = true;
                s.deregistered_unhealthy = false;
                s.lease = Some(lease.id());
                s.registered_at = Some(now);
                s.last_keep_alive = Some(now);
                s.last_error = None;
                s.registrations += 1;
                s.instance = instance;
            });

            match self.hold(lease, &shutdown, &mut backoff).await {
                Ended::Shutdown(lease) => {
                    self.deregister(lease).await;
                    return;
                }
                Ended::Lost => {
                    lost_before = true;
                    metrics::gauge!(m::REGISTERED, self.labels.iter()).set(0.0);
                    self.update(|s| s.registered = false);
                }
                Ended::UnhealthyTooLong(lease) => {
                    tracing::warn!(registry = %self.name, kind, id = %self.instance.id, "unhealthy past deregister_critical_after; deregistering until it recovers");
                    metrics::counter!(m::CRITICAL_DEREGISTRATIONS, self.labels.iter()).increment(1);
                    self.deregister(lease).await;
                    self.update(|s| s.deregistered_unhealthy = true);
                    if self.wait_for_recovery(&shutdown).await {
                        return;
                    }
                    lost_before = false;
                }
            }
        }
    }

    /// Keeps `lease` alive and its status current until shutdown, loss, or
    /// an unhealthy spell past the limit.
    async fn hold(
        &mut self,
        mut lease: Box<dyn Lease>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Ended {
        let kind = self.registry.kind();
        let mut next_refresh = Instant::now() + self.refresh;
        // Past this without a successful refresh the lease has expired,
        // unless the registry kept it (etcd extends leases on a restart).
        let mut expires = Instant::now() + self.ttl;
        let mut held = true;
        let mut deferred = false;
        loop {
            let wanted = self.wanted();
            let reported = self.wanted_load();
            let load_due = worth_publishing(
                self.instance.load.as_ref(),
                reported.as_ref(),
                self.load_ttl,
            );
            let write_at =
                (wanted != self.instance.status || load_due).then(|| self.writes.ready_at());
            if write_at.is_some_and(|at| at > Instant::now()) && !deferred {
                deferred = true;
                metrics::counter!(m::STATUS_WRITES_DEFERRED, self.labels.iter()).increment(1);
            }
            let unhealthy_deadline = self
                .unhealthy_since
                .zip(self.deregister_unhealthy_after)
                .map(|(since, after)| since + after);
            tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown(lease),
                _ = sleep_until_some(unhealthy_deadline) => return Ended::UnhealthyTooLong(lease),
                _ = lease.gone() => {
                    tracing::warn!(registry = %self.name, kind, lease = %lease.id(), "our entry was deleted from the registry while the lease was kept; registering again");
                    metrics::counter!(m::ENTRY_DELETED, self.labels.iter()).increment(1);
                    self.update(|s| s.last_error = Some("our entry was deleted from the registry".into()));
                    return Ended::Lost;
                }
                _ = tokio::time::sleep_until(expires), if held => {
                    held = false;
                    tracing::warn!(registry = %self.name, kind, ttl = ?self.ttl, "no successful keep-alive for a ttl; the lease has likely expired");
                    metrics::gauge!(m::REGISTERED, self.labels.iter()).set(0.0);
                    self.update(|s| s.registered = false);
                }
                changed = self.health.changed() => if changed.is_err() {
                    // The checks are gone only when the agent is stopping.
                    return Ended::Shutdown(lease);
                },
                changed = self.maintenance.changed() => if changed.is_err() {
                    return Ended::Shutdown(lease);
                },
                changed = self.load.changed() => if changed.is_err() {
                    return Ended::Shutdown(lease);
                },
                _ = sleep_until_some(write_at) => {
                    self.writes.take();
                    deferred = false;
                    let mut instance = self.instance.clone();
                    instance.status = wanted;
                    instance.load = reported;
                    match tokio::time::timeout(self.timeout, lease.update(&instance)).await {
                        Ok(Ok(())) => {
                            if wanted != self.instance.status {
                                metrics::counter!(m::STATUS_WRITES, self.labels.iter()).increment(1);
                                self.set_announced_gauge(wanted);
                                tracing::info!(registry = %self.name, kind, from = %self.instance.status, to = %wanted, "status announced");
                            }
                            if load_due {
                                metrics::counter!(m::LOAD_WRITES, self.labels.iter()).increment(1);
                                tracing::debug!(registry = %self.name, kind, load = ?reported, "load announced");
                            }
                            self.instance = instance.clone();
                            self.update(|s| s.instance = instance);
                        }
                        Ok(Err(RegistryError::LeaseLost(reason))) => {
                            tracing::warn!(registry = %self.name, kind, %reason, "lease lost while writing status; registering again");
                            return Ended::Lost;
                        }
                        Ok(Err(e)) => {
                            // Stays pending: retried when the next token comes.
                            tracing::warn!(registry = %self.name, kind, error = %e, "status write failed");
                            self.update(|s| s.last_error = Some(e.to_string()));
                        }
                        Err(_) => tracing::warn!(registry = %self.name, kind, "status write timed out"),
                    }
                }
                _ = tokio::time::sleep_until(next_refresh) => {
                    match tokio::time::timeout(self.timeout, lease.keep_alive()).await
                        .unwrap_or_else(|_| Err(RegistryError::Unavailable("keep-alive timed out".into())))
                    {
                        Ok(()) => {
                            backoff.reset();
                            next_refresh = Instant::now() + self.refresh;
                            expires = Instant::now() + self.ttl;
                            if !held {
                                held = true;
                                tracing::info!(registry = %self.name, kind, lease = %lease.id(), "keep-alive succeeded again; the registry kept the lease");
                                metrics::gauge!(m::REGISTERED, self.labels.iter()).set(1.0);
                            }
                            self.update(|s| {
                                s.registered = true;
                                s.last_keep_alive = Some(SystemTime::now());
                            });
                        }
                        Err(RegistryError::LeaseLost(reason)) => {
                            tracing::warn!(registry = %self.name, kind, %reason, "lease lost; registering again");
                            metrics::counter!(m::KEEPALIVE_FAILURES, self.labels.iter()).increment(1);
                            self.update(|s| s.last_error = Some(format!("lease lost: {reason}")));
                            return Ended::Lost;
                        }
                        Err(e) => {
                            metrics::counter!(m::KEEPALIVE_FAILURES, self.labels.iter()).increment(1);
                            // Never wait longer than one refresh period between
                            // tries, or an outage shorter than the ttl would
                            // still lose us.
                            let delay = retry_delay(backoff, &e).min(self.refresh);
                            next_refresh = Instant::now() + delay;
                            tracing::warn!(registry = %self.name, kind, error = %e, retry_in = ?delay, "keep-alive failed");
                            self.update(|s| s.last_error = Some(e.to_string()));
                        }
                    }
                }
            }
        }
    }

    /// Waits, deregistered, until the health verdict is no longer unhealthy.
    /// True if shutdown came first.
    async fn wait_for_recovery(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            if *self.health.borrow_and_update() != Status::Unhealthy {
                return false;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                changed = self.health.changed() => if changed.is_err() {
                    return true;
                },
            }
        }
    }

    async fn deregister(&self, lease: Box<dyn Lease>) {
        let kind = self.registry.kind();
        match tokio::time::timeout(self.timeout, lease.revoke()).await {
            Ok(Ok(())) => {
                tracing::info!(registry = %self.name, kind, id = %self.instance.id, "deregistered")
            }
            Ok(Err(e)) => {
                tracing::warn!(registry = %self.name, kind, error = %e, "deregistration failed; the lease will expire")
            }
            Err(_) => tracing::warn!(
                registry = %self.name, kind,
                "deregistration timed out; the lease will expire"
            ),
        }
        metrics::gauge!(m::REGISTERED, self.labels.iter()).set(0.0);
        self.update(|s| {
            s.registered = false;
            s.lease = None;
        });
    }

    /// 1 for the status this registry was last told, 0 for the others.
    fn set_announced_gauge(&self, current: Status) {
        for status in Status::ALL {
            let value = if status == current { 1.0 } else { 0.0 };
            let mut labels = self.labels.clone();
            labels.push(metrics::Label::new("status", status.as_str()));
            metrics::gauge!(m::ANNOUNCED_STATUS, labels).set(value);
        }
    }

    fn update(&self, change: impl FnOnce(&mut RegistrationState)) {
        // A poisoned lock only means a panic elsewhere mid-update; the state
        // is plain data and still usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut state);
    }
}

/// The wait before retrying after `error`.
fn retry_delay(backoff: &mut Backoff, error: &RegistryError) -> Duration {
    if error.is_retryable() {
        backoff.next(true)
    } else {
        REJECTED_WAIT
    }
}
