//! A game fleet on one machine, through squire: `cargo run --example game_demo`.
//!
//! Three battle servers (`battle-1..3`, tiny TCP servers in this file) each
//! run with their own squire, which announces them in squire's embedded
//! registry (a temp directory, no server needed). A gate squire has two
//! listeners for the `battle` service:
//!
//! - the **room** listener, `strategy = "consistent_hash"` with `hash_key =
//!   "preamble"`: a client opens with `ROUTE room-N\n` and every connection
//!   for that room lands on the same server; `ROUTE @<instance-id>\n` pins
//!   it to exactly that instance instead;
//! - the **matchmaker** listener, `strategy = "packed"`: a new room goes to
//!   the fullest server that still has room, by the load each server
//!   reports.
//!
//! The steps:
//!
//! 1. Rooms by hash: `room-1..N` joined through the room listener spread
//!    over the three servers, and joined again stay put.
//! 2. Load-aware placement: each server reports its players out of 100
//!    through its squire (`squire::admin::set_load`, what `PUT /v1/load`
//!    and `squire load 80/100` do), and the matchmaker creates rooms of 10
//!    players through the packed listener: the fullest server with room
//!    fills first, a full one gets none, the emptiest is kept free.
//! 3. Pinned rooms: a room directory knows which instance holds each room
//!    (the answers of steps 1 and 2); clients reach exactly that server
//!    with `ROUTE @<instance-id>`, a full one included (their seats are
//!    already counted).
//! 4. `battle-2` drains, then stops. While it drains (maintenance on), a
//!    pin to it is refused `pinned_unavailable`; once its squire
//!    deregistered it, `pinned_unknown`: the client is closed, never sent
//!    to another server, and the room directory has to answer again.
//! 5. Rooms by hash again: only `battle-2`'s rooms moved; every other room
//!    stayed where it was.
//!
//! Every squire runs in this process through the library (`squire::Agent`),
//! each with its own configuration, admin port and registration, as
//! separate `squire run` processes would. Flags: `--rooms N` (12),
//! `--pause 1s` between the steps so you can follow along (0s for tests).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Three battle servers behind a gate squire: rooms by hash, placed by load, pinned; one stops"
)]
pub struct Options {
    /// How many rooms the clients join by hash.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rooms: u32,
    /// A pause between the steps, to read along (0s: none).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub pause: Duration,
}

/// How long any step may take before the demo gives up.
const STEP_DEADLINE: Duration = Duration::from_secs(20);

/// The battle servers and the players each holds when the demo starts
/// (matches already running), out of [`CAPACITY`].
pub const FLEET: [(&str, u32); 3] = [("battle-1", 20), ("battle-2", 80), ("battle-3", 50)];

/// Players a battle server takes.
pub const CAPACITY: u32 = 100;

/// Players a new room brings.
pub const ROOM_PLAYERS: u32 = 10;

/// Rooms the matchmaker creates in step 2.
pub const NEW_ROOMS: u32 = 4;

/// The server that drains and stops in step 4.
pub const STOPPED: &str = "battle-2";

/// Players and capacity per server, as the gate sees them.
pub type Loads = BTreeMap<String, (u32, u32)>;

/// One room the matchmaker created: where it went and every server's load
/// once the gate saw the new one.
pub struct Placement {
    pub room: String,
    pub server: String,
    pub loads: Loads,
}

/// What happened at each step, for tests/game_demo.rs.
pub struct Report {
    pub stopped: String,
    /// Step 1: room -> server, by hash.
    pub before: BTreeMap<String, String>,
    /// Step 2: the loads the servers reported first, then each placement.
    pub loads: Loads,
    pub placed: Vec<Placement>,
    /// Step 3: room -> the server that answered `ROUTE @<its instance>`,
    /// or the reason the gate refused it.
    pub pinned: BTreeMap<String, Result<String, String>>,
    /// Step 4: the same while the stopped server drained, and once it was
    /// gone.
    pub pinned_draining: BTreeMap<String, Result<String, String>>,
    pub pinned_stopped: BTreeMap<String, Result<String, String>>,
    /// Step 5: room -> server, by hash, after the stop.
    pub after: BTreeMap<String, String>,
}

/// A battle server: answers `JOIN <room>` with `<name> <room>`, and
/// `CREATE <room>` the same after taking in the room's players.
struct BattleServer {
    addr: SocketAddr,
    players: Arc<AtomicU32>,
    task: JoinHandle<()>,
}

