//! [`Resolver`]: the host names of a service's instances, resolved when a
//! snapshot is built and again every `agent.dns_refresh`, never per
//! connect.
//!
//! The system resolver (`getaddrinfo`, through `tokio::net::lookup_host`)
//! tells no TTL, so names are looked up again on a fixed interval, as
//! operators of such resolvers expect. An instance whose host is an IP
//! address needs no lookup; a name seen for the first time is looked up in
//! the background while the snapshot is built without it, so a slow or
//! hanging name never delays the other instances. A name that has never
//! resolved is refused as `unresolvable` and tried again at the next
//! refresh; one that resolved before and then fails keeps its last
//! addresses, so a DNS outage takes no working route away. At most
//! [`CONCURRENT_LOOKUPS`] lookups run at once per service, each bounded by
//! [`LOOKUP_TIMEOUT`]: thousands of hostile names cannot take the blocking
//! threads the rest of squire needs.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::state::{Resolution, ServiceState};
use crate::balance::policy::{self, Host, Refusal, Resolved};
use crate::registry::Instance;

/// The longest one lookup may take before it counts as failed.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Lookups of one service in flight at once.
pub const CONCURRENT_LOOKUPS: usize = 8;

/// A finished lookup: the name and its addresses, or why there are none.
type Lookup = (String, Result<Vec<IpAddr>, String>);

pub(super) struct Resolver {
    /// Where the resolutions are kept (also for the admin API).
    service: Arc<ServiceState>,
    every: Duration,
    lookups: JoinSet<Lookup>,
    in_flight: HashSet<String>,
    /// The names the instances used at the last [`Resolver::resolve`].
    used: HashSet<String>,
    limit: Arc<Semaphore>,
    next_refresh: Instant,
}

impl Resolver {
    pub(super) fn new(service: Arc<ServiceState>, every: Duration) -> Self {
        Resolver {
            service,
            every,
            lookups: JoinSet::new(),
            in_flight: HashSet::new(),
            used: HashSet::new(),
            limit: Arc::new(Semaphore::new(CONCURRENT_LOOKUPS)),
            next_refresh: Instant::now() + every,
        }
    }

    /// The addresses of every instance, from what is known now: an IP host
    /// as it is, a name as it last resolved. A name not looked up yet is
    /// looked up now, in the background, and its instances are left out
    /// until it answers. Names no instance uses any more are forgotten.
    pub(super) fn resolve(&mut self, instances: &[Instance]) -> Vec<Resolved> {
        let mut names = lock(&self.service.names);
        let mut used = HashSet::new();
        let mut missing = Vec::new();
        let mut resolved = Vec::with_capacity(instances.len());
        for instance in instances {
            let addrs = match policy::host(&instance.host) {
                Ok(Host::Ip(ip)) => Ok(Arc::from([SocketAddr::new(ip, instance.port)])),
                Err(refusal) => Err(refusal),
                Ok(Host::Name(name)) => {
                    used.insert(name);
                    match names.get(name) {
                        Some(Resolution {
                            addrs: Some(ips), ..
                        }) => Ok(ips
                            .iter()
                            .map(|ip| SocketAddr::new(*ip, instance.port))
                            .collect()),
                        Some(_) => Err(Refusal::Unresolvable),
                        None => {
                            missing.push(name.to_owned());
                            continue;
                        }
                    }
                }
            };
            resolved.push(Resolved {
                instance: instance.clone(),
                addrs,
            });
        }
        names.retain(|name, _| used.contains(name.as_str()));
        drop(names);
        self.used = used.into_iter().map(str::to_owned).collect();
        for name in missing {
            self.look_up(name);
        }
        resolved
    }

    /// When every known name is due to be looked up again.
    pub(super) fn refresh_at(&self) -> Instant {
        self.next_refresh
    }

    /// Looks every known name up again (each keeps what it resolved to
    /// until its new answer is in).
    pub(super) fn refresh(&mut self) {
        self.next_refresh = Instant::now() + self.every;
        let names: Vec<String> = lock(&self.service.names).keys().cloned().collect();
        for name in names {
            self.look_up(name);
        }
    }

    /// Waits for the next lookup to end and keeps its answer: `true` when
    /// what an instance would be dialled at changed. Pending while none is
    /// in flight.
    pub(super) async fn next(&mut self) -> bool {
        let (name, answer) = loop {
            match self.lookups.join_next().await {
                Some(Ok(lookup)) => break lookup,
                // A lookup task that panicked: its name is tried again at
                // the next refresh (the panic is counted by the hook).
                Some(Err(_)) => continue,
                None => std::future::pending().await,
            }
        };
        self.in_flight.remove(&name);
        let service = &self.service.name;
        let mut names = lock(&self.service.names);
        if !self.used.contains(&name) && !names.contains_key(&name) {
            return false; // no instance uses it any more
        }
        let known = names.get(&name).cloned().unwrap_or_default();
        let mut next = Resolution {
            at: Some(SystemTime::now()),
            ..known.clone()
        };
        match answer {
            Ok(ips) => {
                if known.error.is_some() && known.addrs.is_some() {
                    tracing::info!(service = %service, host = %name, addresses = ?ips, "host name resolves again");
                }
                next.addrs = Some(Arc::from(ips));
                next.error = None;
            }
            Err(error) => {
                if known.addrs.is_some() && known.error.is_none() {
                    tracing::warn!(service = %service, host = %name, %error, "host name no longer resolves; keeping its last addresses");
                }
                next.error = Some(error);
            }
        }
        // A first answer, even a failure, changes the instance from
        // "being looked up" to routed or refused.
        let changed = known.at.is_none() || next.addrs != known.addrs;
        names.insert(name, next);
        changed
    }

    fn look_up(&mut self, name: String) {
        if !self.in_flight.insert(name.clone()) {
            return;
        }
        let limit = self.limit.clone();
        self.lookups.spawn(async move {
            // The semaphore is never closed.
            let _permit = limit.acquire_owned().await;
            let answer = lookup(&name).await;
            (name, answer)
        });
    }
}

/// One lookup through the system resolver: the addresses in its order of
/// preference, without repeats.
async fn lookup(name: &str) -> Result<Vec<IpAddr>, String> {
    let found = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, 0)))
        .await
        .map_err(|_| format!("no answer within {LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let mut ips: Vec<IpAddr> = Vec::new();
    for addr in found {
        if !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
    }
    if ips.is_empty() {
        return Err("no addresses".to_owned());
    }
    Ok(ips)
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data: a panic elsewhere mid-update leaves it usable.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
