//! The `squire` command: parse, validate, run, map errors to exit codes.
//!
//! Subcommands: `run`, `check`, `init`, `status`, `health`, `maintenance`, `load`,
//! `drain`, `completions`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use squire::config::LogFormat;
use squire::reload::Reloader;
use squire::{Config, ConfigError};
use tokio::signal::unix::{signal, SignalKind};

/// mimalloc instead of glibc's malloc: a proxied HTTP request allocates ~28
/// times (hyper's buffers and header maps, the task, the pooled body) and
/// glibc spent ~370 instructions per allocation and free here (bins,
/// consolidation). Built without transparent huge pages (`no_thp`), which
/// had put idle RSS 10 MB higher; freed memory goes back in
/// [`squire::memory`].
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code for a bad command-line argument (as clap's own usage errors).
const EXIT_ARGUMENT: u8 = 2;
/// Exit code when a second signal interrupts a graceful shutdown.
const EXIT_INTERRUPTED: i32 = 130;

#[derive(Parser)]
#[command(
    name = "squire",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SQUIRE_COMMIT"), ")"),
    about = "Per-host sidecar for game-server fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// Path to the configuration file.
        #[arg(short, long, default_value = "agent.toml")]
        config: PathBuf,
    },
    /// Show a running agent: readiness, registrations, each upstream's
    /// endpoints. Exits 1 when the agent is unreachable or not ready.
    Status {
        #[command(flatten)]
        agent: AgentAddress,
        /// Print everything read, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write an annotated agent.toml for a service, a registry kind and
    /// upstreams, to stdout or a file; `squire check` accepts it as it is.
    Init {
        /// The registry kind: local, etcd, consul, zookeeper, nacos, eureka.
        #[arg(long, default_value = "local")]
        registry: String,
        /// The admin API's address (default 127.0.0.1:9901); each squire on
        /// a host needs its own.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// The local service this squire announces.
        #[arg(long, requires = "port")]
        service: Option<String>,
        /// The local service's port.
        #[arg(long, requires = "service")]
        port: Option<u16>,
        /// SERVICE=LISTEN[:tcp|http], e.g. gate=127.0.0.1:7001 (repeatable).
        #[arg(long)]
        upstream: Vec<squire::init::UpstreamSpec>,
        /// Write to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Overwrite the output file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Validate a configuration file and report every problem in it.
    Check {
        #[arg(short, long, default_value = "agent.toml")]
        config: PathBuf,
    },
    /// Exit 0 when the running agent is ready (its /ready answers 200), 1
    /// when it is not or cannot be reached: for a container HEALTHCHECK or
    /// an exec probe. Quiet unless it fails.
    Health {
        /// Ask /live instead (the process runs, nothing panicked): ready or
        /// not, registered or not.
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        agent: AgentAddress,
    },
    /// Announce our instance `draining` (maintenance on), wait until every
    /// registry holds it and then --settle more so peers see it, and with
    /// --wait until the game reports 0 players (PUT /v1/load) or --deadline
    /// passes; then exit: the preStop hook of a game container. Open
    /// sessions continue; shutting the agent down later deregisters it.
    Drain {
        /// After the registries hold `draining`: how long peers get to see
        /// it (their watches, or the poll interval of Eureka and Nacos).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// Then wait until the reported players reach 0, at most --deadline
        /// (past it squire drain exits 1). `--wait 5s`, with a duration,
        /// is the older spelling of `--settle 5s`.
        #[arg(long, num_args = 0..=1, value_name = "SETTLE", value_parser = humantime::parse_duration)]
        wait: Option<Option<Duration>>,
        /// How long --wait waits for the players to leave.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// How long the registries may take to hold `draining`; past it
        /// squire drain exits 1 (maintenance stays on).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Why, shown in /v1/self.
        #[arg(long, default_value = "drain")]
        reason: String,
        #[command(flatten)]
        agent: AdminAccess,
    },
    /// Report the game's load, PLAYERS/CAPACITY (e.g. 37/100), published
    /// with our registration (PUT /v1/load); `clear` removes it. The game
    /// reports again at least every service.load_ttl / 2, or the load goes
    /// stale (unknown to peers).
    Load {
        /// PLAYERS/CAPACITY, or `clear`.
        load: String,
        #[command(flatten)]
        agent: AdminAccess,
    },
    /// Turn maintenance mode on (announce `draining`: peers open no new
    /// connections, open ones continue) or off (back to the health checks).
    Maintenance {
        #[arg(value_enum)]
        mode: OnOff,
        /// Why, shown in /v1/self.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        agent: AdminAccess,
    },
    /// Print a completion script for a shell, e.g.
    /// `squire completions bash > /etc/bash_completion.d/squire`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Which running agent a command talks to.
#[derive(clap::Args)]
struct AgentAddress {
    /// The running agent's configuration, to find its admin address.
    #[arg(short, long, default_value = "agent.toml")]
    config: PathBuf,
    /// The admin address, instead of reading it from the configuration.
    #[arg(long)]
    admin: Option<SocketAddr>,
}

/// Which running agent a command that changes it talks to, and with which
/// token.
#[derive(clap::Args)]
struct AdminAccess {
    #[command(flatten)]
    address: AgentAddress,
    /// A file holding the admin token (private to its owner, as
    /// agent.admin_token_file), instead of the one the configuration
    /// names or the agent generated in its state_dir.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Init {
            registry,
            admin,
            service,
            port,
            upstream,
            output,
            force,
        } => init(
            squire::init::Template {
                registry: &registry,
                admin,
                service: service.as_deref().zip(port),
                upstreams: &upstream,
            },
            output,
            force,
        ),
        Command::Status { agent, json } => status(&agent, json),
        Command::Health { live, agent } => health(&agent, live),
        Command::Drain {
            settle,
            wait,
            deadline,
            timeout,
            reason,
            agent,
        } => {
            let client = match AdminClient::new(agent) {
                Ok(client) => client,
                Err(code) => return code,
            };
            // `--wait 5s` is the old `--settle 5s`; a bare `--wait` waits
            // for the players.
            let (settle, players_within) = match wait {
                None => (settle, None),
                Some(Some(old)) => (old, None),
                Some(None) => (settle, Some(deadline)),
            };
            client.answer(squire::admin::drain(
                client.admin,
                client.token(),
                &reason,
                timeout,
                settle,
                players_within,
                |line| eprintln!("squire: {line}"),
            ))
        }
        Command::Load { load, agent } => {
            let load = if load == "clear" {
                None
            } else {
                match squire::load::parse_fraction(&load) {
                    Ok(load) => Some(load),
                    Err(e) => {
                        eprintln!("squire: {e}");
                        return ExitCode::from(EXIT_ARGUMENT);
                    }
                }
            };
            let client = match AdminClient::new(agent) {
                Ok(client) => client,
                Err(code) => return code,
            };
            client.answer(squire::admin::set_load(client.admin, client.token(), load))
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "squire", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&config, &e),
        },
        Command::Maintenance {
            mode,
            reason,
            agent,
        } => {
            let client = match AdminClient::new(agent) {
                Ok(client) => client,
                Err(code) => return code,
            };
            client.answer(squire::admin::set_maintenance(
                client.admin,
                client.token(),
                matches!(mode, OnOff::On),
                reason.as_deref(),
            ))
        }
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(e) => return config_failure(&path, &e),
            };
            init_logging(&config);
            // One thread: a current-thread runtime, which runs every task
            // on this thread with no work-stealing queues, cross-thread
            // wakeups or parking handshake to pay for on each request.
            let mut builder = match config.agent.threads {
                1 => tokio::runtime::Builder::new_current_thread(),
                0 => tokio::runtime::Builder::new_multi_thread(),
                n => {
                    let mut builder = tokio::runtime::Builder::new_multi_thread();
                    builder.worker_threads(n);
                    builder
                }
            };
            // mimalloc frees per thread: each worker gives its freed
            // memory back when it goes idle (the agent's trim task covers
            // only the thread it happens to run on).
            builder.on_thread_park(squire::memory::trim_if_due);
            let runtime = match builder.enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("squire: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(config, path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "squire failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The agent's answer on stdout (success), or why there is none on
/// stderr (failure): how `squire maintenance` and `squire drain` end.
/// A command's connection to a running agent's admin API: where, with
/// which token, and the runtime it talks on.
struct AdminClient {
    admin: SocketAddr,
    /// The token, or why none could be read (the request then fails with
    /// that reason, unsent).
    token: Result<squire::config::Secret, String>,
    runtime: tokio::runtime::Runtime,
}

impl AdminClient {
    /// `--admin` and `--token-file`, else what the configuration says (its
    /// `agent.admin`; its `agent.admin_token_file`, or the token the agent
    /// generated in its `state_dir`, or why it cannot be read). Errors
    /// about the flags and the configuration are printed.
    fn new(access: AdminAccess) -> Result<AdminClient, ExitCode> {
        let AgentAddress { config, admin } = access.address;
        let from_file = access.token_file.map(|file| {
            squire::config::read_secret_file(&file).map_err(|e| {
                eprintln!("squire: --token-file: {e}");
                ExitCode::from(EXIT_CONFIG)
            })
        });
        let (admin, token) = match (admin, from_file) {
            (Some(admin), Some(token)) => (admin, Ok(token?)),
            (admin, from_file) => {
                let loaded = Config::load(&config).map_err(|e| config_failure(&config, &e))?;
                let admin = admin.unwrap_or(loaded.agent.admin);
                let token = match from_file {
                    Some(token) => Ok(token?),
                    None => squire::admin::client_token(&loaded.agent, admin),
                };
                (admin, token)
            }
        };
        Ok(AdminClient {
            admin,
            token,
            runtime: client_runtime()?,
        })
    }

    fn token(&self) -> Result<&squire::config::Secret, &str> {
        self.token.as_ref().map_err(String::as_str)
    }

    /// Runs the request; prints its answer (exit 0) or its error (exit 1).
    fn answer<T, E>(&self, request: impl std::future::Future<Output = Result<T, E>>) -> ExitCode
    where
        T: std::fmt::Display,
        E: std::fmt::Display,
    {
        match self.runtime.block_on(request) {
            Ok(answer) => {
                println!("{answer}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("squire: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

/// The runtime a CLI command talks to the admin API on.
fn client_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("squire: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// `--admin`, else the configuration's `agent.admin` (its errors printed).
fn admin_addr(agent: &AgentAddress) -> Result<SocketAddr, ExitCode> {
    match agent.admin {
        Some(admin) => Ok(admin),
        None => Config::load(&agent.config)
            .map(|loaded| loaded.agent.admin)
            .map_err(|e| config_failure(&agent.config, &e)),
    }
}

/// `squire health`: 0 when `/ready` (or `/live`) answers 200, else 1 with
/// the answer or why there is none on stderr.
fn health(agent: &AgentAddress, live: bool) -> ExitCode {
    let admin = match admin_addr(agent) {
        Ok(admin) => admin,
        Err(code) => return code,
    };
    let runtime = match client_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let probe = if live {
        squire::admin::Probe::Live
    } else {
        squire::admin::Probe::Ready
    };
    match runtime.block_on(squire::admin::health(admin, probe)) {
        Ok((true, _)) => ExitCode::SUCCESS,
        Ok((false, answer)) => {
            eprintln!("squire: {admin}: {answer}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("squire: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `squire status`: the tables (or `--json`); 1 when the agent is
/// unreachable or not ready.
fn status(agent: &AgentAddress, json: bool) -> ExitCode {
    let admin = match admin_addr(agent) {
        Ok(admin) => admin,
        Err(code) => return code,
    };
    let runtime = match client_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(squire::admin::status(admin)) {
        Ok(status) => {
            if json {
                println!("{:#}", status.to_json());
            } else {
                print!("{}", status.render(admin));
            }
            if status.ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("squire: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `squire init`: the template to stdout, or to `output` (never over an
/// existing file unless `force`).
fn init(template: squire::init::Template, output: Option<PathBuf>, force: bool) -> ExitCode {
    let text = match template.render() {
        Ok(text) => text,
        Err(e) => {
            eprintln!("squire: --registry: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(path) = output else {
        print!("{text}");
        return ExitCode::SUCCESS;
    };
    let mut open = std::fs::OpenOptions::new();
    open.write(true);
    if force {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    let written = open
        .open(&path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()));
    match written {
        Ok(()) => {
            eprintln!(
                "squire: wrote {}; check it with squire check -c {0}",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            eprintln!(
                "squire: {} exists; pass --force to overwrite it",
                path.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("squire: cannot write {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn config_failure(path: &std::path::Path, error: &ConfigError) -> ExitCode {
    match error {
        // Already names the file.
        ConfigError::Read { .. } => eprintln!("squire: {error}"),
        _ => eprintln!("squire: {}: {error}", path.display()),
    }
    ExitCode::from(EXIT_CONFIG)
}

fn init_logging(config: &Config) {
    squire::liveness::install_panic_hook();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.agent.log));
    let stderr = std::io::stderr();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&stderr));
    match config.agent.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the agent: SIGHUP reloads `path`, SIGTERM/SIGINT stop it.
async fn run(config: Config, path: PathBuf) -> Result<(), squire::AgentError> {
    // First, so that a SIGHUP during startup cannot kill the process
    // (its default action); one that comes before the agent runs is
    // handled once it does.
    let hangup = signal(SignalKind::hangup());
    let agent = squire::Agent::bind(config).await?.reload_from(path);
    match hangup {
        Ok(hangup) => {
            tokio::spawn(reload_on_hangup(hangup, agent.reloader()));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler; reload with POST /v1/reload")
        }
    }
    agent.run(shutdown_signal()).await;
    Ok(())
}

/// Every SIGHUP reloads the configuration file (the agent logs and counts
/// the outcome); during shutdown it is answered "shutting down".
async fn reload_on_hangup(mut hangup: tokio::signal::unix::Signal, reloader: Reloader) {
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading the configuration");
        // The agent has logged and counted the outcome.
        let _outcome = reloader.reload().await;
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(EXIT_INTERRUPTED);
    });
}
