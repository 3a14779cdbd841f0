//! An in-process fake Consul agent that follows `consul-api.md` (the subset
//! of the Consul HTTP API squire uses, taken from the Consul source and
//! docs), because no Consul binary can be installed here.
//!
//! It serves, on `127.0.0.1:0` (optionally over TLS):
//! `PUT /v1/agent/service/register|deregister/:id|maintenance/:id`,
//! `PUT /v1/agent/check/pass|warn|fail|update/:id`,
//! `GET /v1/health/service/:name` and `GET /v1/catalog/services`, with
//! blocking queries, TTL checks, DeregisterCriticalServiceAfter reaping,
//! deferred output-only updates, ACL tokens, and Go's JSON decoding rules
//! (case-insensitive keys, unknown keys refused).
//!
//! Time is the fake's own clock: real time plus an offset that
//! [`FakeConsul::advance`] moves, so a test can cross a 1 m reap clamp or a
//! 10 m wait cap at once. The reap interval, the clamp and the deferral range
//! are options. Test hooks: [`FakeConsul::rewind_index`],
//! [`FakeConsul::restart_empty`], [`FakeConsul::set_node_status`], and views
//! of services, checks, indexes, blocked queries and the requests received.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const NODE_ID: &str = "4e3b5a2c-1d6f-4a8e-9b7c-0f1e2d3c4b5a";
pub const ANONYMOUS_ACCESSOR: &str = "00000000-0000-0000-0000-000000000002";
const MAINTENANCE_PREFIX: &str = "_service_maintenance:";
const MAINTENANCE_DEFAULT_NOTES: &str =
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.";
const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const OUTPUT_MAX: usize = 4096;

/// What a token may do on a resource: rules are name prefixes, the longest
/// match wins, and the ACL default policy applies when none matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Deny,
    Read,
    Write,
}

#[derive(Debug, Clone)]
pub struct AclToken {
    pub secret: String,
    /// Empty shows up as "provided token" in permission errors.
    pub accessor: String,
    /// `(name prefix, level)`; `""` matches every service.
    pub service: Vec<(String, Level)>,
    pub node: Option<Level>,
}

