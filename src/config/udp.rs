//! The options of `protocol = "udp"` upstreams, and the keys a udp
//! listener refuses (TLS, the tcp connection limits, HTTP, the `ROUTE`
//! preamble): UDP has no connection, so they would mean nothing.

use super::problems::Problems;
use super::raw::RawUpstream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpUpstreamConfig {
    /// Client sessions open at once; a datagram that would open one more
    /// is dropped and counted.
    pub max_sessions: usize,
    /// With `hash_key = "prefix:N"`: remove the N token bytes from every
    /// datagram before it goes upstream.
    pub strip: bool,
}

/// The longest token `hash_key = "prefix:N"` may name.
pub const MAX_PREFIX: usize = 1024;

/// Takes the udp-only keys out of `raw`: validated into a config when
/// `udp`, reported as misplaced otherwise; with `udp`, the keys that make
/// no sense without a connection are reported too.
pub(super) fn validate(
    base: &str,
    raw: &mut RawUpstream,
    udp: bool,
    hash_key: Option<&str>,
    problems: &mut Problems,
) -> Option<UdpUpstreamConfig> {
    let at = |key: &str| format!("{base}.{key}");
    let max_sessions = raw.max_sessions.take();
    let strip = raw.strip.take();
    if !udp {
        for (key, set) in [
            ("max_sessions", max_sessions.is_some()),
            ("strip", strip.is_some()),
        ] {
            if set {
                problems.push(at(key), "only applies to protocol = \"udp\"");
            }
        }
        return None;
    }
    let refused = [
        (
            "tls",
            raw.tls.is_some(),
            "TLS is not supported on udp listeners",
        ),
        (
            "listen_tls",
            raw.listen_tls.is_some(),
            "TLS is not supported on udp listeners",
        ),
        (
            "max_connections",
            raw.max_connections.is_some(),
            "udp has no connections; use max_sessions",
        ),
        (
            "tcp_keepalive",
            raw.tcp_keepalive.is_some(),
            "udp has no connections to keep alive; idle_timeout ends a session",
        ),
        (
            "backlog",
            raw.backlog.is_some(),
            "a udp socket has no listen backlog",
        ),
        (
            "connect_timeout",
            raw.connect_timeout.is_some(),
            "a udp session connects nothing; a dead instance is found by its ICMP refusals",
        ),
        (
            "endpoint_wait",
            raw.endpoint_wait.is_some(),
            "the receive loop never waits; a datagram with no instance to go to is dropped",
        ),
    ];
    for (key, set, reason) in refused {
        if set {
            problems.push(
                at(key),
                format!("does not apply to protocol = \"udp\": {reason}"),
            );
        }
    }
    // Taken so the tcp validation that follows does not report them again.
    raw.tls = None;
    raw.listen_tls = None;
    raw.max_connections = None;
    raw.tcp_keepalive = None;
    raw.backlog = None;
    raw.connect_timeout = None;
    raw.endpoint_wait = None;
    let max_sessions = match max_sessions {
        None => 10_000,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))
            .unwrap_or_else(|| {
                problems.push(
                    at("max_sessions"),
                    format!("{n} is out of range (1-1000000)"),
                );
                10_000
            }),
    };
    let token = hash_key.is_some_and(|key| key.starts_with("prefix:"));
    if strip == Some(true) && !token {
        problems.push(
            at("strip"),
            "only applies with hash_key = \"prefix:N\" (it removes the token)",
        );
    }
    Some(UdpUpstreamConfig {
        max_sessions,
        strip: strip.unwrap_or(false),
    })
}

/// `N` of `hash_key = "prefix:N"`, or why it is not a token length.
pub(super) fn prefix_len(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_PREFIX).contains(&n) => Ok(n),
        Ok(n) => Err(format!(
            "prefix:{n}: the length is out of range (1-{MAX_PREFIX})"
        )),
        Err(_) => Err(format!(
            "prefix:{text}: expected a byte count, as in \"prefix:8\""
        )),
    }
}
