//! Local listeners that forward to discovered instances.
//!
//! Every listener takes the same path:
//!
//! ```text
//! listener.rs   the one accept loop: backlog, limits, error pause, drain
//!   -> handler  tcp.rs | http/: the protocol only (tcp: TLS, tls.rs, as
//!               a wrapper around the sockets, stream.rs)
//!   -> Upstream balance::Upstream: filter + balancer + current snapshot
//!   -> attempts attempts.rs: pick -> try -> report -> back off -> retry
//!   -> copy / forward
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

use std::net::SocketAddr;
use std::sync::Arc;

use metrics::Gauge;

pub use error::ProxyError;
pub use http::HttpProxy;
pub use listener::{Drain, Drained, Listener};
pub use tcp::TcpProxy;

/// One upstream listener, bound, with the handler of its protocol.
pub struct Proxy {
    listener: Listener,
    handler: Handler,
}

enum Handler {
    Tcp(Arc<TcpProxy>),
    Http(Arc<HttpProxy>),
}

impl Proxy {
    pub fn tcp(listener: Listener, proxy: TcpProxy) -> Proxy {
        let (max, rejected) = proxy.connection_limit();
        let listener = listener
            .count_accepted(proxy.accepted_counter())
            .limit(max, rejected)
            .keepalive(proxy.keepalive());
        Proxy {
            listener,
            handler: Handler::Tcp(Arc::new(proxy)),
        }
    }

    pub fn http(listener: Listener, proxy: HttpProxy) -> Proxy {
        let (max, rejected) = proxy.connection_limit();
        Proxy {
            listener: listener.limit(max, rejected).keepalive(proxy.keepalive()),
            handler: Handler::Http(Arc::new(proxy)),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Accepts until `drain.stop`; open connections run on the drain's
    /// tracker until they end or their [`Drain::turn`] comes. Returns the
    /// listener, still bound (see [`Listener::run`]).
    pub async fn run(self, drain: Drain) -> Listener {
        match self.handler {
            Handler::Tcp(proxy) => {
                self.listener
                    .run(drain, move |stream, peer| {
                        let proxy = proxy.clone();
                        async move { proxy.serve(stream, peer).await }
                    })
                    .await
            }
            Handler::Http(proxy) => {
                let pools = proxy.clone().prune_pools(drain.stop.clone());
                let connections = drain.clone();
                let accept = self.listener.run(drain, move |stream, peer| {
                    proxy.clone().serve(stream, peer, connections.clone())
                });
                tokio::join!(accept, pools).0
            }
        }
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
