//! Configuration validation, the `squire` command line, and graceful shutdown
//! of the real binary.
//!
//! Every file in `tests/fixtures/invalid` is an invalid `agent.toml` whose
//! leading comments say what must be reported:
//!
//! ```toml
//! # expect: upstream.gate.listen: required
//! # expect-count: 1
//! ```
//!
//! Each `# expect:` is a substring that must appear in the error's message;
//! `# expect-count:` (optional) is the exact number of problems.

mod support;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::Duration;

use tokio::time::Instant;

use squire::Config;
use support::config::{AgentToml, Section};
use support::free_port;

/// A config problem is reported at once; this bounds a `squire check`/`run`
/// that should fail before doing anything.
const QUICK: Duration = Duration::from_secs(20);
/// How long startup (admin API up, instance registered) may take.
const STARTUP: Duration = Duration::from_secs(20);
/// How long a graceful shutdown with `drain_delay = "100ms"` may take.
const SHUTDOWN: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(25);

const EXIT_CONFIG: i32 = 64;
const EXIT_INTERRUPTED: i32 = 130;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn invalid_dir() -> PathBuf {
    root().join("tests/fixtures/invalid")
}

/// The `*.toml` files directly in `dir`, sorted.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// What a fixture's leading comment block promises.
struct Expectations {
    substrings: Vec<String>,
    count: Option<usize>,
}

fn expectations(path: &Path, text: &str) -> Expectations {
    let mut substrings = Vec::new();
    let mut count = None;
    for line in text.lines() {
        let Some(comment) = line.trim().strip_prefix('#') else {
            break; // the header ends at the first line that is not a comment
        };
        let comment = comment.trim();
        if let Some(want) = comment.strip_prefix("expect:") {
            let want = want.trim();
            assert!(!want.is_empty(), "{}: empty `# expect:`", path.display());
            substrings.push(want.to_owned());
        } else if let Some(n) = comment.strip_prefix("expect-count:") {
            assert!(count.is_none(), "{}: two `# expect-count:`", path.display());
            count =
                Some(n.trim().parse().unwrap_or_else(|e| {
                    panic!("{}: bad `# expect-count: {n}`: {e}", path.display())
                }));
        }
    }
    assert!(
        !substrings.is_empty(),
        "{}: no `# expect:` line at the top of the file",
        path.display()
    );
    Expectations { substrings, count }
}

#[test]
fn every_invalid_fixture_is_rejected_with_the_expected_problems() {
    let files = toml_files(&invalid_dir());
    assert!(
        files.len() >= 15,
        "only {} fixtures found in {}",
        files.len(),
        invalid_dir().display()
    );
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(path).expect("fixture is readable");
        let expected = expectations(path, &text);
        let error = match Config::load(path) {
            Ok(_) => {
                failures.push(format!("{name}: loaded without an error"));
                continue;
            }
            Err(error) => error,
        };
        let message = error.to_string();
        for want in &expected.substrings {
            if !message.contains(want.as_str()) {
                failures.push(format!("{name}: missing {want:?} in:\n{message}"));
            }
        }
        if let Some(count) = expected.count {
            let found = error.problems().len();
            if found != count {
                failures.push(format!(
                    "{name}: expected {count} problem(s), found {found}:\n{message}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[test]
fn from_toml_reports_the_same_problems_as_load() {
    let path = invalid_dir().join("many-mistakes.toml");
    let text = fs::read_to_string(&path).expect("fixture is readable");
    let loaded = Config::load(&path).expect_err("invalid");
    let parsed = Config::from_toml(&text).expect_err("invalid");
    assert_eq!(loaded.problems(), parsed.problems());
    assert!(loaded.problems().len() > 1);
}

/// Every configuration this repository ships, as (where, text):
/// `agent.toml`, `examples/*.toml`, every `*.toml` under `deploy/`, and the
/// `agent.toml` of every ConfigMap in `deploy/kubernetes/*.yaml`.
fn shipped_configs() -> Vec<(String, String)> {
    let read = |path: &Path| fs::read_to_string(path).expect("readable");
    let name = |path: &Path| {
        path.strip_prefix(root())
            .unwrap_or(path)
            .display()
            .to_string()
    };
    let mut files = vec![root().join("agent.toml")];
    files.extend(toml_files(&root().join("examples")));
    let mut dirs = vec![root().join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("deploy/ lists") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            }
        }
        files.extend(toml_files(&dir));
    }
    let mut configs: Vec<(String, String)> = files.iter().map(|p| (name(p), read(p))).collect();
    for yaml in fs::read_dir(root().join("deploy/kubernetes")).expect("deploy/kubernetes") {
        let path = yaml.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = read(&path);
            for (i, block) in config_map_agent_tomls(&text).into_iter().enumerate() {
                configs.push((format!("{}: ConfigMap agent.toml #{i}", name(&path)), block));
            }
        }
    }
    configs
}

/// The `agent.toml: |` block scalars of a YAML file, dedented.
fn config_map_agent_tomls(yaml: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(key_indent) = line.find("agent.toml: |") else {
            continue;
        };
        let mut block = Vec::new();
        while let Some(next) = lines.peek() {
            let indent = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && indent <= key_indent {
                break;
            }
            block.push(*next);
            lines.next();
        }
        let indent = block
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        let text: Vec<&str> = block
            .iter()
            .map(|l| l.get(indent..).unwrap_or(""))
            .collect();
        blocks.push(text.join("\n") + "\n");
    }
    blocks
}

/// What an operator fills in before a shipped config runs: the Kubernetes
/// template's placeholders, and the admin token file, which here is
/// `token` (the real one lives in a mounted secret). Returns the text and
/// whether it named a token file.
fn as_deployed(text: &str, token: &Path) -> (String, bool) {
    let mut named = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("admin_token_file") {
                named = true;
                format!("admin_token_file = {:?}", token.display().to_string())
            } else {
                line.replace("@POD_IP@", "10.0.0.5")
                    .replace("@POD_NAME@", "battle-7d9f-x2")
                    .replace("@NODE_NAME@", "node-1")
            }
        })
        .collect();
    (lines.join("\n") + "\n", named)
}

