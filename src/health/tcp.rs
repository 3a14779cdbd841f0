//! `tcp`: the connect succeeds; optionally a request gets a reply that starts
//! with the expected bytes.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::probe::ProbeResult;
use super::threshold::Outcome;

pub struct TcpProbe {
    address: String,
    send: Option<Vec<u8>>,
    expect: Option<Vec<u8>>,
}

impl TcpProbe {
    pub fn new(address: String, send: Option<Vec<u8>>, expect: Option<Vec<u8>>) -> Self {
        TcpProbe {
            address,
            send,
            expect,
        }
    }

    pub async fn run(&self) -> ProbeResult {
        let mut stream = match TcpStream::connect(&self.address).await {
            Ok(stream) => stream,
            Err(e) => return ProbeResult::critical(format!("connect {}: {e}", self.address)),
        };
        if let Some(send) = &self.send {
            if let Err(e) = stream.write_all(send).await {
                return ProbeResult::critical(format!("send: {e}"));
            }
        }
        let Some(expect) = &self.expect else {
            return ProbeResult::new(Outcome::Passing, format!("connected to {}", self.address));
        };
        let mut reply = Vec::with_capacity(expect.len());
        while reply.len() < expect.len() {
            let mut chunk = vec![0u8; expect.len() - reply.len()];
            match stream.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
                Err(e) => return ProbeResult::critical(format!("read: {e}")),
            }
        }
        let shown = String::from_utf8_lossy(&reply).into_owned();
        if reply == *expect {
            ProbeResult::new(Outcome::Passing, format!("reply {shown:?}"))
        } else {
            ProbeResult::critical(format!(
                "reply {shown:?} does not start with {:?}",
                String::from_utf8_lossy(expect)
            ))
        }
    }
}
