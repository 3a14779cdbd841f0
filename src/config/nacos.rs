//! `[registry] kind = "nacos"`: its keys, and what Nacos (or squire's
//! mapping onto Nacos metadata) would refuse of the `[service]` section,
//! found here rather than at the first registration.

use std::time::Duration;

use super::problems::{duration, Problems};
use super::raw::RawRegistry;
use super::secret::Secret;
use super::service::ServiceConfig;
use crate::registry::nacos::{MAX_WEIGHT, RESERVED_METADATA};

pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:8848";
pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
/// Nacos 2.x serves gRPC on its HTTP port plus this.
pub const GRPC_PORT_OFFSET: u16 = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct NacosConfig {
    /// `http://host:port` or `https://host:port` of the Nacos server (the
    /// Open API is under `/nacos/v1` there), without a trailing slash.
    pub address: String,
    /// `namespaceId` on every call; `None` is the server's public namespace.
    pub namespace: Option<String>,
    /// `groupName` of our registration and of every service watched.
    pub group: String,
    /// Nacos auth: `POST /nacos/v1/auth/login` with these, then the
    /// `accessToken` it gives on every call. `None`: auth is off.
    pub credentials: Option<(String, Secret)>,
    /// How often a watch lists its service again: the whole of discovery
    /// with `push` off, the safety net under it with `push` on.
    pub poll_interval: Duration,
    /// Subscribe to changes over Nacos 2.x's gRPC connection (a change
    /// then makes the watch list at once instead of at the next poll).
    /// Default on for an `http://` address; over `https://` it is off and
    /// cannot be turned on (squire's gRPC client speaks plain HTTP/2).
    pub push: bool,
    /// The server's gRPC port: `grpc_port`, else Nacos's convention of the
    /// HTTP port plus 1000 (8848 -> 9848).
    pub grpc_port: u16,
}

impl NacosConfig {
    pub fn https(&self) -> bool {
        self.address.starts_with("https://")
    }
}

