//! The deployment files as far as they can be checked without a cluster
//! or a Docker daemon: `deploy/kubernetes/*.yaml` parse; the sidecar's
//! `agent.toml` (placeholders filled in) is a valid configuration; the
//! game container's preStop hook is a `squire drain --wait` command line
//! that drains a real agent and returns once its reported players reach 0;
//! the grace period covers the drain with its player wait, the game's
//! shutdown and squire's own; the PodMonitor finds squire's admin port;
//! the Dockerfile's HEALTHCHECK is a `squire health` command line that
//! says 0 for a ready agent and 1 otherwise; and the image build copies
//! every file Cargo.toml needs.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;
use support::config::{AgentToml, Section};
use support::{eventually, free_port, Backend, TestAgent, DEADLINE};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every document of a YAML file.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo(path)).expect(path);
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect();
    assert!(!docs.is_empty(), "{path} has no document");
    docs
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list:?}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .expect("a list")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// The value after `flag` in a command line.
fn flag<'a>(command: &'a [String], flag: &str) -> &'a str {
    let at = command
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {command:?}"));
    &command[at + 1]
}

/// The game's own shutdown the manifest's grace period budgets (its
/// header, step 2).
const GAME_SHUTDOWN: Duration = Duration::from_secs(20);

/// The sidecar's agent.toml as the init container renders it for a pod,
/// its token file replaced by `token`.
fn rendered_config(docs: &[Value], token: &Path) -> String {
    let template = kind(docs, "ConfigMap")["data"]["agent.toml"]
        .as_str()
        .expect("agent.toml in the ConfigMap");
    template
        .replace("@POD_IP@", "10.1.2.3")
        .replace("@POD_NAME@", "battle-7d9f-abcde")
        .replace("@NODE_NAME@", "node-a")
        .replace(
            "/etc/squire-secret/admin-token",
            token.to_str().expect("utf-8"),
        )
}

