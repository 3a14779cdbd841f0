//! Connections from an HTTP listener to its upstream instances, kept open
//! and reused.
//!
//! Connecting is a step of its own (not hidden in a client), so the proxy
//! knows a connect failure before any byte of the request was sent and can
//! retry it on another instance, and knows whether a request rode a reused
//! connection. HTTP/1.1 connections ([`h1`](super::h1), spoken in the
//! request's own task) go back to their instance's idle list when the
//! response body has been read to its end; HTTP/2 (hyper) keeps one
//! multiplexed connection per instance; an upgrade hands a fresh
//! connection's socket to hyper. An instance is dialled at the addresses its
//! endpoint carries (resolved when the snapshot was built, never per
//! connect); when they change, its connections go as if it had left. What
//! a route keeps per instance goes when the
//! instance leaves the upstream ([`ConnPool::retain`]), except its request
//! counters, kept for the grace period
//! ([`departed_grace`](crate::metrics::departed_grace)) so a scrape still
//! sees the last counts and an instance back within it counts on.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::{PooledBody, RequestBody};
use super::counters::RequestCounters;
use super::h1::Conn;
use super::headers::Added;
use super::BoxError;
use crate::balance::now_ms;

/// Why no connection could be had.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(io::Error),
    Handshake(hyper::Error),
}

enum Sender {
    Http1(Conn),
    Http2(http2::SendRequest<RequestBody>),
}

/// The request going out on an attempt: the client's (prepared) head, and
/// the `Host` to send instead of the client's one (`rewrite_host`).
pub struct Outgoing<'a> {
    pub parts: &'a Parts,
    /// Sent after the client's fields.
    pub added: &'a Added,
    pub authority: &'a str,
    pub host: Option<HeaderValue>,
}

/// A connection checked out for one request.
pub struct Checkout {
    sender: Sender,
    instance: Arc<InstancePool>,
    pub reused: bool,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// How connections to the instances are opened and kept.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub h2: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

/// The connections of one route, per instance.
pub struct ConnPool {
    settings: PoolSettings,
    /// `upstream` and `service` labels of the request counters.
    labels: (String, String),
    instances: Mutex<Instances>,
}

#[derive(Default)]
struct Instances {
    live: HashMap<String, Arc<InstancePool>>,
    /// The counters of instances that left, by authority, until their grace
    /// period ends (dropped at the next [`ConnPool::retain`] after it).
    departed: HashMap<String, RequestCounters>,
}

/// Everything a route keeps for one instance: its idle HTTP/1.1
/// connections or its one HTTP/2 connection, and its request counters.
/// Dropped (closing the idle connections) when the instance leaves the
/// upstream; a request in flight holds its own reference and finishes.
pub struct InstancePool {
    authority: String,
    /// What to dial (see [`crate::balance::Endpoint::addrs`]).
    addrs: Arc<[SocketAddr]>,
    settings: PoolSettings,
    http1_idle: Mutex<VecDeque<Idle>>,
    http2: Mutex<Option<http2::SendRequest<RequestBody>>>,
    /// Held across an HTTP/2 connect, so concurrent first requests wait for
    /// the one connection instead of each opening their own. Per instance:
    /// a hanging connect to one delays no other.
    h2_connecting: tokio::sync::Mutex<()>,
    pub requests: RequestCounters,
}

impl ConnPool {
    pub fn new(settings: PoolSettings, upstream: &str, service: &str) -> Self {
        ConnPool {
            settings,
            labels: (upstream.to_owned(), service.to_owned()),
            instances: Mutex::new(Instances::default()),
        }
    }

    pub fn is_h2(&self) -> bool {
        self.settings.h2
    }

