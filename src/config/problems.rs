//! What validation reports ([`Problem`], [`ConfigError`]) and the field
//! readers every section shares: each one records a problem with its dotted
//! path and returns a usable value, so validation goes on to the end.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::balance::policy::Cidr;

/// One thing wrong with the file: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not valid TOML: {0}")]
    Syntax(String),
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), ProblemList(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The problems found, empty for read and syntax errors.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            _ => &[],
        }
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {problem}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

pub(super) fn required(path: &str, value: Option<String>, problems: &mut Problems) -> String {
    match value {
        Some(v) if !v.is_empty() => v,
        Some(v) => {
            problems.push(path, "must not be empty");
            v
        }
        None => {
            problems.push(path, "required");
            String::new()
        }
    }
}

/// Service names and ids become registry keys and file names: keep them to a
/// safe alphabet.
pub(super) fn check_name(path: &str, value: &str, problems: &mut Problems) {
    if value.is_empty() {
        return; // reported by `required`
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        problems.push(
            path,
            format!("{value:?} contains {bad:?}; use letters, digits and - _ . :"),
        );
    } else if value.starts_with('.') {
        problems.push(path, format!("{value:?} must not start with '.'"));
    }
}

pub(super) fn duration(
    path: &str,
    value: Option<String>,
    default: &str,
    problems: &mut Problems,
) -> Duration {
    let text = value.as_deref().unwrap_or(default);
    let fallback = || humantime::parse_duration(default).unwrap_or_default();
    match humantime::parse_duration(text) {
        Ok(d) if d > MAX_DURATION => {
            problems.push(
                path,
                format!(
                    "{text:?} is too long: at most {}",
                    humantime::format_duration(MAX_DURATION)
                ),
            );
            fallback()
        }
        Ok(d) => d,
        Err(e) => {
            problems.push(
                path,
                format!("{text:?} is not a duration ({e}); write e.g. \"5s\" or \"250ms\""),
            );
            fallback()
        }
    }
}

/// The longest duration any key takes. Anything longer is a typo (an
/// extra digit, `h` for `s`), and past a few centuries `Instant + d`
/// overflows and panics in a task.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

pub(super) fn socket_addr(path: &str, text: &str, problems: &mut Problems) -> SocketAddr {
    text.parse().unwrap_or_else(|_| {
        problems.push(
            path,
            format!("{text:?} is not an address like 127.0.0.1:7001"),
        );
        unspecified()
    })
}

/// An address range list (`allow`, `deny`): each bad entry reported with
/// its index, `upstream.gate.deny[1]: ...`.
pub(super) fn cidrs(path: &str, values: Vec<String>, problems: &mut Problems) -> Vec<Cidr> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, text)| match text.parse::<Cidr>() {
            Ok(cidr) => Some(cidr),
            Err(reason) => {
                problems.push(format!("{path}[{i}]"), reason);
                None
            }
        })
        .collect()
}

pub(super) fn unspecified() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
