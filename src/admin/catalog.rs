//! The discovery API for game processes: what squire discovers, on the
//! admin listener, for a process that connects to instances itself.
//!
//! - `GET /v1/catalog/{service}?tag=&status=&version=&meta.KEY=`: the
//!   service's instances, each as the Knight `ServiceInfo` JSON the registry
//!   holds (the same serializer), filtered by the upstream [`Filter`]
//!   (every `tag` present, `status` one of those given, `version` exact or a
//!   `prefix*`, every `meta.KEY=VALUE` pair present; without `status`, every
//!   status), and the catalog's index in the body and as `X-Squire-Index`.
//!   Queryable: the services squire discovers (those an `[[upstream]]` or an
//!   HTTP route names). Instances the endpoint policy refuses are never
//!   instances here; they are listed apart under `refused` (id, reason).
//! - With `index=N` (and optionally `wait=30s`) it is a blocking query
//!   (Consul's rules): answered as soon as the index differs from `N`
//!   (greater; smaller only after a squire restart, which a client takes
//!   as a reset), else after `wait` (default 5 min, at most 10 min, plus
//!   up to wait/16 of jitter) with the same index. `index=0` and no index
//!   answer at once; `wait` without `index` is ignored. It waits on the
//!   service's [`CatalogFeed`](crate::discovery::CatalogFeed) watch channel,
//!   never by polling. At most [`MAX_BLOCKING_QUERIES`] wait at once; a
//!   client that hangs up frees its slot (hyper drops the waiting future).
//! - `GET /v1/catalog/{service}/pick?key=`: one instance, chosen as a new
//!   proxied connection would be: the upstream's strategy through
//!   [`Balancer::pick`](crate::balance::Balancer::pick) (counted in its
//!   picks), `key` hashed as a `ROUTE <key>` line is (for `ip_hash` or
//!   `hash_key = "client_ip"` the key is an IP address, by default the
//!   asking client's). 503 with the reason when nothing can be picked.
//! - `POST /v1/catalog/{service}/{id}/failed`: the application could not
//!   use the instance; counted as a failed attempt of the proxy is
//!   ([`Balancer::record_failure`](crate::balance::Balancer::record_failure)),
//!   so `ejection.consecutive_failures` of them in a row eject it. Needs
//!   the admin token, as every mutating request does.
//!
//! `pick` and `failed` act on the service's first upstream in
//! configuration order, or on the one listening at `listen=ADDR`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{authorize, json_response, AgentState, Body, Catalog, Pickable, MAX_BLOCKING_QUERIES};
use crate::balance::{self, now_ms, Filter, HashKey, Strategy};
use crate::discovery::CatalogView;
use crate::proxy::ProxyError;
use crate::registry::{Instance, Status};

/// The header carrying the catalog's index (Consul's `X-Consul-Index`).
pub const INDEX_HEADER: &str = "x-squire-index";

/// How long a blocking query waits without `wait` (Consul's default).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);

/// The longest `wait` (Consul's cap); a longer one is cut to this.
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// Serves `/v1/catalog/{rest}`.
pub(super) async fn route(
    state: &AgentState,
    request: Request<Incoming>,
    client: SocketAddr,
    rest: &str,
) -> Response<Body> {
    let segments = match rest.split('/').map(decode).collect::<Result<Vec<_>, _>>() {
        Ok(segments) => segments,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let method = request.method();
    match segments.as_slice() {
        [service] => {
            if method != Method::GET && method != Method::HEAD {
                return error(StatusCode::METHOD_NOT_ALLOWED, "only GET");
            }
            match ListQuery::parse(&pairs) {
                Ok(query) => list(state, service, &query).await,
                Err(message) => error(StatusCode::BAD_REQUEST, &message),
            }
        }
        [service, pick] if pick == "pick" => {
            if method != Method::GET {
                return error(StatusCode::METHOD_NOT_ALLOWED, "only GET");
            }
            pick_one(state, service, &pairs, client)
        }
        [service, id, failed] if failed == "failed" => {
            if method != Method::POST {
                return error(StatusCode::METHOD_NOT_ALLOWED, "only POST");
            }
            if let Err(refused) = authorize(state, &request, client) {
                return refused;
            }
            report_failure(state, service, id, &pairs)
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no such catalog endpoint; expected /v1/catalog/{service}, \
             /v1/catalog/{service}/pick or /v1/catalog/{service}/{id}/failed",
        ),
    }
}

/// One path segment, percent-decoded; an empty one or one that is not
/// UTF-8 once decoded is refused.
fn decode(segment: &str) -> Result<String, String> {
    if segment.is_empty() {
        return Err("empty path segment".to_owned());
    }
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("path segment {segment:?} is not UTF-8 once percent-decoded"))
}

