//! The client side of the admin API, for the CLI: `squire maintenance`,
//! `squire load`, `squire status`, `squire health` and `squire drain`. An agent that
//! listens on an unspecified address (`0.0.0.0`, `::`) is reached on
//! loopback.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::token;
use crate::config::Secret;

/// Where to connect for an admin API bound to `admin`.
fn reachable(admin: SocketAddr) -> SocketAddr {
    match admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, admin.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, admin.port()))
        }
        _ => admin,
    }
}

/// One request: the status and the body, trimmed. `token` is sent as the
/// bearer token when given; its `Err` (why there is none) is reported only
/// once the admin API answered, so an agent that is not running is
/// reported as such.
async fn call(
    admin: SocketAddr,
    method: Method,
    uri: &str,
    token: Option<Result<&Secret, &str>>,
) -> Result<(StatusCode, String), String> {
    send(admin, method, uri, token, Bytes::new()).await
}

/// [`call`] with a request body.
async fn send(
    admin: SocketAddr,
    method: Method,
    uri: &str,
    token: Option<Result<&Secret, &str>>,
    body: Bytes,
) -> Result<(StatusCode, String), String> {
    let admin = reachable(admin);
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|e| format!("cannot reach the admin API at {admin}: {e}"))?;
    let token = token.transpose().map_err(str::to_owned)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let _connection = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(connection));
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(hyper::header::HOST, admin.to_string());
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, token::authorization(token)?);
    }
    let request = request
        .body(http_body_util::Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).trim().to_owned()))
}

/// `PUT /v1/maintenance`, for `squire maintenance`: the agent's answer, or
/// why it could not be had.
pub async fn set_maintenance(
    admin: SocketAddr,
    token: Result<&Secret, &str>,
    enable: bool,
    reason: Option<&str>,
) -> Result<String, String> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("enable", if enable { "true" } else { "false" });
    if let Some(reason) = reason {
        query.append_pair("reason", reason);
    }
    let uri = format!("/v1/maintenance?{}", query.finish());
    let (status, body) = call(admin, Method::PUT, &uri, Some(token)).await?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// `PUT /v1/load` (or `DELETE` with `None`), for `squire load`: the
/// agent's answer, or why it could not be had.
pub async fn set_load(
    admin: SocketAddr,
    token: Result<&Secret, &str>,
    load: Option<(u32, u32)>,
) -> Result<String, String> {
    let (method, body) = match load {
        Some((players, capacity)) => (
            Method::PUT,
            Bytes::from(serde_json::json!({"players": players, "capacity": capacity}).to_string()),
        ),
        None => (Method::DELETE, Bytes::new()),
    };
    let (status, body) = send(admin, method, "/v1/load", Some(token), body).await?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// What `squire health` asks: `/ready` (listeners bound, registered, not
/// draining) or `/live` (the process runs and nothing panicked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Ready,
    Live,
}

/// `GET /ready` or `GET /live`, for `squire health` (a container
/// `HEALTHCHECK`, an exec probe): whether it answered 200, and its answer.
pub async fn health(admin: SocketAddr, probe: Probe) -> Result<(bool, String), String> {
    let path = match probe {
        Probe::Ready => "/ready",
        Probe::Live => "/live",
    };
    let (status, body) = call(admin, Method::GET, path, None).await?;
    Ok((status == StatusCode::OK, body))
}

