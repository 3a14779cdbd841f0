//! Local listeners that forward to discovered instances.
//!
//! Each `[[upstream]]` gets a listener on its localhost address: [`tcp`]
//! forwards connections, [`http`] forwards requests (over the connections
//! kept by [`pool`]). Connections
//! are spawned on one [`TaskTracker`] shared by all listeners, so shutdown can
//! stop the accept loops, wait for open connections up to the drain deadline,
//! then cut the rest with one token.

pub mod http;
pub mod pool;
pub mod preamble;
pub mod tcp;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use http::HttpProxy;
pub use tcp::TcpProxy;

use crate::config::{Protocol, UpstreamConfig};
use crate::discovery::Pool;

/// One bound upstream listener, of either protocol.
pub enum Listener {
    Tcp(TcpProxy),
    Http(HttpProxy),
}

impl Listener {
    /// Binds the listener `config` describes.
    pub async fn bind(config: &UpstreamConfig) -> io::Result<Listener> {
        Ok(match &config.protocol {
            Protocol::Tcp => Listener::Tcp(TcpProxy::bind(config.clone()).await?),
            Protocol::Http(http) => {
                Listener::Http(HttpProxy::bind(config.clone(), (**http).clone()).await?)
            }
        })
    }

    /// The pool of the upstream's own service (shown in `/v1/services`).
    pub fn pool(&self) -> Arc<Pool> {
        match self {
            Listener::Tcp(proxy) => proxy.pool(),
            Listener::Http(proxy) => proxy.pool(),
        }
    }

    /// Every pool the listener routes to, with its service, for discovery
    /// to keep current.
    pub fn pools(&self) -> Vec<(String, Arc<Pool>)> {
        match self {
            Listener::Tcp(proxy) => vec![(proxy.service().to_owned(), proxy.pool())],
            Listener::Http(proxy) => proxy.pools(),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Tcp(proxy) => proxy.local_addr(),
            Listener::Http(proxy) => proxy.local_addr(),
        }
    }

    /// Accepts until `stop_accepting`; connections run on `connections` and
    /// are closed when `cut` fires.
    pub async fn run(
        self,
        stop_accepting: CancellationToken,
        connections: TaskTracker,
        cut: CancellationToken,
    ) {
        match self {
            Listener::Tcp(proxy) => proxy.run(stop_accepting, connections, cut).await,
            Listener::Http(proxy) => proxy.run(stop_accepting, connections, cut).await,
        }
    }
}

/// Why a client connection could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no healthy endpoint for {service}")]
    NoHealthyEndpoint { service: String },
    #[error("connect to {endpoint} timed out after {after:?}")]
    ConnectTimeout { endpoint: String, after: Duration },
    #[error("connect to {endpoint} failed: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("no route for the request's host and path")]
    NoRoute,
    #[error("{endpoint} did not answer in time")]
    RequestTimeout { endpoint: String },
    #[error("exchange with {endpoint} failed: {reason}")]
    Upstream { endpoint: String, reason: String },
    #[error("no ROUTE line within {after:?}")]
    PreambleTimeout { after: Duration },
    #[error("bad ROUTE line: {0}")]
    Preamble(#[from] preamble::PreambleError),
}

impl ProxyError {
    /// The `reason` label of the failed-connection counter.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            ProxyError::ConnectTimeout { .. } => "connect_timeout",
            ProxyError::Connect { .. } => "connect_error",
            ProxyError::NoRoute => "no_route",
            ProxyError::RequestTimeout { .. } => "request_timeout",
            ProxyError::Upstream { .. } => "upstream_error",
            ProxyError::PreambleTimeout { .. } => "preamble_timeout",
            ProxyError::Preamble(_) => "bad_preamble",
        }
    }
}
