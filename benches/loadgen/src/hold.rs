//! Memory: the proxy's RSS idle, holding many idle proxied connections, and
//! after they close; and a burst of simultaneous connects, which shows the
//! proxy's listen backlog (a connect that overflowed it waits out a SYN or
//! SYN-ACK retransmit, 1 s on Linux).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::net::{connect, PING, PONG};
use crate::procfs::rss_kib;

/// Connects in flight at once while opening the idle connections.
const OPENING: usize = 64;
/// Bound on one connect and its PING.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// A connect slower than this waited out a retransmit.
const RETRANSMIT: Duration = Duration::from_millis(900);

pub async fn hold(
    targets: Vec<SocketAddr>,
    conns: usize,
    burst: usize,
    pids: Vec<u32>,
) -> Result<String, String> {
    let target = *targets.first().ok_or("need --targets")?;
    let conns = conns.min(100_000);
    let burst = burst.min(10_000);

    // The burst: every connect at once.
    let mut set = JoinSet::new();
    for n in 0..burst as u64 {
        set.spawn(timed_open(target, n));
    }
    let mut burst_ms = Vec::with_capacity(burst);
    let mut open = Vec::with_capacity(conns);
    let mut errors = 0u64;
    while let Some(result) = set.join_next().await {
        match result.map_err(|e| e.to_string())? {
            Ok((stream, took)) => {
                burst_ms.push(took.as_secs_f64() * 1e3);
                drop(stream);
            }
            Err(_) => errors += 1,
        }
    }
    burst_ms.sort_by(f64::total_cmp);
    let delayed = burst_ms
        .iter()
        .filter(|&&ms| ms >= RETRANSMIT.as_secs_f64() * 1e3)
        .count();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Idle connections, opened a few at a time.
    let idle = rss_kib(&pids)?;
    let opening = Instant::now();
    let mut set = JoinSet::new();
    let mut n = burst as u64;
    let mut started = 0;
    while started < conns || !set.is_empty() {
        while started < conns && set.len() < OPENING {
            set.spawn(timed_open(target, n));
            n += 1;
            started += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok((stream, _)))) => open.push(stream),
            Some(Ok(Err(_))) => errors += 1,
            Some(Err(e)) => return Err(e.to_string()),
            None => break,
        }
    }
    let open_secs = opening.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = rss_kib(&pids)?;
    let held_conns = open.len();
    drop(open);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(&pids)?;
    // What an allocator gives back on its own schedule (squire trims every
    // 5 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let settled = rss_kib(&pids)?;
    let at = |p: f64| -> f64 {
        if burst_ms.is_empty() {
            return 0.0;
        }
        let rank = ((p * burst_ms.len() as f64).ceil() as usize).clamp(1, burst_ms.len());
        burst_ms[rank - 1]
    };
    Ok(format!(
        "rss_idle_kib={idle} rss_held_kib={held} rss_after_kib={after} rss_settled_kib={settled} conns={held_conns} \
         kib_per_conn={:.2} open_secs={open_secs:.2} burst={} burst_p50_ms={:.1} burst_p99_ms={:.1} \
         burst_max_ms={:.1} burst_delayed={delayed} errors={errors}",
        (held as f64 - idle as f64) / held_conns.max(1) as f64,
        burst_ms.len(),
        at(0.5),
        at(0.99),
        at(1.0),
    ))
}

/// Connects and gets one PONG back, so the proxy has connected upstream too.
async fn timed_open(target: SocketAddr, n: u64) -> io::Result<(TcpStream, Duration)> {
    let start = Instant::now();
    let open = async {
        let mut stream = connect(target, n).await?;
        stream.write_all(PING).await?;
        let mut reply = [0u8; 7];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut reply).await?;
        if reply != PONG {
            return Err(crate::net::invalid("not +PONG"));
        }
        Ok(stream)
    };
    match tokio::time::timeout(OP_TIMEOUT, open).await {
        Ok(Ok(stream)) => Ok((stream, start.elapsed())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}
