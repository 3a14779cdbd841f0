//! The wire protocols and the connects.
//!
//! - TCP request/response: the client sends `PING\r\n`, the server answers
//!   `+PONG\r\n` (RESP-like), one request in flight per connection.
//! - HTTP/1.1: `GET /`, answered `200` with a 128-byte body and a
//!   Content-Length.
//! - Bulk, one direction: frames of an 8-byte little-endian length and that
//!   many bytes; the sink discards them and acknowledges each frame with one
//!   byte, so the client knows the bytes arrived, not just left.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"+PONG\r\n";
pub const HTTP_BODY_LEN: usize = 128;
pub const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: squire-loadgen\r\n\r\n";
pub const GET_CLOSE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: squire-loadgen\r\nConnection: close\r\n\r\n";
/// The longest response or request head either side accepts.
pub const MAX_HEAD: usize = 64 * 1024;

/// The reply of a named TCP backend (`serve --name`): `+PONG {name}\r\n`.
pub fn named_pong(name: &str) -> Vec<u8> {
    format!("+PONG {name}\r\n").into_bytes()
}

/// Fresh connections come from 127.0.0.2..=127.0.0.9 in turn, so that
/// churn does not run out of ephemeral ports (their TIME_WAITs are spread
/// over eight source addresses).
const SOURCES: u64 = 8;

/// Connects to `target`; the `n`th connection uses source address
/// 127.0.0.(2 + n % 8), its port chosen at connect time.
pub async fn connect(target: SocketAddr, n: u64) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if target.ip().is_loopback() {
        bind_address_no_port(&socket)?;
        let source = Ipv4Addr::new(127, 0, 0, 2 + (n % SOURCES) as u8);
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// IP_BIND_ADDRESS_NO_PORT: bind the address now, pick the port at connect,
/// so a port is shared by connections to different destinations.
fn bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads one HTTP/1.x response with a Content-Length of 128 and status 200;
/// bytes after it stay in `buf`.
pub async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = &buf[..end];
            if !(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200")) {
                return Err(invalid(&format!(
                    "unexpected status line {:?}",
                    String::from_utf8_lossy(&head[..head.len().min(40)])
                )));
            }
            if content_length(head) != Some(HTTP_BODY_LEN) {
                return Err(invalid("no Content-Length: 128"));
            }
            let total = end + 4 + HTTP_BODY_LEN;
            while buf.len() < total {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..total);
            return Ok(());
        }
        if buf.len() > MAX_HEAD {
            return Err(invalid("response head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn content_length(head: &[u8]) -> Option<usize> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = line.split_at(colon);
        if !name.trim_ascii().eq_ignore_ascii_case(b"content-length") {
            return None;
        }
        std::str::from_utf8(&value[1..]).ok()?.trim().parse().ok()
    })
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// `n` distinct ports that were free a moment ago on 127.0.0.1.
pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    // Hold them all open while choosing, so that they are distinct.
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Waits until every target accepts a connection, at most `limit`.
pub async fn wait_listening(targets: &[SocketAddr], limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    for target in targets {
        while TcpStream::connect(target).await.is_err() {
            if Instant::now() > deadline {
                return Err(format!("{target} is not listening after {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}