    /// What the route keeps for the instance at `authority`, dialled at
    /// `addrs`. Kept connections to other addresses (the name resolved
    /// anew) are let go of; the counters go on.
    pub fn instance(&self, authority: &str, addrs: &Arc<[SocketAddr]>) -> Arc<InstancePool> {
        let mut instances = self.lock();
        let moved = match instances.live.get(authority) {
            Some(instance) if instance.addrs == *addrs => return instance.clone(),
            Some(_) => instances.live.remove(authority).map(|i| i.requests.clone()),
            None => None,
        };
        let requests = match moved.or_else(|| instances.departed.remove(authority)) {
            Some(counters) => {
                counters.returned();
                counters
            }
            None => {
                let (upstream, service) = &self.labels;
                RequestCounters::new(upstream, service, authority)
            }
        };
        let instance = Arc::new(InstancePool {
            authority: authority.to_owned(),
            addrs: addrs.clone(),
            settings: self.settings,
            http1_idle: Mutex::new(VecDeque::new()),
            http2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
            requests,
        });
        instances
            .live
            .insert(authority.to_owned(), instance.clone());
        instance
    }

    /// Lets go of every instance not in `keep` (by authority and
    /// addresses): their idle connections close now, busy ones when their
    /// request is done; their counters stay for the grace period. Counters
    /// past it are dropped.
    pub fn retain(&self, keep: impl Fn(&str, &[SocketAddr]) -> bool) {
        let now = now_ms();
        let mut guard = self.lock();
        let instances = &mut *guard;
        instances.departed.retain(|_, c| !c.expired(now));
        let departed = &mut instances.departed;
        instances.live.retain(|authority, instance| {
            if keep(authority, &instance.addrs) {
                return true;
            }
            instance.requests.departed(now);
            departed.insert(authority.clone(), instance.requests.clone());
            false
        });
    }

    /// The instances kept now (for tests and the admin API).
    pub fn authorities(&self) -> Vec<String> {
        self.lock().live.keys().cloned().collect()
    }

