//! Consul backend, through the local agent's HTTP API.
//!
//! **Registration** goes through the agent, not the catalog:
//! `PUT /v1/agent/service/register` with our ID, Name, Address, Port, Tags,
//! Meta (the metadata plus `version`), Weights and one TTL check of `ttl`
//! carrying `DeregisterCriticalServiceAfter`. The "lease" is that check:
//! every refresh is `PUT /v1/agent/check/{pass|warn|fail}/service:<id>` by our
//! status, with an output that never changes for a status (Consul defers an
//! output-only change by minutes, and an unchanged one costs the catalog
//! nothing). A 404 there means the agent forgot us (restarted empty, or
//! reaped us after `deregister_critical_after`): [`RegistryError::LeaseLost`],
//! and the registration loop registers again. `draining` is Consul's
//! maintenance mode (`PUT /v1/agent/service/maintenance/:id`), which takes
//! the instance out of `?passing` while its own check keeps passing.
//! Deregistering treats 404 as success: the service is already gone.
//!
//! **Discovery** is a blocking query loop on `/v1/health/service/:name`
//! (`index` + `wait`), following the rules of Consul's blocking-query
//! documentation: the index is clamped to at least 1, reset to 0 when it goes
//! backwards (a restored or rebuilt cluster), each query is bounded by
//! `wait + wait/16` plus the registry timeout, and queries are rate-limited
//! by a token bucket. Every answer whose index moved becomes one
//! [`WatchEvent::Reset`] with the full set.
//!
//! We ask for every instance, not `?passing`: Consul's filter drops
//! `warning` instances, which an upstream may opt into
//! (`statuses = ["healthy", "warning"]`), and hides unhealthy ones from
//! `/v1/services`. The status is derived from each entry's checks and the
//! upstream's filter decides, as with the other backends; `?passing` would
//! not save wake-ups either, since Consul applies it after the blocking step.
//! Tags are filtered by the upstream too: one watch serves every upstream of
//! a service, each with its own tags.
//!
//! The ACL token goes in the `X-Consul-Token` header, marked sensitive, and
//! nowhere else: not in URLs, errors or logs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use super::{Entry, Instance, Lease, Registry, RegistryError, Status, Watch, WatchEvent};
use crate::config::ConsulConfig;
use crate::time::TokenBucket;

/// Consul caps `wait` at 10 minutes.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's limit on Meta pairs (ours carry the metadata and `version`).
pub const MAX_META_PAIRS: usize = 64;
/// The token bucket of a watch: this many queries back to back...
const QUERY_BURST: u32 = 2;
/// ...then one more per interval. A watch is one service of one agent; a
/// second bounds its load on a churning service while a change that follows
/// a quiet period is still seen at once.
const QUERY_INTERVAL: Duration = Duration::from_secs(1);
/// `Weights.Warning`: an instance in warning keeps a token share in
/// Consul's DNS answers.
const WARNING_WEIGHT: u32 = 1;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct ConsulRegistry {
    api: Arc<Api>,
    ttl: Duration,
    deregister_critical_after: Duration,
}

/// One Consul agent: the HTTP client and what goes on every request.
struct Api {
    /// `Err` when the TLS setup failed (e.g. the CA file went away after
    /// validation): every call then fails with that reason.
    http: Result<HttpClient, String>,
    address: String,
    token: Option<HeaderValue>,
    datacenter: Option<String>,
    timeout: Duration,
    wait: Duration,
}

/// A Consul answer we read: status, `X-Consul-Index`, body.
struct Answer {
    status: StatusCode,
    index: Option<u64>,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_owned()
    }

    /// The error for an unexpected status. 404 is handled by each caller,
    /// since what it means depends on the endpoint.
    fn error(&self, what: &str) -> RegistryError {
        let message = format!("{what}: {} {}", self.status.as_u16(), self.text());
        match self.status {
            StatusCode::BAD_REQUEST
            | StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::METHOD_NOT_ALLOWED => RegistryError::Rejected(message),
            _ => RegistryError::Unavailable(message),
        }
    }
}