impl AclToken {
    /// A token with `level` on every service and read on nodes.
    pub fn all_services(secret: &str, accessor: &str, level: Level) -> AclToken {
        AclToken {
            secret: secret.into(),
            accessor: accessor.into(),
            service: vec![(String::new(), level)],
            node: Some(Level::Read),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Acl {
    /// `allow` (true) or `deny`: what applies when no rule matches.
    pub default_allow: bool,
    pub tokens: Vec<AclToken>,
    /// The rules of the anonymous token (an empty token).
    pub anonymous: AclToken,
}

impl Acl {
    /// default deny, the anonymous token can do nothing.
    pub fn deny_by_default(tokens: Vec<AclToken>) -> Acl {
        Acl {
            default_allow: false,
            tokens,
            anonymous: AclToken {
                secret: String::new(),
                accessor: ANONYMOUS_ACCESSOR.into(),
                service: Vec::new(),
                node: None,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeOptions {
    pub node: String,
    pub node_address: String,
    pub datacenter: String,
    /// DeregisterCriticalServiceAfter is raised to at least this (Consul: 1 m).
    pub dcsa_min: Duration,
    /// How often the reaper runs (Consul: 30 s).
    pub reap_interval: Duration,
    /// Range of the delay of an output-only check update (Consul: 2.5-7.5 min).
    pub deferred_output: (Duration, Duration),
    pub acl: Option<Acl>,
    /// Whether `catalog/services` lists the agent's own `consul` service (a
    /// server agent does).
    pub lists_consul: bool,
    /// PEM certificate chain and key to serve HTTPS instead of HTTP.
    pub tls: Option<(String, String)>,
    /// With `tls`: a PEM CA whose client certificates are required.
    pub tls_client_ca: Option<String>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            node: "node1".into(),
            node_address: "127.0.0.1".into(),
            datacenter: "dc1".into(),
            dcsa_min: Duration::from_secs(60),
            reap_interval: Duration::from_secs(30),
            deferred_output: (Duration::from_secs(150), Duration::from_secs(450)),
            acl: None,
            lists_consul: true,
            tls: None,
            tls_client_ca: None,
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The `X-Consul-Token` header, if any.
    pub token: Option<String>,
    pub body: String,
}

/// A check as the agent holds it.
#[derive(Debug, Clone)]
pub struct CheckView {
    pub id: String,
    pub name: String,
    pub status: String,
    /// What the catalog shows (lags an output-only update).
    pub output: String,
    /// The latest output the agent got, deferred or not.
    pub local_output: String,
    pub notes: String,
    pub kind: String,
    pub service_id: String,
    pub ttl: Option<Duration>,
    pub dcsa: Option<Duration>,
    /// Fake time since start at which it became critical by an update.
    pub critical_since: Option<Duration>,
}

/// An answer read by [`FakeConsul::call`].
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn index(&self) -> u64 {
        self.header("X-Consul-Index")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no X-Consul-Index in {self:?}"))
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

pub struct FakeConsul {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change and clock move; blocked queries and the
    /// timer task wait on it.
    epoch: watch::Sender<u64>,
    start: Instant,
}

struct Service {
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    port: i64,
    meta: BTreeMap<String, String>,
    weights: (i64, i64),
    tagged_addresses: Map<String, Value>,
    enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone)]
struct Check {
    id: String,
    name: String,
    status: String,
    output: String,
    notes: String,
    kind: String,
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    ttl: Option<Duration>,
    ttl_deadline: Option<Duration>,
    dcsa: Option<Duration>,
    critical_since: Option<Duration>,
    /// An output-only update not yet synced: (output, due).
    pending: Option<(String, Duration)>,
    create_index: u64,
    modify_index: u64,
}

impl Check {
    fn local_output(&self) -> &str {
        self.pending.as_ref().map_or(&self.output, |(o, _)| o)
    }
}

struct State {
    options: FakeOptions,
    /// Added to the real time since start: the fake's clock.
    offset: Duration,
    index: u64,
    services: BTreeMap<String, Service>,
    checks: BTreeMap<String, Check>,
    node_check: Check,
    service_index: HashMap<String, u64>,
    node_index: u64,
    services_table_index: u64,
    extinction_index: u64,
    next_reap: Duration,
    requests: Vec<Recorded>,
    connections: CancellationToken,
    blocked: BTreeMap<u64, (Duration, Duration)>,
    next_query: u64,
}

impl FakeConsul {
    pub async fn start() -> FakeConsul {
        FakeConsul::with_options(FakeOptions::default()).await
    }

    pub async fn with_options(options: FakeOptions) -> FakeConsul {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Consul");
        let addr = listener.local_addr().expect("fake Consul address");
        let tls = options
            .tls
            .as_ref()
            .map(|(cert, key)| tls_acceptor(cert, key, options.tls_client_ca.as_deref()));
        let node_check = node_check(&options);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_reap: options.reap_interval,
                options,
                offset: Duration::ZERO,
                index: 1,
                services: BTreeMap::new(),
                checks: BTreeMap::new(),
                node_check,
                service_index: HashMap::new(),
                node_index: 1,
                services_table_index: 1,
                extinction_index: 0,
                requests: Vec::new(),
                connections: CancellationToken::new(),
                blocked: BTreeMap::new(),
                next_query: 0,
            }),
            epoch: watch::channel(0).0,
            start: Instant::now(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, tls, shared.clone(), stop.clone()));
        tokio::spawn(timers(shared.clone(), stop.clone()));
        FakeConsul { addr, shared, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`, or `https://` with TLS (the certificate
    /// must name 127.0.0.1).
    pub fn address(&self) -> String {
        let scheme = if self.state().options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Moves the clock forward, firing every timer that falls due on the way
    /// (TTL expiries, deferred outputs, reaper ticks) in order.
    pub fn advance(&self, by: Duration) {
        let mut state = self.state();
        state.offset += by;
        let now = self.shared.now(&state);
        state.catch_up(now);
        drop(state);
        self.shared.wake();
    }

    /// The raft index.
    pub fn index(&self) -> u64 {
        self.state().index
    }

    /// The index a health query of `service` answers with now.
    pub fn service_index(&self, service: &str) -> u64 {
        self.state().health_index(service)
    }

    /// A snapshot restore to an older index: every index is capped at `to`.
    pub fn rewind_index(&self, to: u64) {
        let mut state = self.state();
        let to = to.max(1);
        state.index = to;
        for index in state.service_index.values_mut() {
            *index = (*index).min(to);
        }
        state.node_index = state.node_index.min(to);
        state.services_table_index = state.services_table_index.min(to);
        state.extinction_index = state.extinction_index.min(to);
        drop(state);
        self.shared.wake();
    }

    /// As a fresh agent on a fresh cluster: every open connection is cut, all
    /// services and checks are gone, and the index starts again at 1.
    pub fn restart_empty(&self) {
        let mut state = self.state();
        state.connections.cancel();
        state.connections = CancellationToken::new();
        state.services.clear();
        state.checks.clear();
        state.node_check = node_check(&state.options);
        state.service_index.clear();
        state.index = 1;
        state.node_index = 1;
        state.services_table_index = 1;
        state.extinction_index = 0;
        drop(state);
        self.shared.wake();
    }

    /// Sets the node's `serfHealth` status ("passing", "critical"): a node
    /// failure takes every instance on the node out of `?passing`.
    pub fn set_node_status(&self, status: &str) {
        let mut state = self.state();
        let index = state.bump();
        state.node_check.status = status.into();
        state.node_check.modify_index = index;
        state.node_index = index;
        drop(state);
        self.shared.wake();
    }

    pub fn check(&self, id: &str) -> Option<CheckView> {
        self.state().checks.get(id).map(view)
    }

    /// The checks of one service, by id.
    pub fn checks_of(&self, service_id: &str) -> Vec<CheckView> {
        self.state()
            .checks
            .values()
            .filter(|c| c.service_id == service_id)
            .map(view)
            .collect()
    }

    /// The service as a health query shows it (`Service` object).
    pub fn service(&self, id: &str) -> Option<Value> {
        self.state().services.get(id).map(service_json)
    }

    pub fn service_ids(&self) -> Vec<String> {
        self.state().services.keys().cloned().collect()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Blocked queries now: (start, deadline) on the fake clock.
    pub fn blocked(&self) -> Vec<(Duration, Duration)> {
        self.state().blocked.values().copied().collect()
    }

    /// One HTTP/1.1 request to the fake (plain HTTP only).
    pub async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        self.call_with(method, path, &[], body).await
    }

    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect to the fake Consul");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("Host", self.addr.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.stop.cancel();
        self.state().connections.cancel();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self, state: &State) -> Duration {
        self.start.elapsed() + state.offset
    }

    fn wake(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }
}

fn view(check: &Check) -> CheckView {
    CheckView {
        id: check.id.clone(),
        name: check.name.clone(),
        status: check.status.clone(),
        output: check.output.clone(),
        local_output: check.local_output().to_owned(),
        notes: check.notes.clone(),
        kind: check.kind.clone(),
        service_id: check.service_id.clone(),
        ttl: check.ttl,
        dcsa: check.dcsa,
        critical_since: check.critical_since,
    }
}

fn node_check(_options: &FakeOptions) -> Check {
    Check {
        id: "serfHealth".into(),
        name: "Serf Health Status".into(),
        status: "passing".into(),
        output: "Agent alive and reachable".into(),
        notes: String::new(),
        kind: String::new(),
        service_id: String::new(),
        service_name: String::new(),
        service_tags: Vec::new(),
        ttl: None,
        ttl_deadline: None,
        dcsa: None,
        critical_since: None,
        pending: None,
        create_index: 1,
        modify_index: 1,
    }
}

impl State {
    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// Marks a change to the instances or checks of `service`.
    fn touch_service(&mut self, service: &str) -> u64 {
        let index = self.bump();
        self.service_index.insert(service.to_owned(), index);
        index
    }

    fn health_index(&self, service: &str) -> u64 {
        let present = self.services.values().any(|s| s.name == service);
        let index = if present {
            self.service_index
                .get(service)
                .copied()
                .unwrap_or(0)
                .max(self.node_index)
        } else if self.extinction_index > 0 {
            self.extinction_index
        } else {
            self.index
        };
        index.max(1)
    }

    /// Applies every timer due by `now`, oldest first, each at its own time.
    fn catch_up(&mut self, now: Duration) {
        for _ in 0..1_000_000 {
            let ttl = self
                .checks
                .values()
                .filter_map(|c| c.ttl_deadline.map(|d| (d, c.id.clone())))
                .min();
            let deferred = self
                .checks
                .values()
                .filter_map(|c| c.pending.as_ref().map(|(_, d)| (*d, c.id.clone())))
                .min();
            let reap = self.next_reap;
            let mut next = reap;
            if let Some((at, _)) = &ttl {
                next = next.min(*at);
            }
            if let Some((at, _)) = &deferred {
                next = next.min(*at);
            }
            if next > now {
                return;
            }
            if ttl.as_ref().is_some_and(|(at, _)| *at == next) {
                let (at, id) = ttl.expect("checked above");
                self.expire(&id, at);
            } else if deferred.as_ref().is_some_and(|(at, _)| *at == next) {
                let (_, id) = deferred.expect("checked above");
                self.sync_deferred(&id);
            } else {
                self.next_reap += self.options.reap_interval;
                self.reap(reap);
            }
        }
        panic!("fake Consul timers do not converge");
    }

    fn expire(&mut self, id: &str, at: Duration) {
        let Some(check) = self.checks.get_mut(id) else {
            return;
        };
        check.ttl_deadline = None;
        let last = check.local_output().to_owned();
        let output = if last.is_empty() {
            "TTL expired".to_owned()
        } else {
            format!("TTL expired (last output before timeout follows): {last}")
        };
        self.update_check(id, "critical", output, at);
    }

    fn sync_deferred(&mut self, id: &str) {
        let Some(check) = self.checks.get_mut(id) else {
            return;
        };
        let Some((output, _)) = check.pending.take() else {
            return;
        };
        check.output = output;
        let service = check.service_name.clone();
        let index = self.touch_service(&service);
        if let Some(check) = self.checks.get_mut(id) {
            check.modify_index = index;
        }
    }

    /// Consul's UpdateCheck: critical-since first, then one of nothing /
    /// deferred output / immediate status change.
    fn update_check(&mut self, id: &str, status: &str, output: String, at: Duration) {
        let (low, high) = self.options.deferred_output;
        let Some(check) = self.checks.get_mut(id) else {
            return;
        };
        if status == "critical" {
            if check.critical_since.is_none() {
                check.critical_since = Some(at);
            }
        } else {
            check.critical_since = None;
        }
        if check.status == status && check.local_output() == output {
            return;
        }
        if check.status == status {
            let due = match &check.pending {
                Some((_, due)) => *due,
                None => at + random_between(low, high),
            };
            check.pending = Some((output, due));
            return;
        }
        check.status = status.to_owned();
        check.output = output;
        check.pending = None;
        let service = check.service_name.clone();
        let index = self.touch_service(&service);
        if let Some(check) = self.checks.get_mut(id) {
            check.modify_index = index;
        }
    }

    fn reap(&mut self, at: Duration) {
        let min = self.options.dcsa_min;
        let doomed: BTreeSet<String> = self
            .checks
            .values()
            .filter(|c| {
                let (Some(dcsa), Some(since)) = (c.dcsa, c.critical_since) else {
                    return false;
                };
                c.status == "critical" && at.saturating_sub(since) > dcsa.max(min)
            })
            .map(|c| c.service_id.clone())
            .collect();
        for id in doomed {
            self.remove_service(&id);
        }
    }

    fn remove_service(&mut self, id: &str) {
        let Some(service) = self.services.remove(id) else {
            return;
        };
        self.checks.retain(|_, c| c.service_id != id);
        let index = self.touch_service(&service.name);
        self.services_table_index = index;
        if !self.services.values().any(|s| s.name == service.name) {
            self.extinction_index = index;
        }
    }
}

fn random_between(low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    rand::rng().random_range(low..=high)
}

async fn timers(shared: Arc<Shared>, stop: CancellationToken) {
    let mut epoch = shared.epoch.subscribe();
    loop {
        let sleep = {
            let mut state = shared.lock();
            let now = shared.now(&state);
            let before = state.index;
            state.catch_up(now);
            let changed = state.index != before;
            let next = state
                .checks
                .values()
                .filter_map(|c| c.ttl_deadline)
                .chain(
                    state
                        .checks
                        .values()
                        .filter_map(|c| c.pending.as_ref().map(|p| p.1)),
                )
                .chain([state.next_reap])
                .min()
                .unwrap_or(state.next_reap);
            drop(state);
            if changed {
                shared.wake();
            }
            next.saturating_sub(now)
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = epoch.changed() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let cut = shared.lock().connections.clone();
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = connection => {}
                    }
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return; // a client that refused our certificate
                    };
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = connection => {}
                    }
                }
            }
        });
    }
}

