//! An in-process fake Eureka server that follows the Eureka REST operations
//! documentation (github.com/Netflix/eureka/wiki/Eureka-REST-operations, as
//! Spring Cloud's server serves it under `/eureka`), because no Eureka
//! server can be installed here. `tests/eureka_fake.rs` checks it against
//! that list.
//!
//! | operation | request | answer |
//! |---|---|---|
//! | register | `POST /eureka/apps/{APP}` with `{"instance":{...}}` | 204 |
//! | renew | `PUT /eureka/apps/{APP}/{id}` | 200; 404 for an unknown instance |
//! | status override | `PUT /eureka/apps/{APP}/{id}/status?value=OUT_OF_SERVICE` | 200; 404 unknown |
//! | remove override | `DELETE /eureka/apps/{APP}/{id}/status[?value=UP]` | 200; 404 unknown |
//! | cancel | `DELETE /eureka/apps/{APP}/{id}` | 200; 404 unknown |
//! | all | `GET /eureka/apps` | 200, `applications` with `apps__hashcode` |
//! | one app | `GET /eureka/apps/{APP}` | 200 `application`; 404 unknown |
//! | one instance | `GET /eureka/apps/{APP}/{id}`, `GET /eureka/instances/{id}` | 200 `instance`; 404 |
//! | delta | `GET /eureka/apps/delta` | 200, the changes of the last 3 minutes with `actionType`, and the apps hash code of the whole registry |
//!
//! Answers are JSON (Jackson's shape: `"port":{"$":8080,"@enabled":"true"}`)
//! for an `Accept` naming JSON, else (the server's default) the same
//! document as XML (`@` keys as attributes, `$` as text). App names are upper-cased as Eureka does. An
//! instance whose last renewal is older than its `leaseInfo.durationInSecs`
//! (default 90) is expired and evicted at the next request (the real
//! server evicts on a 60 s timer and may hold back in self-preservation;
//! the fake has neither). A status override sets `overriddenstatus` and
//! `status`, survives a re-registration, and is removed by `DELETE
//! .../status`, leaving `value` or else UNKNOWN. Every change goes into
//! the delta queue (ADDED, MODIFIED, DELETED) with its instance.
//!
//! Test hooks: [`FakeEureka::stop`] / [`FakeEureka::start_again`] (same
//! port, registry kept), [`FakeEureka::forget`] (drop an instance without a
//! delta, as a missed delta would look), [`FakeEureka::restart_empty`],
//! and views of instances and requests.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long changes stay in the delta queue (Eureka's
/// `retentionTimeInMSInDeltaQueue`).
const DELTA_RETENTION: Duration = Duration::from_secs(180);

struct Lease {
    instance: Value,
    last_renewal: Instant,
    duration: Duration,
    overridden: Option<String>,
}

#[derive(Default)]
struct State {
    /// APP -> instance id -> lease.
    apps: BTreeMap<String, BTreeMap<String, Lease>>,
    delta: VecDeque<(Instant, Value)>,
    requests: Vec<String>,
}

impl State {
    fn evict_expired(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        for (app, leases) in &self.apps {
            for (id, lease) in leases {
                if now.duration_since(lease.last_renewal) > lease.duration {
                    expired.push((app.clone(), id.clone()));
                }
            }
        }
        for (app, id) in expired {
            self.remove(&app, &id);
        }
        while self
            .delta
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > DELTA_RETENTION)
        {
            self.delta.pop_front();
        }
    }

    fn remove(&mut self, app: &str, id: &str) -> bool {
        let Some(leases) = self.apps.get_mut(app) else {
            return false;
        };
        let Some(lease) = leases.remove(id) else {
            return false;
        };
        if leases.is_empty() {
            self.apps.remove(app);
        }
        self.changed(&lease.instance, "DELETED");
        true
    }

    fn changed(&mut self, instance: &Value, action: &str) {
        let mut instance = instance.clone();
        instance["actionType"] = action.into();
        self.delta.push_back((Instant::now(), instance));
    }

    fn lease(&mut self, app: &str, id: &str) -> Option<&mut Lease> {
        self.apps.get_mut(app)?.get_mut(id)
    }

    /// `STATUS_count_` over every instance, in status order.
    fn hash_code(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for lease in self.apps.values().flat_map(|l| l.values()) {
            let status = lease.instance["status"].as_str().unwrap_or("UNKNOWN");
            *counts.entry(status.to_owned()).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(status, count)| format!("{status}_{count}_"))
            .collect()
    }

    fn application(&self, app: &str) -> Option<Value> {
        let leases = self.apps.get(app)?;
        let instances: Vec<Value> = leases.values().map(|l| l.instance.clone()).collect();
        Some(json!({ "name": app, "instance": instances }))
    }

    fn applications(&self) -> Value {
        let apps: Vec<Value> = self
            .apps
            .keys()
            .filter_map(|app| self.application(app))
            .collect();
        json!({ "applications": {
            "versions__delta": "1",
            "apps__hashcode": self.hash_code(),
            "application": apps,
        }})
    }

    fn deltas(&self) -> Value {
        let mut by_app: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (_, instance) in &self.delta {
            let app = instance["app"].as_str().unwrap_or_default().to_owned();
            by_app.entry(app).or_default().push(instance.clone());
        }
        let apps: Vec<Value> = by_app
            .into_iter()
            .map(|(name, instance)| json!({ "name": name, "instance": instance }))
            .collect();
        json!({ "applications": {
            "versions__delta": "1",
            "apps__hashcode": self.hash_code(),
            "application": apps,
        }})
    }
}

