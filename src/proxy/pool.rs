//! Connections from an HTTP listener to its upstream instances, kept open
//! and reused.
//!
//! Connecting is a step of its own (not hidden in a client), so the proxy
//! knows a connect failure before any byte of the request was sent and can
//! retry it on another instance, and knows whether a request rode a reused
//! connection. HTTP/1.1 connections go back to their instance's idle list when
//! the response body has been read to its end; HTTP/2 keeps one multiplexed
//! connection per instance.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

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

/// Why no connection could be had.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(io::Error),
    Handshake(hyper::Error),
}

enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

/// A connection checked out for one request.
pub struct Checkout {
    sender: Sender,
    authority: String,
    pub reused: bool,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

pub struct ConnPool {
    h2: bool,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    http1_idle: Mutex<HashMap<String, Vec<Idle>>>,
    http2: Mutex<HashMap<String, http2::SendRequest<RequestBody>>>,
    h2_connecting: tokio::sync::Mutex<()>,
}

impl ConnPool {
    pub fn new(
        h2: bool,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Self> {
        Arc::new(ConnPool {
            h2,
            connect_timeout,
            idle_timeout,
            max_idle,
            http1_idle: Mutex::new(HashMap::new()),
            http2: Mutex::new(HashMap::new()),
            h2_connecting: tokio::sync::Mutex::new(()),
        })
    }

    pub fn is_h2(&self) -> bool {
        self.h2
    }

    /// A connection to `authority`: an idle one when there is one still open,
    /// else a new one.
    pub async fn checkout(&self, authority: &str) -> Result<Checkout, ConnectError> {
        if self.h2 {
            let existing = || {
                self.lock_h2()
                    .get(authority)
                    .filter(|s| !s.is_closed())
                    .cloned()
            };
            if let Some(sender) = existing() {
                return Ok(self.h2_checkout(sender, authority, true));
            }
            // One connection per instance: concurrent first requests wait
            // for the one connect instead of each opening their own.
            let _connecting = self.h2_connecting.lock().await;
            if let Some(sender) = existing() {
                return Ok(self.h2_checkout(sender, authority, true));
            }
            let sender = self.connect_h2(authority).await?;
            self.lock_h2().insert(authority.to_owned(), sender.clone());
            return Ok(self.h2_checkout(sender, authority, false));
        }
        while let Some(mut idle) = self.take_idle(authority) {
            // A connection the instance closed meanwhile fails here, before
            // any of this request was sent.
            if idle.sender.ready().await.is_ok() {
                return Ok(Checkout {
                    sender: Sender::Http1(idle.sender),
                    authority: authority.to_owned(),
                    reused: true,
                });
            }
        }
        let sender = self.connect_h1(authority).await?;
        Ok(Checkout {
            sender: Sender::Http1(sender),
            authority: authority.to_owned(),
            reused: false,
        })
    }

    fn h2_checkout(
        &self,
        sender: http2::SendRequest<RequestBody>,
        authority: &str,
        reused: bool,
    ) -> Checkout {
        Checkout {
            sender: Sender::Http2(sender),
            authority: authority.to_owned(),
            reused,
        }
    }

    fn take_idle(&self, authority: &str) -> Option<Idle> {
        let mut idle = self.lock_h1();
        let list = idle.get_mut(authority)?;
        while let Some(candidate) = list.pop() {
            if candidate.since.elapsed() < self.idle_timeout && !candidate.sender.is_closed() {
                return Some(candidate);
            }
        }
        None
    }

    fn put_back(&self, authority: String, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.lock_h1();
        let list = idle.entry(authority).or_default();
        list.retain(|c| c.since.elapsed() < self.idle_timeout && !c.sender.is_closed());
        if list.len() < self.max_idle {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops idle connections to instances no longer in `keep`.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock_h1().retain(|authority, _| keep(authority));
        self.lock_h2().retain(|authority, _| keep(authority));
    }

    async fn tcp(&self, authority: &str) -> Result<TcpStream, ConnectError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority)).await {
                Err(_) => return Err(ConnectError::Timeout),
                Ok(Err(e)) => return Err(ConnectError::Io(e)),
                Ok(Ok(stream)) => stream,
            };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(endpoint = authority, error = %e, "cannot set TCP_NODELAY");
        }
        Ok(stream)
    }

    async fn connect_h1(
        &self,
        authority: &str,
    ) -> Result<http1::SendRequest<RequestBody>, ConnectError> {
        let stream = self.tcp(authority).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let endpoint = authority.to_owned();
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%endpoint, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        authority: &str,
    ) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        let stream = self.tcp(authority).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let endpoint = authority.to_owned();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%endpoint, error = %e, "upstream h2 connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn lock_h1(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle>>> {
        // Plain data: a panic elsewhere mid-update leaves it usable.
        self.http1_idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_h2(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, http2::SendRequest<RequestBody>>> {
        self.http2.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Checkout {
    /// Sends the request. The response body, once read to its end, hands an
    /// HTTP/1.1 connection back to `pool`.
    pub async fn send(
        self,
        pool: &Arc<ConnPool>,
        request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, hyper::Error> {
        match self.sender {
            Sender::Http2(mut sender) => {
                let response = sender.send_request(request).await?;
                Ok(response.map(|body| PooledBody {
                    body,
                    give_back: None,
                }))
            }
            Sender::Http1(mut sender) => {
                let response = sender.send_request(request).await?;
                if response.body().is_end_stream() {
                    // Nothing to read (204, HEAD, Content-Length: 0): the
                    // server will not poll the body, so give it back now.
                    pool.put_back(self.authority, sender);
                    return Ok(response.map(|body| PooledBody {
                        body,
                        give_back: None,
                    }));
                }
                let give_back = Some((pool.clone(), self.authority, sender));
                Ok(response.map(|body| PooledBody { body, give_back }))
            }
        }
    }

    /// Sends a request that upgrades the connection (WebSocket): the
    /// connection is never pooled.
    pub async fn send_upgrade(
        self,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match self.sender {
            Sender::Http1(mut sender) => sender.send_request(request).await,
            Sender::Http2(mut sender) => sender.send_request(request).await,
        }
    }
}

/// An upstream response body that returns its connection to the pool when
/// read to the end. Dropped early, the connection is dropped (closed) too.
pub struct PooledBody {
    body: Incoming,
    give_back: Option<(Arc<ConnPool>, String, http1::SendRequest<RequestBody>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((pool, authority, sender)) = self.give_back.take() {
            pool.put_back(authority, sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.give_back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
