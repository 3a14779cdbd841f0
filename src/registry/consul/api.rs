//! The HTTP side of the Consul backend: one client per agent address
//! (plain HTTP or rustls), the request every call makes, and what comes back.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};

use crate::config::ConsulConfig;
pub(super) use crate::registry::http::percent_encode as encode;
use crate::registry::http::{error_chain, HttpClient};
use crate::registry::RegistryError;

/// One Consul agent: the HTTP client and what goes on every request.
pub(super) struct Api {
    /// `Err` when the TLS setup failed (e.g. the CA file went away after
    /// validation): every call then fails with that reason.
    http: Result<HttpClient, String>,
    pub(super) address: String,
    token: Option<HeaderValue>,
    pub(super) datacenter: Option<String>,
    /// The registry timeout: every call, and a blocking query on top of its wait.
    pub(super) timeout: Duration,
    /// How long a blocking query waits for a change.
    pub(super) wait: Duration,
}

/// A Consul answer we read: status, `X-Consul-Index`, body.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) index: Option<u64>,
    pub(super) body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_owned()
    }

    /// The error for an unexpected status. 404 is handled by each caller,
    /// since what it means depends on the endpoint.
    pub(super) fn error(&self, what: &str) -> RegistryError {
        let message = format!("{what}: {} {}", self.status.as_u16(), self.text());
        match self.status {
            StatusCode::BAD_REQUEST
            | StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::METHOD_NOT_ALLOWED => RegistryError::Rejected(message),
            _ => RegistryError::Unavailable(message),
        }
    }
}

impl Api {
    pub(super) fn new(config: &ConsulConfig, timeout: Duration) -> Self {
        let http = http_client(config, timeout);
        if config.tls_skip_verify {
            tracing::warn!(address = %config.address, "registry.tls_skip_verify is set: the Consul agent's certificate is not verified");
        }
        let token = config.token.as_ref().and_then(|t| {
            // Validation allows only visible ASCII, which is always a valid
            // header value; `ok()` keeps this total all the same.
            let mut value = HeaderValue::from_str(t.expose()).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        Api {
            http,
            address: config.address.clone(),
            token,
            datacenter: config.datacenter.clone(),
            timeout,
            wait: config.wait,
        }
    }

    pub(super) async fn call(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, RegistryError> {
        self.call_within(method, path, body, self.timeout).await
    }

    /// One request, answer read whole, all within `timeout`. Errors name the
    /// method and path, never a header.
    pub(super) async fn call_within(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Answer, RegistryError> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| RegistryError::Rejected(e.clone()))?;
        let what = format!("{method} {}", path.split('?').next().unwrap_or(&path));
        let body = body.map(Bytes::from);
        let build = || {
            let mut request = Request::builder()
                .method(method.clone())
                .uri(format!("{}{path}", self.address));
            if let Some(token) = &self.token {
                request = request.header("X-Consul-Token", token.clone());
            }
            if body.is_some() {
                request = request.header(CONTENT_TYPE, "application/json");
            }
            request
                .body(Full::new(body.clone().unwrap_or_default()))
                .map_err(|e| RegistryError::Rejected(format!("{what}: {e}")))
        };
        // Writes are idempotent PUTs: one that failed on a pooled connection
        // the agent had closed (e.g. it restarted) is sent again at once on
        // a new one. A blocking read is not: its failure is what tells the
        // watch to start over from index 0.
        let attempts = if method == Method::PUT { 2 } else { 1 };
        let exchange = async {
            let mut attempt = 1;
            let response = loop {
                match http.request(build()?).await {
                    Ok(response) => break response,
                    Err(e) if attempt < attempts && !e.is_connect() => {
                        tracing::debug!(request = %what, error = %error_chain(&e), "retrying on a new connection");
                        attempt += 1;
                    }
                    Err(e) => {
                        return Err(RegistryError::Unavailable(format!(
                            "{what}: {}",
                            error_chain(&e)
                        )))
                    }
                }
            };
            let status = response.status();
            let index = response
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| RegistryError::Unavailable(format!("{what}: {e}")))?
                .to_bytes();
            Ok(Answer {
                status,
                index,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RegistryError::Unavailable(format!(
                "{what}: no answer within {timeout:?}"
            ))),
        }
    }
}

/// The HTTP client: plain HTTP, or rustls with the configured CA, the
/// system's roots, or (explicitly) no verification.
fn http_client(config: &ConsulConfig, timeout: Duration) -> Result<HttpClient, String> {
    Ok(crate::registry::http::client(tls_config(config)?, timeout))
}

/// The rustls settings of an `https` address (crate::tls: public roots
/// plus `ca`, or no verification when explicitly asked), with the client
/// certificate if one is configured.
fn tls_config(config: &ConsulConfig) -> Result<rustls::ClientConfig, String> {
    let tls = crate::tls::client_config(
        config.ca.as_deref(),
        config.tls_skip_verify,
        config.identity.as_ref(),
    )
    .map_err(|e| e.to_string())?;
    Ok((*tls).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(encode("a b/c:d"), "a%20b%2Fc%3Ad");
    }
}