impl ConsulRegistry {
    pub fn new(config: &ConsulConfig, ttl: Duration, timeout: Duration) -> Self {
        let http = http_client(config, timeout);
        if config.tls_skip_verify {
            tracing::warn!(address = %config.address, "registry.tls_skip_verify is set: the Consul agent's certificate is not verified");
        }
        let token = config.token.as_ref().and_then(|t| {
            // Validation allows only visible ASCII, which is always a valid
            // header value; `ok()` keeps this total all the same.
            let mut value = HeaderValue::from_str(t.expose()).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        ConsulRegistry {
            api: Arc::new(Api {
                http,
                address: config.address.clone(),
                token,
                datacenter: config.datacenter.clone(),
                timeout,
                wait: config.wait,
            }),
            ttl,
            deregister_critical_after: config.deregister_critical_after,
        }
    }
}

#[async_trait]
impl Registry for ConsulRegistry {
    fn kind(&self) -> &'static str {
        "consul"
    }

    fn target(&self) -> String {
        match &self.api.datacenter {
            Some(dc) => format!("{} (dc {dc})", self.api.address),
            None => self.api.address.clone(),
        }
    }

    async fn register(&self, instance: &Instance) -> Result<Box<dyn Lease>, RegistryError> {
        let mut lease = ConsulLease {
            api: self.api.clone(),
            check_id: format!("service:{}", instance.id),
            instance: instance.clone(),
            ttl: self.ttl,
            deregister_critical_after: self.deregister_critical_after,
            sent: None,
            maintenance: None,
        };
        lease.put_service().await?;
        // Re-registering an ID that Consul still knows keeps the old check
        // status and maintenance mode, so both are set explicitly.
        lease.sync_status().await?;
        Ok(Box::new(lease))
    }

    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError> {
        let mut watch = ConsulWatch {
            api: self.api.clone(),
            service: service.to_owned(),
            index: 0,
            bucket: TokenBucket::new(QUERY_BURST, QUERY_INTERVAL),
            initial: None,
        };
        // The first answer is immediate (index 0): an unreachable agent shows
        // up here, as a failed listing does for etcd.
        watch.bucket.acquire().await;
        let (index, entries) = watch.query().await?;
        watch.index = index;
        watch.initial = Some(entries);
        Ok(Box::new(watch))
    }
}

/// What the TTL check is told for a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckState {
    Pass,
    Warn,
    Fail,
}

impl CheckState {
    /// healthy → pass, warning → warn, anything not serving → fail.
    /// `draining` passes: the process is alive, and maintenance mode is what
    /// takes it out of rotation.
    fn of(status: Status) -> CheckState {
        match status {
            Status::Healthy | Status::Draining => CheckState::Pass,
            Status::Warning => CheckState::Warn,
            Status::Unknown | Status::Unhealthy | Status::Critical => CheckState::Fail,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            CheckState::Pass => "pass",
            CheckState::Warn => "warn",
            CheckState::Fail => "fail",
        }
    }

    fn consul_status(self) -> &'static str {
        match self {
            CheckState::Pass => "passing",
            CheckState::Warn => "warning",
            CheckState::Fail => "critical",
        }
    }
}

struct ConsulLease {
    api: Arc<Api>,
    check_id: String,
    instance: Instance,
    ttl: Duration,
    deregister_critical_after: Duration,
    /// The check state last sent, and with it the note (constant per state).
    sent: Option<CheckState>,
    /// Whether maintenance mode was last set on or off.
    maintenance: Option<bool>,
}

/// `PUT /v1/agent/service/register`: the fields squire sets, in Consul's
/// spelling.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceDefinition<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    name: &'a str,
    tags: &'a [String],
    address: &'a str,
    port: u16,
    meta: BTreeMap<String, String>,
    weights: Weights,
    check: CheckDefinition,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    passing: i64,
    #[serde(default)]
    warning: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckDefinition {
    #[serde(rename = "CheckID")]
    check_id: String,
    name: &'static str,
    notes: &'static str,
    #[serde(rename = "TTL")]
    ttl: String,
    status: &'static str,
    deregister_critical_service_after: String,
}

