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
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::body::RequestBody;
use super::headers::Added;
use super::BoxError;

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

/// Where the response body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
    /// The head named framing squire cannot follow: the body fails on its
    /// first read.
    Failed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers,
}

/// A response body read straight from the instance's connection.
pub struct Body {
    /// `None` once handed back to the pool or dropped after an error. Held
    /// while the state is anything but `Done`.
    conn: Option<Conn>,
    state: State,
    /// Whether the connection may be reused once the body has ended.
    reusable: bool,
    read_size: usize,
}

type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

impl Body {
    /// The connection, once the body has ended and it can carry another
    /// request.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        if self.state != State::Done || !self.reusable {
            return None;
        }
        let conn = self.conn.take()?;
        conn.buf.is_empty().then_some(conn)
    }

    fn fail(&mut self, error: Error) -> Polled {
        self.conn = None;
        self.state = State::Done;
        self.reusable = false;
        Poll::Ready(Some(Err(error.into())))
    }
}

/// Reads more into the connection's buffer; `Ok(0)` at end of stream.
fn poll_fill(
    conn: &mut Conn,
    read_size: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(*read_size);
    }
    let spare = conn.buf.capacity() - conn.buf.len();
    let n = ready!(tokio_util::io::poll_read_buf(
        Pin::new(&mut conn.stream),
        cx,
        &mut conn.buf
    ))?;
    if n == spare && *read_size < MAX_READ {
        *read_size *= 2;
    }
    Poll::Ready(Ok(n))
}

/// The next data slice of at most `limit` bytes from the buffer.
fn take_data(buf: &mut BytesMut, limit: u64) -> Bytes {
    let n = usize::try_from(limit).map_or(buf.len(), |l| l.min(buf.len()));
    buf.split_to(n).freeze()
}

/// What one step of decoding made of the buffer.
enum Step {
    /// A frame for the client.
    Yield(Frame<Bytes>),
    /// Progress without a frame: step again.
    Again,
    /// More bytes are needed.
    Starved,
}

