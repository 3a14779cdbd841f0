//! `[registry] kind = "consul"`: its keys, and what Consul will refuse of
//! the `[service]` section, found here rather than at the first registration.

use std::path::PathBuf;
use std::time::Duration;

use super::problems::{duration, Problems};
use super::raw::RawRegistry;
use super::secret::Secret;
use super::service::ServiceConfig;
use super::tls::identity;
use crate::registry::consul::{meta_problem, MAX_META_PAIRS, MAX_WAIT};
use crate::tls::{load_ca, Identity};

pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:8500";

#[derive(Debug, Clone, PartialEq)]
pub struct ConsulConfig {
    /// `http://host:port` or `https://host:port`, without a trailing slash.
    pub address: String,
    /// ACL token, sent as `X-Consul-Token`; `None` is the anonymous token.
    pub token: Option<Secret>,
    /// `?dc=` on every query; `None` is the agent's own datacenter.
    pub datacenter: Option<String>,
    /// How long one blocking query may wait for a change (at most 10m).
    pub wait: Duration,
    /// `DeregisterCriticalServiceAfter` of our TTL check.
    pub deregister_critical_after: Duration,
    /// PEM file of the CA that signs the agent's certificate (https only).
    pub ca: Option<PathBuf>,
    /// Accept any certificate (https only; explicit opt-in).
    pub tls_skip_verify: bool,
    /// A client certificate, for an agent that verifies incoming
    /// certificates (https only).
    pub identity: Option<Identity>,
}

impl ConsulConfig {
    pub fn https(&self) -> bool {
        self.address.starts_with("https://")
    }
}

/// The keys that only `kind = "consul"` takes, those set in `raw` (the
/// TLS keys `ca`, `client_cert` and `client_key` are etcd's too).
pub(super) fn keys_set(raw: &RawRegistry) -> Vec<&'static str> {
    [
        ("address", raw.address.is_some()),
        ("token", raw.token.is_some()),
        ("datacenter", raw.datacenter.is_some()),
        ("wait", raw.wait.is_some()),
        (
            "deregister_critical_after",
            raw.deregister_critical_after.is_some(),
        ),
        ("tls_skip_verify", raw.tls_skip_verify.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect()
}

/// The consul keys of the registry whose problems go under `base`.
pub(super) fn validate(base: &str, raw: RawRegistry, problems: &mut Problems) -> ConsulConfig {
    let at = |key: &str| format!("{base}.{key}");
    let address = raw.address.unwrap_or_else(|| DEFAULT_ADDRESS.to_owned());
    let address = match normalize_address(&address) {
        Ok(address) => address,
        Err(reason) => {
            problems.push(at("address"), reason);
            DEFAULT_ADDRESS.to_owned()
        }
    };
    let https = address.starts_with("https://");

    let token = match raw.token {
        None => None,
        // The value itself never goes into a message.
        Some(token) if token.expose().is_empty() => {
            problems.push(
                at("token"),
                "must not be empty; leave it out for the anonymous token",
            );
            None
        }
        Some(token) if !token.expose().bytes().all(|b| (0x21..0x7f).contains(&b)) => {
            problems.push(
                at("token"),
                "must be printable ASCII without spaces (it goes in an HTTP header)",
            );
            None
        }
        Some(token) => Some(token),
    };

    let datacenter = match raw.datacenter {
        None => None,
        Some(dc) if dc.is_empty() => {
            problems.push(at("datacenter"), "must not be empty");
            None
        }
        Some(dc) => {
            if !dc
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                problems.push(
                    at("datacenter"),
                    format!("{dc:?} is not a datacenter name; use letters, digits and - _ ."),
                );
            }
            Some(dc)
        }
    };

    let wait = duration(&at("wait"), raw.wait, "5m", problems);
    if wait < Duration::from_secs(1) || wait > MAX_WAIT {
        problems.push(
            at("wait"),
            "must be between 1s and 10m (Consul caps blocking queries at 10m)",
        );
    }

    let deregister_critical_after = duration(
        &at("deregister_critical_after"),
        raw.deregister_critical_after,
        "1m",
        problems,
    );
    if deregister_critical_after < Duration::from_secs(60) {
        problems.push(
            at("deregister_critical_after"),
            "must be at least 1m (Consul raises anything shorter to 1m)",
        );
    }

    let ca = match raw.ca {
        None => None,
        Some(path) if path.is_empty() => {
            problems.push(at("ca"), "must not be empty");
            None
        }
        Some(path) => {
            let path = PathBuf::from(path);
            if !https {
                problems.push(at("ca"), "only applies to an https:// address");
            } else if let Err(reason) = load_ca(&path) {
                problems.push(at("ca"), reason.to_string());
            }
            Some(path)
        }
    };
    let tls_skip_verify = raw.tls_skip_verify.unwrap_or(false);
    if raw.tls_skip_verify.is_some() && !https {
        problems.push(at("tls_skip_verify"), "only applies to an https:// address");
    } else if tls_skip_verify && ca.is_some() {
        problems.push(
            at("tls_skip_verify"),
            "cannot be combined with ca: either verify against the CA or skip verification",
        );
    }

    let client_cert_set = raw.client_cert.is_some() || raw.client_key.is_some();
    let identity = identity(
        base,
        ("client_cert", raw.client_cert),
        ("client_key", raw.client_key),
        problems,
    );
    if client_cert_set && !https {
        problems.push(at("client_cert"), "only applies to an https:// address");
    }

    ConsulConfig {
        address,
        token,
        datacenter,
        wait,
        deregister_critical_after,
        ca,
        tls_skip_verify,
        identity,
    }
}

