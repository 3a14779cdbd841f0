//! squire-loadgen: the load generator, the backends and the reports of
//! `benches/load.sh` and `benches/failover.sh`. One binary, so the
//! benchmarks need no other tool.
//!
//! # Layout
//! - `net`: the wire protocols (PING/PONG, HTTP/1.1, bulk frames) and
//!   connects from rotating loopback source addresses
//! - `serve`: the backends: TCP PING/PONG (`--name`: the reply names the
//!   backend), HTTP/1.1 with a 128-byte body, a bulk sink
//! - `load`: one timed workload against a target: exact percentiles (every
//!   request is timed and kept), the proxy's CPU time over the measured window
//! - `failover`: churn through a proxy while an instance behind it is
//!   killed, with the proxy's view polled from its `/metrics`; and its report
//! - `hold`: memory with many idle proxied connections, and a burst of connects
//! - `idle`: the share of a core the proxy uses with no traffic
//! - `procfs`: CPU time and RSS of a process from `/proc`
//! - `report`: medians, spreads and ratios of a results file as Markdown
//!
//! Every loop is bounded in time and in count.

mod failover;
mod hold;
mod load;
mod net;
mod procfs;
mod report;
mod serve;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage:
  squire-loadgen ports N
  squire-loadgen serve [--tcp ADDR] [--http ADDR] [--sink ADDR] [--name NAME] [--max-secs S]
  squire-loadgen wait ADDR,ADDR.. [--secs S]
  squire-loadgen run --workload tcp|tcp-churn|http|http-churn|bulk --targets ADDR,..
                     [--conns N] [--warmup S] [--duration S] [--pids PID,..] [--max-ops N]
  squire-loadgen failover --target ADDR --admin ADDR --service S --victim ID --kill PID,..
                     [--rate R] [--conns N] [--before S] [--after S] [--poll-ms MS]
  squire-loadgen failover-report FILE
  squire-loadgen hold --targets ADDR,.. [--conns N] [--burst N] [--pids PID,..]
  squire-loadgen idle --pids PID,.. [--secs S]
  squire-loadgen calib
  squire-loadgen report FILE";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("squire-loadgen: {e}\n{USAGE}");
            ExitCode::from(64)
        }
    }
}

