//! Moving bytes between a client and an instance.
//!
//! Between two plain TCP sockets, the pumps below. When either side is TLS
//! (see [`Stream`]), the bytes have to pass through squire to be encrypted
//! or decrypted, and rustls keeps buffers of its own anyway: the copy is
//! tokio's `copy_bidirectional` over streams that count what they read
//! ([`Metered`]), with the same half-close forwarding and meters.
//!
//! # Plain sockets
//!
//! Each direction is a [`Pump`]: it waits until its source is readable and
//! only then borrows a buffer from a per-thread pool, reads, writes all it
//! read and gives the buffer back. An idle proxied connection therefore
//! holds no buffer at all (tokio's `copy_bidirectional` keeps two 8 KiB
//! buffers per connection for its whole life).
//!
//! A direction whose read fills the whole buffer is carrying bulk data: it
//! switches to `splice(2)` through a pipe, so the bytes move from socket to
//! socket inside the kernel without being copied into squire. The pipe is
//! taken from a shared pool when data is waiting and given back once it is
//! empty again. Where no pipe can be had (descriptor limit) the direction
//! stays on buffers.
//!
//! Half-close is forwarded as `copy_bidirectional` does: when one side ends
//! its sending, the other side's write half is shut down and the other
//! direction goes on until it ends too. Bytes are counted as they are read
//! from each side, so the counters are exact whichever path moved them.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::stream::Stream;
use crate::balance::now_ms;

/// Size of a pooled buffer: a read that fills it marks the direction bulk.
const BUFFER: usize = 16 * 1024;
/// Buffers kept per thread for reuse; more in use at once are allocated
/// and freed.
const POOLED_BUFFERS: usize = 64;
/// Pipes kept for reuse (each is two descriptors).
const POOLED_PIPES: usize = 64;
/// Bytes asked of one `splice` call; the pipe's capacity bounds what it
/// takes.
const SPLICE_CHUNK: usize = 1 << 20;

/// Where the bytes read from each side are counted.
pub struct Meters<'a> {
    /// Bytes read from the client (sent upstream).
    pub from_client: &'a Counter,
    /// Bytes read from the instance (sent to the client).
    pub from_server: &'a Counter,
    /// When bytes last moved either way (ms, [`now_ms`]), for the idle
    /// timeout; `None` when the listener has none.
    pub moved: Option<AtomicU64>,
}

/// Copies both ways until both directions have ended, or one fails.
pub async fn bidirectional(
    client: &mut Stream,
    server: &mut Stream,
    meters: &Meters<'_>,
) -> io::Result<()> {
    match (client, server) {
        (Stream::Plain(client), Stream::Plain(server)) => sockets(client, server, meters).await,
        (client, server) => {
            let mut client = Metered {
                inner: client,
                read: meters.from_client,
                moved: &meters.moved,
            };
            let mut server = Metered {
                inner: server,
                read: meters.from_server,
                moved: &meters.moved,
            };
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, BUFFER, BUFFER)
                .await
                .map(|_| ())
        }
    }
}

/// A stream that counts the bytes read from it and notes when they moved.
struct Metered<'a> {
    inner: &'a mut Stream,
    read: &'a Counter,
    moved: &'a Option<AtomicU64>,
}

impl AsyncRead for Metered<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut *self.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.increment(n as u64);
            if let Some(moved) = self.moved {
                moved.store(now_ms(), Ordering::Relaxed);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Metered<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Copies between two plain sockets with the pumps.
async fn sockets(
    client: &mut TcpStream,
    server: &mut TcpStream,
    meters: &Meters<'_>,
) -> io::Result<()> {
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    let upstream = Pump::new(client_read, server_write, meters.from_client, &meters.moved);
    let downstream = Pump::new(server_read, client_write, meters.from_server, &meters.moved);
    Both {
        a: Some(upstream),
        b: Some(downstream),
    }
    .await
}

/// Drives two pumps; done when both are, or at the first error.
struct Both<'a> {
    a: Option<Pump<'a>>,
    b: Option<Pump<'a>>,
}

impl Future for Both<'_> {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        for slot in [&mut this.a, &mut this.b] {
            if let Some(pump) = slot {
                if ready_or_pending(pump.poll(cx))? {
                    *slot = None;
                }
            }
        }
        if this.a.is_none() && this.b.is_none() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

/// `Ok(true)` when the pump finished, `Ok(false)` when it waits.
fn ready_or_pending(polled: Poll<io::Result<()>>) -> io::Result<bool> {
    match polled {
        Poll::Ready(Ok(())) => Ok(true),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(false),
    }
}

