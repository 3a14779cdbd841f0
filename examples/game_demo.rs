//! A game fleet on one machine, through squire: `cargo run --example game_demo`.
//!
//! Three battle servers (`battle-1..3`, tiny TCP servers in this file that
//! answer `JOIN room-N` with their own name) each run with their own squire,
//! which announces them in squire's embedded registry (a temp directory,
//! no server needed). A gate squire proxies `127.0.0.1:<port>` to the
//! `battle` service with `strategy = "consistent_hash"` and `hash_key =
//! "preamble"`: a client opens with `ROUTE room-N\n` and every connection for
//! that room lands on the same battle server. Then `battle-2` stops (its
//! server and its squire, which deregisters it): only its rooms move, to
//! the two servers left; every other room stays where it was.
//!
//! Every squire runs in this process through the library (`squire::Agent`),
//! each with its own configuration, admin port and registration, as
//! separate `squire run` processes would. Flags: `--rooms N` (12),
//! `--pause 1s` between the steps so you can follow along (0s for tests).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Parser, Debug, Clone)]
#[command(about = "Three battle servers behind a gate squire; one stops and only its rooms move")]
pub struct Options {
    /// How many rooms the clients join.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rooms: u32,
    /// A pause between the steps, to read along (0s: none).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub pause: Duration,
}

/// How long any step may take before the demo gives up.
const STEP_DEADLINE: Duration = Duration::from_secs(20);

/// Which server holds each room, before and after the stop.
pub struct Report {
    pub stopped: String,
    pub before: BTreeMap<String, String>,
    pub after: BTreeMap<String, String>,
}

