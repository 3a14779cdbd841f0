//! squire: a per-host sidecar for game-server fleets.
//!
//! One squire runs next to each game process. It registers the local service
//! into a registry and keeps it registered, discovers the other services by
//! watching the registry, and proxies localhost ports to live instances of
//! them.
//!
//! # Layout
//!
//! - [`config`]: `agent.toml`, validated in one pass that reports every problem.
//! - [`agent`]: wires the tasks together; owns startup, reload and shutdown order.
//! - [`registry`]: the backend seam (`etcd`, `consul`, `eureka`, `zookeeper`, `nacos`, `local`) and the instance format.
//! - [`registration`]: keeps our instance registered through outages and lease loss.
//! - [`health`]: probes of the local service and the rise/fall verdict.
//! - [`discovery`]: registry watches turned into [`balance::Upstream`] snapshots
//!   and each service's catalog view ([`discovery::CatalogFeed`]).
//! - [`balance`]: upstreams, snapshots, per-endpoint stats and the strategies that pick.
//! - [`proxy`]: the request path every listener shares: the accept loop
//!   ([`proxy::listener`]), the attempt loop ([`proxy::attempts`]), and the
//!   TCP, HTTP and UDP handlers ([`proxy::udp`]: one receive loop, a session
//!   per client address).
//! - [`admin`]: `/live`, `/ready`, `/metrics`, `/v1/services`, `/v1/self`,
//!   maintenance, `/v1/reload`, the `/v1/catalog` discovery API; its read model [`admin::AgentState`]; the
//!   admin token the mutating endpoints require ([`admin::AdminToken`]).
//! - [`reload`]: reloading `agent.toml` while running (SIGHUP, `POST /v1/reload`).
//! - [`load`]: the load a game process reports, its freshness and when it is worth publishing.
//! - [`liveness`]: a panic anywhere is recorded and fails `/live`.
//! - [`metrics`]: every metric name in one place.
//! - [`time`]: sleeps that end at shutdown, the one token bucket, RFC 3339.
//! - [`backoff`]: jittered exponential backoff for the retry loops.
//! - [`tls`]: rustls setup shared by probes, registries and TLS listeners
//!   and upstreams; certificate and key files read at configuration load.
//! - [`fuzzing`]: the entry points of the fuzz targets in `fuzz/`.
//!
//! [`run`] takes the shutdown trigger as a parameter, so a test (or another
//! program) can start and stop a whole agent in-process.

// STYLE.md's rules that lints can keep (see also clippy.toml): no unwrap
// outside tests, tokio's clock and sleeps in async code.
#![deny(clippy::unwrap_used, clippy::disallowed_methods)]

pub mod admin;
pub mod agent;
pub mod backoff;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod fuzzing;
pub mod health;
pub mod init;
pub mod liveness;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod process;
pub mod proxy;
pub mod registration;
pub mod registry;
pub mod reload;
pub mod time;
pub mod tls;

/// The commit squire was built from (`git rev-parse --short=12`, `-dirty`
/// with uncommitted changes; `SQUIRE_COMMIT` at build time overrides it;
/// `unknown` without either).
pub const COMMIT: &str = env!("SQUIRE_COMMIT");

pub use agent::{run, Agent, AgentError};
pub use config::{Config, ConfigError};