/// One direction: from one socket's read half to the other's write half.
struct Pump<'a> {
    from: ReadHalf<'a>,
    to: WriteHalf<'a>,
    read: &'a Counter,
    moved: &'a Option<AtomicU64>,
    state: State,
    /// Set once a read filled a whole buffer; cleared if no pipe can be had.
    bulk: bool,
}

enum State {
    /// Waiting for the source to be readable; holds nothing.
    Idle,
    /// Writing what one read brought.
    Writing {
        buffer: Buffer,
        done: usize,
        len: usize,
    },
    /// Emptying a pipe that holds `pending` bytes into the destination.
    Splicing { pipe: Pipe, pending: usize },
    /// The source ended: shutting down the destination's write half.
    Closing,
}

impl<'a> Pump<'a> {
    fn new(
        from: ReadHalf<'a>,
        to: WriteHalf<'a>,
        read: &'a Counter,
        moved: &'a Option<AtomicU64>,
    ) -> Self {
        Pump {
            from,
            to,
            read,
            moved,
            state: State::Idle,
            bulk: false,
        }
    }

    fn note_read(&self, n: usize) {
        self.read.increment(n as u64);
        if let Some(moved) = self.moved {
            moved.store(now_ms(), Ordering::Relaxed);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Idle => {
                    ready!(self.from.as_ref().poll_read_ready(cx))?;
                    if self.bulk {
                        match Pipe::take() {
                            Some(pipe) => match self.fill(pipe)? {
                                Some(state) => self.state = state,
                                None => continue, // spurious wake-up: wait again
                            },
                            None => self.bulk = false,
                        }
                        continue;
                    }
                    let mut buffer = Buffer::take();
                    let mut read = ReadBuf::new(buffer.bytes());
                    match Pin::new(&mut self.from).poll_read(cx, &mut read) {
                        Poll::Pending => continue, // readiness was stale; buffer goes back
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {}
                    }
                    let len = read.filled().len();
                    if len == 0 {
                        self.state = State::Closing;
                        continue;
                    }
                    self.note_read(len);
                    self.bulk = len == BUFFER;
                    self.state = State::Writing {
                        buffer,
                        done: 0,
                        len,
                    };
                }
                State::Writing { buffer, done, len } => {
                    while *done < *len {
                        let n = ready!(
                            Pin::new(&mut self.to).poll_write(cx, &buffer.bytes()[*done..*len])
                        )?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        *done += n;
                    }
                    self.state = State::Idle;
                }
                State::Splicing { pipe, pending } => {
                    let to: &TcpStream = self.to.as_ref();
                    while *pending > 0 {
                        ready!(to.poll_write_ready(cx))?;
                        match to.try_io(Interest::WRITABLE, || {
                            splice(pipe.read.as_raw_fd(), to.as_raw_fd(), *pending)
                        }) {
                            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Ok(n) => *pending -= n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    match std::mem::replace(&mut self.state, State::Idle) {
                        State::Splicing { pipe, .. } => pipe.give_back(),
                        _ => unreachable!("the state was Splicing above"),
                    }
                }
                State::Closing => {
                    ready!(Pin::new(&mut self.to).poll_shutdown(cx))?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// Splices what the readable source holds into `pipe`: the state to
    /// go on with, or `None` if the source had nothing after all.
    fn fill(&mut self, pipe: Pipe) -> io::Result<Option<State>> {
        let from: &TcpStream = self.from.as_ref();
        match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), SPLICE_CHUNK)
        }) {
            Ok(0) => {
                pipe.give_back();
                Ok(Some(State::Closing))
            }
            Ok(n) => {
                self.note_read(n);
                Ok(Some(State::Splicing { pipe, pending: n }))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// `splice(2)` without blocking on the pipe; the sockets are non-blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (the
    // caller borrows their owners), and null offsets are allowed for
    // pipes and sockets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A copy buffer from the calling thread's pool, returned to it on drop.
struct Buffer(Option<Box<[u8; BUFFER]>>);

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8; BUFFER]>>> = const { RefCell::new(Vec::new()) };
}

impl Buffer {
    fn take() -> Buffer {
        let pooled = BUFFERS.with(|pool| pool.borrow_mut().pop());
        Buffer(Some(pooled.unwrap_or_else(|| Box::new([0; BUFFER]))))
    }

    fn bytes(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Some(buffer) => &mut buffer[..],
            None => &mut [],
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.0.take() {
            BUFFERS.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOLED_BUFFERS {
                    pool.push(buffer);
                }
            });
        }
    }
}

/// An empty pipe, from the shared pool.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

static PIPES: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

impl Pipe {
    /// A pooled pipe, or a new one; `None` if none can be created.
    fn take() -> Option<Pipe> {
        if let Some(pipe) = PIPES.lock().ok().and_then(|mut pool| pool.pop()) {
            return Some(pipe);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "no pipe for splice; copying through buffers");
            return None;
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Some(Pipe { read, write })
    }

