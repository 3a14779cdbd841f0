//! `udp`: a datagram sent to the service gets a reply that starts with the
//! expected bytes before the check's timeout (the runner bounds the wait;
//! no reply in time is critical, as is an ICMP port unreachable).

use std::net::SocketAddr;

use tokio::net::UdpSocket;

use super::probe::ProbeResult;
use super::threshold::Outcome;

/// The largest reply read; a longer one is cut, which does not matter for
/// a prefix.
const REPLY_MAX: usize = 2048;

pub struct UdpProbe {
    address: String,
    send: Vec<u8>,
    expect: Option<Vec<u8>>,
}

impl UdpProbe {
    pub fn new(address: String, send: Vec<u8>, expect: Option<Vec<u8>>) -> Self {
        UdpProbe {
            address,
            send,
            expect,
        }
    }

    pub async fn run(&self) -> ProbeResult {
        let target = match tokio::net::lookup_host(&self.address).await {
            Ok(mut addrs) => match addrs.next() {
                Some(addr) => addr,
                None => return ProbeResult::critical(format!("{}: no address", self.address)),
            },
            Err(e) => return ProbeResult::critical(format!("resolve {}: {e}", self.address)),
        };
        let local: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = match UdpSocket::bind(local).await {
            Ok(socket) => socket,
            Err(e) => return ProbeResult::critical(format!("bind: {e}")),
        };
        // Connected: only the service's replies are read, and a closed port
        // comes back as ECONNREFUSED instead of a silent timeout.
        if let Err(e) = socket.connect(target).await {
            return ProbeResult::critical(format!("connect {target}: {e}"));
        }
        if let Err(e) = socket.send(&self.send).await {
            return ProbeResult::critical(format!("send to {target}: {e}"));
        }
        let mut reply = [0u8; REPLY_MAX];
        let n = match socket.recv(&mut reply).await {
            Ok(n) => n,
            Err(e) => return ProbeResult::critical(format!("receive from {target}: {e}")),
        };
        let reply = &reply[..n];
        let shown = String::from_utf8_lossy(reply).into_owned();
        match &self.expect {
            Some(expect) if !reply.starts_with(expect) => ProbeResult::critical(format!(
                "reply {shown:?} does not start with {:?}",
                String::from_utf8_lossy(expect)
            )),
            _ => ProbeResult::new(Outcome::Passing, format!("reply {shown:?}")),
        }
    }
}