fn tls_acceptor(cert: &str, key: &str, client_ca: Option<&str>) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(cert.expect("CA PEM")).expect("CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .expect("server certificate");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

type Body = Full<Bytes>;

/// An error answer: status and text, as Consul's `fmt.Fprint`, and the
/// `Allow` header of a 405 (or of the 200 that answers OPTIONS).
struct Fail {
    status: StatusCode,
    text: String,
    allow: Option<String>,
}

fn fail(status: u16, text: impl Into<String>) -> Fail {
    Fail {
        status: StatusCode::from_u16(status).expect("a valid status"),
        text: text.into(),
        allow: None,
    }
}

type Answer = Result<Response<Body>, Fail>;

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let headers = request.headers().clone();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::new(),
    };
    shared.lock().requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        token: headers
            .get("X-Consul-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let call = Call {
        shared,
        method,
        query: parse_query(&query),
        headers,
        body,
    };
    let answer = route(&call, &path).await;
    let mut response = match answer {
        Ok(response) => response,
        Err(Fail {
            status,
            text,
            allow,
        }) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(
                "Content-Type",
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            if let Some(allow) = allow {
                headers.insert("Allow", HeaderValue::from_str(&allow).expect("ASCII"));
            }
            response
        }
    };
    let state = shared.lock();
    if let Some(acl) = &state.options.acl {
        let policy = if acl.default_allow { "allow" } else { "deny" };
        response.headers_mut().insert(
            "X-Consul-Default-ACL-Policy",
            HeaderValue::from_static(policy),
        );
    }
    response
}

struct Call<'a> {
    shared: &'a Shared,
    method: Method,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
}

impl Call<'_> {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn params(&self, key: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `?token=`, then `X-Consul-Token`, then `Authorization: Bearer`.
    fn token(&self) -> String {
        if let Some(token) = self.param("token") {
            return token.to_owned();
        }
        if let Some(token) = self
            .headers
            .get("X-Consul-Token")
            .and_then(|v| v.to_str().ok())
        {
            return token.to_owned();
        }
        if let Some(auth) = self
            .headers
            .get("Authorization")
            .and_then(|v| v.to_str().ok())
        {
            let mut words = auth.split_whitespace();
            if words
                .next()
                .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
            {
                return words.next().unwrap_or("").to_owned();
            }
        }
        String::new()
    }
}

