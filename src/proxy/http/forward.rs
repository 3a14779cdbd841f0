//! One request through the attempts, and its retry policy.
//!
//! A failed connect is always tried on another instance (nothing was
//! sent). After that, the request may have reached the instance, so only a
//! request without a body and with an idempotent method is sent again, on a
//! failed exchange, a timeout, or a 502/503/504 answer, and only while the
//! retry budget allows. Any 5xx counts toward the instance's ejection.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::HeaderValue;
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::body::RequestBody;
use super::headers::{is_upgrade, prepare_request_headers, strip_hop_by_hop, Added, Client};
use super::pool::{ConnectError, InstancePool, Outgoing};
use super::routing::{affinity_key, take_pinned, Route};
use super::{BoxError, HttpProxy, ProxyBody};
use crate::balance::Endpoint;
use crate::proxy::attempts::{Attempts, Outcome};
use crate::proxy::until::until;
use crate::proxy::{Drain, ProxyError};

/// The instance a request last went to, for its counters.
type Reached = Option<Arc<InstancePool>>;

/// One client request on its way out, across attempts.
struct Outbound<'a> {
    parts: Parts,
    /// What squire adds to the client's fields.
    added: Added,
    /// Taken by the attempt that sends it; an empty body is put back for a
    /// retry.
    body: Option<RequestBody>,
    /// Whether the body can be sent again (there is none).
    replayable: bool,
    idempotent: bool,
    /// The client side of a protocol switch, when the request asks for one.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    upgrade: bool,
    /// Where a spliced upgrade runs, so the drain waits for it and cuts it.
    drain: &'a Drain,
}

impl HttpProxy {
    /// Forwards one request, retrying as allowed.
    pub(super) async fn forward(
        &self,
        route: &Route,
        mut parts: Parts,
        body: Incoming,
        client: &Client,
        drain: &Drain,
    ) -> Result<(Response<ProxyBody>, Reached), (ProxyError, Reached)> {
        self.budget.deposit();
        // Taken out before anything else reads the headers: it is squire's,
        // the instance never sees it.
        let pinned = take_pinned(&mut parts.headers);
        let upgrade = is_upgrade(&parts.headers);
        let added = prepare_request_headers(&mut parts.headers, parts.version, &parts.uri, client);
        let mut client_upgrade = None;
        if upgrade {
            let mut placeholder = Request::new(());
            *placeholder.extensions_mut() = std::mem::take(&mut parts.extensions);
            client_upgrade = Some(hyper::upgrade::on(&mut placeholder));
        }
        let key = affinity_key(&self.config, &parts, &added, client.addr);
        let body = if body.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Streamed(body)
        };
        let mut outbound = Outbound {
            idempotent: matches!(
                parts.method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            ),
            replayable: matches!(body, RequestBody::Empty),
            body: Some(body),
            parts,
            added,
            client_upgrade,
            upgrade,
            drain,
        };
        let mut reached: Reached = None;
        let mut attempts = Attempts::new(&route.upstream, self.policy, key, &self.attempts)
            .pinned(pinned.as_deref());
        while let Some(attempt) = attempts.next().await {
            let endpoint = attempts.endpoint(&attempt);
            let instance = route
                .connections
                .instance(&endpoint.authority, &endpoint.addrs);
            reached = Some(instance.clone());
            let outcome = self
                .attempt(
                    &instance,
                    attempts.endpoint(&attempt),
                    attempt.more,
                    &mut outbound,
                )
                .await;
            if let Some(result) = attempts.report(attempt, outcome) {
                return match result {
                    Ok(response) => Ok((response, reached)),
                    Err(error) => Err((error, reached)),
                };
            }
        }
        match attempts.finish() {
            Ok(response) => Ok((response, reached)),
            Err(error) => Err((error, reached)),
        }
    }

    /// One attempt on `endpoint`: connect (or reuse), send, wait for the
    /// response headers.
    async fn attempt(
        &self,
        instance: &Arc<InstancePool>,
        endpoint: &Endpoint,
        more: bool,
        outbound: &mut Outbound<'_>,
    ) -> Outcome<Response<ProxyBody>> {
        let authority = &endpoint.authority;
        let checkout = match instance.checkout().await {
            Ok(checkout) => checkout,
            // Nothing was sent: always safe to try another instance.
            Err(e) => {
                return Outcome::Retry(connect_error(authority, e, self.config.connect_timeout))
            }
        };
        if checkout.reused {
            self.metrics.reused.increment(1);
        } else {
            self.metrics.opened.increment(1);
        }
        let Some(body) = outbound.body.take() else {
            return Outcome::Fail(ProxyError::Upstream {
                endpoint: authority.clone(),
                reason: "the request body was already sent".into(),
            });
        };
        let out = Outgoing {
            parts: &outbound.parts,
            added: &outbound.added,
            authority,
            host: self
                .http
                .rewrite_host
                .then(|| HeaderValue::from_str(authority).ok())
                .flatten(),
        };
        let timeout = self.http.request_timeout;
        if outbound.upgrade {
            return match tokio::time::timeout(timeout, checkout.send_upgrade(out, body)).await {
                Err(_) => Outcome::Fail(ProxyError::RequestTimeout {
                    endpoint: authority.clone(),
                }),
                Ok(Err(e)) => Outcome::Fail(ProxyError::Upstream {
                    endpoint: authority.clone(),
                    reason: e.to_string(),
                }),
                Ok(Ok(response)) => Outcome::Served(splice_upgrade(
                    response,
                    outbound.client_upgrade.take(),
                    authority.clone(),
                    outbound.drain,
                )),
            };
        }
        let in_flight = endpoint.stats.open();
        let sent = tokio::time::timeout(timeout, checkout.send(out, body)).await;
        drop(in_flight);
        let response = match sent {
            Err(_) => {
                let error = ProxyError::RequestTimeout {
                    endpoint: authority.clone(),
                };
                return self.resend_or_fail(error, more, outbound);
            }
            Ok(Err(e)) => {
                let error = ProxyError::Upstream {
                    endpoint: authority.clone(),
                    reason: e.to_string(),
                };
                return self.resend_or_fail(error, more, outbound);
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let mut response = response.map(|b| b.boxed_unsync());
        strip_hop_by_hop(response.headers_mut());
        if !status.is_server_error() {
            return Outcome::Served(response);
        }
        let error = ProxyError::Upstream {
            endpoint: authority.clone(),
            reason: status.to_string(),
        };
        let retryable_status = matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        );
        if !retryable_status {
            return Outcome::Answered(response, error);
        }
        match self.resend_or_fail(error, more, outbound) {
            Outcome::Retry(error) => Outcome::RetryOr(response, error),
            Outcome::Fail(error) => Outcome::Answered(response, error),
            other => other,
        }
    }

    /// After a send the request may have reached the instance: it goes
    /// again only when nothing is lost by that (no body, an idempotent
    /// method), another endpoint is left, and the retry budget allows.
    fn resend_or_fail<T>(
        &self,
        error: ProxyError,
        more: bool,
        outbound: &mut Outbound<'_>,
    ) -> Outcome<T> {
        if outbound.idempotent && outbound.replayable && more && self.budget.withdraw() {
            tracing::debug!(error = %error, "retrying on another instance");
            outbound.body = Some(RequestBody::Empty);
            Outcome::Retry(error)
        } else {
            Outcome::Fail(error)
        }
    }
}

