//! `[agent]`: this squire's own settings (node name, admin address, logging,
//! shutdown timing, runtime threads, where state survives a restart, the
//! admin token).

use std::ffi::CString;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::problems::{cidrs, duration, socket_addr, Problems};
use super::raw::RawAgent;
use super::secret::{read_secret_file, Secret};
use crate::balance::Ranges;

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub node: String,
    pub admin: SocketAddr,
    /// A `tracing` filter directive; `RUST_LOG` overrides it.
    pub log: String,
    pub log_format: LogFormat,
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
    /// After `drain_timeout`, the connections still open are closed in
    /// batches spread over this window (not all in the same millisecond).
    pub drain_spread: Duration,
    /// Runtime worker threads; 0 means one per core.
    pub threads: usize,
    /// Listen backlog of every listener (admin included) unless an
    /// upstream sets its own.
    pub backlog: u32,
    /// Where discovery keeps each service's last known instances, so a
    /// squire restarted during a registry outage still routes; and where a
    /// generated admin token is written.
    pub state_dir: PathBuf,
    /// How often discovery resolves the host names of instances again.
    pub dns_refresh: Duration,
    /// The address ranges every upstream may dial, unless it sets its own.
    pub ranges: Ranges,
    /// `agent.admin_token_file`: where the admin token was read from.
    pub admin_token_file: Option<PathBuf>,
    /// The token read from `admin_token_file` (read again on every load, so
    /// a reload picks up a new one). `None`: squire generates one at
    /// startup (see `admin::token`); only allowed on a loopback `admin`.
    pub admin_token: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

pub(super) fn validate_agent(raw: RawAgent, problems: &mut Problems) -> AgentConfig {
    let node = match raw.node {
        Some(node) if node.trim().is_empty() => {
            problems.push("agent.node", "must not be empty");
            node
        }
        Some(node) => node,
        None => hostname(),
    };
    let admin = socket_addr(
        "agent.admin",
        raw.admin.as_deref().unwrap_or(DEFAULT_ADMIN),
        problems,
    );
    let (admin_token_file, admin_token) = admin_token(admin, raw.admin_token_file, problems);
    let log = raw.log.unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
        problems.push("agent.log", format!("not a log filter: {e}"));
    }
    let log_format = match raw.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.push(
                "agent.log_format",
                format!("unknown format {other:?}; expected \"text\" or \"json\""),
            );
            LogFormat::Text
        }
    };
    let drain_timeout = duration("agent.drain_timeout", raw.drain_timeout, "30s", problems);
    let dns_refresh = duration("agent.dns_refresh", raw.dns_refresh, "30s", problems);
    if dns_refresh < Duration::from_secs(1) {
        problems.push("agent.dns_refresh", "must be at least 1s");
    }
    let ranges = ranges("agent", raw.allow, raw.deny, &Ranges::default(), problems);
    let drain_spread = match raw.drain_spread {
        Some(text) => duration("agent.drain_spread", Some(text), "1s", problems),
        None => default_drain_spread(drain_timeout),
    };
    AgentConfig {
        node,
        admin,
        log,
        log_format,
        drain_delay: duration("agent.drain_delay", raw.drain_delay, "2s", problems),
        drain_timeout,
        drain_spread,
        backlog: backlog("agent.backlog", raw.backlog, problems).unwrap_or_else(default_backlog),
        threads: match raw.threads {
            None => 0,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| *n <= 256)
                .unwrap_or_else(|| {
                    problems.push(
                        "agent.threads",
                        format!("{n} is out of range (0-256; 0 = one per core)"),
                    );
                    0
                }),
        },
        state_dir: match raw.state_dir {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                check_state_dir(&dir, problems);
                dir
            }
            None => default_state_dir(),
        },
        dns_refresh,
        ranges,
        admin_token_file,
        admin_token,
    }
}