impl BattleServer {
    async fn start(name: &str, players: u32) -> std::io::Result<BattleServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let name = name.to_owned();
        let players = Arc::new(AtomicU32::new(players));
        let count = players.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (name, count) = (name.clone(), count.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    // A session ends when the client closes it or it fails.
                    while let Ok(Some(line)) = lines.next_line().await {
                        let room = if let Some(room) = line.strip_prefix("JOIN ") {
                            room
                        } else if let Some(room) = line.strip_prefix("CREATE ") {
                            count.fetch_add(ROOM_PLAYERS, Ordering::Relaxed);
                            room
                        } else {
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
        Ok(BattleServer {
            addr,
            players,
            task,
        })
    }

    fn players(&self) -> u32 {
        self.players.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        self.task.abort();
    }
}

/// A squire running in this process, stopped through `stop`.
struct Squire {
    admin: SocketAddr,
    token: squire::config::Secret,
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
        let token = agent.admin_token();
        let listens = agent.listen_addrs();
        let task = tokio::spawn(agent.run(async {
            // A dropped sender also means stop.
            let _ = stopped.await;
        }));
        Ok(Squire {
            admin,
            token,
            listens,
            stop: Some(stop),
            task,
        })
    }

    /// What the game process does to report its load: `PUT /v1/load`.
    async fn report_load(&self, players: u32) -> Result<(), String> {
        squire::admin::set_load(self.admin, Ok(&self.token), Some((players, CAPACITY)))
            .await
            .map(drop)
            .map_err(|e| format!("reporting the load: {e}"))
    }

    /// Maintenance on: the instance is announced `draining`.
    async fn drain(&self) -> Result<(), String> {
        squire::admin::set_maintenance(self.admin, Ok(&self.token), true, Some("demo drain"))
            .await
            .map(drop)
            .map_err(|e| format!("maintenance: {e}"))
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

/// The gate: the room listener (hash and pins), then the matchmaker's.
fn gate_config(dir: &Path) -> String {
    format!(
        "{}\n[[upstream]]\nservice = \"battle\"\nlisten = \"127.0.0.1:0\"\n\
         strategy = \"consistent_hash\"\nhash_key = \"preamble\"\nconnect_timeout = \"500ms\"\n\
         \n[[upstream]]\nservice = \"battle\"\nlisten = \"127.0.0.1:0\"\n\
         strategy = \"packed\"\nconnect_timeout = \"500ms\"\n",
        common(dir, "gate")
    )
}

/// `GET path` on an admin API: the body.
async fn admin_get(admin: SocketAddr, path: &str) -> Result<String, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(admin).await?;
        // HTTP/1.0: the answer ends with the connection, never chunked.
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(STEP_DEADLINE, exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
        {
            Ok(body.to_owned())
        }
        _ => Err(format!("GET {path}: {answer:?}")),
    }
}

/// The endpoints the gate's `upstream` (0: rooms, 1: matchmaker) routes to.
async fn endpoints(gate: &Squire, upstream: usize) -> Result<Vec<serde_json::Value>, String> {
    let status = squire::admin::status(gate.admin).await?;
    Ok(status.services["upstreams"][upstream]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The instance ids the gate's room listener routes to now.
async fn routable(gate: &Squire) -> Result<Vec<String>, String> {
    let mut ids: Vec<String> = endpoints(gate, 0)
        .await?
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids)
}

/// The instance ids the gate knows of `battle`, whatever their status.
async fn discovered(gate: &Squire) -> Result<Vec<String>, String> {
    let status = squire::admin::status(gate.admin).await?;
    let mut ids: Vec<String> = status.services["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "battle")
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Ok(ids)
}

/// The fresh loads the matchmaker listener picks by.
async fn gate_loads(gate: &Squire) -> Result<Loads, String> {
    Ok(endpoints(gate, 1)
        .await?
        .iter()
        .filter(|e| e["load"]["fresh"] == true)
        .filter_map(|e| {
            let players = u32::try_from(e["load"]["players"].as_u64()?).ok()?;
            let capacity = u32::try_from(e["load"]["capacity"].as_u64()?).ok()?;
            Some((e["id"].as_str()?.to_owned(), (players, capacity)))
        })
        .collect())
}

/// Waits (bounded) until `check` holds of what `read` returns; the last
/// value read.
async fn wait_for<T: std::fmt::Debug, F, Fut>(
    what: &str,
    mut read: F,
    check: impl Fn(&T) -> bool,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + STEP_DEADLINE;
    loop {
        let now = read().await?;
        if check(&now) {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(format!("{what}: still {now:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the gate's room listener routes to exactly `want`.
async fn wait_routable(gate: &Squire, want: &[&str]) -> Result<(), String> {
    wait_for(
        &format!("the gate to route to {want:?}"),
        || routable(gate),
        |now| now == want,
    )
    .await
    .map(drop)
}

/// Sends `lines` on a new connection to `listen` and reads one answer
/// line, `<server> <room>`: the server's name, or `None` when the gate
/// closed the connection without one.
async fn exchange(listen: SocketAddr, lines: &str, room: &str) -> Result<Option<String>, String> {
    let talk = async {
        let mut stream = TcpStream::connect(listen).await?;
        stream.write_all(lines.as_bytes()).await?;
        let mut answer = String::new();
        // A reset is a close too: the gate refused the client.
        match BufReader::new(&mut stream).read_line(&mut answer).await {
            Ok(_) => Ok(answer),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(String::new()),
            Err(e) => Err(e),
        }
    };
    let answer = tokio::time::timeout(STEP_DEADLINE, talk)
        .await
        .map_err(|_| format!("{room}: no answer"))?
        .map_err(|e| format!("{room}: {e}"))?;
    if answer.is_empty() {
        return Ok(None);
    }
    match answer.trim_end().split_once(' ') {
        Some((server, echoed)) if echoed == room => Ok(Some(server.to_owned())),
        _ => Err(format!("{room}: unexpected answer {answer:?}")),
    }
}

/// One client: through the room listener by hash, `JOIN`s `room`.
async fn join(gate: SocketAddr, room: &str) -> Result<String, String> {
    exchange(gate, &format!("ROUTE {room}\nJOIN {room}\n"), room)
        .await?
        .ok_or_else(|| format!("{room}: the gate closed the connection"))
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

/// `squire_tcp_connections_failed_total` of the gate's room listener, by
/// reason.
async fn refusals(gate: &Squire) -> Result<BTreeMap<String, f64>, String> {
    let text = admin_get(gate.admin, "/metrics").await?;
    let listen = format!("listen=\"{}\"", gate.listens[0]);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("squire_tcp_connections_failed_total{") && l.contains(&listen))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?;
            let count = l.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((reason.to_owned(), count))
        })
        .collect())
}

/// A client of `room` pinned to `instance`: the server that answered, or
/// the reason the gate gives (read from its failure counter) for closing
/// the connection.
async fn join_pinned(
    gate: &Squire,
    instance: &str,
    room: &str,
) -> Result<Result<String, String>, String> {
    let before = refusals(gate).await?;
    let lines = format!("ROUTE @{instance}\nJOIN {room}\n");
    if let Some(server) = exchange(gate.listens[0], &lines, room).await? {
        return Ok(Ok(server));
    }
    // The counter may move just after the close: wait for it.
    let grew = |now: &BTreeMap<String, f64>| {
        now.iter()
            .find(|(reason, n)| before.get(*reason).copied().unwrap_or(0.0) < **n)
            .map(|(reason, _)| reason.clone())
    };
    let now = wait_for(
        &format!("the gate to count the refusal of {room}"),
        || refusals(gate),
        |now| grew(now).is_some(),
    )
    .await?;
    Ok(Err(grew(&now).unwrap_or_default()))
}

/// Every room of `directory` (room -> instance id) joined pinned.
async fn join_all_pinned(
    gate: &Squire,
    directory: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Result<String, String>>, String> {
    let mut reached = BTreeMap::new();
    for (room, instance) in directory {
        reached.insert(room.clone(), join_pinned(gate, instance, room).await?);
    }
    Ok(reached)
}

/// `room-12` -> (`room`, 12), to list rooms in their order.
fn room_order(room: &str) -> (String, u32) {
    let (prefix, n) = room.rsplit_once('-').unwrap_or((room, ""));
    (prefix.to_owned(), n.parse().unwrap_or(0))
}

/// Rooms grouped by server, one line per server.
fn by_server(held: &BTreeMap<String, String>, out: &mut impl Write) -> std::io::Result<()> {
    let mut servers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (room, server) in held {
        servers.entry(server).or_default().push(room);
    }
    for (server, mut rooms) in servers {
        rooms.sort_by_key(|r| room_order(r));
        writeln!(
            out,
            "  {server}: {:>2} rooms  {}",
            rooms.len(),
            rooms.join(" ")
        )?;
    }
    Ok(())
}

/// One row of the placement table: a room, where it went, every load.
fn load_row(out: &mut impl Write, room: &str, server: &str, loads: &Loads) -> std::io::Result<()> {
    let mut row = format!("  {room:<8} {server:<10}");
    for (name, _) in FLEET {
        let cell = match loads.get(name) {
            Some((players, capacity)) if players >= capacity => {
                format!("{players}/{capacity} full")
            }
            Some((players, capacity)) => format!("{players}/{capacity}"),
            None => "?".to_owned(),
        };
        row.push_str(&format!(" {cell:<13}"));
    }
    writeln!(out, "{}", row.trim_end())
}

/// The pinned outcomes, one line per server reached and one per refusal
/// reason, with their rooms.
fn pinned_lines(
    outcomes: &BTreeMap<String, Result<String, String>>,
    directory: &BTreeMap<String, String>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut lines: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (room, outcome) in outcomes {
        let line = match outcome {
            Ok(server) if *server == directory[room] => format!("reached {server}"),
            Ok(server) => format!("UNEXPECTED: reached {server}, not {}", directory[room]),
            Err(reason) => format!("@{} refused: {reason}", directory[room]),
        };
        lines.entry(line).or_default().push(room);
    }
    for (line, mut rooms) in lines {
        rooms.sort_by_key(|r| room_order(r));
        writeln!(
            out,
            "  {line:<37} {:>2} rooms  {}",
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

    let names: Vec<&str> = FLEET.iter().map(|(name, _)| *name).collect();
    let mut fleet = Vec::new();
    for (name, players) in FLEET {
        let server = BattleServer::start(name, players).await.map_err(io)?;
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
    let (rooms, matchmaker) = (gate.listens[0], gate.listens[1]);
    writeln!(
        out,
        "  started the gate squire: rooms on {rooms} (`ROUTE room-N`, `ROUTE @<instance-id>`), \
         the matchmaker on {matchmaker} (packed)"
    )
    .map_err(io)?;
    wait_routable(&gate, &names).await?;
    writeln!(out, "  the gate sees {}", names.join(", ")).map_err(io)?;
    tokio::time::sleep(options.pause).await;

    // 1. Rooms by hash.
    writeln!(
        out,
        "\n1. {} rooms joined through the gate by hash:",
        options.rooms
    )
    .map_err(io)?;
    let before = join_all(rooms, options.rooms).await?;
    by_server(&before, out).map_err(io)?;
    let again = join_all(rooms, options.rooms).await?;
    if again != before {
        return Err("joining again moved rooms while nothing changed".to_owned());
    }
    writeln!(out, "  (joined again: every room on the same server)").map_err(io)?;
    tokio::time::sleep(options.pause).await;

    // 2. Load-aware placement.
    writeln!(
        out,
        "\n2. each server reports its players out of {CAPACITY} through its squire;\n   \
         the matchmaker creates {NEW_ROOMS} rooms of {ROOM_PLAYERS} players (packed):"
    )
    .map_err(io)?;
    for (_, server, squire) in &fleet {
        squire.report_load(server.players()).await?;
    }
    let reported: Loads = FLEET
        .iter()
        .map(|(name, players)| ((*name).to_owned(), (*players, CAPACITY)))
        .collect();
    let loads = wait_for(
        "the gate to see the reported loads",
        || gate_loads(&gate),
        |now| *now == reported,
    )
    .await?;
    let header: String = names.iter().map(|name| format!(" {name:<13}")).collect();
    writeln!(
        out,
        "  {:<8} {:<10}{}",
        "room",
        "placed on",
        header.trim_end()
    )
    .map_err(io)?;
    // Each row once the gate has seen the new load: a report reaches the
    // gate through the registry, so placing the next room sooner could
    // still pick by the one before.
    load_row(out, "(start)", "", &loads).map_err(io)?;
    let mut placed = Vec::new();
    let mut directory = before.clone();
    for n in 1..=NEW_ROOMS {
        let room = format!("new-{n}");
        let server = exchange(matchmaker, &format!("CREATE {room}\n"), &room)
            .await?
            .ok_or_else(|| format!("{room}: the matchmaker found no server with room"))?;
        let (_, battle, squire) = fleet
            .iter()
            .find(|(name, _, _)| *name == server)
            .ok_or_else(|| format!("{room}: placed on {server}, not in the fleet"))?;
        squire.report_load(battle.players()).await?;
        let mut want = placed
            .last()
            .map_or(&reported, |p: &Placement| &p.loads)
            .clone();
        want.insert(server.clone(), (battle.players(), CAPACITY));
        let loads = wait_for(
            &format!("the gate to see {server}'s load after {room}"),
            || gate_loads(&gate),
            |now| *now == want,
        )
        .await?;
        load_row(out, &room, &server, &loads).map_err(io)?;
        directory.insert(room.clone(), server.clone());
        placed.push(Placement {
            room,
            server,
            loads,
        });
    }
    writeln!(
        out,
        "  (the fullest server with room fills first; a full one gets no new room)"
    )
    .map_err(io)?;
    tokio::time::sleep(options.pause).await;

    // 3. Pinned rooms.
    writeln!(
        out,
        "\n3. the room directory's {} rooms joined pinned, `ROUTE @<instance-id>`:",
        directory.len()
    )
    .map_err(io)?;
    let pinned = join_all_pinned(&gate, &directory).await?;
    pinned_lines(&pinned, &directory, out).map_err(io)?;
    tokio::time::sleep(options.pause).await;

    // 4. One server drains, then stops.
    let at = fleet
        .iter()
        .position(|(name, _, _)| *name == STOPPED)
        .ok_or("no server to stop")?;
    let (_, server, squire) = fleet.remove(at);
    writeln!(
        out,
        "\n4. {STOPPED} drains (maintenance on: announced draining):"
    )
    .map_err(io)?;
    squire.drain().await?;
    let left: Vec<&str> = names.iter().copied().filter(|n| *n != STOPPED).collect();
    wait_routable(&gate, &left).await?;
    if !discovered(&gate).await?.iter().any(|id| id == STOPPED) {
        return Err(format!("the gate forgot {STOPPED} while it only drained"));
    }
    writeln!(
        out,
        "  the gate routes to {} and still knows {STOPPED}",
        left.join(", ")
    )
    .map_err(io)?;
    let pinned_draining = join_all_pinned(&gate, &directory).await?;
    pinned_lines(&pinned_draining, &directory, out).map_err(io)?;
    writeln!(
        out,
        "  stopping {STOPPED}: its squire deregisters it, then its server exits"
    )
    .map_err(io)?;
    squire.stop().await?;
    server.stop();
    wait_for(
        &format!("the gate to forget {STOPPED}"),
        || discovered(&gate),
        |now| now == &left,
    )
    .await?;
    writeln!(out, "  the gate sees {}", left.join(", ")).map_err(io)?;
    let pinned_stopped = join_all_pinned(&gate, &directory).await?;
    pinned_lines(&pinned_stopped, &directory, out).map_err(io)?;
    writeln!(
        out,
        "  (a refused client is closed, never sent elsewhere: it asks the directory again)"
    )
    .map_err(io)?;
    tokio::time::sleep(options.pause).await;

    // 5. Rooms by hash again.
    writeln!(
        out,
        "\n5. the same {} rooms joined by hash again:",
        options.rooms
    )
    .map_err(io)?;
    let after = join_all(rooms, options.rooms).await?;
    by_server(&after, out).map_err(io)?;
    let mut moved = 0;
    let mut order: Vec<(&String, &String)> = before.iter().collect();
    order.sort_by_key(|(room, _)| room_order(room));
    for (room, was) in order {
        let now = &after[room];
        if now != was {
            moved += 1;
            writeln!(out, "  moved  {room:<8} {was} -> {now}").map_err(io)?;
        }
    }
    let stayed = before.len() - moved;
    let only_stopped = before
        .iter()
        .all(|(room, was)| (after[room] == *was) == (was != STOPPED));
    writeln!(
        out,
        "\n{moved} rooms moved (those {STOPPED} held), {stayed} stayed where they were{}",
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
        stopped: STOPPED.to_owned(),
        before,
        loads: reported,
        placed,
        pinned,
        pinned_draining,
        pinned_stopped,
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
