//! TLS on a TCP listener: terminating a client's (`[upstream.listen_tls]`)
//! and dialing the instances over TLS (`[upstream.tls]`), each a wrapper
//! that turns a connected socket into a [`Stream`].
//!
//! Both handshakes are bounded in time: a client's by `handshake_timeout`,
//! an instance's within the `connect_timeout` of its attempt. A failed one
//! is counted (`squire_tls_handshake_failures_total{side}`); a client's is
//! logged at most once per [`HANDSHAKE_LOG_INTERVAL`] per listener, since
//! scanners and misconfigured peers can fail by the thousand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::stream::Stream;
use super::ProxyError;
use crate::balance::Endpoint;
use crate::config::{DialTls, UpstreamConfig};
use crate::metrics as m;
use crate::time::LogThrottle;

/// At most one log line per listener for failed client handshakes.
pub const HANDSHAKE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The TLS sides of one TCP listener.
pub struct ProxyTls {
    accept: Option<Accept>,
    dial: Option<Dial>,
}

struct Accept {
    acceptor: TlsAcceptor,
    timeout: Duration,
    failures: Counter,
    log: LogThrottle,
}

struct Dial {
    connector: TlsConnector,
    config: DialTls,
    failures: Counter,
}

impl ProxyTls {
    /// The listener's TLS as configured, with its metric `labels`.
    pub fn new(config: &UpstreamConfig, labels: &[(&'static str, String)]) -> ProxyTls {
        let failures = |side: &'static str| {
            let mut labels = labels.to_vec();
            labels.push(("side", side.to_owned()));
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, &labels)
        };
        ProxyTls {
            accept: config.listen_tls.as_ref().map(|tls| Accept {
                acceptor: TlsAcceptor::from(Arc::clone(&tls.server.0)),
                timeout: tls.handshake_timeout,
                failures: failures("accept"),
                log: LogThrottle::new(HANDSHAKE_LOG_INTERVAL),
            }),
            dial: config.tls.as_ref().map(|tls| Dial {
                connector: TlsConnector::from(Arc::clone(&tls.client.0)),
                config: tls.clone(),
                failures: failures("dial"),
            }),
        }
    }

    /// The client connection as the handler reads it: plain, or with its
    /// TLS terminated. `None`: the handshake failed or timed out (counted,
    /// logged with throttling); the connection is closed.
    pub async fn accept(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        service: &str,
    ) -> Option<Stream> {
        let Some(accept) = &self.accept else {
            return Some(Stream::Plain(client));
        };
        let error = match tokio::time::timeout(accept.timeout, accept.acceptor.accept(client)).await
        {
            Ok(Ok(stream)) => return Some(Stream::Accepted(Box::new(stream))),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no handshake within {:?}", accept.timeout),
        };
        accept.failures.increment(1);
        if let Some(since_last_log) = accept.log.due() {
            tracing::warn!(upstream = %service, client = %peer, error = %error, since_last_log, "TLS handshake with a client failed");
        }
        None
    }

    /// The instance connection: `server` as it is, or after a TLS
    /// handshake with the name [`ProxyTls::server_name`] gives. The caller
    /// bounds it in time.
    pub async fn dial(&self, server: TcpStream, endpoint: &Endpoint) -> Result<Stream, ProxyError> {
        let Some(dial) = &self.dial else {
            return Ok(Stream::Plain(server));
        };
        let fail = |reason: String| {
            dial.failures.increment(1);
            ProxyError::Tls {
                endpoint: endpoint.authority.clone(),
                reason,
            }
        };
        let name = server_name(&dial.config, endpoint).map_err(fail)?;
        match dial.connector.connect(name, server).await {
            Ok(stream) => Ok(Stream::Dialed(Box::new(stream))),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// Counts a dial handshake that did not finish within the attempt's
    /// connect timeout.
    pub fn dial_timed_out(&self) {
        if let Some(dial) = &self.dial {
            dial.failures.increment(1);
        }
    }
}

/// The name an instance's certificate must carry: its value of the
/// `server_name_metadata` key if it has one, else `server_name`, else the
/// host it registered.
fn server_name(config: &DialTls, endpoint: &Endpoint) -> Result<ServerName<'static>, String> {
    let instance = &endpoint.instance;
    let name = config
        .server_name_metadata
        .as_ref()
        .and_then(|key| instance.metadata.get(key))
        .or(config.server_name.as_ref())
        .unwrap_or(&instance.host);
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned())
        .map_err(|_| format!("{name:?} is not a valid TLS server name"))
}