#[test]
fn squire_check_accepts_every_shipped_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("admin.token");
    fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("token");
    fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let configs = shipped_configs();
    let mut with_token = 0;
    for (i, (name, text)) in configs.iter().enumerate() {
        let (text, named) = as_deployed(text, &token);
        with_token += usize::from(named);
        let path = dir.path().join(format!("shipped-{i}.toml"));
        fs::write(&path, &text).expect("write");
        if let Err(e) = Config::load(&path) {
            panic!("{name}: {e}");
        }
        let (status, stderr) = squire_once(&["check", "-c", &path.display().to_string()]);
        assert_eq!(status.code(), Some(0), "squire check {name}:\n{stderr}");
    }
    // agent.toml, 4 examples, container + 2 compose, the Kubernetes one.
    assert!(
        configs.len() >= 8,
        "shipped configs not all found: {:?}",
        configs.iter().map(|c| &c.0).collect::<Vec<_>>()
    );
    assert!(
        configs.iter().any(|(name, _)| name.contains("ConfigMap")),
        "the Kubernetes ConfigMap's agent.toml was not found"
    );
    // Each one that binds the admin API beyond loopback names a token file.
    assert!(with_token >= 4, "{with_token} configs name a token file");
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

fn squire() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_squire"));
    command.current_dir(root()).env("RUST_LOG", "info");
    command
}

