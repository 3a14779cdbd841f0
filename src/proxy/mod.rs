//! Local listeners that forward to discovered instances.
//!
//! Every listener takes the same path:
//!
//! ```text
//! listener.rs   the one accept loop: backlog, limits, error pause, drain
//!   -> handler  tcp.rs | http/: the protocol only
//!   -> Upstream balance::Upstream: filter + balancer + current snapshot
//!   -> attempts attempts.rs: pick -> try -> report -> back off -> retry
//!   -> copy / forward
//! ```
//!
//! [`Proxy`] is one `[[upstream]]` listener: its bound [`Listener`] and its
//! handler. Connections of every listener run on the one
//! [`TaskTracker`](tokio_util::task::TaskTracker) of a [`Drain`], so shutdown
//! can stop the accept loops, wait for open connections up to the drain
//! deadline, then cut the rest with one token.

pub mod attempts;
mod error;
pub mod http;
pub mod listener;
pub mod preamble;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;

use metrics::Gauge;

pub use error::ProxyError;
pub use http::HttpProxy;
pub use listener::{Drain, Listener};
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
        let listener = listener.count_accepted(proxy.accepted_counter());
        Proxy {
            listener,
            handler: Handler::Tcp(Arc::new(proxy)),
        }
    }

    pub fn http(listener: Listener, proxy: HttpProxy) -> Proxy {
        let (max, rejected) = proxy.connection_limit();
        Proxy {
            listener: listener.limit(max, rejected),
            handler: Handler::Http(Arc::new(proxy)),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Accepts until `drain.stop`; open connections run on the drain's
    /// tracker until they end or `drain.cut` fires.
    pub async fn run(self, drain: Drain) {
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
                let stop = drain.stop.clone();
                let pools = proxy.clone().prune_pools(drain.stop.clone());
                let accept = self.listener.run(drain, move |stream, peer| {
                    proxy.clone().serve(stream, peer, stop.clone())
                });
                tokio::join!(accept, pools);
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
