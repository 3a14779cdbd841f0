//! The bodies that cross an HTTP listener: the client's request body on
//! its way to an instance, and the instance's response body, which hands
//! its HTTP/1.1 connection back to the pool once read to its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h1;
use super::pool::InstancePool;
use super::BoxError;

/// A request body going upstream: the client's own, streamed, or nothing
/// (which can be sent again on a retry).
pub enum RequestBody {
    Streamed(Incoming),
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(body) => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(body) => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// An upstream response body. An HTTP/1.1 one returns its connection to
/// the pool when read to the end; dropped early, the connection is dropped
/// (closed) too.
pub enum PooledBody {
    Http1 {
        body: h1::Body,
        /// Where the connection goes back to; taken when it does.
        instance: Option<Arc<InstancePool>>,
    },
    Http2(Incoming),
}

impl PooledBody {
    /// Hands the connection back once the body is read to its end.
    pub(super) fn release_if_done(&mut self) {
        if let PooledBody::Http1 { body, instance } = self {
            if body.is_end_stream() {
                if let Some(instance) = instance.take() {
                    if let Some(conn) = body.take_reusable() {
                        instance.put_back(conn);
                    }
                }
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this {
            PooledBody::Http2(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            PooledBody::Http1 { body, .. } => {
                let polled = Pin::new(body).poll_frame(cx);
                if polled.is_ready() {
                    this.release_if_done();
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PooledBody::Http1 { body, .. } => body.is_end_stream(),
            PooledBody::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PooledBody::Http1 { body, .. } => body.size_hint(),
            PooledBody::Http2(body) => body.size_hint(),
        }
    }
}
