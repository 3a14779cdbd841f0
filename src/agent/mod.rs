//! Wires the parts together and owns the order of startup, reload and
//! shutdown.
//!
//! Start: bind the admin API and every listener (a taken port fails here),
//! start the health checks and discovery, then register into every registry
//! (as `unknown` until the checks have risen, so peers send nothing before
//! the service is ready).
//!
//! Reload ([`Reloader`], from SIGHUP or `POST /v1/reload`): read and
//! validate the file again; an invalid one changes nothing. Then, by
//! listen address ([`crate::reload::diff`]): an unchanged listener is left
//! alone with its connections and balancer state; a changed one hands its
//! bound socket to a new handler with new [`Upstream`]s (so clients never
//! see a refused connect; its open connections finish on the old handler,
//! HTTP keep-alive ones after their current request); a new one is bound
//! (a taken port fails the whole reload before anything changes); a
//! removed one drains as on shutdown. Discovery follows the set of
//! services, and a changed `[service]` or registry list registers again.
//!
//! Stop: deregister from every registry at once, wait `drain_delay` so
//! peers see us leave, stop accepting, let open connections finish up to
//! `drain_timeout`, close the rest in batches spread over `drain_spread`,
//! return.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, AdminToken, AgentState, Catalog, Pickable, UpstreamView};
use crate::balance::{Balancer, OwnAddrs, Upstream};
use crate::config::{
    AgentConfig, Config, Protocol, RegistryBackend, RegistryConfig, ServiceConfig, UpstreamConfig,
};
use crate::discovery::{Discovery, ServiceState, Source};
use crate::health::{Health, HealthBoard};
use crate::metrics as m;
use crate::proxy::{
    Bound, Drain, Drained, HttpProxy, Listener, Proxy, TcpProxy, UdpListener, UdpProxy,
};
use crate::registration::{Maintenance, Registration, Reported, SharedState};
use crate::registry::{self, Instance, Registry, Status};
use crate::reload::{diff, ListenerChange, ReloadOutcome, ReloadSummary, Reloader};

mod own;
mod parts;
mod running;

pub use parts::connect_registry;
use parts::*;
use running::*;

/// How long a stopped discovery task may take to return before it is
/// aborted.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    #[error("registry {name}: {reason}")]
    Registry { name: String, reason: String },
    #[error("cannot set up the health checks: {0}")]
    Health(#[from] crate::tls::TlsError),
    #[error("{0}")]
    AdminToken(String),
}

/// A bound agent, ready to [`run`](Agent::run).
pub struct Agent {
    config: Config,
    config_file: Option<PathBuf>,
    state: Arc<AgentState>,
    admin: Admin,
    admin_addr: SocketAddr,
    sources: Vec<Source>,
    listeners: Vec<Built>,
    health: Option<Health>,
    registrations: Vec<Registration>,
    reloads: mpsc::Receiver<oneshot::Sender<ReloadOutcome>>,
    reloader: Reloader,
    /// Our own addresses, which discovery refuses as endpoints.
    own: watch::Sender<Arc<OwnAddrs>>,
}

impl Agent {
    /// Binds the admin API and every listener. Nothing is announced yet.
    pub async fn bind(config: Config) -> Result<Agent, AgentError> {
        let prometheus = crate::metrics::install().map_err(AgentError::Metrics)?;
        let sources = connect_sources(&config.registries)?;
        let admin_listener = bind(
            config.agent.admin,
            config.agent.backlog,
            "the admin API",
            "admin",
        )?;
        let admin_token = AdminToken::for_agent(&config.agent, admin_listener.local_addr())
            .map_err(AgentError::AdminToken)?;

        let mut listeners = Vec::new();
        for upstream in &config.upstreams {
            let what = format!("upstream {}", upstream.service);
            listeners.push(build(upstream, bind_upstream(upstream, &what)?));
        }

        let admin_addr = admin_listener.local_addr();
        let own = watch::Sender::new(Arc::new(own::own_addrs(
            admin_addr,
            listeners.iter().map(|l| l.listen),
        )));
        let (maintenance, maintenance_rx) = watch::channel(None);
        let (load, load_rx) = watch::channel(None);
        let health = match &config.service {
            Some(service) => Some(Health::new(&service.checks)?.with_load(load.clone())),
            None => None,
        };
        let registrations = registrations(
            &config,
            &sources,
            health.as_ref(),
            &maintenance_rx,
            &load_rx,
        );
        let (sender, reloads) = mpsc::channel(4);
        let reloader = Reloader(sender);
        let state = Arc::new(AgentState {
            node: config.agent.node.clone(),
            listeners_bound: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            maintenance,
            load,
            load_ttl: AtomicU64::new(load_ttl_ms(&config)),
            prometheus,
            catalog: ArcSwap::from_pointee(Catalog {
                registrations: registrations.iter().map(Registration::state).collect(),
                health: health.as_ref().map(Health::board),
                services: Vec::new(),
                upstreams: listeners.iter().map(Built::view).collect(),
                pickable: listeners
                    .iter()
                    .flat_map(|l| pickable(&l.config, &l.upstreams))
                    .collect(),
            }),
            catalog_waits: tokio::sync::Semaphore::new(crate::admin::MAX_BLOCKING_QUERIES),
            reloader: reloader.clone(),
            admin_token: ArcSwap::from_pointee(admin_token),
        });
        Ok(Agent {
            admin_addr,
            own,
            admin: Admin::new(admin_listener, state.clone()),
            config,
            config_file: None,
            state,
            sources,
            listeners,
            health,
            registrations,
            reloads,
            reloader,
        })
    }

