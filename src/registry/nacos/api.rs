//! The HTTP side of the Nacos backend: one client per server address (plain
//! HTTP or rustls with the system's roots), the access token of Nacos auth,
//! and one Open API request with its answer.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, StatusCode};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::{NacosConfig, Secret};
use crate::registry::RegistryError;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A token is renewed once this share of its `tokenTtl` has passed.
const TOKEN_RENEW_SHARE: f64 = 0.8;

/// One Nacos server: the HTTP client and what goes on every request.
pub(super) struct Api {
    /// `Err` when the TLS setup failed: every call then fails with that
    /// reason.
    http: Result<HttpClient, String>,
    pub(super) address: String,
    pub(super) namespace: Option<String>,
    pub(super) group: String,
    credentials: Option<(String, Secret)>,
    /// The access token of the last login and when to renew it.
    token: tokio::sync::Mutex<Option<(Secret, Instant)>>,
    /// The registry timeout: every call.
    timeout: Duration,
}

/// A Nacos answer: status and body.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) body: Bytes,
}

impl Answer {
    pub(super) fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        // A whole HTML error page says nothing a log line needs.
        text.chars().take(200).collect()
    }

    /// The error for an unexpected status. What a 404 or 500 means depends
    /// on the endpoint; each caller handles those it knows first.
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginAnswer {
    access_token: String,
    #[serde(default)]
    token_ttl: Option<u64>,
}

impl Api {
    pub(super) fn new(config: &NacosConfig, timeout: Duration) -> Self {
        Api {
            http: http_client(timeout),
            address: config.address.clone(),
            namespace: config.namespace.clone(),
            group: config.group.clone(),
            credentials: config.credentials.clone(),
            token: tokio::sync::Mutex::new(None),
            timeout,
        }
    }

    /// `method path` with `params` (and `namespaceId`, and `accessToken`
    /// under auth) in the query. A 403 under auth logs in again and
    /// retries once: the token may have expired or the server restarted.
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<Answer, RegistryError> {
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            if let Some(namespace) = &self.namespace {
                query.append_pair("namespaceId", namespace);
            }
            for (key, value) in params {
                query.append_pair(key, value);
            }
            query.finish()
        };
        let mut relogged = false;
        loop {
            let token = self.token().await?;
            let mut full = query.clone();
            if let Some(token) = &token {
                let pair = form_urlencoded::Serializer::new(String::new())
                    .append_pair("accessToken", token.expose())
                    .finish();
                if !full.is_empty() {
                    full.push('&');
                }
                full.push_str(&pair);
            }
            let uri = format!("{}{path}?{full}", self.address);
            let answer = self
                .exchange(method.clone(), path, uri, None, self.timeout)
                .await?;
            if answer.status == StatusCode::FORBIDDEN && token.is_some() && !relogged {
                tracing::debug!(request = %format!("{method} {path}"), "Nacos refused the access token; logging in again");
                *self.token.lock().await = None;
                relogged = true;
                continue;
            }
            return Ok(answer);
        }
    }

    /// Drops the access token, so the next call logs in again (the server
    /// refused it).
    pub(super) async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    /// The current access token, logging in first when there is none or
    /// it is due for renewal; `None` without credentials. The push
    /// subscription sends it in its gRPC requests' headers.
    pub(super) async fn token(&self) -> Result<Option<Secret>, RegistryError> {
        let Some((username, password)) = &self.credentials else {
            return Ok(None);
        };
        let mut token = self.token.lock().await;
        if let Some((value, renew_at)) = token.as_ref() {
            if Instant::now() < *renew_at {
                return Ok(Some(value.clone()));
            }
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("username", username)
            .append_pair("password", password.expose())
            .finish();
        let path = "/nacos/v1/auth/login";
        let answer = self
            .exchange(
                Method::POST,
                path,
                format!("{}{path}", self.address),
                Some(body.into_bytes()),
                self.timeout,
            )
            .await?;
        if answer.status != StatusCode::OK {
            return Err(answer.error("logging in to Nacos"));
        }
        let login: LoginAnswer = serde_json::from_slice(&answer.body).map_err(|e| {
            RegistryError::Unavailable(format!("Nacos login answer without accessToken: {e}"))
        })?;
        let ttl = Duration::from_secs(login.token_ttl.unwrap_or(18_000).max(1));
        let value = Secret::new(login.access_token);
        *token = Some((
            value.clone(),
            Instant::now() + ttl.mul_f64(TOKEN_RENEW_SHARE),
        ));
        Ok(Some(value))
    }

    /// One request, answer read whole, all within `timeout`. Errors name
    /// the method and path, never the query (it holds the token) or the
    /// body (the password).
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        uri: String,
        form: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Answer, RegistryError> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| RegistryError::Rejected(e.clone()))?;
        let what = format!("{method} {path}");
        let body = form.map(Bytes::from);
        let build = || {
            let mut request = Request::builder().method(method.clone()).uri(&uri);
            if body.is_some() {
                request = request.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
            }
            request
                .body(Full::new(body.clone().unwrap_or_default()))
                .map_err(|_| RegistryError::Rejected(format!("{what}: not a valid request")))
        };
        // Every call squire makes is idempotent (register is an upsert): one
        // that failed on a pooled connection the server had closed (e.g. it
        // restarted) is sent again at once on a new one.
        let exchange = async {
            let mut attempt = 1;
            let response = loop {
                match http.request(build()?).await {
                    Ok(response) => break response,
                    Err(e) if attempt < 2 && !e.is_connect() => {
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
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| RegistryError::Unavailable(format!("{what}: {e}")))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RegistryError::Unavailable(format!(
                "{what}: no answer within {timeout:?}"
            ))),
        }
    }
}

pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The HTTP client: plain HTTP, or rustls with the public roots.
fn http_client(timeout: Duration) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    let tls = crate::tls::client_config(None, false, None).map_err(|e| e.to_string())?;
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector))
}
