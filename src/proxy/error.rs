//! Why a client connection or request could not be forwarded, and the one
//! place that says what each failure means: its metric label
//! ([`ProxyError::reason`]) and the HTTP status a client gets for it
//! ([`ProxyError::status`]); and which failures are squire's own
//! (`local_kind`), never held against an endpoint.

use std::time::Duration;

use hyper::StatusCode;

use super::preamble;
use crate::balance::PinRefusal;
use crate::time::LogThrottle;

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
    #[error("TLS handshake with {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
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
    /// A pinned connection or request named an instance the upstream's
    /// discovery does not know.
    #[error("pinned instance {id:?} is not an instance of {service}")]
    PinnedUnknown { service: String, id: String },
    /// A pinned connection or request named an instance that takes no new
    /// traffic now.
    #[error("pinned instance {id:?} of {service} is unavailable: {why}")]
    PinnedUnavailable {
        service: String,
        id: String,
        why: &'static str,
    },
    /// squire's own resources ran out (file descriptors, buffers, local
    /// ports): no endpoint is to blame, and another one would fail alike.
    #[error("cannot connect to {endpoint}: squire is out of {kind}: {source}")]
    Local {
        endpoint: String,
        kind: &'static str,
        source: std::io::Error,
    },
}

impl ProxyError {
    /// The `reason` (TCP) or `kind` (HTTP) label of the failure counters.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            ProxyError::ConnectTimeout { .. } => "connect_timeout",
            ProxyError::Connect { .. } => "connect_error",
            ProxyError::Tls { .. } => "tls_error",
            ProxyError::NoRoute => "no_route",
            ProxyError::RequestTimeout { .. } => "request_timeout",
            ProxyError::Upstream { .. } => "upstream_error",
            ProxyError::PreambleTimeout { .. } => "preamble_timeout",
            ProxyError::Preamble(_) => "bad_preamble",
            ProxyError::Local { .. } => "local_error",
            ProxyError::PinnedUnknown { .. } => "pinned_unknown",
            ProxyError::PinnedUnavailable { .. } => "pinned_unavailable",
        }
    }

    /// The refusal of a pinned pick of `id` on `service`.
    pub fn pinned(service: &str, id: &str, refusal: PinRefusal) -> ProxyError {
        let (service, id) = (service.to_owned(), id.to_owned());
        match refusal {
            PinRefusal::Unknown => ProxyError::PinnedUnknown { service, id },
            PinRefusal::Unavailable(why) => ProxyError::PinnedUnavailable { service, id, why },
        }
    }

    /// What an HTTP client is answered, and a one-line body: no route 404,
    /// no healthy endpoint 503, a timeout 504, a failed exchange 502; a
    /// pinned instance that is unknown 404, one that is unavailable 503
    /// (each response also says [`reason`](ProxyError::reason) in
    /// `X-Squire-Reason`, so a client tells squire's 404 from its
    /// server's).
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
            ProxyError::Connect { .. } | ProxyError::Tls { .. } | ProxyError::Upstream { .. } => {
                (StatusCode::BAD_GATEWAY, "upstream connection failed\n")
            }
            ProxyError::Local { .. } => (StatusCode::SERVICE_UNAVAILABLE, "proxy overloaded\n"),
            ProxyError::PinnedUnknown { .. } => {
                (StatusCode::NOT_FOUND, "pinned instance unknown\n")
            }
            ProxyError::PinnedUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "pinned instance unavailable\n",
            ),
        }
    }

    /// Whether the endpoint was never reached: nothing of the request or
    /// connection went out, so another endpoint may always be tried.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } | ProxyError::Tls { .. }
        )
    }

    /// A failed connect to `endpoint`: [`ProxyError::Local`] when the cause
    /// is squire's own (see `local_kind`), else [`ProxyError::Connect`].
    pub fn connect(endpoint: &str, source: std::io::Error) -> ProxyError {
        let endpoint = endpoint.to_owned();
        match local_kind(&source) {
            Some(kind) => ProxyError::Local {
                endpoint,
                kind,
                source,
            },
            None => ProxyError::Connect { endpoint, source },
        }
    }

    /// The endpoint (`host:port`) the failure happened at, if any.
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            ProxyError::ConnectTimeout { endpoint, .. }
            | ProxyError::Connect { endpoint, .. }
            | ProxyError::Tls { endpoint, .. }
            | ProxyError::RequestTimeout { endpoint }
            | ProxyError::Upstream { endpoint, .. }
            | ProxyError::Local { endpoint, .. } => Some(endpoint),
            _ => None,
        }
    }
}

/// Which of squire's own resources an I/O error says ran out, if it is
/// one of those: out of file descriptors (EMFILE, ENFILE), of socket
/// buffers or memory (ENOBUFS, ENOMEM), of local ports (EADDRNOTAVAIL).
/// Such an error says nothing about the peer.
pub fn local_kind(error: &std::io::Error) -> Option<&'static str> {
    match error.raw_os_error()? {
        libc::EMFILE | libc::ENFILE => Some("file_descriptors"),
        libc::ENOBUFS | libc::ENOMEM => Some("memory"),
        libc::EADDRNOTAVAIL => Some("local_ports"),
        _ => None,
    }
}

/// Counts a local error (`squire_local_errors_total{kind}`) and logs it at
/// most once per [`LOCAL_ERROR_LOG_INTERVAL`] per kind, with how many were
/// not logged: an exhausted process must not also flood its log.
pub fn local_error(kind: &'static str, what: &str, error: &dyn std::fmt::Display) {
    metrics::counter!(crate::metrics::LOCAL_ERRORS, "kind" => kind).increment(1);
    let slot = match kind {
        "file_descriptors" => 0,
        "memory" => 1,
        "local_ports" => 2,
        _ => 3,
    };
    if let Some(since_last_log) = LOCAL_ERROR_LOG[slot].due() {
        tracing::warn!(kind, %error, since_last_log, "{what}: squire is out of resources");
    }
}

/// At most one log line per kind of local error in this interval.
pub const LOCAL_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One per kind.
static LOCAL_ERROR_LOG: [LogThrottle; 4] = [
    LogThrottle::new(LOCAL_ERROR_LOG_INTERVAL),
    LogThrottle::new(LOCAL_ERROR_LOG_INTERVAL),
    LogThrottle::new(LOCAL_ERROR_LOG_INTERVAL),
    LogThrottle::new(LOCAL_ERROR_LOG_INTERVAL),
];