#[test]
fn the_kubernetes_files_parse_and_fit_together() {
    let dir = tempfile::tempdir().expect("dir");
    let token = dir.path().join("admin-token");
    support::certs::write_private(&token, "0123456789abcdef0123456789abcdef");
    let docs = documents("deploy/kubernetes/sidecar.yaml");
    let config = squire::Config::from_toml(&rendered_config(&docs, &token))
        .unwrap_or_else(|e| panic!("the sidecar's agent.toml: {e}"));

    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let game = named(&pod["containers"], "battle");
    let squire = named(&pod["initContainers"], "squire");
    let init = named(&pod["initContainers"], "squire-config");
    assert_eq!(squire["restartPolicy"], "Always", "a native sidecar");

    // The preStop hook: squire drain, with a binary and a token the game
    // container has.
    let pre_stop = strings(&game["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(pre_stop[1], "drain", "{pre_stop:?}");
    let binary = Path::new(&pre_stop[0]);
    let mounted = |container: &Value, dir: &Path| {
        container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"].as_str().map(Path::new) == Some(dir))
            .and_then(|m| m["name"].as_str().map(str::to_owned))
    };
    let bin_volume = mounted(game, binary.parent().expect("a directory"))
        .expect("the preStop binary's directory is mounted in the game container");
    let init_script = strings(&init["args"]).join("\n");
    let copied_to = init_script
        .split_whitespace()
        .skip_while(|w| *w != "/usr/local/bin/squire")
        .nth(1)
        .expect("the init container copies the squire binary");
    assert_eq!(Path::new(copied_to), binary);
    assert_eq!(
        mounted(init, binary.parent().expect("dir")).as_deref(),
        Some(bin_volume.as_str()),
        "the init container writes the binary into the volume the game reads"
    );
    assert!(pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .any(|v| v["name"] == bin_volume.as_str() && v["emptyDir"].is_mapping()));
    let token_file = Path::new(flag(&pre_stop, "--token-file"));
    assert_eq!(
        mounted(game, token_file.parent().expect("dir")).as_deref(),
        Some("squire-admin-token")
    );
    let admin: std::net::SocketAddr = flag(&pre_stop, "--admin").parse().expect("an address");
    assert!(admin.ip().is_loopback(), "the pod's shared loopback");
    assert_eq!(admin.port(), config.agent.admin.port());

    // The grace period covers every step of the shutdown.
    let parse = |d: &str| humantime::parse_duration(d).expect("a duration");
    // --wait (for the players to leave) takes no value: --deadline bounds it.
    assert!(pre_stop.iter().any(|a| a == "--wait"), "{pre_stop:?}");
    assert!(
        flag(&pre_stop, "--wait").starts_with("--"),
        "--wait with a value is the old spelling of --settle: {pre_stop:?}"
    );
    let drain = parse(flag(&pre_stop, "--timeout"))
        + parse(flag(&pre_stop, "--settle"))
        + parse(flag(&pre_stop, "--deadline"));
    let squire_stop =
        config.agent.drain_delay + config.agent.drain_timeout + config.agent.drain_spread;
    let needed = drain + GAME_SHUTDOWN + squire_stop;
    let grace = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    assert!(
        grace >= needed,
        "terminationGracePeriodSeconds {grace:?} < drain {drain:?} + game {GAME_SHUTDOWN:?} + squire {squire_stop:?}"
    );

    // The PodMonitor scrapes squire's admin port on these pods.
    let monitors = documents("deploy/kubernetes/podmonitor.yaml");
    let monitor = kind(&monitors, "PodMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels")
    {
        assert_eq!(&pod_labels[key.as_str().expect("key")], value, "{key:?}");
    }
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let port = named(
        &squire["ports"],
        endpoint["port"].as_str().expect("a port name"),
    );
    assert_eq!(
        port["containerPort"].as_u64(),
        Some(u64::from(config.agent.admin.port()))
    );
}

/// `squire load players/capacity` on `agent` with the token in `token`,
/// as the game reports its load.
async fn report_load(agent: &TestAgent, token: &Path, players: u32, capacity: u32) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .arg("load")
        .arg(format!("{players}/{capacity}"))
        .args(["--admin", &agent.admin.to_string()])
        .arg("--token-file")
        .arg(token)
        .output()
        .await
        .expect("run squire load");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn the_pre_stop_hook_drains_a_real_agent_and_waits_for_the_players() {
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("battle").await;
    let battle = TestAgent::start(
        &AgentToml::local(dir.path()).service(Section::game_service("battle", backend.addr)),
    )
    .await;
    let token = dir.path().join("admin-token");
    support::certs::write_private(&token, battle.token.expose());
    report_load(&battle, &token, 3, 100).await;
    let docs = documents("deploy/kubernetes/sidecar.yaml");
    let pod = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    let mut command =
        strings(&named(&pod["containers"], "battle")["lifecycle"]["preStop"]["exec"]["command"]);
    // The same command line, aimed at this agent and its token, with the
    // waits shortened.
    for arg in command.iter_mut().skip(1) {
        if arg.starts_with("127.0.0.1:") {
            *arg = battle.admin.to_string();
        } else if arg.starts_with("/etc/squire-secret/") {
            *arg = token.display().to_string();
        }
    }
    let settle = command
        .iter()
        .position(|a| a == "--settle")
        .expect("--settle");
    command[settle + 1] = "100ms".into();
    let deadline = command
        .iter()
        .position(|a| a == "--deadline")
        .expect("--deadline");
    command[deadline + 1] = format!("{}s", DEADLINE.as_secs());
    let mut hook = tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
        .args(&command[1..])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run squire");
    eventually("draining announced", DEADLINE, || async {
        battle.json("/v1/self").await["status"] == "draining"
    })
    .await;
    // Three players on: the hook waits for them (its first progress line
    // says so) rather than returning.
    let mut stderr = tokio::io::BufReader::new(hook.stderr.take().expect("stderr"));
    let mut line = String::new();
    tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncBufReadExt::read_line(&mut stderr, &mut line),
    )
    .await
    .expect("a progress line within the deadline")
    .expect("read");
    assert!(line.contains("waiting: 3/100 players"), "{line}");
    assert!(hook.try_wait().expect("status").is_none(), "still waiting");
    report_load(&battle, &token, 0, 100).await;
    let out = tokio::time::timeout(DEADLINE, hook.wait_with_output())
        .await
        .expect("the hook returns once the players are gone")
        .expect("run squire");
    assert!(out.status.success(), "{command:?}: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("players reached 0"),
        "{out:?}"
    );
    battle.stop().await;
}

/// The `HEALTHCHECK` command of the Dockerfile, exec form.
fn healthcheck() -> Vec<String> {
    let text = std::fs::read_to_string(repo("deploy/container/Dockerfile")).expect("Dockerfile");
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .expect("a HEALTHCHECK");
    let cmd = line.split_once(" CMD ").expect("HEALTHCHECK ... CMD").1;
    serde_json::from_str(cmd.trim()).expect("the exec form (a JSON array)")
}

#[tokio::test]
async fn the_dockerfile_healthcheck_says_0_when_ready_and_1_when_not() {
    let command = healthcheck();
    assert_eq!(command[..2], ["squire", "health"], "{command:?}");
    let dir = tempfile::tempdir().expect("dir");
    let backend = Backend::start("game").await;
    let agent = TestAgent::start(
        &AgentToml::local(dir.path()).service(Section::service("game", backend.addr)),
    )
    .await;
    eventually("ready", DEADLINE, || async {
        agent.get("/ready").await.0 == 200
    })
    .await;
    // The image's config file, here one naming this agent's admin address.
    let run = |admin: String| {
        let config = dir
            .path()
            .join(format!("agent-{}.toml", admin.replace(':', "-")));
        std::fs::write(
            &config,
            AgentToml::local(dir.path())
                .agent("admin", admin)
                .to_string(),
        )
        .expect("config");
        let args: Vec<String> = command[1..]
            .iter()
            .map(|a| {
                if a == "/etc/squire/agent.toml" {
                    config.display().to_string()
                } else {
                    a.clone()
                }
            })
            .collect();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_squire"))
                .args(&args)
                .output()
                .await
                .expect("run squire")
        }
    };
    let ready = run(agent.admin.to_string()).await;
    assert_eq!(ready.status.code(), Some(0), "{ready:?}");
    let absent = run(format!("127.0.0.1:{}", free_port())).await;
    assert_eq!(absent.status.code(), Some(1), "{absent:?}");
    let mut agent = agent;
    agent.begin_stop();
    let admin = agent.admin.to_string();
    eventually("unhealthy while draining", DEADLINE, || async {
        run(admin.clone()).await.status.code() == Some(1)
    })
    .await;
}

