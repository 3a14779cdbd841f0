//! The TCP handler: terminate the client's TLS if the listener has
//! `listen_tls`, read the affinity key if the upstream hashes one, run the
//! attempts (each a connect, and a TLS handshake with `[upstream.tls]`,
//! within `connect_timeout`), then copy bytes both ways until either side
//! is done, or until no byte has moved either way for `idle_timeout`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::attempts::{AttemptMetrics, Attempts, Outcome, RetryPolicy};
use super::listener::set_keepalive;
use super::stream::Stream;
use super::tls::ProxyTls;
use super::{copy, preamble, GaugeGuard, ProxyError};
use crate::balance::{self, now_ms, ActiveGuard, HashKey, Strategy, Upstream};
use crate::config::UpstreamConfig;
use crate::metrics as m;
use crate::time::LogThrottle;

/// Serves the connections of one TCP listener.
pub struct TcpProxy {
    config: UpstreamConfig,
    /// The bound address (the configured one may have port 0).
    listen: SocketAddr,
    upstream: Arc<Upstream>,
    policy: RetryPolicy,
    attempts: AttemptMetrics,
    metrics: TcpMetrics,
    /// One "closing client connection" line per interval, with the count
    /// of those not logged: a dead upstream refuses every client.
    reject_log: LogThrottle,
    tls: ProxyTls,
}

/// How often a listener logs the clients it closes unrouted.
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Metric handles resolved once per listener, not per connection.
struct TcpMetrics {
    active: Gauge,
    bytes_in: Counter,
    bytes_out: Counter,
    rejected: Counter,
    idle_closed: Counter,
}

impl TcpProxy {
    pub fn new(config: UpstreamConfig, listen: SocketAddr, upstream: Arc<Upstream>) -> Self {
        let labels = [
            ("upstream", config.service.clone()),
            ("listen", listen.to_string()),
        ];
        TcpProxy {
            tls: ProxyTls::new(&config, &labels),
            policy: RetryPolicy::of(&config),
            attempts: AttemptMetrics {
                retries: metrics::counter!(m::RETRIES, &labels),
                endpoint_waits: metrics::counter!(m::ENDPOINT_WAITS, &labels),
                connect_failures: metrics::counter!(m::CONNECT_FAILURES, &labels),
                latency: metrics::histogram!(m::CONNECT_SECONDS, &labels),
            },
            metrics: TcpMetrics {
                active: metrics::gauge!(m::TCP_ACTIVE, &labels),
                bytes_in: metrics::counter!(m::BYTES_IN, &labels),
                bytes_out: metrics::counter!(m::BYTES_OUT, &labels),
                rejected: metrics::counter!(m::TCP_REJECTED, &labels),
                idle_closed: metrics::counter!(m::TCP_IDLE_CLOSED, &labels),
            },
            config,
            listen,
            upstream,
            reject_log: LogThrottle::new(REJECT_LOG_INTERVAL),
        }
    }

