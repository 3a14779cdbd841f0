//! The admin token: what the mutating endpoints (`PUT /v1/maintenance`,
//! `POST /v1/reload`, `POST /v1/catalog/{service}/{id}/failed`) require as `Authorization: Bearer <token>`, where it
//! comes from, and the check.
//!
//! The token is read from `agent.admin_token_file` when that is set (it must
//! be when the admin API listens beyond loopback). Otherwise squire makes
//! one at startup, 32 random bytes in hex, and writes it 0600 to
//! `{state_dir}/admin-{port}.token`, where `squire maintenance` (run as
//! squire's user, or root) finds it; the file is removed on a clean stop.
//! Loopback is no exemption: any local user can reach 127.0.0.1, so a
//! generated token is required as a configured one is (Consul's ACLs work
//! alike: a request from the agent's own host needs a token all the same).
//! Reads stay open: probes and Prometheus use them.
//!
//! A wrong or missing token is answered 401 with `WWW-Authenticate:
//! Bearer`, counted (`squire_admin_denied_total{reason}`) and logged at most
//! once per [`DENIED_LOG_INTERVAL`], without the token it carried.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::HeaderMap;

use crate::config::{read_secret_file, AgentConfig, Secret};
use crate::time::LogThrottle;

/// The token the mutating endpoints require, and where it came from.
#[derive(Debug)]
pub struct AdminToken {
    secret: Secret,
    /// The file squire wrote it to, when squire generated it.
    generated: Option<PathBuf>,
    /// The bound admin address (names the generated file).
    admin: SocketAddr,
}

impl AdminToken {
    /// The token of an agent whose admin API is bound to `admin`: the
    /// configured one, or a new one written to [`generated_path`].
    pub fn for_agent(agent: &AgentConfig, admin: SocketAddr) -> Result<AdminToken, String> {
        match &agent.admin_token {
            Some(secret) => Ok(AdminToken {
                secret: secret.clone(),
                generated: None,
                admin,
            }),
            None => {
                let path = generated_path(&agent.state_dir, admin.port());
                let secret = generate();
                write_private(&path, &secret).map_err(|e| {
                    format!(
                        "cannot write the generated admin token to {}: {e}; make agent.state_dir \
                         writable or set agent.admin_token_file",
                        path.display()
                    )
                })?;
                tracing::info!(file = %path.display(), "admin token generated; squire maintenance reads it from there");
                Ok(AdminToken {
                    secret,
                    generated: Some(path),
                    admin,
                })
            }
        }
    }

    /// The token after a reload to `agent`: `None` to keep this one (a
    /// generated token stays while no file is configured).
    pub fn reloaded(&self, agent: &AgentConfig) -> Result<Option<AdminToken>, String> {
        match (&agent.admin_token, &self.generated) {
            (None, Some(_)) => Ok(None),
            (Some(secret), _) if *secret == self.secret && self.generated.is_none() => Ok(None),
            _ => AdminToken::for_agent(agent, self.admin).map(Some),
        }
    }

    /// A token of the unit tests, from no file.
    #[cfg(test)]
    pub(crate) fn for_tests(secret: &str) -> AdminToken {
        AdminToken {
            secret: Secret::new(secret),
            generated: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 9901)),
        }
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Removes the generated file, if squire wrote one (a clean stop, or a
    /// configured file took over).
    pub fn remove_generated(&self) {
        if let Some(path) = &self.generated {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::debug!(file = %path.display(), error = %e, "cannot remove the generated admin token");
            }
        }
    }

    /// Whether `headers` carry this token as `Authorization: Bearer`.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let token = bearer(headers).ok_or(Denied::Missing)?;
        if self.secret.matches(token) {
            Ok(())
        } else {
            Err(Denied::Wrong)
        }
    }
}

/// Why a request was refused: the `reason` label of
/// `squire_admin_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token, not ours.
    Wrong,
}

impl Denied {
    pub fn reason(self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Wrong => "wrong",
        }
    }
}

/// At most one log line about denied admin requests in this interval.
pub const DENIED_LOG_INTERVAL: Duration = Duration::from_secs(10);

static DENIED_LOG: LogThrottle = LogThrottle::new(DENIED_LOG_INTERVAL);

