//! One timed workload against one target.
//!
//! The clients run for `warmup` unmeasured, then for `duration` measured:
//! an operation counts when it completes inside the measured window, and
//! each one is timed and kept, so the percentiles are exact (no histogram
//! buckets, no coordinated-omission correction: a closed loop, each
//! connection sends its next request when the last is answered). The
//! proxy's CPU time is read at both ends of the window.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::net::{connect, read_response, GET, GET_CLOSE, PING, PONG};
use crate::procfs;

/// Bound on one operation (a connect waiting out SYN retransmits counts as
/// an error after this).
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes per bulk frame.
const FRAME: u64 = 16 << 20;

#[derive(Clone, Copy, PartialEq)]
pub enum Workload {
    /// PING/PONG on connections kept open.
    Tcp,
    /// Connect, one PING/PONG, close.
    TcpChurn,
    /// GET on keep-alive connections.
    Http,
    /// GET with `Connection: close` on a new connection each.
    HttpChurn,
    /// One connection streaming frames to the sink.
    Bulk,
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "tcp" => Workload::Tcp,
            "tcp-churn" => Workload::TcpChurn,
            "http" => Workload::Http,
            "http-churn" => Workload::HttpChurn,
            "bulk" => Workload::Bulk,
            _ => return Err(format!("unknown workload {s:?}")),
        })
    }
}

pub struct Run {
    pub workload: Workload,
    /// Where connections go, in turn (several only for `direct`).
    pub targets: Vec<SocketAddr>,
    pub conns: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// The proxy's processes, whose CPU time is measured.
    pub pids: Vec<u32>,
    /// Bound on the operations of the whole run.
    pub max_ops: u64,
}

/// The run's window and bounds, shared by its clients.
#[derive(Clone)]
struct Window {
    measure: Instant,
    end: Instant,
    /// Operations left to start, over all clients.
    budget: Rc<Cell<u64>>,
    /// Number of the next fresh connection (picks target and source address).
    next_conn: Rc<Cell<u64>>,
}

impl Window {
    fn running(&self) -> bool {
        let left = self.budget.get();
        if left == 0 || Instant::now() >= self.end {
            return false;
        }
        self.budget.set(left - 1);
        true
    }

    fn conn_number(&self) -> u64 {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        n
    }
}

#[derive(Default)]
struct Tally {
    /// Latency of each operation completed in the window, in nanoseconds.
    samples: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, window: &Window, start: Instant) {
        let now = Instant::now();
        if now >= window.measure && now <= window.end {
            self.samples.push((now - start).as_nanos() as u64);
        }
    }

    fn error(&mut self, e: io::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
    }
}

pub async fn run(run: Run) -> Result<String, String> {
    if run.targets.is_empty() || run.conns == 0 {
        return Err("need --targets and --conns > 0".into());
    }
    let start = Instant::now();
    let window = Window {
        measure: start + run.warmup,
        end: start + run.warmup + run.duration,
        budget: Rc::new(Cell::new(run.max_ops)),
        next_conn: Rc::new(Cell::new(0)),
    };
    let local = tokio::task::LocalSet::new();
    let hard_limit = run.warmup + run.duration + OP_TIMEOUT + Duration::from_secs(10);
    let outcome = tokio::time::timeout(hard_limit, local.run_until(drive(&run, window))).await;
    outcome.map_err(|_| format!("the run did not finish within {hard_limit:?}"))?
}

async fn drive(run: &Run, window: Window) -> Result<String, String> {
    let mut clients = JoinSet::new();
    let conns = if run.workload == Workload::Bulk {
        1
    } else {
        run.conns
    };
    for _ in 0..conns {
        let (w, targets, workload) = (window.clone(), run.targets.clone(), run.workload);
        clients.spawn_local(async move {
            match workload {
                Workload::Tcp => keep_alive(w, targets, false).await,
                Workload::Http => keep_alive(w, targets, true).await,
                Workload::TcpChurn => churn(w, targets, false).await,
                Workload::HttpChurn => churn(w, targets, true).await,
                Workload::Bulk => bulk(w, targets[0]).await,
            }
        });
    }
    tokio::time::sleep_until(window.measure.into()).await;
    let cpu_start = procfs::cpu_seconds(&run.pids)?;
    let measured_from = Instant::now();
    // The window ends at its end, or as soon as every client has stopped
    // (the --max-ops budget spent), so a bounded run measures only itself.
    let mut tallies = Vec::with_capacity(conns);
    let end = tokio::time::sleep_until(window.end.into());
    tokio::pin!(end);
    loop {
        tokio::select! {
            _ = &mut end => break,
            joined = clients.join_next() => match joined {
                Some(tally) => tallies.push(tally),
                None => break,
            },
        }
    }
    let cpu = procfs::cpu_seconds(&run.pids)? - cpu_start;
    let secs = (Instant::now() - measured_from).as_secs_f64();

    while let Some(tally) = clients.join_next().await {
        tallies.push(tally);
    }
    let mut all = Tally::default();
    for tally in tallies {
        let tally = tally.map_err(|e| e.to_string())?;
        all.samples.extend(tally.samples);
        all.errors += tally.errors;
        if all.first_error.is_none() {
            all.first_error = tally.first_error;
        }
    }
    let mut samples = all.samples;
    samples.sort_unstable();
    let ops = samples.len() as u64;
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        // Nearest rank: the smallest sample with at least p of them at or below.
        let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1] as f64 / 1e3
    };
    let bytes = if run.workload == Workload::Bulk {
        ops * FRAME
    } else {
        0
    };
    let mut line = format!(
        "ops={ops} secs={secs:.3} rate={:.1} p50_us={:.1} p99_us={:.1} max_us={:.1} errors={} bytes={bytes}",
        ops as f64 / secs,
        pct(0.50),
        pct(0.99),
        pct(1.0),
        all.errors,
    );
    if !run.pids.is_empty() {
        line += &format!(" cpu_s={cpu:.3}");
    }
    if let Some(e) = all.first_error {
        eprintln!("squire-loadgen: {} errors, the first: {e}", all.errors);
    }
    Ok(line)
}

