//! The admin HTTP API: health of the agent itself, metrics, and what it knows.
//!
//! - `GET /live`: 200 while the process runs.
//! - `GET /ready`: 200 once every listener is bound and our instance is
//!   registered in at least one registry; 503 with the reason while
//!   starting or draining.
//! - `GET /metrics`: Prometheus text format: the recorder's families, then
//!   the per-endpoint ones rendered from live state ([`crate::metrics::render_live`]).
//! - `GET /v1/services`: every discovered service, its instances and status,
//!   the instances the endpoint policy refuses and what host names resolve to,
//!   and each upstream listener's routable endpoints.
//! - `GET /v1/self`: our registration in each registry (lease, last
//!   keep-alive, last error, the status announced) and every health check's
//!   last result.
//! - `PUT /v1/maintenance?enable=true&reason=...`: announce our instance as
//!   `draining` (peers open no new connections, existing ones continue);
//!   `enable=false` returns to the health checks' verdict.
//!   `GET /v1/maintenance` shows the current setting.
//! - `PUT /v1/load` with `{"players": 37, "capacity": 100}`: the load the
//!   game process reports, published with our registration (see
//!   [`crate::load`]); `DELETE /v1/load` clears it; `GET /v1/load` shows
//!   it. A bad body is a 400 with the reason.
//! - `POST /v1/reload`: read the configuration file again and put it in
//!   service (as SIGHUP does): 200 with what changed, or 400 with the
//!   problems, the running configuration unchanged.
//! - `GET /v1/catalog/{service}` (blocking with `?index=&wait=`),
//!   `GET /v1/catalog/{service}/pick`, `POST /v1/catalog/{service}/{id}/failed`:
//!   the discovery API for game processes (see `catalog`).
//!
//! Mutating requests (`PUT /v1/maintenance`, `PUT`/`DELETE /v1/load`, `POST /v1/reload`,
//! `POST .../failed`) need the admin token (see [`AdminToken`]); the rest
//! is open to whoever reaches the admin address.

mod catalog;
mod client;
mod token;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use arc_swap::ArcSwap;

use crate::balance::{self, Endpoint, HashKey, Upstream};
use crate::config::UpstreamConfig;
use crate::discovery::ServiceState;
use crate::health::HealthBoard;
use crate::proxy::{Drain, Listener};
use crate::registration::{Maintenance, Reported, SharedState};
use crate::registry::{Instance, Status};
use crate::reload::{ReloadOutcome, Reloader};

pub use client::{
    drain, health, set_load, set_maintenance, status, Probe, Status as AgentStatus, PROGRESS_EVERY,
};
pub use token::{client_token, generated_path, AdminToken, Denied, DENIED_LOG_INTERVAL};

/// What the admin API reads: the agent's parts, shared with it.
pub struct AgentState {
    pub node: String,
    /// Set once the listeners accept (they are bound before the admin API
    /// answers, but accept only once the agent runs).
    pub listeners_bound: AtomicBool,
    pub draining: AtomicBool,
    /// Maintenance mode, switched by `PUT /v1/maintenance`.
    pub maintenance: watch::Sender<Maintenance>,
    /// The load the game process reports, set by `PUT /v1/load`.
    pub load: watch::Sender<Reported>,
    /// `service.load_ttl` in milliseconds, for whether `/v1/self` calls
    /// the load fresh (a reload may change it).
    pub load_ttl: std::sync::atomic::AtomicU64,
    pub prometheus: PrometheusHandle,
    /// What runs now; a reload swaps it whole.
    pub catalog: ArcSwap<Catalog>,
    /// `POST /v1/reload` asks the agent through this.
    pub reloader: Reloader,
    /// What the mutating endpoints require; a reload may replace it.
    pub admin_token: ArcSwap<AdminToken>,
    /// One permit per blocking catalog query in flight
    /// ([`MAX_BLOCKING_QUERIES`]).
    pub catalog_waits: tokio::sync::Semaphore,
}

/// The parts of the agent a reload may replace.
pub struct Catalog {
    /// One per registry, in configured order; empty without `[service]`.
    pub registrations: Vec<SharedState>,
    pub health: Option<Arc<HealthBoard>>,
    pub services: Vec<Arc<ServiceState>>,
    pub upstreams: Vec<UpstreamView>,
    /// Every upstream of every listener (its own service's, then each HTTP
    /// route's), in configuration order: what `/v1/catalog/.../pick`
    /// picks from and `.../failed` reports to.
    pub pickable: Vec<Pickable>,
}