/// The parameters of `GET /v1/catalog/{service}`.
#[derive(Debug, PartialEq)]
struct ListQuery {
    filter: Filter,
    /// `index`: wait for a change after this one (0: no wait).
    index: Option<u64>,
    /// `wait`, defaulted and capped.
    wait: Duration,
}

impl ListQuery {
    fn parse(pairs: &[(String, String)]) -> Result<ListQuery, String> {
        let mut filter = Filter {
            statuses: Vec::new(),
            tags: Vec::new(),
            version: None,
            metadata: BTreeMap::new(),
        };
        let mut index = None;
        let mut wait = None;
        for (key, value) in pairs {
            match key.as_str() {
                "tag" if value.is_empty() => return Err("tag: empty".to_owned()),
                "tag" => filter.tags.push(value.clone()),
                "status" => {
                    for name in value.split(',') {
                        let status = Status::from_name(name.trim()).ok_or_else(|| {
                            format!(
                                "status: unknown status {name:?}; expected unknown, healthy, \
                                 warning, unhealthy, critical or draining"
                            )
                        })?;
                        if !filter.statuses.contains(&status) {
                            filter.statuses.push(status);
                        }
                    }
                }
                "version" => once(&mut filter.version, "version", value.clone())?,
                "index" => {
                    let n = value.parse::<u64>().map_err(|_| {
                        format!("index: {value:?} is not an index (a whole number, 0 or more)")
                    })?;
                    once(&mut index, "index", n)?;
                }
                "wait" => once(&mut wait, "wait", parse_wait(value)?)?,
                key => match key.strip_prefix("meta.") {
                    Some("") => return Err("meta.: the metadata key is missing".to_owned()),
                    Some(name) => {
                        if filter
                            .metadata
                            .insert(name.to_owned(), value.clone())
                            .is_some()
                        {
                            return Err(format!("{key}: given more than once"));
                        }
                    }
                    None => {
                        return Err(format!(
                            "unknown parameter {key:?}; expected tag, status, version, \
                             meta.KEY, index or wait"
                        ))
                    }
                },
            }
        }
        if filter.statuses.is_empty() {
            filter.statuses = Status::ALL.to_vec();
        }
        Ok(ListQuery {
            filter,
            index,
            wait: wait.unwrap_or(DEFAULT_WAIT),
        })
    }
}

/// Sets `slot` to `value`, refusing a parameter given twice.
fn once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{name}: given more than once"));
    }
    *slot = Some(value);
    Ok(())
}

/// `wait` as Consul reads it: a duration with its unit (`30s`, `5m`,
/// `250ms`); 0 is the default, more than [`MAX_WAIT`] is cut to it.
fn parse_wait(value: &str) -> Result<Duration, String> {
    let wait = humantime::parse_duration(value)
        .map_err(|e| format!("wait: {value:?} is not a duration such as 30s or 5m ({e})"))?;
    Ok(if wait.is_zero() {
        DEFAULT_WAIT
    } else {
        wait.min(MAX_WAIT)
    })
}

