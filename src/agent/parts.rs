//! The parts the agent runs and restarts on reload: a built listener, a
//! live one with its drain, the discovery, health and registration tasks,
//! and how they are built from the configuration.

use super::*;
/// One `[[upstream]]` listener, bound, with its handler and upstreams, not
/// yet accepting.
pub(super) struct Built {
    pub(super) config: UpstreamConfig,
    pub(super) listen: SocketAddr,
    pub(super) proxy: Proxy,
    /// The listener's own service first, then each HTTP route's.
    pub(super) upstreams: Vec<Arc<Upstream>>,
}

impl Built {
    pub(super) fn view(&self) -> UpstreamView {
        UpstreamView {
            config: self.config.clone(),
            listen: self.listen,
            upstream: self.upstreams[0].clone(),
        }
    }
}

/// The upstreams of one listener as the catalog API picks from them.
pub(super) fn pickable(config: &UpstreamConfig, upstreams: &[Arc<Upstream>]) -> Vec<Pickable> {
    upstreams
        .iter()
        .map(|upstream| Pickable {
            upstream: upstream.clone(),
            hash_key: config.hash_key.clone(),
        })
        .collect()
}

/// The handler of `config` on a bound `listener`, with one [`Upstream`]
/// for its service and one per HTTP route.
/// `bound` is of the protocol's kind (see [`bind_upstream`]).
pub(super) fn build(config: &UpstreamConfig, bound: Bound) -> Built {
    let listen = bound.local_addr();
    let own = Arc::new(upstream(&config.service, config, listen));
    let mut upstreams = vec![own.clone()];
    let listener = match bound {
        Bound::Udp(socket) => {
            let udp = match &config.protocol {
                Protocol::Udp(udp) => udp.clone(),
                // A mismatch is rebound by the reload before it builds;
                // should one get here, the listener serves udp defaults.
                _ => crate::config::UdpUpstreamConfig {
                    max_sessions: config.max_connections,
                    strip: false,
                },
            };
            let proxy = UdpProxy::new(config.clone(), udp, listen, own);
            return Built {
                config: config.clone(),
                listen,
                proxy: Proxy::udp(socket, proxy),
                upstreams,
            };
        }
        Bound::Tcp(listener) => listener.named(format!("upstream {}", config.service)),
    };
    let proxy = match &config.protocol {
        Protocol::Tcp | Protocol::Udp(_) => {
            Proxy::tcp(listener, TcpProxy::new(config.clone(), listen, own))
        }
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
pub(super) struct Live {
    pub(super) config: UpstreamConfig,
    pub(super) listen: SocketAddr,
    pub(super) upstreams: Vec<Arc<Upstream>>,
    pub(super) drain: Drain,
    /// Gives the socket back once `drain.stop` fires.
    pub(super) task: JoinHandle<Bound>,
}

impl Live {
    pub(super) fn start(built: Built) -> Live {
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

    pub(super) fn name(&self) -> String {
        format!("{}@{}", self.config.service, self.listen)
    }

    pub(super) fn view(&self) -> UpstreamView {
        UpstreamView {
            config: self.config.clone(),
            listen: self.listen,
            upstream: self.upstreams[0].clone(),
        }
    }

    /// Stops accepting and returns the socket, still bound (`None` if the
    /// accept task died, which it does not).
    pub(super) async fn stop_accepting(self) -> (Option<Bound>, Drain) {
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
pub(super) struct LiveDiscovery {
    pub(super) service: Arc<ServiceState>,
    pub(super) upstreams: Vec<Arc<Upstream>>,
    pub(super) stop: CancellationToken,
    pub(super) task: JoinHandle<()>,
}

impl LiveDiscovery {
    pub(super) fn start(
        sources: &[Source],
        config: &Config,
        service: Arc<ServiceState>,
        upstreams: Vec<Arc<Upstream>>,
        own: watch::Receiver<Arc<OwnAddrs>>,
    ) -> LiveDiscovery {
        let stop = CancellationToken::new();
        let discovery = Discovery::new(
            sources.to_vec(),
            &config.discovery,
            service.clone(),
            upstreams.clone(),
        )
        .with_last_known(&config.agent.state_dir)
        .with_policy(own, config.agent.dns_refresh);
        LiveDiscovery {
            service,
            upstreams,
            task: tokio::spawn(discovery.run(stop.clone())),
            stop,
        }
    }

    pub(super) async fn stop(self) {
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

pub(super) struct LiveHealth {
    pub(super) board: Arc<HealthBoard>,
    pub(super) stop: CancellationToken,
    pub(super) task: JoinHandle<()>,
}

impl LiveHealth {
    pub(super) fn start(health: Health) -> LiveHealth {
        let stop = CancellationToken::new();
        LiveHealth {
            board: health.board(),
            task: tokio::spawn(health.run(stop.clone())),
            stop,
        }
    }

    pub(super) async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "health task failed");
        }
    }
}

/// One registration task per registry, all fed by the same verdict.
pub(super) struct LiveRegistrations {
    pub(super) states: Vec<SharedState>,
    pub(super) stop: CancellationToken,
    pub(super) tasks: JoinSet<()>,
}

impl LiveRegistrations {
    pub(super) fn start(registrations: Vec<Registration>) -> LiveRegistrations {
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
    pub(super) async fn stop(mut self) {
        self.stop.cancel();
        while let Some(result) = self.tasks.join_next().await {
            if let Err(e) = result {
                tracing::error!(error = %e, "registration task failed");
            }
        }
    }
}

pub(super) fn connect_sources(registries: &[RegistryConfig]) -> Result<Vec<Source>, AgentError> {
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
pub(super) fn registrations(
    config: &Config,
    sources: &[Source],
    health: Option<&Health>,
    maintenance: &watch::Receiver<Maintenance>,
    load: &watch::Receiver<Reported>,
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
                    load.clone(),
                )
            })
            .collect(),
        _ => Vec::new(),
    }
}

pub(super) fn registration(
    source: &Source,
    config: &RegistryConfig,
    service: &ServiceConfig,
    health: &HealthBoard,
    maintenance: watch::Receiver<Maintenance>,
    load: watch::Receiver<Reported>,
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
        // Replaced by the reported load before every write.
        load: None,
    };
    Registration::new(
        source.name.clone(),
        source.registry.clone(),
        instance,
        config.ttl,
        config.timeout,
        health.subscribe(),
        maintenance,
        (load, service.load_ttl),
        service.deregister_critical_after,
    )
}

/// Binds one listening socket; a taken port fails startup (or the reload)
/// here.
pub(super) fn bind(
    addr: SocketAddr,
    backlog: u32,
    what: &str,
    name: &str,
) -> Result<Listener, AgentError> {
    Listener::bind(addr, backlog, name).map_err(|source| AgentError::Bind {
        what: what.to_owned(),
        addr,
        source,
    })
}

/// Binds the socket of an upstream listener: UDP for `protocol = "udp"`,
/// else TCP; a taken port fails startup (or the reload) here.
pub(super) fn bind_upstream(config: &UpstreamConfig, what: &str) -> Result<Bound, AgentError> {
    if matches!(config.protocol, Protocol::Udp(_)) {
        return UdpListener::bind(config.listen)
            .map(Bound::Udp)
            .map_err(|source| AgentError::Bind {
                what: what.to_owned(),
                addr: config.listen,
                source,
            });
    }
    bind(config.listen, config.backlog, what, what).map(Bound::Tcp)
}

/// The upstream of `service` behind the listener `config` describes (its
/// own service, or one of its HTTP routes'), with the listener's filter and
/// balancing; its metrics are labelled with the bound address.
pub(super) fn upstream(service: &str, config: &UpstreamConfig, listen: SocketAddr) -> Upstream {
    let balancer = Balancer::new(
        config.strategy,
        config.ejection.clone(),
        config.panic_threshold,
    )
    .with_slow_start(config.slow_start)
    .with_prefer(config.prefer.clone())
    .with_load_ttl(config.load_ttl)
    .with_metrics(service, listen);
    Upstream::new(service, config.filter.clone(), balancer).with_ranges(config.ranges.clone())
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
        RegistryBackend::Eureka(eureka) => Arc::new(registry::eureka::EurekaRegistry::new(
            eureka,
            config.ttl,
            config.timeout,
        )),
        RegistryBackend::ZooKeeper(zookeeper) => {
            Arc::new(registry::zookeeper::ZooKeeperRegistry::new(
                zookeeper.clone(),
                config.ttl,
                config.timeout,
            ))
        }
        RegistryBackend::Nacos(nacos) => Arc::new(registry::nacos::NacosRegistry::new(
            nacos,
            config.ttl,
            config.timeout,
        )),
    })
}