/// Who is asking: `None` when ACLs are off (everything allowed).
struct Authz {
    token: Option<AclToken>,
    default_allow: bool,
    anonymous: bool,
}

impl Authz {
    fn service(&self, name: &str) -> Level {
        let Some(token) = &self.token else {
            return Level::Write;
        };
        token
            .service
            .iter()
            .filter(|(prefix, _)| name.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, level)| *level)
            .unwrap_or(if self.default_allow {
                Level::Write
            } else {
                Level::Deny
            })
    }

    fn node(&self) -> Level {
        match &self.token {
            None => Level::Write,
            Some(token) => token.node.unwrap_or(if self.default_allow {
                Level::Write
            } else {
                Level::Deny
            }),
        }
    }

    fn require_service_write(&self, name: &str) -> Result<(), Fail> {
        if self.service(name) >= Level::Write {
            return Ok(());
        }
        let accessor = match &self.token {
            Some(t) if !t.accessor.is_empty() => t.accessor.clone(),
            _ => "provided token".to_owned(),
        };
        Err(fail(
            403,
            format!(
                "Permission denied: token with AccessorID '{accessor}' lacks permission 'service:write' on \"{name}\""
            ),
        ))
    }
}

fn authorize(call: &Call) -> Result<Authz, Fail> {
    let state = call.shared.lock();
    let Some(acl) = &state.options.acl else {
        return Ok(Authz {
            token: None,
            default_allow: true,
            anonymous: true,
        });
    };
    let secret = call.token();
    if secret.is_empty() {
        return Ok(Authz {
            token: Some(acl.anonymous.clone()),
            default_allow: acl.default_allow,
            anonymous: true,
        });
    }
    match acl.tokens.iter().find(|t| t.secret == secret) {
        Some(token) => Ok(Authz {
            token: Some(token.clone()),
            default_allow: acl.default_allow,
            anonymous: false,
        }),
        None => Err(fail(403, "ACL not found")),
    }
}

async fn route(call: &Call<'_>, path: &str) -> Answer {
    type Handler = for<'a, 'b> fn(&'a Call<'b>, &'a str) -> Answer;
    let writes: [(&str, Handler); 7] = [
        ("/v1/agent/service/register", register),
        ("/v1/agent/service/deregister/", deregister),
        ("/v1/agent/service/maintenance/", maintenance),
        ("/v1/agent/check/pass/", |c, id| {
            check_verb(c, id, "passing")
        }),
        ("/v1/agent/check/warn/", |c, id| {
            check_verb(c, id, "warning")
        }),
        ("/v1/agent/check/fail/", |c, id| {
            check_verb(c, id, "critical")
        }),
        ("/v1/agent/check/update/", check_update),
    ];
    for (prefix, handler) in writes {
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        if prefix == "/v1/agent/service/register" && !rest.is_empty() {
            continue;
        }
        allowed(call, "PUT")?;
        return handler(call, &percent_decode(rest));
    }
    if let Some(name) = path.strip_prefix("/v1/health/service/") {
        allowed(call, "GET")?;
        return health(call, &percent_decode(name)).await;
    }
    if path == "/v1/catalog/services" {
        allowed(call, "GET")?;
        return catalog_services(call).await;
    }
    Err(fail(404, "404 page not found"))
}

/// 405 for a wrong method, 200 with `Allow` for OPTIONS.
fn allowed(call: &Call, method: &str) -> Result<(), Fail> {
    let allow = Some(format!("OPTIONS,{method}"));
    if call.method == Method::OPTIONS {
        // Reported through Fail only to leave early; the status is 200.
        return Err(Fail {
            status: StatusCode::OK,
            text: String::new(),
            allow,
        });
    }
    if call.method.as_str() != method {
        return Err(Fail {
            status: StatusCode::METHOD_NOT_ALLOWED,
            text: format!("method {} not allowed", call.method),
            allow,
        });
    }
    Ok(())
}

fn ok_empty() -> Answer {
    Ok(Response::new(Full::new(Bytes::new())))
}

// ---------------------------------------------------------------- writes

fn register(call: &Call, _: &str) -> Answer {
    let body = decode_body(&call.body)?;
    let def = decode_service(&body).map_err(decode_failed)?;
    let name = def.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(fail(400, "Missing service name"));
    }
    if matches!(def.address.as_str(), "0.0.0.0" | "::" | "[::]") {
        return Err(fail(400, "Invalid service address"));
    }
    validate_meta(&def.meta)?;
    if let Some((passing, warning)) = def.weights {
        if passing <= 0 {
            return Err(fail(400, "Invalid Weights: Passing must be greater than 0"));
        }
        if warning < 0 {
            return Err(fail(
                400,
                "Invalid Weights: Warning must be greater or equal than 0",
            ));
        }
        if passing > 65535 || warning > 65535 {
            return Err(fail(
                400,
                "Invalid Weights: DNS Weight must be between 0 and 65535",
            ));
        }
    }
    let checks: Vec<&CheckDef> = def
        .check
        .iter()
        .chain(def.checks.iter())
        .filter(|c| !c.empty)
        .collect();
    for check in &checks {
        check.validate()?;
    }
    let authz = authorize(call)?;
    authz.require_service_write(&name)?;

    let replace = call
        .param("replace-existing-checks")
        .is_some_and(|v| v.is_empty() || parse_bool(v) == Some(true));
    let id = def
        .id
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or(name.clone());
    let mut tagged = def.tagged_addresses.clone();
    if let Ok(ip) = def.address.parse::<std::net::IpAddr>() {
        let (lan, wan) = if ip.is_ipv4() {
            ("lan_ipv4", "wan_ipv4")
        } else {
            ("lan_ipv6", "wan_ipv6")
        };
        for key in [lan, wan] {
            tagged
                .entry(key.to_owned())
                .or_insert_with(|| json!({"Address": def.address, "Port": def.port}));
        }
    }

    let mut state = call.shared.lock();
    let now = call.shared.now(&state);
    state.catch_up(now);
    let index = state.bump();
    let old_name = state.services.get(&id).map(|s| s.name.clone());
    let create_index = state.services.get(&id).map_or(index, |s| s.create_index);
    state.services.insert(
        id.clone(),
        Service {
            id: id.clone(),
            name: name.clone(),
            tags: def.tags.clone(),
            address: def.address.clone(),
            port: def.port,
            meta: def.meta.clone(),
            weights: def.weights.unwrap_or((1, 1)),
            tagged_addresses: tagged,
            enable_tag_override: def.enable_tag_override,
            create_index,
            modify_index: index,
        },
    );
    let mut kept = BTreeSet::new();
    let many = checks.len() > 1;
    for (n, check) in checks.iter().enumerate() {
        let check_id = check.check_id.clone().unwrap_or_else(|| {
            if many {
                format!("service:{id}:{}", n + 1)
            } else {
                format!("service:{id}")
            }
        });
        kept.insert(check_id.clone());
        let previous = state.checks.get(&check_id).cloned();
        let mut new = Check {
            id: check_id.clone(),
            name: check
                .name
                .clone()
                .unwrap_or_else(|| format!("Service '{name}' check")),
            status: check.status.clone().unwrap_or_else(|| "critical".into()),
            output: String::new(),
            notes: check.notes.clone(),
            kind: check.kind(),
            service_id: id.clone(),
            service_name: name.clone(),
            service_tags: def.tags.clone(),
            ttl: check.ttl,
            ttl_deadline: check.ttl.map(|ttl| now + ttl),
            dcsa: check.dcsa,
            critical_since: None,
            pending: None,
            create_index: index,
            modify_index: index,
        };
        if let Some(previous) = previous {
            new.status = previous.status;
            new.output = previous.output;
            new.pending = previous.pending;
            new.critical_since = previous.critical_since;
            new.create_index = previous.create_index;
        }
        state.checks.insert(check_id, new);
    }
    for check in state.checks.values_mut() {
        if check.service_id == id {
            check.service_name = name.clone();
            check.service_tags = def.tags.clone();
        }
    }
    if replace {
        state
            .checks
            .retain(|cid, c| c.service_id != id || kept.contains(cid));
    }
    state.service_index.insert(name.clone(), index);
    if let Some(old) = old_name.filter(|old| *old != name) {
        state.service_index.insert(old, index);
    }
    state.services_table_index = index;
    drop(state);
    call.shared.wake();
    ok_empty()
}

