//! The UDP handler: one receive loop on the listener socket, a session per
//! client address, each with its own connected socket to the instance the
//! upstream's strategy picked at the session's first datagram.
//!
//! ```text
//! client --datagram--> listener socket --(session map by address)--> session socket --> instance
//! client <--send_to--- listener socket <--------- reply task <------ session socket <-- instance
//! ```
//!
//! The loop owns the session map (no lock): a new client address opens a
//! session (refused and counted at `max_sessions`), with the affinity key
//! of its first datagram (the client address, or with
//! `hash_key = "prefix:N"` its first N bytes, removed from every datagram
//! when `strip = true`). Each session's reply task ([`session`]) sends the
//! instance's datagrams back to its client, ends the session after
//! `idle_timeout` without a datagram either way, and on an ICMP refusal
//! (`ECONNREFUSED` on the connected socket) reports the failure to the
//! balancer (which ejects an instance that keeps failing) and ends the
//! session: the client's next datagram opens a new one, picked afresh.
//!
//! Datagrams are never queued: a socket that cannot take one now drops it
//! (counted by reason), as the network would. Stopping the listener (a
//! reload that replaces or removes it, shutdown) ends its sessions; the
//! socket goes back to the agent for a new handler.

mod session;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use self::session::{Session, SessionEnd};
use super::attempts::{AttemptMetrics, Attempts, Outcome, RetryPolicy};
use super::{Drain, ProxyError};
use crate::balance::{self, HashKey, Strategy, Upstream};
use crate::config::{UdpUpstreamConfig, UpstreamConfig};
use crate::metrics as m;
use crate::time::LogThrottle;

/// The largest UDP payload (IPv4: 65535 - 8 - 20).
const MAX_DATAGRAM: usize = 65_507;

/// How often a listener logs the datagrams it drops, at most.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A bound UDP listener socket. Shared with the reply tasks of its
/// sessions, which send through it.
pub struct UdpListener {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
}

