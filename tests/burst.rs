//! A burst of connections, as when a game server restarts and its players
//! reconnect at once: none may wait out a SYN retransmit (1 s) because the
//! listen backlog overflowed (it was 128: 697 of 1,000 simultaneous
//! connects waited 0.9-1.5 s).

mod support;

use std::time::Duration;

use support::config::{AgentToml, Section};
use support::{eventually, Backend, TestAgent, DEADLINE};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Raises the soft open-files limit to the hard one; returns it.
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to a rlimit for both calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

#[tokio::test]
async fn a_burst_of_connections_waits_for_no_syn_retransmit() {
    // Each proxied connection costs this process four descriptors: the
    // client, squire's two sides and the backend's.
    let burst = (raise_open_files_limit().saturating_sub(200) / 4).min(2000) as usize;
    assert!(burst >= 500, "open-files limit too low for a burst");
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("battle").await;
    support::announce_local(dir.path(), "battle", "battle-1", backend.addr);
    let agent =
        TestAgent::start(&AgentToml::local(dir.path()).upstream(Section::upstream("battle"))).await;
    eventually("squire to route", DEADLINE, || async {
        agent.routable().await.len() == 1
    })
    .await;

    let listen = agent.listen();
    let connects: Vec<_> = (0..burst)
        .map(|_| {
            tokio::spawn(async move {
                let started = Instant::now();
                let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(listen)).await;
                (started.elapsed(), stream)
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let mut streams = Vec::with_capacity(burst);
    for connect in connects {
        let (took, stream) = connect.await.expect("connect task");
        slowest = slowest.max(took);
        streams.push(stream.expect("within the deadline").expect("connected"));
    }
    eprintln!("measured: {burst} simultaneous connects, the slowest took {slowest:?}");
    assert!(
        slowest < Duration::from_millis(900),
        "a connect waited out a SYN retransmit: {slowest:?}"
    );
    agent.stop().await;
}
