//! The one accept loop, shared by the TCP and HTTP listeners and the admin
//! API.
//!
//! It owns what every listener needs the same way: binding with a listen
//! backlog, `TCP_NODELAY` on every accepted connection, a connection limit
//! (refused and counted), a pause after an accept error instead of a spin
//! (out of file descriptors clears when connections close; logged once per
//! interval with a count, not once per failed accept), TCP keep-alive on
//! accepted sockets, and the drain: stop accepting on [`Drain::stop`], spawn
//! every connection on the drain's tracker so shutdown can wait for them,
//! and close the connections still open at the deadline in staggered
//! batches ([`Drain::cut_spread`]), or all at once when [`Drain::cut`]
//! fires. A stopped loop hands its socket back, so a reload can give it to
//! a new handler without a refused connect.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::until::until;
use crate::time::LogThrottle;

/// How long the loop pauses after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// At most one accept-error log line per this interval.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The shortest gap between two batches of a staggered cut.
const MIN_BATCH_GAP: Duration = Duration::from_millis(50);

/// After a staggered cut's window, how long its last connections may take
/// to close before they are cut at once.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// When to stop accepting, where connections run, and when to cut them.
#[derive(Clone, Default)]
pub struct Drain {
    /// Stop accepting; connections finish what they are doing.
    pub stop: CancellationToken,
    /// Close every connection still open, at once.
    pub cut: CancellationToken,
    pub connections: TaskTracker,
    /// The staggered cut, once [`Drain::cut_spread`] has begun.
    schedule: Arc<Schedule>,
}

struct Schedule {
    plan: watch::Sender<Option<Plan>>,
    /// Handed out in the order connections learn of the plan: which batch
    /// each one is in.
    tickets: AtomicUsize,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            plan: watch::Sender::new(None),
            tickets: AtomicUsize::new(0),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Plan {
    start: Instant,
    step: Duration,
    batches: usize,
    open: usize,
}

impl Plan {
    /// `open` connections in batches at least [`MIN_BATCH_GAP`] apart,
    /// the first at once, the last before `window` ends.
    fn new(start: Instant, open: usize, window: Duration) -> Plan {
        let open = open.max(1);
        let fit = (window.as_millis() / MIN_BATCH_GAP.as_millis()).max(1);
        let batches = usize::try_from(fit).unwrap_or(usize::MAX).min(open);
        Plan {
            start,
            step: window / u32::try_from(batches).unwrap_or(u32::MAX),
            batches,
            open,
        }
    }

    /// When the connection holding `ticket` is closed.
    fn due(&self, ticket: usize) -> Instant {
        let batch = (ticket.saturating_mul(self.batches) / self.open).min(self.batches - 1);
        self.start + self.step * u32::try_from(batch).unwrap_or(u32::MAX)
    }
}

/// What [`Drain::finish`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Open when accepting stopped.
    pub open: usize,
    /// Still open at the deadline, and closed by the staggered cut.
    pub cut: usize,
}

impl Drain {
    /// Resolves when this connection is to be closed: at once on
    /// [`Drain::cut`], or at its batch's time once a staggered cut has
    /// begun. Every connection (and upgraded stream) of the drain races
    /// its work against this.
    pub fn turn(&self) -> impl Future<Output = ()> + Send + 'static {
        let cut = self.cut.clone();
        let schedule = self.schedule.clone();
        async move {
            let mut plan = schedule.plan.subscribe();
            let plan = tokio::select! {
                _ = cut.cancelled() => return,
                plan = plan.wait_for(Option::is_some) => match plan {
                    Ok(plan) => *plan,
                    // The schedule outlives every receiver; never here.
                    Err(_) => None,
                },
            };
            let Some(plan) = plan else {
                return cut.cancelled().await;
            };
            let ticket = schedule.tickets.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = tokio::time::sleep_until(plan.due(ticket)) => {}
            }
        }
    }

    /// Closes the connections still open in batches spread over `window`
    /// (so the clients of one room do not all reconnect in the same
    /// millisecond), and returns how many there were once all are closed.
    /// Any still open `CUT_GRACE` after the window are cut at once.
    pub async fn cut_spread(&self, window: Duration) -> usize {
        self.connections.close();
        let open = self.connections.len();
        if open == 0 {
            return 0;
        }
        let plan = Plan::new(Instant::now(), open, window);
        self.schedule.plan.send_replace(Some(plan));
        let closed = tokio::time::timeout(window + CUT_GRACE, self.connections.wait());
        if closed.await.is_err() {
            self.cut.cancel();
            self.connections.wait().await;
        }
        open
    }

    /// After [`Drain::stop`]: lets the open connections finish for up to
    /// `timeout`, then closes the rest spread over `spread`.
    pub async fn finish(&self, timeout: Duration, spread: Duration) -> Drained {
        self.connections.close();
        let open = self.connections.len();
        if tokio::time::timeout(timeout, self.connections.wait())
            .await
            .is_ok()
        {
            return Drained { open, cut: 0 };
        }
        let cut = self.cut_spread(spread).await;
        Drained { open, cut }
    }
}

