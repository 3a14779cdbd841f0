//! etcd backend: one key per instance under a lease, prefix watches.
//!
//! Key `{prefix}/{service}/{id}`, value the [`Instance`] JSON, attached to a
//! lease of `ttl` seconds. The client is always built with HTTP/2 keep-alive
//! (10 s ping, 5 s timeout: etcd drops clients that ping more often than its
//! 5 s `grpc-keepalive-min-time`), a per-call timeout and require-leader, so a
//! frozen or partitioned etcd surfaces as an error instead of a silent hang.
//! etcd-client has no reconnect, re-watch or re-keep-alive of its own; this
//! module reports every failure as a [`RegistryError`] and the supervising
//! loops recover.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    WatchOptions, WatchStream,
};
use tokio::sync::Mutex;

use super::{Change, Entry, Instance, Lease, Registry, RegistryError, Watch, WatchEvent};
use crate::config::EtcdConfig;

pub struct EtcdRegistry {
    config: EtcdConfig,
    ttl: Duration,
    timeout: Duration,
    /// Built on first use; `Client::connect` only does I/O when credentials
    /// are set, and then must be retried while etcd is down.
    client: Mutex<Option<Client>>,
}

impl EtcdRegistry {
    pub fn new(config: EtcdConfig, ttl: Duration, timeout: Duration) -> Self {
        EtcdRegistry {
            config,
            ttl,
            timeout,
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Client, RegistryError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let Some((user, password)) = &self.config.credentials {
            options = options
                .with_user(user.clone(), password.expose().to_owned())
                .with_auto_token_refresh(true);
        }
        let endpoints: Vec<&str> = self
            .config
            .endpoints
            .iter()
            .map(|e| e.strip_prefix("http://").unwrap_or(e))
            .collect();
        let client = bounded(self.timeout, Client::connect(endpoints, Some(options))).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    fn service_prefix(&self, service: &str) -> String {
        format!("{}/{}/", self.config.prefix, service)
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
        let mut client = self.client().await?;
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = bounded(self.timeout, client.lease_grant(ttl, None))
            .await?
            .id();
        let key = format!("{}{}", self.service_prefix(&instance.name), instance.id);
        let put = client.put(
            key.as_str(),
            instance.to_json(),
            Some(PutOptions::new().with_lease(lease)),
        );
        if let Err(e) = bounded(self.timeout, put).await {
            // The lease would expire on its own; revoking just frees it early.
            if let Err(revoke) = bounded(self.timeout, client.lease_revoke(lease)).await {
                tracing::debug!(lease, error = %revoke, "revoking an unused lease failed");
            }
            return Err(e);
        }
        Ok(Box::new(EtcdLease {
            client,
            lease,
            key,
            timeout: self.timeout,
            keep_alive: None,
        }))
    }

    async fn watch(&self, service: &str) -> Result<Box<dyn Watch>, RegistryError> {
        let mut client = self.client().await?;
        let prefix = self.service_prefix(service);
        let listing = bounded(
            self.timeout,
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = listing
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| RegistryError::Unavailable("get response without a header".into()))?;
        let entries = listing
            .kvs()
            .iter()
            .map(|kv| Entry {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: Instance::from_json(kv.value()),
            })
            .collect();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let stream = bounded(self.timeout, client.watch(prefix.as_str(), Some(options))).await?;
        Ok(Box::new(EtcdWatch {
            client,
            initial: Some(entries),
            stream,
        }))
    }
}

struct EtcdLease {
    client: Client,
    lease: i64,
    key: String,
    timeout: Duration,
    /// The keep-alive stream, opened on first use and dropped on any error
    /// so the next call opens a fresh one on the same lease.
    keep_alive: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

#[async_trait]
impl Lease for EtcdLease {
    fn id(&self) -> String {
        format!("{:x}", self.lease)
    }

    async fn keep_alive(&mut self) -> Result<(), RegistryError> {
        let Some((keeper, stream)) = self.keep_alive.as_mut() else {
            // Opening the stream sends one keep-alive and checks its reply
            // (ttl 0 there is reported as "lease not found").
            let opened = bounded(self.timeout, self.client.lease_keep_alive(self.lease)).await?;
            self.keep_alive = Some(opened);
            return Ok(());
        };
        let result = async {
            keeper.keep_alive().await.map_err(map_error)?;
            match tokio::time::timeout(self.timeout, stream.message()).await {
                Err(_) => Err(RegistryError::Unavailable(
                    "keep-alive reply timed out".into(),
                )),
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
        if result.is_err() {
            self.keep_alive = None;
        }
        result
    }

    async fn update(&mut self, instance: &Instance) -> Result<(), RegistryError> {
        let options = PutOptions::new().with_lease(self.lease);
        let put = self
            .client
            .put(self.key.as_str(), instance.to_json(), Some(options));
        bounded(self.timeout, put).await.map(drop)
    }

    async fn revoke(mut self: Box<Self>) -> Result<(), RegistryError> {
        self.keep_alive = None;
        match bounded(self.timeout, self.client.lease_revoke(self.lease)).await {
            Ok(_) | Err(RegistryError::LeaseLost(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

struct EtcdWatch {
    client: Client,
    initial: Option<Vec<Entry>>,
    stream: WatchStream,
}

#[async_trait]
impl Watch for EtcdWatch {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        if let Some(entries) = self.initial.take() {
            return Ok(WatchEvent::Reset(entries));
        }
        loop {
            let response = match self.stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Err(RegistryError::Unavailable("watch stream ended".into())),
                Err(e) => return Err(map_error(e)),
            };
            if response.canceled() {
                // Compaction and auth cancels arrive as a normal message on a
                // stream that stays open; waiting for the stream to end hangs.
                let reason = response.cancel_reason();
                if reason.contains("auth token") {
                    if let Err(e) = self.client.refresh_token().await {
                        tracing::warn!(error = %e, "refreshing the etcd auth token failed");
                    }
                }
                return Err(RegistryError::WatchCanceled(format!(
                    "compact_revision={} reason={:?}",
                    response.compact_revision(),
                    reason
                )));
            }
            if response.events().is_empty() {
                continue; // created or progress notification
            }
            let changes = response
                .events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    Some(match event.event_type() {
                        EventType::Put => Change::Put(Entry {
                            key,
                            value: Instance::from_json(kv.value()),
                        }),
                        EventType::Delete => Change::Delete { key },
                    })
                })
                .collect();
            return Ok(WatchEvent::Changes(changes));
        }
    }
}

/// Bounds one call by the registry timeout and maps its error.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(map_error),
        Err(_) => Err(RegistryError::Unavailable(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

fn map_error(error: etcd_client::Error) -> RegistryError {
    use etcd_client::Error;
    use tonic::Code;
    match error {
        Error::LeaseKeepAliveError(message) if message.contains("not found") => {
            RegistryError::LeaseLost(message)
        }
        Error::GRpcStatus(status) => match status.code() {
            Code::NotFound if status.message().contains("lease not found") => {
                RegistryError::LeaseLost(status.message().to_owned())
            }
            Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated => {
                RegistryError::Rejected(status.message().to_owned())
            }
            _ => RegistryError::Unavailable(format!("{:?}: {}", status.code(), status.message())),
        },
        Error::InvalidArgs(message) => RegistryError::Rejected(message),
        Error::InvalidUri(e) => RegistryError::Rejected(e.to_string()),
        other => RegistryError::Unavailable(other.to_string()),
    }
}