/// One upstream as `/v1/catalog/.../pick` uses it: with the hash key of
/// its listener, so a `key` is hashed as that listener would hash it.
pub struct Pickable {
    pub upstream: Arc<Upstream>,
    pub hash_key: HashKey,
}

/// One `[[upstream]]` listener as `/v1/services` shows it.
pub struct UpstreamView {
    pub config: UpstreamConfig,
    pub listen: SocketAddr,
    pub upstream: Arc<Upstream>,
}

pub struct Admin {
    listener: Listener,
    state: Arc<AgentState>,
}

impl Admin {
    pub fn new(listener: Listener, state: Arc<AgentState>) -> Self {
        let rejected = metrics::counter!(crate::metrics::ADMIN_REJECTED);
        let listener = listener.limit(MAX_CONNECTIONS, rejected);
        Admin { listener, state }
    }

    /// Serves until `shutdown`, which also closes open admin connections.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut drain = Drain::default();
        drain.stop = shutdown.clone();
        drain.cut = shutdown;
        let state = self.state;
        // The socket closes when the loop hands it back here.
        let _listener = self
            .listener
            .run(drain, move |stream, client| {
                let state = state.clone();
                async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(route(&state, request, client).await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "admin connection failed");
                    }
                }
            })
            .await;
    }
}

/// Admin connections open at once; more are closed at once and counted
/// (`squire_admin_connections_rejected_total`): a flood of the admin port
/// cannot take the descriptors the proxies need.
pub const MAX_CONNECTIONS: usize = 128;

/// Blocking catalog queries waiting at once; one more is answered 429.
/// Each holds an admin connection while it waits, so this leaves 32 of the
/// [`MAX_CONNECTIONS`] for probes, scrapes and the CLI.
pub const MAX_BLOCKING_QUERIES: usize = 96;

/// A client must send its request headers within this (a slow-header
/// client cannot hold a connection slot for long).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

type Body = Full<Bytes>;

async fn route(
    state: &AgentState,
    request: Request<Incoming>,
    client: SocketAddr,
) -> Response<Body> {
    if request.uri().path() == "/v1/maintenance" {
        if request.method() == Method::PUT {
            if let Err(refused) = authorize(state, &request, client) {
                return refused;
            }
        }
        return maintenance(state, &request);
    }
    if request.uri().path() == "/v1/load" {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            if let Err(refused) = authorize(state, &request, client) {
                return refused;
            }
        }
        return load(state, request).await;
    }
    if let Some(rest) = request.uri().path().strip_prefix("/v1/catalog/") {
        let rest = rest.to_owned();
        return catalog::route(state, request, client, &rest).await;
    }
    if request.uri().path() == "/v1/reload" {
        if request.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n");
        }
        if let Err(refused) = authorize(state, &request, client) {
            return refused;
        }
        return reload(state).await;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match request.uri().path() {
        "/live" => match crate::liveness::failure() {
            None => text(StatusCode::OK, "live\n"),
            Some(panic) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not live: a task panicked: {panic}\n"),
            ),
        },
        "/ready" => match not_ready_reason(state) {
            None => text(StatusCode::OK, "ready\n"),
            Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{reason}\n")),
        },
        "/metrics" => {
            // Ejections end without an event: bring those gauges up to date.
            for view in &state.catalog.load().upstreams {
                let upstream = &view.upstream;
                upstream.balancer().refresh_gauges(&upstream.snapshot());
            }
            // The per-endpoint families are rendered from live state.
            let mut text = state.prometheus.render();
            if !text.is_empty() && !text.ends_with("\n\n") {
                text.push('\n');
            }
            text.push_str(&crate::metrics::render_live(balance::now_ms()));
            text.push_str(&crate::metrics::render_process());
            let mut response = Response::new(Body::from(text));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/v1/services" => json_response(services(state)),
        "/v1/self" => json_response(self_view(state)),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether a mutating request (`PUT /v1/maintenance`, `POST /v1/reload`,
/// `POST /v1/catalog/.../failed`) carries the admin token; if not, the 401 to answer (counted and logged).
#[allow(clippy::result_large_err)] // the refusal is the response itself
fn authorize(
    state: &AgentState,
    request: &Request<Incoming>,
    client: SocketAddr,
) -> Result<(), Response<Body>> {
    let Err(denied) = state.admin_token.load().check(request.headers()) else {
        return Ok(());
    };
    token::record(
        denied,
        request.method().as_str(),
        request.uri().path(),
        client,
    );
    let mut response = text(StatusCode::UNAUTHORIZED, token::DENIED_BODY);
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static(token::CHALLENGE));
    Err(response)
}

/// `POST /v1/reload`: 200 with what changed, 400 with the problems.
async fn reload(state: &AgentState) -> Response<Body> {
    tracing::info!("reload asked through the admin API");
    let outcome = state.reloader.reload().await;
    let mut response = json_response(outcome.to_json());
    if !matches!(outcome, ReloadOutcome::Applied(_)) {
        *response.status_mut() = StatusCode::BAD_REQUEST;
    }
    response
}

fn maintenance(state: &AgentState, request: &Request<Incoming>) -> Response<Body> {
    if request.method() == Method::PUT {
        let mut enable = None;
        let mut reason = String::new();
        for (key, value) in form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "enable" => enable = Some(value.into_owned()),
                "reason" => reason = value.into_owned(),
                _ => {}
            }
        }
        match enable.as_deref() {
            Some("true") => {
                if reason.is_empty() {
                    reason = "maintenance mode".to_owned();
                }
                tracing::info!(%reason, "maintenance on: announcing draining");
                state.maintenance.send_replace(Some(reason));
            }
            Some("false") => {
                tracing::info!("maintenance off");
                state.maintenance.send_replace(None);
            }
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "enable=true or enable=false is required\n",
                )
            }
        }
    } else if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET or PUT\n");
    }
    let current = state.maintenance.borrow().clone();
    json_response(json!({ "enabled": current.is_some(), "reason": current }))
}

