//! `[[upstream]]`: one listener and the service it forwards to, with its
//! filter, retries, load balancing and ejection. The `protocol = "http"`
//! keys are validated in [`super::http`], the `protocol = "udp"` ones in
//! [`super::udp`], the balancing keys in [`super::balancing`].

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use super::balancing::{
    validate_balancing, validate_prefer, validate_slow_start, Kind, RawBalancing,
};
use super::http::{self, HttpUpstreamConfig};
use super::problems::{check_name, duration, required, socket_addr, unspecified, Problems};
use super::raw::RawUpstream;
use super::tls::{validate_dial, validate_listen, DialTls, ListenTls};
use super::udp::{self, UdpUpstreamConfig};
use crate::balance::{EjectionPolicy, Filter, HashKey, Prefer, Ranges, SlowStart, Strategy};
use crate::registry::Status;

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub service: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub strategy: Strategy,
    /// Which instances may take new connections.
    pub filter: Filter,
    /// The address ranges it may dial: its own `allow`/`deny`, each
    /// replacing the agent's when set.
    pub ranges: Ranges,
    pub connect_timeout: Duration,
    /// How long a connection or request that finds no endpoint to pick
    /// waits for one to appear (zero: fails at once).
    pub endpoint_wait: Duration,
    /// Further connect attempts after the first, each on another instance.
    pub retries: u32,
    /// Delay before the first retry (jittered, doubling per retry).
    pub retry_backoff: Duration,
    /// Where `consistent_hash` takes its key from.
    pub hash_key: HashKey,
    /// How long a client may take to send its `ROUTE` line.
    pub preamble_timeout: Duration,
    /// The longest `ROUTE` line, newline included.
    pub preamble_max_bytes: usize,
    /// Below this share of healthy endpoints, route to all (0: never).
    pub panic_threshold: f64,
    pub ejection: EjectionPolicy,
    /// `prefer` and `prefer_min_share`: keep traffic within the instances
    /// with these metadata pairs (a zone) while enough are routable.
    pub prefer: Prefer,
    /// `slow_start` and `slow_start_min`: the ramp of an instance that just
    /// became routable.
    pub slow_start: SlowStart,
    /// A load an instance reported longer ago than this counts as unknown.
    pub load_ttl: Duration,
    /// Client connections open at once; more are refused and counted.
    pub max_connections: usize,
    /// A connection that moves no byte (tcp), or has no request in flight
    /// and moves no byte (http), for this long is closed. `None`: never
    /// (the tcp default; http defaults to 60s).
    pub idle_timeout: Option<Duration>,
    /// TCP keep-alive on the client and instance sockets: idle time before
    /// the first probe. `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// Listen backlog (default: `agent.backlog`).
    pub backlog: u32,
    /// `[upstream.tls]`: the instances are dialed over TLS (tcp only).
    pub tls: Option<DialTls>,
    /// `[upstream.listen_tls]`: the listener terminates TLS (tcp only).
    pub listen_tls: Option<ListenTls>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Protocol {
    Tcp,
    Http(Box<HttpUpstreamConfig>),
    Udp(UdpUpstreamConfig),
}

impl Protocol {
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http(_) => "http",
            Protocol::Udp(_) => "udp",
        }
    }
}

