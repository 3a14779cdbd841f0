//! Our instance in Eureka: registered with its document, renewed by
//! heartbeat, its status kept by registering the document again, and
//! `draining` as Eureka's own OUT_OF_SERVICE status override.

use std::sync::Arc;

use async_trait::async_trait;
use hyper::{Method, StatusCode};

use super::api::{segment, Api};
use super::wire::{app_name, instance_document};
use crate::registry::{Instance, Lease, RegistryError, Status};

pub(super) struct EurekaLease {
    api: Arc<Api>,
    /// `/apps/{APP}/{instanceId}`, encoded.
    path: String,
    instance: Instance,
    ttl_secs: u64,
}

impl EurekaLease {
    /// `POST /apps/{APP}` with our document (204), and the override if we
    /// are draining.
    pub async fn register(
        api: Arc<Api>,
        instance: &Instance,
        ttl_secs: u64,
    ) -> Result<EurekaLease, RegistryError> {
        let app = segment(&app_name(&instance.name));
        let lease = EurekaLease {
            path: format!("/apps/{app}/{}", segment(&instance.id)),
            api,
            instance: instance.clone(),
            ttl_secs,
        };
        lease.write(instance).await?;
        if instance.status == Status::Draining {
            lease.set_override(true).await?;
        }
        Ok(lease)
    }

    async fn write(&self, instance: &Instance) -> Result<(), RegistryError> {
        let app = segment(&app_name(&instance.name));
        let body = instance_document(instance, self.ttl_secs).to_string();
        let answer = self
            .api
            .call(
                Method::POST,
                &format!("/apps/{app}"),
                Some(body.into_bytes()),
            )
            .await?;
        match answer.status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(()),
            _ => Err(answer.error("registering")),
        }
    }

    /// Puts (`PUT .../status?value=OUT_OF_SERVICE`) or removes (`DELETE
    /// .../status`) Eureka's status override. A 404 is a lost lease.
    async fn set_override(&self, out_of_service: bool) -> Result<(), RegistryError> {
        let (method, path) = if out_of_service {
            (
                Method::PUT,
                format!("{}/status?value=OUT_OF_SERVICE", self.path),
            )
        } else {
            (Method::DELETE, format!("{}/status", self.path))
        };
        let answer = self.api.call(method, &path, None).await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistryError::LeaseLost(
                "Eureka does not know our instance".into(),
            )),
            _ => Err(answer.error("setting the status override")),
        }
    }
}

#[async_trait]
impl Lease for EurekaLease {
    fn id(&self) -> String {
        self.instance.id.clone()
    }

    /// `PUT /apps/{APP}/{id}`: 200 renews, 404 means Eureka forgot us
    /// (expired, evicted, restarted): register again.
    async fn keep_alive(&mut self) -> Result<(), RegistryError> {
        let answer = self.api.call(Method::PUT, &self.path, None).await?;
        match answer.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistryError::LeaseLost(
                "Eureka answered 404 to our renewal".into(),
            )),
            _ => Err(answer.error("renewing")),
        }
    }

    async fn update(&mut self, instance: &Instance) -> Result<(), RegistryError> {
        let was_draining = self.instance.status == Status::Draining;
        let draining = instance.status == Status::Draining;
        if was_draining && !draining {
            self.set_override(false).await?;
        }
        self.write(instance).await?;
        if draining && !was_draining {
            self.set_override(true).await?;
        }
        self.instance = instance.clone();
        Ok(())
    }

    /// `DELETE /apps/{APP}/{id}`; 404 is already gone.
    async fn revoke(self: Box<Self>) -> Result<(), RegistryError> {
        let answer = self.api.call(Method::DELETE, &self.path, None).await?;
        match answer.status {
            StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(answer.error("cancelling")),
        }
    }
}