/// A battle server: answers each `JOIN <room>` line with `<name> <room>`.
struct BattleServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl BattleServer {
    async fn start(name: &str) -> std::io::Result<BattleServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let name = name.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    // A session ends when the client closes it or it fails.
                    while let Ok(Some(line)) = lines.next_line().await {
                        let Some(room) = line.strip_prefix("JOIN ") else {
                            break;
                        };
                        if write
                            .write_all(format!("{name} {room}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        Ok(BattleServer { addr, task })
    }

    fn stop(&self) {
        self.task.abort();
    }
}

/// A squire running in this process, stopped through `stop`.
struct Squire {
    admin: SocketAddr,
    listens: Vec<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Squire {
    async fn start(toml: &str) -> Result<Squire, String> {
        let config = squire::Config::from_toml(toml).map_err(|e| format!("config: {e}\n{toml}"))?;
        let agent = squire::Agent::bind(config)
            .await
            .map_err(|e| format!("squire: {e}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let admin = agent.admin_addr();
        let listens = agent.listen_addrs();
        let task = tokio::spawn(agent.run(async {
            // A dropped sender also means stop.
            let _ = stopped.await;
        }));
        Ok(Squire {
            admin,
            listens,
            stop: Some(stop),
            task,
        })
    }

    /// Stops it (deregistration, drain) and waits until it has.
    async fn stop(mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            // The agent is still running (it owns the receiver until then).
            let _ = stop.send(());
        }
        tokio::time::timeout(STEP_DEADLINE, &mut self.task)
            .await
            .map_err(|_| "a squire did not stop in time".to_owned())?
            .map_err(|e| format!("a squire failed: {e}"))
    }
}

/// The `[agent]` and `[registry]` every squire of the demo shares.
fn common(dir: &Path, node: &str) -> String {
    format!(
        "[agent]\nnode = \"{node}\"\nadmin = \"127.0.0.1:0\"\nstate_dir = \"{state}\"\n\
         log = \"warn\"\ndrain_delay = \"200ms\"\ndrain_timeout = \"1s\"\n\n\
         [registry]\nkind = \"local\"\ndir = \"{registry}\"\nttl = \"3s\"\n",
        state = dir.join(format!("state-{node}")).display(),
        registry = dir.join("registry").display(),
    )
}

fn battle_config(dir: &Path, name: &str, addr: SocketAddr) -> String {
    format!(
        "{}\n[service]\nname = \"battle\"\nid = \"{name}\"\nhost = \"{}\"\nport = {}\n",
        common(dir, name),
        addr.ip(),
        addr.port()
    )
}

fn gate_config(dir: &Path) -> String {
    format!(
        "{}\n[[upstream]]\nservice = \"battle\"\nlisten = \"127.0.0.1:0\"\n\
         strategy = \"consistent_hash\"\nhash_key = \"preamble\"\nconnect_timeout = \"500ms\"\n",
        common(dir, "gate")
    )
}

/// The instance ids the gate routes `battle` to now.
async fn routable(gate: &Squire) -> Result<Vec<String>, String> {
    let status = squire::admin::status(gate.admin).await?;
    let mut ids: Vec<String> = status.services["upstreams"][0]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Waits (bounded) until the gate routes to exactly `want`.
async fn wait_routable(gate: &Squire, want: &[&str]) -> Result<(), String> {
    let deadline = Instant::now() + STEP_DEADLINE;
    loop {
        let now = routable(gate).await?;
        if now == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("the gate routes to {now:?}, not {want:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client: through the gate to `room`, `JOIN`s it; the server's name.
async fn join(gate: SocketAddr, room: &str) -> Result<String, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(gate).await?;
        stream
            .write_all(format!("ROUTE {room}\nJOIN {room}\n").as_bytes())
            .await?;
        let mut answer = String::new();
        BufReader::new(&mut stream).read_line(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(STEP_DEADLINE, exchange)
        .await
        .map_err(|_| format!("{room}: no answer"))?
        .map_err(|e| format!("{room}: {e}"))?;
    match answer.trim_end().split_once(' ') {
        Some((server, echoed)) if echoed == room => Ok(server.to_owned()),
        _ => Err(format!("{room}: unexpected answer {answer:?}")),
    }
}

/// Every room joined once: room -> server.
async fn join_all(gate: SocketAddr, rooms: u32) -> Result<BTreeMap<String, String>, String> {
    let mut held = BTreeMap::new();
    for n in 1..=rooms {
        let room = format!("room-{n}");
        let server = join(gate, &room).await?;
        held.insert(room, server);
    }
    Ok(held)
}

/// `room-12` -> 12, to list rooms in their order.
fn room_number(room: &str) -> u32 {
    room.trim_start_matches("room-").parse().unwrap_or(0)
}

/// Rooms grouped by server, one line per server.
fn by_server(held: &BTreeMap<String, String>, out: &mut impl Write) -> std::io::Result<()> {
    let mut servers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (room, server) in held {
        servers.entry(server).or_default().push(room);
    }
    for (server, mut rooms) in servers {
        rooms.sort_by_key(|r| room_number(r));
        writeln!(
            out,
            "  {server}: {:>2} rooms  {}",
            rooms.len(),
            rooms.join(" ")
        )?;
    }
    Ok(())
}

/// The whole demo, narrated to `out`.
pub async fn demo(options: &Options, out: &mut impl Write) -> Result<Report, String> {
    let io = |e: std::io::Error| e.to_string();
    let dir = tempfile::tempdir().map_err(io)?;
    writeln!(
        out,
        "squire game demo: embedded registry in {}",
        dir.path().join("registry").display()
    )
    .map_err(io)?;

    let names = ["battle-1", "battle-2", "battle-3"];
    let mut fleet = Vec::new();
    for name in names {
        let server = BattleServer::start(name).await.map_err(io)?;
        let squire = Squire::start(&battle_config(dir.path(), name, server.addr)).await?;
        writeln!(
            out,
            "  started {name} on {} with its squire (admin {})",
            server.addr, squire.admin
        )
        .map_err(io)?;
        fleet.push((name, server, squire));
    }
    let gate = Squire::start(&gate_config(dir.path())).await?;
    let listen = gate.listens[0];
    writeln!(
        out,
        "  started the gate squire: clients connect to {listen} and send `ROUTE room-N`"
    )
    .map_err(io)?;
    wait_routable(&gate, &names).await?;
    writeln!(out, "  the gate sees {}", names.join(", ")).map_err(io)?;
    tokio::time::sleep(options.pause).await;

    writeln!(out, "\n{} rooms joined through the gate:", options.rooms).map_err(io)?;
    let before = join_all(listen, options.rooms).await?;
    by_server(&before, out).map_err(io)?;
    let again = join_all(listen, options.rooms).await?;
    if again != before {
        return Err("joining again moved rooms while nothing changed".to_owned());
    }
    writeln!(out, "  (joined again: every room on the same server)").map_err(io)?;
    tokio::time::sleep(options.pause).await;

    let stopped = "battle-2";
    let at = fleet
        .iter()
        .position(|(name, _, _)| *name == stopped)
        .ok_or("no battle-2")?;
    let (_, server, squire) = fleet.remove(at);
    writeln!(
        out,
        "\nstopping {stopped}: its squire deregisters it, then its server exits"
    )
    .map_err(io)?;
    squire.stop().await?;
    server.stop();
    let left: Vec<&str> = names.iter().copied().filter(|n| *n != stopped).collect();
    wait_routable(&gate, &left).await?;
    writeln!(out, "  the gate sees {}", left.join(", ")).map_err(io)?;
    tokio::time::sleep(options.pause).await;

    writeln!(out, "\nthe same {} rooms joined again:", options.rooms).map_err(io)?;
    let after = join_all(listen, options.rooms).await?;
    by_server(&after, out).map_err(io)?;
    let mut moved = 0;
    let mut rooms: Vec<(&String, &String)> = before.iter().collect();
    rooms.sort_by_key(|(room, _)| room_number(room));
    for (room, was) in rooms {
        let now = &after[room];
        if now != was {
            moved += 1;
            writeln!(out, "  moved  {room:<8} {was} -> {now}").map_err(io)?;
        }
    }
    let stayed = before.len() - moved;
    let only_stopped = before
        .iter()
        .all(|(room, was)| (after[room] == *was) == (was != stopped));
    writeln!(
        out,
        "\n{moved} rooms moved (those {stopped} held), {stayed} stayed where they were{}",
        if only_stopped {
            ""
        } else {
            ": UNEXPECTED, rooms of running servers moved"
        }
    )
    .map_err(io)?;

    gate.stop().await?;
    for (_, server, squire) in fleet {
        squire.stop().await?;
        server.stop();
    }
    Ok(Report {
        stopped: stopped.to_owned(),
        before,
        after,
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let options = Options::parse();
    let mut out = std::io::stdout();
    match demo(&options, &mut out).await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("game demo failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
