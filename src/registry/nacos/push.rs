//! Discovery by subscription: Nacos 2.x's gRPC push, one connection per
//! registry, shared by all its watches.
//!
//! The protocol (Nacos's `nacos_grpc_service.proto`, as the Java client's
//! `GrpcClient` and r-nacos's `grpc/` module speak it): every message is a
//! `Payload` whose metadata names its type (`SubscribeServiceRequest`,
//! ...) and whose body is that message as JSON. Unary calls go to
//! `/Request/request`; `/BiRequestStream/requestBiStream` is a stream each
//! way, on which the client first sends a `ConnectionSetupRequest` and the
//! server then sends its own requests, each answered on the same stream.
//! The server knows the connection by its remote address, so the unary
//! calls and the stream share one HTTP/2 connection (one tonic `Channel`
//! to one address is one connection).
//!
//! A session: connect; `ServerCheckRequest` (a server without gRPC fails
//! here); open the stream with the setup; `SubscribeServiceRequest` for
//! every watched service (and for each one watched later); then answer
//! the server: `NotifySubscriberRequest` (a subscribed service changed)
//! with `NotifySubscriberResponse`, `ClientDetectionRequest` (are you
//! there) with `ClientDetectionResponse`; `ConnectResetRequest` ends the
//! session. When idle, a `HealthCheckRequest` every [`KEEP_ALIVE`] keeps
//! the server's view of the connection fresh (r-nacos probes a connection
//! silent for 15 s) and finds a server or connection that stopped
//! answering (within the registry timeout). Any failure ends the session: the
//! watches go on polling, and a new session starts after a backoff.
//!
//! A push only says that a service changed: the watch then lists it over
//! the Open API at once, the same call and the same parsing as a poll
//! (`watch.rs`). The push's own host list is not used: r-nacos fills it
//! with healthy instances only, where the list squire reads has the
//! unhealthy ones too (as unhealthy), so taking it would flap the
//! snapshot between the two. After each (re)subscription every watch
//! lists once, for what changed while no session was up.
//!
//! Why not the Open API's UDP push (`instance/list?udpPort=&clientIP=`):
//! r-nacos 0.8.8 parses those parameters but never starts the listener
//! that would send (`InnerNamingListener` is not registered with its bean
//! factory, so `NamingActor::listener_addr` stays `None`; its source says
//! "1.x udp, not enabled for now"), so it could not be tested here.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

use super::api::Api;
use crate::backoff::Backoff;
use crate::metrics as m;
use crate::registry::RegistryError;

/// The largest message taken from the server; a bigger one ends the
/// session (tonic refuses to decode it). A push is one service's
/// instances: 4 MiB is some ten thousand of them.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// A `HealthCheckRequest` after this long without a message from the
/// server (the Java client's interval). No HTTP/2 pings: gRPC servers in
/// Java (Nacos) refuse pings more often than every 5 minutes by default.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// A pushed type shown in a log line is cut to this many characters.
const SHOWN_TYPE: usize = 64;

const REQUEST: &str = "/Request/request";
const BI_STREAM: &str = "/BiRequestStream/requestBiStream";
const SUCCESS: i64 = 200;

// Nacos's `Payload` and what it holds, as in its .proto.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Metadata {
    #[prost(string, tag = "3")]
    r#type: String,
    #[prost(string, tag = "8")]
    client_ip: String,
    #[prost(map = "string, string", tag = "7")]
    headers: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Payload {
    #[prost(message, optional, tag = "2")]
    metadata: Option<Metadata>,
    #[prost(message, optional, tag = "3")]
    body: Option<Any>,
}

impl Payload {
    fn new(kind: &str, body: &Value, headers: HashMap<String, String>) -> Payload {
        Payload {
            metadata: Some(Metadata {
                r#type: kind.to_owned(),
                client_ip: String::new(),
                headers,
            }),
            body: Some(Any {
                type_url: String::new(),
                value: body.to_string().into_bytes(),
            }),
        }
    }
}

/// What the server sent on the stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Inbound {
    /// `service` in `group` changed.
    Notify {
        request_id: String,
        group: String,
        service: String,
    },
    /// Are you there.
    Detection { request_id: String },
    /// Connect again (to it or another server).
    Reset,
}

