//! The load-balancing keys of an `[[upstream]]`: strategy-dependent
//! affinity keys, the ROUTE preamble, panic threshold, retry backoff,
//! passive ejection, preferred instances (zones) and slow start.

use std::collections::BTreeMap;
use std::time::Duration;

use super::problems::{duration, Problems};
use super::raw::RawEjection;
use super::udp;
use crate::balance::{EjectionPolicy, HashKey, Prefer, SlowStart, Strategy};

/// The load-balancing keys of one upstream, taken out of [`RawUpstream`](super::raw::RawUpstream)
/// before the rest is consumed.
#[derive(Default)]
pub(super) struct RawBalancing {
    pub(super) hash_key: Option<String>,
    pub(super) preamble_timeout: Option<String>,
    pub(super) preamble_max_bytes: Option<i64>,
    pub(super) panic_threshold: Option<toml::Value>,
    pub(super) retry_backoff: Option<String>,
    pub(super) ejection: RawEjection,
}

pub(super) struct Balancing {
    pub(super) retry_backoff: Duration,
    pub(super) hash_key: HashKey,
    pub(super) preamble_timeout: Duration,
    pub(super) preamble_max_bytes: usize,
    pub(super) panic_threshold: f64,
    pub(super) ejection: EjectionPolicy,
}

/// Which listener the balancing keys are for: each takes its affinity key
/// from somewhere else.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Tcp,
    Http,
    Udp,
}

pub(super) fn validate_balancing(
    base: &str,
    strategy: Strategy,
    kind: Kind,
    raw: &mut RawBalancing,
    problems: &mut Problems,
) -> Balancing {
    let at = |key: &str| format!("{base}.{key}");
    let http = kind == Kind::Http;
    let hash_key = match raw.hash_key.as_deref() {
        None | Some("client_ip") => HashKey::ClientIp,
        Some(other) if kind == Kind::Udp => match other.strip_prefix("prefix:") {
            Some(n) => udp::prefix_len(n)
                .map(HashKey::Prefix)
                .unwrap_or_else(|reason| {
                    problems.push(at("hash_key"), reason);
                    HashKey::ClientIp
                }),
            None => {
                problems.push(
                    at("hash_key"),
                    format!("{other:?} does not apply to a udp listener; it hashes \"client_ip\" or \"prefix:N\" (the first N bytes of a session's first datagram)"),
                );
                HashKey::ClientIp
            }
        },
        Some(other) if other.starts_with("prefix:") => {
            problems.push(
                at("hash_key"),
                format!("{other:?} needs protocol = \"udp\""),
            );
            HashKey::ClientIp
        }
        Some("preamble") if !http => HashKey::Preamble,
        Some("preamble") => {
            problems.push(
                at("hash_key"),
                "\"preamble\" is for tcp listeners; an http listener hashes \"client_ip\", header:NAME, cookie:NAME or query:NAME",
            );
            HashKey::ClientIp
        }
        Some(other) => {
            let named = |prefix: &str| other.strip_prefix(prefix).filter(|n| !n.is_empty());
            match (named("header:"), named("cookie:"), named("query:")) {
                (Some(name), _, _)
                    if http && hyper::header::HeaderName::from_bytes(name.as_bytes()).is_ok() =>
                {
                    HashKey::Header(name.to_ascii_lowercase())
                }
                (_, Some(name), _) if http => HashKey::Cookie(name.to_owned()),
                (_, _, Some(name)) if http => HashKey::Query(name.to_owned()),
                (None, None, None) => {
                    problems.push(
                        at("hash_key"),
                        format!(
                            "unknown hash key {other:?}; expected \"client_ip\", \"preamble\" (tcp), \
                             header:NAME, cookie:NAME, query:NAME (http), or prefix:N (udp)"
                        ),
                    );
                    HashKey::ClientIp
                }
                _ if !http => {
                    problems.push(
                        at("hash_key"),
                        format!("{other:?} needs protocol = \"http\"; a tcp listener hashes \"client_ip\" or \"preamble\""),
                    );
                    HashKey::ClientIp
                }
                _ => {
                    problems.push(
                        at("hash_key"),
                        format!("{other:?} does not name a valid header"),
                    );
                    HashKey::ClientIp
                }
            }
        }
    };
    if raw.hash_key.is_some() && strategy != Strategy::ConsistentHash {
        let reason = if strategy == Strategy::IpHash {
            "ip_hash always hashes the client address; use strategy = \"consistent_hash\" to choose the key".to_owned()
        } else {
            format!(
                "only applies to strategy = \"consistent_hash\" (this upstream uses {:?})",
                strategy.name()
            )
        };
        problems.push(at("hash_key"), reason);
    }
    let preamble = hash_key == HashKey::Preamble && strategy == Strategy::ConsistentHash;
    for (key, set) in [
        ("preamble_timeout", raw.preamble_timeout.is_some()),
        ("preamble_max_bytes", raw.preamble_max_bytes.is_some()),
    ] {
        if set && !preamble {
            problems.push(at(key), "only applies to hash_key = \"preamble\"");
        }
    }
    let preamble_timeout = duration(
        &at("preamble_timeout"),
        raw.preamble_timeout.take(),
        "1s",
        problems,
    );
    if preamble_timeout.is_zero() {
        problems.push(at("preamble_timeout"), "must be greater than zero");
    }
    let preamble_max_bytes = match raw.preamble_max_bytes {
        None => 256,
        Some(n) if (8..=4096).contains(&n) => n as usize,
        Some(n) => {
            problems.push(
                at("preamble_max_bytes"),
                format!("{n} is out of range (8-4096)"),
            );
            256
        }
    };
    let panic_threshold = fraction(
        &at("panic_threshold"),
        raw.panic_threshold.take(),
        0.0,
        problems,
    );
    let retry_backoff = duration(
        &at("retry_backoff"),
        raw.retry_backoff.take(),
        "10ms",
        problems,
    );
    let ejection = validate_ejection(base, std::mem::take(&mut raw.ejection), problems);
    Balancing {
        retry_backoff,
        hash_key,
        preamble_timeout,
        preamble_max_bytes,
        panic_threshold,
        ejection,
    }
}

