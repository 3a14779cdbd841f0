//! The HTTP listener: HTTP/1.1 (keep-alive) and HTTP/2 cleartext on one port,
//! each request routed to a service and forwarded to an instance picked for
//! that request.
//!
//! The proxy only ever connects to discovered instances: the request's own
//! URI authority and `Host` choose a route among the configured ones, never a
//! destination, so it is not an open proxy. Every failure becomes a response
//! in one place, [`error_response`].

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics::{Counter, Gauge, Histogram};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pool::{ConnPool, ConnectError, RequestBody};
use super::ProxyError;
use crate::backoff::Backoff;
use crate::balance::{self, now_ms, Balancer, HashKey, Strategy};
use crate::config::{HttpUpstreamConfig, RouteConfig, UpstreamConfig};
use crate::discovery::Pool;
use crate::metrics as m;

type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// One way out of the listener: requests it matches go to `service`.
struct Route {
    /// `None` for the upstream's own service, the fallback.
    matcher: Option<RouteConfig>,
    service: String,
    /// The instances of `service` this listener may use, and its balancer.
    pool: Arc<Pool>,
    connections: Arc<ConnPool>,
}

impl Route {
    fn new(
        matcher: Option<RouteConfig>,
        service: String,
        upstream: &UpstreamConfig,
        http: &HttpUpstreamConfig,
        listen: SocketAddr,
    ) -> Self {
        let balancer = Balancer::new(
            upstream.strategy,
            upstream.ejection.clone(),
            upstream.panic_threshold,
        )
        .with_metrics(&service, listen);
        Route {
            matcher,
            pool: Arc::new(Pool::new(upstream.filter.clone(), balancer)),
            service,
            connections: ConnPool::new(
                http.upstream_h2,
                upstream.connect_timeout,
                http.pool_idle_timeout,
                http.pool_max_idle,
            ),
        }
    }
}

pub struct HttpProxy {
    listener: TcpListener,
    upstream: Arc<HttpUpstream>,
}

struct HttpUpstream {
    config: UpstreamConfig,
    http: HttpUpstreamConfig,
    listen: SocketAddr,
    routes: Vec<Route>,
    budget: RetryBudget,
    connection_slots: Arc<Semaphore>,
    metrics: HttpMetrics,
}

struct HttpMetrics {
    active: Gauge,
    duration: Histogram,
    rejected: Counter,
    opened: Counter,
    reused: Counter,
    retries: Counter,
}

impl HttpProxy {
    pub async fn bind(config: UpstreamConfig, http: HttpUpstreamConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let listen = listener.local_addr()?;
        // The configured routes first, the upstream's own service last.
        let mut routes: Vec<Route> = http
            .routes
            .iter()
            .map(|r| Route::new(Some(r.clone()), r.service.clone(), &config, &http, listen))
            .collect();
        routes.push(Route::new(
            None,
            config.service.clone(),
            &config,
            &http,
            listen,
        ));
        let labels = [
            ("upstream", config.service.clone()),
            ("listen", listen.to_string()),
        ];
        let metrics = HttpMetrics {
            active: metrics::gauge!(m::HTTP_ACTIVE, &labels),
            duration: metrics::histogram!(m::HTTP_SECONDS, &labels),
            rejected: metrics::counter!(m::HTTP_REJECTED, &labels),
            opened: metrics::counter!(
                m::HTTP_POOL,
                &[
                    ("upstream", config.service.clone()),
                    ("listen", listen.to_string()),
                    ("event", "opened".to_owned())
                ]
            ),
            reused: metrics::counter!(
                m::HTTP_POOL,
                &[
                    ("upstream", config.service.clone()),
                    ("listen", listen.to_string()),
                    ("event", "reused".to_owned())
                ]
            ),
            retries: metrics::counter!(m::HTTP_RETRIES, &labels),
        };
        let upstream = HttpUpstream {
            budget: RetryBudget::new(http.retry_budget),
            connection_slots: Arc::new(Semaphore::new(http.max_connections)),
            config,
            http,
            listen,
            routes,
            metrics,
        };
        Ok(HttpProxy {
            listener,
            upstream: Arc::new(upstream),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The pool of the upstream's own service.
    pub fn pool(&self) -> Arc<Pool> {
        // `bind` always ends the routes with the upstream's own service.
        self.upstream
            .routes
            .last()
            .map(|r| r.pool.clone())
            .expect("the fallback route")
    }

    /// Every route's service and pool.
    pub fn pools(&self) -> Vec<(String, Arc<Pool>)> {
        self.upstream
            .routes
            .iter()
            .map(|r| (r.service.clone(), r.pool.clone()))
            .collect()
    }

    /// Accepts until `stop_accepting`; open connections finish their
    /// requests (keep-alive ends after the current one) or are cut by `cut`.
    pub async fn run(
        self,
        stop_accepting: CancellationToken,
        connections: TaskTracker,
        cut: CancellationToken,
    ) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.upstream.http.header_read_timeout)
            .max_buf_size(self.upstream.http.max_header_bytes)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(
                u32::try_from(self.upstream.http.max_header_bytes).unwrap_or(u32::MAX),
            );
        let builder = Arc::new(builder);
        let name = &self.upstream.config.service;
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop_accepting.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(upstream = %name, error = %e, "accept failed");
                        tokio::select! {
                            _ = stop_accepting.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        }
                    }
                },
            };
            let Ok(slot) = self.upstream.connection_slots.clone().try_acquire_owned() else {
                self.upstream.metrics.rejected.increment(1);
                tracing::warn!(upstream = %name, listen = %self.upstream.listen, client = %peer, limit = self.upstream.http.max_connections, "connection limit reached; refusing");
                drop(stream);
                continue;
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let upstream = self.upstream.clone();
            let builder = builder.clone();
            let (stop, cut) = (stop_accepting.clone(), cut.clone());
            connections.spawn(async move {
                let _slot = slot;
                upstream
                    .serve_connection(&builder, stream, peer, stop, cut)
                    .await;
            });
        }
    }
}