#[test]
fn the_image_build_copies_every_file_the_manifest_needs() {
    let dockerfile =
        std::fs::read_to_string(repo("deploy/container/Dockerfile")).expect("Dockerfile");
    let ignore = std::fs::read_to_string(repo("deploy/container/Dockerfile.dockerignore"))
        .expect("dockerignore");
    let manifest: toml::Table = std::fs::read_to_string(repo("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("Cargo.toml parses");
    let mut needed = vec![
        "Cargo.toml".to_owned(),
        "Cargo.lock".to_owned(),
        "src".to_owned(),
    ];
    if repo("build.rs").exists() {
        needed.push("build.rs".into());
    }
    for bench in manifest["bench"].as_array().into_iter().flatten() {
        let name = bench["name"].as_str().expect("bench name");
        needed.push(
            bench
                .get("path")
                .and_then(|p| p.as_str())
                .map_or(format!("benches/{name}.rs"), str::to_owned),
        );
    }
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    assert!(needed.len() >= 4, "{needed:?}");
    for path in &needed {
        assert!(
            copied.contains(&path.as_str()),
            "the Dockerfile does not COPY {path} (copies {copied:?})"
        );
        assert!(
            ignore.lines().any(|l| l == format!("!{path}")),
            "Dockerfile.dockerignore leaves {path} out of the context"
        );
    }
}