/// Reads one message of the server. `Err` says what was wrong with it,
/// for the malformed counter and its one log line.
pub(super) fn parse_inbound(payload: &Payload) -> Result<Inbound, String> {
    let kind = payload
        .metadata
        .as_ref()
        .map(|m| m.r#type.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("no type in its metadata")?;
    let body = payload.body.as_ref().map(|b| b.value.as_slice());
    let json = || -> Result<Value, String> {
        let value: Value = serde_json::from_slice(body.unwrap_or(b"{}"))
            .map_err(|e| format!("{kind} body is not JSON: {e}"))?;
        if value.is_object() {
            Ok(value)
        } else {
            Err(format!("{kind} body is not a JSON object"))
        }
    };
    let text = |value: &Value, key: &str| match &value[key] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    match kind {
        "NotifySubscriberRequest" => {
            let body = json()?;
            let request_id = text(&body, "requestId").unwrap_or_default();
            let name = text(&body, "serviceName")
                .or_else(|| text(&body["serviceInfo"], "name"))
                .filter(|name| !name.is_empty())
                .ok_or("NotifySubscriberRequest without serviceName")?;
            // Nacos writes grouped names as `group@@service` in places.
            let (prefix, service) = match name.split_once("@@") {
                Some((group, service)) => (Some(group.to_owned()), service.to_owned()),
                None => (None, name),
            };
            let group = text(&body, "groupName")
                .or_else(|| text(&body["serviceInfo"], "groupName"))
                .or(prefix)
                .unwrap_or_default();
            Ok(Inbound::Notify {
                request_id,
                group,
                service,
            })
        }
        "ClientDetectionRequest" => Ok(Inbound::Detection {
            request_id: text(&json()?, "requestId").unwrap_or_default(),
        }),
        "ConnectResetRequest" => Ok(Inbound::Reset),
        other => Err(format!(
            "unknown type {:?}",
            other.chars().take(SHOWN_TYPE).collect::<String>()
        )),
    }
}

/// The push subscription of one registry. Its session task starts with
/// the first [`Push::subscribe`] and stops when this is dropped.
pub(super) struct Push {
    shared: Arc<Shared>,
    api: Arc<Api>,
    /// `http://host:grpc_port`.
    target: String,
    timeout: Duration,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// What the session task and the watches share.
struct Shared {
    /// Each watched service and a counter its watches wait on: bumped on
    /// each push for it and after each subscription.
    services: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// A service was added: subscribe it.
    added: Notify,
    /// The first malformed message is logged as a warning, the rest at debug.
    malformed_logged: AtomicBool,
    next_request: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one leaves a map that is still whole.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Push {
    pub(super) fn new(api: Arc<Api>, grpc_port: u16, timeout: Duration) -> Push {
        let host = api
            .address
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|uri| uri.host().map(str::to_owned))
            .unwrap_or_default();
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        Push {
            shared: Arc::new(Shared {
                services: Mutex::new(HashMap::new()),
                added: Notify::new(),
                malformed_logged: AtomicBool::new(false),
                next_request: AtomicU64::new(1),
            }),
            target: format!("http://{host}:{grpc_port}"),
            api,
            timeout,
            task: Mutex::new(None),
        }
    }

    /// Subscribes `service`: what it returns changes on each push for it.
    pub(super) fn subscribe(&self, service: &str) -> watch::Receiver<u64> {
        let changes = lock(&self.shared.services)
            .entry(service.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        self.shared.added.notify_one();
        let mut task = lock(&self.task);
        // Not started yet, or ended by a panic (a bug; counted by the panic
        // hook): start it, so push does not stay off for good.
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            let run = run(
                self.shared.clone(),
                self.api.clone(),
                self.target.clone(),
                self.timeout,
            );
            *task = Some(tokio::spawn(run));
        }
        changes
    }
}

impl Drop for Push {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// Sessions, one after another, until the registry is dropped.
async fn run(shared: Arc<Shared>, api: Arc<Api>, target: String, timeout: Duration) {
    let server = api.address.clone();
    let up = Down(metrics::gauge!(m::PUSH_UP, "kind" => "nacos", "server" => server.clone()));
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut failing = false;
    loop {
        up.0.set(0.0);
        let mut session = Session {
            shared: &shared,
            api: &api,
            timeout,
            server: &server,
        };
        let error = session
            .run(&target, || {
                up.0.set(1.0);
                backoff.reset();
                if std::mem::take(&mut failing) {
                    tracing::info!(server = %server, grpc = %target, "Nacos push subscription back");
                } else {
                    tracing::debug!(server = %server, grpc = %target, "Nacos push subscription up");
                }
            })
            .await;
        up.0.set(0.0);
        if failing {
            tracing::debug!(server = %server, grpc = %target, error = %error, "Nacos push subscription still failing");
        } else {
            tracing::warn!(server = %server, grpc = %target, error = %error, "Nacos push subscription failed; discovery polls until it is back");
            failing = true;
        }
        tokio::time::sleep(backoff.next(error.is_retryable())).await;
    }
}

/// The up gauge, set to 0 when the task ends however it ends (aborted
/// with its registry, or a panic).
struct Down(metrics::Gauge);

impl Drop for Down {
    fn drop(&mut self) {
        self.0.set(0.0);
    }
}

struct Session<'a> {
    shared: &'a Shared,
    api: &'a Api,
    timeout: Duration,
    server: &'a str,
}

type Client = Grpc<Channel>;

fn codec() -> ProstCodec<Payload, Payload> {
    ProstCodec::default()
}

impl Session<'_> {
    /// One connection, until it fails: the reason. `up` is called once
    /// every service watched so far is subscribed.
    async fn run(&mut self, target: &str, up: impl FnOnce()) -> RegistryError {
        match self.serve(target, up).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn serve(
        &mut self,
        target: &str,
        up: impl FnOnce(),
    ) -> Result<std::convert::Infallible, RegistryError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            RegistryError::Unavailable(format!("{what} {target}: {e}"))
        };
        let endpoint = Endpoint::from_shared(target.to_owned())
            .map_err(|e| RegistryError::Rejected(format!("{target}: {e}")))?
            .connect_timeout(self.timeout)
            .tcp_nodelay(true);
        let channel = tokio::time::timeout(self.timeout, endpoint.connect())
            .await
            .map_err(|_| unavailable("connecting to", &"no connection within the timeout"))?
            .map_err(|e| unavailable("connecting to", &super::api::error_chain(&e)))?;
        let mut grpc = Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        self.request(
            &mut grpc,
            "ServerCheckRequest",
            json!({"module": "internal"}),
        )
        .await?;

        let (tx, rx) = mpsc::channel::<Payload>(32);
        let namespace = self.api.namespace.clone().unwrap_or_default();
        let setup = self.payload(
            "ConnectionSetupRequest",
            json!({
                "module": "internal",
                "clientVersion": concat!("squire:", env!("CARGO_PKG_VERSION")),
                "tenant": namespace,
                "labels": {"source": "sdk", "module": "naming"},
            }),
        );
        let setup = setup.await?;
        // The channel is new and has room: this cannot fail.
        let _ = tx.try_send(setup);
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|payload| (payload, rx))
        });
        let open = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            grpc.streaming(
                tonic::Request::new(outbound),
                PathAndQuery::from_static(BI_STREAM),
                codec(),
            )
            .await
        };
        let mut inbound = tokio::time::timeout(self.timeout, open)
            .await
            .map_err(|_| {
                unavailable(
                    "opening the push stream of",
                    &"no answer within the timeout",
                )
            })?
            .map_err(|status| unavailable("opening the push stream of", &status.message()))?
            .into_inner();

        let mut subscribed: HashSet<String> = HashSet::new();
        let mut up = Some(up);
        loop {
            let pending: Vec<(String, watch::Sender<u64>)> = lock(&self.shared.services)
                .iter()
                .filter(|(service, _)| !subscribed.contains(*service))
                .map(|(service, changes)| (service.clone(), changes.clone()))
                .collect();
            for (service, changes) in pending {
                self.subscribe(&mut grpc, &service).await?;
                subscribed.insert(service);
                // List once: it may have changed while we were not subscribed.
                changes.send_modify(|n| *n += 1);
            }
            if let Some(up) = up.take() {
                up();
            }
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(payload)) => self.answer(&payload, &tx).await?,
                    Ok(None) => return Err(RegistryError::Unavailable(format!("{target} closed the push stream"))),
                    Err(status) => return Err(unavailable("push stream of", &status.message())),
                },
                () = self.shared.added.notified() => {}
                () = tokio::time::sleep(KEEP_ALIVE) => {
                    self.request(&mut grpc, "HealthCheckRequest", json!({"module": "internal"})).await?;
                }
            }
        }
    }

    /// Answers one message of the server on the stream.
    async fn answer(
        &self,
        payload: &Payload,
        tx: &mpsc::Sender<Payload>,
    ) -> Result<(), RegistryError> {
        let closed = || RegistryError::Unavailable("the push stream closed".to_owned());
        match parse_inbound(payload) {
            Ok(Inbound::Notify {
                request_id,
                group,
                service,
            }) => {
                if group.is_empty() || group == self.api.group {
                    if let Some(changes) = lock(&self.shared.services).get(&service) {
                        metrics::counter!(m::PUSHES, "kind" => "nacos", "server" => self.server.to_owned(), "service" => service.clone())
                            .increment(1);
                        changes.send_modify(|n| *n += 1);
                    }
                }
                tracing::debug!(server = %self.server, service = %service, group = %group, "Nacos pushed a change");
                let ack = json!({"resultCode": SUCCESS, "errorCode": 0, "message": "", "requestId": request_id});
                tx.send(Payload::new(
                    "NotifySubscriberResponse",
                    &ack,
                    HashMap::new(),
                ))
                .await
                .map_err(|_| closed())?;
                metrics::counter!(m::PUSH_ACKS, "kind" => "nacos", "server" => self.server.to_owned())
                    .increment(1);
            }
            Ok(Inbound::Detection { request_id }) => {
                let answer = json!({"resultCode": SUCCESS, "errorCode": 0, "message": "", "requestId": request_id});
                tx.send(Payload::new(
                    "ClientDetectionResponse",
                    &answer,
                    HashMap::new(),
                ))
                .await
                .map_err(|_| closed())?;
            }
            Ok(Inbound::Reset) => {
                return Err(RegistryError::Unavailable(
                    "the server asked to connect again (ConnectResetRequest)".to_owned(),
                ))
            }
            Err(reason) => {
                metrics::counter!(m::PUSHES_MALFORMED, "kind" => "nacos", "server" => self.server.to_owned())
                    .increment(1);
                if self.shared.malformed_logged.swap(true, Ordering::Relaxed) {
                    tracing::debug!(server = %self.server, reason = %reason, "malformed Nacos push ignored");
                } else {
                    tracing::warn!(server = %self.server, reason = %reason, "malformed Nacos push ignored (further ones are logged at debug)");
                }
            }
        }
        Ok(())
    }

    async fn subscribe(&self, grpc: &mut Client, service: &str) -> Result<(), RegistryError> {
        let namespace = self
            .api
            .namespace
            .clone()
            .unwrap_or_else(|| "public".to_owned());
        self.request(
            grpc,
            "SubscribeServiceRequest",
            json!({
                "module": "naming",
                "namespace": namespace,
                "groupName": self.api.group,
                "serviceName": service,
                "clusters": "",
                "subscribe": true,
            }),
        )
        .await
        .map(drop)
    }

    /// `body` as a `kind` payload, with a request id and (under auth) the
    /// access token.
    async fn payload(&self, kind: &str, mut body: Value) -> Result<Payload, RegistryError> {
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        body["requestId"] = Value::String(id.to_string());
        body["headers"] = json!({});
        let mut headers = HashMap::new();
        if let Some(token) = self.api.token().await? {
            headers.insert("accessToken".to_owned(), token.expose().to_owned());
        }
        Ok(Payload::new(kind, &body, headers))
    }

    /// One unary call: the answer's body, `Err` unless its `resultCode`
    /// is 200. Errors name the type, never the headers (the token).
    async fn request(
        &self,
        grpc: &mut Client,
        kind: &str,
        body: Value,
    ) -> Result<Value, RegistryError> {
        let payload = self.payload(kind, body).await?;
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| RegistryError::Unavailable(format!("{kind}: {e}")))?;
            grpc.unary(
                tonic::Request::new(payload),
                PathAndQuery::from_static(REQUEST),
                codec(),
            )
            .await
            .map_err(|status| RegistryError::Unavailable(format!("{kind}: {}", status.message())))
        };
        let answer = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| {
                RegistryError::Unavailable(format!("{kind}: no answer within {:?}", self.timeout))
            })??
            .into_inner();
        let body: Value = answer
            .body
            .as_ref()
            .and_then(|b| serde_json::from_slice(&b.value).ok())
            .unwrap_or(Value::Null);
        if body["resultCode"].as_i64() == Some(SUCCESS) {
            return Ok(body);
        }
        let code = body["errorCode"].as_i64().unwrap_or_default();
        let message: String = body["message"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        let text = format!("{kind}: error {code} {message}");
        if code == 403 {
            self.api.forget_token().await;
            return Err(RegistryError::Rejected(text));
        }
        Err(RegistryError::Unavailable(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(kind: &str, body: &[u8]) -> Payload {
        Payload {
            metadata: Some(Metadata {
                r#type: kind.to_owned(),
                client_ip: String::new(),
                headers: HashMap::new(),
            }),
            body: Some(Any {
                type_url: String::new(),
                value: body.to_vec(),
            }),
        }
    }

    #[test]
    fn a_notification_names_its_service_and_group() {
        // What r-nacos 0.8.8 sends (`BiStreamManage`, `NotifyNaming`).
        let body = br#"{"module":"naming","requestId":"7","headers":{},"namespace":"public","serviceName":"lobby","groupName":"DEFAULT_GROUP","serviceInfo":{"name":"lobby","groupName":"DEFAULT_GROUP","hosts":[]}}"#;
        assert_eq!(
            parse_inbound(&payload("NotifySubscriberRequest", body)),
            Ok(Inbound::Notify {
                request_id: "7".into(),
                group: "DEFAULT_GROUP".into(),
                service: "lobby".into()
            })
        );
        // A grouped name, a numeric request id, the name only in serviceInfo.
        let body = br#"{"requestId":8,"serviceInfo":{"name":"GAME@@hall"}}"#;
        assert_eq!(
            parse_inbound(&payload("NotifySubscriberRequest", body)),
            Ok(Inbound::Notify {
                request_id: "8".into(),
                group: "GAME".into(),
                service: "hall".into()
            })
        );
        assert_eq!(
            parse_inbound(&payload("ClientDetectionRequest", br#"{"requestId":"9"}"#)),
            Ok(Inbound::Detection {
                request_id: "9".into()
            })
        );
        assert_eq!(
            parse_inbound(&payload("ConnectResetRequest", b"{}")),
            Ok(Inbound::Reset)
        );
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let cases: [(&str, &[u8], &str); 6] = [
            (
                "NotifySubscriberRequest",
                b"\x1f\x8b\x08garbage",
                "not JSON",
            ),
            ("NotifySubscriberRequest", b"[1,2]", "not a JSON object"),
            (
                "NotifySubscriberRequest",
                b"{\"requestId\":\"1\"}",
                "without serviceName",
            ),
            (
                "NotifySubscriberRequest",
                b"{\"serviceName\":\"\"}",
                "without serviceName",
            ),
            ("ClientDetectionRequest", b"\"x\"", "not a JSON object"),
            ("SomethingElse", b"{}", "unknown type \"SomethingElse\""),
        ];
        for (kind, body, reason) in cases {
            let found = parse_inbound(&payload(kind, body)).expect_err(kind);
            assert!(found.contains(reason), "{kind}: {found}");
        }
        assert!(parse_inbound(&Payload::default()).is_err());
        let long = "x".repeat(10_000);
        let found = parse_inbound(&payload(&long, b"{}")).expect_err("unknown");
        assert!(found.len() < 100, "the type is cut: {found}");
    }

    #[test]
    fn payloads_round_trip_through_protobuf() {
        use prost::Message as _;
        let mut headers = HashMap::new();
        headers.insert("accessToken".to_owned(), "t".to_owned());
        let sent = Payload::new("SubscribeServiceRequest", &json!({"a": 1}), headers);
        let read = Payload::decode(sent.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(read, sent);
        assert_eq!(
            read.metadata.expect("metadata").r#type,
            "SubscribeServiceRequest"
        );
    }
}