impl HttpUpstream {
    async fn serve_connection(
        self: Arc<Self>,
        builder: &auto::Builder<TokioExecutor>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
        cut: CancellationToken,
    ) {
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Tracked {
            inner: stream,
            activity: activity.clone(),
        });
        let upstream = self.clone();
        let in_flight = activity.clone();
        let service = service_fn(move |request| {
            let upstream = upstream.clone();
            let in_flight = in_flight.clone();
            async move {
                in_flight.requests.fetch_add(1, Ordering::Relaxed);
                let response = upstream.handle(request, peer).await;
                in_flight.requests.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(connection);
        let idle = self.http.idle_timeout;
        let mut shutting_down = false;
        loop {
            let quiet_for = activity.quiet_for();
            let check_in = idle
                .saturating_sub(quiet_for)
                .max(Duration::from_millis(50));
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
                    }
                    return;
                }
                _ = cut.cancelled() => return,
                _ = stop.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    connection.as_mut().graceful_shutdown();
                }
                _ = tokio::time::sleep(check_in), if !shutting_down => {
                    if activity.requests.load(Ordering::Relaxed) == 0 && activity.quiet_for() >= idle {
                        tracing::debug!(client = %peer, "closing idle client connection");
                        shutting_down = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }

    fn route(&self, request: &Request<Incoming>) -> Option<&Route> {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().host())
            .map(strip_port);
        let path = request.uri().path();
        self.routes
            .iter()
            .find(|route| route.matcher.as_ref().is_none_or(|m| m.matches(host, path)))
    }

    async fn handle(&self, request: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        self.metrics.active.increment(1.0);
        let method_class = method_class(request.method());
        let (response, service, endpoint) = match self.route(&request) {
            None => (
                error_response(&ProxyError::NoRoute),
                "none".to_owned(),
                "none".to_owned(),
            ),
            Some(route) => {
                let service = route.service.clone();
                match self.forward(route, request, client).await {
                    Ok((response, endpoint)) => (response, service, endpoint),
                    Err((error, endpoint)) => {
                        metrics::counter!(m::HTTP_ERRORS, "upstream" => self.config.service.clone(), "service" => service.clone(), "kind" => error.reason()).increment(1);
                        tracing::debug!(upstream = %self.config.service, %service, error = %error, "request failed");
                        (error_response(&error), service, endpoint)
                    }
                }
            }
        };
        self.metrics.active.decrement(1.0);
        self.metrics
            .duration
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(
            m::HTTP_REQUESTS,
            "upstream" => self.config.service.clone(),
            "service" => service,
            "endpoint" => endpoint,
            "method" => method_class,
            "status" => status_class(response.status()),
        )
        .increment(1);
        response
    }

    /// The request's affinity key, when the strategy hashes one.
    fn affinity_key(&self, parts: &hyper::http::request::Parts, client: SocketAddr) -> Option<u64> {
        match (self.config.strategy, &self.config.hash_key) {
            (Strategy::IpHash, _) | (Strategy::ConsistentHash, HashKey::ClientIp) => {
                Some(balance::client_key(client))
            }
            (Strategy::ConsistentHash, HashKey::Header(name)) => parts
                .headers
                .get(name.as_str())
                .map(|v| balance::bytes_key(v.as_bytes())),
            (Strategy::ConsistentHash, HashKey::Cookie(name)) => parts
                .headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| balance::bytes_key(v.as_bytes())),
            (Strategy::ConsistentHash, HashKey::Query(name)) => parts.uri.query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| balance::bytes_key(v.as_bytes()))
            }),
            _ => None,
        }
    }

    /// Forwards one request, retrying as allowed. On failure returns the
    /// error and the last endpoint tried.
    async fn forward(
        &self,
        route: &Route,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<(Response<ProxyBody>, String), (ProxyError, String)> {
        self.budget.deposit();
        let (mut parts, body) = request.into_parts();
        let upgrade = is_upgrade(&parts.headers);
        prepare_request_headers(&mut parts.headers, parts.version, &parts.uri, client);
        if upgrade {
            // The Connection/Upgrade pair is what asks the instance to switch.
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        let mut body = Some(if body.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Streamed(body)
        });
        let replayable = matches!(body, Some(RequestBody::Empty));
        let mut client_upgrade = None;
        if upgrade {
            let mut placeholder = Request::new(());
            *placeholder.extensions_mut() = std::mem::take(&mut parts.extensions);
            client_upgrade = Some(hyper::upgrade::on(&mut placeholder));
        }

        let key = self.affinity_key(&parts, client);
        let snapshot = route.pool.snapshot();
        let balancer = route.pool.balancer();
        let base = self.config.retry_backoff;
        let mut backoff = Backoff::new(base, base.saturating_mul(8));
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<(ProxyError, String)> = None;
        let attempts = self.config.retries + 1;
        while (tried.len() as u32) < attempts {
            if !tried.is_empty() && !base.is_zero() {
                tokio::time::sleep(backoff.next(true)).await;
            }
            let context = balance::Context::new(now_ms())
                .with_key(key)
                .with_tried(&tried);
            let Some(index) = balancer.pick(&snapshot, &context) else {
                break;
            };
            tried.push(index);
            let endpoint = &snapshot.endpoints()[index];
            endpoint.stats.picked();
            let authority = endpoint.authority.clone();
            if tried.len() > 1 {
                self.metrics.retries.increment(1);
            }
            let fail = |error: &ProxyError| {
                if let Some(out_for) = balancer.record_failure(&snapshot, index, now_ms()) {
                    tracing::warn!(upstream = %self.config.service, endpoint = %endpoint.instance.id, ejected_for = ?out_for, error = %error, "ejecting an endpoint after consecutive failures");
                }
            };

            let started = Instant::now();
            let checkout = match route.connections.checkout(&authority).await {
                Ok(checkout) => checkout,
                Err(error) => {
                    let error = connect_error(&authority, error, self.config.connect_timeout);
                    fail(&error);
                    // Nothing was sent: always safe to try another instance.
                    last = Some((error, authority));
                    continue;
                }
            };
            if checkout.reused {
                self.metrics.reused.increment(1);
            } else {
                self.metrics.opened.increment(1);
            }
            let Some(this_body) = body.take() else { break };
            let outbound = build_request(
                &parts,
                this_body,
                &authority,
                route.connections.is_h2(),
                self.http.rewrite_host,
            );
            if upgrade {
                let result = tokio::time::timeout(
                    self.http.request_timeout,
                    checkout.send_upgrade(outbound),
                )
                .await;
                return match result {
                    Err(_) => Err((
                        ProxyError::RequestTimeout {
                            endpoint: authority.clone(),
                        },
                        authority,
                    )),
                    Ok(Err(e)) => Err((
                        ProxyError::Upstream {
                            endpoint: authority.clone(),
                            reason: e.to_string(),
                        },
                        authority,
                    )),
                    Ok(Ok(response)) => Ok((
                        splice_upgrade(response, client_upgrade, authority.clone()),
                        authority,
                    )),
                };
            }
            let in_flight = endpoint.stats.open();
            let sent = tokio::time::timeout(
                self.http.request_timeout,
                checkout.send(&route.connections, outbound),
            )
            .await;
            drop(in_flight);
            let error = match sent {
                Err(_) => ProxyError::RequestTimeout {
                    endpoint: authority.clone(),
                },
                Ok(Err(e)) => ProxyError::Upstream {
                    endpoint: authority.clone(),
                    reason: e.to_string(),
                },
                Ok(Ok(response)) => {
                    let status = response.status();
                    // Time to response headers feeds response_time; a 5xx
                    // counts toward ejection like a failed connect.
                    endpoint.stats.record_latency(started.elapsed(), now_ms());
                    if status.is_server_error() {
                        fail(&ProxyError::Upstream {
                            endpoint: authority.clone(),
                            reason: status.to_string(),
                        });
                    } else {
                        endpoint.stats.record_success();
                    }
                    let retryable_status = matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    );
                    let more = (tried.len() as u32) < attempts && tried.len() < snapshot.len();
                    if retryable_status
                        && idempotent
                        && replayable
                        && more
                        && self.budget.withdraw()
                    {
                        tracing::debug!(endpoint = %authority, %status, "retrying on another instance");
                        body = Some(RequestBody::Empty);
                        continue;
                    }
                    let mut response = response.map(|b| b.boxed_unsync());
                    strip_hop_by_hop(response.headers_mut());
                    return Ok((response, authority));
                }
            };
            fail(&error);
            // The request may have reached the instance: only a request
            // without a body, with an idempotent method, may be sent again.
            let more = (tried.len() as u32) < attempts && tried.len() < snapshot.len();
            if idempotent && replayable && more && self.budget.withdraw() {
                tracing::debug!(endpoint = %authority, error = %error, "retrying on another instance");
                body = Some(RequestBody::Empty);
                last = Some((error, authority));
                continue;
            }
            return Err((error, authority));
        }
        Err(last.unwrap_or_else(|| {
            (
                ProxyError::NoHealthyEndpoint {
                    service: route.service.clone(),
                },
                "none".to_owned(),
            )
        }))
    }
}

