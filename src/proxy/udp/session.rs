//! One client's UDP session: the socket connected to its instance, the
//! time of its last datagram either way, and the reply task that sends
//! the instance's datagrams back to the client until the session ends.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{UdpMetrics, MAX_DATAGRAM};
use crate::balance::{now_ms, ActiveGuard, Upstream};
use crate::proxy::attempts::Placed;
use crate::proxy::{GaugeGuard, ProxyError};

thread_local! {
    /// The receive buffer of every reply task on this thread: a task
    /// borrows it only between `readable` and the sends that follow, with
    /// no `.await` in between, so sessions need no buffer of their own.
    static REPLY_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_DATAGRAM].into_boxed_slice());
}

/// A socket connected to the first of `addrs` (the addresses resolved
/// when the snapshot was built), bound to an ephemeral port of the same
/// family. Synchronous: binding and connecting a UDP socket never waits.
pub(super) fn connect(addrs: &[SocketAddr]) -> io::Result<UdpSocket> {
    let target = addrs
        .first()
        .copied()
        .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "no address"))?;
    let local: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

pub(super) struct Session {
    id: u64,
    client: SocketAddr,
    socket: UdpSocket,
    /// When a datagram last went either way, on [`now_ms`]'s clock.
    last: AtomicU64,
    /// The reply task has ended (idle, refused, stopped): the next
    /// datagram from the client opens a new session.
    over: AtomicBool,
    /// The instance's refusal is reported once.
    reported: AtomicBool,
    /// `client` as the socket calls take it, converted once.
    client_addr: socket2::SockAddr,
    placed: Placed,
    /// Counts the session as an open connection of its endpoint
    /// (least_connections) while it lives.
    _active: ActiveGuard,
    metrics: Arc<UdpMetrics>,
}

impl Session {
    pub(super) fn new(
        id: u64,
        client: SocketAddr,
        socket: UdpSocket,
        placed: Placed,
        active: ActiveGuard,
        metrics: Arc<UdpMetrics>,
    ) -> Self {
        Session {
            id,
            client,
            socket,
            last: AtomicU64::new(now_ms()),
            over: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            client_addr: socket2::SockAddr::from(client),
            placed,
            _active: active,
            metrics,
        }
    }

    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Sends one client datagram to the instance, now or never. Straight
    /// to the socket, not through tokio's readiness (`try_send`), which
    /// refuses a new socket until the reactor has seen it writable: a
    /// non-blocking UDP send only fails when the buffer is full.
    pub(super) fn forward(&self, payload: &[u8]) -> io::Result<()> {
        let sent = socket2::SockRef::from(&self.socket).send(payload)?;
        self.last.store(now_ms(), Ordering::Relaxed);
        self.metrics.datagrams_in.increment(1);
        self.metrics.bytes_in.increment(sent as u64);
        Ok(())
    }

    /// The instance refused a datagram (ICMP port unreachable): reports
    /// the failure to the balancer, once, and marks the session over.
    pub(super) fn refused(&self, upstream: &Upstream) {
        self.over.store(true, Ordering::Relaxed);
        if self.reported.swap(true, Ordering::Relaxed) {
            return;
        }
        let endpoint = &self.placed.endpoint().authority;
        let error = ProxyError::Upstream {
            endpoint: endpoint.clone(),
            reason: "refused a datagram (ICMP port unreachable)".to_owned(),
        };
        tracing::debug!(client = %self.client, endpoint = %endpoint, "udp session ended: the instance refused a datagram");
        self.placed.failed(upstream, &error);
    }

    /// Sends every datagram the instance has queued back to the client;
    /// `Err` when the instance refused one.
    fn relay(&self, listener: &UdpSocket) -> io::Result<()> {
        let listener = socket2::SockRef::from(listener);
        REPLY_BUF.with_borrow_mut(|buf| loop {
            let len = match self.socket.try_recv(buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(e),
                // Another error on a connected UDP socket (an ICMP error
                // of another kind) concerns one datagram; go on.
                Err(_) => continue,
            };
            self.last.store(now_ms(), Ordering::Relaxed);
            // Straight to the socket, as in `forward`.
            match listener.send_to(&buf[..len], &self.client_addr) {
                Ok(sent) => {
                    self.metrics.datagrams_out.increment(1);
                    self.metrics.bytes_out.increment(sent as u64);
                }
                Err(_) => self.metrics.dropped_client_send.increment(1),
            }
        })
    }
}

/// How a session learns it is over, and tells the receive loop.
pub(super) struct SessionEnd<C> {
    pub(super) ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    /// The listener stopped.
    pub(super) stop: CancellationToken,
    /// The drain's cut ([`crate::proxy::Drain::turn`]).
    pub(super) cut: C,
}

/// Why a session ended.
enum Ended {
    Idle,
    Refused,
    Stopped,
}

/// The reply task of one session: relays the instance's datagrams to the
/// client until the session is idle for `idle`, the instance refuses a
/// datagram, or the listener stops.
pub(super) async fn replies<C: Future<Output = ()>>(
    session: Arc<Session>,
    listener: Arc<UdpSocket>,
    end: SessionEnd<C>,
    idle: Duration,
    upstream: Arc<Upstream>,
) {
    let _active = GaugeGuard::new(&session.metrics.active);
    let cut = end.cut;
    tokio::pin!(cut);
    let ended = loop {
        let quiet =
            Duration::from_millis(now_ms().saturating_sub(session.last.load(Ordering::Relaxed)));
        if quiet >= idle {
            break Ended::Idle;
        }
        tokio::select! {
            _ = end.stop.cancelled() => break Ended::Stopped,
            () = &mut cut => break Ended::Stopped,
            _ = tokio::time::sleep(idle - quiet) => {}
            readable = session.socket.readable() => {
                if readable.is_err() || session.relay(&listener).is_err() {
                    break Ended::Refused;
                }
            }
        }
    };
    session.over.store(true, Ordering::Relaxed);
    match ended {
        Ended::Idle => session.metrics.expired.increment(1),
        Ended::Refused => session.refused(&upstream),
        Ended::Stopped => {}
    }
    // The loop may be gone already (it stopped); nothing to tell then.
    let _ = end.ended.send((session.client, session.id));
}
