//! The admin API under abuse: a slow-header client is cut, a flood of
//! connections is refused at the limit and counted, and the API answers
//! again once the flood is gone.

mod support;

use support::config::AgentToml;
use support::{eventually, http_get, TestAgent, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[tokio::test]
async fn a_slow_header_client_is_cut() {
    let dir = tempfile::tempdir().expect("dir");
    let agent = TestAgent::start(&AgentToml::local(dir.path())).await;
    let mut slow = TcpStream::connect(agent.admin).await.expect("connect");
    slow.write_all(b"GET /v1/services HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("partial head");
    let started = Instant::now();
    let mut rest = Vec::new();
    // Cut by the server: the read ends (EOF or an error response), it does
    // not hang until the test's deadline.
    let read = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the slow client was never cut");
    let took = started.elapsed();
    eprintln!("measured: a slow-header admin client cut after {took:?}");
    assert!(took >= squire::admin::HEADER_READ_TIMEOUT / 2, "{took:?}");
    assert_eq!(http_get(agent.admin, "/live").await.0, 200);
    agent.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_admin_limit_are_refused_and_counted() {
    let dir = tempfile::tempdir().expect("dir");
    let agent = TestAgent::start(&AgentToml::local(dir.path())).await;
    let mut flood = Vec::new();
    for _ in 0..squire::admin::MAX_CONNECTIONS {
        flood.push(TcpStream::connect(agent.admin).await.expect("connect"));
    }
    // Every slot is taken (the accept loop has seen them all once one more
    // is closed at once without an answer).
    eventually(
        "a connection beyond the limit to be refused",
        DEADLINE,
        || async {
            let Ok(mut extra) = TcpStream::connect(agent.admin).await else {
                return false;
            };
            if extra
                .write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
            {
                return true;
            }
            let mut answer = Vec::new();
            let _ = extra.read_to_end(&mut answer).await; // a reset is a refusal too
            answer.is_empty()
        },
    )
    .await;
    drop(flood);
    eventually("the admin API to answer again", DEADLINE, || async {
        TcpStream::connect(agent.admin).await.is_ok()
            && http_get(agent.admin, "/live").await.0 == 200
    })
    .await;
    let refused = agent
        .metric("squire_admin_connections_rejected_total ")
        .await
        .expect("counted");
    assert!(refused >= 1.0, "{refused}");
    agent.stop().await;
}