fn unknown_service(id: &str) -> Fail {
    fail(
        404,
        format!("Unknown service ID \"{id}\". Ensure that the service ID is passed, not the service name."),
    )
}

fn deregister(call: &Call, id: &str) -> Answer {
    let authz = authorize(call)?;
    let name = {
        let state = call.shared.lock();
        match state.services.get(id) {
            Some(service) => service.name.clone(),
            None => return Err(unknown_service(id)),
        }
    };
    authz.require_service_write(&name)?;
    let mut state = call.shared.lock();
    let now = call.shared.now(&state);
    state.catch_up(now);
    state.remove_service(id);
    drop(state);
    call.shared.wake();
    ok_empty()
}

fn maintenance(call: &Call, id: &str) -> Answer {
    if id.is_empty() {
        return Err(fail(400, "Missing service ID"));
    }
    let enable = match call.param("enable") {
        None => return Err(fail(400, "Missing value for enable")),
        Some(raw) => parse_bool(raw)
            .ok_or_else(|| fail(400, format!("Invalid value for enable: \"{raw}\"")))?,
    };
    let authz = authorize(call)?;
    let (name, tags) = {
        let state = call.shared.lock();
        match state.services.get(id) {
            Some(s) => (s.name.clone(), s.tags.clone()),
            None => return Err(unknown_service(id)),
        }
    };
    authz.require_service_write(&name)?;
    let check_id = format!("{MAINTENANCE_PREFIX}{id}");
    let mut state = call.shared.lock();
    let exists = state.checks.contains_key(&check_id);
    if enable && !exists {
        let reason = call.param("reason").unwrap_or("");
        let notes = if reason.is_empty() {
            MAINTENANCE_DEFAULT_NOTES.to_owned()
        } else {
            reason.to_owned()
        };
        let index = state.touch_service(&name);
        state.checks.insert(
            check_id.clone(),
            Check {
                id: check_id,
                name: "Service Maintenance Mode".into(),
                status: "critical".into(),
                output: String::new(),
                notes,
                kind: String::new(),
                service_id: id.to_owned(),
                service_name: name,
                service_tags: tags,
                ttl: None,
                ttl_deadline: None,
                dcsa: None,
                critical_since: None,
                pending: None,
                create_index: index,
                modify_index: index,
            },
        );
    } else if !enable && exists {
        state.checks.remove(&check_id);
        state.touch_service(&name);
    }
    drop(state);
    call.shared.wake();
    ok_empty()
}

fn unknown_check(id: &str) -> Fail {
    fail(
        404,
        format!(
            "Unknown check ID \"{id}\". Ensure that the check ID is passed, not the check name."
        ),
    )
}

fn check_verb(call: &Call, id: &str, status: &str) -> Answer {
    let note = call.param("note").unwrap_or("").to_owned();
    set_ttl_check(call, id, status, note)
}

fn check_update(call: &Call, id: &str) -> Answer {
    let body = decode_body(&call.body)?;
    let fields = object(&body, "checkUpdate", &["Status", "Output"], &[]).map_err(decode_failed)?;
    let status = string_field(&fields, "checkUpdate", "Status").map_err(decode_failed)?;
    let output = string_field(&fields, "checkUpdate", "Output").map_err(decode_failed)?;
    if !matches!(status.as_str(), "passing" | "warning" | "critical") {
        return Err(fail(400, format!("Invalid check status: '{status}'")));
    }
    set_ttl_check(call, id, &status, output)
}

fn set_ttl_check(call: &Call, id: &str, status: &str, output: String) -> Answer {
    let (service, is_ttl) = {
        let state = call.shared.lock();
        match state.checks.get(id) {
            None => return Err(unknown_check(id)),
            Some(c) => (c.service_name.clone(), c.ttl.is_some()),
        }
    };
    let authz = authorize(call)?;
    authz.require_service_write(&service)?;
    if !is_ttl {
        return Err(fail(
            500,
            format!("CheckID \"{id}\" does not have associated TTL"),
        ));
    }
    let output = truncate_output(output);
    let mut state = call.shared.lock();
    let now = call.shared.now(&state);
    state.catch_up(now);
    if let Some(check) = state.checks.get_mut(id) {
        check.ttl_deadline = check.ttl.map(|ttl| now + ttl);
    }
    state.update_check(id, status, output, now);
    drop(state);
    call.shared.wake();
    ok_empty()
}

