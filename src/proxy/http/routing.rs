//! Which service a request goes to, and its affinity key.
//!
//! The request's own URI authority and `Host` choose a route among the
//! configured ones, never a destination: the proxy only ever connects to
//! discovered instances of the routes' services, so it is not an open proxy.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header;
use hyper::http::request::Parts;

use super::counters::RequestCounters;
use super::headers::Added;
use super::pool::ConnPool;
use crate::balance::{self, HashKey, Strategy, Upstream};
use crate::config::{RouteConfig, UpstreamConfig};

/// One way out of the listener: requests it matches go to its upstream.
pub struct Route {
    /// `None` for the listener's own service, the fallback.
    pub matcher: Option<RouteConfig>,
    pub upstream: Arc<Upstream>,
    /// Connections to the instances, and their request counters.
    pub connections: ConnPool,
    /// For requests that reached no endpoint of this route.
    pub unrouted: RequestCounters,
}

/// The configured routes in order, the listener's own service last.
pub struct Routes(Vec<Route>);

impl Routes {
    pub fn new(routes: Vec<Route>) -> Self {
        Routes(routes)
    }

    /// The first route matching the request's host and path.
    pub fn find(&self, parts: &Parts) -> Option<&Route> {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.host())
            .map(strip_port);
        let path = parts.uri.path();
        self.0
            .iter()
            .find(|route| route.matcher.as_ref().is_none_or(|m| m.matches(host, path)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.0.iter()
    }
}

/// The request's affinity key, when the strategy hashes one.
pub fn affinity_key(
    config: &UpstreamConfig,
    parts: &Parts,
    added: &Added,
    client: SocketAddr,
) -> Option<u64> {
    match (config.strategy, &config.hash_key) {
        (Strategy::IpHash, _) | (Strategy::ConsistentHash, HashKey::ClientIp) => {
            Some(balance::client_key(client))
        }
        (Strategy::ConsistentHash, HashKey::Header(name)) => parts
            .headers
            .get(name.as_str())
            .or_else(|| added.get(name))
            .map(|v| balance::bytes_key(v.as_bytes())),
        (Strategy::ConsistentHash, HashKey::Cookie(name)) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| balance::bytes_key(v.as_bytes())),
        (Strategy::ConsistentHash, HashKey::Query(name)) => parts.uri.query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| balance::bytes_key(v.as_bytes()))
        }),
        _ => None,
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map_or(host, |h| h.trim_start_matches('['));
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// The request header that pins a request to one instance by id: it goes
/// to exactly that instance or is answered 404 (`pinned_unknown`) or 503
/// (`pinned_unavailable`), and is never forwarded.
pub const PINNED_HEADER: &str = "x-squire-instance";
const PINNED: hyper::header::HeaderName = hyper::header::HeaderName::from_static(PINNED_HEADER);

/// Removes every [`PINNED_HEADER`] from `headers` and returns the first
/// one's value, trimmed (`None` without one, or when it is empty). A value
/// that is not text names no instance, so it is refused as unknown.
pub fn take_pinned(headers: &mut hyper::HeaderMap) -> Option<String> {
    // `remove` by a ready name: an `entry` by text parsed the name and made
    // room for an insert (a rehash of the map) on every request.
    let value = headers.remove(PINNED)?;
    let id = String::from_utf8_lossy(value.as_bytes()).trim().to_owned();
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_host_without_port_and_path_prefix() {
        let route = RouteConfig {
            host: Some("shop.game.local".into()),
            path_prefix: "/api".into(),
            service: "shop".into(),
        };
        assert!(route.matches(Some(strip_port("SHOP.game.local:8080")), "/api/items"));
        assert!(!route.matches(Some("chat.game.local"), "/api/items"));
        assert!(!route.matches(Some("shop.game.local"), "/static"));
        assert!(!route.matches(None, "/api"));
    }
}
