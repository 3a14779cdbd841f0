//! The running agent: what it runs, a reload applied to it, and the
//! shutdown order.

use super::*;
/// Everything the agent runs, and the configuration it runs.
pub(super) struct Running {
    pub(super) config: Config,
    pub(super) config_file: Option<PathBuf>,
    pub(super) state: Arc<AgentState>,
    pub(super) sources: Vec<Source>,
    /// In configuration order.
    pub(super) listeners: Vec<Live>,
    pub(super) discoveries: BTreeMap<String, LiveDiscovery>,
    pub(super) health: Option<LiveHealth>,
    pub(super) registrations: Option<LiveRegistrations>,
    /// Drains of handlers a reload replaced: no longer accepting, their
    /// connections finish as they please until shutdown drains them.
    pub(super) replaced: Vec<Drain>,
    /// Drains of listeners a reload removed, draining now.
    pub(super) retiring: Vec<Drain>,
    pub(super) retiring_tasks: JoinSet<()>,
    /// Our own addresses, for every discovery (see `own`).
    pub(super) own: watch::Sender<Arc<OwnAddrs>>,
    pub(super) admin_addr: SocketAddr,
}

impl Running {
    /// Starts, restarts or stops discovery tasks so that each service some
    /// listener uses has one, feeding exactly the current upstreams (new
    /// ones were filled already, see [`Running::prefilled`]).
    pub(super) async fn sync_discoveries(&mut self, sources_changed: bool) -> DiscoveryChanges {
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
                        // Other registries, same host names.
                        Arc::new(
                            ServiceState::new(
                                name.clone(),
                                self.config.discovery.mode,
                                &self.sources,
                            )
                            .with_names_of(&service)
                            .with_catalog_of(&service),
                        )
                    } else {
                        service
                    };
                    changes.restarted.push(name.clone());
                    self.start_discovery(service, upstreams)
                }
                None => {
                    changes.started.push(name.clone());
                    let service = self.service_state(&name);
                    self.start_discovery(service, upstreams)
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

    fn start_discovery(
        &self,
        service: Arc<ServiceState>,
        upstreams: Vec<Arc<Upstream>>,
    ) -> LiveDiscovery {
        LiveDiscovery::start(
            &self.sources,
            &self.config,
            service,
            upstreams,
            self.own.subscribe(),
        )
    }

    /// Fills the new upstreams of `built` with the instances discovery
    /// already knows (through the endpoint policy, like every snapshot),
    /// so that the listener routes from its first connection (its
    /// discovery is restarted afterwards).
    pub(super) fn prefilled(&self, built: Built) -> Built {
        let own = self.own.borrow().clone();
        for upstream in &built.upstreams {
            if let Some(discovery) = self.discoveries.get(upstream.service()) {
                // Refusals are reported by the restarted discovery.
                let _ = upstream.refresh(&discovery.service.resolved(), &own);
            }
        }
        built
    }

    /// Our own addresses while a reload is applied and until the next:
    /// every listener bound now (those the reload removes still accept
    /// for `drain_delay`) and those it has just bound.
    fn update_own(&self, bound: impl IntoIterator<Item = SocketAddr>) {
        let listening = self.listeners.iter().map(|l| l.listen);
        let own = own::own_addrs(self.admin_addr, listening.chain(bound));
        self.own.send_if_modified(|current| {
            let changed = **current != own;
            if changed {
                *current = Arc::new(own);
            }
            changed
        });
    }

    pub(super) fn service_state(&self, name: &str) -> Arc<ServiceState> {
        Arc::new(ServiceState::new(
            name.to_owned(),
            self.config.discovery.mode,
            &self.sources,
        ))
    }

    /// Shows the admin API what runs now.
    pub(super) fn publish(&self) {
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
            pickable: self
                .listeners
                .iter()
                .flat_map(|l| pickable(&l.config, &l.upstreams))
                .collect(),
        }));
    }

    /// Reads the file again and puts it in service, or changes nothing.
    pub(super) async fn reload(&mut self) -> ReloadOutcome {
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
        let discovery_changed = registries_changed
            || config.discovery != self.config.discovery
            || config.agent.dns_refresh != self.config.agent.dns_refresh;

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
                Ok(health) => Some(health.with_load(self.state.load.clone())),
                Err(e) => return ReloadOutcome::Failed(format!("health checks: {e}")),
            },
            _ => None,
        };
        let old_configs: Vec<UpstreamConfig> =
            self.listeners.iter().map(|l| l.config.clone()).collect();
        let changes = diff(&old_configs, &config.upstreams);
        let mut bound: BTreeMap<usize, Bound> = BTreeMap::new();
        for change in &changes {
            if let ListenerChange::Add { new } = *change {
                let upstream = &config.upstreams[new];
                let what = format!("upstream {}", upstream.service);
                match bind_upstream(upstream, &what) {
                    Ok(listener) => {
                        bound.insert(new, listener);
                    }
                    Err(e) => return ReloadOutcome::Failed(e.to_string()),
                }
            }
        }
        // Last: a token generated here is written to its file at once.
        let admin_token = match self.state.admin_token.load().reloaded(&config.agent) {
            Ok(token) => token,
            Err(e) => return ReloadOutcome::Failed(e),
        };

        self.update_own(bound.values().map(Bound::local_addr));

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
                    let udp = matches!(upstream.protocol, Protocol::Udp(_));
                    let listener = match listener {
                        Some(listener) if listener.is_udp() == udp => listener,
                        // None, or tcp <-> udp: the old socket closes
                        // first, then the port is bound for the new kind.
                        other => {
                            drop(other);
                            match bind_upstream(upstream, &name) {
                                Ok(listener) => listener,
                                Err(e) => {
                                    tracing::error!(listener = %name, error = %e, "cannot listen again");
                                    continue;
                                }
                            }
                        }
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
            self.state
                .load_ttl
                .store(super::load_ttl_ms(&self.config), Ordering::Relaxed);
            if let Some(old) = self.health.take() {
                old.stop().await;
            }
            self.health = health.map(LiveHealth::start);
        }
        if deregister {
            let maintenance = self.state.maintenance.subscribe();
            let load = self.state.load.subscribe();
            let board = self.health.as_ref().map(|h| h.board.clone());
            let registrations = match (&self.config.service, board) {
                (Some(service), Some(board)) => self
                    .sources
                    .iter()
                    .zip(&self.config.registries)
                    .map(|(source, registry)| {
                        registration(
                            source,
                            registry,
                            service,
                            &board,
                            maintenance.clone(),
                            load.clone(),
                        )
                    })
                    .collect(),
                _ => Vec::new(),
            };
            self.registrations = Some(LiveRegistrations::start(registrations));
            summary.reregistered = true;
        }
        if let Some(token) = admin_token {
            let old = self.state.admin_token.swap(Arc::new(token));
            old.remove_generated();
            tracing::info!("admin token replaced");
        }
        self.publish();
        ReloadOutcome::Applied(summary)
    }

    pub(super) fn log_reload(&self, outcome: &ReloadOutcome) {
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
    pub(super) async fn shutdown(mut self) {
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
pub(super) struct DiscoveryChanges {
    pub(super) started: Vec<String>,
    pub(super) stopped: Vec<String>,
    pub(super) restarted: Vec<String>,
}

/// Whether two lists hold the same upstreams, in the same order.
pub(super) fn same(a: &[Arc<Upstream>], b: &[Arc<Upstream>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// A listener a reload removed: it keeps accepting for `drain_delay` (peers
/// and local clients move on), then refuses new connections, lets open ones
/// finish up to `drain_timeout` and closes the rest spread over
/// `drain_spread`, as shutdown does. Shutdown cuts the delay short.
pub(super) async fn retire(live: Live, agent: AgentConfig) {
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
pub(super) fn restart_required(old: &AgentConfig, new: &AgentConfig) -> Vec<String> {
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
