//! Local listeners that forward to discovered instances.
//!
//! Each `[[upstream]]` gets a listener on its localhost address. Connections
//! are spawned on one [`TaskTracker`] shared by all listeners, so shutdown can
//! stop the accept loops, wait for open connections up to the drain deadline,
//! then cut the rest with one token.

pub mod preamble;
pub mod tcp;

use std::time::Duration;

pub use tcp::TcpProxy;

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
            ProxyError::PreambleTimeout { .. } => "preamble_timeout",
            ProxyError::Preamble(_) => "bad_preamble",
        }
    }
}