pub struct FakeEureka {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Mutex<CancellationToken>,
}

impl FakeEureka {
    pub async fn start() -> FakeEureka {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake eureka");
        let addr = listener.local_addr().expect("addr");
        let fake = FakeEureka {
            addr,
            state: Arc::new(Mutex::new(State::default())),
            stop: Mutex::new(CancellationToken::new()),
        };
        fake.serve(listener);
        fake
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service URL: `http://127.0.0.1:PORT/eureka`.
    pub fn url(&self) -> String {
        format!("http://{}/eureka", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serve(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = stop.clone();
        let state = self.state.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let state = state.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
    }

    /// Closes the listener and every connection; the registry is kept.
    pub fn stop(&self) {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).cancel();
    }

    /// Serves again on the same port.
    pub async fn start_again(&self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind fake eureka");
        self.serve(listener);
    }

    /// Forgets everything, as a restarted server would.
    pub fn restart_empty(&self) {
        let mut state = self.state();
        state.apps.clear();
        state.delta.clear();
    }

    /// Drops an instance without a delta entry: a client that only applies
    /// deltas would keep it, and must notice from the hash code.
    pub fn forget(&self, app: &str, id: &str) {
        let mut state = self.state();
        if let Some(leases) = state.apps.get_mut(app) {
            leases.remove(id);
            if leases.is_empty() {
                state.apps.remove(app);
            }
        }
    }

    /// The instance documents of `app` as the server holds them.
    pub fn instances(&self, app: &str) -> Vec<Value> {
        let mut state = self.state();
        state.evict_expired();
        state
            .apps
            .get(app)
            .map(|leases| leases.values().map(|l| l.instance.clone()).collect())
            .unwrap_or_default()
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }
}

async fn handle(state: &Mutex<State>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    // XML unless JSON is asked for, as the server's resources produce.
    let xml = !request
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return empty(StatusCode::BAD_REQUEST),
    };
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    state.requests.push(if query.is_empty() {
        format!("{method} {path}")
    } else {
        format!("{method} {path}?{query}")
    });
    state.evict_expired();
    let Some(rest) = path.strip_prefix("/eureka/") else {
        return empty(StatusCode::NOT_FOUND);
    };
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let value_param = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("value="))
        .map(str::to_owned);
    match (method, parts.as_slice()) {
        (Method::GET, ["apps"]) => document(state.applications(), xml),
        (Method::GET, ["apps", "delta"]) => document(state.deltas(), xml),
        (Method::GET, ["apps", app]) => match state.application(&app.to_ascii_uppercase()) {
            Some(app) => document(json!({ "application": app }), xml),
            None => empty(StatusCode::NOT_FOUND),
        },
        (Method::GET, ["apps", app, id]) => match state.lease(&app.to_ascii_uppercase(), id) {
            Some(lease) => document(json!({ "instance": lease.instance.clone() }), xml),
            None => empty(StatusCode::NOT_FOUND),
        },
        (Method::GET, ["instances", id]) => {
            let found = state
                .apps
                .values()
                .find_map(|leases| leases.get(*id))
                .map(|l| l.instance.clone());
            match found {
                Some(instance) => document(json!({ "instance": instance }), xml),
                None => empty(StatusCode::NOT_FOUND),
            }
        }
        (Method::POST, ["apps", app]) => register(&mut state, &app.to_ascii_uppercase(), &body),
        (Method::PUT, ["apps", app, id]) => match state.lease(&app.to_ascii_uppercase(), id) {
            Some(lease) => {
                lease.last_renewal = Instant::now();
                empty(StatusCode::OK)
            }
            None => empty(StatusCode::NOT_FOUND),
        },
        (Method::PUT, ["apps", app, id, "status"]) => {
            let Some(value) = value_param else {
                return empty(StatusCode::BAD_REQUEST);
            };
            let app = app.to_ascii_uppercase();
            let Some(lease) = state.lease(&app, id) else {
                return empty(StatusCode::NOT_FOUND);
            };
            lease.overridden = Some(value.clone());
            lease.instance["overriddenstatus"] = value.clone().into();
            lease.instance["status"] = value.into();
            let instance = lease.instance.clone();
            state.changed(&instance, "MODIFIED");
            empty(StatusCode::OK)
        }
        (Method::DELETE, ["apps", app, id, "status"]) => {
            let app = app.to_ascii_uppercase();
            let Some(lease) = state.lease(&app, id) else {
                return empty(StatusCode::NOT_FOUND);
            };
            lease.overridden = None;
            lease.instance["overriddenstatus"] = "UNKNOWN".into();
            lease.instance["status"] = value_param.unwrap_or_else(|| "UNKNOWN".into()).into();
            let instance = lease.instance.clone();
            state.changed(&instance, "MODIFIED");
            empty(StatusCode::OK)
        }
        (Method::DELETE, ["apps", app, id]) => {
            if state.remove(&app.to_ascii_uppercase(), id) {
                empty(StatusCode::OK)
            } else {
                empty(StatusCode::NOT_FOUND)
            }
        }
        _ => empty(StatusCode::NOT_FOUND),
    }
}