    /// The counter of accepted connections, for the accept loop.
    pub fn accepted_counter(&self) -> Counter {
        metrics::counter!(m::TCP_ACCEPTED, "upstream" => self.config.service.clone(), "listen" => self.listen.to_string())
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

    pub async fn serve(&self, client: TcpStream, peer: SocketAddr) {
        let service = &self.config.service;
        let Some(mut client) = self.tls.accept(client, peer, service).await else {
            return;
        };
        let routed = match self.affinity(&mut client, peer).await {
            Ok(routed) => routed,
            Err(e) => return self.reject(peer, e),
        };
        let (mut server, _endpoint) = match self.connect(routed.key, routed.pinned.as_deref()).await
        {
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
        let _active = GaugeGuard::new(&self.metrics.active);
        let meters = copy::Meters {
            from_client: &self.metrics.bytes_in,
            from_server: &self.metrics.bytes_out,
            moved: self.config.idle_timeout.map(|_| AtomicU64::new(now_ms())),
        };
        let copy = copy::bidirectional(&mut client, &mut server, &meters);
        let copied = match (self.config.idle_timeout, &meters.moved) {
            (Some(idle), Some(moved)) => until_idle(copy, idle, moved).await,
            _ => Some(copy.await),
        };
        match copied {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(upstream = %service, client = %peer, error = %e, "connection ended with an error");
            }
            None => {
                self.metrics.idle_closed.increment(1);
                tracing::debug!(upstream = %service, client = %peer, "closing idle connection");
            }
        }
    }

    /// Closes a client that cannot be routed (dropping the stream closes it).
    fn reject(&self, peer: SocketAddr, error: ProxyError) {
        let service = &self.config.service;
        metrics::counter!(m::TCP_FAILED, "upstream" => service.clone(), "listen" => self.listen.to_string(), "reason" => error.reason()).increment(1);
        match self.reject_log.due() {
            Some(since_last_log) => {
                tracing::warn!(upstream = %service, client = %peer, error = %error, since_last_log, "closing client connection")
            }
            None => {
                tracing::debug!(upstream = %service, client = %peer, error = %error, "closing client connection")
            }
        }
    }

    /// The affinity key of this connection: the client address, the key
    /// of its `ROUTE` line, or none for strategies that do not hash.
    async fn affinity(&self, client: &mut Stream, peer: SocketAddr) -> Result<Routed, ProxyError> {
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
                let pinned = line.pinned();
                return Ok(Routed {
                    key: match pinned {
                        Some(_) => None,
                        None => line.key.as_deref().map(balance::bytes_key),
                    },
                    pinned,
                    rest: line.rest,
                });
            }
            _ => None,
        };
        Ok(Routed {
            key,
            pinned: None,
            rest: Vec::new(),
        })
    }

    /// Connects to an endpoint the attempts pick, trying another one on
    /// each failure as the upstream allows; a pinned connection tries
    /// exactly its instance, once.
    async fn connect(
        &self,
        key: Option<u64>,
        pinned: Option<&str>,
    ) -> Result<(Stream, ActiveGuard), ProxyError> {
        let timeout = self.config.connect_timeout;
        let mut attempts =
            Attempts::new(&self.upstream, self.policy, key, &self.attempts).pinned(pinned);
        while let Some(attempt) = attempts.next().await {
            let endpoint = attempts.endpoint(&attempt);
            let authority = &endpoint.authority;
            let connected = AtomicBool::new(false);
            let connect = async {
                // The addresses resolved when the snapshot was built: a
                // connect never looks a name up.
                let stream = TcpStream::connect(&endpoint.addrs[..])
                    .await
                    .map_err(|source| ProxyError::connect(authority, source))?;
                connected.store(true, Ordering::Relaxed);
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(endpoint = %authority, error = %e, "cannot set TCP_NODELAY on the upstream side");
                }
                if let Some(idle) = self.config.tcp_keepalive {
                    if let Err(e) = set_keepalive(&stream, idle) {
                        tracing::debug!(endpoint = %authority, error = %e, "cannot set TCP keep-alive on the upstream side");
                    }
                }
                self.tls.dial(stream, endpoint).await
            };
            let outcome = match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(stream)) => Outcome::Served((stream, endpoint.stats.open())),
                Ok(Err(error)) => Outcome::Retry(error),
                Err(_) => {
                    if connected.load(Ordering::Relaxed) {
                        self.tls.dial_timed_out();
                    }
                    Outcome::Retry(ProxyError::ConnectTimeout {
                        endpoint: authority.clone(),
                        after: timeout,
                    })
                }
            };
            if let Some(result) = attempts.report(attempt, outcome) {
                return result;
            }
        }
        attempts.finish()
    }
}

/// The affinity key of a connection and the client bytes read with it.
struct Routed {
    key: Option<u64>,
    /// The instance id of a `ROUTE @<id>` line.
    pinned: Option<String>,
    rest: Vec<u8>,
}

/// Runs `work` until it ends (`Some`) or nothing has moved for `idle`
/// (`None`; dropping the work closes the connection).
async fn until_idle<F: Future>(work: F, idle: Duration, moved: &AtomicU64) -> Option<F::Output> {
    tokio::pin!(work);
    loop {
        let quiet = Duration::from_millis(now_ms().saturating_sub(moved.load(Ordering::Relaxed)));
        if quiet >= idle {
            return None;
        }
        tokio::select! {
            output = &mut work => return Some(output),
            _ = tokio::time::sleep(idle - quiet) => {}
        }
    }
}