/// One connection, requests one after another; reconnects after an error.
async fn keep_alive(window: Window, targets: Vec<SocketAddr>, http: bool) -> Tally {
    let mut tally = Tally::default();
    let n = window.conn_number();
    let target = targets[n as usize % targets.len()];
    let mut buf = Vec::with_capacity(4096);
    'connect: while window.running() {
        let mut stream = match tokio::time::timeout(OP_TIMEOUT, connect(target, n)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tally.error(e);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(_) => {
                tally.error(io::ErrorKind::TimedOut.into());
                continue;
            }
        };
        buf.clear();
        loop {
            let start = Instant::now();
            let exchange = async {
                if http {
                    stream.write_all(GET).await?;
                    read_response(&mut stream, &mut buf).await
                } else {
                    stream.write_all(PING).await?;
                    read_pong(&mut stream).await
                }
            };
            match tokio::time::timeout(OP_TIMEOUT, exchange).await {
                Ok(Ok(())) => tally.record(&window, start),
                Ok(Err(e)) => {
                    tally.error(e);
                    continue 'connect;
                }
                Err(_) => {
                    tally.error(io::ErrorKind::TimedOut.into());
                    continue 'connect;
                }
            }
            if !window.running() {
                break 'connect;
            }
        }
    }
    tally
}

/// A fresh connection per request, to each target in turn; the latency is
/// from the connect to the whole answer.
async fn churn(window: Window, targets: Vec<SocketAddr>, http: bool) -> Tally {
    let mut tally = Tally::default();
    let mut buf = Vec::with_capacity(4096);
    while window.running() {
        let n = window.conn_number();
        let target = targets[n as usize % targets.len()];
        let start = Instant::now();
        let exchange = async {
            let mut stream = connect(target, n).await?;
            if http {
                stream.write_all(GET_CLOSE).await?;
                buf.clear();
                read_response(&mut stream, &mut buf).await
            } else {
                stream.write_all(PING).await?;
                read_pong(&mut stream).await
            }
            // Dropping the stream closes it (a FIN, not a reset).
        };
        match tokio::time::timeout(OP_TIMEOUT, exchange).await {
            Ok(Ok(())) => tally.record(&window, start),
            Ok(Err(e)) => tally.error(e),
            Err(_) => tally.error(io::ErrorKind::TimedOut.into()),
        }
    }
    tally
}

async fn read_pong(stream: &mut tokio::net::TcpStream) -> io::Result<()> {
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).await?;
    if reply == PONG {
        Ok(())
    } else {
        Err(crate::net::invalid("not +PONG"))
    }
}

/// One connection streaming 16 MiB frames; an operation is a frame the sink
/// has acknowledged.
async fn bulk(window: Window, target: SocketAddr) -> Tally {
    let mut tally = Tally::default();
    let data = vec![0x5au8; 1 << 20];
    let mut stream = match connect(target, 0).await {
        Ok(stream) => stream,
        Err(e) => {
            tally.error(e);
            return tally;
        }
    };
    while window.running() {
        let start = Instant::now();
        let frame = async {
            stream.write_all(&FRAME.to_le_bytes()).await?;
            for _ in 0..FRAME / data.len() as u64 {
                stream.write_all(&data).await?;
            }
            let mut ack = [0u8; 1];
            stream.read_exact(&mut ack).await
        };
        match tokio::time::timeout(OP_TIMEOUT, frame).await {
            Ok(Ok(_)) => tally.record(&window, start),
            Ok(Err(e)) => {
                tally.error(e);
                break;
            }
            Err(_) => {
                tally.error(io::ErrorKind::TimedOut.into());
                break;
            }
        }
    }
    tally
}
