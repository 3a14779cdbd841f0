//! etcd backend: one key per instance under a lease, prefix watches.
//!
//! Key `{prefix}/{service}/{id}`, value the [`Instance`] JSON, attached to a
//! lease of `ttl` seconds. etcd-client has no reconnect, re-watch or
//! re-keep-alive of its own; this module reports every failure as a
//! [`RegistryError`] and the supervising loops recover.
//!
//! # Several members
//!
//! `members` keeps **one client per member** and sends everything to one
//! *active* member; a call or stream that fails with `Unavailable` marks its
//! member down, and the next call probes all members at once and moves to
//! the first that answers a linearizable read. Chosen over etcd-client's
//! balanced channel (tonic's p2c over all endpoints), which never evicts a
//! dead endpoint, sends a share of calls and retries to a frozen member, and
//! lets nobody say which member a stream is on; and over reconnecting
//! through the endpoint list in turn, which tries members one by one,
//! each silent one costing a whole timeout. With one active member the
//! keep-alive stream, the watches and the re-grant after "lease not found"
//! all go to a member that just answered.
//!
//! How each kind of silence is found:
//! - the keep-alive reply is awaited ttl/3 (and at most the registry
//!   timeout), then renewed at once on another member: a lease is never
//!   lost while a majority is up;
//! - a watch silent for a ttl asks for progress, which any live member
//!   answers at once; no answer within ttl/3 ends the watch and marks its
//!   member down;
//! - every unary call is bounded by the registry timeout, a probe by ttl/3;
//! - HTTP/2 keep-alive (6 s ping, etcd drops clients that ping more often
//!   than its 5 s `grpc-keepalive-min-time`) closes dead connections below
//!   that; require-leader makes a member without a leader fail calls at once.
//!
//! Listings are paged (500 keys, fewer if a page is too large) at one
//! revision, and responses decode up to 64 MiB, so a few large values under
//! the prefix cannot make every re-list fail.

mod error;
mod lease;
mod members;
mod own_key;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Certificate, ConnectOptions, PutOptions, TlsOptions};

use super::{Instance, Lease, Registry, RegistryError, Watch};
use crate::config::{EtcdConfig, EtcdTls};
use members::Members;

/// HTTP/2 ping interval: above etcd's 5 s `grpc-keepalive-min-time`.
const PING_INTERVAL: Duration = Duration::from_secs(6);

pub struct EtcdRegistry {
    config: EtcdConfig,
    ttl: Duration,
    timeout: Duration,
    /// ttl/3, at most `timeout`: a keep-alive reply, a probe, a progress
    /// request's answer.
    reply_timeout: Duration,
    members: Arc<Members>,
}

impl EtcdRegistry {
    pub fn new(config: EtcdConfig, ttl: Duration, timeout: Duration) -> Self {
        let reply_timeout = (ttl / 3).min(timeout);
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(PING_INTERVAL, timeout.min(Duration::from_secs(5)))
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls));
        }
        if let Some((user, password)) = &config.credentials {
            options = options
                .with_user(user.clone(), password.expose().to_owned())
                .with_auto_token_refresh(true);
        }
        let probe_key = format!("{}/", config.prefix);
        let members = Arc::new(Members::new(
            &config.endpoints,
            options,
            reply_timeout,
            probe_key,
        ));
        EtcdRegistry {
            config,
            ttl,
            timeout,
            reply_timeout,
            members,
        }
    }

    fn service_prefix(&self, service: &str) -> String {
        format!("{}/{}/", self.config.prefix, service)
    }
}

/// tonic's TLS settings (rustls with ring): the configured CA, else the
/// public roots, and the client certificate if there is one. The files were
/// read and checked when the configuration was loaded.
fn tls_options(tls: &EtcdTls) -> TlsOptions {
    let options = match &tls.ca {
        Some(ca) => TlsOptions::new().ca_certificate(Certificate::from_pem(ca.pem())),
        None => TlsOptions::new().with_webpki_roots(),
    };
    match &tls.identity {
        Some(identity) => options.identity(etcd_client::Identity::from_pem(
            identity.cert.pem(),
            identity.key.pem(),
        )),
        None => options,
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn target(&self) -> String {
        self.config.endpoints.join(",")
    }

    async fn register(&self, instance: &Instance) -> Result<Box<dyn Lease>, RegistryError> {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = self
            .members
            .call(self.timeout, |conn| {
                let mut client = conn.client;
                async move { client.lease_grant(ttl, None).await }
            })
            .await?
            .id();
        let key = format!("{}{}", self.service_prefix(&instance.name), instance.id);
        let value = instance.to_json();
        let put = self
            .members
            .call(self.timeout, |conn| {
                let mut client = conn.client;
                let (key, value) = (key.clone(), value.clone());
                async move {
                    let options = PutOptions::new().with_lease(lease);
                    client.put(key, value, Some(options)).await
                }
            })
            .await;
        if let Err(e) = put {
            // The lease would expire on its own; revoking just frees it early.
            if let Err(revoke) = lease::revoke(&self.members, lease, self.timeout).await {
                tracing::debug!(lease, error = %revoke, "revoking an unused lease failed");
            }
            return Err(e);
        }
        Ok(Box::new(lease::EtcdLease {
            own: own_key::OwnKey::new(key.clone()),
            members: self.members.clone(),
            lease,
            key,
            timeout: self.timeout,
            reply_timeout: self.reply_timeout,
            stream: None,
        }))
    }

    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError> {
        let prefix = self.service_prefix(service);
        // Once more on another member if the first fails us.
        let mut tries = 2;
        loop {
            let conn = self.members.pick().await?;
            match watch::open(&conn, &prefix, self.timeout).await {
                Ok((entries, stream)) => {
                    return Ok(Box::new(watch::EtcdWatch {
                        members: self.members.clone(),
                        conn,
                        initial: Some(entries),
                        stream,
                        quiet: self.ttl,
                        reply_timeout: self.reply_timeout,
                    }))
                }
                Err(e) => {
                    tries -= 1;
                    if !self.members.failed(conn.index, &e) || tries == 0 {
                        return Err(e);
                    }
                    tracing::debug!(endpoint = %self.members.endpoint(conn.index), error = %e, "listing failed; trying another etcd member");
                }
            }
        }
    }
}