impl ConsulLease {
    fn definition(&self) -> ServiceDefinition<'_> {
        let instance = &self.instance;
        ServiceDefinition {
            id: &instance.id,
            name: &instance.name,
            tags: &instance.tags,
            address: &instance.host,
            port: instance.port,
            meta: service_meta(instance),
            weights: Weights {
                passing: i64::from(instance.weight.clamp(1, 65535)),
                warning: i64::from(WARNING_WEIGHT),
            },
            check: CheckDefinition {
                check_id: self.check_id.clone(),
                name: "squire heartbeat",
                notes: "TTL check kept alive by the squire sidecar",
                ttl: go_duration(self.ttl),
                status: CheckState::of(instance.status).consul_status(),
                deregister_critical_service_after: go_duration(self.deregister_critical_after),
            },
        }
    }

    async fn put_service(&self) -> Result<(), RegistryError> {
        // Serializing strings, numbers and string maps cannot fail.
        let body = serde_json::to_vec(&self.definition()).expect("definition serializes");
        let answer = self
            .api
            .call(
                Method::PUT,
                "/v1/agent/service/register".to_owned(),
                Some(body),
            )
            .await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            _ => Err(answer.error("registering the service")),
        }
    }

    /// Sends maintenance mode and the check state if they differ from what
    /// was last sent (everything, right after registering).
    async fn sync_status(&mut self) -> Result<(), RegistryError> {
        let draining = self.instance.status == Status::Draining;
        if self.maintenance != Some(draining) {
            self.set_maintenance(draining).await?;
            self.maintenance = Some(draining);
        }
        let state = CheckState::of(self.instance.status);
        if self.sent != Some(state) {
            self.send_check(state).await?;
            self.sent = Some(state);
        }
        Ok(())
    }

    async fn send_check(&self, state: CheckState) -> Result<(), RegistryError> {
        let path = format!(
            "/v1/agent/check/{}/{}?note={}",
            state.verb(),
            self.check_id,
            encode(&format!("squire reports {}", self.instance.status))
        );
        let answer = self.api.call(Method::PUT, path, None).await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistryError::LeaseLost(format!(
                "the Consul agent does not know check {}",
                self.check_id
            ))),
            _ => Err(answer.error("updating the TTL check")),
        }
    }

    async fn set_maintenance(&self, enable: bool) -> Result<(), RegistryError> {
        let path = format!(
            "/v1/agent/service/maintenance/{}?enable={enable}&reason={}",
            self.instance.id,
            encode("draining: squire takes no new sessions")
        );
        let answer = self.api.call(Method::PUT, path, None).await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistryError::LeaseLost(format!(
                "the Consul agent does not know service {}",
                self.instance.id
            ))),
            _ => Err(answer.error("setting maintenance mode")),
        }
    }
}

#[async_trait]
impl Lease for ConsulLease {
    fn id(&self) -> String {
        self.check_id.clone()
    }

    async fn keep_alive(&mut self) -> Result<(), RegistryError> {
        let state = CheckState::of(self.instance.status);
        self.send_check(state).await?;
        self.sent = Some(state);
        Ok(())
    }

    async fn update(&mut self, instance: &Instance) -> Result<(), RegistryError> {
        let mut definition = instance.clone();
        definition.status = self.instance.status;
        let redefine = definition != self.instance;
        self.instance = instance.clone();
        if redefine {
            // Keeps the check's status; sync_status below sets it anyway.
            self.put_service().await?;
        }
        self.sync_status().await
    }

    async fn revoke(self: Box<Self>) -> Result<(), RegistryError> {
        let path = format!("/v1/agent/service/deregister/{}", self.instance.id);
        let answer = self.api.call(Method::PUT, path, None).await?;
        match answer.status {
            // 404: already gone (reaped, or the agent restarted empty).
            StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(answer.error("deregistering the service")),
        }
    }
}

struct ConsulWatch {
    api: Arc<Api>,
    service: String,
    /// The index of the last answer, 0 before the first and after a reset.
    index: u64,
    bucket: TokenBucket,
    initial: Option<Vec<Entry>>,
}

impl ConsulWatch {
    /// One query from `self.index`: the answer's index (at least 1) and
    /// entries.
    async fn query(&self) -> Result<(u64, Vec<Entry>), RegistryError> {
        let mut path = format!("/v1/health/service/{}", self.service);
        let mut timeout = self.api.timeout;
        let mut params = Vec::new();
        if self.index > 0 {
            let wait = self.api.wait;
            params.push(format!("index={}", self.index));
            params.push(format!("wait={}", go_duration(wait)));
            // Consul adds up to wait/16 of jitter before answering.
            timeout += wait + wait / 16;
        }
        if let Some(dc) = &self.api.datacenter {
            params.push(format!("dc={}", encode(dc)));
        }
        if !params.is_empty() {
            path = format!("{path}?{}", params.join("&"));
        }
        let answer = self
            .api
            .call_within(Method::GET, path, None, timeout)
            .await?;
        if answer.status != StatusCode::OK {
            return Err(answer.error("querying service health"));
        }
        let index = answer.index.ok_or_else(|| {
            RegistryError::Unavailable("health answer without X-Consul-Index".into())
        })?;
        let entries = health_entries(&answer.body)?;
        Ok((index.max(1), entries))
    }
}