    /// The file a reload reads. Without one (an agent built from text), a
    /// reload fails and changes nothing.
    pub fn reload_from(mut self, path: impl Into<PathBuf>) -> Agent {
        self.config_file = Some(path.into());
        self
    }

    /// Asks the running agent to reload (what SIGHUP does).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Where the admin API listens (the real port when configured as `:0`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The token the admin API's mutating endpoints require (configured or
    /// generated), for a program that runs the agent in-process.
    pub fn admin_token(&self) -> crate::config::Secret {
        self.state.admin_token.load().secret().clone()
    }

    /// Where each upstream listens, in configuration order.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.listen).collect()
    }

    /// Runs until `shutdown` resolves, reloading when asked, then shuts
    /// down in order and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Agent {
            config,
            config_file,
            state,
            admin,
            sources,
            listeners,
            health,
            registrations,
            mut reloads,
            own,
            admin_addr,
            ..
        } = self;

        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(admin.run(admin_stop.clone()));
        let trim_task = tokio::spawn(crate::memory::trim_periodically(admin_stop.clone()));

        let health = health.map(LiveHealth::start);
        let mut running = Running {
            listeners: listeners.into_iter().map(Live::start).collect(),
            discoveries: BTreeMap::new(),
            health,
            registrations: None,
            replaced: Vec::new(),
            retiring: Vec::new(),
            retiring_tasks: JoinSet::new(),
            config,
            config_file,
            state,
            sources,
            own,
            admin_addr,
        };
        running.sync_discoveries(false).await;
        // Bound since `bind`; accepting from here on.
        running.state.listeners_bound.store(true, Ordering::Relaxed);
        running.registrations = Some(LiveRegistrations::start(registrations));
        running.publish();
        let notifier = Arc::new(crate::notify::Notifier::from_env());
        let ready_state = running.state.clone();
        let notify_task = tokio::spawn(crate::notify::ready_and_watchdog(
            notifier.clone(),
            move || crate::admin::not_ready_reason(&ready_state).is_none(),
        ));
        let registries: Vec<&str> = running
            .config
            .registries
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        tracing::info!(node = %running.config.agent.node, ?registries, discovery = running.config.discovery.mode.name(), "squire running");

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(reply) = reloads.recv() => {
                    notifier.reloading();
                    let outcome = running.reload().await;
                    notifier.send("READY=1");
                    running.log_reload(&outcome);
                    // The asker may have gone (an admin client that hung up).
                    let _ = reply.send(outcome);
                }
            }
        }
        // Reloads asked from here on are answered "shutting down".
        reloads.close();
        notifier.send("STOPPING=1");
        notify_task.abort();
        let state = running.state.clone();
        running.shutdown().await;
        admin_stop.cancel();
        // It only waits for its next tick; nothing to wait for.
        trim_task.abort();
        if let Err(e) = admin_task.await {
            tracing::error!(error = %e, "admin task failed");
        }
        state.admin_token.load().remove_generated();
        tracing::info!("stopped");
    }
}

/// Binds, then runs until `shutdown`: the whole agent in one call.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    Agent::bind(config).await?.run(shutdown).await;
    Ok(())
}

/// `service.load_ttl` in milliseconds (the default without `[service]`),
/// for [`AgentState::load_ttl`](crate::admin::AgentState::load_ttl).
pub(crate) fn load_ttl_ms(config: &Config) -> u64 {
    let ttl = config
        .service
        .as_ref()
        .map_or(crate::load::DEFAULT_TTL, |s| s.load_ttl);
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}