/// One step of chunked decoding from `buf`, moving `chunk` on.
fn chunk_step(buf: &mut BytesMut, chunk: &mut State) -> Result<Step, Error> {
    let State::Chunked(at) = *chunk else {
        return Ok(Step::Again);
    };
    match at {
        Chunk::Size => {
            let Some(end) = find_crlf(buf) else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err(Error::Malformed("chunk-size line too long"));
                }
                return Ok(Step::Starved);
            };
            let size = buf[..end]
                .split(|&b| b == b';')
                .next()
                .map(trim)
                .unwrap_or_default();
            let size = parse_hex(size).ok_or(Error::Malformed("bad chunk size"))?;
            buf.advance(end + 2);
            *chunk = State::Chunked(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            });
            Ok(Step::Again)
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::Starved);
            }
            let data = take_data(buf, left);
            let left = left - data.len() as u64;
            *chunk = State::Chunked(if left == 0 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left)
            });
            Ok(Step::Yield(Frame::data(data)))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::Starved);
            }
            if &buf[..2] != b"\r\n" {
                return Err(Error::Malformed("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            *chunk = State::Chunked(Chunk::Size);
            Ok(Step::Again)
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                *chunk = State::Done;
                return Ok(Step::Again);
            }
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let (len, fields) = match httparse::parse_headers(buf, &mut fields)? {
                httparse::Status::Partial if buf.len() > MAX_HEAD_BYTES => {
                    return Err(Error::HeadTooLarge)
                }
                httparse::Status::Partial => return Ok(Step::Starved),
                httparse::Status::Complete(complete) => complete,
            };
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for field in fields {
                // A field hyper could not carry on is left out, not fatal.
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(field.name.as_bytes()),
                    HeaderValue::from_bytes(field.value),
                ) {
                    trailers.append(name, value);
                }
            }
            buf.advance(len);
            *chunk = State::Done;
            Ok(Step::Yield(Frame::trailers(trailers)))
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return None,
        };
        Some(n << 4 | u64::from(v))
    })
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        loop {
            if let State::Failed(reason) = this.state {
                return this.fail(Error::Malformed(reason));
            }
            if this.state == State::Done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return this.fail(Error::Truncated);
            };
            let step = match this.state {
                State::Length(left) if !conn.buf.is_empty() => {
                    let data = take_data(&mut conn.buf, left);
                    let left = left - data.len() as u64;
                    this.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    Step::Yield(Frame::data(data))
                }
                State::UntilClose if !conn.buf.is_empty() => {
                    Step::Yield(Frame::data(take_data(&mut conn.buf, u64::MAX)))
                }
                State::Chunked(_) => match chunk_step(&mut conn.buf, &mut this.state) {
                    Ok(step) => step,
                    Err(e) => return this.fail(e),
                },
                _ => Step::Starved,
            };
            match step {
                Step::Yield(frame) => return Poll::Ready(Some(Ok(frame))),
                Step::Again => continue,
                Step::Starved => {}
            }
            match ready!(poll_fill(conn, &mut this.read_size, cx)) {
                Err(e) => return this.fail(Error::Io(e)),
                Ok(0) if this.state == State::UntilClose => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Error::Truncated),
                Ok(_) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A raw instance: accepts one connection, reads one request head (and
    /// `body_len` bytes after it), answers with `reply` written one piece
    /// after another, then keeps the connection open until the client goes.
    /// Returns the address and what the request looked like.
    async fn instance(
        pieces: Vec<&'static [u8]>,
        body_len: usize,
    ) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut byte = [0u8; 1];
            while !seen.ends_with(b"\r\n\r\n") {
                assert_eq!(stream.read(&mut byte).await.expect("read"), 1);
                seen.push(byte[0]);
            }
            let mut body = vec![0u8; body_len];
            stream.read_exact(&mut body).await.expect("body");
            seen.extend_from_slice(&body);
            for piece in pieces {
                stream.write_all(piece).await.expect("write");
                stream.flush().await.expect("flush");
                tokio::task::yield_now().await;
            }
            // Hold the connection until the client closes it.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
            seen
        });
        (addr, served)
    }

    async fn conn(addr: &str) -> Conn {
        Conn::new(TcpStream::connect(addr).await.expect("connect"))
    }

    async fn get(addr: &str, method: Method) -> Result<Response<Body>, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("game.test"));
        conn(addr)
            .await
            .send(
                &method,
                "/rooms?x=1",
                &headers,
                &Added::default(),
                None,
                RequestBody::Empty,
            )
            .await
    }

    async fn read_all(body: &mut Body) -> (Vec<u8>, Option<HeaderMap>) {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("frame");
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn a_length_framed_reply_split_anywhere_is_read_whole_and_the_connection_kept() {
        let (addr, served) = instance(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Le",
                b"ngth: 5\r\nX-Room: 7\r\n\r",
                b"\nhel",
                b"lo",
            ],
            0,
        )
        .await;
        let mut response = get(&addr, Method::GET).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-room"], "7");
        assert_eq!(response.body().size_hint().exact(), Some(5));
        let (data, _) = read_all(response.body_mut()).await;
        assert_eq!(data, b"hello");
        let mut conn = response.body_mut().take_reusable().expect("reusable");
        assert!(conn.is_reusable());
        drop(conn);
        let request = String::from_utf8(served.await.expect("served")).expect("utf-8");
        assert!(
            request.starts_with("GET /rooms?x=1 HTTP/1.1\r\nhost: game.test\r\n"),
            "{request}"
        );
        assert!(!request.contains("content-length"), "{request}");
    }

    #[tokio::test]
    async fn chunked_replies_are_decoded_with_extensions_and_trailers() {
        let (addr, _served) = instance(
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n",
                b"3;ext=1\r\nabc\r\n",
                b"A\r\n0123456789\r",
                b"\n0\r\nX-Checksum: 42\r\n\r\n",
            ],
            0,
        )
        .await;
        let mut response = get(&addr, Method::GET).await.expect("response");
        assert!(response.headers().get(header::CONTENT_LENGTH).is_none());
        let (data, trailers) = read_all(response.body_mut()).await;
        assert_eq!(data, b"abc0123456789");
        assert_eq!(trailers.expect("trailers")["x-checksum"], "42");
        assert!(response.body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn interim_replies_are_skipped_and_bodiless_replies_end_at_once() {
        let (addr, _served) = instance(
            vec![b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"],
            0,
        )
        .await;
        let mut response = get(&addr, Method::GET).await.expect("response");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(response.body().is_end_stream());
        assert!(response.body_mut().take_reusable().is_some());

        let (addr, _served) =
            instance(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"], 0).await;
        let mut response = get(&addr, Method::HEAD).await.expect("response");
        assert!(response.body().is_end_stream(), "HEAD has no body");
        assert_eq!(response.headers()[header::CONTENT_LENGTH], "1000");
        assert!(response.body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn a_reply_without_length_runs_until_close_and_is_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
                .await;
        });
        let mut response = get(&addr, Method::GET).await.expect("response");
        let (data, _) = read_all(response.body_mut()).await;
        assert_eq!(data, b"until the end");
        assert!(response.body_mut().take_reusable().is_none());
    }

    #[tokio::test]
    async fn close_and_http_1_0_without_keep_alive_are_not_reused() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"[..],
            &b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"[..],
        ] {
            let (addr, _served) = instance(vec![reply], 0).await;
            let mut response = get(&addr, Method::GET).await.expect("response");
            let (data, _) = read_all(response.body_mut()).await;
            assert_eq!(data, b"ok");
            assert!(response.body_mut().take_reusable().is_none());
        }
        let (addr, _served) = instance(
            vec![b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"],
            0,
        )
        .await;
        let mut response = get(&addr, Method::GET).await.expect("response");
        read_all(response.body_mut()).await;
        assert!(response.body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn malformed_and_truncated_replies_are_errors() {
        for reply in [
            &b"NOT HTTP\r\n\r\n"[..],
            &b"HTTP/1.1 999999 Huge\r\n\r\n"[..],
            &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
        ] {
            let (addr, _served) = instance(vec![reply], 0).await;
            assert!(get(&addr, Method::GET).await.is_err(), "{reply:?}");
        }
        // Closed mid-body.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
                .await;
        });
        let mut response = get(&addr, Method::GET).await.expect("head");
        let mut failed = false;
        while let Some(frame) = response.body_mut().frame().await {
            failed |= frame.is_err();
        }
        assert!(failed, "a body cut short is an error, not an end");
        assert!(response.body_mut().take_reusable().is_none());

        for reply in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"[..],
            &b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
        ] {
            let (addr, _served) = instance(vec![reply], 0).await;
            let mut response = get(&addr, Method::GET).await.expect("head");
            let frame = response.body_mut().frame().await;
            assert!(matches!(frame, Some(Err(_))), "{reply:?}");
        }
    }

    #[tokio::test]
    async fn a_head_too_large_is_refused() {
        let big: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n",
                "a".repeat(MAX_HEAD_BYTES)
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        let (addr, _served) = instance(vec![big], 0).await;
        assert!(matches!(
            get(&addr, Method::GET).await,
            Err(Error::HeadTooLarge)
        ));
    }

    #[tokio::test]
    async fn host_is_replaced_and_an_empty_post_says_its_length() {
        let (addr, served) =
            instance(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], 0).await;
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("client.test"));
        headers.insert("x-player", HeaderValue::from_static("7"));
        let host = HeaderValue::from_static("10.0.0.1:7000");
        let client = super::super::headers::Client::new("192.0.2.9:4000".parse().expect("addr"));
        let uri: hyper::Uri = "/join".parse().expect("uri");
        let added = super::super::headers::prepare_request_headers(
            &mut headers,
            Version::HTTP_11,
            &uri,
            &client,
        );
        let response = conn(&addr)
            .await
            .send(
                &Method::POST,
                "/join",
                &headers,
                &added,
                Some(&host),
                RequestBody::Empty,
            )
            .await
            .expect("response");
        assert!(response.body().is_end_stream());
        drop(response);
        let request = String::from_utf8(served.await.expect("served")).expect("utf-8");
        assert_eq!(
            request,
            "POST /join HTTP/1.1\r\nhost: 10.0.0.1:7000\r\nx-player: 7\r\n\
             x-forwarded-for: 192.0.2.9\r\nx-forwarded-proto: http\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
