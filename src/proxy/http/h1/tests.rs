//! h1.rs against raw instances on loopback: framing, reuse, errors.

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
    let (addr, served) = instance(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], 0).await;
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