/// `GET /v1/catalog/{service}`, blocking when asked to.
async fn list(state: &AgentState, service: &str, query: &ListQuery) -> Response<Body> {
    let Some(mut feed) = subscribe(&state.catalog.load(), service) else {
        return not_discovered(service);
    };
    let view = match query.index {
        None | Some(0) => feed.borrow().clone(),
        // Past it already: answered at once, without taking a slot.
        Some(after) if feed.borrow().index != after => feed.borrow().clone(),
        Some(after) => {
            let Ok(_permit) = state.catalog_waits.try_acquire() else {
                let mut response = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!(
                        "{MAX_BLOCKING_QUERIES} blocking queries are waiting already; retry later"
                    ),
                );
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                return response;
            };
            let deadline = Instant::now() + jittered(query.wait);
            match wait_past(state, service, &mut feed, after, deadline).await {
                Some(view) => view,
                None => return not_discovered(service),
            }
        }
    };
    let instances: Vec<&Instance> = view
        .instances
        .iter()
        .filter(|i| query.filter.admits(i))
        .collect();
    let refused: Vec<_> = view
        .refused
        .iter()
        .map(|(id, reason)| RefusedJson {
            id,
            reason: reason.as_str(),
        })
        .collect();
    let body = ListJson {
        service,
        index: view.index,
        instances,
        refused,
    };
    with_index(serialized(&body), view.index)
}

/// The answer of `GET /v1/catalog/{service}`. Serialized as a struct, not
/// through a `serde_json::Value` (which sorts keys), so each instance is
/// byte for byte what the registry holds (Knight's field order).
#[derive(Serialize)]
struct ListJson<'a> {
    service: &'a str,
    index: u64,
    instances: Vec<&'a Instance>,
    refused: Vec<RefusedJson<'a>>,
}

#[derive(Serialize)]
struct RefusedJson<'a> {
    id: &'a str,
    reason: &'static str,
}

/// The answer of `GET /v1/catalog/{service}/pick`.
#[derive(Serialize)]
struct PickJson<'a> {
    service: &'a str,
    listen: Option<&'a str>,
    strategy: &'static str,
    index: Option<u64>,
    instance: &'a Instance,
    address: &'a str,
    dials: Vec<String>,
}

/// `body` as a JSON answer.
fn serialized(body: &impl Serialize) -> Response<Body> {
    match serde_json::to_string(body) {
        Ok(text) => {
            let mut response = Response::new(Body::from(text));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        // Strings, numbers and string maps: not expected to fail, but a
        // failure is an answer, not a panic.
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot serialize the answer: {e}"),
        ),
    }
}

/// `wait` plus up to `wait / 16`, as Consul spreads the wake-ups of
/// queries that started together.
fn jittered(wait: Duration) -> Duration {
    wait + (wait / 16).mul_f64(rand::random::<f64>())
}

/// The first view whose index is not `after`, or the view at `deadline`;
/// `None` when the service is no longer discovered (a reload removed it).
async fn wait_past(
    state: &AgentState,
    service: &str,
    feed: &mut watch::Receiver<Arc<CatalogView>>,
    after: u64,
    deadline: Instant,
) -> Option<Arc<CatalogView>> {
    loop {
        let view = feed.borrow_and_update().clone();
        if view.index != after {
            return Some(view);
        }
        match tokio::time::timeout_at(deadline, feed.changed()).await {
            Ok(Ok(())) => {}
            // The service's state is gone: a reload replaced it (the new
            // one starts from the same view) or removed the service.
            Ok(Err(_)) => *feed = subscribe(&state.catalog.load(), service)?,
            Err(_) => return Some(feed.borrow().clone()),
        }
    }
}

/// The catalog feed of `service`, if squire discovers it.
fn subscribe(catalog: &Catalog, service: &str) -> Option<watch::Receiver<Arc<CatalogView>>> {
    catalog
        .services
        .iter()
        .find(|s| s.name == service)
        .map(|s| s.catalog().subscribe())
}

