//! `[registry] kind = "eureka"`: the server's service URL and how often
//! discovery polls it.

use std::time::Duration;

use super::problems::{duration, Problems};
use super::raw::RawRegistry;

pub const DEFAULT_URL: &str = "http://127.0.0.1:8761/eureka";

#[derive(Debug, Clone, PartialEq)]
pub struct EurekaConfig {
    /// The service URL (Spring's `defaultZone`), `http(s)://host:port/path`
    /// without a trailing slash: operations are under `{url}/apps`.
    pub url: String,
    /// How often discovery fetches the registry's changes.
    pub poll_interval: Duration,
}

/// The keys that only `kind = "eureka"` takes, those set in `raw`.
pub(super) fn keys_set(raw: &RawRegistry) -> Vec<&'static str> {
    [
        ("url", raw.url.is_some()),
        ("poll_interval", raw.poll_interval.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect()
}

pub(super) fn validate(base: &str, raw: &mut RawRegistry, problems: &mut Problems) -> EurekaConfig {
    let at = |key: &str| format!("{base}.{key}");
    let url = raw.url.take().unwrap_or_else(|| DEFAULT_URL.to_owned());
    let url = match normalize_url(&url) {
        Ok(url) => url,
        Err(reason) => {
            problems.push(at("url"), reason);
            DEFAULT_URL.to_owned()
        }
    };
    let poll_interval = duration(
        &at("poll_interval"),
        raw.poll_interval.take(),
        "5s",
        problems,
    );
    if poll_interval < Duration::from_millis(100) {
        problems.push(at("poll_interval"), "must be at least 100ms");
    }
    EurekaConfig { url, poll_interval }
}

fn normalize_url(url: &str) -> Result<String, String> {
    if url.contains('@') {
        // Not shown: the part before '@' is a password.
        return Err("must not hold credentials (user:password@)".to_owned());
    }
    let bad = || format!("{url:?} is not http(s)://host:port/path");
    let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad());
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err(bad());
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} must not have a query"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::problems;
    use crate::config::{Config, RegistryBackend};

    #[test]
    fn defaults_and_normalization() {
        let config = Config::from_toml(
            "[registry]\nkind = \"eureka\"\nurl = \"http://eureka.local:8761/eureka/\"\n",
        )
        .expect("valid");
        let RegistryBackend::Eureka(eureka) = &config.registries[0].backend else {
            panic!("eureka expected");
        };
        assert_eq!(eureka.url, "http://eureka.local:8761/eureka");
        assert_eq!(eureka.poll_interval, Duration::from_secs(5));
    }

    #[test]
    fn every_key_is_checked_and_belongs_to_eureka() {
        let found = problems(
            "[registry]\nkind = \"eureka\"\nurl = \"eureka:8761\"\npoll_interval = \"10ms\"\nendpoints = [\"http://127.0.0.1:2379\"]\n",
        );
        assert_eq!(
            found,
            [
                "registry.endpoints: only applies to kind = \"etcd\"",
                "registry.url: \"eureka:8761\" is not http(s)://host:port/path",
                "registry.poll_interval: must be at least 100ms",
            ]
        );
        let found = problems("[registry]\nkind = \"etcd\"\nurl = \"http://e:8761/eureka\"\n");
        assert_eq!(found, ["registry.url: only applies to kind = \"eureka\""]);
        let found =
            problems("[registry]\nkind = \"eureka\"\nurl = \"http://u:secretpw@e:8761/eureka\"\n");
        assert_eq!(
            found,
            ["registry.url: must not hold credentials (user:password@)"]
        );
    }
}