/// `http(s)://host[:port]` with nothing after the authority but an optional
/// `/`; returned without the slash.
fn normalize_address(address: &str) -> Result<String, String> {
    if address.contains('@') {
        // Not shown: the part before '@' is a password.
        return Err(
            "must not hold credentials (user:password@); set token for Consul's ACLs".to_owned(),
        );
    }
    let bad = || format!("{address:?} is not http://host:port or https://host:port");
    let uri: hyper::Uri = address.parse().map_err(|_| bad())?;
    let scheme = match uri.scheme_str() {
        Some(s @ ("http" | "https")) => s,
        _ => return Err(bad()),
    };
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.host().is_empty() {
        return Err(bad());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{address:?} must not have a path or query"));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// What Consul would refuse of our service definition: Meta keys and sizes
/// (the version travels in `Meta["version"]`), weights, a wildcard address.
pub(super) fn check_service(service: &ServiceConfig, problems: &mut Problems) {
    for (key, value) in &service.metadata {
        let path = if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !key.is_empty()
        {
            format!("service.metadata.{key}")
        } else {
            format!("service.metadata.{key:?}")
        };
        if key == "version" {
            problems.push(
                path,
                "is reserved with kind = \"consul\": the version travels in Meta[\"version\"]; set service.version",
            );
        } else if let Some(reason) = meta_problem(key, value) {
            problems.push(path, format!("Consul would refuse it: {reason}"));
        }
    }
    if let Some(reason) = meta_problem("version", &service.version) {
        problems.push(
            "service.version",
            format!("Consul would refuse it: {reason}"),
        );
    }
    if service.metadata.len() + 1 > MAX_META_PAIRS {
        problems.push(
            "service.metadata",
            format!(
                "at most {} pairs with kind = \"consul\" (Consul takes {MAX_META_PAIRS}, one is the version)",
                MAX_META_PAIRS - 1
            ),
        );
    }
    if service.weight == 0 || service.weight > 65535 {
        problems.push(
            "service.weight",
            format!(
                "{} is out of range for Consul weights (1-65535)",
                service.weight
            ),
        );
    }
    if matches!(service.host.as_str(), "0.0.0.0" | "::" | "[::]") {
        problems.push(
            "service.host",
            "Consul refuses an unspecified address; give the address peers connect to",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{assert_problems, problems};
    use crate::config::{Config, RegistryBackend};

    fn consul(text: &str) -> ConsulConfig {
        match Config::from_toml(text).expect("valid").registries[0]
            .backend
            .clone()
        {
            RegistryBackend::Consul(consul) => consul,
            other => panic!("consul expected, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let config = consul("[registry]\nkind = \"consul\"\n");
        assert_eq!(config.address, "http://127.0.0.1:8500");
        assert_eq!(config.wait, Duration::from_secs(300));
        assert_eq!(config.deregister_critical_after, Duration::from_secs(60));
        assert!(config.token.is_none() && config.datacenter.is_none() && config.ca.is_none());
        assert!(!config.tls_skip_verify);
    }

    #[test]
    fn address_is_normalized() {
        let config = consul("[registry]\nkind = \"consul\"\naddress = \"https://consul.local:8501/\"\ntls_skip_verify = true\n");
        assert_eq!(config.address, "https://consul.local:8501");
        assert!(config.https() && config.tls_skip_verify);
    }

    #[test]
    fn every_key_is_checked() {
        let found = problems(
            r#"
            [registry]
            kind = "consul"
            address = "consul:8500"
            token = "two words"
            datacenter = "dc 1"
            wait = "11m"
            deregister_critical_after = "30s"
            ca = "/nonexistent/ca.pem"
            tls_skip_verify = true
            endpoints = ["http://127.0.0.1:2379"]
            dir = "/tmp/x"
            "#,
        );
        let expected = [
            "registry.address: \"consul:8500\" is not http://host:port",
            "registry.token: must be printable ASCII",
            "registry.datacenter: \"dc 1\" is not a datacenter name",
            "registry.wait: must be between 1s and 10m",
            "registry.deregister_critical_after: must be at least 1m",
            "registry.ca: only applies to an https:// address",
            "registry.tls_skip_verify: only applies to an https:// address",
            "registry.endpoints: only applies to kind = \"etcd\"",
            "registry.dir: only applies to kind = \"local\"",
        ];
        assert_problems(&found, &expected);
        assert!(!found.iter().any(|p| p.contains("two words")), "{found:#?}");
    }

    #[test]
    fn consul_keys_are_refused_for_other_kinds() {
        let found = problems("[registry]\nkind = \"etcd\"\ntoken = \"t\"\nwait = \"1m\"\n");
        assert_eq!(
            found,
            [
                "registry.token: only applies to kind = \"consul\"",
                "registry.wait: only applies to kind = \"consul\""
            ]
        );
        let found = problems("[registry]\naddress = \"http://127.0.0.1:8500\"\n");
        assert_eq!(
            found,
            ["registry.address: only applies to kind = \"consul\" or \"nacos\""]
        );
    }

    #[test]
    fn ca_must_hold_a_certificate_and_excludes_skip_verify() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let found = problems(&format!(
            "[registry]\nkind = \"consul\"\naddress = \"https://127.0.0.1:8501\"\nca = \"{}\"\ntls_skip_verify = true\n",
            empty.display()
        ));
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].starts_with("registry.ca: ") && found[0].contains("no certificate"));
        assert!(found[1].starts_with("registry.tls_skip_verify: cannot be combined with ca"));
    }

    #[test]
    fn service_meta_is_checked_against_consul_rules() {
        let long = "x".repeat(513);
        let found = problems(&format!(
            r#"
            [registry]
            kind = "consul"
            [service]
            name = "a"
            host = "0.0.0.0"
            port = 1
            weight = 70000
            metadata = {{ "bad key" = "v", "consul-x" = "v", version = "2", ok = "{long}", "" = "v" }}
            "#
        ));
        let expected = [
            "service.metadata.\"\": Consul would refuse it: Key cannot be blank",
            "service.metadata.\"bad key\": Consul would refuse it: Key contains invalid characters",
            "service.metadata.\"consul-x\": Consul would refuse it: Key prefix 'consul-' is reserved",
            "service.metadata.ok: Consul would refuse it: Value is too long",
            "service.metadata.version: is reserved with kind = \"consul\"",
            "service.weight: 70000 is out of range for Consul weights",
            "service.host: Consul refuses an unspecified address",
        ];
        assert_problems(&found, &expected);
        // The same metadata is fine for etcd.
        assert!(problems(
            "[service]\nname = \"a\"\nhost = \"h\"\nport = 1\nmetadata = { \"bad key\" = \"v\" }\n"
        )
        .is_empty());
    }

    #[test]
    fn token_never_prints() {
        let config =
            Config::from_toml("[registry]\nkind = \"consul\"\ntoken = \"b1gs3cr3t-acl-token\"\n")
                .expect("valid");
        assert!(!format!("{config:?}").contains("b1gs3cr3t"));
        let RegistryBackend::Consul(consul) = config.registries[0].backend.clone() else {
            panic!("consul expected");
        };
        assert_eq!(
            consul.token.as_ref().map(Secret::expose),
            Some("b1gs3cr3t-acl-token")
        );
    }
}
