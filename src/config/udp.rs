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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{assert_problems, problems};
    use super::super::{Config, Protocol};
    use super::*;
    use crate::balance::{HashKey, Strategy};

    #[test]
    fn udp_keys_get_defaults_and_parse() {
        let config = Config::from_toml(
            r#"
            [[upstream]]
            service = "battle"
            listen = "127.0.0.1:7001"
            protocol = "udp"
            [[upstream]]
            service = "match"
            listen = "127.0.0.1:7002"
            protocol = "udp"
            strategy = "consistent_hash"
            hash_key = "prefix:8"
            strip = true
            max_sessions = 500
            idle_timeout = "15s"
            "#,
        )
        .expect("valid");
        let [battle, game] = &config.upstreams[..] else {
            panic!("two upstreams");
        };
        assert_eq!(
            battle.protocol,
            Protocol::Udp(UdpUpstreamConfig {
                max_sessions: 10_000,
                strip: false,
            })
        );
        assert_eq!(battle.protocol.name(), "udp");
        assert_eq!(battle.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(
            game.protocol,
            Protocol::Udp(UdpUpstreamConfig {
                max_sessions: 500,
                strip: true,
            })
        );
        assert_eq!(game.strategy, Strategy::ConsistentHash);
        assert_eq!(game.hash_key, HashKey::Prefix(8));
        assert_eq!(game.idle_timeout, Some(Duration::from_secs(15)));
    }

    #[test]
    fn bad_udp_values_name_the_field_and_reason() {
        assert_problems(
            &problems(
                r#"
                [[upstream]]
                service = "battle"
                listen = "127.0.0.1:7001"
                protocol = "udp"
                strategy = "consistent_hash"
                hash_key = "prefix:0"
                max_sessions = 0
                idle_timeout = "0s"
                [[upstream]]
                service = "chat"
                listen = "127.0.0.1:7002"
                protocol = "udp"
                strategy = "consistent_hash"
                hash_key = "prefix:many"
                [[upstream]]
                service = "lobby"
                listen = "127.0.0.1:7003"
                protocol = "udp"
                strip = true
                "#,
            ),
            &[
                "upstream.battle.hash_key: prefix:0: the length is out of range (1-1024)",
                "upstream.battle.max_sessions: 0 is out of range (1-1000000)",
                "upstream.battle.idle_timeout: must be greater than zero",
                "upstream.chat.hash_key: prefix:many: expected a byte count",
                "upstream.lobby.strip: only applies with hash_key = \"prefix:N\"",
            ],
        );
    }

    #[test]
    fn keys_without_meaning_for_udp_are_refused() {
        assert_problems(
            &problems(
                r#"
                [[upstream]]
                service = "battle"
                listen = "127.0.0.1:7001"
                protocol = "udp"
                strategy = "consistent_hash"
                hash_key = "preamble"
                max_connections = 10
                tcp_keepalive = "10s"
                backlog = 128
                connect_timeout = "1s"
                endpoint_wait = "1s"
                request_timeout = "1s"
                [upstream.listen_tls]
                cert = "/nonexistent/cert.pem"
                key = "/nonexistent/key.pem"
                "#,
            ),
            &[
                "upstream.battle.hash_key: \"preamble\" does not apply to a udp listener",
                "upstream.battle.max_connections: does not apply to protocol = \"udp\"",
                "upstream.battle.tcp_keepalive: does not apply to protocol = \"udp\"",
                "upstream.battle.backlog: does not apply to protocol = \"udp\"",
                "upstream.battle.connect_timeout: does not apply to protocol = \"udp\"",
                "upstream.battle.endpoint_wait: does not apply to protocol = \"udp\"",
                "upstream.battle.request_timeout: only applies to protocol = \"http\"",
                "upstream.battle.listen_tls: does not apply to protocol = \"udp\"",
            ],
        );
    }

    #[test]
    fn udp_keys_elsewhere_are_refused() {
        assert_problems(
            &problems(
                r#"
                [[upstream]]
                service = "battle"
                listen = "127.0.0.1:7001"
                strategy = "consistent_hash"
                hash_key = "prefix:4"
                max_sessions = 10
                strip = true
                "#,
            ),
            &[
                "upstream.battle.hash_key: \"prefix:4\" needs protocol = \"udp\"",
                "upstream.battle.max_sessions: only applies to protocol = \"udp\"",
                "upstream.battle.strip: only applies to protocol = \"udp\"",
            ],
        );
    }
}
