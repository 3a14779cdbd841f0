//! HTTP/1.1 to an instance, spoken in the request's own task.
//!
//! hyper's client runs every connection as a task of its own and hands each
//! request to it through a channel, then the response back through
//! another: three tasks (client connection, request, upstream connection)
//! and two wake-ups per request, about a third of squire's instructions per
//! proxied keep-alive request. Here the request's task writes the head
//! straight to the pooled socket, parses the response head with httparse
//! (the parser hyper itself uses) into a `HeaderMap` whose values point into
//! the read buffer, and the response body polls the socket directly. When
//! the body has been read to its end the connection goes back to the pool.
//!
//! hyper stays for everything else: the client side, HTTP/2 to instances,
//! and protocol upgrades (WebSocket), which hand the socket to hyper.
//!
//! Message framing follows RFC 9112 §6: a response to HEAD, a 1xx, 204 or
//! 304 has no body; `Transfer-Encoding` ending in chunked is decoded (a
//! transfer coding squire cannot decode means read until close);
//! `Content-Length` (every value the same); otherwise until close. Interim
//! 1xx responses (`100 Continue`) are skipped; 101 belongs to the upgrade
//! path and is never asked for here. A connection is reused only when its
//! response said so (HTTP/1.1 without `Connection: close`, or HTTP/1.0 with
//! `keep-alive`), was framed by length or chunks, and nothing arrived after
//! it.

use std::io;
use std::pin::Pin;

use bytes::BytesMut;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::body::RequestBody;
use super::headers::Added;

/// The most a response head (or a chunked body's trailers) may take.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields a response head may carry (hyper's default).
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Reads start at this size and double, while they fill the buffer, up to
/// [`MAX_READ`]: small replies stay small, bulk bodies move in big reads.
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;
/// Request body bytes gathered before a write.
const WRITE_BATCH: usize = 64 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the instance closed the connection before the response head")]
    Closed,
    #[error("the instance closed the connection mid-body")]
    Truncated,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("malformed response head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("response head over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("reading the request body failed: {0}")]
    RequestBody(hyper::Error),
}