fn truncate_output(output: String) -> String {
    if output.len() <= OUTPUT_MAX {
        return output;
    }
    let head = String::from_utf8_lossy(&output.as_bytes()[..OUTPUT_MAX]).into_owned();
    format!(
        "{head} ... (captured {OUTPUT_MAX} of {} bytes)",
        output.len()
    )
}

fn validate_meta(meta: &BTreeMap<String, String>) -> Result<(), Fail> {
    if meta.len() > 64 {
        return Err(fail(
            400,
            "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs",
        ));
    }
    for (key, value) in meta {
        let reason = if key.is_empty() {
            Some("Key cannot be blank")
        } else if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            Some("Key contains invalid characters")
        } else if key.len() > 128 {
            Some("Key is too long (limit: 128 characters)")
        } else if key.starts_with("consul-") {
            Some("Key prefix 'consul-' is reserved for internal use")
        } else if value.len() > 512 {
            Some("Value is too long (limit: 512 characters)")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(fail(
                400,
                format!("Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): {reason}"),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- reads

fn blocking_params(call: &Call) -> Result<Option<(u64, Duration)>, Fail> {
    let index = match call.param("index") {
        None => 0,
        Some(raw) => raw.parse::<u64>().map_err(|_| fail(400, "Invalid index"))?,
    };
    let wait = match call.param("wait") {
        None => DEFAULT_WAIT,
        Some(raw) => parse_go_duration(raw).map_err(|_| fail(400, "Invalid wait time"))?,
    };
    if call.param("stale").is_some() && call.param("consistent").is_some() {
        return Err(fail(
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ));
    }
    if let Some(dc) = call.param("dc") {
        let state = call.shared.lock();
        if !dc.is_empty() && dc != state.options.datacenter {
            return Err(fail(500, "No path to datacenter"));
        }
    }
    if index == 0 {
        return Ok(None);
    }
    let wait = if wait.is_zero() { DEFAULT_WAIT } else { wait }.min(MAX_WAIT);
    let jitter = random_between(Duration::ZERO, wait / 16);
    Ok(Some((index, wait + jitter)))
}

/// Blocks while `current()` is not above the asked index, up to the
/// deadline; returns the state lock, caught up, to answer from.
async fn block<'a>(
    shared: &'a Shared,
    params: Option<(u64, Duration)>,
    current: impl Fn(&State) -> u64,
) -> MutexGuard<'a, State> {
    let mut epoch = shared.epoch.subscribe();
    let Some((index, wait)) = params else {
        let mut state = shared.lock();
        let now = shared.now(&state);
        state.catch_up(now);
        return state;
    };
    let (id, deadline) = {
        let mut state = shared.lock();
        let now = shared.now(&state);
        let id = state.next_query;
        state.next_query += 1;
        state.blocked.insert(id, (now, now + wait));
        (id, now + wait)
    };
    let mut record = Unblock {
        shared,
        id,
        done: false,
    };
    loop {
        let remaining = {
            let mut state = shared.lock();
            let now = shared.now(&state);
            state.catch_up(now);
            if current(&state) > index || now >= deadline {
                state.blocked.remove(&id);
                record.done = true;
                return state;
            }
            deadline - now
        };
        tokio::select! {
            _ = epoch.changed() => {}
            _ = tokio::time::sleep(remaining) => {}
        }
    }
}

/// Removes the blocked-query record of a query dropped mid-wait (its
/// connection closed); `block` removes it itself, under its lock, otherwise.
struct Unblock<'a> {
    shared: &'a Shared,
    id: u64,
    done: bool,
}

impl Drop for Unblock<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.lock().blocked.remove(&self.id);
        }
    }
}

fn json_response(index: u64, body: &Value, call: &Call) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    let headers = response.headers_mut();
    headers.insert("Content-Type", HeaderValue::from_static("application/json"));
    headers.insert(
        "X-Consul-Index",
        HeaderValue::from_str(&index.max(1).to_string()).expect("digits"),
    );
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    if call.param("consistent").is_some() {
        headers.insert(
            "X-Consul-Effective-Consistency",
            HeaderValue::from_static("consistent"),
        );
    } else if call.param("stale").is_some() {
        headers.insert(
            "X-Consul-Effective-Consistency",
            HeaderValue::from_static("stale"),
        );
    }
    response
}