/// Turns on TCP keep-alive: the first probe after `idle` without traffic,
/// then one every third of it (at least 1s), as many as the kernel's
/// `tcp_keepalive_probes` (9 on Linux): with `idle = 30s` a dead peer
/// releases its socket after about two minutes.
pub fn set_keepalive<S: std::os::fd::AsFd>(socket: &S, idle: Duration) -> io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 3).max(Duration::from_secs(1)));
    socket2::SockRef::from(socket).set_tcp_keepalive(&keepalive)
}

/// A bound listening socket and how its accept loop treats connections.
pub struct Listener {
    socket: TcpListener,
    local: SocketAddr,
    /// What the log lines name: `upstream gate`, `admin`.
    name: String,
    accepted: Counter,
    limit: Option<Limit>,
    keepalive: Option<Duration>,
}

struct Limit {
    slots: Arc<Semaphore>,
    max: usize,
    rejected: Counter,
    /// One refusal logged per [`ACCEPT_ERROR_LOG_INTERVAL`], with the
    /// count of the others.
    log: LogThrottle,
}

impl Listener {
    /// Binds `addr` with `SO_REUSEADDR` (a restart does not wait out
    /// TIME_WAIT) and a listen backlog of `backlog`. `TCP_NODELAY` is set
    /// on the listening socket: Linux copies it (and keep-alive, see
    /// [`Listener::keepalive`]) into every accepted socket, which saves two
    /// system calls per connection.
    pub fn bind(addr: SocketAddr, backlog: u32, name: impl Into<String>) -> io::Result<Listener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let socket = socket.listen(backlog)?;
        socket2::SockRef::from(&socket).set_nodelay(true)?;
        let local = socket.local_addr()?;
        Ok(Listener {
            socket,
            local,
            name: name.into(),
            accepted: Counter::noop(),
            limit: None,
            keepalive: None,
        })
    }

    /// Renames what the log lines call this listener.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
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
            log: LogThrottle::new(ACCEPT_ERROR_LOG_INTERVAL),
        });
        self
    }

    /// TCP keep-alive on every accepted socket (see [`set_keepalive`]),
    /// set once on the listening socket, which accepted ones inherit;
    /// `None` turns it off (the kernel's default).
    pub fn keepalive(mut self, idle: Option<Duration>) -> Self {
        let socket = socket2::SockRef::from(&self.socket);
        let set = match idle {
            Some(idle) => set_keepalive(&self.socket, idle),
            None => socket.set_keepalive(false),
        };
        if let Err(e) = set {
            tracing::warn!(listener = %self.name, error = %e, "cannot set TCP keep-alive on the listening socket");
        }
        self.keepalive = idle;
        self
    }

    /// Accepts until `drain.stop`, running `serve` for each connection on
    /// the drain's tracker until it returns or its [`Drain::turn`] comes.
    /// Returns the listener, still bound: dropping it refuses new
    /// connections, handing it to a new handler keeps the port open.
    pub async fn run<F, Fut>(self, drain: Drain, serve: F) -> Listener
    where
        F: Fn(TcpStream, SocketAddr) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let errors = LogThrottle::new(ACCEPT_ERROR_LOG_INTERVAL);
        loop {
            let accepted = tokio::select! {
                _ = drain.stop.cancelled() => break,
                accepted = self.socket.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&self.name, &error, &errors);
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
                        if let Some(since_last_log) = limit.log.due() {
                            tracing::warn!(listener = %self.name, listen = %self.local, client = %peer, limit = limit.max, since_last_log, "connection limit reached; refusing");
                        }
                        continue; // dropping the stream closes it
                    }
                },
            };
            // Boxed: a connection's future is kilobytes (an HTTP one holds
            // hyper's whole connection state), and the runtime moves an
            // unboxed one several times on spawn and completion.
            let connection = Box::pin(serve(stream, peer));
            let turn = drain.turn();
            drain.connections.spawn(async move {
                let _slot = slot;
                until(connection, turn).await;
            });
        }
        tracing::debug!(listener = %self.name, "stopped accepting");
        self
    }
}

