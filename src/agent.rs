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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, AgentState, Catalog, UpstreamView};
use crate::balance::{Balancer, Upstream};
use crate::config::{
    AgentConfig, Config, Protocol, RegistryBackend, RegistryConfig, ServiceConfig, UpstreamConfig,
};
use crate::discovery::{Discovery, ServiceState, Source};
use crate::health::{Health, HealthBoard};
use crate::metrics as m;
use crate::proxy::listener::DEFAULT_BACKLOG;
use crate::proxy::{Drain, Drained, HttpProxy, Listener, Proxy, TcpProxy};
use crate::registration::{Maintenance, Registration, SharedState};
use crate::registry::{self, Instance, Registry, Status};
use crate::reload::{diff, ListenerChange, ReloadOutcome, ReloadSummary, Reloader};

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
}

impl Agent {
    /// Binds the admin API and every listener. Nothing is announced yet.
    pub async fn bind(config: Config) -> Result<Agent, AgentError> {
        let prometheus = crate::metrics::install().map_err(AgentError::Metrics)?;
        let sources = connect_sources(&config.registries)?;
        let admin_listener = bind(config.agent.admin, "the admin API", "admin")?;

        let mut listeners = Vec::new();
        for upstream in &config.upstreams {
            let what = format!("upstream {}", upstream.service);
            listeners.push(build(upstream, bind(upstream.listen, &what, &what)?));
        }

        let (maintenance, maintenance_rx) = watch::channel(None);
        let health = match &config.service {
            Some(service) => Some(Health::new(&service.checks)?),
            None => None,
        };
        let registrations = registrations(&config, &sources, health.as_ref(), &maintenance_rx);
        let (sender, reloads) = mpsc::channel(4);
        let reloader = Reloader(sender);
        let state = Arc::new(AgentState {
            node: config.agent.node.clone(),
            listeners_bound: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            maintenance,
            prometheus,
            catalog: ArcSwap::from_pointee(Catalog {
                registrations: registrations.iter().map(Registration::state).collect(),
                health: health.as_ref().map(Health::board),
                services: Vec::new(),
                upstreams: listeners.iter().map(Built::view).collect(),
            }),
            reloader: reloader.clone(),
        });
        Ok(Agent {
            admin_addr: admin_listener.local_addr(),
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
            ..
        } = self;

        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(admin.run(admin_stop.clone()));

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
        };
        running.sync_discoveries(false).await;
        // Bound since `bind`; accepting from here on.
        running.state.listeners_bound.store(true, Ordering::Relaxed);
        running.registrations = Some(LiveRegistrations::start(registrations));
        running.publish();
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
                    let outcome = running.reload().await;
                    running.log_reload(&outcome);
                    // The asker may have gone (an admin client that hung up).
                    let _ = reply.send(outcome);
                }
            }
        }
        // Reloads asked from here on are answered "shutting down".
        reloads.close();
        running.shutdown().await;
        admin_stop.cancel();
        if let Err(e) = admin_task.await {
            tracing::error!(error = %e, "admin task failed");
        }
        tracing::info!("stopped");
    }
}

/// Binds, then runs until `shutdown`: the whole agent in one call.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    Agent::bind(config).await?.run(shutdown).await;
    Ok(())
}

/// One `[[upstream]]` listener, bound, with its handler and upstreams, not
/// yet accepting.
struct Built {
    config: UpstreamConfig,
    listen: SocketAddr,
    proxy: Proxy,
    /// The listener's own service first, then each HTTP route's.
    upstreams: Vec<Arc<Upstream>>,
}

impl Built {
    fn view(&self) -> UpstreamView {
        UpstreamView {
            config: self.config.clone(),
            listen: self.listen,
            upstream: self.upstreams[0].clone(),
        }
    }
}