async fn health(call: &Call<'_>, name: &str) -> Answer {
    let passing = match call.param("passing") {
        None => false,
        Some("") => true,
        Some(raw) => parse_bool(raw).ok_or_else(|| fail(400, "Invalid value for ?passing"))?,
    };
    let params = blocking_params(call)?;
    let authz = authorize(call)?;
    let tags: Vec<String> = call.params("tag").into_iter().map(str::to_owned).collect();
    let state = block(call.shared, params, |s| s.health_index(name)).await;
    let index = state.health_index(name);
    let mut filtered = false;
    let mut entries = Vec::new();
    for service in state.services.values().filter(|s| s.name == name) {
        if !tags.iter().all(|t| service.tags.contains(t)) {
            continue;
        }
        let mut checks: Vec<&Check> = vec![&state.node_check];
        checks.extend(state.checks.values().filter(|c| c.service_id == service.id));
        if passing && checks.iter().any(|c| c.status != "passing") {
            continue;
        }
        if authz.service(name) < Level::Read || authz.node() < Level::Read {
            filtered = true;
            continue;
        }
        entries.push(json!({
            "Node": node_json(&state.options),
            "Service": service_json(service),
            "Checks": checks.iter().map(|c| check_json(&state.options, c)).collect::<Vec<_>>(),
        }));
    }
    let mut response = json_response(index, &Value::Array(entries), call);
    if filtered && !authz.anonymous {
        response.headers_mut().insert(
            "X-Consul-Results-Filtered-By-ACLs",
            HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

async fn catalog_services(call: &Call<'_>) -> Answer {
    let params = blocking_params(call)?;
    let authz = authorize(call)?;
    let state = block(call.shared, params, |s| s.services_table_index).await;
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if state.options.lists_consul {
        names.insert("consul".into(), BTreeSet::new());
    }
    for service in state.services.values() {
        names
            .entry(service.name.clone())
            .or_default()
            .extend(service.tags.iter().cloned());
    }
    let body: Map<String, Value> = names
        .into_iter()
        .filter(|(name, _)| authz.service(name) >= Level::Read)
        .map(|(name, tags)| (name, json!(tags.into_iter().collect::<Vec<_>>())))
        .collect();
    Ok(json_response(
        state.services_table_index,
        &Value::Object(body),
        call,
    ))
}

fn node_json(options: &FakeOptions) -> Value {
    let a = &options.node_address;
    json!({
        "ID": NODE_ID, "Node": options.node, "Address": a, "Datacenter": options.datacenter,
        "TaggedAddresses": {"lan": a, "lan_ipv4": a, "wan": a, "wan_ipv4": a},
        "Meta": {"consul-network-segment": ""}, "CreateIndex": 1, "ModifyIndex": 1,
    })
}

fn service_json(s: &Service) -> Value {
    json!({
        "ID": s.id, "Service": s.name, "Tags": s.tags, "Address": s.address,
        "TaggedAddresses": s.tagged_addresses, "Meta": s.meta, "Port": s.port,
        "Weights": {"Passing": s.weights.0, "Warning": s.weights.1},
        "EnableTagOverride": s.enable_tag_override,
        "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}, "Connect": {},
        "CreateIndex": s.create_index, "ModifyIndex": s.modify_index,
    })
}

fn check_json(options: &FakeOptions, c: &Check) -> Value {
    json!({
        "Node": options.node, "CheckID": c.id, "Name": c.name, "Status": c.status,
        "Notes": c.notes, "Output": c.output, "ServiceID": c.service_id,
        "ServiceName": c.service_name, "ServiceTags": c.service_tags, "Type": c.kind,
        "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {},
        "CreateIndex": c.create_index, "ModifyIndex": c.modify_index,
    })
}

// ---------------------------------------------------------------- decoding

fn decode_failed(reason: String) -> Fail {
    fail(400, format!("Request decode failed: {reason}"))
}

fn decode_body(body: &[u8]) -> Result<Value, Fail> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(decode_failed("EOF".into()));
    }
    serde_json::from_slice(body).map_err(|e| decode_failed(e.to_string()))
}

struct ServiceDef {
    id: Option<String>,
    name: Option<String>,
    tags: Vec<String>,
    address: String,
    port: i64,
    meta: BTreeMap<String, String>,
    weights: Option<(i64, i64)>,
    tagged_addresses: Map<String, Value>,
    enable_tag_override: bool,
    check: Option<CheckDef>,
    checks: Vec<CheckDef>,
}

struct CheckDef {
    empty: bool,
    check_id: Option<String>,
    name: Option<String>,
    notes: String,
    status: Option<String>,
    ttl: Option<Duration>,
    interval: Option<Duration>,
    dcsa: Option<Duration>,
    /// HTTP, TCP, GRPC, ScriptArgs, H2PING, UDP or OSService is set.
    interval_kind: Option<&'static str>,
    alias: bool,
}

impl CheckDef {
    fn validate(&self) -> Result<(), Fail> {
        let invalid = |m: &str| fail(400, format!("Invalid check: {m}"));
        let ttl = self.ttl.is_some_and(|d| !d.is_zero());
        let interval = self.interval.is_some_and(|d| !d.is_zero());
        if ttl && interval {
            return Err(invalid("Interval and TTL cannot both be specified"));
        }
        if self.interval_kind.is_some() && !interval {
            return Err(invalid(
                "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
            ));
        }
        if self.interval_kind.is_none() && !self.alias && !ttl {
            return Err(invalid("TTL must be > 0 for TTL checks"));
        }
        if let Some(status) = &self.status {
            if !matches!(status.as_str(), "passing" | "warning" | "critical") {
                return Err(fail(
                    400,
                    "Status for checks must 'passing', 'warning', 'critical'",
                ));
            }
        }
        Ok(())
    }

    fn kind(&self) -> String {
        match (self.ttl, self.interval_kind, self.alias) {
            (Some(_), _, _) => "ttl".into(),
            (None, Some(kind), _) => kind.to_lowercase(),
            (None, None, true) => "alias".into(),
            _ => String::new(),
        }
    }
}

const SERVICE_KEYS: &[&str] = &[
    "Kind",
    "ID",
    "Name",
    "Tags",
    "Address",
    "TaggedAddresses",
    "Meta",
    "Port",
    "SocketPath",
    "Weights",
    "Check",
    "Checks",
    "Token",
    "EnableTagOverride",
    "Proxy",
    "Connect",
    "Locality",
    "Namespace",
    "Partition",
];
const SERVICE_ALIASES: &[(&str, &str)] = &[
    ("enable_tag_override", "EnableTagOverride"),
    ("tagged_addresses", "TaggedAddresses"),
];
const CHECK_KEYS: &[&str] = &[
    "CheckID",
    "Name",
    "Status",
    "Notes",
    "ScriptArgs",
    "Args",
    "HTTP",
    "Header",
    "Method",
    "Body",
    "DisableRedirects",
    "TCP",
    "TCPUseTLS",
    "UDP",
    "OSService",
    "Interval",
    "AliasNode",
    "AliasService",
    "DockerContainerID",
    "Shell",
    "GRPC",
    "GRPCUseTLS",
    "H2PING",
    "H2PingUseTLS",
    "TLSServerName",
    "TLSSkipVerify",
    "Timeout",
    "TTL",
    "SuccessBeforePassing",
    "FailuresBeforeWarning",
    "FailuresBeforeCritical",
    "ProxyHTTP",
    "ProxyGRPC",
    "DeregisterCriticalServiceAfter",
    "OutputMaxSize",
    "ServiceID",
];
const CHECK_ALIASES: &[(&str, &str)] = &[
    ("script_args", "ScriptArgs"),
    ("docker_container_id", "DockerContainerID"),
    ("tls_server_name", "TLSServerName"),
    ("tls_skip_verify", "TLSSkipVerify"),
    ("grpc_use_tls", "GRPCUseTLS"),
    (
        "deregister_critical_service_after",
        "DeregisterCriticalServiceAfter",
    ),
    ("service_id", "ServiceID"),
];

/// An object's fields by canonical name, matched case-insensitively as Go's
/// `encoding/json` does; an unknown key is an error.
fn object(
    value: &Value,
    what: &str,
    keys: &[&'static str],
    aliases: &[(&str, &'static str)],
) -> Result<HashMap<&'static str, Value>, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "json: cannot unmarshal {} into Go value of type structs.{what}",
            json_type(value)
        ));
    };
    let mut fields = HashMap::new();
    for (key, value) in map {
        let canonical = keys
            .iter()
            .find(|k| k.eq_ignore_ascii_case(key))
            .copied()
            .or_else(|| {
                aliases
                    .iter()
                    .find(|(alias, _)| alias.eq_ignore_ascii_case(key))
                    .map(|(_, k)| *k)
            });
        match canonical {
            Some(k) => {
                fields.insert(k, value.clone());
            }
            None => return Err(format!("json: unknown field \"{key}\"")),
        }
    }
    Ok(fields)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(value: &Value, what: &str, field: &str, go: &str) -> String {
    format!(
        "json: cannot unmarshal {} into Go struct field {what}.{field} of type {go}",
        json_type(value)
    )
}

fn string_field(
    fields: &HashMap<&'static str, Value>,
    what: &str,
    key: &str,
) -> Result<String, String> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(type_error(other, what, key, "string")),
    }
}

