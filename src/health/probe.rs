//! The probes: a closed set from configuration, so an enum with a match.

use std::time::Duration;

use serde::Serialize;

use super::threshold::Outcome;
use super::{exec::ExecProbe, grpc::GrpcProbe, http::HttpProbe, tcp::TcpProbe, udp::UdpProbe};
use crate::config::ProbeConfig;
use crate::tls::TlsError;

/// Output kept per result (Consul keeps 4 KiB too).
pub const OUTPUT_MAX: usize = 4096;

#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub outcome: Outcome,
    pub output: String,
}

impl ProbeResult {
    pub fn new(outcome: Outcome, output: impl Into<String>) -> Self {
        let mut output = output.into();
        truncate(&mut output, OUTPUT_MAX);
        ProbeResult { outcome, output }
    }

    pub fn critical(output: impl Into<String>) -> Self {
        ProbeResult::new(Outcome::Critical, output)
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

pub enum Probe {
    Http(HttpProbe),
    Tcp(TcpProbe),
    Udp(UdpProbe),
    Grpc(GrpcProbe),
    Exec(ExecProbe),
}

impl Probe {
    pub fn new(config: &ProbeConfig) -> Result<Probe, TlsError> {
        Ok(match config {
            ProbeConfig::Http(http) => Probe::Http(HttpProbe::new(http.clone())?),
            ProbeConfig::Tcp {
                address,
                send,
                expect,
            } => Probe::Tcp(TcpProbe::new(address.clone(), send.clone(), expect.clone())),
            ProbeConfig::Udp {
                address,
                send,
                expect,
            } => Probe::Udp(UdpProbe::new(address.clone(), send.clone(), expect.clone())),
            ProbeConfig::Grpc { address, service } => {
                Probe::Grpc(GrpcProbe::new(address.clone(), service.clone()))
            }
            ProbeConfig::Exec { program, args } => {
                Probe::Exec(ExecProbe::new(program.clone(), args.clone()))
            }
        })
    }

    /// Runs one probe, bounded by `timeout`: a probe that does not finish in
    /// time is critical (and an exec probe's processes are killed).
    pub async fn run(&self, timeout: Duration) -> ProbeResult {
        let probe = async {
            match self {
                Probe::Http(p) => p.run().await,
                Probe::Tcp(p) => p.run().await,
                Probe::Udp(p) => p.run().await,
                Probe::Grpc(p) => p.run(timeout).await,
                Probe::Exec(p) => p.run().await,
            }
        };
        match tokio::time::timeout(timeout, probe).await {
            Ok(result) => result,
            Err(_) => ProbeResult::critical(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
        }
    }
}