#[async_trait]
impl Watch for ConsulWatch {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        if let Some(entries) = self.initial.take() {
            return Ok(WatchEvent::Reset(entries));
        }
        loop {
            self.bucket.acquire().await;
            let (index, entries) = self.query().await?;
            if index < self.index {
                // A restored snapshot or a rebuilt cluster: the answer is the
                // current state, and the next query starts over from 0.
                tracing::info!(service = %self.service, from = self.index, to = index, "Consul index went backwards; resetting");
                self.index = 0;
                return Ok(WatchEvent::Reset(entries));
            }
            if index == self.index {
                continue; // the wait ran out with no change
            }
            self.index = index;
            return Ok(WatchEvent::Reset(entries));
        }
    }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, RegistryError> {
        self.call_within(method, path, body, self.timeout).await
    }

    /// One request, answer read whole, all within `timeout`. Errors name the
    /// method and path, never a header.
    async fn call_within(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Answer, RegistryError> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| RegistryError::Rejected(e.clone()))?;
        let what = format!("{method} {}", path.split('?').next().unwrap_or(&path));
        let body = body.map(Bytes::from);
        let build = || {
            let mut request = Request::builder()
                .method(method.clone())
                .uri(format!("{}{path}", self.address));
            if let Some(token) = &self.token {
                request = request.header("X-Consul-Token", token.clone());
            }
            if body.is_some() {
                request = request.header(CONTENT_TYPE, "application/json");
            }
            request
                .body(Full::new(body.clone().unwrap_or_default()))
                .map_err(|e| RegistryError::Rejected(format!("{what}: {e}")))
        };
        // Writes are idempotent PUTs: one that failed on a pooled connection
        // the agent had closed (e.g. it restarted) is sent again at once on
        // a new one. A blocking read is not: its failure is what tells the
        // watch to start over from index 0.
        let attempts = if method == Method::PUT { 2 } else { 1 };
        let exchange = async {
            let mut attempt = 1;
            let response = loop {
                match http.request(build()?).await {
                    Ok(response) => break response,
                    Err(e) if attempt < attempts && !e.is_connect() => {
                        tracing::debug!(request = %what, error = %error_chain(&e), "retrying on a new connection");
                        attempt += 1;
                    }
                    Err(e) => {
                        return Err(RegistryError::Unavailable(format!(
                            "{what}: {}",
                            error_chain(&e)
                        )))
                    }
                }
            };
            let status = response.status();
            let index = response
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| RegistryError::Unavailable(format!("{what}: {e}")))?
                .to_bytes();
            Ok(Answer {
                status,
                index,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RegistryError::Unavailable(format!(
                "{what}: no answer within {timeout:?}"
            ))),
        }
    }
}

/// One entry of `/v1/health/service`: the fields squire reads.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: NodeEntry,
    service: ServiceEntry,
    #[serde(default)]
    checks: Vec<CheckEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeEntry {
    #[serde(default)]
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    weights: Option<Weights>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckEntry {
    #[serde(rename = "CheckID")]
    check_id: String,
    status: String,
}

/// Parses a health answer. Each entry is read on its own, so a malformed one
/// becomes an `Err` entry (skipped and counted by discovery) and the rest
/// still count.
fn health_entries(body: &[u8]) -> Result<Vec<Entry>, RegistryError> {
    let raw: Vec<serde_json::Value> = serde_json::from_slice(body).map_err(|e| {
        RegistryError::Unavailable(format!("health answer is not a JSON array: {e}"))
    })?;
    Ok(raw
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            let key = match (
                value.pointer("/Node/Node").and_then(|v| v.as_str()),
                value.pointer("/Service/ID").and_then(|v| v.as_str()),
            ) {
                (Some(node), Some(id)) => format!("{node}/{id}"),
                _ => format!("entry {i}"),
            };
            let value = serde_json::from_value::<HealthEntry>(value)
                .map_err(|e| e.to_string())
                .and_then(instance_of);
            Entry { key, value }
        })
        .collect())
}