/// `GET /v1/catalog/{service}/pick`.
fn pick_one(
    state: &AgentState,
    service: &str,
    pairs: &[(String, String)],
    client: SocketAddr,
) -> Response<Body> {
    let (key, listen) = match pick_params(pairs, &["key", "listen"]) {
        Ok(mut params) => (params.remove("key"), params.remove("listen")),
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let catalog = state.catalog.load();
    let Some(pickable) = find_upstream(&catalog, service, listen.as_deref()) else {
        return no_upstream(service, listen.as_deref());
    };
    let upstream = &pickable.upstream;
    let strategy = upstream.balancer().strategy();
    // The affinity key as the listener finds it (tcp.rs `affinity`, HTTP
    // routing): the client's address, or the bytes of a key.
    let hash = match (strategy, &pickable.hash_key) {
        (Strategy::IpHash, _) | (Strategy::ConsistentHash, HashKey::ClientIp) => {
            let ip = match key.as_deref() {
                None => client.ip(),
                Some(text) => match text.parse::<IpAddr>() {
                    Ok(ip) => ip,
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!(
                                "key: {text:?} is not an IP address; this upstream hashes \
                                 the client's IP address"
                            ),
                        )
                    }
                },
            };
            Some(balance::client_key(SocketAddr::new(ip, 0)))
        }
        (Strategy::ConsistentHash, _) => key.as_deref().map(|k| balance::bytes_key(k.as_bytes())),
        _ => None,
    };
    let index = subscribe(&catalog, service).map(|feed| feed.borrow().clone());
    let snapshot = upstream.snapshot();
    let context = balance::Context::new(now_ms()).with_key(hash);
    let Some(picked) = upstream.balancer().pick(&snapshot, &context) else {
        let known = index.as_ref().map_or(0, |v| v.instances.len());
        let reason = if known == 0 {
            format!("no endpoint of {service} is routable: no instance of it is known")
        } else if snapshot.is_empty() {
            format!(
                "no endpoint of {service} is routable: {known} instance(s) known, none with a \
                 status the upstream takes ({}) and matching its filter",
                upstream
                    .filter()
                    .statuses
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "no endpoint of {service} can be picked: all {} routable endpoint(s) are \
                 ejected or have weight 0",
                snapshot.len()
            )
        };
        let (status, _) = ProxyError::NoHealthyEndpoint {
            service: service.to_owned(),
        }
        .status();
        return error(status, &reason);
    };
    let endpoint = &snapshot.endpoints()[picked];
    endpoint.stats.picked();
    let response = serialized(&PickJson {
        service,
        listen: upstream.listen(),
        strategy: strategy.name(),
        index: index.as_ref().map(|v| v.index),
        instance: &endpoint.instance,
        address: &endpoint.authority,
        dials: endpoint.addrs.iter().map(ToString::to_string).collect(),
    });
    match index {
        Some(view) => with_index(response, view.index),
        None => response,
    }
}

/// `POST /v1/catalog/{service}/{id}/failed` (authorized already).
fn report_failure(
    state: &AgentState,
    service: &str,
    id: &str,
    pairs: &[(String, String)],
) -> Response<Body> {
    let listen = match pick_params(pairs, &["listen"]) {
        Ok(mut params) => params.remove("listen"),
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let catalog = state.catalog.load();
    let Some(pickable) = find_upstream(&catalog, service, listen.as_deref()) else {
        return no_upstream(service, listen.as_deref());
    };
    let upstream = &pickable.upstream;
    let snapshot = upstream.snapshot();
    let Some(index) = snapshot
        .endpoints()
        .iter()
        .position(|e| e.instance.id == id)
    else {
        return error(
            StatusCode::NOT_FOUND,
            &format!(
                "{id:?} is not an endpoint of the {service} upstream at {}",
                upstream.listen().unwrap_or("?")
            ),
        );
    };
    let now = now_ms();
    let balancer = upstream.balancer();
    let ejected = balancer.record_failure(&snapshot, index, now);
    let endpoint = &snapshot.endpoints()[index];
    match ejected {
        Some(out_for) => tracing::warn!(
            upstream = %service,
            endpoint = %id,
            ejected_for = ?out_for,
            "ejecting an endpoint after consecutive failures (reported by the application)"
        ),
        None => {
            tracing::debug!(upstream = %service, endpoint = %id, "failure reported by the application")
        }
    }
    let stats = &endpoint.stats;
    json_response(json!({
        "service": service,
        "id": id,
        "listen": upstream.listen(),
        "consecutive_failures": stats.consecutive_failures.load(std::sync::atomic::Ordering::Relaxed),
        "ejection_threshold": balancer.ejection().consecutive_failures,
        "ejected_for_ms": stats.ejected_until(now).map(|until| until - now),
    }))
}

/// The parameters of `pick` and `failed`: each of `allowed` at most once,
/// nothing else.
fn pick_params(
    pairs: &[(String, String)],
    allowed: &[&str],
) -> Result<BTreeMap<String, String>, String> {
    let mut params = BTreeMap::new();
    for (key, value) in pairs {
        if !allowed.contains(&key.as_str()) {
            return Err(format!(
                "unknown parameter {key:?}; expected {}",
                allowed.join(" or ")
            ));
        }
        if params.insert(key.clone(), value.clone()).is_some() {
            return Err(format!("{key}: given more than once"));
        }
    }
    Ok(params)
}

/// The service's first upstream in configuration order, or the one whose
/// listener is at `listen`.
fn find_upstream<'a>(
    catalog: &'a Catalog,
    service: &str,
    listen: Option<&str>,
) -> Option<&'a Pickable> {
    catalog.pickable.iter().find(|p| {
        p.upstream.service() == service && listen.is_none_or(|l| p.upstream.listen() == Some(l))
    })
}