/// The handler of `config` on a bound `listener`, with one [`Upstream`]
/// for its service and one per HTTP route.
fn build(config: &UpstreamConfig, listener: Listener) -> Built {
    let listen = listener.local_addr();
    let listener = listener.named(format!("upstream {}", config.service));
    let own = Arc::new(upstream(&config.service, config, listen));
    let mut upstreams = vec![own.clone()];
    let proxy = match &config.protocol {
        Protocol::Tcp => Proxy::tcp(listener, TcpProxy::new(config.clone(), listen, own)),
        Protocol::Http(http) => {
            let routed: Vec<Arc<Upstream>> = http
                .routes
                .iter()
                .map(|r| Arc::new(upstream(&r.service, config, listen)))
                .collect();
            upstreams.extend(routed.iter().cloned());
            let proxy = HttpProxy::new(config.clone(), (**http).clone(), listen, own, routed);
            Proxy::http(listener, proxy)
        }
    };
    Built {
        config: config.clone(),
        listen,
        proxy,
        upstreams,
    }
}

/// A listener accepting, with its own drain.
struct Live {
    config: UpstreamConfig,
    listen: SocketAddr,
    upstreams: Vec<Arc<Upstream>>,
    drain: Drain,
    /// Gives the socket back once `drain.stop` fires.
    task: JoinHandle<Listener>,
}

impl Live {
    fn start(built: Built) -> Live {
        let drain = Drain::default();
        let task = tokio::spawn(built.proxy.run(drain.clone()));
        Live {
            config: built.config,
            listen: built.listen,
            upstreams: built.upstreams,
            drain,
            task,
        }
    }

    fn name(&self) -> String {
        format!("{}@{}", self.config.service, self.listen)
    }

    fn view(&self) -> UpstreamView {
        UpstreamView {
            config: self.config.clone(),
            listen: self.listen,
            upstream: self.upstreams[0].clone(),
        }
    }

    /// Stops accepting and returns the socket, still bound (`None` if the
    /// accept task died, which it does not).
    async fn stop_accepting(self) -> (Option<Listener>, Drain) {
        self.drain.stop.cancel();
        let listener = match self.task.await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::error!(listen = %self.listen, error = %e, "listener task failed");
                None
            }
        };
        (listener, self.drain)
    }
}