/// Counts a refused request and logs it (throttled; never the token it
/// carried).
pub(super) fn record(denied: Denied, method: &str, path: &str, client: SocketAddr) {
    let reason = denied.reason();
    metrics::counter!(crate::metrics::ADMIN_DENIED, "reason" => reason).increment(1);
    if let Some(since_last_log) = DENIED_LOG.due() {
        tracing::warn!(%client, method, path, reason, since_last_log, "admin request denied: no valid admin token");
    }
}

/// `WWW-Authenticate` of a 401 (RFC 6750).
pub(super) const CHALLENGE: &str = "Bearer realm=\"squire admin\"";

/// The body of a 401.
pub(super) const DENIED_BODY: &str = "this endpoint needs the admin token: send \
    Authorization: Bearer <token> (squire maintenance does; see agent.admin_token_file)\n";

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive, RFC 9110).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The header a client sends.
pub fn authorization(token: &Secret) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .map_err(|_| "the admin token is not a valid header value".to_owned())?;
    value.set_sensitive(true);
    Ok(value)
}

/// Where squire writes the token it generated for the admin API on `port`:
/// one file per port, so several squires may share a state directory.
pub fn generated_path(state_dir: &Path, port: u16) -> PathBuf {
    state_dir.join(format!("admin-{port}.token"))
}

/// The token a client of the admin API at `admin` sends: the one read from
/// `agent.admin_token_file`, else the one the agent generated.
pub fn client_token(agent: &AgentConfig, admin: SocketAddr) -> Result<Secret, String> {
    if let Some(token) = &agent.admin_token {
        return Ok(token.clone());
    }
    let path = generated_path(&agent.state_dir, admin.port());
    read_secret_file(&path).map_err(|e| {
        format!(
            "cannot read the admin token the agent generated: {e}; run this as squire's user \
             (or root), or pass --token-file"
        )
    })
}

/// 32 random bytes from the OS, hex: 64 characters.
fn generate() -> Secret {
    let bytes: [u8; 32] = rand::random();
    let mut hex = String::with_capacity(64);
    for byte in bytes {
        hex.push_str(&format!("{byte:02x}"));
    }
    Secret::new(hex)
}

/// Writes `secret` to `path` 0600, atomically: a temp file opened
/// `O_CREAT|O_EXCL|O_NOFOLLOW` (a planted file or symlink is removed, never
/// written through), then renamed. Creates the directory 0700 if needed.
fn write_private(path: &Path, secret: &Secret) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let temp = path.with_extension("token.tmp");
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW);
    let mut file = match options.open(&temp) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&temp)?;
            options.open(&temp)?
        }
        other => other?,
    };
    let written = file
        .write_all(secret.expose().as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        // Best effort: the temp file holds the secret; the error that
        // matters is the one returned.
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("value"));
        headers
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let token = AdminToken::for_tests("0123456789abcdef");
        assert_eq!(token.check(&HeaderMap::new()), Err(Denied::Missing));
        assert_eq!(
            token.check(&headers("Basic 0123456789abcdef")),
            Err(Denied::Missing)
        );
        assert_eq!(token.check(&headers("Bearer ")), Err(Denied::Missing));
        assert_eq!(
            token.check(&headers("Bearer 0123456789abcdeF")),
            Err(Denied::Wrong)
        );
        assert_eq!(
            token.check(&headers("Bearer 0123456789abcde")),
            Err(Denied::Wrong)
        );
        assert_eq!(token.check(&headers("Bearer 0123456789abcdef")), Ok(()));
        assert_eq!(token.check(&headers("bearer  0123456789abcdef ")), Ok(()));
    }

    #[test]
    fn a_generated_token_is_written_private_and_replaces_a_planted_file() {
        let dir = tempfile::tempdir().expect("dir");
        let state = dir.path().join("state");
        let path = generated_path(&state, 9901);
        // A symlink planted where the temp file goes is not written through.
        std::fs::create_dir_all(&state).expect("dir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").expect("write");
        std::os::unix::fs::symlink(&victim, path.with_extension("token.tmp")).expect("symlink");

        let secret = generate();
        assert_eq!(secret.expose().len(), 64);
        assert_ne!(secret, generate(), "random");
        write_private(&path, &secret).expect("written");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_secret_file(&path).expect("read back"), secret);
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "untouched"
        );
    }
}