    /// The instances that left whose counters are still kept (for tests).
    pub fn departed(&self) -> Vec<String> {
        self.lock().departed.keys().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Instances> {
        // Plain data: a panic elsewhere mid-update leaves it usable.
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl InstancePool {
    /// A connection to the instance: an idle one when there is one still
    /// open, else a new one.
    pub async fn checkout(self: &Arc<Self>) -> Result<Checkout, ConnectError> {
        if self.settings.h2 {
            let existing = || {
                lock(&self.http2)
                    .as_ref()
                    .filter(|s| !s.is_closed())
                    .cloned()
            };
            if let Some(sender) = existing() {
                return Ok(self.checked_out(Sender::Http2(sender), true));
            }
            let _connecting = self.h2_connecting.lock().await;
            if let Some(sender) = existing() {
                return Ok(self.checked_out(Sender::Http2(sender), true));
            }
            let sender = self.connect_h2().await?;
            *lock(&self.http2) = Some(sender.clone());
            return Ok(self.checked_out(Sender::Http2(sender), false));
        }
        if let Some(idle) = self.take_idle() {
            return Ok(self.checked_out(Sender::Http1(idle.conn), true));
        }
        let conn = Conn::new(self.tcp().await?);
        Ok(self.checked_out(Sender::Http1(conn), false))
    }

    fn checked_out(self: &Arc<Self>, sender: Sender, reused: bool) -> Checkout {
        Checkout {
            sender,
            instance: self.clone(),
            reused,
        }
    }

    /// The most recently used idle connection still open. One the instance
    /// closed meanwhile is found out here, before any of the request was
    /// sent.
    fn take_idle(&self) -> Option<Idle> {
        let mut idle = lock(&self.http1_idle);
        while let Some(mut candidate) = idle.pop_back() {
            if candidate.since.elapsed() < self.settings.idle_timeout
                && candidate.conn.is_reusable()
            {
                return Some(candidate);
            }
        }
        None
    }

    pub(super) fn put_back(&self, conn: Conn) {
        if self.settings.max_idle == 0 {
            return;
        }
        let now = Instant::now();
        let mut idle = lock(&self.http1_idle);
        // Oldest first (connections are taken from the back), so the
        // expired ones are at the front: no walk over the whole list per
        // request. One the instance closed is found out when taken.
        let timeout = self.settings.idle_timeout;
        while idle
            .front()
            .is_some_and(|c| now.saturating_duration_since(c.since) >= timeout)
        {
            idle.pop_front();
        }
        if idle.len() >= self.settings.max_idle {
            // Full: the one just used stays, the least recently used goes.
            idle.pop_front();
        }
        idle.push_back(Idle { conn, since: now });
    }

    async fn tcp(&self) -> Result<TcpStream, ConnectError> {
        let connect = TcpStream::connect(&self.addrs[..]);
        let stream = match tokio::time::timeout(self.settings.connect_timeout, connect).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Ok(Ok(stream)) => stream,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(endpoint = %self.authority, error = %e, "cannot set TCP_NODELAY");
        }
        Ok(stream)
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        let stream = self.tcp().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let endpoint = self.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%endpoint, error = %e, "upstream h2 connection ended with an error");
            }
        });
        Ok(sender)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: a panic elsewhere mid-update leaves it usable.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Checkout {
    /// Sends the request. The response body, once read to its end, hands an
    /// HTTP/1.1 connection back to its instance's idle list.
    pub async fn send(
        self,
        out: Outgoing<'_>,
        body: RequestBody,
    ) -> Result<Response<PooledBody>, BoxError> {
        match self.sender {
            Sender::Http2(mut sender) => {
                let response = sender.send_request(build_request(&out, body, true)).await?;
                Ok(response.map(PooledBody::Http2))
            }
            Sender::Http1(conn) => {
                let parts = out.parts;
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let response = conn
                    .send(
                        &parts.method,
                        path,
                        &parts.headers,
                        out.added,
                        out.host.as_ref(),
                        body,
                    )
                    .await?;
                let mut response = response.map(|body| PooledBody::Http1 {
                    body,
                    instance: Some(self.instance),
                });
                // Nothing to read (204, HEAD, Content-Length: 0): the server
                // will not poll the body, so the connection goes back now.
                response.body_mut().release_if_done();
                Ok(response)
            }
        }
    }

    /// Sends a request that upgrades the connection (WebSocket): hyper
    /// speaks it, and the connection is never pooled.
    pub async fn send_upgrade(
        self,
        out: Outgoing<'_>,
        body: RequestBody,
    ) -> Result<Response<Incoming>, BoxError> {
        match self.sender {
            Sender::Http1(conn) => {
                let (mut sender, connection) = http1::Builder::new()
                    .handshake(TokioIo::new(conn.into_stream()))
                    .await?;
                let endpoint = out.authority.to_owned();
                tokio::spawn(async move {
                    if let Err(e) = connection.with_upgrades().await {
                        tracing::debug!(%endpoint, error = %e, "upgraded upstream connection ended with an error");
                    }
                });
                Ok(sender
                    .send_request(build_request(&out, body, false))
                    .await?)
            }
            Sender::Http2(mut sender) => {
                Ok(sender.send_request(build_request(&out, body, true)).await?)
            }
        }
    }
}

/// The request as hyper sends it: origin-form for HTTP/1.1, an absolute URI
/// whose authority is the `Host` for HTTP/2.
fn build_request(out: &Outgoing<'_>, body: RequestBody, h2: bool) -> Request<RequestBody> {
    let parts = out.parts;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.headers_mut() = parts.headers.clone();
    out.added.insert_into(request.headers_mut());
    if let Some(host) = &out.host {
        request.headers_mut().insert(header::HOST, host.clone());
    }
    if h2 {
        // :authority mirrors the Host the instance should see; the
        // connection itself goes to `authority`.
        let host = request
            .headers_mut()
            .remove(header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_owned))
            .unwrap_or_else(|| out.authority.to_owned());
        *request.version_mut() = Version::HTTP_2;
        *request.uri_mut() = format!("http://{host}{path}")
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
    } else {
        *request.version_mut() = Version::HTTP_11;
        *request.uri_mut() = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    use hyper::server::conn::http2 as server;
    use hyper::service::service_fn;

    /// A loopback address whose connects hang: a listener that never
    /// accepts, its accept queue filled until a connect no longer completes.
    async fn hanging_address() -> (socket2::Socket, Vec<TcpStream>, String) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let addr: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        socket.bind(&addr.into()).expect("bind");
        socket.listen(0).expect("listen");
        let addr = socket
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("inet");
        let mut fillers = Vec::new();
        for _ in 0..64 {
            let connect = TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_millis(200), connect).await {
                Ok(Ok(stream)) => fillers.push(stream),
                _ => return (socket, fillers, addr.to_string()),
            }
        }
        panic!("the accept queue never filled");
    }

    /// A real h2c server answering 200 to everything.
    async fn h2_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                            Bytes,
                        >::new(
                        )))
                    });
                    // The connection's end does not matter to the test.
                    let _ = server::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr.to_string()
    }

    fn addrs(authority: &str) -> Arc<[SocketAddr]> {
        Arc::from([authority.parse::<SocketAddr>().expect("addr")])
    }

    fn pool() -> ConnPool {
        let settings = PoolSettings {
            h2: false,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_idle: 8,
        };
        ConnPool::new(settings, "shop", "shop")
    }

    #[test]
    fn an_instance_that_left_keeps_its_counters_for_the_grace_period_only() {
        let pool = pool();
        let get = hyper::Method::GET;
        pool.instance("127.0.0.1:1", &addrs("127.0.0.1:1"))
            .requests
            .count(&get, hyper::StatusCode::OK);
        pool.instance("127.0.0.1:2", &addrs("127.0.0.1:2"));
        pool.retain(|authority, _| authority == "127.0.0.1:2");
        assert_eq!(pool.authorities(), vec!["127.0.0.1:2".to_owned()]);
        assert_eq!(pool.departed(), vec!["127.0.0.1:1".to_owned()]);
        // Back within the grace period: it counts on.
        let back = pool.instance("127.0.0.1:1", &addrs("127.0.0.1:1"));
        assert_eq!(back.requests.get(&get, hyper::StatusCode::OK), 1);
        assert!(pool.departed().is_empty());
        // Gone again, and past the grace period: forgotten.
        pool.retain(|authority, _| authority == "127.0.0.1:2");
        let later = now_ms() + crate::metrics::departed_grace().as_millis() as u64;
        assert!(back.requests.expired(later));
        assert!(!back.requests.expired(now_ms()));
    }

    #[test]
    fn an_instance_at_new_addresses_gets_a_new_pool_and_keeps_its_counters() {
        let pool = pool();
        let get = hyper::Method::GET;
        let first = pool.instance("game.test:1", &addrs("127.0.0.2:1"));
        first.requests.count(&get, hyper::StatusCode::OK);
        assert!(Arc::ptr_eq(
            &first,
            &pool.instance("game.test:1", &addrs("127.0.0.2:1"))
        ));
        let moved = pool.instance("game.test:1", &addrs("127.0.0.3:1"));
        assert!(!Arc::ptr_eq(&first, &moved), "dials the new address");
        assert_eq!(moved.addrs[..], addrs("127.0.0.3:1")[..]);
        assert_eq!(moved.requests.get(&get, hyper::StatusCode::OK), 1);
        assert_eq!(pool.authorities(), vec!["game.test:1".to_owned()]);
    }

    #[tokio::test]
    async fn a_hanging_h2_connect_to_one_instance_delays_no_other() {
        let pool = ConnPool::new(
            PoolSettings {
                h2: true,
                connect_timeout: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(60),
                max_idle: 8,
            },
            "battle",
            "battle",
        );
        let (_socket, _fillers, hanging) = hanging_address().await;
        let good = h2_server().await;

        let stuck = pool.instance(&hanging, &addrs(&hanging));
        let connecting = tokio::spawn({
            let stuck = stuck.clone();
            async move { stuck.checkout().await.map(|_| ()) }
        });
        // The hanging connect holds its instance's lock...
        let deadline = Instant::now() + Duration::from_secs(10);
        while stuck.h2_connecting.try_lock().is_ok() {
            assert!(Instant::now() < deadline, "the connect never started");
            tokio::task::yield_now().await;
        }
        // ... and a first request to another instance connects meanwhile.
        let checkout = tokio::time::timeout(
            Duration::from_secs(10),
            pool.instance(&good, &addrs(&good)).checkout(),
        )
        .await
        .expect("not held up by the hanging connect")
        .expect("connects");
        assert!(!checkout.reused);
        assert!(
            !connecting.is_finished(),
            "still connecting to the other one"
        );
        connecting.abort();
    }
}
