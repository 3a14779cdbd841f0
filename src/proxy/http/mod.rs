//! The HTTP handler: HTTP/1.1 (keep-alive) and HTTP/2 cleartext on one
//! port, each request routed to a service and forwarded to an instance
//! picked for that request.
//!
//! # Layout
//!
//! - `routing`: which route (service) a request takes, its affinity key.
//! - `forward`: one request through the attempts, with its retry policy;
//!   WebSocket and other upgrades.
//! - `headers`: hop-by-hop headers, `X-Forwarded-*`.
//! - `budget`: the retry budget, a share of requests.
//! - [`pool`]: connections to the instances, per route and instance.
//! - `body`: the request body going out, the response body coming back.
//! - `h1`: HTTP/1.1 to an instance, in the request's own task.
//! - `counters`: request counters resolved once per endpoint.
//! - `activity`: what the idle timeout of a client connection watches.
//! - `sniff`: HTTP/1.1 or HTTP/2 (prior knowledge), from the first bytes.
//!
//! Every failure becomes a response in one place, [`error_response`], by
//! [`ProxyError::status`].

mod activity;
mod body;
mod budget;
mod counters;
mod forward;
mod h1;
mod headers;
pub mod pool;
mod routing;
mod sniff;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::{Counter, Histogram};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::activity::{Activity, Tracked};
use self::budget::RetryBudget;
use self::counters::RequestCounters;
use self::headers::Client;
use self::pool::{ConnPool, PoolSettings};
use self::routing::{Route, Routes};
use self::sniff::{sniff, Protocol};
use super::attempts::{AttemptMetrics, RetryPolicy};
use super::until::until;
use super::{Drain, GaugeGuard, ProxyError};
use crate::balance::Upstream;
use crate::config::{HttpUpstreamConfig, RouteConfig, UpstreamConfig};
use crate::metrics as m;

/// What a response body may fail with: hyper's own errors, or squire's
/// HTTP/1.1 client's ([`h1::Error`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Validation always sets an http listener's idle timeout; this is only
/// the fallback of the type.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves the connections of one HTTP listener.
pub struct HttpProxy {
    config: UpstreamConfig,
    http: HttpUpstreamConfig,
    routes: Routes,
    budget: RetryBudget,
    policy: RetryPolicy,
    attempts: AttemptMetrics,
    metrics: HttpMetrics,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

struct HttpMetrics {
    active: metrics::Gauge,
    duration: Histogram,
    opened: Counter,
    reused: Counter,
    rejected: Counter,
    /// Requests no route matched.
    unrouted: RequestCounters,
}

impl HttpProxy {
    /// `own` is the upstream of the listener's service; `routed` the
    /// upstream of each configured route, in `http.routes` order.
    pub fn new(
        config: UpstreamConfig,
        http: HttpUpstreamConfig,
        listen: SocketAddr,
        own: Arc<Upstream>,
        routed: Vec<Arc<Upstream>>,
    ) -> Self {
        let settings = PoolSettings {
            h2: http.upstream_h2,
            connect_timeout: config.connect_timeout,
            idle_timeout: http.pool_idle_timeout,
            max_idle: http.pool_max_idle,
        };
        let route = |matcher: Option<RouteConfig>, upstream: Arc<Upstream>| Route {
            matcher,
            connections: ConnPool::new(settings, &config.service, upstream.service()),
            unrouted: RequestCounters::new(&config.service, upstream.service(), "none"),
            upstream,
        };
        // The configured routes first, the listener's own service last.
        let mut routes: Vec<Route> = http
            .routes
            .iter()
            .cloned()
            .zip(routed)
            .map(|(matcher, upstream)| route(Some(matcher), upstream))
            .collect();
        routes.push(route(None, own));
        let labels = [
            ("upstream", config.service.clone()),
            ("listen", listen.to_string()),
        ];
        let pool_event = |event: &'static str| metrics::counter!(m::HTTP_POOL, "upstream" => config.service.clone(), "listen" => listen.to_string(), "event" => event);
        let metrics = HttpMetrics {
            active: metrics::gauge!(m::HTTP_ACTIVE, &labels),
            duration: metrics::histogram!(m::HTTP_SECONDS, &labels),
            opened: pool_event("opened"),
            reused: pool_event("reused"),
            rejected: metrics::counter!(m::HTTP_REJECTED, &labels),
            unrouted: RequestCounters::new(&config.service, "none", "none"),
        };
        let attempts = AttemptMetrics {
            retries: metrics::counter!(m::HTTP_RETRIES, &labels),
            endpoint_waits: metrics::counter!(m::ENDPOINT_WAITS, &labels),
            connect_failures: metrics::counter!(m::CONNECT_FAILURES, &labels),
            // Request latency is `squire_http_request_duration_seconds`.
            latency: Histogram::noop(),
        };
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(http.header_read_timeout)
            .max_buf_size(http.max_header_bytes)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(http.max_header_bytes).unwrap_or(u32::MAX));
        HttpProxy {
            budget: RetryBudget::new(http.retry_budget),
            policy: RetryPolicy::of(&config),
            config,
            http,
            routes: Routes::new(routes),
            attempts,
            metrics,
            http1,
            http2,
        }
    }