fn register(state: &mut State, app: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(document) = serde_json::from_slice::<Value>(body) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let Some(Value::Object(fields)) = document.get("instance") else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let mut instance = Value::Object(fields.clone());
    let id = instance["instanceId"]
        .as_str()
        .or_else(|| instance["hostName"].as_str())
        .unwrap_or_default()
        .to_owned();
    if id.is_empty() || instance["ipAddr"].as_str().is_none() {
        return empty(StatusCode::BAD_REQUEST);
    }
    instance["app"] = app.into();
    instance["instanceId"] = id.clone().into();
    let registered = instance["status"].as_str().unwrap_or("UP").to_owned();
    let duration = instance["leaseInfo"]["durationInSecs"]
        .as_u64()
        .unwrap_or(90);
    let previous = state.lease(app, &id).and_then(|l| l.overridden.clone());
    // An override survives a registration, as the server's override map.
    let status = previous.clone().unwrap_or(registered);
    instance["status"] = status.into();
    instance["overriddenstatus"] = previous.clone().unwrap_or_else(|| "UNKNOWN".into()).into();
    if !instance.get("metadata").is_some_and(Value::is_object) {
        instance["metadata"] = Value::Object(Map::new());
    }
    let action = if state.lease(app, &id).is_some() {
        "MODIFIED"
    } else {
        "ADDED"
    };
    state.apps.entry(app.to_owned()).or_default().insert(
        id,
        Lease {
            instance: instance.clone(),
            last_renewal: Instant::now(),
            duration: Duration::from_secs(duration),
            overridden: previous,
        },
    );
    state.changed(&instance, action);
    empty(StatusCode::NO_CONTENT)
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn document(value: Value, xml: bool) -> Response<Full<Bytes>> {
    let (body, content_type) = if xml {
        (to_xml(&value), "application/xml")
    } else {
        (value.to_string(), "application/json")
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Jackson's JSON as the XML Eureka's XStream codec writes: one element
/// per key, a list as repeated elements, `@name` as an attribute, `$` as
/// the text.
pub fn to_xml(value: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    if let Value::Object(map) = value {
        for (key, value) in map {
            element(&mut out, key, value);
        }
    }
    out
}

fn element(out: &mut String, name: &str, value: &Value) {
    match value {
        Value::Array(items) => {
            for item in items {
                element(out, name, item);
            }
        }
        Value::Object(map) => {
            out.push('<');
            out.push_str(name);
            for (key, value) in map {
                if let Some(attribute) = key.strip_prefix('@') {
                    out.push_str(&format!(" {attribute}=\"{}\"", escape(&scalar(value))));
                }
            }
            out.push('>');
            for (key, value) in map {
                if key == "$" {
                    out.push_str(&escape(&scalar(value)));
                } else if !key.starts_with('@') {
                    element(out, key, value);
                }
            }
            out.push_str(&format!("</{name}>"));
        }
        scalar_value => {
            out.push_str(&format!(
                "<{name}>{}</{name}>",
                escape(&scalar(scalar_value))
            ));
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One HTTP/1.1 request with an optional JSON body and an `Accept`
/// header: status and body.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    accept: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to fake eureka");
    let body = body.unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