/// The shortest admin token accepted from a file.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// `agent.admin_token_file`, read; required when `admin` is not a loopback
/// address (anyone who reaches it could drain this instance or reload it).
fn admin_token(
    admin: SocketAddr,
    file: Option<String>,
    problems: &mut Problems,
) -> (Option<PathBuf>, Option<Secret>) {
    const PATH: &str = "agent.admin_token_file";
    let Some(file) = file else {
        if !admin.ip().is_loopback() {
            problems.push(
                PATH,
                format!(
                    "required because agent.admin ({admin}) is not a loopback address: anyone \
                     who can reach it could put this instance in maintenance or reload it. \
                     Write a random token to a file only squire's user can read \
                     (head -c 32 /dev/urandom | base64 > /etc/squire/admin.token; \
                     chmod 600 /etc/squire/admin.token) and set agent.admin_token_file to \
                     its path, or listen on 127.0.0.1"
                ),
            );
        }
        return (None, None);
    };
    let path = PathBuf::from(file);
    if path.as_os_str().is_empty() {
        problems.push(PATH, "must not be empty");
        return (None, None);
    }
    if !path.is_absolute() {
        problems.push(PATH, format!("{} must be an absolute path", path.display()));
        return (Some(path), None);
    }
    let token = match read_secret_file(&path) {
        Ok(token) => token,
        Err(reason) => {
            problems.push(PATH, reason);
            return (Some(path), None);
        }
    };
    // Not shown: the reasons name the file, never its content.
    if !token.expose().bytes().all(|b| (0x21..0x7f).contains(&b)) {
        problems.push(
            PATH,
            format!(
                "{}: the token must be printable ASCII without spaces (it is sent in an \
                 Authorization header)",
                path.display()
            ),
        );
        return (Some(path), None);
    }
    if token.expose().len() < MIN_ADMIN_TOKEN_LEN {
        problems.push(
            PATH,
            format!(
                "{}: the token has {} characters, fewer than {MIN_ADMIN_TOKEN_LEN}: too easy \
                 to guess; write a random one (head -c 32 /dev/urandom | base64)",
                path.display(),
                token.expose().len()
            ),
        );
        return (Some(path), None);
    }
    (Some(path), Some(token))
}

/// The `allow` and `deny` keys under `base`: each replaces the one of
/// `inherited` when set (an empty list included: `deny = []` denies
/// nothing, `allow = []` allows everything). An `allow` list means only its
/// ranges.
pub(super) fn ranges(
    base: &str,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    inherited: &Ranges,
    problems: &mut Problems,
) -> Ranges {
    let allow = match allow {
        None => inherited.allow.clone(),
        Some(list) if list.is_empty() => None,
        Some(list) => Some(cidrs(&format!("{base}.allow"), list, problems)),
    };
    let deny = match deny {
        None => inherited.deny.clone(),
        Some(list) => cidrs(&format!("{base}.deny"), list, problems),
    };
    Ranges { allow, deny }
}

/// 10% of `drain_timeout`, at least one second.
pub fn default_drain_spread(drain_timeout: Duration) -> Duration {
    (drain_timeout / 10).max(Duration::from_secs(1))
}

/// The first of these this user can write to (or create): `$STATE_DIRECTORY`
/// (systemd's `StateDirectory=`), `/var/lib/squire` (a system service),
/// `$XDG_STATE_HOME/squire`, `~/.local/state/squire`; failing all,
/// `squire-state-{uid}` in the temp directory.
pub fn default_state_dir() -> PathBuf {
    let env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let candidates = [
        // systemd joins several with ':'; the first is ours.
        env("STATE_DIRECTORY")
            .and_then(|v| v.to_string_lossy().split(':').next().map(PathBuf::from)),
        Some(PathBuf::from("/var/lib/squire")),
        env("XDG_STATE_HOME").map(|v| PathBuf::from(v).join("squire")),
        env("HOME").map(|v| PathBuf::from(v).join(".local/state/squire")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.is_absolute() && creatable(dir).is_ok())
        .unwrap_or_else(|| {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            std::env::temp_dir().join(format!("squire-state-{uid}"))
        })
}

/// An explicit `agent.state_dir`: absolute, and a directory this user can
/// write, or one it can create.
fn check_state_dir(dir: &Path, problems: &mut Problems) {
    const PATH: &str = "agent.state_dir";
    if dir.as_os_str().is_empty() {
        problems.push(PATH, "must not be empty");
    } else if !dir.is_absolute() {
        problems.push(PATH, format!("{} must be an absolute path", dir.display()));
    } else if let Err(reason) = creatable(dir) {
        problems.push(PATH, reason);
    }
}

/// Whether `dir` is a writable directory, or could be created: its nearest
/// existing ancestor is a writable directory. Nothing is created here.
fn creatable(dir: &Path) -> Result<(), String> {
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(meta) if !meta.is_dir() => {
                return Err(format!("{} exists and is not a directory", at.display()));
            }
            Ok(_) if writable(at) => return Ok(()),
            Ok(_) if at == dir => return Err(format!("{} is not writable", dir.display())),
            Ok(_) => {
                return Err(format!(
                    "cannot create {}: {} is not writable",
                    dir.display(),
                    at.display()
                ))
            }
            Err(_) => match at.parent() {
                Some(parent) => at = parent,
                None => return Err(format!("cannot create {}", dir.display())),
            },
        }
    }
}