/// A child that is killed if the test ends (or panics) while it runs.
struct Running {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
    fn spawn(mut command: Command, logs: &Path) -> Running {
        let stdout = logs.join("stdout.log");
        let stderr = logs.join("stderr.log");
        let child = command
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("squire starts");
        Running {
            child,
            stdout,
            stderr,
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the exit, at most `limit`; panics with the output if it does not come.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!("squire did not exit within {limit:?}\n{}", self.output());
            }
            #[allow(clippy::disallowed_methods)] // a plain thread polling a child, no runtime
            sleep(POLL);
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn output(&self) -> String {
        let stdout = fs::read_to_string(&self.stdout).unwrap_or_default();
        format!("--- stdout\n{stdout}--- stderr\n{}", self.stderr())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `squire ARGS` to completion (bounded by [`QUICK`]): status and stderr.
fn squire_once(args: &[&str]) -> (ExitStatus, String) {
    let logs = tempfile::tempdir().expect("tempdir");
    let mut command = squire();
    command.args(args);
    let mut running = Running::spawn(command, logs.path());
    let status = running.wait(QUICK);
    (status, running.stderr())
}

fn fixture(name: &str) -> String {
    invalid_dir().join(name).display().to_string()
}

#[test]
fn check_accepts_the_shipped_agent_toml() {
    let (status, stderr) = squire_once(&["check", "-c", "agent.toml"]);
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
}

#[test]
fn check_rejects_an_invalid_file_and_names_the_field() {
    let (status, stderr) = squire_once(&["check", "-c", &fixture("upstream-missing-listen.toml")]);
    assert_eq!(status.code(), Some(EXIT_CONFIG), "stderr:\n{stderr}");
    assert!(
        stderr.contains("upstream.gate.listen: required"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("upstream-missing-listen.toml"),
        "the file is not named; stderr:\n{stderr}"
    );
}

#[test]
fn check_reports_every_problem_of_a_file() {
    let (status, stderr) = squire_once(&["check", "-c", &fixture("many-mistakes.toml")]);
    assert_eq!(status.code(), Some(EXIT_CONFIG), "stderr:\n{stderr}");
    assert!(stderr.contains("19 problem(s)"), "stderr:\n{stderr}");
    for field in [
        "colour",
        "agent.admin",
        "registry.ttl",
        "upstream.lobby.listen",
    ] {
        assert!(stderr.contains(field), "{field} missing; stderr:\n{stderr}");
    }
}

#[test]
fn check_rejects_a_syntax_error() {
    let (status, stderr) = squire_once(&["check", "-c", &fixture("toml-syntax-error.toml")]);
    assert_eq!(status.code(), Some(EXIT_CONFIG), "stderr:\n{stderr}");
    assert!(stderr.contains("not valid TOML"), "stderr:\n{stderr}");
}

#[test]
fn run_refuses_an_invalid_file() {
    let (status, stderr) = squire_once(&["run", "-c", &fixture("upstream-missing-listen.toml")]);
    assert_eq!(status.code(), Some(EXIT_CONFIG), "stderr:\n{stderr}");
    assert!(
        stderr.contains("upstream.gate.listen: required"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn check_of_a_missing_file_says_it_cannot_read_it() {
    let missing = "/nonexistent/squire/agent.toml";
    let (status, stderr) = squire_once(&["check", "-c", missing]);
    assert_eq!(status.code(), Some(EXIT_CONFIG), "stderr:\n{stderr}");
    assert!(stderr.contains("cannot read"), "stderr:\n{stderr}");
    assert!(stderr.contains(missing), "stderr:\n{stderr}");
    assert!(stderr.contains("No such file"), "stderr:\n{stderr}");
}

// ---------------------------------------------------------------------------
// Graceful shutdown of the real binary
// ---------------------------------------------------------------------------

/// `GET path` over HTTP/1.1: the status code and body, or `None` if the
/// server is not answering (yet).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, body.to_owned()))
}

/// A squire running from a generated config with the local registry.
struct Agent {
    running: Running,
    admin: SocketAddr,
    instance_file: PathBuf,
    // Last: the directories outlive the process (fields drop in order).
    _dir: tempfile::TempDir,
}

const SERVICE: &str = "battle";
const ID: &str = "battle-test-1";

impl Agent {
    fn start(drain_delay: &str) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = dir.path().join("registry");
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        // Fixed ports: the binary cannot report a `:0` port.
        let service = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = AgentToml::new(Section::local(&registry).set("ttl", "2s"))
            .agent("node", "test-node")
            .agent("admin", admin.to_string())
            .agent("drain_delay", drain_delay)
            .service(Section::service(SERVICE, service).set("id", ID))
            .upstream(Section::upstream("gate").set("listen", listen.to_string()))
            .to_string();
        let path = dir.path().join("agent.toml");
        fs::write(&path, config).expect("write config");
        Config::load(&path).expect("the generated config is valid");

        let mut command = squire();
        command.arg("run").arg("-c").arg(&path);
        let running = Running::spawn(command, dir.path());
        Agent {
            running,
            admin,
            instance_file: registry.join(SERVICE).join(format!("{ID}.json")),
            _dir: dir,
        }
    }

    /// Polls until `done` holds; panics with the agent's output at the deadline
    /// or if the agent exits meanwhile.
    fn wait_until(&mut self, what: &str, limit: Duration, mut done: impl FnMut(&Agent) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return;
            }
            if let Some(status) = self.running.exited() {
                panic!(
                    "squire exited ({status}) while waiting for {what}\n{}",
                    self.running.output()
                );
            }
            if Instant::now() >= deadline {
                panic!("{what}: not within {limit:?}\n{}", self.running.output());
            }
            #[allow(clippy::disallowed_methods)] // a plain thread polling a child, no runtime
            sleep(POLL);
        }
    }

    fn ready(&self) -> Option<(u16, String)> {
        http_get(self.admin, "/ready")
    }

    fn wait_ready_and_registered(&mut self) {
        self.wait_until("GET /ready = 200", STARTUP, |a| {
            a.ready().is_some_and(|(status, _)| status == 200)
        });
        self.wait_until("the instance file", STARTUP, |a| a.instance_file.exists());
    }
}

#[test]
fn sigterm_deregisters_and_exits_zero() {
    let mut agent = Agent::start("100ms");
    agent.wait_ready_and_registered();

    agent.running.signal("TERM");
    let status = agent.running.wait(SHUTDOWN);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}\n{}",
        agent.running.output()
    );
    assert!(
        !agent.instance_file.exists(),
        "{} is still there after shutdown\n{}",
        agent.instance_file.display(),
        agent.running.output()
    );
}

#[test]
fn second_signal_during_the_drain_exits_at_once_with_130() {
    // A drain far longer than any deadline below: only the second signal can
    // end the process in time.
    let mut agent = Agent::start("30s");
    agent.wait_ready_and_registered();

    agent.running.signal("INT");
    // Draining: /ready says so and the instance is already deregistered. Only
    // then is the first signal surely consumed, so the next one is a second.
    agent.wait_until("GET /ready = 503 draining", STARTUP, |a| {
        a.ready()
            .is_some_and(|(status, body)| status == 503 && body.contains("draining"))
    });
    agent.wait_until("deregistration", STARTUP, |a| !a.instance_file.exists());

    agent.running.signal("INT");
    let status = agent.running.wait(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(EXIT_INTERRUPTED),
        "exit status {status}\n{}",
        agent.running.output()
    );
}

/// The annotated reference in the README is a file a user may copy: it must
/// load as it stands.
#[test]
fn the_readme_configuration_reference_is_valid() {
    let readme = fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("## Configuration reference")
        .nth(1)
        .expect("a Configuration reference section");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a toml block in it");
    assert!(
        block.contains("[[upstream]]") && block.contains("[[service.check]]"),
        "the whole reference"
    );
    if let Err(e) = Config::from_toml(block) {
        panic!("README reference: {e}");
    }
}

/// The example under "Several registries" in the README loads too.
#[test]
fn the_readme_multi_registry_example_is_valid() {
    let readme = fs::read_to_string(root().join("README.md")).expect("README.md");
    let block = readme
        .split("## Several registries")
        .nth(1)
        .and_then(|section| section.split("```toml\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("a toml block under Several registries");
    let config = Config::from_toml(block).unwrap_or_else(|e| panic!("README example: {e}"));
    let names: Vec<&str> = config.registries.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["primary", "backup"]);
}

#[test]
fn squire_init_writes_a_config_squire_check_accepts_for_every_kind() {
    let dir = tempfile::tempdir().expect("dir");
    let squire = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_squire"))
            .args(args)
            .output()
            .expect("run squire")
    };
    for kind in squire::init::kinds() {
        let path = dir.path().join(format!("{kind}.toml"));
        let path = path.to_str().expect("utf-8 path");
        let init = squire(&[
            "init",
            "--registry",
            kind,
            "--service",
            "battle",
            "--port",
            "7000",
            "--upstream",
            "gate=127.0.0.1:7001",
            "--upstream",
            "web=127.0.0.1:7002:http",
            "-o",
            path,
        ]);
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let check = squire(&["check", "-c", path]);
        assert!(
            check.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let again = squire(&["init", "--registry", kind, "-o", path]);
        assert!(!again.status.success(), "an existing file is kept");
        assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
        assert!(std::fs::read_to_string(path)
            .expect("read")
            .contains("\n[service]"));
        let forced = squire(&["init", "--registry", kind, "-o", path, "--force"]);
        assert!(forced.status.success());
        assert!(!std::fs::read_to_string(path)
            .expect("read")
            .contains("\n[service]"));
    }
    let stdout = squire(&["init"]);
    assert!(String::from_utf8_lossy(&stdout.stdout).contains("kind = \"local\""));
    let unknown = squire(&["init", "--registry", "mdns"]);
    assert_eq!(unknown.status.code(), Some(64));
}
