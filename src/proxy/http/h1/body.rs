//! The body of an instance's HTTP/1.1 response, read from the pooled
//! socket in the request's task: by length, in chunks (extensions and
//! trailers), or until close; the connection is handed back once it is
//! read to its end and reusable.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use super::{trim, Conn, Error, MAX_CHUNK_LINE, MAX_HEADERS, MAX_HEAD_BYTES, MAX_READ};
use crate::proxy::http::BoxError;

/// Where the response body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
    /// The head named framing squire cannot follow: the body fails on its
    /// first read.
    Failed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
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
    pub(super) conn: Option<Conn>,
    pub(super) state: State,
    /// Whether the connection may be reused once the body has ended.
    pub(super) reusable: bool,
    pub(super) read_size: usize,
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
