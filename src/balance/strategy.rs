//! Which strategy an upstream uses and where its affinity key comes from.

use std::net::SocketAddr;

use super::{hash, ip_hash};

/// A load-balancing strategy, from `upstream.strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    Random,
    WeightedRoundRobin,
    LeastConnections,
    ConsistentHash,
    IpHash,
    ResponseTime,
    LeastLoaded,
    Packed,
}

impl Strategy {
    pub const ALL: [Strategy; 9] = [
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::WeightedRoundRobin,
        Strategy::LeastConnections,
        Strategy::ConsistentHash,
        Strategy::IpHash,
        Strategy::ResponseTime,
        Strategy::LeastLoaded,
        Strategy::Packed,
    ];

    pub fn from_name(name: &str) -> Result<Strategy, String> {
        Strategy::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown strategy {name:?}; expected one of round_robin, random, \
                     weighted_round_robin, least_connections, consistent_hash, ip_hash, response_time, \
                     least_loaded, packed"
                )
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::WeightedRoundRobin => "weighted_round_robin",
            Strategy::LeastConnections => "least_connections",
            Strategy::ConsistentHash => "consistent_hash",
            Strategy::IpHash => "ip_hash",
            Strategy::ResponseTime => "response_time",
            Strategy::LeastLoaded => "least_loaded",
            Strategy::Packed => "packed",
        }
    }

    /// Whether picks use [`Context::key`](super::Context::key).
    pub fn uses_key(self) -> bool {
        matches!(self, Strategy::ConsistentHash | Strategy::IpHash)
    }
}

/// Where the affinity key of a connection or request comes from
/// (`upstream.hash_key`). It reaches the strategy as a hash in [`Context`](super::Context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    ClientIp,
    /// The key of a `ROUTE <key>\n` line the client sends first (TCP).
    Preamble,
    /// A request header, by lower-case name (HTTP).
    Header(String),
    /// A cookie, by name (HTTP).
    Cookie(String),
    /// A query parameter, by name (HTTP).
    Query(String),
    /// The first N bytes of a session's first datagram: a token the
    /// client carries (UDP).
    Prefix(usize),
}

impl HashKey {
    /// As written in the configuration.
    pub fn name(&self) -> String {
        match self {
            HashKey::ClientIp => "client_ip".to_owned(),
            HashKey::Preamble => "preamble".to_owned(),
            HashKey::Header(name) => format!("header:{name}"),
            HashKey::Cookie(name) => format!("cookie:{name}"),
            HashKey::Query(name) => format!("query:{name}"),
            HashKey::Prefix(n) => format!("prefix:{n}"),
        }
    }
}

/// The affinity key of a client address (for `ip_hash` and
/// `hash_key = "client_ip"`).
pub fn client_key(peer: SocketAddr) -> u64 {
    ip_hash::key(peer.ip())
}

/// The affinity key of arbitrary bytes (a `ROUTE` key, a header, cookie or
/// query value).
pub fn bytes_key(bytes: &[u8]) -> u64 {
    hash::key(bytes)
}