fn connect_error(endpoint: &str, error: ConnectError, after: Duration) -> ProxyError {
    match error {
        ConnectError::Timeout => ProxyError::ConnectTimeout {
            endpoint: endpoint.to_owned(),
            after,
        },
        ConnectError::Io(source) => ProxyError::connect(endpoint, source),
        ConnectError::Handshake(e) => ProxyError::Upstream {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        },
    }
}

/// Hands a `101 Switching Protocols` to the client and, once both sides have
/// switched, copies bytes both ways: on the drain's tracker, so shutdown
/// waits for the stream up to the drain deadline and then closes it with
/// the other stragglers.
fn splice_upgrade(
    mut response: Response<Incoming>,
    client: Option<hyper::upgrade::OnUpgrade>,
    endpoint: String,
    drain: &Drain,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut response);
        if let Some(client) = client {
            let turn = drain.turn();
            drain.connections.spawn(async move {
                let splice = async {
                    match tokio::try_join!(client, upstream) {
                    Ok((client, upstream)) => {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        if let Err(e) =
                            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                        {
                            tracing::debug!(%endpoint, error = %e, "upgraded connection ended with an error");
                        }
                    }
                    Err(e) => tracing::debug!(%endpoint, error = %e, "upgrade failed"),
                    }
                };
                if until(splice, turn).await.is_none() {
                    tracing::debug!(%endpoint, "upgraded connection closed by the drain");
                }
            });
        }
        return response.map(|b| b.map_err(BoxError::from).boxed_unsync());
    }
    let mut response = response.map(|b| b.map_err(BoxError::from).boxed_unsync());
    strip_hop_by_hop(response.headers_mut());
    response
}