pub(super) fn validate_upstream(
    index: usize,
    mut raw: RawUpstream,
    agent_ranges: &Ranges,
    own_metadata: Option<&BTreeMap<String, String>>,
    listens: &mut HashSet<SocketAddr>,
    problems: &mut Problems,
) -> UpstreamConfig {
    let base = upstream_path(index, raw.service.as_deref());
    let at = |key: &str| format!("{base}.{key}");
    let prefer = validate_prefer(
        &base,
        raw.prefer.take(),
        raw.prefer_min_share.take(),
        own_metadata,
        problems,
    );
    let slow_start = validate_slow_start(
        &base,
        raw.slow_start.take(),
        raw.slow_start_min.take(),
        problems,
    );
    let mut raw_balancing = RawBalancing {
        hash_key: raw.hash_key.take(),
        preamble_timeout: raw.preamble_timeout.take(),
        preamble_max_bytes: raw.preamble_max_bytes.take(),
        panic_threshold: raw.panic_threshold.take(),
        retry_backoff: raw.retry_backoff.take(),
        ejection: std::mem::take(&mut raw.ejection),
    };
    let service = required(&at("service"), raw.service.take(), problems);
    check_name(&at("service"), &service, problems);
    let listen = match raw.listen.take() {
        Some(listen) => socket_addr(&at("listen"), &listen, problems),
        None => {
            problems.push(at("listen"), "required");
            unspecified()
        }
    };
    if listen.port() != 0 && !listens.insert(listen) {
        problems.push(
            at("listen"),
            format!("{listen} is used by another upstream"),
        );
    }
    let (is_http, is_udp) = match raw.protocol.as_deref() {
        None | Some("tcp") => (false, false),
        Some("http") => (true, false),
        Some("udp") => (false, true),
        Some(other) => {
            problems.push(
                at("protocol"),
                format!("unknown protocol {other:?}; expected \"tcp\", \"http\" or \"udp\""),
            );
            (false, false)
        }
    };
    let http_config = http::validate(&base, &mut raw, is_http, problems);
    let udp_config = udp::validate(
        &base,
        &mut raw,
        is_udp,
        raw_balancing.hash_key.as_deref(),
        problems,
    );
    let protocol = match (http_config, udp_config) {
        (Some(http), _) => Protocol::Http(Box::new(http)),
        (None, Some(udp)) => Protocol::Udp(udp),
        (None, None) => Protocol::Tcp,
    };
    // A udp session, like an http connection, always has an idle timeout.
    let limits = validate_limits(&base, is_http || is_udp, &mut raw, problems);
    let tls_keys = [
        ("tls", raw.tls.is_some()),
        ("listen_tls", raw.listen_tls.is_some()),
    ];
    let tls = raw
        .tls
        .take()
        .and_then(|t| validate_dial(&base, t, problems));
    let listen_tls = raw
        .listen_tls
        .take()
        .and_then(|t| validate_listen(&base, t, problems));
    if is_http {
        for (key, set) in tls_keys {
            if set {
                problems.push(
                    at(key),
                    "only applies to protocol = \"tcp\" (TLS is not supported on http listeners yet)",
                );
            }
        }
    }
    let strategy = match raw.strategy.as_deref() {
        None => Strategy::RoundRobin,
        Some(name) => Strategy::from_name(name).unwrap_or_else(|reason| {
            problems.push(at("strategy"), reason);
            Strategy::RoundRobin
        }),
    };
    let statuses = match raw.statuses {
        None => vec![Status::Healthy],
        Some(names) => names
            .iter()
            .filter_map(|name| match Status::from_name(name) {
                Some(s @ (Status::Healthy | Status::Warning | Status::Unknown)) => Some(s),
                _ => {
                    problems.push(
                        at("statuses"),
                        format!("{name:?} cannot take new connections; use \"healthy\", \"warning\" or \"unknown\""),
                    );
                    None
                }
            })
            .collect(),
    };
    if statuses.is_empty() {
        problems.push(at("statuses"), "must list at least one status");
    }
    let filter = Filter {
        statuses,
        tags: raw.tags.unwrap_or_default(),
        version: raw.version,
        metadata: raw.metadata.unwrap_or_default(),
    };
    let ranges = super::agent::ranges(&base, raw.allow, raw.deny, agent_ranges, problems);
    let connect_timeout = duration(&at("connect_timeout"), raw.connect_timeout, "1s", problems);
    if connect_timeout.is_zero() {
        problems.push(at("connect_timeout"), "must be greater than zero");
    }
    let endpoint_wait = duration(&at("endpoint_wait"), raw.endpoint_wait, "1s", problems);
    let retries = match raw.retries {
        None => 2,
        Some(r) => u32::try_from(r)
            .ok()
            .filter(|r| *r <= 16)
            .unwrap_or_else(|| {
                problems.push(at("retries"), format!("{r} is out of range (0-16)"));
                0
            }),
    };
    let kind = match protocol {
        Protocol::Tcp => Kind::Tcp,
        Protocol::Http(_) => Kind::Http,
        Protocol::Udp(_) => Kind::Udp,
    };
    let balancing = validate_balancing(&base, strategy, kind, &mut raw_balancing, problems);
    UpstreamConfig {
        service,
        listen,
        protocol,
        strategy,
        filter,
        ranges,
        connect_timeout,
        endpoint_wait,
        retries,
        retry_backoff: balancing.retry_backoff,
        hash_key: balancing.hash_key,
        preamble_timeout: balancing.preamble_timeout,
        preamble_max_bytes: balancing.preamble_max_bytes,
        panic_threshold: balancing.panic_threshold,
        ejection: balancing.ejection,
        prefer,
        slow_start,
        load_ttl: super::service::load_ttl(&at("load_ttl"), raw.load_ttl.take(), problems),
        max_connections: limits.max_connections,
        idle_timeout: limits.idle_timeout,
        tcp_keepalive: limits.tcp_keepalive,
        // 0 until `Config::validate` applies `agent.backlog`.
        backlog: super::agent::backlog(&at("backlog"), raw.backlog, problems).unwrap_or(0),
        tls,
        listen_tls,
    }
}

struct Limits {
    max_connections: usize,
    idle_timeout: Option<Duration>,
    tcp_keepalive: Option<Duration>,
}

/// `max_connections`, `idle_timeout` and `tcp_keepalive`, for both
/// protocols.
fn validate_limits(
    base: &str,
    http: bool,
    raw: &mut RawUpstream,
    problems: &mut Problems,
) -> Limits {
    let at = |key: &str| format!("{base}.{key}");
    let max_connections = match raw.max_connections {
        None => 10_000,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))
            .unwrap_or_else(|| {
                problems.push(
                    at("max_connections"),
                    format!("{n} is out of range (1-1000000)"),
                );
                10_000
            }),
    };
    let idle_timeout = match (raw.idle_timeout.take(), http) {
        (None, false) => None,
        (text, _) => {
            let idle = duration(&at("idle_timeout"), text, "60s", problems);
            if idle.is_zero() {
                problems.push(at("idle_timeout"), "must be greater than zero");
            }
            Some(idle)
        }
    };
    let keepalive = duration(
        &at("tcp_keepalive"),
        raw.tcp_keepalive.take(),
        "30s",
        problems,
    );
    let tcp_keepalive = if keepalive.is_zero() {
        None
    } else if keepalive < Duration::from_secs(1) {
        problems.push(
            at("tcp_keepalive"),
            "must be at least 1s (the kernel counts in seconds), or \"0s\" to turn it off",
        );
        None
    } else {
        Some(keepalive)
    };
    Limits {
        max_connections,
        idle_timeout,
        tcp_keepalive,
    }
}

/// `upstream.gate` when the upstream names its service, else `upstream[0]`.
pub(super) fn upstream_path(index: usize, service: Option<&str>) -> String {
    match service {
        Some(name) if !name.is_empty() => format!("upstream.{name}"),
        _ => format!("upstream[{index}]"),
    }
}
