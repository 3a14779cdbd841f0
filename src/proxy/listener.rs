//! The one accept loop, shared by the TCP and HTTP listeners and the admin
//! API.
//!
//! It owns what every listener needs the same way: binding with a listen
//! backlog, `TCP_NODELAY` on every accepted connection, a connection limit
//! (refused and counted), a pause after an accept error instead of a spin
//! (out of file descriptors clears when connections close; logged once per
//! interval with a count, not once per failed accept), and the drain: stop
//! accepting on [`Drain::stop`], spawn every connection on the drain's
//! tracker so shutdown can wait for them, and close a connection still open
//! when [`Drain::cut`] fires.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the loop pauses after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// At most one accept-error log line per this interval.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The listen backlog when none is configured (HAProxy's and nginx's
/// default; the kernel caps it at `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: u32 = 4096;

/// When to stop accepting, where connections run, and when to cut them.
#[derive(Clone, Default)]
pub struct Drain {
    /// Stop accepting; connections finish what they are doing.
    pub stop: CancellationToken,
    /// Close every connection still open.
    pub cut: CancellationToken,
    pub connections: TaskTracker,
}

/// A bound listening socket and how its accept loop treats connections.
pub struct Listener {
    socket: TcpListener,
    local: SocketAddr,
    /// What the log lines name: `upstream gate`, `admin`.
    name: String,
    accepted: Counter,
    limit: Option<Limit>,
}

struct Limit {
    slots: Arc<Semaphore>,
    max: usize,
    rejected: Counter,
}

impl Listener {
    /// Binds `addr` with `SO_REUSEADDR` (a restart does not wait out
    /// TIME_WAIT) and a listen backlog of `backlog`.
    pub fn bind(addr: SocketAddr, backlog: u32, name: impl Into<String>) -> io::Result<Listener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let socket = socket.listen(backlog)?;
        let local = socket.local_addr()?;
        Ok(Listener {
            socket,
            local,
            name: name.into(),
            accepted: Counter::noop(),
            limit: None,
        })
    }

    /// The bound address (the configured one may have port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Counts every accepted connection on `accepted`.
    pub fn count_accepted(mut self, accepted: Counter) -> Self {
        self.accepted = accepted;
        self
    }

    /// At most `max` connections open at once; one more is closed at once
    /// and counted on `rejected`.
    pub fn limit(mut self, max: usize, rejected: Counter) -> Self {
        self.limit = Some(Limit {
            slots: Arc::new(Semaphore::new(max)),
            max,
            rejected,
        });
        self
    }

    /// Accepts until `drain.stop`, running `serve` for each connection on
    /// the drain's tracker until it returns or `drain.cut` fires.
    pub async fn run<F, Fut>(self, drain: Drain, serve: F)
    where
        F: Fn(TcpStream, SocketAddr) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut errors = AcceptErrors::default();
        loop {
            let accepted = tokio::select! {
                _ = drain.stop.cancelled() => break,
                accepted = self.socket.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    errors.failed(&self.name, &error);
                    tokio::select! {
                        _ = drain.stop.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            };
            self.accepted.increment(1);
            let slot = match &self.limit {
                None => None,
                Some(limit) => match limit.slots.clone().try_acquire_owned() {
                    Ok(slot) => Some(slot),
                    Err(_) => {
                        limit.rejected.increment(1);
                        tracing::warn!(listener = %self.name, listen = %self.local, client = %peer, limit = limit.max, "connection limit reached; refusing");
                        continue; // dropping the stream closes it
                    }
                },
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(listener = %self.name, error = %e, "cannot set TCP_NODELAY");
            }
            let connection = serve(stream, peer);
            let cut = drain.cut.clone();
            drain.connections.spawn(async move {
                let _slot = slot;
                tokio::select! {
                    _ = cut.cancelled() => {}
                    _ = connection => {}
                }
            });
        }
        tracing::debug!(listener = %self.name, "stopped accepting");
    }
}

/// Accept errors since the last log line.
#[derive(Default)]
struct AcceptErrors {
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    fn failed(&mut self, listener: &str, error: &io::Error) {
        if let Some(kind) = super::error::local_kind(error) {
            return super::error::local_error(kind, "accept failed", error);
        }
        let now = Instant::now();
        let due = self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_ERROR_LOG_INTERVAL);
        if due {
            tracing::warn!(%listener, %error, since_last_log = self.unlogged, pause = ?ACCEPT_ERROR_PAUSE, "accept failed; pausing");
            self.logged_at = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
    }
}
