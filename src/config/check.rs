//! `[[service.check]]`: how squire probes the local service.

use std::path::PathBuf;
use std::time::Duration;

use super::problems::{duration, Problems};
use super::raw::{ExecCommand, RawCheck};
use super::secret::Secret;
use super::section;

#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    /// Unique among the service's checks: labels metrics and `/v1/self`.
    pub name: String,
    /// Time between probes while the check passes (jittered by ±10%).
    pub interval: Duration,
    /// Time between probes while it does not (default: `interval`).
    pub unhealthy_interval: Duration,
    /// Bound on one probe; less than both intervals.
    pub timeout: Duration,
    /// Consecutive passes that make the check pass.
    pub rise: u32,
    /// Consecutive failures that make it fail.
    pub fall: u32,
    pub probe: ProbeConfig,
    /// Take the game's load from the probe's output (`players=N
    /// capacity=M`, or a JSON object with those keys; see
    /// [`crate::load::from_output`]); exec, http and https only.
    pub load_from_output: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProbeConfig {
    Http(HttpProbeConfig),
    Tcp {
        address: String,
        send: Option<Vec<u8>>,
        expect: Option<Vec<u8>>,
    },
    /// A datagram `send` to `address` gets a reply starting with `expect`
    /// (any reply when `None`) within the timeout.
    Udp {
        address: String,
        send: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
    Grpc {
        address: String,
        /// Empty: the server's overall health.
        service: String,
    },
    Exec {
        program: String,
        args: Vec<String>,
    },
}

impl ProbeConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeConfig::Http(http) if http.tls.is_some() => "https",
            ProbeConfig::Http(_) => "http",
            ProbeConfig::Tcp { .. } => "tcp",
            ProbeConfig::Udp { .. } => "udp",
            ProbeConfig::Grpc { .. } => "grpc",
            ProbeConfig::Exec { .. } => "exec",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpProbeConfig {
    /// `host:port` to connect to.
    pub address: String,
    pub tls: Option<ProbeTls>,
    pub method: String,
    pub path: String,
    /// Values are secrets: they may carry credentials (`Authorization`).
    pub headers: Vec<(String, Secret)>,
    /// Statuses that pass; empty means any 2xx or 3xx.
    pub expect_status: Vec<u16>,
    pub body_contains: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeTls {
    pub ca: Option<PathBuf>,
    /// Name to verify the certificate against; default: the address's host.
    pub server_name: Option<String>,
    pub skip_verify: bool,
}

/// `[[service.check]]` (or a single `[service.check]` table), each named by
/// its `name` when it has one so problems point at the right check.
pub(super) fn read_checks(value: toml::Value, problems: &mut Problems) -> Vec<(String, RawCheck)> {
    let items = match value {
        toml::Value::Array(items) => items,
        table @ toml::Value::Table(_) => vec![table],
        _ => {
            problems.push(
                "service.check",
                "must be a table or an array of tables ([[service.check]])",
            );
            return Vec::new();
        }
    };
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let path = match item.get("name").and_then(|n| n.as_str()) {
                Some(name) if !name.is_empty() => format!("service.check.{name}"),
                _ => format!("service.check[{i}]"),
            };
            section(&path, item, problems).map(|check| (path, check))
        })
        .collect()
}

/// Validates every check. `default_address` is the service's `host:port`.
pub(super) fn validate_checks(
    raws: Vec<(String, RawCheck)>,
    default_address: &str,
    problems: &mut Problems,
) -> Vec<CheckConfig> {
    let mut checks: Vec<CheckConfig> = Vec::new();
    for (path, raw) in raws {
        let Some(check) = validate_check(&path, raw, default_address, problems) else {
            continue;
        };
        if checks.iter().any(|c| c.name == check.name) {
            problems.push(
                format!("{path}.name"),
                format!("{:?} is used by another check", check.name),
            );
        }
        checks.push(check);
    }
    checks
}

const KINDS: &str = "\"http\", \"https\", \"tcp\", \"udp\", \"grpc\" or \"exec\"";

