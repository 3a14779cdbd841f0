//! The keys of a `kind = "etcd"` registry.

use super::problems::Problems;
use super::raw::RawRegistry;
use super::secret::Secret;

#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// `host:port` or `http://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix without a trailing slash, e.g. `/services`.
    pub prefix: String,
    pub credentials: Option<(String, Secret)>,
}

pub const DEFAULT_PREFIX: &str = "/services";

pub(super) fn validate_etcd(base: &str, raw: RawRegistry, problems: &mut Problems) -> EtcdConfig {
    let at = |key: &str| format!("{base}.{key}");
    let endpoints = raw
        .endpoints
        .unwrap_or_else(|| vec!["http://127.0.0.1:2379".to_owned()]);
    if endpoints.is_empty() {
        problems.push(at("endpoints"), "must list at least one endpoint");
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        let path = format!("{base}.endpoints[{i}]");
        if endpoint.contains('@') {
            // Not shown: the part before '@' is a password.
            problems.push(
                path,
                "must not hold credentials (user:password@); set username and password instead",
            );
            continue;
        }
        if endpoint.starts_with("https://") {
            problems.push(path, "TLS to etcd is not supported yet; use http://");
            continue;
        }
        let authority = endpoint.strip_prefix("http://").unwrap_or(endpoint);
        let valid = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            problems.push(
                path,
                format!("{endpoint:?} is not host:port or http://host:port"),
            );
        }
    }
    let prefix = raw.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
    let prefix = prefix.trim_end_matches('/').to_owned();
    if !prefix.starts_with('/') {
        problems.push(at("prefix"), "must start with '/'");
    }
    let credentials = match (raw.username, raw.password) {
        (Some(user), Some(password)) => Some((user, password)),
        (None, None) => None,
        (Some(_), None) => {
            problems.push(at("password"), "required when username is set");
            None
        }
        (None, Some(_)) => {
            problems.push(at("username"), "required when password is set");
            None
        }
    };
    EtcdConfig {
        endpoints,
        prefix,
        credentials,
    }
}
