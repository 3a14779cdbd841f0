//! Our registration in Consul: the service and its TTL check. The check is
//! the lease: every refresh passes, warns or fails it by our status, and
//! `draining` is the service's maintenance mode.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::{Method, StatusCode};

use super::api::{encode, Api};
use super::wire::{go_duration, service_meta, CheckDefinition, ServiceDefinition, Weights};
use crate::registry::{Instance, Lease, RegistryError, Status};

/// `Weights.Warning`: an instance in warning keeps a token share in
/// Consul's DNS answers.
const WARNING_WEIGHT: u32 = 1;

/// What the TTL check is told for a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckState {
    Pass,
    Warn,
    Fail,
}

impl CheckState {
    /// healthy → pass, warning → warn, anything not serving → fail.
    /// `draining` passes: the process is alive, and maintenance mode is what
    /// takes it out of rotation.
    fn of(status: Status) -> CheckState {
        match status {
            Status::Healthy | Status::Draining => CheckState::Pass,
            Status::Warning => CheckState::Warn,
            Status::Unknown | Status::Unhealthy | Status::Critical => CheckState::Fail,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            CheckState::Pass => "pass",
            CheckState::Warn => "warn",
            CheckState::Fail => "fail",
        }
    }

    fn consul_status(self) -> &'static str {
        match self {
            CheckState::Pass => "passing",
            CheckState::Warn => "warning",
            CheckState::Fail => "critical",
        }
    }
}

pub(super) struct ConsulLease {
    api: Arc<Api>,
    check_id: String,
    instance: Instance,
    ttl: Duration,
    deregister_critical_after: Duration,
    /// The check state last sent, and with it the note (constant per state).
    sent: Option<CheckState>,
    /// Whether maintenance mode was last set on or off.
    maintenance: Option<bool>,
}

impl ConsulLease {
    /// Registers `instance` with its TTL check and sets the check state and
    /// maintenance mode its status calls for.
    pub(super) async fn register(
        api: Arc<Api>,
        instance: &Instance,
        ttl: Duration,
        deregister_critical_after: Duration,
    ) -> Result<ConsulLease, RegistryError> {
        let mut lease = ConsulLease {
            api,
            check_id: format!("service:{}", instance.id),
            instance: instance.clone(),
            ttl,
            deregister_critical_after,
            sent: None,
            maintenance: None,
        };
        lease.put_service().await?;
        // Re-registering an ID that Consul still knows keeps the old check
        // status and maintenance mode, so both are set explicitly.
        lease.sync_status().await?;
        Ok(lease)
    }

    fn definition(&self) -> ServiceDefinition<'_> {
        let instance = &self.instance;
        ServiceDefinition {
            id: &instance.id,
            name: &instance.name,
            tags: &instance.tags,
            address: &instance.host,
            port: instance.port,
            meta: service_meta(instance),
            weights: Weights {
                passing: i64::from(instance.weight.clamp(1, 65535)),
                warning: i64::from(WARNING_WEIGHT),
            },
            check: CheckDefinition {
                check_id: self.check_id.clone(),
                name: "squire heartbeat",
                notes: "TTL check kept alive by the squire sidecar",
                ttl: go_duration(self.ttl),
                status: CheckState::of(instance.status).consul_status(),
                deregister_critical_service_after: go_duration(self.deregister_critical_after),
            },
        }
    }

    async fn put_service(&self) -> Result<(), RegistryError> {
        // Serializing strings, numbers and string maps cannot fail.
        let body = serde_json::to_vec(&self.definition()).expect("definition serializes");
        let answer = self
            .api
            .call(
                Method::PUT,
                "/v1/agent/service/register".to_owned(),
                Some(body),
            )
            .await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            _ => Err(answer.error("registering the service")),
        }
    }

    /// Sends maintenance mode and the check state if they differ from what
    /// was last sent (everything, right after registering).
    async fn sync_status(&mut self) -> Result<(), RegistryError> {
        let draining = self.instance.status == Status::Draining;
        if self.maintenance != Some(draining) {
            self.set_maintenance(draining).await?;
            self.maintenance = Some(draining);
        }
        let state = CheckState::of(self.instance.status);
        if self.sent != Some(state) {
            self.send_check(state).await?;
            self.sent = Some(state);
        }
        Ok(())
    }

    async fn send_check(&self, state: CheckState) -> Result<(), RegistryError> {
        let path = format!(
            "/v1/agent/check/{}/{}?note={}",
            state.verb(),
            self.check_id,
            encode(&format!("squire reports {}", self.instance.status))
        );
        let answer = self.api.call(Method::PUT, path, None).await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistryError::LeaseLost(format!(
                "the Consul agent does not know check {}",
                self.check_id
            ))),
            _ => Err(answer.error("updating the TTL check")),
        }
    }

    async fn set_maintenance(&self, enable: bool) -> Result<(), RegistryError> {
        let path = format!(
            "/v1/agent/service/maintenance/{}?enable={enable}&reason={}",
            self.instance.id,
            encode("draining: squire takes no new sessions")
        );
        let answer = self.api.call(Method::PUT, path, None).await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistryError::LeaseLost(format!(
                "the Consul agent does not know service {}",
                self.instance.id
            ))),
            _ => Err(answer.error("setting maintenance mode")),
        }
    }
}

#[async_trait]
impl Lease for ConsulLease {
    fn id(&self) -> String {
        self.check_id.clone()
    }

    async fn keep_alive(&mut self) -> Result<(), RegistryError> {
        let state = CheckState::of(self.instance.status);
        self.send_check(state).await?;
        self.sent = Some(state);
        Ok(())
    }

    async fn update(&mut self, instance: &Instance) -> Result<(), RegistryError> {
        let mut definition = instance.clone();
        definition.status = self.instance.status;
        let redefine = definition != self.instance;
        self.instance = instance.clone();
        if redefine {
            // Keeps the check's status; sync_status below sets it anyway.
            self.put_service().await?;
        }
        self.sync_status().await
    }

    async fn revoke(self: Box<Self>) -> Result<(), RegistryError> {
        let path = format!("/v1/agent/service/deregister/{}", self.instance.id);
        let answer = self.api.call(Method::PUT, path, None).await?;
        match answer.status {
            // 404: already gone (reaped, or the agent restarted empty).
            StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(answer.error("deregistering the service")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_states_by_status() {
        assert_eq!(CheckState::of(Status::Healthy), CheckState::Pass);
        assert_eq!(CheckState::of(Status::Draining), CheckState::Pass);
        assert_eq!(CheckState::of(Status::Warning), CheckState::Warn);
        for s in [Status::Unknown, Status::Unhealthy, Status::Critical] {
            assert_eq!(CheckState::of(s), CheckState::Fail);
        }
    }
}