fn validate_check(
    path: &str,
    mut raw: RawCheck,
    default_address: &str,
    problems: &mut Problems,
) -> Option<CheckConfig> {
    let at = |key: &str| format!("{path}.{key}");
    let kind = raw.kind.take();
    let Some(kind) = kind.as_deref() else {
        problems.push(at("kind"), format!("required: {KINDS}"));
        return None;
    };
    // Each key belongs to some kinds; any other use is a mistake worth saying.
    let allowed: &[&str] = match kind {
        "http" => &[
            "method",
            "path",
            "headers",
            "expect_status",
            "body_contains",
            "load_from_output",
        ],
        "https" => &[
            "method",
            "path",
            "headers",
            "expect_status",
            "body_contains",
            "ca",
            "server_name",
            "tls_skip_verify",
            "load_from_output",
        ],
        "tcp" | "udp" => &["send", "expect"],
        "grpc" => &["grpc_service"],
        "exec" => &["command", "shell", "load_from_output"],
        other => {
            problems.push(
                at("kind"),
                format!("unknown kind {other:?}; expected {KINDS}"),
            );
            return None;
        }
    };
    let specific = [
        ("method", raw.method.is_some()),
        ("path", raw.path.is_some()),
        ("headers", raw.headers.is_some()),
        ("expect_status", raw.expect_status.is_some()),
        ("body_contains", raw.body_contains.is_some()),
        ("ca", raw.ca.is_some()),
        ("server_name", raw.server_name.is_some()),
        ("tls_skip_verify", raw.tls_skip_verify.is_some()),
        ("send", raw.send.is_some()),
        ("expect", raw.expect.is_some()),
        ("grpc_service", raw.grpc_service.is_some()),
        ("command", raw.command.is_some()),
        ("shell", raw.shell.is_some()),
        ("load_from_output", raw.load_from_output.is_some()),
        ("address", raw.address.is_some() && kind == "exec"),
    ];
    for (key, set) in specific {
        if set && !allowed.contains(&key) {
            problems.push(at(key), format!("does not apply to kind = {kind:?}"));
        }
    }

    let interval = duration(&at("interval"), raw.interval.take(), "5s", problems);
    let timeout = duration(&at("timeout"), raw.timeout.take(), "2s", problems);
    let unhealthy_interval = match raw.unhealthy_interval.take() {
        Some(text) => duration(&at("unhealthy_interval"), Some(text), "5s", problems),
        None => interval,
    };
    if timeout.is_zero() {
        problems.push(at("timeout"), "must be greater than zero");
    }
    if timeout >= interval {
        problems.push(
            at("timeout"),
            format!(
                "must be less than interval ({})",
                humantime::format_duration(interval)
            ),
        );
    }
    if timeout >= unhealthy_interval && unhealthy_interval != interval {
        problems.push(
            at("timeout"),
            format!(
                "must be less than unhealthy_interval ({})",
                humantime::format_duration(unhealthy_interval)
            ),
        );
    }
    let threshold =
        |key: &str, value: Option<i64>, default: u32, problems: &mut Problems| match value {
            None => default,
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (1..=100).contains(n))
                .unwrap_or_else(|| {
                    problems.push(at(key), format!("{n} is out of range (1-100)"));
                    default
                }),
        };
    let rise = threshold("rise", raw.rise, 2, problems);
    let fall = threshold("fall", raw.fall, 3, problems);

    let name = raw.name.take().unwrap_or_else(|| kind.to_owned());
    let address = raw
        .address
        .take()
        .unwrap_or_else(|| default_address.to_owned());
    if kind != "exec"
        && !address
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    {
        problems.push(at("address"), format!("{address:?} is not host:port"));
    }
    let load_from_output = raw.load_from_output.unwrap_or(false);
    let probe = match kind {
        "http" | "https" => {
            ProbeConfig::Http(validate_http(path, raw, address, kind == "https", problems))
        }
        "tcp" => ProbeConfig::Tcp {
            address,
            send: raw.send.map(String::into_bytes),
            expect: raw.expect.map(String::into_bytes),
        },
        "udp" => {
            let send = match raw.send {
                Some(send) if !send.is_empty() => send.into_bytes(),
                _ => {
                    problems.push(
                        at("send"),
                        "required for kind = \"udp\": the datagram the service answers",
                    );
                    Vec::new()
                }
            };
            ProbeConfig::Udp {
                address,
                send,
                expect: raw.expect.map(String::into_bytes),
            }
        }
        "grpc" => ProbeConfig::Grpc {
            address,
            service: raw.grpc_service.unwrap_or_default(),
        },
        _ => validate_exec(path, raw.command, raw.shell.unwrap_or(false), problems)?,
    };
    if name.is_empty() {
        problems.push(at("name"), "must not be empty");
    }
    Some(CheckConfig {
        name,
        interval,
        unhealthy_interval,
        timeout,
        rise,
        fall,
        probe,
        load_from_output,
    })
}