/// Logs a failed accept: a local error (out of descriptors...) as such,
/// any other at most once per [`ACCEPT_ERROR_LOG_INTERVAL`] per listener.
fn accept_failed(listener: &str, error: &io::Error, throttle: &LogThrottle) {
    if let Some(kind) = super::error::local_kind(error) {
        return super::error::local_error(kind, "accept failed", error);
    }
    if let Some(since_last_log) = throttle.due() {
        tracing::warn!(%listener, %error, since_last_log, pause = ?ACCEPT_ERROR_PAUSE, "accept failed; pausing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keepalive_idle_secs(stream: &TcpStream) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut secs: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the descriptor is open and `secs`/`len` are valid out
        // pointers of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_KEEPIDLE,
                (&mut secs as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        secs
    }

    /// What the accept loop no longer sets per connection, accepted
    /// sockets must have from the listening one.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), 16, "test")
            .unwrap()
            .keepalive(Some(Duration::from_secs(17)));
        let _client = TcpStream::connect(listener.local_addr()).await.unwrap();
        let (accepted, _) = listener.socket.accept().await.unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(keepalive_idle_secs(&accepted), 17);

        // A reload that drops keep-alive turns it off for later connections.
        let listener = listener.keepalive(None);
        let _client = TcpStream::connect(listener.local_addr()).await.unwrap();
        let (accepted, _) = listener.socket.accept().await.unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.nodelay().unwrap());
        assert!(!socket.keepalive().unwrap());
    }

    #[test]
    fn a_cut_plan_spreads_batches_over_the_window() {
        let start = Instant::now();
        let window = Duration::from_secs(1);
        let plan = Plan::new(start, 20, window);
        assert_eq!(plan.batches, 20, "one connection per 50 ms slot");
        let dues: Vec<Duration> = (0..20).map(|t| plan.due(t) - start).collect();
        assert_eq!(dues[0], Duration::ZERO);
        assert!(dues.windows(2).all(|w| w[0] <= w[1]));
        assert!(*dues.last().expect("dues") < window);
        assert!(*dues.last().expect("dues") >= window / 2);

        // Many connections: at most one batch per 50 ms, all within the window.
        let plan = Plan::new(start, 10_000, window);
        assert_eq!(plan.batches, 20);
        assert_eq!(plan.due(0), start);
        assert_eq!(plan.due(499), start);
        assert_eq!(plan.due(500), start + Duration::from_millis(50));
        assert!(plan.due(9_999) < start + window);
        // One that came late still gets a time within the window.
        assert!(plan.due(20_000) < start + window);

        // No window: everything at once.
        let plan = Plan::new(start, 5, Duration::ZERO);
        assert!((0..5).all(|t| plan.due(t) == start));
    }

    #[tokio::test]
    async fn accepted_sockets_get_keepalive() {
        let listener = Listener::bind("127.0.0.1:0".parse().expect("addr"), 16, "test")
            .expect("bind")
            .keepalive(Some(Duration::from_secs(7)));
        let addr = listener.local_addr();
        let drain = Drain::default();
        let (seen, mut options) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(listener.run(drain.clone(), move |stream, _| {
            let socket = socket2::SockRef::from(&stream);
            let _ = seen.send((socket.keepalive().ok(), keepalive_idle(&stream)));
            async {}
        }));
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (on, idle) = options.recv().await.expect("accepted");
        assert_eq!(on, Some(true));
        assert_eq!(idle, Some(Duration::from_secs(7)));
        drain.stop.cancel();
        task.await.expect("loop ends");
    }

    /// TCP_KEEPIDLE of a socket (socket2 reads it only with its "all" feature).
    fn keepalive_idle(stream: &TcpStream) -> Option<Duration> {
        use std::os::fd::AsRawFd;
        let mut seconds: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket, a buffer and its length.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_KEEPIDLE,
                (&mut seconds as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then(|| Duration::from_secs(seconds as u64))
    }

    #[tokio::test(start_paused = true)]
    async fn connections_wait_for_their_turn() {
        let drain = Drain::default();
        let started = Instant::now();
        let closed = Arc::new(std::sync::Mutex::new(Vec::new()));
        for _ in 0..10 {
            let turn = drain.turn();
            let closed = closed.clone();
            drain.connections.spawn(async move {
                turn.await;
                closed.lock().expect("lock").push(started.elapsed());
            });
        }
        tokio::task::yield_now().await;
        assert_eq!(drain.cut_spread(Duration::from_secs(1)).await, 10);
        let closed = closed.lock().expect("lock").clone();
        assert_eq!(closed.len(), 10);
        let first = closed.iter().min().expect("closed");
        let last = closed.iter().max().expect("closed");
        assert!(*last - *first >= Duration::from_millis(800), "{closed:?}");
        assert!(*last < Duration::from_secs(1), "{closed:?}");
    }
}