fn not_discovered(service: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        &format!(
            "service {service:?} is not discovered by this squire: no [[upstream]] or HTTP \
             route names it"
        ),
    )
}

fn no_upstream(service: &str, listen: Option<&str>) -> Response<Body> {
    match listen {
        None => not_discovered(service),
        Some(listen) => error(
            StatusCode::NOT_FOUND,
            &format!("no upstream of service {service:?} listens at {listen:?}"),
        ),
    }
}

fn with_index(mut response: Response<Body>, index: u64) -> Response<Body> {
    response
        .headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    response
}

/// A JSON error: `{"error": message}`.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = json_response(json!({ "error": message }));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    }

    fn parse(query: &str) -> Result<ListQuery, String> {
        ListQuery::parse(&pairs(query))
    }

    #[test]
    fn filters_read_as_an_upstream_filter() {
        let query = parse("tag=game&tag=eu&status=healthy,warning&version=1.4.*&meta.zone=a")
            .expect("valid");
        assert_eq!(
            query.filter,
            Filter {
                statuses: vec![Status::Healthy, Status::Warning],
                tags: vec!["game".into(), "eu".into()],
                version: Some("1.4.*".into()),
                metadata: BTreeMap::from([("zone".into(), "a".into())]),
            }
        );
        assert_eq!((query.index, query.wait), (None, DEFAULT_WAIT));
        let all = parse("").expect("valid");
        assert_eq!(all.filter.statuses, Status::ALL.to_vec(), "every status");
    }

    #[test]
    fn wait_follows_consul_default_and_cap() {
        assert_eq!(
            parse("index=3&wait=30s").expect("valid").wait,
            Duration::from_secs(30)
        );
        assert_eq!(
            parse("index=3&wait=250ms").expect("valid").wait,
            Duration::from_millis(250)
        );
        assert_eq!(parse("index=3&wait=1h").expect("valid").wait, MAX_WAIT);
        assert_eq!(parse("index=3&wait=0s").expect("valid").wait, DEFAULT_WAIT);
        assert_eq!(parse("index=3").expect("valid").index, Some(3));
        let jittered = jittered(Duration::from_secs(16));
        assert!(jittered >= Duration::from_secs(16) && jittered <= Duration::from_secs(17));
    }

    #[test]
    fn bad_input_is_refused_with_the_parameter_named() {
        for (query, names) in [
            ("wait=soon&index=1", "wait:"),
            ("wait=30", "wait:"),
            ("index=-1", "index:"),
            ("index=abc", "index:"),
            ("index=99999999999999999999999", "index:"),
            ("index=1&index=2", "given more than once"),
            ("status=sleepy", "status:"),
            ("status=", "status:"),
            ("tag=", "tag:"),
            ("meta.=x", "meta."),
            ("meta.zone=a&meta.zone=b", "meta.zone"),
            ("version=1&version=2", "version"),
            ("bogus=1", "unknown parameter"),
            ("%zz", "unknown parameter"),
        ] {
            let error = parse(query).expect_err(query);
            assert!(error.contains(names), "{query}: {error}");
        }
        assert!(pick_params(&pairs("key=a&key=b"), &["key"]).is_err());
        assert!(pick_params(&pairs("tag=x"), &["key", "listen"]).is_err());
        assert!(decode("").is_err());
        assert!(decode("%ff").is_err());
        assert_eq!(decode("gate-%3A%3A1-7000").as_deref(), Ok("gate-::1-7000"));
    }
}