fn validate_http(
    path: &str,
    raw: RawCheck,
    address: String,
    https: bool,
    problems: &mut Problems,
) -> HttpProbeConfig {
    let at = |key: &str| format!("{path}.{key}");
    let method = raw.method.unwrap_or_else(|| "GET".to_owned());
    if hyper::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
        problems.push(at("method"), format!("{method:?} is not an HTTP method"));
    }
    let request_path = raw.path.unwrap_or_else(|| "/".to_owned());
    if !request_path.starts_with('/') || request_path.parse::<hyper::Uri>().is_err() {
        problems.push(
            at("path"),
            format!("{request_path:?} is not a path like /health"),
        );
    }
    let headers: Vec<(String, Secret)> = raw.headers.unwrap_or_default().into_iter().collect();
    for (name, value) in &headers {
        if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            problems.push(at("headers"), format!("{name:?} is not a header name"));
        }
        if hyper::header::HeaderValue::from_str(value.expose()).is_err() {
            problems.push(
                at("headers"),
                format!("the value of {name:?} is not a valid header value"),
            );
        }
    }
    let expect_status = raw
        .expect_status
        .unwrap_or_default()
        .into_iter()
        .filter_map(|code| match u16::try_from(code) {
            Ok(code) if (100..=599).contains(&code) => Some(code),
            _ => {
                problems.push(
                    at("expect_status"),
                    format!("{code} is not an HTTP status (100-599)"),
                );
                None
            }
        })
        .collect();
    let tls = https.then(|| ProbeTls {
        ca: raw.ca.map(PathBuf::from),
        server_name: raw.server_name,
        skip_verify: raw.tls_skip_verify.unwrap_or(false),
    });
    if let Some(ProbeTls { ca: Some(ca), .. }) = &tls {
        if let Err(e) = crate::tls::load_ca(ca) {
            problems.push(at("ca"), e.to_string());
        }
    }
    HttpProbeConfig {
        address,
        tls,
        method,
        path: request_path,
        headers,
        expect_status,
        body_contains: raw.body_contains,
    }
}

fn validate_exec(
    path: &str,
    command: Option<ExecCommand>,
    shell: bool,
    problems: &mut Problems,
) -> Option<ProbeConfig> {
    let at = format!("{path}.command");
    let command = match command {
        // One command line, as the shell form is written most naturally.
        Some(ExecCommand::Line(line)) if shell => Some(vec![line]),
        Some(ExecCommand::Line(_)) => {
            problems.push(
                at,
                "a string is a shell command line: set shell = true, or give the program and its arguments as an array",
            );
            return None;
        }
        Some(ExecCommand::Argv(argv)) => Some(argv),
        None => None,
    };
    let Some(mut command) = command.filter(|c| !c.is_empty() && !c[0].is_empty()) else {
        problems.push(
            at,
            "required: the program and its arguments, e.g. [\"/usr/local/bin/check\", \"--fast\"]",
        );
        return None;
    };
    if shell {
        if command.len() != 1 {
            problems.push(
                at,
                "with shell = true, give the whole command line as one string (or a one-item array)",
            );
            return None;
        }
        return Some(ProbeConfig::Exec {
            program: "/bin/sh".to_owned(),
            args: vec!["-c".to_owned(), command.remove(0)],
        });
    }
    let program = command.remove(0);
    Some(ProbeConfig::Exec {
        program,
        args: command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::problems;
    use crate::config::Config;

    fn exec_probe(command: &str) -> ProbeConfig {
        let text = format!(
            "[service]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 1\n[[service.check]]\nkind = \"exec\"\n{command}\n"
        );
        let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}"));
        config.service.expect("service").checks[0].probe.clone()
    }

    #[test]
    fn a_udp_check_sends_bytes_and_expects_a_prefix() {
        let service = "[service]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 7000\n[[service.check]]\nkind = \"udp\"\n";
        let config = Config::from_toml(&format!("{service}send = \"ping\"\nexpect = \"pong\"\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        let check = &config.service.expect("service").checks[0];
        assert_eq!(check.probe.kind(), "udp");
        assert_eq!(
            check.probe,
            ProbeConfig::Udp {
                address: "127.0.0.1:7000".into(),
                send: b"ping".to_vec(),
                expect: Some(b"pong".to_vec()),
            }
        );
        assert_eq!(
            problems(service),
            ["service.check[0].send: required for kind = \"udp\": the datagram the service answers"]
        );
        assert_eq!(
            problems(&format!("{service}send = \"ping\"\npath = \"/\"\n")),
            ["service.check[0].path: does not apply to kind = \"udp\""]
        );
    }

    #[test]
    fn the_shell_form_takes_a_string_or_a_one_item_array() {
        let expected = ProbeConfig::Exec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "test -f /tmp/ok && echo up".into()],
        };
        assert_eq!(
            exec_probe("shell = true\ncommand = \"test -f /tmp/ok && echo up\""),
            expected
        );
        assert_eq!(
            exec_probe("shell = true\ncommand = [\"test -f /tmp/ok && echo up\"]"),
            expected
        );
        assert_eq!(
            exec_probe("command = [\"/bin/check\", \"--fast\"]"),
            ProbeConfig::Exec {
                program: "/bin/check".into(),
                args: vec!["--fast".into()]
            }
        );
        let found = problems(
            "[service]\nname = \"a\"\nhost = \"h\"\nport = 1\n[[service.check]]\nkind = \"exec\"\ncommand = \"check --fast\"\n",
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("set shell = true"), "{found:?}");
    }
}