fn writable(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

fn hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|raw| raw.to_string_lossy().into_owned())
}

/// A `backlog` key: 1-65535 when set.
pub(super) fn backlog(path: &str, value: Option<i64>, problems: &mut Problems) -> Option<u32> {
    let n = value?;
    match u32::try_from(n).ok().filter(|n| (1..=65535).contains(n)) {
        Some(n) => Some(n),
        None => {
            problems.push(path, format!("{n} is out of range (1-65535)"));
            None
        }
    }
}

/// 4096 (HAProxy's and nginx's practice), or the kernel's
/// `net.core.somaxconn` if that is lower (the kernel would cap it anyway;
/// saying so keeps `/v1/self` honest).
pub fn default_backlog() -> u32 {
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    somaxconn.map_or(4096, |max| max.clamp(1, 4096))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_problems, problems};
    use super::super::Config;
    use super::*;

    fn state_dir(dir: &str) -> Vec<String> {
        problems(&format!("[agent]\nstate_dir = {:?}\n", dir))
    }

    #[test]
    fn state_dir_must_be_an_absolute_writable_directory() {
        let temp = tempfile::tempdir().expect("tempdir");
        let file = temp.path().join("file");
        std::fs::write(&file, "").expect("write");
        let dir = |p: &Path| p.display().to_string();
        assert_problems(&state_dir(""), &["agent.state_dir: must not be empty"]);
        assert_problems(
            &state_dir("var/squire"),
            &["agent.state_dir: var/squire must be an absolute path"],
        );
        assert_problems(
            &state_dir(&dir(&file)),
            &[&format!(
                "agent.state_dir: {} exists and is not a directory",
                dir(&file)
            )],
        );
        assert_problems(
            &state_dir(&dir(&file.join("below"))),
            &[&format!(
                "agent.state_dir: {} exists and is not a directory",
                dir(&file)
            )],
        );
        // Not created yet is fine: discovery creates it.
        assert!(state_dir(&dir(&temp.path().join("a/b"))).is_empty());
        let config = Config::from_toml(&format!("[agent]\nstate_dir = {:?}\n", dir(temp.path())))
            .expect("valid");
        assert_eq!(config.agent.state_dir, temp.path());
    }

    #[test]
    fn bad_ranges_and_refresh_are_reported_with_their_paths() {
        let found = problems(
            r#"
[agent]
dns_refresh = "500ms"
allow = ["10.0.0.0/8", "10.0.0.1/8"]
deny = ["nonsense"]

[[upstream]]
service = "gate"
listen = "127.0.0.1:7000"
deny = ["169.254.0.0/16", "fe80::/129"]

[[upstream]]
service = "lobby"
listen = "127.0.0.1:7001"
allow = "10.0.0.0/8"
"#,
        );
        assert_problems(
            &found,
            &[
                "agent.dns_refresh: must be at least 1s",
                "agent.allow[1]: \"10.0.0.1/8\" has bits set past the prefix; write 10.0.0.0/8",
                "agent.deny[0]: \"nonsense\" is not an address range",
                "upstream.gate.deny[1]: \"fe80::/129\": the prefix length must be 0-128",
                "upstream.lobby.allow: invalid type: string \"10.0.0.0/8\", expected a sequence",
            ],
        );
    }

    #[test]
    fn an_upstream_range_list_replaces_the_agents() {
        let config = Config::from_toml(
            r#"
[agent]
allow = ["10.0.0.0/8"]
deny = ["10.9.0.0/16"]

[[upstream]]
service = "inherits"
listen = "127.0.0.1:7000"

[[upstream]]
service = "own_deny"
listen = "127.0.0.1:7001"
deny = []

[[upstream]]
service = "own_allow"
listen = "127.0.0.1:7002"
allow = []
"#,
        )
        .expect("valid");
        let cidrs = |texts: &[&str]| -> Vec<crate::balance::policy::Cidr> {
            texts.iter().map(|t| t.parse().expect("cidr")).collect()
        };
        let agent = Ranges {
            allow: Some(cidrs(&["10.0.0.0/8"])),
            deny: cidrs(&["10.9.0.0/16"]),
        };
        assert_eq!(config.agent.ranges, agent);
        assert_eq!(config.upstreams[0].ranges, agent);
        assert_eq!(
            config.upstreams[1].ranges,
            Ranges {
                allow: agent.allow.clone(),
                deny: Vec::new()
            }
        );
        assert_eq!(
            config.upstreams[2].ranges,
            Ranges {
                allow: None,
                deny: agent.deny.clone()
            }
        );
        // Nothing set: link-local denied, everything else allowed, names
        // looked up again every 30s.
        let defaults = Config::from_toml("").expect("valid");
        assert_eq!(defaults.agent.ranges, Ranges::default());
        assert_eq!(defaults.agent.dns_refresh, Duration::from_secs(30));
    }

    #[test]
    fn the_default_state_dir_is_absolute() {
        let config = Config::from_toml("").expect("valid");
        assert!(config.agent.state_dir.is_absolute());
        assert_eq!(config.agent.state_dir, default_state_dir());
    }

    fn token_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("admin.token");
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    fn admin(addr: &str, file: Option<&Path>) -> String {
        let mut text = format!("[agent]\nadmin = {addr:?}\n");
        if let Some(file) = file {
            text.push_str(&format!(
                "admin_token_file = {:?}\n",
                file.display().to_string()
            ));
        }
        text
    }

    #[test]
    fn a_non_loopback_admin_requires_a_token_file() {
        for addr in ["0.0.0.0:9901", "[::]:9901", "10.1.2.3:9901"] {
            let found = problems(&admin(addr, None));
            assert_problems(
                &found,
                &["agent.admin_token_file: required because agent.admin"],
            );
            assert!(
                found[0].contains(addr) && found[0].contains("chmod 600"),
                "{found:?}"
            );
        }
        for addr in ["127.0.0.1:9901", "127.0.0.2:9901", "[::1]:9901"] {
            assert!(problems(&admin(addr, None)).is_empty(), "{addr}");
        }
    }

    #[test]
    fn the_token_file_is_read_and_must_be_private() {
        let dir = tempfile::tempdir().expect("dir");
        let path = token_file(dir.path(), "0123456789abcdef-token\n", 0o600);
        let config = Config::from_toml(&admin("0.0.0.0:9901", Some(&path))).expect("valid");
        assert_eq!(
            config.agent.admin_token_file.as_deref(),
            Some(path.as_path())
        );
        assert_eq!(
            config.agent.admin_token.as_ref().map(Secret::expose),
            Some("0123456789abcdef-token")
        );
        assert!(!format!("{config:?}").contains("0123456789abcdef"));

        token_file(dir.path(), "0123456789abcdef-token\n", 0o644);
        let found = problems(&admin("0.0.0.0:9901", Some(&path)));
        assert_problems(&found, &["agent.admin_token_file: "]);
        assert!(
            found[0].contains("mode 0644") && found[0].contains("chmod 600"),
            "{found:?}"
        );
        assert!(!found[0].contains("0123456789abcdef"), "{found:?}");
    }

    #[test]
    fn a_token_must_be_long_printable_and_its_path_absolute() {
        let dir = tempfile::tempdir().expect("dir");
        let path = token_file(dir.path(), "short", 0o600);
        let found = problems(&admin("127.0.0.1:9901", Some(&path)));
        assert_problems(&found, &["agent.admin_token_file: "]);
        assert!(found[0].contains("fewer than 16"), "{found:?}");
        assert!(!found[0].contains("short"), "{found:?}");
        token_file(dir.path(), "with a space in the middle", 0o600);
        let found = problems(&admin("127.0.0.1:9901", Some(&path)));
        assert!(found[0].contains("printable ASCII"), "{found:?}");
        assert!(!found[0].contains("middle"), "{found:?}");
        assert_problems(
            &problems("[agent]\nadmin_token_file = \"admin.token\"\n"),
            &["agent.admin_token_file: admin.token must be an absolute path"],
        );
        let missing = dir.path().join("missing");
        let found = problems(&admin("127.0.0.1:9901", Some(&missing)));
        assert!(found[0].contains("No such file"), "{found:?}");
    }
}
