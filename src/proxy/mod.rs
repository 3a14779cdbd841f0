//! Local listeners that forward to discovered instances.
//!
//! Every listener takes the same path:
//!
//! ```text
//! listener.rs   the one accept loop: backlog, limits, error pause, drain
//!   -> handler  tcp.rs | http/: the protocol only (tcp: TLS, tls.rs, as
//!               a wrapper around the sockets, stream.rs)
//! udp/          the one receive loop of a UDP listener and its sessions,
//!               on the same Upstream, attempts and drain
//!   -> Upstream balance::Upstream: filter + balancer + current snapshot
//!   -> attempts attempts.rs: pick -> try -> report -> back off -> retry
//!   -> copy / forward
//! until.rs     a connection raced against what ends it (drain, idle)
//! ```
//!
//! [`Proxy`] is one `[[upstream]]` listener: its bound [`Listener`] and its
//! handler. Connections of a listener (and the streams its HTTP upgrades
//! splice) run on the [`TaskTracker`](tokio_util::task::TaskTracker) of its
//! [`Drain`], so shutdown, or a reload that removes the listener, can stop
//! its accept loop, wait for open connections up to the drain deadline,
//! then close the rest in staggered batches.

pub mod attempts;
mod copy;
mod error;
pub mod http;
pub mod listener;
pub mod preamble;
mod stream;
pub mod tcp;
mod tls;
pub mod udp;
mod until;

use std::net::SocketAddr;
use std::sync::Arc;

use metrics::Gauge;

pub use error::ProxyError;
pub use http::HttpProxy;
pub use listener::{Drain, Drained, Listener};
pub use tcp::TcpProxy;
pub use udp::{UdpListener, UdpProxy};

/// One upstream listener, bound, with the handler of its protocol.
pub struct Proxy {
    listener: Bound,
    handler: Handler,
}

enum Handler {
    Tcp(Arc<TcpProxy>),
    Http(Arc<HttpProxy>),
    Udp(Box<UdpProxy>),
}

/// The bound socket of an upstream listener: a TCP listener (tcp, http)
/// or a UDP socket. A stopped handler hands it back for the next one.
pub enum Bound {
    Tcp(Listener),
    Udp(UdpListener),
}

impl Bound {
    /// The bound address (the configured one may have port 0).
    pub fn local_addr(&self) -> SocketAddr {
        match self {
            Bound::Tcp(listener) => listener.local_addr(),
            Bound::Udp(socket) => socket.local_addr(),
        }
    }

    pub fn is_udp(&self) -> bool {
        matches!(self, Bound::Udp(_))
    }
}

impl Proxy {
    pub fn tcp(listener: Listener, proxy: TcpProxy) -> Proxy {
        let (max, rejected) = proxy.connection_limit();
        let listener = listener
            .count_accepted(proxy.accepted_counter())
            .limit(max, rejected)
            .keepalive(proxy.keepalive());
        Proxy {
            listener: Bound::Tcp(listener),
            handler: Handler::Tcp(Arc::new(proxy)),
        }
    }

    pub fn udp(socket: UdpListener, proxy: UdpProxy) -> Proxy {
        Proxy {
            listener: Bound::Udp(socket),
            handler: Handler::Udp(Box::new(proxy)),
        }
    }

    pub fn http(listener: Listener, proxy: HttpProxy) -> Proxy {
        let (max, rejected) = proxy.connection_limit();
        Proxy {
            listener: Bound::Tcp(listener.limit(max, rejected).keepalive(proxy.keepalive())),
            handler: Handler::Http(Arc::new(proxy)),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Accepts until `drain.stop`; open connections run on the drain's
    /// tracker until they end or their [`Drain::turn`] comes. Returns the
    /// socket, still bound (see [`Listener::run`]). A UDP listener's
    /// sessions end when it stops.
    pub async fn run(self, drain: Drain) -> Bound {
        let listener = match (self.listener, self.handler) {
            (Bound::Udp(socket), Handler::Udp(proxy)) => {
                return Bound::Udp(proxy.run(socket, drain).await)
            }
            (Bound::Tcp(listener), handler) => (listener, handler),
            // The constructors pair each handler with its socket.
            (bound, _) => return bound,
        };
        Bound::Tcp(match listener {
            (listener, Handler::Tcp(proxy)) => {
                listener
                    .run(drain, move |stream, peer| {
                        let proxy = proxy.clone();
                        async move { proxy.serve(stream, peer).await }
                    })
                    .await
            }
            (listener, Handler::Http(proxy)) => {
                let pools = proxy.clone().prune_pools(drain.stop.clone());
                let connections = drain.clone();
                let accept = listener.run(drain, move |stream, peer| {
                    proxy.clone().serve(stream, peer, connections.clone())
                });
                tokio::join!(accept, pools).0
            }
            (listener, Handler::Udp(_)) => listener,
        })
    }
}

/// Holds a gauge up by one for as long as it lives: a connection or
/// request that is cut or dropped half way still brings it back down.
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: &Gauge) -> Self {
        gauge.increment(1.0);
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
