//! Why a client connection or request could not be forwarded, and the one
//! place that says what each failure means: its metric label
//! ([`ProxyError::reason`]) and the HTTP status a client gets for it
//! ([`ProxyError::status`]).

use std::time::Duration;

use hyper::StatusCode;

use super::preamble;

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
    /// The `reason` (TCP) or `kind` (HTTP) label of the failure counters.
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

    /// What an HTTP client is answered, and a one-line body: no route 404,
    /// no healthy endpoint 503, a timeout 504, a failed exchange 502.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no route for this host and path\n"),
            ProxyError::NoHealthyEndpoint { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
            }
            ProxyError::ConnectTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream connect timeout\n")
            }
            ProxyError::RequestTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n")
            }
            // Only TCP listeners read a ROUTE line; listed for completeness.
            ProxyError::PreambleTimeout { .. } | ProxyError::Preamble(_) => {
                (StatusCode::BAD_REQUEST, "bad request\n")
            }
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => {
                (StatusCode::BAD_GATEWAY, "upstream connection failed\n")
            }
        }
    }

    /// Whether the endpoint was never reached: nothing of the request or
    /// connection went out, so another endpoint may always be tried.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. }
        )
    }

    /// The endpoint (`host:port`) the failure happened at, if any.
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            ProxyError::ConnectTimeout { endpoint, .. }
            | ProxyError::Connect { endpoint, .. }
            | ProxyError::RequestTimeout { endpoint }
            | ProxyError::Upstream { endpoint, .. } => Some(endpoint),
            _ => None,
        }
    }
}
