//! `grpc`: the standard `grpc.health.v1.Health/Check`, on a fresh channel
//! each time. SERVING passes; anything else (NOT_SERVING, UNKNOWN,
//! SERVICE_UNKNOWN, an error status) is critical.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::probe::ProbeResult;
use super::threshold::Outcome;

pub struct GrpcProbe {
    address: String,
    service: String,
}

impl GrpcProbe {
    pub fn new(address: String, service: String) -> Self {
        GrpcProbe { address, service }
    }

    pub async fn run(&self, timeout: Duration) -> ProbeResult {
        let endpoint = match Endpoint::from_shared(format!("http://{}", self.address)) {
            Ok(endpoint) => endpoint.connect_timeout(timeout).timeout(timeout),
            Err(e) => return ProbeResult::critical(format!("bad address {}: {e}", self.address)),
        };
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => return ProbeResult::critical(format!("connect {}: {e}", self.address)),
        };
        let request = HealthCheckRequest {
            service: self.service.clone(),
        };
        match HealthClient::new(channel).check(request).await {
            Ok(response) => {
                let status = response.into_inner().status();
                let name = status.as_str_name();
                if status == ServingStatus::Serving {
                    ProbeResult::new(Outcome::Passing, name)
                } else {
                    ProbeResult::critical(name)
                }
            }
            Err(status) => {
                ProbeResult::critical(format!("{:?}: {}", status.code(), status.message()))
            }
        }
    }
}