fn connect_error(endpoint: &str, error: ConnectError, after: Duration) -> ProxyError {
    match error {
        ConnectError::Timeout => ProxyError::ConnectTimeout {
            endpoint: endpoint.to_owned(),
            after,
        },
        ConnectError::Io(source) => ProxyError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        },
        ConnectError::Handshake(e) => ProxyError::Upstream {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        },
    }
}

/// The one place where a failure becomes a response.
pub fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let (status, text) = match error {
        ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no route for this host and path\n"),
        ProxyError::NoHealthyEndpoint { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
        }
        ProxyError::ConnectTimeout { .. } => {
            (StatusCode::GATEWAY_TIMEOUT, "upstream connect timeout\n")
        }
        ProxyError::RequestTimeout { .. } => {
            (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n")
        }
        // Only TCP listeners read a ROUTE line; listed for completeness.
        ProxyError::PreambleTimeout { .. } | ProxyError::Preamble(_) => {
            (StatusCode::BAD_REQUEST, "bad request\n")
        }
        ProxyError::Connect { .. } | ProxyError::Upstream { .. } => {
            (StatusCode::BAD_GATEWAY, "upstream connection failed\n")
        }
    };
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the client named in
/// `Connection` apply to one connection only.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

fn prepare_request_headers(
    headers: &mut HeaderMap,
    version: Version,
    uri: &Uri,
    client: SocketAddr,
) {
    let upgrade = headers
        .get(header::UPGRADE)
        .cloned()
        .filter(|_| is_upgrade(headers));
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol);
    }
    // HTTP/2 carries the host in the URI; the instance sees it as Host.
    if version == Version::HTTP_2 && !headers.contains_key(header::HOST) {
        if let Some(host) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, host);
        }
    }
    let forwarded_for = HeaderName::from_static("x-forwarded-for");
    let chain: Vec<String> = headers
        .get_all(&forwarded_for)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let ip = client.ip().to_string();
    let value = if chain.is_empty() {
        ip
    } else {
        format!("{}, {ip}", chain.join(", "))
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(forwarded_for, value);
    }
    let proto = HeaderName::from_static("x-forwarded-proto");
    if !headers.contains_key(&proto) {
        headers.insert(proto, HeaderValue::from_static("http"));
    }
}