/// The discovery task of one service.
struct LiveDiscovery {
    service: Arc<ServiceState>,
    upstreams: Vec<Arc<Upstream>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl LiveDiscovery {
    fn start(
        sources: &[Source],
        config: &Config,
        service: Arc<ServiceState>,
        upstreams: Vec<Arc<Upstream>>,
    ) -> LiveDiscovery {
        let stop = CancellationToken::new();
        let discovery = Discovery::new(
            sources.to_vec(),
            &config.discovery,
            service.clone(),
            upstreams.clone(),
        )
        .with_last_known(&config.agent.state_dir);
        LiveDiscovery {
            service,
            upstreams,
            task: tokio::spawn(discovery.run(stop.clone())),
            stop,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(TASK_STOP_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(service = %self.service.name, "discovery did not stop in time; aborting it");
            task.abort();
        }
    }
}

struct LiveHealth {
    board: Arc<HealthBoard>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl LiveHealth {
    fn start(health: Health) -> LiveHealth {
        let stop = CancellationToken::new();
        LiveHealth {
            board: health.board(),
            task: tokio::spawn(health.run(stop.clone())),
            stop,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "health task failed");
        }
    }
}

/// One registration task per registry, all fed by the same verdict.
struct LiveRegistrations {
    states: Vec<SharedState>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl LiveRegistrations {
    fn start(registrations: Vec<Registration>) -> LiveRegistrations {
        let stop = CancellationToken::new();
        let states = registrations.iter().map(Registration::state).collect();
        let mut tasks = JoinSet::new();
        for registration in registrations {
            tasks.spawn(registration.run(stop.clone()));
        }
        LiveRegistrations {
            states,
            stop,
            tasks,
        }
    }

    /// Deregisters from every registry at once, each bounded by its own
    /// registry's timeout: a dead registry does not delay the others.
    async fn stop(mut self) {
        self.stop.cancel();
        while let Some(result) = self.tasks.join_next().await {
            if let Err(e) = result {
                tracing::error!(error = %e, "registration task failed");
            }
        }
    }
}

/// Everything the agent runs, and the configuration it runs.
struct Running {
    config: Config,
    config_file: Option<PathBuf>,
    state: Arc<AgentState>,
    sources: Vec<Source>,
    /// In configuration order.
    listeners: Vec<Live>,
    discoveries: BTreeMap<String, LiveDiscovery>,
    health: Option<LiveHealth>,
    registrations: Option<LiveRegistrations>,
    /// Drains of handlers a reload replaced: no longer accepting, their
    /// connections finish as they please until shutdown drains them.
    replaced: Vec<Drain>,
    /// Drains of listeners a reload removed, draining now.
    retiring: Vec<Drain>,
    retiring_tasks: JoinSet<()>,
}

impl Running {
    /// Starts, restarts or stops discovery tasks so that each service some
    /// listener uses has one, feeding exactly the current upstreams (new
    /// ones were filled already, see [`Running::prefilled`]).
    async fn sync_discoveries(&mut self, sources_changed: bool) -> DiscoveryChanges {
        let mut wanted: BTreeMap<String, Vec<Arc<Upstream>>> = BTreeMap::new();
        for live in &self.listeners {
            for upstream in &live.upstreams {
                wanted
                    .entry(upstream.service().to_owned())
                    .or_default()
                    .push(upstream.clone());
            }
        }
        let mut old = std::mem::take(&mut self.discoveries);
        let mut changes = DiscoveryChanges::default();
        for (name, upstreams) in wanted {
            let discovery = match old.remove(&name) {
                Some(running) if !sources_changed && same(&running.upstreams, &upstreams) => {
                    running
                }
                Some(running) => {
                    let service = running.service.clone();
                    running.stop().await;
                    let service = if sources_changed {
                        self.service_state(&name)
                    } else {
                        service
                    };
                    changes.restarted.push(name.clone());
                    LiveDiscovery::start(&self.sources, &self.config, service, upstreams)
                }
                None => {
                    changes.started.push(name.clone());
                    let service = self.service_state(&name);
                    LiveDiscovery::start(&self.sources, &self.config, service, upstreams)
                }
            };
            self.discoveries.insert(name, discovery);
        }
        for (name, discovery) in old {
            discovery.stop().await;
            changes.stopped.push(name);
        }
        changes
    }

    /// Fills the new upstreams of `built` with the instances discovery
    /// already knows, so that the listener routes from its first
    /// connection (its discovery is restarted afterwards).
    fn prefilled(&self, built: Built) -> Built {
        for upstream in &built.upstreams {
            if let Some(discovery) = self.discoveries.get(upstream.service()) {
                upstream.refresh(&discovery.service.instances());
            }
        }
        built
    }

    fn service_state(&self, name: &str) -> Arc<ServiceState> {
        Arc::new(ServiceState::new(
            name.to_owned(),
            self.config.discovery.mode,
            &self.sources,
        ))
    }

    /// Shows the admin API what runs now.
    fn publish(&self) {
        self.state.catalog.store(Arc::new(Catalog {
            registrations: self
                .registrations
                .as_ref()
                .map(|r| r.states.clone())
                .unwrap_or_default(),
            health: self.health.as_ref().map(|h| h.board.clone()),
            services: self
                .discoveries
                .values()
                .map(|d| d.service.clone())
                .collect(),
            upstreams: self.listeners.iter().map(Live::view).collect(),
        }));
    }

    /// Reads the file again and puts it in service, or changes nothing.
    async fn reload(&mut self) -> ReloadOutcome {
        let Some(path) = self.config_file.clone() else {
            return ReloadOutcome::Failed(
                "this agent was started without a configuration file; nothing to reload".into(),
            );
        };
        let config = match Config::load(&path) {
            Ok(config) => config,
            Err(e) => return ReloadOutcome::Invalid(e),
        };
        let service_changed = config.service != self.config.service;
        let registries_changed = config.registries != self.config.registries;
        let discovery_changed = registries_changed || config.discovery != self.config.discovery;

        // Everything that can fail, before anything changes.
        let sources = if registries_changed {
            match connect_sources(&config.registries) {
                Ok(sources) => Some(sources),
                Err(e) => return ReloadOutcome::Failed(e.to_string()),
            }
        } else {
            None
        };
        let health = match (&config.service, service_changed) {
            (Some(service), true) => match Health::new(&service.checks) {
                Ok(health) => Some(health),
                Err(e) => return ReloadOutcome::Failed(format!("health checks: {e}")),
            },
            _ => None,
        };
        let old_configs: Vec<UpstreamConfig> =
            self.listeners.iter().map(|l| l.config.clone()).collect();
        let changes = diff(&old_configs, &config.upstreams);
        let mut bound: BTreeMap<usize, Listener> = BTreeMap::new();
        for change in &changes {
            if let ListenerChange::Add { new } = *change {
                let upstream = &config.upstreams[new];
                let what = format!("upstream {}", upstream.service);
                match bind(upstream.listen, &what, &what) {
                    Ok(listener) => {
                        bound.insert(new, listener);
                    }
                    Err(e) => return ReloadOutcome::Failed(e.to_string()),
                }
            }
        }

        let mut summary = ReloadSummary {
            restart_required: restart_required(&self.config.agent, &config.agent),
            ..ReloadSummary::default()
        };
        let mut old: Vec<Option<Live>> = std::mem::take(&mut self.listeners)
            .into_iter()
            .map(Some)
            .collect();
        let mut listeners = Vec::new();
        for change in changes {
            match change {
                ListenerChange::Keep { old: o, .. } => {
                    if let Some(live) = old[o].take() {
                        summary.unchanged += 1;
                        listeners.push(live);
                    }
                }
                ListenerChange::Replace { old: o, new } => {
                    let Some(live) = old[o].take() else { continue };
                    let upstream = &config.upstreams[new];
                    let name = live.name();
                    // The accept loop stops and hands its socket over;
                    // meanwhile the kernel queues new connects.
                    let (listener, drain) = live.stop_accepting().await;
                    let listener = match listener {
                        Some(listener) => listener,
                        None => match bind(upstream.listen, &name, &name) {
                            Ok(listener) => listener,
                            Err(e) => {
                                tracing::error!(listener = %name, error = %e, "cannot listen again");
                                continue;
                            }
                        },
                    };
                    self.replaced.push(drain);
                    let live = Live::start(self.prefilled(build(upstream, listener)));
                    summary.changed.push(live.name());
                    listeners.push(live);
                }
                ListenerChange::Add { new } => {
                    let Some(listener) = bound.remove(&new) else {
                        continue;
                    };
                    let live = Live::start(self.prefilled(build(&config.upstreams[new], listener)));
                    summary.added.push(live.name());
                    listeners.push(live);
                }
                ListenerChange::Remove { old: o } => {
                    let Some(live) = old[o].take() else { continue };
                    summary.removed.push(live.name());
                    self.retiring.push(live.drain.clone());
                    self.retiring_tasks
                        .spawn(retire(live, config.agent.clone()));
                }
            }
        }
        self.listeners = listeners;
        // Handlers replaced earlier whose connections have all ended.
        self.replaced.retain(|d| !d.connections.is_empty());
        self.retiring
            .retain(|d| !d.connections.is_empty() || !d.stop.is_cancelled());

        let deregister = service_changed || registries_changed;
        if deregister {
            // Leave first: a new registration of the same id must not be
            // removed by the old one's deregistration.
            if let Some(registrations) = self.registrations.take() {
                registrations.stop().await;
            }
        }
        if let Some(sources) = sources {
            self.sources = sources;
        }
        self.config = config;
        let discoveries = self.sync_discoveries(discovery_changed).await;
        summary.discovery_started = discoveries.started;
        summary.discovery_stopped = discoveries.stopped;
        summary.discovery_restarted = discoveries.restarted;
        if service_changed {
            if let Some(old) = self.health.take() {
                old.stop().await;
            }
            self.health = health.map(LiveHealth::start);
        }
        if deregister {
            let maintenance = self.state.maintenance.subscribe();
            let board = self.health.as_ref().map(|h| h.board.clone());
            let registrations = match (&self.config.service, board) {
                (Some(service), Some(board)) => self
                    .sources
                    .iter()
                    .zip(&self.config.registries)
                    .map(|(source, registry)| {
                        registration(source, registry, service, &board, maintenance.clone())
                    })
                    .collect(),
                _ => Vec::new(),
            };
            self.registrations = Some(LiveRegistrations::start(registrations));
            summary.reregistered = true;
        }
        self.publish();
        ReloadOutcome::Applied(summary)
    }

    fn log_reload(&self, outcome: &ReloadOutcome) {
        metrics::counter!(m::CONFIG_RELOADS, "result" => outcome.result()).increment(1);
        let file = self
            .config_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match outcome {
            ReloadOutcome::Applied(s) => {
                tracing::info!(%file, added = ?s.added, removed = ?s.removed, changed = ?s.changed, unchanged = s.unchanged, discovery_started = ?s.discovery_started, discovery_stopped = ?s.discovery_stopped, discovery_restarted = ?s.discovery_restarted, reregistered = s.reregistered, "configuration reloaded");
                if !s.restart_required.is_empty() {
                    tracing::warn!(keys = ?s.restart_required, "these changes take effect only after a restart");
                }
            }
            ReloadOutcome::Invalid(e) => {
                let problems = match e.problems() {
                    [] => e.to_string(),
                    problems => problems
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                };
                tracing::error!(%file, %problems, "reload rejected: the new configuration is invalid; the running one stays");
            }
            ReloadOutcome::Failed(reason) => {
                tracing::error!(%file, %reason, "reload failed; the running configuration stays");
            }
        }
    }

    /// Deregisters, waits `drain_delay`, stops accepting, drains every
    /// listener (and what reloads left draining), stops the rest.
    async fn shutdown(mut self) {
        let agent = self.config.agent.clone();
        tracing::info!(drain_delay = ?agent.drain_delay, drain_timeout = ?agent.drain_timeout, drain_spread = ?agent.drain_spread, "shutting down");
        self.state.draining.store(true, Ordering::Relaxed);
        if let Some(registrations) = self.registrations.take() {
            registrations.stop().await;
        }
        tokio::time::sleep(agent.drain_delay).await;

        let mut drains = std::mem::take(&mut self.replaced);
        for live in std::mem::take(&mut self.listeners) {
            // Dropping the socket refuses new connections.
            let (_, drain) = live.stop_accepting().await;
            drains.push(drain);
        }
        for drain in &self.retiring {
            drain.stop.cancel();
        }
        let open: usize = drains.iter().map(|d| d.connections.len()).sum();
        if open > 0 {
            tracing::info!(open, "waiting for open connections to finish");
        }
        let finish = futures_util::future::join_all(
            drains
                .iter()
                .map(|d| d.finish(agent.drain_timeout, agent.drain_spread)),
        );
        let retiring = async { while self.retiring_tasks.join_next().await.is_some() {} };
        let (drained, ()) = tokio::join!(finish, retiring);
        let cut: usize = drained.iter().map(|d| d.cut).sum();
        if cut > 0 {
            metrics::counter!(m::DRAIN_CUT).increment(cut as u64);
            tracing::warn!(
                cut,
                spread = ?agent.drain_spread,
                "drain timeout reached; closed the remaining connections in batches"
            );
        }

        for (_, discovery) in std::mem::take(&mut self.discoveries) {
            discovery.stop().await;
        }
        if let Some(health) = self.health.take() {
            health.stop().await;
        }
    }
}

/// What [`Running::sync_discoveries`] did, by service.
#[derive(Default)]
struct DiscoveryChanges {
    started: Vec<String>,
    stopped: Vec<String>,
    restarted: Vec<String>,
}

/// Whether two lists hold the same upstreams, in the same order.
fn same(a: &[Arc<Upstream>], b: &[Arc<Upstream>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// A listener a reload removed: it keeps accepting for `drain_delay` (peers
/// and local clients move on), then refuses new connections, lets open ones
/// finish up to `drain_timeout` and closes the rest spread over
/// `drain_spread`, as shutdown does. Shutdown cuts the delay short.
async fn retire(live: Live, agent: AgentConfig) {
    let name = live.name();
    tokio::select! {
        _ = tokio::time::sleep(agent.drain_delay) => {}
        _ = live.drain.stop.cancelled() => {}
    }
    let (listener, drain) = live.stop_accepting().await;
    drop(listener);
    let Drained { open, cut } = drain.finish(agent.drain_timeout, agent.drain_spread).await;
    if cut > 0 {
        metrics::counter!(m::DRAIN_CUT).increment(cut as u64);
    }
    tracing::info!(listener = %name, open, cut, "removed listener drained and closed");
}

/// `[agent]` keys a reload cannot apply.
fn restart_required(old: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, changed) in [
        ("agent.node", old.node != new.node),
        ("agent.admin", old.admin != new.admin),
        ("agent.log", old.log != new.log),
        ("agent.log_format", old.log_format != new.log_format),
        ("agent.threads", old.threads != new.threads),
    ] {
        if changed {
            keys.push(key.to_owned());
        }
    }
    keys
}

fn connect_sources(registries: &[RegistryConfig]) -> Result<Vec<Source>, AgentError> {
    registries
        .iter()
        .map(|r| {
            Ok(Source {
                name: r.name.clone(),
                registry: connect_registry(r)?,
            })
        })
        .collect()
}

/// One registration per registry, all fed by the same verdict; none
/// without `[service]`.
fn registrations(
    config: &Config,
    sources: &[Source],
    health: Option<&Health>,
    maintenance: &watch::Receiver<Maintenance>,
) -> Vec<Registration> {
    match (&config.service, health) {
        (Some(service), Some(health)) => sources
            .iter()
            .zip(&config.registries)
            .map(|(source, registry)| {
                registration(
                    source,
                    registry,
                    service,
                    &health.board(),
                    maintenance.clone(),
                )
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn registration(
    source: &Source,
    config: &RegistryConfig,
    service: &ServiceConfig,
    health: &HealthBoard,
    maintenance: watch::Receiver<Maintenance>,
) -> Registration {
    let instance = Instance {
        name: service.name.clone(),
        id: service.id.clone(),
        host: service.host.clone(),
        port: service.port,
        tags: service.tags.clone(),
        metadata: service.metadata.clone(),
        version: service.version.clone(),
        weight: service.weight,
        // Replaced by the health verdict before every write.
        status: Status::Unknown,
    };
    Registration::new(
        source.name.clone(),
        source.registry.clone(),
        instance,
        config.ttl,
        config.timeout,
        health.subscribe(),
        maintenance,
        service.deregister_critical_after,
    )
}

/// Binds one listening socket; a taken port fails startup (or the reload)
/// here.
fn bind(addr: SocketAddr, what: &str, name: &str) -> Result<Listener, AgentError> {
    Listener::bind(addr, DEFAULT_BACKLOG, name).map_err(|source| AgentError::Bind {
        what: what.to_owned(),
        addr,
        source,
    })
}

/// The upstream of `service` behind the listener `config` describes (its
/// own service, or one of its HTTP routes'), with the listener's filter and
/// balancing; its metrics are labelled with the bound address.
fn upstream(service: &str, config: &UpstreamConfig, listen: SocketAddr) -> Upstream {
    let balancer = Balancer::new(
        config.strategy,
        config.ejection.clone(),
        config.panic_threshold,
    )
    .with_metrics(service, listen);
    Upstream::new(service, config.filter.clone(), balancer)
}

/// Builds the backend a `[registry]` names. Connecting is lazy: an
/// unreachable registry shows up as errors in the loops, not here. Only a
/// setup squire cannot run with (an embedded-registry directory it must
/// not trust) fails.
pub fn connect_registry(config: &RegistryConfig) -> Result<Arc<dyn Registry>, AgentError> {
    Ok(match &config.backend {
        RegistryBackend::Local { dir, group } => Arc::new(
            registry::local::LocalRegistry::open(dir.clone(), group.as_deref(), config.ttl)
                .map_err(|reason| AgentError::Registry {
                    name: config.name.clone(),
                    reason,
                })?,
        ),
        RegistryBackend::Etcd(etcd) => Arc::new(registry::etcd::EtcdRegistry::new(
            etcd.clone(),
            config.ttl,
            config.timeout,
        )),
        RegistryBackend::Consul(consul) => Arc::new(registry::consul::ConsulRegistry::new(
            consul,
            config.ttl,
            config.timeout,
        )),
    })
}