/// How often `squire drain` reads `/v1/self` while it waits for the
/// registries to hold `draining`.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// `squire drain`, for a Kubernetes `preStop` hook: maintenance on (our
/// instance announced `draining`: peers open no new sessions, open ones
/// continue), then waits until every registry we are registered in holds
/// `draining` (at most `announce_within`), then `settle` more so peers'
/// watches and polls see it before the game starts shutting down. With
/// `players_within`, then waits until the load the game reports
/// (`PUT /v1/load`) says 0 players, at most that long, calling `progress`
/// with a line each time the count changes (and every
/// [`PROGRESS_EVERY`]). What it did, or why it could not: the deadline
/// passing with players left is an error.
pub async fn drain(
    admin: SocketAddr,
    token: Result<&Secret, &str>,
    reason: &str,
    announce_within: Duration,
    settle: Duration,
    players_within: Option<Duration>,
    mut progress: impl FnMut(&str),
) -> Result<String, String> {
    let started = tokio::time::Instant::now();
    set_maintenance(admin, token, true, Some(reason)).await?;
    let deadline = started + announce_within;
    let registries = loop {
        let (code, body) = call(admin, Method::GET, "/v1/self", None).await?;
        if !code.is_success() {
            return Err(format!("GET /v1/self: {code}: {body}"));
        }
        let this: Value = serde_json::from_str(&body).map_err(|e| format!("GET /v1/self: {e}"))?;
        match announced_draining(&this) {
            Ok(registries) => break registries,
            Err(pending) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "maintenance is on, but {pending} did not announce draining within {announce_within:?}"
                ))
            }
            Err(_) => tokio::time::sleep(DRAIN_POLL).await,
        }
    };
    let announced = started.elapsed();
    tokio::time::sleep(settle).await;
    let mut done = format!(
        "draining announced in {registries} registr{} after {announced:?}; waited {settle:?} more for peers to see it",
        if registries == 1 { "y" } else { "ies" },
    );
    if let Some(within) = players_within {
        let waited = wait_for_no_players(admin, within, &mut progress).await?;
        write!(done, "; players reached 0 after {waited:?}").map_err(|e| e.to_string())?;
    }
    Ok(done)
}

/// How often `squire drain --wait` reads the players count.
const PLAYERS_POLL: Duration = Duration::from_millis(200);

/// `squire drain --wait` prints the count at least this often.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Polls `/v1/self` until the reported load says 0 players (how long that
/// took), or `within` passes (an error saying how many are left). No load
/// reported at all is an error at once: there is nothing to wait for. A
/// stale load is waited on (its players are unknown, not gone).
async fn wait_for_no_players(
    admin: SocketAddr,
    within: Duration,
    progress: &mut impl FnMut(&str),
) -> Result<Duration, String> {
    let started = tokio::time::Instant::now();
    let deadline = started + within;
    let mut shown: Option<(u64, bool, tokio::time::Instant)> = None;
    loop {
        let (code, body) = call(admin, Method::GET, "/v1/self", None).await?;
        if !code.is_success() {
            return Err(format!("GET /v1/self: {code}: {body}"));
        }
        let this: Value = serde_json::from_str(&body).map_err(|e| format!("GET /v1/self: {e}"))?;
        let load = &this["load"];
        if load.is_null() {
            return Err(
                "draining, but the game reports no load (PUT /v1/load): nothing to wait for"
                    .to_owned(),
            );
        }
        let players = load["players"].as_u64().unwrap_or(u64::MAX);
        if players == 0 && load["fresh"] == true {
            return Ok(started.elapsed());
        }
        let now = tokio::time::Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(format!(
                "draining, but {players} player(s) still on after {within:?} (maintenance stays on)"
            ));
        }
        let fresh = load["fresh"] == true;
        let due = match shown {
            Some((last, was_fresh, at)) => {
                last != players || was_fresh != fresh || now.duration_since(at) >= PROGRESS_EVERY
            }
            None => true,
        };
        if due {
            let stale = if fresh { "" } else { " (stale)" };
            progress(&format!(
                "waiting: {players}/{} players{stale}, {}s left",
                load["capacity"],
                left.as_secs()
            ));
            shown = Some((players, fresh, now));
        }
        tokio::time::sleep(PLAYERS_POLL.min(left)).await;
    }
}

/// From a `/v1/self` answer: how many registries hold our instance as
/// `draining` when every one we are registered in does (0 without a
/// `[service]`), else the names of those that do not yet.
fn announced_draining(this: &Value) -> Result<usize, String> {
    let registered: Vec<&Value> = this["registrations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["registered"] == true)
        .collect();
    let pending: Vec<&str> = registered
        .iter()
        // The Knight wire form: `status` is Knight's (`unhealthy`),
        // `squire_status` the finer one (`draining`).
        .filter(|r| r["instance"]["squire_status"] != "draining")
        .map(|r| r["name"].as_str().unwrap_or("?"))
        .collect();
    if pending.is_empty() {
        Ok(registered.len())
    } else {
        Err(format!("registry {}", pending.join(", ")))
    }
}

/// What `squire status` read from a running agent.
pub struct Status {
    pub ready: bool,
    /// Why not, from `/ready`.
    pub ready_answer: String,
    pub this: Value,
    pub services: Value,
}

/// Reads `/ready`, `/v1/self` and `/v1/services`.
pub async fn status(admin: SocketAddr) -> Result<Status, String> {
    let (ready, ready_answer) = call(admin, Method::GET, "/ready", None).await?;
    let json = |path: &'static str| async move {
        let (code, body) = call(admin, Method::GET, path, None).await?;
        if !code.is_success() {
            return Err(format!("GET {path}: {code}: {body}"));
        }
        serde_json::from_str::<Value>(&body).map_err(|e| format!("GET {path}: {e}"))
    };
    Ok(Status {
        ready: ready.is_success(),
        ready_answer,
        this: json("/v1/self").await?,
        services: json("/v1/services").await?,
    })
}

