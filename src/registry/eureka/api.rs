//! The HTTP side of the Eureka backend: one client for the server's
//! service URL, JSON both ways, every call bounded by the registry timeout.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};

pub(super) use crate::registry::http::percent_encode as segment;
use crate::registry::http::{error_chain, HttpClient};
use crate::registry::RegistryError;

pub(super) struct Api {
    http: Result<HttpClient, String>,
    /// The service URL, e.g. `http://eureka:8761/eureka`, without a
    /// trailing slash; operations are under `{url}/apps`.
    pub url: String,
    pub timeout: Duration,
}

/// A status and body Eureka answered.
pub(super) struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The error for a status the caller did not expect.
    pub fn error(&self, what: &str) -> RegistryError {
        let text = String::from_utf8_lossy(&self.body);
        let message = format!("{what}: {} {}", self.status.as_u16(), text.trim());
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                RegistryError::Rejected(message)
            }
            _ => RegistryError::Unavailable(message),
        }
    }
}

impl Api {
    pub fn new(url: &str, timeout: Duration) -> Api {
        let http = crate::tls::client_config(None, false, None)
            .map(|tls| crate::registry::http::client((*tls).clone(), timeout))
            .map_err(|e| e.to_string());
        Api {
            http,
            url: url.trim_end_matches('/').to_owned(),
            timeout,
        }
    }

    /// `method {url}{path}` with a JSON body, answer read whole.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, RegistryError> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| RegistryError::Rejected(e.clone()))?;
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .header(ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body.map(Bytes::from).unwrap_or_default()))
            .map_err(|e| RegistryError::Rejected(format!("{what}: {e}")))?;
        let exchange = async {
            let response = http
                .request(request)
                .await
                .map_err(|e| RegistryError::Unavailable(format!("{what}: {}", error_chain(&e))))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| RegistryError::Unavailable(format!("{what}: {e}")))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RegistryError::Unavailable(format!(
                "{what}: no answer within {:?}",
                self.timeout
            ))),
        }
    }
}