fn int_field(fields: &HashMap<&'static str, Value>, what: &str, key: &str) -> Result<i64, String> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(v @ Value::Number(n)) => n.as_i64().ok_or_else(|| type_error(v, what, key, "int")),
        Some(other) => Err(type_error(other, what, key, "int")),
    }
}

fn bool_field(
    fields: &HashMap<&'static str, Value>,
    what: &str,
    key: &str,
) -> Result<bool, String> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(type_error(other, what, key, "bool")),
    }
}

fn strings_field(
    fields: &HashMap<&'static str, Value>,
    what: &str,
    key: &str,
) -> Result<Vec<String>, String> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(type_error(other, what, key, "string")),
            })
            .collect(),
        Some(other) => Err(type_error(other, what, key, "[]string")),
    }
}

/// A Go duration string or a number of nanoseconds.
fn duration_field(
    fields: &HashMap<&'static str, Value>,
    key: &str,
) -> Result<Option<Duration>, String> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(Some(Duration::from_nanos(
            n.as_i64().unwrap_or(0).max(0) as u64
        ))),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => parse_go_duration(s)
            .map(Some)
            .map_err(|_| format!("time: invalid duration \"{s}\"")),
        Some(other) => Err(type_error(other, "CheckType", key, "time.Duration")),
    }
}

fn decode_service(value: &Value) -> Result<ServiceDef, String> {
    const W: &str = "ServiceDefinition";
    let f = object(value, W, SERVICE_KEYS, SERVICE_ALIASES)?;
    let meta = match f.get("Meta") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(type_error(other, W, "Meta", "string")),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(type_error(other, W, "Meta", "map[string]string")),
    };
    let weights = match f.get("Weights") {
        None | Some(Value::Null) => None,
        Some(w) => {
            let w = object(w, "Weights", &["Passing", "Warning"], &[])?;
            Some((
                int_field(&w, "Weights", "Passing")?,
                int_field(&w, "Weights", "Warning")?,
            ))
        }
    };
    let tagged_addresses = match f.get("TaggedAddresses") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => {
            let mut out = Map::new();
            for (k, v) in map {
                let a = object(v, "ServiceAddress", &["Address", "Port"], &[])?;
                out.insert(
                    k.clone(),
                    json!({
                        "Address": string_field(&a, "ServiceAddress", "Address")?,
                        "Port": int_field(&a, "ServiceAddress", "Port")?,
                    }),
                );
            }
            out
        }
        Some(other) => {
            return Err(type_error(
                other,
                W,
                "TaggedAddresses",
                "map[string]structs.ServiceAddress",
            ))
        }
    };
    let check = match f.get("Check") {
        None | Some(Value::Null) => None,
        Some(c) => Some(decode_check(c)?),
    };
    let checks = match f.get("Checks") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.iter().map(decode_check).collect::<Result<_, _>>()?,
        Some(other) => return Err(type_error(other, W, "Checks", "structs.CheckTypes")),
    };
    for key in ["Kind", "SocketPath", "Token", "Namespace", "Partition"] {
        string_field(&f, W, key)?;
    }
    let name = match f.get("Name") {
        None | Some(Value::Null) => None,
        _ => Some(string_field(&f, W, "Name")?),
    };
    let id = match f.get("ID") {
        None | Some(Value::Null) => None,
        _ => Some(string_field(&f, W, "ID")?),
    };
    Ok(ServiceDef {
        id,
        name,
        tags: strings_field(&f, W, "Tags")?,
        address: string_field(&f, W, "Address")?,
        port: int_field(&f, W, "Port")?,
        meta,
        weights,
        tagged_addresses,
        enable_tag_override: bool_field(&f, W, "EnableTagOverride")?,
        check,
        checks,
    })
}

fn decode_check(value: &Value) -> Result<CheckDef, String> {
    const W: &str = "CheckType";
    let f = object(value, W, CHECK_KEYS, CHECK_ALIASES)?;
    let interval_kind = ["HTTP", "TCP", "GRPC", "H2PING", "UDP", "OSService"]
        .into_iter()
        .find(|k| {
            f.get(*k)
                .is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        })
        .or_else(|| {
            ["ScriptArgs", "Args"]
                .into_iter()
                .find(|k| {
                    f.get(*k)
                        .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
                })
                .map(|_| "script")
        });
    let alias = ["AliasService", "AliasNode"].iter().any(|k| {
        f.get(*k)
            .is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty()))
    });
    let optional = |key: &str| -> Result<Option<String>, String> {
        match f.get(key) {
            None | Some(Value::Null) => Ok(None),
            _ => string_field(&f, W, key).map(|s| Some(s).filter(|s| !s.is_empty())),
        }
    };
    Ok(CheckDef {
        empty: f.is_empty(),
        check_id: optional("CheckID")?,
        name: optional("Name")?,
        notes: string_field(&f, W, "Notes")?,
        status: optional("Status")?,
        ttl: duration_field(&f, "TTL")?,
        interval: duration_field(&f, "Interval")?,
        dcsa: duration_field(&f, "DeregisterCriticalServiceAfter")?,
        interval_kind,
        alias,
    })
}

/// Go's `time.ParseDuration`.
pub fn parse_go_duration(text: &str) -> Result<Duration, ()> {
    let s = text.strip_prefix(['+', '-']).unwrap_or(text);
    let negative = text.starts_with('-');
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or(())?;
        let number: f64 = rest[..number_len].parse().map_err(|_| ())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(()),
        };
        total += number * nanos;
        rest = &rest[unit_len..];
    }
    if negative {
        return Ok(Duration::ZERO);
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