fn build_request(
    parts: &hyper::http::request::Parts,
    body: RequestBody,
    authority: &str,
    h2: bool,
    rewrite_host: bool,
) -> Request<RequestBody> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.headers_mut() = parts.headers.clone();
    if rewrite_host {
        if let Ok(host) = HeaderValue::from_str(authority) {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    if h2 {
        // HTTP/2 wants an absolute URI; :authority mirrors the Host the
        // instance should see. The connection itself goes to `authority`.
        let host = request
            .headers_mut()
            .remove(header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_owned))
            .unwrap_or_else(|| authority.to_owned());
        *request.version_mut() = Version::HTTP_2;
        *request.uri_mut() = format!("http://{host}{path}")
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
    } else {
        *request.version_mut() = Version::HTTP_11;
        *request.uri_mut() = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
    request
}

/// Hands a `101 Switching Protocols` to the client and, once both sides have
/// switched, copies bytes both ways.
fn splice_upgrade(
    mut response: Response<Incoming>,
    client: Option<hyper::upgrade::OnUpgrade>,
    endpoint: String,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut response);
        if let Some(client) = client {
            tokio::spawn(async move {
                match tokio::try_join!(client, upstream) {
                    Ok((client, upstream)) => {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        if let Err(e) =
                            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                        {
                            tracing::debug!(%endpoint, error = %e, "upgraded connection ended with an error");
                        }
                    }
                    Err(e) => tracing::debug!(%endpoint, error = %e, "upgrade failed"),
                }
            });
        }
        return response.map(|b| b.boxed_unsync());
    }
    let mut response = response.map(|b| b.boxed_unsync());
    strip_hop_by_hop(response.headers_mut());
    response
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map_or(host, |h| h.trim_start_matches('['));
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn method_class(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Retries allowed as a share of requests, with a small reserve so a
/// quiet listener can still retry: each request deposits `ratio`, each
/// retry withdraws one. Kept in thousandths in one atomic.
struct RetryBudget {
    deposit: i64,
    balance: AtomicU64,
}

const BUDGET_UNIT: i64 = 1000;
const BUDGET_RESERVE: i64 = 10 * BUDGET_UNIT;
const BUDGET_CAP: i64 = 100 * BUDGET_UNIT;

impl RetryBudget {
    fn new(ratio: f64) -> Self {
        RetryBudget {
            deposit: (ratio * BUDGET_UNIT as f64) as i64,
            balance: AtomicU64::new(BUDGET_RESERVE as u64),
        }
    }

    fn deposit(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b as i64 + self.deposit).min(BUDGET_CAP) as u64)
            }); // the closure never returns None, so this cannot fail
    }

    fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b as i64 >= BUDGET_UNIT).then(|| b - BUDGET_UNIT as u64)
            })
            .is_ok()
    }
}