/// The largest `PUT /v1/load` body read: far more than the two numbers.
const MAX_LOAD_BODY: usize = 4096;

/// `PUT /v1/load` (`{"players": N, "capacity": M}`), `DELETE /v1/load`,
/// `GET /v1/load`: answers the current load.
async fn load(state: &AgentState, request: Request<Incoming>) -> Response<Body> {
    use http_body_util::BodyExt;
    let method = request.method().clone();
    if method == Method::PUT {
        let body = match http_body_util::Limited::new(request.into_body(), MAX_LOAD_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("could not read the body: {e}\n"),
                )
            }
        };
        match parse_load(&body) {
            Ok(load) => {
                tracing::debug!(
                    players = load.players,
                    capacity = load.capacity,
                    "load reported"
                );
                state.load.send_replace(Some(load));
            }
            Err(reason) => return text(StatusCode::BAD_REQUEST, &format!("{reason}\n")),
        }
    } else if method == Method::DELETE {
        tracing::info!("load cleared");
        state.load.send_replace(None);
    } else if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET, PUT or DELETE\n");
    }
    json_response(load_view(state))
}

/// A `PUT /v1/load` body, stamped now.
fn parse_load(body: &[u8]) -> Result<crate::load::Load, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        players: u32,
        capacity: u32,
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        format!("the body must be {{\"players\": N, \"capacity\": M}} with whole numbers: {e}")
    })?;
    crate::load::Load::new(body.players, body.capacity, std::time::SystemTime::now())
}

/// The reported load as `/v1/load` and `/v1/self` show it: the numbers,
/// when reported, and whether they are still fresh under `service.load_ttl`.
fn load_view(state: &AgentState) -> serde_json::Value {
    let current = *state.load.borrow();
    match current {
        None => serde_json::Value::Null,
        Some(load) => {
            let ttl = state.load_ttl.load(Ordering::Relaxed);
            let fresh = load.is_fresh(
                std::time::SystemTime::now(),
                std::time::Duration::from_millis(ttl),
            );
            json!({
                "players": load.players,
                "capacity": load.capacity,
                "at": humantime::format_rfc3339_millis(load.at).to_string(),
                "full": load.is_full(),
                "fresh": fresh,
            })
        }
    }
}

