//! The keys of a `kind = "zookeeper"` registry.

use super::problems::Problems;
use super::raw::RawRegistry;
use super::secret::Secret;

#[derive(Debug, Clone, PartialEq)]
pub struct ZooKeeperConfig {
    /// `host:port` of each server of the ensemble.
    pub servers: Vec<String>,
    /// The znode under which each service has its node, without a trailing
    /// slash, e.g. `/services`.
    pub root: String,
    /// Digest credentials: sent with every session, and our nodes get an
    /// ACL that only this identity may change.
    pub credentials: Option<(String, Secret)>,
}

pub const DEFAULT_ROOT: &str = "/services";
pub const DEFAULT_SERVER: &str = "127.0.0.1:2181";

/// The keys that only `kind = "zookeeper"` takes, those set in `raw`.
pub(super) fn keys_set(raw: &RawRegistry) -> Vec<&'static str> {
    [
        ("servers", raw.servers.is_some()),
        ("root", raw.root.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect()
}

pub(super) fn validate(base: &str, raw: RawRegistry, problems: &mut Problems) -> ZooKeeperConfig {
    let at = |key: &str| format!("{base}.{key}");
    let servers = raw
        .servers
        .unwrap_or_else(|| vec![DEFAULT_SERVER.to_owned()]);
    if servers.is_empty() {
        problems.push(at("servers"), "must list at least one server");
    }
    for (i, server) in servers.iter().enumerate() {
        let path = format!("{base}.servers[{i}]");
        if server.contains('@') {
            // Not shown: the part before '@' may be a password.
            problems.push(
                path,
                "must not hold credentials; set username and password instead",
            );
            continue;
        }
        let valid = !server.contains(['/', ',', ' '])
            && server.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !valid {
            problems.push(path, format!("{server:?} is not host:port"));
        }
    }
    let root = raw.root.unwrap_or_else(|| DEFAULT_ROOT.to_owned());
    let root = root.trim_end_matches('/').to_owned();
    if let Some(reason) = root_problem(&root) {
        problems.push(at("root"), reason);
    }
    let credentials = match (raw.username, raw.password) {
        (Some(user), Some(password)) => {
            if user.is_empty() || user.contains(':') {
                problems.push(
                    at("username"),
                    "must be non-empty and without ':' (digest auth is user:password)",
                );
            }
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
    ZooKeeperConfig {
        servers,
        root,
        credentials,
    }
}

/// Why `root` (trailing slashes removed) is no znode path of ours, if it
/// is not: ZooKeeper refuses empty, `.` and `..` components, and
/// `/zookeeper` is its own.
fn root_problem(root: &str) -> Option<&'static str> {
    if root.is_empty() {
        return Some("must name a node below '/', e.g. \"/services\"");
    }
    if !root.starts_with('/') {
        return Some("must start with '/'");
    }
    if root[1..]
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Some("must not have empty, '.' or '..' components");
    }
    if root == "/zookeeper" || root.starts_with("/zookeeper/") {
        return Some("must not be under /zookeeper (ZooKeeper's own nodes)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::root_problem;

    #[test]
    fn roots_are_znode_paths_of_ours() {
        assert_eq!(root_problem("/services"), None);
        assert_eq!(root_problem("/game/eu"), None);
        assert!(root_problem("services").is_some());
        assert!(root_problem("").is_some());
        assert!(root_problem("/a//b").is_some());
        assert!(root_problem("/a/../b").is_some());
        assert!(root_problem("/zookeeper/quota").is_some());
    }
}