/// When a client connection last moved a byte, and its requests in flight.
#[derive(Default)]
struct Activity {
    last: AtomicU64,
    requests: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// A client stream that notes its activity for the idle timeout.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if polled.is_ready() {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if polled.is_ready() {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-session-hop"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-session-hop", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-game", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-game"], "kept");
    }

    #[test]
    fn forwarded_for_extends_the_client_chain() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.7, 10.0.0.1"),
        );
        let uri: Uri = "/".parse().expect("uri");
        prepare_request_headers(
            &mut headers,
            Version::HTTP_11,
            &uri,
            "127.0.0.1:5000".parse().expect("addr"),
        );
        assert_eq!(
            headers["x-forwarded-for"],
            "203.0.113.7, 10.0.0.1, 127.0.0.1"
        );
        assert_eq!(headers["x-forwarded-proto"], "http");
    }

    #[test]
    fn the_retry_budget_is_a_share_of_requests() {
        let budget = RetryBudget::new(0.2);
        let mut granted = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                granted += 1;
            }
        }
        // 10 in reserve, then one per five requests.
        assert!((200..=215).contains(&granted), "{granted}");
    }

    #[test]
    fn routes_match_host_without_port_and_path_prefix() {
        let route = RouteConfig {
            host: Some("shop.game.local".into()),
            path_prefix: "/api".into(),
            service: "shop".into(),
        };
        assert!(route.matches(Some(strip_port("SHOP.game.local:8080")), "/api/items"));
        assert!(!route.matches(Some("chat.game.local"), "/api/items"));
        assert!(!route.matches(Some("shop.game.local"), "/static"));
        assert!(!route.matches(None, "/api"));
    }
}
