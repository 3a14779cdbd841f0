//! Wires the parts together and owns the order of startup and shutdown.
//!
//! Start: bind the admin API and every listener (a taken port fails here),
//! start the health checks and discovery, then register into every registry
//! (as `unknown` until the checks have risen, so peers send nothing before
//! the service is ready). Stop: deregister from every registry at once,
//! wait `drain_delay` so peers see us leave, stop accepting, let open
//! connections finish up to `drain_timeout`, cut the rest, return.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, AgentState, UpstreamView};
use crate::balance::{Balancer, Upstream};
use crate::config::{
    Config, Protocol, RegistryBackend, RegistryConfig, ServiceConfig, UpstreamConfig,
};
use crate::discovery::{Discovery, ServiceState, Source};
use crate::health::Health;
use crate::proxy::listener::DEFAULT_BACKLOG;
use crate::proxy::{Drain, HttpProxy, Listener, Proxy, TcpProxy};
use crate::registration::{Maintenance, Registration};
use crate::registry::{self, Instance, Registry, Status};

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
    state: Arc<AgentState>,
    admin: Admin,
    admin_addr: SocketAddr,
    proxies: Vec<Proxy>,
    discoveries: Vec<Discovery>,
    health: Option<Health>,
    registrations: Vec<Registration>,
}

impl Agent {
    /// Binds the admin API and every listener. Nothing is announced yet.
    pub async fn bind(config: Config) -> Result<Agent, AgentError> {
        let prometheus = crate::metrics::install().map_err(AgentError::Metrics)?;
        let sources = config
            .registries
            .iter()
            .map(|r| {
                Ok(Source {
                    name: r.name.clone(),
                    registry: connect_registry(r)?,
                })
            })
            .collect::<Result<Vec<Source>, AgentError>>()?;

        let admin_listener = bind(config.agent.admin, "the admin API", "admin")?;

        // One Upstream per listener and per HTTP route, each fed by the
        // discovery of its service.
        let mut upstreams_by_service: BTreeMap<String, Vec<Arc<Upstream>>> = BTreeMap::new();
        let mut proxies = Vec::new();
        let mut views = Vec::new();
        for config in &config.upstreams {
            let listener = bind(
                config.listen,
                &format!("upstream {}", config.service),
                &format!("upstream {}", config.service),
            )?;
            let listen = listener.local_addr();
            let mut upstream_of = |service: &str| {
                let upstream = Arc::new(upstream(service, config, listen));
                upstreams_by_service
                    .entry(service.to_owned())
                    .or_default()
                    .push(upstream.clone());
                upstream
            };
            let own = upstream_of(&config.service);
            let proxy = match &config.protocol {
                Protocol::Tcp => {
                    Proxy::tcp(listener, TcpProxy::new(config.clone(), listen, own.clone()))
                }
                Protocol::Http(http) => {
                    let routed = http
                        .routes
                        .iter()
                        .map(|r| upstream_of(&r.service))
                        .collect();
                    let proxy = HttpProxy::new(
                        config.clone(),
                        (**http).clone(),
                        listen,
                        own.clone(),
                        routed,
                    );
                    Proxy::http(listener, proxy)
                }
            };
            views.push(UpstreamView {
                config: config.clone(),
                listen,
                upstream: own,
            });
            proxies.push(proxy);
        }

        let mut services = Vec::new();
        let mut discoveries = Vec::new();
        for (name, upstreams) in upstreams_by_service {
            let service = Arc::new(ServiceState::new(name, config.discovery.mode, &sources));
            services.push(service.clone());
            discoveries.push(
                Discovery::new(sources.clone(), &config.discovery, service, upstreams)
                    .with_last_known(&config.agent.state_dir),
            );
        }

        let (maintenance, maintenance_rx) = watch::channel(None);
        let health = match &config.service {
            Some(service) => Some(Health::new(&service.checks)?),
            None => None,
        };
        // One registration per registry, all fed by the same verdict.
        let registrations: Vec<Registration> = match (&config.service, &health) {
            (Some(service), Some(health)) => sources
                .iter()
                .zip(&config.registries)
                .map(|(source, registry)| {
                    registration(source, registry, service, health, maintenance_rx.clone())
                })
                .collect(),
            _ => Vec::new(),
        };
        let state = Arc::new(AgentState {
            node: config.agent.node.clone(),
            listeners_bound: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            registrations: registrations.iter().map(Registration::state).collect(),
            health: health.as_ref().map(Health::board),
            maintenance,
            services,
            upstreams: views,
            prometheus,
        });
        Ok(Agent {
            admin_addr: admin_listener.local_addr(),
            admin: Admin::new(admin_listener, state.clone()),
            config,
            state,
            proxies,
            discoveries,
            health,
            registrations,
        })
    }

    /// Where the admin API listens (the real port when configured as `:0`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where each upstream listens, in configuration order.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.state.upstreams.iter().map(|u| u.listen).collect()
    }

    /// Runs until `shutdown` resolves, then shuts down in order and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Agent {
            config,
            state,
            admin,
            proxies,
            discoveries,
            health,
            registrations,
            ..
        } = self;

        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(admin.run(admin_stop.clone()));

        let health_stop = CancellationToken::new();
        let health_task = health.map(|h| tokio::spawn(h.run(health_stop.clone())));

        let discovery_stop = CancellationToken::new();
        let mut discovery_tasks = JoinSet::new();
        for discovery in discoveries {
            discovery_tasks.spawn(discovery.run(discovery_stop.clone()));
        }

        let drain = Drain::default();
        let mut accept_tasks = JoinSet::new();
        for proxy in proxies {
            accept_tasks.spawn(proxy.run(drain.clone()));
        }
        // Bound since `bind`; accepting from here on.
        state.listeners_bound.store(true, Ordering::Relaxed);

        let registration_stop = CancellationToken::new();
        let mut registration_tasks = JoinSet::new();
        for registration in registrations {
            registration_tasks.spawn(registration.run(registration_stop.clone()));
        }
        let registries: Vec<&str> = config.registries.iter().map(|r| r.name.as_str()).collect();
        tracing::info!(node = %config.agent.node, ?registries, discovery = config.discovery.mode.name(), "squire running");

        shutdown.await;
        tracing::info!(drain_delay = ?config.agent.drain_delay, drain_timeout = ?config.agent.drain_timeout, "shutting down");
        state.draining.store(true, Ordering::Relaxed);

        // Every registration revokes at once, each bounded by its own
        // registry's timeout: a dead registry does not delay the others.
        registration_stop.cancel();
        while let Some(result) = registration_tasks.join_next().await {
            if let Err(e) = result {
                tracing::error!(error = %e, "registration task failed");
            }
        }
        tokio::time::sleep(config.agent.drain_delay).await;

        drain.stop.cancel();
        while accept_tasks.join_next().await.is_some() {}
        let connections = &drain.connections;
        connections.close();
        let open = connections.len();
        if open > 0 {
            tracing::info!(open, "waiting for open connections to finish");
        }
        if tokio::time::timeout(config.agent.drain_timeout, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = connections.len(),
                "drain timeout reached; closing the remaining connections"
            );
            drain.cut.cancel();
            connections.wait().await;
        }

        discovery_stop.cancel();
        while discovery_tasks.join_next().await.is_some() {}
        health_stop.cancel();
        if let Some(task) = health_task {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "health task failed");
            }
        }
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

fn registration(
    source: &Source,
    config: &RegistryConfig,
    service: &ServiceConfig,
    health: &Health,
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
        health.board().subscribe(),
        maintenance,
        service.deregister_critical_after,
    )
}

/// Binds one listening socket; a taken port fails startup here.
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