fn instance_of(entry: HealthEntry) -> Result<Instance, String> {
    let service = entry.service;
    let host = if service.address.is_empty() {
        entry.node.address
    } else {
        service.address
    };
    if host.is_empty() {
        return Err("neither the service nor its node has an address".into());
    }
    if service.port == 0 {
        return Err("port 0".into());
    }
    let weight = match service.weights {
        None => 1,
        Some(w) => u32::try_from(w.passing)
            .ok()
            .filter(|w| *w > 0)
            .ok_or_else(|| format!("Weights.Passing {} is not positive", w.passing))?,
    };
    let mut metadata = service.meta.unwrap_or_default();
    let version = metadata.remove("version").unwrap_or_default();
    Ok(Instance {
        name: service.service,
        id: service.id,
        host,
        port: service.port,
        tags: service.tags.unwrap_or_default(),
        metadata,
        version,
        weight,
        status: status_of(&entry.checks),
    })
}

/// The status an entry's checks (its own and its node's) add up to: any
/// maintenance check → draining, else the worst of them.
fn status_of(checks: &[CheckEntry]) -> Status {
    let maintenance = checks.iter().any(|c| {
        c.check_id == "_node_maintenance"
            || c.check_id.starts_with("_service_maintenance:")
            || c.status == "maintenance"
    });
    if maintenance {
        return Status::Draining;
    }
    let mut status = Status::Healthy;
    for check in checks {
        match check.status.as_str() {
            "passing" => {}
            "warning" => status = Status::Warning,
            // "critical", and anything Consul may add: not serving.
            _ => return Status::Unhealthy,
        }
    }
    status
}

/// The Meta squire sends: the metadata plus `version`. Keys Consul would
/// refuse (validation rejects them for kind = "consul") are left out with a
/// warning rather than failing the whole registration.
fn service_meta(instance: &Instance) -> BTreeMap<String, String> {
    let mut meta = BTreeMap::new();
    for (key, value) in &instance.metadata {
        if key == "version" {
            continue; // the version field wins
        }
        if let Some(reason) = meta_problem(key, value) {
            tracing::warn!(id = %instance.id, key = %key, %reason, "metadata pair left out of the Consul registration");
            continue;
        }
        if meta.len() + 1 >= MAX_META_PAIRS {
            tracing::warn!(id = %instance.id, key = %key, "metadata pair left out: Consul takes at most 64 pairs");
            continue;
        }
        meta.insert(key.clone(), value.clone());
    }
    meta.insert("version".to_owned(), instance.version.clone());
    meta
}

/// Why Consul would refuse one Meta pair (its own wording), if it would.
pub fn meta_problem(key: &str, value: &str) -> Option<&'static str> {
    if key.is_empty() {
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
    }
}

/// A duration as Go's `time.ParseDuration` reads it.
fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The HTTP client: plain HTTP, or rustls with the configured CA, the
/// system's roots, or (explicitly) no verification.
fn http_client(config: &ConsulConfig, timeout: Duration) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    let tls = tls_config(config)?;
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector))
}

