//! The TCP listener: accept, read the affinity key if the upstream hashes
//! one, pick, connect (retrying on other instances with a jittered backoff,
//! and reporting failures so a failing endpoint gets ejected), then copy
//! bytes both ways until either side is done.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{preamble, ProxyError};
use crate::backoff::Backoff;
use crate::balance::{self, now_ms, ActiveGuard, Balancer, HashKey, Strategy};
use crate::config::UpstreamConfig;
use crate::discovery::Pool;
use crate::metrics as m;

pub struct TcpProxy {
    listener: TcpListener,
    upstream: Arc<Upstream>,
}

struct Upstream {
    config: UpstreamConfig,
    /// The bound address (the configured one may have port 0).
    listen: SocketAddr,
    pool: Arc<Pool>,
    metrics: UpstreamMetrics,
}

/// Metric handles resolved once per listener, not per connection.
struct UpstreamMetrics {
    accepted: Counter,
    active: Gauge,
    connect_failures: Counter,
    retries: Counter,
    connect_seconds: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl UpstreamMetrics {
    fn new(config: &UpstreamConfig, listen: SocketAddr) -> Self {
        let labels = [
            ("upstream", config.service.clone()),
            ("listen", listen.to_string()),
        ];
        UpstreamMetrics {
            accepted: metrics::counter!(m::TCP_ACCEPTED, &labels),
            active: metrics::gauge!(m::TCP_ACTIVE, &labels),
            connect_failures: metrics::counter!(m::CONNECT_FAILURES, &labels),
            retries: metrics::counter!(m::RETRIES, &labels),
            connect_seconds: metrics::histogram!(m::CONNECT_SECONDS, &labels),
            bytes_in: metrics::counter!(m::BYTES_IN, &labels),
            bytes_out: metrics::counter!(m::BYTES_OUT, &labels),
        }
    }
}

impl TcpProxy {
    /// Binds the listener now, so a taken port fails startup, not later,
    /// and creates the upstream's [`Pool`] (its metrics are labelled with
    /// the bound address).
    pub async fn bind(config: UpstreamConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let listen = listener.local_addr()?;
        let balancer = Balancer::new(
            config.strategy,
            config.ejection.clone(),
            config.panic_threshold,
        )
        .with_metrics(&config.service, listen);
        let pool = Arc::new(Pool::new(config.filter.clone(), balancer));
        let upstream = Upstream {
            metrics: UpstreamMetrics::new(&config, listen),
            listen,
            config,
            pool,
        };
        Ok(TcpProxy {
            listener,
            upstream: Arc::new(upstream),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn service(&self) -> &str {
        &self.upstream.config.service
    }

    /// The endpoints this listener routes to, for discovery to refresh.
    pub fn pool(&self) -> Arc<Pool> {
        self.upstream.pool.clone()
    }

    /// Accepts until `stop_accepting`, spawning each connection on
    /// `connections`; a connection still open when `cut` fires is closed.
    pub async fn run(
        self,
        stop_accepting: CancellationToken,
        connections: TaskTracker,
        cut: CancellationToken,
    ) {
        let service = &self.upstream.config.service;
        loop {
            let accepted = tokio::select! {
                _ = stop_accepting.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (client, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of
                    // spinning, the condition usually clears.
                    tracing::warn!(upstream = %service, error = %e, "accept failed");
                    tokio::select! {
                        _ = stop_accepting.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            };
            self.upstream.metrics.accepted.increment(1);
            let upstream = self.upstream.clone();
            let cut = cut.clone();
            connections.spawn(async move {
                tokio::select! {
                    _ = cut.cancelled() => {}
                    _ = upstream.serve(client, peer) => {}
                }
            });
        }
        tracing::debug!(upstream = %service, "stopped accepting");
    }
}

impl Upstream {
    async fn serve(&self, mut client: TcpStream, peer: SocketAddr) {
        let service = &self.config.service;
        if let Err(e) = client.set_nodelay(true) {
            tracing::debug!(upstream = %service, error = %e, "cannot set TCP_NODELAY on the client side");
        }
        let routed = match self.affinity(&mut client, peer).await {
            Ok(routed) => routed,
            Err(e) => return self.reject(peer, e),
        };
        let (mut server, _endpoint) = match self.connect(routed.key).await {
            Ok(connected) => connected,
            Err(e) => return self.reject(peer, e),
        };
        if !routed.rest.is_empty() {
            // What the client sent after its ROUTE line belongs upstream.
            if let Err(e) = server.write_all(&routed.rest).await {
                tracing::debug!(upstream = %service, client = %peer, error = %e, "connection ended with an error");
                return;
            }
            self.metrics.bytes_in.increment(routed.rest.len() as u64);
        }
        let _active = ActiveConnection::new(&self.metrics.active);
        let mut client = Metered::new(client, self.metrics.bytes_in.clone());
        let mut server = Metered::new(server, self.metrics.bytes_out.clone());
        // copy_bidirectional forwards a half-close: when one side stops
        // sending, the other side's write half is shut down and bytes keep
        // flowing the other way until that side is done too.
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
            tracing::debug!(upstream = %service, client = %peer, error = %e, "connection ended with an error");
        }
    }

    /// Closes a client that cannot be routed (dropping the stream closes it).
    fn reject(&self, peer: SocketAddr, error: ProxyError) {
        let service = &self.config.service;
        metrics::counter!(m::TCP_FAILED, "upstream" => service.clone(), "listen" => self.listen.to_string(), "reason" => error.reason()).increment(1);
        tracing::warn!(upstream = %service, client = %peer, error = %error, "closing client connection");
    }

    /// The affinity key of this connection: the client address, the key
    /// of its `ROUTE` line, or none for strategies that do not hash.
    async fn affinity(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<Routed, ProxyError> {
        let key = match (self.config.strategy, &self.config.hash_key) {
            (Strategy::IpHash, _) | (Strategy::ConsistentHash, HashKey::ClientIp) => {
                Some(balance::client_key(peer))
            }
            (Strategy::ConsistentHash, HashKey::Preamble) => {
                let timeout = self.config.preamble_timeout;
                let line = tokio::time::timeout(
                    timeout,
                    preamble::read(client, self.config.preamble_max_bytes),
                )
                .await
                .map_err(|_| ProxyError::PreambleTimeout { after: timeout })??;
                return Ok(Routed {
                    key: line.key.as_deref().map(balance::bytes_key),
                    rest: line.rest,
                });
            }
            _ => None,
        };
        Ok(Routed {
            key,
            rest: Vec::new(),
        })
    }

    /// Connects to a picked endpoint, trying another one on each failure, up
    /// to `retries` more times with a jittered, doubling pause between
    /// attempts. Every failure is reported to the balancer, which ejects an
    /// endpoint that keeps failing; the next pick (this retry's included)
    /// already avoids it.
    async fn connect(&self, key: Option<u64>) -> Result<(TcpStream, ActiveGuard), ProxyError> {
        let snapshot = self.pool.snapshot();
        let balancer = self.pool.balancer();
        let service = &self.config.service;
        let timeout = self.config.connect_timeout;
        let base = self.config.retry_backoff;
        let mut backoff = Backoff::new(base, base.saturating_mul(8));
        let mut tried = Vec::with_capacity(self.config.retries as usize + 1);
        let mut last_error = None;
        for attempt in 0..=self.config.retries {
            if attempt > 0 && !base.is_zero() {
                tokio::time::sleep(backoff.next(true)).await;
            }
            let context = balance::Context::new(now_ms())
                .with_key(key)
                .with_tried(&tried);
            let Some(index) = balancer.pick(&snapshot, &context) else {
                break;
            };
            if attempt > 0 {
                self.metrics.retries.increment(1);
            }
            tried.push(index);
            let endpoint = &snapshot.endpoints()[index];
            endpoint.stats.picked();
            let authority = &endpoint.authority;
            let started = Instant::now();
            let error = match tokio::time::timeout(timeout, TcpStream::connect(authority.as_str()))
                .await
            {
                Ok(Ok(stream)) => {
                    let elapsed = started.elapsed();
                    self.metrics.connect_seconds.record(elapsed.as_secs_f64());
                    endpoint.stats.record_success();
                    endpoint.stats.record_latency(elapsed, now_ms());
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(endpoint = %authority, error = %e, "cannot set TCP_NODELAY on the upstream side");
                    }
                    return Ok((stream, endpoint.stats.open()));
                }
                Ok(Err(source)) => ProxyError::Connect {
                    endpoint: authority.clone(),
                    source,
                },
                Err(_) => ProxyError::ConnectTimeout {
                    endpoint: authority.clone(),
                    after: timeout,
                },
            };
            self.metrics.connect_failures.increment(1);
            if let Some(out_for) = balancer.record_failure(&snapshot, index, now_ms()) {
                tracing::warn!(upstream = %service, endpoint = %endpoint.instance.id, ejected_for = ?out_for, error = %error, "ejecting an endpoint after consecutive connect failures");
            } else {
                tracing::debug!(upstream = %service, error = %error, "connect attempt failed");
            }
            last_error = Some(error);
        }
        Err(last_error.unwrap_or_else(|| ProxyError::NoHealthyEndpoint {
            service: service.clone(),
        }))
    }
}

/// The affinity key of a connection and the client bytes read with it.
struct Routed {
    key: Option<u64>,
    rest: Vec<u8>,
}

/// Holds the active-connections gauge up for as long as it lives, also when
/// the connection is cut at the drain deadline.
struct ActiveConnection(Gauge);

impl ActiveConnection {
    fn new(gauge: &Gauge) -> Self {
        gauge.increment(1.0);
        ActiveConnection(gauge.clone())
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A stream that counts the bytes read from it.
struct Metered<S> {
    inner: S,
    read: Counter,
}

impl<S> Metered<S> {
    fn new(inner: S, read: Counter) -> Self {
        Metered { inner, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.increment(n as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
