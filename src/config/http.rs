//! The options of `protocol = "http"` upstreams.

use std::time::Duration;

use super::problems::{check_name, duration, Problems};
use super::raw::{RawRoute, RawUpstream};

#[derive(Debug, Clone, PartialEq)]
pub struct HttpUpstreamConfig {
    /// Speak HTTP/2 (prior knowledge) to the instances instead of HTTP/1.1.
    pub upstream_h2: bool,
    /// Until the response headers arrive (per attempt): 504 after it.
    pub request_timeout: Duration,
    /// A client must send its request headers within this.
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per instance.
    pub pool_max_idle: usize,
    /// Set `Host` to the instance's address instead of keeping the client's.
    pub rewrite_host: bool,
    /// Retries allowed as a share of requests (0.2: at most 20% extra).
    pub retry_budget: f64,
    /// Checked in order before the upstream's own service.
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Matched against the request's host without port, case-insensitively;
    /// `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub service: String,
}

impl RouteConfig {
    pub fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_matches = match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(host)) => want.eq_ignore_ascii_case(host),
            (Some(_), None) => false,
        };
        host_matches && path.starts_with(self.path_prefix.as_str())
    }
}

/// Takes the http-only keys out of `raw`: validated into a config when
/// `http`, reported as misplaced otherwise.
pub(super) fn validate(
    base: &str,
    raw: &mut RawUpstream,
    http: bool,
    problems: &mut Problems,
) -> Option<HttpUpstreamConfig> {
    let at = |key: &str| format!("{base}.{key}");
    if !http {
        let set = [
            ("upstream_protocol", raw.upstream_protocol.is_some()),
            ("request_timeout", raw.request_timeout.is_some()),
            ("header_read_timeout", raw.header_read_timeout.is_some()),
            ("max_header_bytes", raw.max_header_bytes.is_some()),
            ("pool_idle_timeout", raw.pool_idle_timeout.is_some()),
            ("pool_max_idle", raw.pool_max_idle.is_some()),
            ("rewrite_host", raw.rewrite_host.is_some()),
            ("retry_budget", raw.retry_budget.is_some()),
            ("route", raw.route.is_some()),
        ];
        for (key, set) in set {
            if set {
                problems.push(at(key), "only applies to protocol = \"http\"");
            }
        }
        return None;
    }
    let upstream_h2 = match raw.upstream_protocol.as_deref() {
        None | Some("http1") => false,
        Some("h2") => true,
        Some(other) => {
            problems.push(
                at("upstream_protocol"),
                format!("unknown {other:?}; expected \"http1\" or \"h2\""),
            );
            false
        }
    };
    let positive = |key: &str, value: Option<String>, default: &str, problems: &mut Problems| {
        let d = duration(&at(key), value, default, problems);
        if d.is_zero() {
            problems.push(at(key), "must be greater than zero");
        }
        d
    };
    let count = |key: &str,
                 value: Option<i64>,
                 default: usize,
                 range: std::ops::RangeInclusive<usize>,
                 problems: &mut Problems| {
        match value {
            None => default,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| range.contains(n))
                .unwrap_or_else(|| {
                    problems.push(
                        at(key),
                        format!("{n} is out of range ({}-{})", range.start(), range.end()),
                    );
                    default
                }),
        }
    };
    let retry_budget = raw.retry_budget.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&retry_budget) {
        problems.push(
            at("retry_budget"),
            format!("{retry_budget} is out of range (0.0-1.0)"),
        );
    }
    let routes = raw
        .route
        .take()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, route)| validate_route(&format!("{base}.route[{i}]"), route, problems))
        .collect();
    Some(HttpUpstreamConfig {
        upstream_h2,
        request_timeout: positive(
            "request_timeout",
            raw.request_timeout.take(),
            "30s",
            problems,
        ),
        header_read_timeout: positive(
            "header_read_timeout",
            raw.header_read_timeout.take(),
            "10s",
            problems,
        ),
        max_header_bytes: count(
            "max_header_bytes",
            raw.max_header_bytes,
            64 * 1024,
            8192..=1024 * 1024,
            problems,
        ),
        pool_idle_timeout: positive(
            "pool_idle_timeout",
            raw.pool_idle_timeout.take(),
            "90s",
            problems,
        ),
        pool_max_idle: count("pool_max_idle", raw.pool_max_idle, 64, 0..=10_000, problems),
        rewrite_host: raw.rewrite_host.unwrap_or(false),
        retry_budget,
        routes,
    })
}

fn validate_route(path: &str, raw: RawRoute, problems: &mut Problems) -> RouteConfig {
    let service = match raw.service {
        Some(service) if !service.is_empty() => service,
        _ => {
            problems.push(format!("{path}.service"), "required");
            String::new()
        }
    };
    check_name(&format!("{path}.service"), &service, problems);
    if raw.host.is_none() && raw.path_prefix.is_none() {
        problems.push(
            path.to_owned(),
            "matches everything: give it a host, a path_prefix or both",
        );
    }
    let path_prefix = raw.path_prefix.unwrap_or_else(|| "/".to_owned());
    if !path_prefix.starts_with('/') {
        problems.push(
            format!("{path}.path_prefix"),
            format!("{path_prefix:?} must start with '/'"),
        );
    }
    RouteConfig {
        host: raw.host.map(|h| h.to_ascii_lowercase()),
        path_prefix,
        service,
    }
}