pub(crate) fn not_ready_reason(state: &AgentState) -> Option<&'static str> {
    if state.draining.load(Ordering::Relaxed) {
        return Some("draining");
    }
    if !state.listeners_bound.load(Ordering::Relaxed) {
        return Some("starting: listeners not bound");
    }
    // Registered in one registry is enough: peers reading it find us.
    let catalog = state.catalog.load();
    let registered = catalog
        .registrations
        .iter()
        .any(|r| r.lock().unwrap_or_else(|p| p.into_inner()).registered);
    if catalog.registrations.is_empty() || registered {
        None
    } else {
        Some("not registered")
    }
}

fn services(state: &AgentState) -> serde_json::Value {
    let catalog = state.catalog.load();
    let mut all = HealthSummary::default();
    let services: Vec<_> = catalog
        .services
        .iter()
        .map(|service| {
            let instances = service.instances();
            let summary = HealthSummary::of(&instances);
            all.add(&summary);
            let registries: Vec<_> = service
                .sources()
                .iter()
                .map(|source| {
                    json!({
                        "name": source.name,
                        "kind": source.kind,
                        "watch_up": source.watch_up(),
                        "serving": source.serving(),
                        "last_error": source.last_error(),
                    })
                })
                .collect();
            json!({
                "name": service.name,
                "watch_up": service.watch_up(),
                "discovery": service.mode.name(),
                "served_from": service.served_from(),
                "registries": registries,
                "updated_at": service.updated_at().map(|t| humantime::format_rfc3339_millis(t).to_string()),
                "stale": service.stale_since().is_some(),
                "stale_since": service.stale_since().map(|t| humantime::format_rfc3339_millis(t).to_string()),
                "listed_at": service.listed_at().map(|t| humantime::format_rfc3339_millis(t).to_string()),
                "summary": summary.to_json(),
                "instances": *instances,
                "refused": service.refused().iter().map(|r| json!({
                    "id": r.id,
                    "address": r.address,
                    "reason": r.reason.as_str(),
                    "listeners": r.listeners,
                })).collect::<Vec<_>>(),
                "host_names": service.names().iter().map(|(name, r)| (name.clone(), json!({
                    "addresses": r.addrs.as_deref().map(|a| a.iter().map(ToString::to_string).collect::<Vec<_>>()),
                    "error": r.error,
                    "resolved_at": r.at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                }))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let upstreams: Vec<_> = catalog
        .upstreams
        .iter()
        .map(|upstream| {
            let snapshot = upstream.upstream.snapshot();
            let balancer = upstream.upstream.balancer();
            let now = balance::now_ms();
            let endpoints: Vec<_> = snapshot.routable().iter().map(|e| endpoint_view(e, now)).collect();
            let standby: Vec<_> = snapshot.standby().iter().map(|e| endpoint_view(e, now)).collect();
            let failing = snapshot
                .endpoints()
                .iter()
                .filter(|e| e.stats.consecutive_failures.load(Ordering::Relaxed) > 0)
                .count();
            json!({
                "service": upstream.config.service,
                "listen": upstream.listen.to_string(),
                "protocol": upstream.config.protocol.name(),
                "strategy": upstream.config.strategy.name(),
                "tags": upstream.config.filter.tags,
                "version": upstream.config.filter.version,
                "metadata": upstream.config.filter.metadata,
                "statuses": upstream.config.filter.statuses,
                "endpoints": endpoints,
                "balancing": {
                    "strategy": balancer.strategy().name(),
                    "hash_key": balancer.strategy().uses_key().then(|| upstream.config.hash_key.name()),
                    "retries": upstream.config.retries,
                    "panic_threshold": balancer.panic_threshold(),
                    "panic_mode": balancer.in_panic(),
                    "ejected_endpoints": balancer.ejected_now(&snapshot),
                    "failing_endpoints": failing,
                    "standby": standby,
                },
            })
        })
        .collect();
    json!({ "summary": all.to_json(), "services": services, "upstreams": upstreams })
}

/// The seed's `get_stats()`: how many instances, how many healthy.
#[derive(Default)]
struct HealthSummary {
    total: usize,
    healthy: usize,
}

impl HealthSummary {
    fn of(instances: &[Instance]) -> Self {
        HealthSummary {
            total: instances.len(),
            healthy: instances
                .iter()
                .filter(|i| i.status == Status::Healthy)
                .count(),
        }
    }

    fn add(&mut self, other: &HealthSummary) {
        self.total += other.total;
        self.healthy += other.healthy;
    }

    fn to_json(&self) -> serde_json::Value {
        let rate = if self.total == 0 {
            1.0
        } else {
            self.healthy as f64 / self.total as f64
        };
        json!({
            "total": self.total,
            "healthy": self.healthy,
            "unhealthy": self.total - self.healthy,
            "health_rate": rate,
        })
    }
}

/// One endpoint with its live load-balancing state.
fn endpoint_view(e: &Endpoint, now: u64) -> serde_json::Value {
    let stats = &e.stats;
    json!({
        "id": e.instance.id,
        "address": e.authority,
        "dials": e.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "status": e.instance.status,
        "weight": e.instance.weight,
        "active_connections": stats.active.load(Ordering::Relaxed),
        "total_connections": stats.total.load(Ordering::Relaxed),
        "picks": stats.picks.load(Ordering::Relaxed),
        "consecutive_failures": stats.consecutive_failures.load(Ordering::Relaxed),
        "failures": stats.failures.load(Ordering::Relaxed),
        "ejections": stats.ejections.load(Ordering::Relaxed),
        "ejected_for_ms": stats.ejected_until(now).map(|until| until - now),
        "latency_estimate_ms": stats.rtt_estimate(now) / 1e6,
        "load": endpoint_load(e, now),
    })
}

/// An endpoint's reported load as this squire's picks see it (`fresh`
/// under the upstream's `load_ttl`, `full` only when fresh), in the shape
/// of `/v1/self`'s `load`; null when the instance has none (never reported,
/// or cleared).
fn endpoint_load(e: &Endpoint, now: u64) -> serde_json::Value {
    match (&e.instance.load, e.load) {
        (Some(load), Some(seen)) => json!({
            "players": seen.players,
            "capacity": seen.capacity,
            "at": humantime::format_rfc3339_millis(load.at).to_string(),
            "full": e.is_full(now),
            "fresh": e.load(now).is_some(),
        }),
        _ => serde_json::Value::Null,
    }
}

fn self_view(state: &AgentState) -> serde_json::Value {
    let catalog = state.catalog.load();
    let registrations: Vec<_> = catalog
        .registrations
        .iter()
        .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect();
    // The status a registry holds: the first where we are registered (the
    // others catch up once they answer), else the first.
    let status = registrations
        .iter()
        .find(|r| r.registered)
        .or(registrations.first())
        .map(|r| r.instance.status);
    let checks = catalog
        .health
        .as_ref()
        .map(|board| board.reports())
        .unwrap_or_default();
    let maintenance = state.maintenance.borrow().clone();
    json!({
        "node": state.node,
        "ready": not_ready_reason(state).is_none(),
        "draining": state.draining.load(Ordering::Relaxed),
        "status": status,
        "maintenance": { "enabled": maintenance.is_some(), "reason": maintenance },
        "load": load_view(state),
        "health": catalog.health.as_ref().map(|board| *board.subscribe().borrow()),
        "checks": checks,
        "registrations": registrations,
    })
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::from(value.to_string()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AgentState {
        AgentState {
            node: "test".into(),
            listeners_bound: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            maintenance: watch::Sender::new(None),
            load: watch::Sender::new(None),
            load_ttl: std::sync::atomic::AtomicU64::new(30_000),
            prometheus: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
            catalog: ArcSwap::from_pointee(Catalog {
                registrations: Vec::new(),
                health: None,
                services: Vec::new(),
                upstreams: Vec::new(),
                pickable: Vec::new(),
            }),
            catalog_waits: tokio::sync::Semaphore::new(MAX_BLOCKING_QUERIES),
            reloader: Reloader(tokio::sync::mpsc::channel(1).0),
            admin_token: ArcSwap::from_pointee(AdminToken::for_tests("0123456789abcdef")),
        }
    }

    #[test]
    fn ready_only_once_the_listeners_accept() {
        let state = state();
        assert_eq!(
            not_ready_reason(&state),
            Some("starting: listeners not bound")
        );
        state.listeners_bound.store(true, Ordering::Relaxed);
        assert_eq!(not_ready_reason(&state), None);
        state.draining.store(true, Ordering::Relaxed);
        assert_eq!(not_ready_reason(&state), Some("draining"));
    }
}
