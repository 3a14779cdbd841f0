//! The keys of a `kind = "etcd"` registry.

use super::problems::Problems;
use super::raw::RawRegistry;
use super::secret::Secret;
use super::tls::{certificates, identity};
use crate::tls::{Identity, PemFile};

#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// `host:port`, `http://host:port` or, with [`EtcdConfig::tls`],
    /// `https://host:port` (a bare `host:port` is then https too).
    pub endpoints: Vec<String>,
    /// Key prefix without a trailing slash, e.g. `/services`.
    pub prefix: String,
    pub credentials: Option<(String, Secret)>,
    /// TLS to every member: set when an endpoint is `https://` or a CA or
    /// client certificate is configured.
    pub tls: Option<EtcdTls>,
}

/// How squire talks TLS to etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTls {
    /// The CA that signs the members' certificates; `None`: the public
    /// roots.
    pub ca: Option<PemFile>,
    /// The client certificate, for members started with
    /// `--client-cert-auth`.
    pub identity: Option<Identity>,
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
    let ca = certificates(&at("ca"), raw.ca, problems);
    let identity = identity(
        base,
        ("client_cert", raw.client_cert),
        ("client_key", raw.client_key),
        problems,
    );
    // One scheme for all: the members share one set of connect options.
    let tls =
        (ca.is_some() || identity.is_some() || endpoints.iter().any(|e| e.starts_with("https://")))
            .then_some(EtcdTls { ca, identity });
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
        if tls.is_some() && endpoint.starts_with("http://") {
            problems.push(
                path,
                "is http:// while TLS is configured (an https:// endpoint, ca or client_cert); use https:// for every endpoint",
            );
            continue;
        }
        let authority = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"))
            .unwrap_or(endpoint);
        let valid = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            problems.push(
                path,
                format!("{endpoint:?} is not host:port, http://host:port or https://host:port"),
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
        tls,
    }
}
