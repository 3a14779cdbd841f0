//! Which protocol a client connection speaks, from its first bytes: the
//! HTTP/2 connection preface (prior knowledge, h2c) or anything else,
//! served as HTTP/1.1.
//!
//! The bytes read to decide are handed back before the stream's own
//! ([`Prefixed`]), so hyper parses them as if it had read them itself.
//! One read normally holds the whole first request head: a new connection
//! costs no more reads than hyper alone would make (hyper-util's `auto`
//! server reads exactly the preface's 24 bytes first, one more `recv(2)`
//! per connection).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much the first read takes: a typical request head in one read.
/// hyper reads whatever follows into its own buffer.
const FIRST_READ: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Reads until the first bytes tell the protocol: `None` if the client
/// closed before sending a byte.
pub async fn sniff<S: AsyncRead + Unpin>(
    mut stream: S,
) -> io::Result<Option<(Protocol, Prefixed<S>)>> {
    let mut read = Vec::with_capacity(FIRST_READ);
    loop {
        if stream.read_buf(&mut read).await? == 0 {
            // A client that closes part way through the preface is not
            // an HTTP/2 client: hyper answers what it can of the rest.
            if read.is_empty() {
                return Ok(None);
            }
            return Ok(Some((Protocol::Http1, Prefixed::new(read, stream))));
        }
        let decided = read.len().min(PREFACE.len());
        if read[..decided] != PREFACE[..decided] {
            return Ok(Some((Protocol::Http1, Prefixed::new(read, stream))));
        }
        if decided == PREFACE.len() {
            return Ok(Some((Protocol::Http2, Prefixed::new(read, stream))));
        }
        // A prefix of the preface so far: read on (capacity is left, the
        // preface is shorter than the first read).
    }
}

/// A stream whose first bytes were already read: they are read again
/// before the stream's own. Writes go straight through.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    /// How much of `prefix` has been read again.
    consumed: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            consumed: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let left = &this.prefix[this.consumed..];
        if left.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = left.len().min(buf.remaining());
        buf.put_slice(&left[..n]);
        this.consumed += n;
        if this.consumed == this.prefix.len() {
            // Read again in full: the buffer goes now, not with the
            // connection.
            this.prefix = Vec::new();
            this.consumed = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Sniffs what `chunks` send, written one by one with the reader
    /// waiting between them, and reads everything back through the result.
    async fn sniffed(chunks: &[&[u8]]) -> Option<(Protocol, Vec<u8>)> {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.expect("write");
                tokio::task::yield_now().await;
            }
        });
        let result = sniff(server).await.expect("sniff");
        writer.await.expect("writer");
        let (protocol, mut stream) = result?;
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.expect("read back");
        Some((protocol, all))
    }

    #[tokio::test]
    async fn an_http1_request_is_read_back_whole() {
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(
            sniffed(&[request]).await,
            Some((Protocol::Http1, request.to_vec()))
        );
    }

    #[tokio::test]
    async fn the_preface_in_pieces_is_http2() {
        let mut expected = PREFACE.to_vec();
        expected.extend_from_slice(b"frames");
        assert_eq!(
            sniffed(&[&PREFACE[..3], &PREFACE[3..20], &PREFACE[20..], b"frames"]).await,
            Some((Protocol::Http2, expected))
        );
    }

    #[tokio::test]
    async fn a_request_sharing_the_first_letters_of_the_preface_is_http1() {
        // "P" then "POST": a prefix of the preface until the second byte.
        let request = b"POST / HTTP/1.1\r\n\r\n";
        assert_eq!(
            sniffed(&[&request[..1], &request[1..]]).await,
            Some((Protocol::Http1, request.to_vec()))
        );
    }

    #[tokio::test]
    async fn a_close_before_any_byte_is_no_connection_and_within_the_preface_http1() {
        assert_eq!(sniffed(&[]).await, None);
        assert_eq!(
            sniffed(&[b"PRI * "]).await,
            Some((Protocol::Http1, b"PRI * ".to_vec()))
        );
    }

    #[tokio::test]
    async fn a_prefix_longer_than_the_reader_buffer_is_handed_over_in_parts() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let request = vec![b'G'; 3000];
        client.write_all(&request).await.expect("write");
        drop(client);
        let (_, mut stream) = sniff(server).await.expect("sniff").expect("bytes");
        let mut small = [0u8; 1000];
        let mut all = Vec::new();
        loop {
            let n = stream.read(&mut small).await.expect("read");
            if n == 0 {
                break;
            }
            assert!(n <= small.len());
            all.extend_from_slice(&small[..n]);
        }
        assert_eq!(all, request);
    }
}