/// The rustls settings of an `https` address (crate::tls: public roots
/// plus `ca`, or no verification when explicitly asked).
fn tls_config(config: &ConsulConfig) -> Result<rustls::ClientConfig, String> {
    let tls = crate::tls::client_config(config.ca.as_deref(), config.tls_skip_verify)
        .map_err(|e| e.to_string())?;
    Ok((*tls).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &str, status: &str) -> CheckEntry {
        CheckEntry {
            check_id: id.into(),
            status: status.into(),
        }
    }

    #[test]
    fn status_follows_the_worst_check_and_maintenance_drains() {
        assert_eq!(status_of(&[]), Status::Healthy);
        let serf = check("serfHealth", "passing");
        assert_eq!(
            status_of(&[
                check("serfHealth", "passing"),
                check("service:a", "passing")
            ]),
            Status::Healthy
        );
        assert_eq!(
            status_of(&[
                check("serfHealth", "passing"),
                check("service:a", "warning")
            ]),
            Status::Warning
        );
        assert_eq!(
            status_of(&[
                check("serfHealth", "critical"),
                check("service:a", "passing")
            ]),
            Status::Unhealthy
        );
        assert_eq!(
            status_of(&[
                serf,
                check("service:a", "passing"),
                check("_service_maintenance:a", "critical")
            ]),
            Status::Draining
        );
        assert_eq!(
            status_of(&[check("_node_maintenance", "critical")]),
            Status::Draining
        );
    }

    #[test]
    fn check_states_by_status() {
        assert_eq!(CheckState::of(Status::Healthy), CheckState::Pass);
        assert_eq!(CheckState::of(Status::Draining), CheckState::Pass);
        assert_eq!(CheckState::of(Status::Warning), CheckState::Warn);
        for s in [Status::Unknown, Status::Unhealthy, Status::Critical] {
            assert_eq!(CheckState::of(s), CheckState::Fail);
        }
    }

    #[test]
    fn entries_map_to_instances_and_bad_ones_are_kept_as_errors() {
        let body = br#"[
          {"Node":{"Node":"n1","Address":"10.0.0.1"},
           "Service":{"ID":"web-1","Service":"web","Tags":["v1"],"Address":"","Port":8080,
                      "Meta":{"version":"1.2.3","zone":"a"},"Weights":{"Passing":10,"Warning":1}},
           "Checks":[{"CheckID":"serfHealth","Status":"passing"},{"CheckID":"service:web-1","Status":"warning"}]},
          {"Node":{"Node":"n1","Address":"10.0.0.1"},
           "Service":{"ID":"web-2","Service":"web","Tags":null,"Address":"10.0.0.9","Port":8081,"Meta":null},
           "Checks":[]},
          {"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"web-3","Service":"web","Port":"x"},"Checks":[]},
          {"Node":{"Node":"n2","Address":""},"Service":{"ID":"web-4","Service":"web","Port":1},"Checks":[]}
        ]"#;
        let entries = health_entries(body).expect("an array");
        assert_eq!(entries.len(), 4);
        let first = entries[0].value.as_ref().expect("valid");
        assert_eq!(entries[0].key, "n1/web-1");
        assert_eq!(first.host, "10.0.0.1", "falls back to the node address");
        assert_eq!(first.weight, 10);
        assert_eq!(first.version, "1.2.3");
        assert_eq!(
            first.metadata,
            BTreeMap::from([("zone".to_owned(), "a".to_owned())])
        );
        assert_eq!(first.status, Status::Warning);
        let second = entries[1].value.as_ref().expect("valid");
        assert_eq!(
            (second.host.as_str(), second.weight, second.status),
            ("10.0.0.9", 1, Status::Healthy)
        );
        assert!(second.tags.is_empty() && second.version.is_empty());
        assert!(entries[2].value.is_err());
        assert!(entries[3]
            .value
            .as_ref()
            .is_err_and(|e| e.contains("address")));
        assert!(health_entries(b"{}").is_err());
    }

    #[test]
    fn meta_rules_match_consul() {
        assert_eq!(meta_problem("zone", "a"), None);
        assert_eq!(meta_problem("a-b_C9", "a"), None);
        assert!(meta_problem("", "a").is_some());
        assert!(meta_problem("a.b", "a").is_some());
        assert!(meta_problem(&"k".repeat(129), "a").is_some());
        assert!(meta_problem("consul-x", "a").is_some());
        assert!(meta_problem("k", &"v".repeat(513)).is_some());
        let instance = Instance {
            name: "a".into(),
            id: "a-1".into(),
            host: "h".into(),
            port: 1,
            tags: vec![],
            metadata: BTreeMap::from([
                ("ok".to_owned(), "1".to_owned()),
                ("not ok".to_owned(), "2".to_owned()),
                ("version".to_owned(), "shadowed".to_owned()),
            ]),
            version: "1.0.0".into(),
            weight: 1,
            status: Status::Healthy,
        };
        assert_eq!(
            service_meta(&instance),
            BTreeMap::from([
                ("ok".to_owned(), "1".to_owned()),
                ("version".to_owned(), "1.0.0".to_owned())
            ])
        );
    }

    #[test]
    fn durations_and_encoding() {
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_nanos(5)), "5ns");
        assert_eq!(encode("a b/c:d"), "a%20b%2Fc%3Ad");
    }
}