fn dispatch(args: &[String]) -> Result<(), String> {
    let (command, rest) = args.split_first().ok_or("no command")?;
    let flags = Flags::parse(rest)?;
    match command.as_str() {
        "ports" => {
            let n: usize = flags
                .positional(0)?
                .parse()
                .map_err(|e| format!("N: {e}"))?;
            for port in net::free_ports(n.min(1000)).map_err(|e| e.to_string())? {
                println!("{port}");
            }
            Ok(())
        }
        "serve" => runtime()?.block_on(serve::serve(
            flags.addrs("tcp")?,
            flags.addrs("http")?,
            flags.addrs("sink")?,
            flags.opt("name"),
            Duration::from_secs_f64(flags.num("max-secs", 7200.0)?),
        )),
        "wait" => {
            let targets = parse_addrs(flags.positional(0)?)?;
            let limit = Duration::from_secs_f64(flags.num("secs", 10.0)?);
            runtime()?.block_on(net::wait_listening(&targets, limit))
        }
        "run" => {
            let run = load::Run {
                workload: flags.get("workload")?.parse()?,
                targets: flags.addrs("targets")?,
                conns: flags.num("conns", 1.0)? as usize,
                warmup: Duration::from_secs_f64(flags.num("warmup", 1.0)?),
                duration: Duration::from_secs_f64(flags.num("duration", 5.0)?),
                pids: flags.pids()?,
                max_ops: flags.num("max-ops", 50_000_000.0)? as u64,
            };
            let line = runtime()?.block_on(load::run(run))?;
            println!("{line}");
            Ok(())
        }
        "failover" => {
            let run = failover::Failover {
                target: flags.addr("target")?,
                admin: flags.addr("admin")?,
                service: flags.get("service")?.to_owned(),
                victim: flags.get("victim")?.to_owned(),
                kill: flags.pids_of("kill")?,
                rate: flags.num("rate", 500.0)?,
                conns: flags.num("conns", 32.0)? as usize,
                before: Duration::from_secs_f64(flags.num("before", 2.0)?),
                after: Duration::from_secs_f64(flags.num("after", 6.0)?),
                poll: Duration::from_secs_f64(flags.num("poll-ms", 5.0)? / 1e3),
            };
            let line = runtime()?.block_on(failover::run(run))?;
            println!("{line}");
            Ok(())
        }
        "failover-report" => {
            let text = std::fs::read_to_string(flags.positional(0)?).map_err(|e| e.to_string())?;
            print!("{}", failover::report(&text)?);
            Ok(())
        }
        "hold" => {
            let line = runtime()?.block_on(hold::hold(
                flags.addrs("targets")?,
                flags.num("conns", 10_000.0)? as usize,
                flags.num("burst", 1000.0)? as usize,
                flags.pids()?,
            ))?;
            println!("{line}");
            Ok(())
        }
        "idle" => {
            let pids = flags.pids()?;
            let secs = flags.num("secs", 3.0)?.clamp(0.1, 60.0);
            let before = procfs::cpu_seconds(&pids)?;
            std::thread::sleep(Duration::from_secs_f64(secs));
            let used = procfs::cpu_seconds(&pids)? - before;
            println!("cpu_share={:.3}", used / secs);
            Ok(())
        }
        "calib" => {
            println!("ms={:.1}", calibrate().as_secs_f64() * 1e3);
            Ok(())
        }
        "report" => {
            let text = std::fs::read_to_string(flags.positional(0)?).map_err(|e| e.to_string())?;
            print!("{}", report::render(&text)?);
            Ok(())
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

/// One thread: the benchmark pins every process to one core.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// A fixed amount of pure CPU work; its wall time on the benchmark's core,
/// repeated, is the machine's noise figure.
fn calibrate() -> Duration {
    let start = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200_000_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x);
    start.elapsed()
}

fn parse_addrs(list: &str) -> Result<Vec<SocketAddr>, String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e| format!("{s:?}: {e}")))
        .collect()
}

/// `--key value` pairs and positional arguments.
struct Flags {
    pairs: Vec<(String, String)>,
    positional: Vec<String>,
}

impl Flags {
    fn parse(args: &[String]) -> Result<Flags, String> {
        let mut flags = Flags {
            pairs: Vec::new(),
            positional: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.strip_prefix("--") {
                Some(key) => {
                    let value = it.next().ok_or(format!("--{key} needs a value"))?;
                    flags.pairs.push((key.to_owned(), value.clone()));
                }
                None => flags.positional.push(arg.clone()),
            }
        }
        Ok(flags)
    }

    fn positional(&self, i: usize) -> Result<&str, String> {
        self.positional
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("missing argument {}", i + 1))
    }

    fn opt(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn get(&self, key: &str) -> Result<&str, String> {
        self.opt(key).ok_or_else(|| format!("--{key} is required"))
    }

    fn num(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.opt(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("--{key} {v:?}: not a number")),
        }
    }

    fn addrs(&self, key: &str) -> Result<Vec<SocketAddr>, String> {
        self.opt(key).map_or(Ok(Vec::new()), parse_addrs)
    }

    fn pids(&self) -> Result<Vec<u32>, String> {
        self.pids_of("pids")
    }

    fn pids_of<T: std::str::FromStr>(&self, key: &str) -> Result<Vec<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        self.opt(key)
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|e| format!("--{key} {s:?}: {e}")))
            .collect()
    }

    fn addr(&self, key: &str) -> Result<SocketAddr, String> {
        match self.addrs(key)?[..] {
            [addr] => Ok(addr),
            _ => Err(format!("--{key} takes one address")),
        }
    }
}