impl Status {
    /// The `--json` form: everything read, as read.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "ready": self.ready,
            "ready_answer": self.ready_answer,
            "self": self.this,
            "services": self.services,
        })
    }

    /// Tables like `consul members`: the agent, its registrations, and
    /// each upstream's endpoints.
    pub fn render(&self, admin: SocketAddr) -> String {
        let mut out = String::new();
        let text = |v: &Value| match v {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "agent {admin}: {} (node {}, health {}{})",
            if self.ready { "ready" } else { "NOT READY" },
            text(&self.this["node"]),
            text(&self.this["health"]),
            if self.this["maintenance"]["enabled"] == true {
                format!(
                    ", maintenance: {}",
                    text(&self.this["maintenance"]["reason"])
                )
            } else {
                String::new()
            }
        );
        if !self.ready {
            let _ = writeln!(out, "  /ready: {}", self.ready_answer);
        }
        let mut registrations = vec![vec![
            "REGISTRY".to_owned(),
            "KIND".into(),
            "REGISTERED".into(),
            "STATUS".into(),
            "LEASE".into(),
            "LAST KEEP-ALIVE".into(),
            "LAST ERROR".into(),
        ]];
        for r in self.this["registrations"].as_array().into_iter().flatten() {
            registrations.push(vec![
                text(&r["name"]),
                text(&r["registry"]),
                text(&r["registered"]),
                text(&r["instance"]["status"]),
                text(&r["lease"]),
                text(&r["last_keep_alive"]),
                text(&r["last_error"]),
            ]);
        }
        if registrations.len() > 1 {
            out.push('\n');
            table(&mut out, &registrations);
        }
        for upstream in self.services["upstreams"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "\nupstream {} on {} ({}, {})",
                text(&upstream["service"]),
                text(&upstream["listen"]),
                text(&upstream["protocol"]),
                text(&upstream["strategy"]),
            );
            let mut rows = vec![vec![
                "INSTANCE".to_owned(),
                "ADDRESS".into(),
                "STATUS".into(),
                "ACTIVE".into(),
                "PICKS".into(),
                "EJECTED FOR".into(),
                "LATENCY".into(),
            ]];
            for e in upstream["endpoints"].as_array().into_iter().flatten() {
                rows.push(vec![
                    text(&e["id"]),
                    text(&e["address"]),
                    text(&e["status"]),
                    text(&e["active_connections"]),
                    text(&e["picks"]),
                    e["ejected_for_ms"]
                        .as_u64()
                        .map_or("-".to_owned(), |ms| format!("{ms} ms")),
                    e["latency_estimate_ms"]
                        .as_f64()
                        .map_or("-".to_owned(), |ms| format!("{ms:.1} ms")),
                ]);
            }
            if rows.len() == 1 {
                let _ = writeln!(out, "  no endpoints");
            } else {
                table(&mut out, &rows);
            }
        }
        out
    }
}

/// Rows as columns padded to their widest cell, two spaces apart.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_is_announced_once_every_registered_registry_holds_it() {
        let this = |statuses: &[(&str, bool, &str)]| {
            serde_json::json!({ "registrations": statuses.iter().map(|(name, registered, status)| {
                serde_json::json!({ "name": name, "registered": registered, "instance": { "status": "unhealthy", "squire_status": status } })
            }).collect::<Vec<_>>() })
        };
        assert_eq!(
            announced_draining(&this(&[("a", true, "draining"), ("b", true, "healthy")])),
            Err("registry b".to_owned())
        );
        assert_eq!(
            announced_draining(&this(&[("a", true, "draining"), ("b", false, "healthy")])),
            Ok(1),
            "a registry we are not registered in has nothing to announce"
        );
        assert_eq!(
            announced_draining(&this(&[("a", true, "draining"), ("b", true, "draining")])),
            Ok(2)
        );
        assert_eq!(
            announced_draining(&serde_json::json!({ "registrations": [] })),
            Ok(0)
        );
    }
}