/// One HTTP/1.1 connection to an instance: the socket and what has been
/// read from it but not yet used.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection can carry another request: the instance
    /// has not closed it and has sent nothing unasked. No system call unless
    /// the socket was reported readable since the last read.
    pub fn is_reusable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// The socket, for a protocol upgrade handed to hyper. Only a fresh or
    /// reusable connection (nothing buffered) is handed over.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Sends one request and reads the response head. `host` replaces the
    /// client's `Host` when set. The response body reads on from this
    /// connection.
    pub async fn send(
        mut self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        added: &Added,
        host: Option<&HeaderValue>,
        body: RequestBody,
    ) -> Result<Response<Body>, Error> {
        let framing = request_framing(method, headers, &body);
        let mut out = Vec::with_capacity(512);
        encode_head(&mut out, method, path, headers, added, host, framing);
        let sent = match body {
            RequestBody::Empty => {
                if framing == RequestFraming::Chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                self.stream.write_all(&out).await.map_err(Error::from)
            }
            RequestBody::Streamed(body) => self.write_body(out, body, framing).await,
        };
        if let Err(error) = sent {
            // The instance may have answered early (413, say) and closed
            // its end: its answer counts, the connection does not.
            if matches!(error, Error::RequestBody(_)) {
                return Err(error);
            }
            return match self.read_head(method == Method::HEAD).await {
                Ok(mut response) => {
                    response.body_mut().reusable = false;
                    Ok(response)
                }
                Err(_) => Err(error),
            };
        }
        self.read_head(method == Method::HEAD).await
    }

    /// Writes `out` (the head) and the body after it, gathering frames that
    /// are ready into one write.
    async fn write_body(
        &mut self,
        mut out: Vec<u8>,
        body: hyper::body::Incoming,
        framing: RequestFraming,
    ) -> Result<(), Error> {
        let chunked = framing == RequestFraming::Chunked;
        let mut body = std::pin::pin!(body);
        loop {
            let next = match body.frame().now_or_never() {
                Some(next) => next,
                None => {
                    self.flush(&mut out).await?;
                    body.frame().await
                }
            };
            let Some(frame) = next else { break };
            let frame = frame.map_err(Error::RequestBody)?;
            match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    }
                    if data.len() >= WRITE_BATCH {
                        self.flush(&mut out).await?;
                        self.stream.write_all(&data).await?;
                    } else {
                        out.extend_from_slice(&data);
                    }
                    if chunked {
                        out.extend_from_slice(b"\r\n");
                    }
                }
                Err(frame) => {
                    if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                        out.extend_from_slice(b"0\r\n");
                        encode_fields(&mut out, &trailers);
                        out.extend_from_slice(b"\r\n");
                        return self.flush(&mut out).await;
                    }
                }
            }
            if out.len() >= WRITE_BATCH {
                self.flush(&mut out).await?;
            }
        }
        if chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        self.flush(&mut out).await
    }

    async fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        if !out.is_empty() {
            self.stream.write_all(out).await?;
            out.clear();
        }
        Ok(())
    }

    /// Reads until a final (non-1xx) response head, and frames its body.
    async fn read_head(mut self, head_request: bool) -> Result<Response<Body>, Error> {
        loop {
            if let Some(head) = self.parse_head()? {
                let status = head.status();
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Error::Malformed("101 Switching Protocols, never asked for"));
                }
                if status.is_informational() {
                    continue;
                }
                return Ok(self.into_response(head, head_request));
            }
            if self.buf.len() >= MAX_HEAD_BYTES {
                return Err(Error::HeadTooLarge);
            }
            self.buf.reserve(FIRST_READ);
            if self.read_more().await? == 0 {
                return Err(Error::Closed);
            }
        }
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
        })
        .await
    }

    /// One response head from the front of the buffer, if all of it is
    /// there. Header values are slices of the head's bytes, not copies.
    fn parse_head(&mut self) -> Result<Option<Response<()>>, Error> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        let len = match parsed.parse(&self.buf)? {
            httparse::Status::Partial => return Ok(None),
            httparse::Status::Complete(len) => len,
        };
        let code = parsed.code.ok_or(Error::Malformed("no status code"))?;
        let status = StatusCode::from_u16(code).map_err(|_| Error::Malformed("bad status code"))?;
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let base = self.buf.as_ptr() as usize;
        let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
        let count = parsed.headers.len();
        for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
            let name = field.name.as_ptr() as usize - base;
            let value = field.value.as_ptr() as usize - base;
            *span = (
                name,
                name + field.name.len(),
                value,
                value + field.value.len(),
            );
        }
        let head = self.buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for &(name_start, name_end, value_start, value_end) in &spans[..count] {
            let name = HeaderName::from_bytes(&head[name_start..name_end])
                .map_err(|_| Error::Malformed("bad header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
                .map_err(|_| Error::Malformed("bad header value"))?;
            headers.append(name, value);
        }
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        Ok(Some(response))
    }

    fn into_response(self, head: Response<()>, head_request: bool) -> Response<Body> {
        let status = head.status();
        let (mut parts, ()) = head.into_parts();
        let state = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            State::Done
        } else {
            match body_framing(&mut parts.headers) {
                Ok(state) => state,
                Err(reason) => State::Failed(reason),
            }
        };
        let keep_alive = keeps_alive(parts.version, &parts.headers);
        let reusable = keep_alive && !matches!(state, State::UntilClose | State::Failed(_));
        let body = Body {
            conn: Some(self),
            state,
            reusable,
            read_size: FIRST_READ,
        };
        Response::from_parts(parts, body)
    }
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    /// The client's `Content-Length` goes along; or no body and none
    /// expected.
    AsIs,
    /// No body, on a method that usually has one: say so.
    ZeroLength,
    Chunked,
}

fn request_framing(method: &Method, headers: &HeaderMap, body: &RequestBody) -> RequestFraming {
    if headers.contains_key(header::CONTENT_LENGTH) {
        return RequestFraming::AsIs;
    }
    if body.is_end_stream() {
        return if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            RequestFraming::ZeroLength
        } else {
            RequestFraming::AsIs
        };
    }
    RequestFraming::Chunked
}

fn encode_head(
    out: &mut Vec<u8>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    added: &Added,
    host: Option<&HeaderValue>,
    framing: RequestFraming,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    match host {
        Some(host) => {
            encode_field(out, header::HOST.as_str(), host);
            for (name, value) in headers {
                if name != header::HOST {
                    encode_field(out, name.as_str(), value);
                }
            }
        }
        None => encode_fields(out, headers),
    }
    for (name, value) in added.iter() {
        encode_field(out, name, value);
    }
    match framing {
        RequestFraming::AsIs => {}
        RequestFraming::ZeroLength => out.extend_from_slice(b"content-length: 0\r\n"),
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

fn encode_fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        encode_field(out, name.as_str(), value);
    }
}

fn encode_field(out: &mut Vec<u8>, name: &str, value: &HeaderValue) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The body's framing from its headers (RFC 9112 §6.3). A chunked body's
/// `Content-Length`, which must be ignored, is dropped so it is not passed
/// on.
fn body_framing(headers: &mut HeaderMap) -> Result<State, &'static str> {
    if let Some(codings) = headers.get(header::TRANSFER_ENCODING) {
        let chunked = codings
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        headers.remove(header::CONTENT_LENGTH);
        return Ok(if chunked {
            State::Chunked(Chunk::Size)
        } else {
            State::UntilClose
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(trim(part)).ok_or("bad Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values");
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => State::Done,
        Some(n) => State::Length(n),
        None => State::UntilClose,
    })
}

fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if version == Version::HTTP_10 {
        has("keep-alive")
    } else {
        !has("close")
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

mod body;
#[cfg(test)]
mod tests;

pub use body::Body;
use body::{Chunk, State};
