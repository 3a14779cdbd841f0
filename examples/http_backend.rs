//! A minimal HTTP/1.1 + h2c backend for demos and the load benchmark:
//! answers every request with a short body.
//!
//! ```sh
//! cargo run --release --example http_backend -- 127.0.0.1:7300 battle
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7300".to_owned());
    let name = args.next().unwrap_or_else(|| "backend".to_owned());
    let body = Bytes::from(format!("hello from {name}\n"));
    // One thread: the benchmark pins every process to one core.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("http_backend {name} on {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let body = body.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    eprintln!("connection error: {e}");
                }
            });
        }
    })
}
