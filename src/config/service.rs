//! `[service]`: the local instance this squire announces. Its
//! `[[service.check]]` tables are validated in [`super::check`].

use std::collections::BTreeMap;
use std::time::Duration;

use super::check::{self, CheckConfig};
use super::problems::{check_name, duration, required, Problems};
use super::raw::{RawCheck, RawService};

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// All must pass for the instance to be announced healthy. None: the
    /// instance is healthy as soon as it is registered.
    pub checks: Vec<CheckConfig>,
    /// An instance unhealthy for this long is removed from the registry until
    /// it recovers.
    pub deregister_critical_after: Option<Duration>,
    pub name: String,
    pub id: String,
    pub host: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub version: String,
    pub weight: u32,
    pub metadata: BTreeMap<String, String>,
    /// How long a load we publish stays meaningful: a report is re-published
    /// once the published one is half this old (see [`crate::load`]).
    pub load_ttl: Duration,
}

/// `load_ttl` (of `[service]` or an `[[upstream]]`): a duration over zero,
/// default [`crate::load::DEFAULT_TTL`].
pub(super) fn load_ttl(path: &str, raw: Option<String>, problems: &mut Problems) -> Duration {
    let ttl = duration(path, raw, "30s", problems);
    if ttl.is_zero() {
        problems.push(path, "must be greater than zero");
        return crate::load::DEFAULT_TTL;
    }
    ttl
}

pub(super) fn validate_service(
    raw: RawService,
    checks: Vec<(String, RawCheck)>,
    problems: &mut Problems,
) -> ServiceConfig {
    let name = required("service.name", raw.name, problems);
    check_name("service.name", &name, problems);
    let host = required("service.host", raw.host, problems);
    let hostname = |h: &str| {
        h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    if !host.is_empty() && host.parse::<std::net::IpAddr>().is_err() && !hostname(&host) {
        problems.push(
            "service.host",
            format!("{host:?} is not an IP address or a host name"),
        );
    }
    let port = match raw.port {
        Some(port) => u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .unwrap_or_else(|| {
                problems.push("service.port", format!("{port} is not a port (1-65535)"));
                0
            }),
        None => {
            problems.push("service.port", "required");
            0
        }
    };
    let id = match raw.id {
        Some(id) => {
            check_name("service.id", &id, problems);
            id
        }
        None => format!("{name}-{host}-{port}"),
    };
    let weight = match raw.weight {
        None => 100,
        Some(w) => u32::try_from(w).unwrap_or_else(|_| {
            problems.push(
                "service.weight",
                format!("{w} is out of range (0-{})", u32::MAX),
            );
            100
        }),
    };
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let checks = check::validate_checks(checks, &address, problems);
    let deregister_critical_after = raw.deregister_critical_after.map(|text| {
        let after = duration(
            "service.deregister_critical_after",
            Some(text),
            "1m",
            problems,
        );
        if after.is_zero() {
            problems.push(
                "service.deregister_critical_after",
                "must be greater than zero",
            );
        }
        after
    });
    ServiceConfig {
        checks,
        deregister_critical_after,
        name,
        id,
        host,
        port,
        tags: raw.tags.unwrap_or_default(),
        version: raw.version.unwrap_or_else(|| "1.0.0".to_owned()),
        weight,
        metadata: raw.metadata.unwrap_or_default(),
        load_ttl: load_ttl("service.load_ttl", raw.load_ttl, problems),
    }
}