fn validate_ejection(base: &str, raw: RawEjection, problems: &mut Problems) -> EjectionPolicy {
    let at = |key: &str| format!("{base}.ejection.{key}");
    let defaults = EjectionPolicy::default();
    let consecutive_failures = match raw.consecutive_failures {
        None => defaults.consecutive_failures,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n <= 1000)
            .unwrap_or_else(|| {
                problems.push(
                    at("consecutive_failures"),
                    format!("{n} is out of range (0-1000; 0 turns ejection off)"),
                );
                defaults.consecutive_failures
            }),
    };
    let base_time = duration(&at("base_time"), raw.base_time, "10s", problems);
    if base_time.is_zero() {
        problems.push(at("base_time"), "must be greater than zero");
    }
    let max_time = duration(&at("max_time"), raw.max_time, "5m", problems);
    if max_time < base_time {
        problems.push(
            at("max_time"),
            format!(
                "must be at least base_time ({})",
                humantime::format_duration(base_time)
            ),
        );
    }
    let max_share = fraction(
        &at("max_share"),
        raw.max_share,
        defaults.max_share,
        problems,
    );
    EjectionPolicy {
        consecutive_failures,
        base_time,
        max_time,
        max_share,
    }
}

/// `prefer` and `prefer_min_share`. `prefer = { zone = "a" }` names the
/// pairs; `prefer = ["zone"]` takes each key's value from this squire's
/// own `[service].metadata`, so one config serves every zone.
pub(super) fn validate_prefer(
    base: &str,
    value: Option<toml::Value>,
    min_share: Option<toml::Value>,
    own: Option<&BTreeMap<String, String>>,
    problems: &mut Problems,
) -> Prefer {
    let at = |key: &str| format!("{base}.{key}");
    let defaults = Prefer::default();
    if min_share.is_some() && value.is_none() {
        problems.push(at("prefer_min_share"), "only applies with prefer");
    }
    let min_share = fraction(
        &at("prefer_min_share"),
        min_share,
        defaults.min_share,
        problems,
    );
    let mut metadata = BTreeMap::new();
    match value {
        None => {}
        Some(toml::Value::Table(pairs)) => {
            for (key, value) in pairs {
                match value {
                    toml::Value::String(v) if !v.is_empty() => {
                        metadata.insert(key, v);
                    }
                    other => problems.push(
                        format!("{base}.prefer.{key}"),
                        format!(
                            "expected a non-empty string (the metadata value), found {}",
                            describe(&other)
                        ),
                    ),
                }
            }
        }
        Some(toml::Value::Array(keys)) => {
            for key in keys {
                let toml::Value::String(key) = key else {
                    problems.push(
                        at("prefer"),
                        format!("expected metadata keys (strings), found {}", describe(&key)),
                    );
                    continue;
                };
                match own.map(|own| own.get(&key)) {
                    Some(Some(value)) => {
                        metadata.insert(key, value.clone());
                    }
                    Some(None) => problems.push(
                        at("prefer"),
                        format!("service.metadata has no {key:?} to take the preferred value from"),
                    ),
                    None => problems.push(
                        at("prefer"),
                        format!(
                            "{key:?} takes its value from [service].metadata, and there is no \
                             [service]; write prefer = {{ {key} = \"...\" }}"
                        ),
                    ),
                }
            }
        }
        Some(other) => problems.push(
            at("prefer"),
            format!(
                "expected a table of metadata pairs ({{ zone = \"a\" }}) or an array of \
                 metadata keys ([\"zone\"]), found {}",
                describe(&other)
            ),
        ),
    }
    Prefer {
        metadata,
        min_share,
    }
}

fn describe(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(s) if s.is_empty() => "an empty string",
        other => other.type_str(),
    }
}

/// `slow_start` (a duration, "0s" off) and `slow_start_min`.
pub(super) fn validate_slow_start(
    base: &str,
    duration_text: Option<String>,
    min: Option<toml::Value>,
    problems: &mut Problems,
) -> SlowStart {
    let at = |key: &str| format!("{base}.{key}");
    let defaults = SlowStart::default();
    let ramp = duration(&at("slow_start"), duration_text, "0s", problems);
    if ramp > Duration::from_secs(3600) {
        problems.push(
            at("slow_start"),
            "must be at most 1h (an instance would run below its weight for longer than a deploy takes)",
        );
    }
    if min.is_some() && ramp.is_zero() {
        problems.push(
            at("slow_start_min"),
            "only applies with slow_start (a duration above zero)",
        );
    }
    SlowStart {
        duration: ramp.min(Duration::from_secs(3600)),
        min: fraction(&at("slow_start_min"), min, defaults.min, problems),
    }
}

/// A share between 0 and 1, written as a float or an integer.
fn fraction(path: &str, value: Option<toml::Value>, default: f64, problems: &mut Problems) -> f64 {
    let number = match value {
        None => return default,
        Some(toml::Value::Float(f)) => f,
        Some(toml::Value::Integer(i)) => i as f64,
        Some(other) => {
            problems.push(
                path,
                format!(
                    "expected a number between 0 and 1, found {}",
                    other.type_str()
                ),
            );
            return default;
        }
    };
    if !(0.0..=1.0).contains(&number) {
        problems.push(path, format!("{number} is out of range (0-1)"));
        return default;
    }
    number
}