    /// Returns an empty pipe to the pool (or closes it if the pool is full).
    fn give_back(self) {
        if let Ok(mut pool) = PIPES.lock() {
            if pool.len() < POOLED_PIPES {
                pool.push(self);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, connected) = tokio::join!(listener.accept(), connect);
        (connected.unwrap(), accepted.unwrap().0)
    }

    struct Proxied {
        client: TcpStream,
        server: TcpStream,
        from_client: Arc<AtomicU64>,
        from_server: Arc<AtomicU64>,
        copy: tokio::task::JoinHandle<io::Result<()>>,
    }

    /// client <-> [proxy_client | copy | proxy_server] <-> server
    async fn proxied() -> Proxied {
        let (client, mut proxy_client) = pair().await;
        let (mut proxy_server, server) = pair().await;
        let from_client = Arc::new(AtomicU64::new(0));
        let from_server = Arc::new(AtomicU64::new(0));
        let (a, b) = (
            Counter::from_arc(from_client.clone()),
            Counter::from_arc(from_server.clone()),
        );
        let copy = tokio::spawn(async move {
            let meters = Meters {
                from_client: &a,
                from_server: &b,
                moved: Some(AtomicU64::new(0)),
            };
            sockets(&mut proxy_client, &mut proxy_server, &meters).await
        });
        Proxied {
            client,
            server,
            from_client,
            from_server,
            copy,
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn bulk_both_ways_arrives_whole_and_is_counted_exactly() {
        let Proxied {
            client,
            server,
            from_client,
            from_server,
            copy,
        } = proxied().await;
        let up = pattern(24 << 20);
        let down = pattern(9 << 20 | 7);
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let (sent_up, sent_down) = (up.clone(), down.clone());
        let writers = tokio::spawn(async move {
            let a = async {
                client_write.write_all(&sent_up).await.unwrap();
                client_write.shutdown().await.unwrap();
            };
            let b = async {
                server_write.write_all(&sent_down).await.unwrap();
                server_write.shutdown().await.unwrap();
            };
            tokio::join!(a, b);
        });
        let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
        let (a, b) = tokio::join!(
            server_read.read_to_end(&mut got_up),
            client_read.read_to_end(&mut got_down)
        );
        a.unwrap();
        b.unwrap();
        writers.await.unwrap();
        copy.await.unwrap().unwrap();
        assert!(got_up == up, "client -> server bytes differ");
        assert!(got_down == down, "server -> client bytes differ");
        assert_eq!(from_client.load(Ordering::Relaxed), up.len() as u64);
        assert_eq!(from_server.load(Ordering::Relaxed), down.len() as u64);
        // The bulk directions went through pipes, which came back empty.
        assert!(!PIPES.lock().unwrap().is_empty(), "no pipe was used");
    }

    #[tokio::test]
    async fn a_half_close_is_forwarded_and_the_answer_still_comes_back() {
        let Proxied {
            mut client,
            mut server,
            from_client,
            from_server,
            copy,
        } = proxied().await;
        client.write_all(b"PING\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"PING\r\n");
        server.write_all(b"+PONG\r\n").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"+PONG\r\n");
        copy.await.unwrap().unwrap();
        assert_eq!(from_client.load(Ordering::Relaxed), 6);
        assert_eq!(from_server.load(Ordering::Relaxed), 7);
    }

    #[tokio::test]
    async fn many_small_exchanges_keep_their_order() {
        let Proxied {
            mut client,
            mut server,
            copy,
            ..
        } = proxied().await;
        let mut buf = [0u8; 64];
        for i in 0..500u32 {
            let message = format!("message {i}\n");
            client.write_all(message.as_bytes()).await.unwrap();
            server.read_exact(&mut buf[..message.len()]).await.unwrap();
            assert_eq!(&buf[..message.len()], message.as_bytes());
            server.write_all(&buf[..message.len()]).await.unwrap();
            client.read_exact(&mut buf[..message.len()]).await.unwrap();
            assert_eq!(&buf[..message.len()], message.as_bytes());
        }
        drop(client);
        drop(server);
        // Both peers gone: the copy ends (with or without a reset error).
        let _ = copy.await.unwrap();
    }

    #[tokio::test]
    async fn a_reset_ends_the_copy() {
        let Proxied {
            client,
            server,
            copy,
            ..
        } = proxied().await;
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client); // RST
        let _keep = server;
        assert!(copy.await.unwrap().is_err(), "a reset is an error");
    }
}
