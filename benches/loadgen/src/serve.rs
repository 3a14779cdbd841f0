//! The backends: the same ones behind every target.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::net::{find, invalid, named_pong, HTTP_BODY_LEN, MAX_HEAD, PING, PONG};

#[derive(Clone)]
enum Kind {
    /// Answers each `PING\r\n` with this reply.
    Pong(Arc<[u8]>),
    Http,
    Sink,
}

/// Serves every listener until `max` has passed (the script kills us sooner).
/// With a `name`, the TCP servers answer `+PONG {name}\r\n` instead of
/// `+PONG\r\n`, so a client knows which backend answered (`failover`).
pub async fn serve(
    tcp: Vec<SocketAddr>,
    http: Vec<SocketAddr>,
    sink: Vec<SocketAddr>,
    name: Option<&str>,
    max: Duration,
) -> Result<(), String> {
    let reply: Arc<[u8]> = match name {
        Some(name) => named_pong(name).into(),
        None => PONG.into(),
    };
    let kinds = tcp
        .iter()
        .map(|a| (a, Kind::Pong(reply.clone())))
        .chain(http.iter().map(|a| (a, Kind::Http)))
        .chain(sink.iter().map(|a| (a, Kind::Sink)));
    for (addr, kind) in kinds {
        let listener = bind(*addr).map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(accept_loop(listener, kind));
    }
    tokio::time::sleep(max).await;
    Ok(())
}

/// A listen backlog well above any burst the benchmark makes, so the
/// backends never drop a SYN.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn accept_loop(listener: TcpListener, kind: Kind) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: back off, keep serving.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            eprintln!("nodelay: {e}");
        }
        let kind = kind.clone();
        tokio::spawn(async move {
            let result = match kind {
                Kind::Pong(reply) => pong(stream, &reply).await,
                Kind::Http => http(stream).await,
                Kind::Sink => sink(stream).await,
            };
            // Resets are how some clients and proxies close; not worth a line.
            if let Err(e) = result {
                if e.kind() != io::ErrorKind::ConnectionReset {
                    eprintln!("connection: {e}");
                }
            }
        });
    }
}

/// `reply` (`+PONG\r\n`) for every 6 bytes (`PING\r\n`) received.
async fn pong(mut stream: TcpStream, reply: &[u8]) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut out = Vec::with_capacity(8192);
    let mut carry = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let total = carry + n;
        carry = total % PING.len();
        out.clear();
        for _ in 0..total / PING.len() {
            out.extend_from_slice(reply);
        }
        stream.write_all(&out).await?;
    }
}

/// Every request head gets `200` with a 128-byte body; keep-alive unless
/// the request says `Connection: close` or is HTTP/1.0. Request bodies are
/// not expected (the benchmark sends GETs only).
async fn http(mut stream: TcpStream) -> io::Result<()> {
    let response = {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {HTTP_BODY_LEN}\r\n\r\n"
        )
        .into_bytes();
        r.extend(std::iter::repeat_n(b'x', HTTP_BODY_LEN - 1));
        r.push(b'\n');
        r
    };
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let close = wants_close(&buf[..end]);
            stream.write_all(&response).await?;
            buf.drain(..end + 4);
            if close {
                return stream.shutdown().await;
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(invalid("request head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn wants_close(head: &[u8]) -> bool {
    let head = head.to_ascii_lowercase();
    let first_line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
    first_line.trim_ascii_end().ends_with(b"http/1.0")
        || head
            .split(|&b| b == b'\n')
            .any(|line| line.trim_ascii() == b"connection: close")
}

/// Frames of an 8-byte length and that many bytes: discarded, each
/// acknowledged with one byte.
async fn sink(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut header = [0u8; 8];
        match stream.read_exact(&mut header).await {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            result => result?,
        };
        let mut left = u64::from_le_bytes(header);
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = stream.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= n as u64;
        }
        stream.write_all(b"K").await?;
    }
}