impl UdpListener {
    /// Binds `addr` (non-blocking, registered with the runtime).
    pub fn bind(addr: SocketAddr) -> io::Result<UdpListener> {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        let local = socket.local_addr()?;
        Ok(UdpListener {
            socket: Arc::new(socket),
            local,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Metric handles resolved once per listener, not per datagram.
struct UdpMetrics {
    active: Gauge,
    created: Counter,
    expired: Counter,
    rejected: Counter,
    datagrams_in: Counter,
    datagrams_out: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    dropped_no_endpoint: Counter,
    dropped_short: Counter,
    dropped_upstream_send: Counter,
    dropped_client_send: Counter,
}

/// Serves the datagrams of one UDP listener.
pub struct UdpProxy {
    config: UpstreamConfig,
    udp: UdpUpstreamConfig,
    upstream: Arc<Upstream>,
    policy: RetryPolicy,
    attempts: AttemptMetrics,
    metrics: Arc<UdpMetrics>,
    /// With `prefix:N`: N.
    prefix: Option<usize>,
    idle: Duration,
    drop_log: LogThrottle,
}

impl UdpProxy {
    pub fn new(
        config: UpstreamConfig,
        udp: UdpUpstreamConfig,
        listen: SocketAddr,
        upstream: Arc<Upstream>,
    ) -> Self {
        let labels = [
            ("upstream", config.service.clone()),
            ("listen", listen.to_string()),
        ];
        let dropped = |reason: &'static str| metrics::counter!(m::UDP_DROPPED, "upstream" => config.service.clone(), "listen" => listen.to_string(), "reason" => reason);
        let metrics = UdpMetrics {
            active: metrics::gauge!(m::UDP_SESSIONS_ACTIVE, &labels),
            created: metrics::counter!(m::UDP_SESSIONS_CREATED, &labels),
            expired: metrics::counter!(m::UDP_SESSIONS_EXPIRED, &labels),
            rejected: metrics::counter!(m::UDP_SESSIONS_REJECTED, &labels),
            datagrams_in: metrics::counter!(m::UDP_DATAGRAMS_IN, &labels),
            datagrams_out: metrics::counter!(m::UDP_DATAGRAMS_OUT, &labels),
            bytes_in: metrics::counter!(m::UDP_BYTES_IN, &labels),
            bytes_out: metrics::counter!(m::UDP_BYTES_OUT, &labels),
            dropped_no_endpoint: dropped("no_endpoint"),
            dropped_short: dropped("short"),
            dropped_upstream_send: dropped("upstream_send"),
            dropped_client_send: dropped("client_send"),
        };
        let prefix = match (config.strategy, &config.hash_key) {
            (Strategy::ConsistentHash, HashKey::Prefix(n)) => Some(*n),
            _ => None,
        };
        UdpProxy {
            // A session never waits in the receive loop: no pause between
            // attempts, no wait for an endpoint (refused in validation).
            policy: RetryPolicy {
                retries: config.retries,
                backoff: Duration::ZERO,
                endpoint_wait: Duration::ZERO,
            },
            attempts: AttemptMetrics {
                retries: metrics::counter!(m::RETRIES, &labels),
                endpoint_waits: metrics::counter!(m::ENDPOINT_WAITS, &labels),
                connect_failures: metrics::counter!(m::CONNECT_FAILURES, &labels),
                latency: metrics::histogram!(m::CONNECT_SECONDS, &labels),
            },
            metrics: Arc::new(metrics),
            prefix,
            // Validation always sets one for udp; 60s is its default.
            idle: config.idle_timeout.unwrap_or(Duration::from_secs(60)),
            udp,
            config,
            upstream,
            drop_log: LogThrottle::new(DROP_LOG_INTERVAL),
        }
    }

    /// Receives until `drain.stop`, then ends every session and returns
    /// the socket, still bound.
    pub async fn run(self, listener: UdpListener, drain: Drain) -> UdpListener {
        let socket = listener.socket.clone();
        let (ended_tx, mut ended) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
        let mut sessions: HashMap<SocketAddr, Arc<Session>> = HashMap::new();
        let mut next_id: u64 = 0;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let errors = LogThrottle::new(DROP_LOG_INTERVAL);
        loop {
            let received = tokio::select! {
                biased;
                _ = drain.stop.cancelled() => break,
                Some((client, id)) = ended.recv() => {
                    if sessions.get(&client).is_some_and(|s| s.id() == id) {
                        sessions.remove(&client);
                    }
                    continue;
                }
                received = socket.recv_from(&mut buf) => received,
            };
            let (len, client) = match received {
                Ok(received) => received,
                Err(error) => {
                    // A connectionless socket has no peer to lose; an
                    // error here is transient (ICMP left over, buffers).
                    if let Some(since_last_log) = errors.due() {
                        tracing::warn!(upstream = %self.config.service, error = %error, since_last_log, "udp receive failed");
                    }
                    continue;
                }
            };
            let datagram = &buf[..len];
            let payload = match (self.prefix, self.udp.strip) {
                (Some(n), _) if len < n => {
                    self.metrics.dropped_short.increment(1);
                    self.dropped(client, "shorter than the hash_key token");
                    continue;
                }
                (Some(n), true) => &datagram[n..],
                _ => datagram,
            };
            let session = match sessions.get(&client) {
                Some(session) if !session.is_over() => session.clone(),
                _ => {
                    sessions.remove(&client);
                    if sessions.len() >= self.udp.max_sessions {
                        self.metrics.rejected.increment(1);
                        self.dropped(client, "max_sessions reached");
                        continue;
                    }
                    let Some(session) = self.open(client, datagram, next_id) else {
                        continue;
                    };
                    next_id += 1;
                    let session = Arc::new(session);
                    sessions.insert(client, session.clone());
                    drain.connections.spawn(session::replies(
                        session.clone(),
                        socket.clone(),
                        SessionEnd {
                            ended: ended_tx.clone(),
                            stop: drain.stop.clone(),
                            cut: drain.turn(),
                        },
                        self.idle,
                        self.upstream.clone(),
                    ));
                    session
                }
            };
            match session.forward(payload) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // The instance refused an earlier datagram: this one
                    // is lost with it, the next opens a new session.
                    session.refused(&self.upstream);
                    sessions.remove(&client);
                }
                Err(_) => {
                    self.metrics.dropped_upstream_send.increment(1);
                }
            }
        }
        // Sessions watch `drain.stop` and end with it.
        drop(sessions);
        listener
    }

    /// Opens a session for `client`: its affinity key from `first`, an
    /// instance the attempts pick, a socket connected to it.
    fn open(&self, client: SocketAddr, first: &[u8], id: u64) -> Option<Session> {
        let key = match (self.config.strategy, &self.config.hash_key) {
            (Strategy::IpHash, _) | (Strategy::ConsistentHash, HashKey::ClientIp) => {
                Some(balance::client_key(client))
            }
            (Strategy::ConsistentHash, HashKey::Prefix(n)) => {
                Some(balance::bytes_key(&first[..*n]))
            }
            _ => None,
        };
        let mut attempts = Attempts::new(&self.upstream, self.policy, key, &self.attempts);
        // With no backoff and no endpoint wait, `next` never sleeps: poll
        // it to completion synchronously.
        while let Some(attempt) = poll_now(attempts.next()).flatten() {
            let endpoint = attempts.endpoint(&attempt);
            let outcome = match session::connect(&endpoint.addrs) {
                Ok(socket) => Outcome::Served((socket, endpoint.stats.open())),
                Err(source) => Outcome::Retry(ProxyError::connect(&endpoint.authority, source)),
            };
            let placed = attempts.placed(&attempt);
            match attempts.report(attempt, outcome) {
                Some(Ok((socket, guard))) => {
                    self.metrics.created.increment(1);
                    return Some(Session::new(
                        id,
                        client,
                        socket,
                        placed,
                        guard,
                        self.metrics.clone(),
                    ));
                }
                Some(Err(error)) => {
                    self.metrics.dropped_no_endpoint.increment(1);
                    self.dropped(client, &error.to_string());
                    return None;
                }
                None => continue,
            }
        }
        let error = attempts.finish().err();
        self.metrics.dropped_no_endpoint.increment(1);
        self.dropped(client, &error.map(|e| e.to_string()).unwrap_or_default());
        None
    }

    /// One log line per interval for dropped datagrams.
    fn dropped(&self, client: SocketAddr, why: &str) {
        match self.drop_log.due() {
            Some(since_last_log) => {
                tracing::warn!(upstream = %self.config.service, %client, reason = why, since_last_log, "dropping udp datagram")
            }
            None => {
                tracing::debug!(upstream = %self.config.service, %client, reason = why, "dropping udp datagram")
            }
        }
    }
}

/// Polls `future` once: its output if it is ready now.
fn poll_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}