    /// The connection limit and the counter of refused connections, for
    /// the accept loop.
    pub fn connection_limit(&self) -> (usize, Counter) {
        (self.config.max_connections, self.metrics.rejected.clone())
    }

    /// TCP keep-alive of the client sockets.
    pub fn keepalive(&self) -> Option<Duration> {
        self.config.tcp_keepalive
    }

    /// Serves one client connection until it ends: keep-alive ends after
    /// the current request once `drain.stop` fires, and a connection with
    /// no request in flight and no bytes moving for `idle_timeout` is
    /// closed. An upgraded (WebSocket) stream runs on the drain's tracker.
    /// The first bytes (within `header_read_timeout`) tell HTTP/2 prior
    /// knowledge from HTTP/1.1.
    pub async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, drain: Drain) {
        let stop = drain.stop.clone();
        let activity = Arc::new(Activity::default());
        let stream = Tracked {
            inner: stream,
            activity: activity.clone(),
        };
        let first_bytes = tokio::time::timeout(self.http.header_read_timeout, sniff(stream));
        let Some(sniffed) = until(first_bytes, stop.cancelled()).await else {
            return;
        };
        let (protocol, stream) = match sniffed {
            Ok(Ok(Some(sniffed))) => sniffed,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, error = %e, "client connection ended before a request");
                return;
            }
            Err(_) => {
                tracing::debug!(client = %peer, "no request within header_read_timeout");
                return;
            }
        };
        let io = TokioIo::new(stream);
        let proxy = self.clone();
        let drain = Arc::new(drain);
        let client = Arc::new(Client::new(peer));
        let requests = activity.clone();
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            let drain = drain.clone();
            let client = client.clone();
            let in_flight = requests.request();
            async move {
                let response = proxy.handle(request, &client, &drain).await;
                drop(in_flight);
                Ok::<_, Infallible>(response)
            }
        });
        match protocol {
            Protocol::Http1 => {
                let connection = self.http1.serve_connection(io, service).with_upgrades();
                self.drive(pin!(connection), &activity, &stop, peer).await;
            }
            Protocol::Http2 => {
                let connection = self.http2.serve_connection(io, service);
                self.drive(pin!(connection), &activity, &stop, peer).await;
            }
        }
    }

    /// Runs a client connection to its end, shutting it down gracefully
    /// on `stop` or once it is idle.
    async fn drive<C: Graceful>(
        &self,
        mut connection: Pin<&mut C>,
        activity: &Activity,
        stop: &CancellationToken,
        peer: SocketAddr,
    ) {
        let idle = self.config.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let stop_or_idle = async {
            loop {
                let check_in = idle
                    .saturating_sub(activity.quiet_for())
                    .max(Duration::from_millis(50));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(check_in) => if activity.is_idle(idle) {
                        tracing::debug!(client = %peer, "closing idle client connection");
                        return;
                    },
                }
            }
        };
        let result = match until(connection.as_mut(), stop_or_idle).await {
            Some(result) => result,
            None => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
        }
    }

    /// Until `stop`: whenever a route's upstream changes, lets go of the
    /// pooled connections to instances that left it.
    pub async fn prune_pools(self: Arc<Self>, stop: CancellationToken) {
        let stop = &stop;
        let prune = self.routes.iter().map(|route| async move {
            let mut changes = route.upstream.changes();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                let snapshot = route.upstream.snapshot();
                route.connections.retain(|authority, addrs| {
                    snapshot
                        .endpoints()
                        .iter()
                        .any(|e| e.authority == authority && *e.addrs == *addrs)
                });
            }
        });
        futures_util::future::join_all(prune).await;
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        client: &Client,
        drain: &Drain,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        // Held until the response headers are back, also when the client
        // goes away and the request is dropped half way.
        let _active = GaugeGuard::new(&self.metrics.active);
        let method = request.method().clone();
        let (parts, body) = request.into_parts();
        let (response, counters) = match self.routes.find(&parts) {
            None => (error_response(&ProxyError::NoRoute), None),
            Some(route) => match self.forward(route, parts, body, client, drain).await {
                Ok((response, instance)) => (response, Some((route, instance))),
                Err((error, instance)) => {
                    metrics::counter!(m::HTTP_ERRORS, "upstream" => self.config.service.clone(), "service" => route.upstream.service().to_owned(), "kind" => error.reason()).increment(1);
                    tracing::debug!(upstream = %self.config.service, service = %route.upstream.service(), error = %error, "request failed");
                    (error_response(&error), Some((route, instance)))
                }
            },
        };
        self.metrics
            .duration
            .record(started.elapsed().as_secs_f64());
        let status = response.status();
        match &counters {
            None => self.metrics.unrouted.count(&method, status),
            Some((_, Some(instance))) => instance.requests.count(&method, status),
            Some((route, None)) => route.unrouted.count(&method, status),
        }
        response
    }
}

/// The one place where a failure becomes a response.
pub fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let (status, text) = error.status();
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
        .headers_mut()
        .insert(REASON_HEADER, HeaderValue::from_static(error.reason()));
    response
}

/// A served client connection, HTTP/1.1 or HTTP/2: it runs to its end,
/// and may be asked to finish what is in flight and close.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, TokioExecutor>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

/// The header of squire's own error responses that names the failure (the
/// `kind` label of `squire_http_errors_total`).
pub const REASON_HEADER: &str = "x-squire-reason";
