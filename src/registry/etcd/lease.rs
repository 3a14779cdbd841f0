//! Our registration in etcd: a key under a lease, kept alive on a working
//! member.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, PutOptions};

use super::error::{bounded, map_error};
use super::members::Members;
use super::own_key::OwnKey;
use crate::registry::{Instance, Lease, RegistryError};

pub(super) struct EtcdLease {
    pub members: Arc<Members>,
    pub lease: i64,
    pub key: String,
    /// Bounds unary calls.
    pub timeout: Duration,
    /// Bounds one keep-alive round trip: ttl/3, so a member that went
    /// silent is left with a third of the ttl still to renew elsewhere.
    pub reply_timeout: Duration,
    /// The keep-alive stream and the member it is on, opened on first use
    /// and dropped on any error so the next call opens a fresh one, on a
    /// working member, on the same lease.
    pub stream: Option<KeepAlive>,
    /// The watch of `key` that says when etcd deleted it under us.
    pub own: OwnKey,
}

pub(super) struct KeepAlive {
    member: usize,
    keeper: LeaseKeeper,
    replies: LeaseKeepAliveStream,
}

impl EtcdLease {
    /// Opens a keep-alive stream on a working member. Opening sends one
    /// keep-alive and checks its reply (ttl 0 there is "lease not found").
    async fn open(&mut self) -> Result<(), RegistryError> {
        let conn = self.members.pick().await?;
        let mut client = conn.client.clone();
        match bounded(self.reply_timeout, client.lease_keep_alive(self.lease)).await {
            Ok((keeper, replies)) => {
                self.stream = Some(KeepAlive {
                    member: conn.index,
                    keeper,
                    replies,
                });
                Ok(())
            }
            Err(e) => {
                self.members.failed(conn.index, &e);
                Err(e)
            }
        }
    }

    /// One keep-alive on the open stream.
    async fn renew(&mut self) -> Result<(), RegistryError> {
        let Some(open) = self.stream.as_mut() else {
            return self.open().await;
        };
        let reply_timeout = self.reply_timeout;
        let result = async {
            open.keeper.keep_alive().await.map_err(map_error)?;
            match tokio::time::timeout(reply_timeout, open.replies.message()).await {
                Err(_) => Err(RegistryError::Unavailable(format!(
                    "no keep-alive reply within {reply_timeout:?}"
                ))),
                Ok(Err(e)) => Err(map_error(e)),
                Ok(Ok(None)) => Err(RegistryError::Unavailable(
                    "keep-alive stream closed".into(),
                )),
                // A revoked or expired lease answers Ok with ttl 0, not an error.
                Ok(Ok(Some(reply))) if reply.ttl() <= 0 => Err(RegistryError::LeaseLost(format!(
                    "lease {:x} expired or was revoked",
                    self.lease
                ))),
                Ok(Ok(Some(_))) => Ok(()),
            }
        }
        .await;
        if let Err(e) = &result {
            self.members.failed(open.member, e);
            self.stream = None;
        }
        result
    }
}

#[async_trait]
impl Lease for EtcdLease {
    fn id(&self) -> String {
        format!("{:x}", self.lease)
    }

    /// Renews on the stream's member; if that member failed, at once once
    /// more on another, so one silent member costs one reply timeout.
    async fn keep_alive(&mut self) -> Result<(), RegistryError> {
        match self.renew().await {
            Err(RegistryError::Unavailable(first)) => match self.renew().await {
                Err(RegistryError::Unavailable(second)) => Err(RegistryError::Unavailable(
                    format!("{first}; then {second}"),
                )),
                other => other,
            },
            other => other,
        }
    }

    async fn gone(&mut self) {
        self.own
            .gone(&self.members, self.timeout, self.reply_timeout)
            .await
    }

    async fn update(&mut self, instance: &Instance) -> Result<(), RegistryError> {
        let (key, value, lease) = (self.key.as_str(), instance.to_json(), self.lease);
        self.members
            .call(self.timeout, |conn| {
                let mut client = conn.client;
                let value = value.clone();
                async move {
                    let options = PutOptions::new().with_lease(lease);
                    client.put(key, value, Some(options)).await
                }
            })
            .await
            .map(drop)
    }

    async fn revoke(mut self: Box<Self>) -> Result<(), RegistryError> {
        self.stream = None;
        match revoke(&self.members, self.lease, self.timeout).await {
            Ok(()) | Err(RegistryError::LeaseLost(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Revokes `lease` on a working member.
pub(super) async fn revoke(
    members: &Members,
    lease: i64,
    timeout: Duration,
) -> Result<(), RegistryError> {
    members
        .call(timeout, |conn| {
            let mut client = conn.client;
            async move { client.lease_revoke(lease).await }
        })
        .await
        .map(drop)
}