/// The keys that only `kind = "nacos"` takes, those set in `raw`. `address`
/// (shared with Consul), `group` (with local) and `username`/`password`
/// (with etcd) are checked by the kinds that share them.
pub(super) fn keys_set(raw: &RawRegistry) -> Vec<&'static str> {
    [
        ("namespace", raw.namespace.is_some()),
        ("poll_interval", raw.poll_interval.is_some()),
        ("push", raw.push.is_some()),
        ("grpc_port", raw.grpc_port.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect()
}

/// The nacos keys of the registry whose problems go under `base`.
pub(super) fn validate(base: &str, raw: RawRegistry, problems: &mut Problems) -> NacosConfig {
    let at = |key: &str| format!("{base}.{key}");
    let address = raw.address.unwrap_or_else(|| DEFAULT_ADDRESS.to_owned());
    let address = match normalize_address(&address) {
        Ok(address) => address,
        Err(reason) => {
            problems.push(at("address"), reason);
            DEFAULT_ADDRESS.to_owned()
        }
    };

    let namespace = raw.namespace.filter(|namespace| {
        let valid = !namespace.is_empty() && namespace.chars().all(name_char);
        if !valid {
            problems.push(
                at("namespace"),
                format!("{namespace:?} is not a namespace id; use letters, digits and - _ . :"),
            );
        }
        valid
    });
    let group = match raw.group {
        None => DEFAULT_GROUP.to_owned(),
        Some(group) => {
            if group.is_empty() || !group.chars().all(name_char) {
                problems.push(
                    at("group"),
                    format!("{group:?} is not a Nacos group name; use letters, digits and - _ . :"),
                );
            }
            group
        }
    };

    let credentials = match (raw.username, raw.password) {
        (Some(user), Some(password)) => {
            if user.is_empty() {
                problems.push(at("username"), "must not be empty");
            }
            // The value itself never goes into a message.
            if password.expose().is_empty() {
                problems.push(at("password"), "must not be empty");
            }
            Some((user, password))
        }
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

    let poll_interval = duration(&at("poll_interval"), raw.poll_interval, "2s", problems);
    if poll_interval < Duration::from_millis(100) || poll_interval > Duration::from_secs(300) {
        problems.push(at("poll_interval"), "must be between 100ms and 5m");
    }

    let https = address.starts_with("https://");
    let push = match raw.push {
        Some(true) if https => {
            problems.push(
                at("push"),
                "needs an http:// address: squire's Nacos gRPC client has no TLS (set push = false)",
            );
            false
        }
        Some(push) => push,
        None => !https,
    };
    let grpc_port = match raw.grpc_port {
        Some(port) => u16::try_from(port)
            .ok()
            .filter(|port| *port != 0)
            .unwrap_or_else(|| {
                problems.push(at("grpc_port"), format!("{port} is not a port (1-65535)"));
                0
            }),
        None => {
            let http_port = address
                .parse::<hyper::Uri>()
                .ok()
                .and_then(|uri| uri.port_u16())
                .unwrap_or(if https { 443 } else { 80 });
            http_port.checked_add(GRPC_PORT_OFFSET).unwrap_or_else(|| {
                if push {
                    problems.push(
                        at("grpc_port"),
                        format!(
                            "required: the HTTP port {http_port} plus {GRPC_PORT_OFFSET} is not a port"
                        ),
                    );
                }
                0
            })
        }
    };

    NacosConfig {
        address,
        namespace,
        group,
        credentials,
        poll_interval,
        push,
        grpc_port,
    }
}

/// Nacos's own rule for namespace ids and group names (letters, digits and
/// `-_.:`): anything else it refuses, or could not be put in a URL as is.
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
}

/// `http(s)://host[:port]` with nothing after the authority but an optional
/// `/` or `/nacos`; returned without either.
fn normalize_address(address: &str) -> Result<String, String> {
    if address.contains('@') {
        // Not shown: the part before '@' is a password.
        return Err(
            "must not hold credentials (user:password@); set username and password instead"
                .to_owned(),
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
    if !matches!(uri.path(), "" | "/" | "/nacos" | "/nacos/") || uri.query().is_some() {
        return Err(format!(
            "{address:?} must not have a path (other than /nacos) or query"
        ));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// What Nacos would refuse of our instance, or what would collide with the
/// metadata keys squire's mapping uses.
pub(super) fn check_service(service: &ServiceConfig, problems: &mut Problems) {
    for key in service.metadata.keys() {
        if RESERVED_METADATA.contains(&key.as_str()) || key.starts_with("preserved.") {
            problems.push(
                format!("service.metadata.{key:?}"),
                "is reserved with kind = \"nacos\": squire carries the instance's id, tags, version and status, and Nacos its heartbeat settings, in these metadata keys",
            );
        }
    }
    if service.weight == 0 || service.weight > MAX_WEIGHT {
        problems.push(
            "service.weight",
            format!(
                "{} is out of range for Nacos weights (1-{MAX_WEIGHT})",
                service.weight
            ),
        );
    }
    if matches!(service.host.as_str(), "0.0.0.0" | "::" | "[::]") {
        problems.push(
            "service.host",
            "Nacos would announce an unspecified address; give the address peers connect to",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{assert_problems, problems};
    use crate::config::{Config, RegistryBackend};

    fn nacos(text: &str) -> NacosConfig {
        match Config::from_toml(text).expect("valid").registries[0]
            .backend
            .clone()
        {
            RegistryBackend::Nacos(nacos) => nacos,
            other => panic!("nacos expected, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let config = nacos("[registry]\nkind = \"nacos\"\n");
        assert_eq!(config.address, "http://127.0.0.1:8848");
        assert_eq!(config.group, "DEFAULT_GROUP");
        assert_eq!(config.poll_interval, Duration::from_secs(2));
        assert!(config.namespace.is_none() && config.credentials.is_none());
        assert!(config.push);
        assert_eq!(config.grpc_port, 9848);
        // Over https push is off unless asked for (and then refused).
        let config = nacos("[registry]\nkind = \"nacos\"\naddress = \"https://n:443\"\n");
        assert!(!config.push);
        assert_eq!(config.grpc_port, 1443);
    }

    #[test]
    fn every_key_is_read() {
        let config = nacos(
            r#"
            [registry]
            kind = "nacos"
            address = "https://nacos.local:8848/nacos"
            namespace = "dev-1"
            group = "GAME"
            username = "squire"
            password = "pw"
            poll_interval = "500ms"
            push = false
            grpc_port = 19848
            "#,
        );
        assert!(!config.push);
        assert_eq!(config.grpc_port, 19848);
        assert_eq!(config.address, "https://nacos.local:8848");
        assert!(config.https());
        assert_eq!(config.namespace.as_deref(), Some("dev-1"));
        assert_eq!(config.group, "GAME");
        let (user, password) = config.credentials.expect("credentials");
        assert_eq!((user.as_str(), password.expose()), ("squire", "pw"));
        assert_eq!(config.poll_interval, Duration::from_millis(500));
    }

    #[test]
    fn every_key_is_checked() {
        let found = problems(
            r#"
            [registry]
            kind = "nacos"
            address = "nacos:8848"
            namespace = "a b"
            group = ""
            password = "s3cr3t-nacos"
            poll_interval = "10ms"
            push = true
            grpc_port = 70000
            endpoints = ["http://127.0.0.1:2379"]
            token = "t"
            dir = "/tmp/x"
            "#,
        );
        let expected = [
            "registry.dir: only applies to kind = \"local\"",
            "registry.endpoints: only applies to kind = \"etcd\"",
            "registry.token: only applies to kind = \"consul\"",
            "registry.address: \"nacos:8848\" is not http://host:port",
            "registry.namespace: \"a b\" is not a namespace id",
            "registry.group: \"\" is not a Nacos group name",
            "registry.username: required when password is set",
            "registry.poll_interval: must be between 100ms and 5m",
            "registry.grpc_port: 70000 is not a port (1-65535)",
        ];
        assert_problems(&found, &expected);
        assert!(!found.iter().any(|p| p.contains("s3cr3t")), "{found:#?}");
        let found =
            problems("[registry]\nkind = \"nacos\"\naddress = \"https://n:8848\"\npush = true\n");
        assert_problems(&found, &["registry.push: needs an http:// address"]);
    }

    #[test]
    fn nacos_keys_are_refused_for_other_kinds() {
        let found = problems(
            "[registry]\nkind = \"etcd\"\nnamespace = \"n\"\npoll_interval = \"1s\"\npush = true\ngrpc_port = 9848\n",
        );
        assert_eq!(
            found,
            [
                "registry.poll_interval: only applies to kind = \"eureka\" or \"nacos\"",
                "registry.namespace: only applies to kind = \"nacos\"",
                "registry.push: only applies to kind = \"nacos\"",
                "registry.grpc_port: only applies to kind = \"nacos\""
            ]
        );
    }

    #[test]
    fn service_is_checked_against_the_mapping() {
        let found = problems(
            r#"
            [registry]
            kind = "nacos"
            [service]
            name = "a"
            host = "0.0.0.0"
            port = 1
            weight = 20000
            metadata = { tags = "x", squire_status = "y", "preserved.heart.beat.timeout" = "1", zone = "a" }
            "#,
        );
        let expected = [
            "service.metadata.\"preserved.heart.beat.timeout\": is reserved with kind = \"nacos\"",
            "service.metadata.\"squire_status\": is reserved with kind = \"nacos\"",
            "service.metadata.\"tags\": is reserved with kind = \"nacos\"",
            "service.weight: 20000 is out of range for Nacos weights (1-10000)",
            "service.host: Nacos would announce an unspecified address",
        ];
        assert_problems(&found, &expected);
    }

    #[test]
    fn password_never_prints() {
        let config = Config::from_toml(
            "[registry]\nkind = \"nacos\"\nusername = \"u\"\npassword = \"b1gs3cr3t-nacos\"\n",
        )
        .expect("valid");
        assert!(!format!("{config:?}").contains("b1gs3cr3t"));
    }
}
