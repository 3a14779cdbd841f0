//! `http` / `https`: one request on a fresh connection; the status (and
//! optionally a body substring) decides. Like Consul: an expected status
//! passes (default any 2xx or 3xx), 429 is a warning, anything else fails.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderName, HeaderValue, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::task::AbortOnDropHandle;

use super::probe::{truncate, ProbeResult};
use super::threshold::Outcome;
use crate::config::HttpProbeConfig;
use crate::tls::{self, TlsError};

/// How much of the body is searched for `body_contains`.
const BODY_MAX: usize = 64 * 1024;
/// How much of the body is kept as the check's output.
const SHOWN_MAX: usize = 512;

pub struct HttpProbe {
    config: HttpProbeConfig,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl HttpProbe {
    pub fn new(config: HttpProbeConfig) -> Result<Self, TlsError> {
        let tls = match &config.tls {
            None => None,
            Some(settings) => {
                let client =
                    tls::client_config(settings.ca.as_deref(), settings.skip_verify, None)?;
                let host = settings
                    .server_name
                    .clone()
                    .unwrap_or_else(|| host_of(&config.address));
                let name = ServerName::try_from(host.clone()).map_err(|_| {
                    TlsError::Setup(format!("{host:?} is not a valid TLS server name"))
                })?;
                Some((TlsConnector::from(Arc::clone(&client)), name))
            }
        };
        Ok(HttpProbe { config, tls })
    }

    pub async fn run(&self) -> ProbeResult {
        let address = &self.config.address;
        let tcp = match TcpStream::connect(address).await {
            Ok(tcp) => tcp,
            Err(e) => return ProbeResult::critical(format!("connect {address}: {e}")),
        };
        let result = match &self.tls {
            None => self.exchange(tcp).await,
            Some((connector, name)) => match connector.connect(name.clone(), tcp).await {
                Ok(stream) => self.exchange(stream).await,
                Err(e) => Err(format!("TLS handshake with {address}: {e}")),
            },
        };
        result.unwrap_or_else(ProbeResult::critical)
    }

    async fn exchange<S>(&self, io: S) -> Result<ProbeResult, String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        // Drives the connection; dropped (and so closed) with the probe.
        let _connection = AbortOnDropHandle::new(tokio::spawn(connection));

        let method =
            Method::from_bytes(self.config.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut request = Request::builder()
            .method(method)
            .uri(self.config.path.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let headers = request.headers_mut();
        headers.insert(USER_AGENT, HeaderValue::from_static("squire-health-check"));
        if let Ok(host) = HeaderValue::from_str(&self.config.address) {
            headers.insert(HOST, host);
        }
        for (name, value) in &self.config.headers {
            // Validated with the configuration.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value.expose()),
            ) {
                headers.insert(name, value);
            }
        }

        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        let mut body = Vec::new();
        let mut incoming = response.into_body();
        while body.len() < BODY_MAX {
            match incoming.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        body.extend_from_slice(&data[..data.len().min(BODY_MAX - body.len())]);
                    }
                }
                Some(Err(e)) => return Err(format!("HTTP {status}: reading the body: {e}")),
                None => break,
            }
        }
        let text = String::from_utf8_lossy(&body);
        let mut shown = text.trim().to_owned();
        truncate(&mut shown, SHOWN_MAX);
        let output = format!("HTTP {status}: {shown}");
        let outcome = if self.expected(status) {
            match &self.config.body_contains {
                Some(needle) if !text.contains(needle.as_str()) => {
                    return Ok(ProbeResult::critical(format!(
                        "{output} (body does not contain {needle:?})"
                    )));
                }
                _ => Outcome::Passing,
            }
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            Outcome::Warning
        } else {
            Outcome::Critical
        };
        Ok(ProbeResult::new(outcome, output))
    }

    fn expected(&self, status: StatusCode) -> bool {
        if self.config.expect_status.is_empty() {
            status.is_success() || status.is_redirection()
        } else {
            self.config.expect_status.contains(&status.as_u16())
        }
    }
}

/// The host part of `host:port` (without IPv6 brackets).
fn host_of(address: &str) -> String {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}
