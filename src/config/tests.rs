//! Validation of whole files, across sections. `problems` and
//! `assert_problems` are shared with the section files' tests.

use std::time::Duration;

use super::*;
use crate::balance::{EjectionPolicy, HashKey, Strategy};

/// Every problem `text` has, as `path: reason` lines.
pub(super) fn problems(text: &str) -> Vec<String> {
    match Config::from_toml(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems().iter().map(ToString::to_string).collect(),
    }
}

/// `found` holds exactly one line starting with each of `expected`.
pub(super) fn assert_problems(found: &[String], expected: &[&str]) {
    for want in expected {
        assert!(
            found.iter().any(|p| p.starts_with(want)),
            "missing {want:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
}

#[test]
fn minimal_file_gets_defaults() {
    let config = Config::from_toml("").expect("empty file is valid");
    assert_eq!(config.agent.admin.to_string(), DEFAULT_ADMIN);
    assert_eq!(config.registries.len(), 1);
    assert_eq!(config.registries[0].name, "local");
    assert_eq!(config.registries[0].ttl, Duration::from_secs(10));
    assert!(matches!(
        config.registries[0].backend,
        RegistryBackend::Local { .. }
    ));
    assert_eq!(config.discovery.mode, DiscoveryMode::Failover);
    assert!(config.service.is_none());
    assert!(config.upstreams.is_empty());
}

#[test]
fn service_id_defaults_to_name_host_port() {
    let config =
        Config::from_toml("[service]\nname = \"logic\"\nhost = \"10.0.0.5\"\nport = 8001\n")
            .expect("valid");
    let service = config.service.expect("service section");
    assert_eq!(service.id, "logic-10.0.0.5-8001");
    assert_eq!(service.weight, 100);
}

#[test]
fn every_problem_is_reported_at_once() {
    let found = problems(
        r#"
        bogus = 1
        [agent]
        drain_delay = "soon"
        intreval = "5s"
        [registry]
        kind = "etcd"
        ttl = "1s"
        dir = "/tmp/x"
        [service]
        name = "a/b"
        port = 70000
        [[upstream]]
        service = "gate"
        listen = "nowhere"
        strategy = "fastest"
        retries = -1
        [[upstream]]
        listen = 5
        "#,
    );
    let expected = [
        "bogus: unknown key",
        "agent.intreval: unknown key",
        "agent.drain_delay: \"soon\" is not a duration",
        "registry.ttl: must be at least 2s",
        "registry.dir: only applies to kind = \"local\"",
        "service.name: \"a/b\" contains '/'",
        "service.host: required",
        "service.port: 70000 is not a port",
        "upstream.gate.listen: \"nowhere\" is not an address",
        "upstream.gate.strategy: unknown strategy \"fastest\"",
        "upstream.gate.retries: -1 is out of range",
        "upstream[1].listen: invalid type: integer `5`, expected a string",
    ];
    assert_problems(&found, &expected);
}

#[test]
fn balancing_keys_get_defaults_and_parse() {
    let config =
        Config::from_toml("[[upstream]]\nservice = \"gate\"\nlisten = \"127.0.0.1:7001\"\n")
            .expect("valid");
    let gate = &config.upstreams[0];
    assert_eq!(gate.strategy, Strategy::RoundRobin);
    assert_eq!(gate.panic_threshold, 0.0);
    assert_eq!(gate.ejection, EjectionPolicy::default());
    assert_eq!(gate.retry_backoff, Duration::from_millis(10));
    let config = Config::from_toml(
        r#"
        [[upstream]]
        service = "battle"
        listen = "127.0.0.1:7002"
        strategy = "consistent_hash"
        hash_key = "preamble"
        preamble_timeout = "500ms"
        preamble_max_bytes = 64
        panic_threshold = 1
        retry_backoff = "0s"
        ejection = { consecutive_failures = 0, base_time = "1s", max_time = "1s", max_share = 0.25 }
        "#,
    )
    .expect("valid");
    let battle = &config.upstreams[0];
    assert_eq!(battle.hash_key, HashKey::Preamble);
    assert_eq!(battle.preamble_timeout, Duration::from_millis(500));
    assert_eq!(battle.preamble_max_bytes, 64);
    assert_eq!(battle.panic_threshold, 1.0);
    assert!(!battle.ejection.enabled());
    assert_eq!(battle.ejection.max_share, 0.25);
}

#[test]
fn every_strategy_is_accepted() {
    for strategy in Strategy::ALL {
        let text = format!(
            "[[upstream]]\nservice = \"gate\"\nlisten = \"127.0.0.1:7001\"\nstrategy = \"{}\"\n",
            strategy.name()
        );
        let config = Config::from_toml(&text).expect("valid");
        assert_eq!(config.upstreams[0].strategy, strategy);
    }
}

#[test]
fn secrets_do_not_print() {
    let config = Config::from_toml(
        "[registry]\nkind = \"etcd\"\nusername = \"u\"\npassword = \"hunter2\"\n",
    )
    .expect("valid");
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[test]
fn a_single_registry_table_is_a_list_of_one_named_after_its_kind() {
    let config = Config::from_toml("[registry]\nkind = \"etcd\"\n").expect("valid");
    assert_eq!(config.registries.len(), 1);
    assert_eq!(config.registries[0].name, "etcd");
    let config = Config::from_toml("[registry]\nname = \"main\"\n").expect("valid");
    assert_eq!(config.registries[0].name, "main");
    assert_eq!(config.registries[0].backend.kind(), "local");
}

#[test]
fn several_registries_in_order_with_their_own_keys() {
    let config = Config::from_toml(
        r#"
        [discovery]
        mode = "merge"
        [[registry]]
        name = "primary"
        kind = "etcd"
        endpoints = ["http://10.0.0.1:2379"]
        ttl = "6s"
        [[registry]]
        name = "backup"
        kind = "consul"
        wait = "1m"
        "#,
    )
    .expect("valid");
    let names: Vec<_> = config.registries.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["primary", "backup"]);
    assert_eq!(config.registries[0].ttl, Duration::from_secs(6));
    assert_eq!(config.registries[1].ttl, Duration::from_secs(10));
    let RegistryBackend::Consul(consul) = &config.registries[1].backend else {
        panic!("consul expected");
    };
    assert_eq!(consul.wait, Duration::from_secs(60));
    assert_eq!(config.discovery.mode, DiscoveryMode::Merge);

    let config =
        Config::from_toml("[discovery]\nfailback = \"5s\"\n[[registry]]\nname = \"only\"\n")
            .expect("valid");
    assert_eq!(config.discovery.mode, DiscoveryMode::Failover);
    assert_eq!(config.discovery.failback, Duration::from_secs(5));
    assert_eq!(config.registries[0].name, "only");
}

#[test]
fn registry_list_problems_name_the_registry() {
    let found = problems(
        r#"
        [discovery]
        mode = "fastest"
        typo = 1
        [[registry]]
        name = "primary"
        kind = "etcd"
        ttl = "1s"
        [[registry]]
        kind = "consul"
        wait = "11m"
        dir = "/tmp/x"
        [[registry]]
        name = "primary"
        kind = "local"
        [[registry]]
        name = "back up"
        kind = "consul"
        [[registry]]
        name = "backup"
        kind = "consul"
        colour = "red"
        timeout = 5
        "#,
    );
    let expected = [
        "discovery.typo: unknown key",
        "discovery.mode: unknown mode \"fastest\"",
        "registry.primary.ttl: must be at least 2s",
        "registry[1].name: required",
        "registry[1].wait: must be between 1s and 10m",
        "registry[1].dir: only applies to kind = \"local\"",
        "registry[2].name: \"primary\" is already the name of registry[0]",
        "registry[3].name: \"back up\" contains ' '",
        "registry.backup.colour: unknown key",
        "registry.backup.timeout: invalid type: integer `5`, expected a string",
    ];
    assert_problems(&found, &expected);
}

#[test]
fn an_empty_registry_list_and_failback_with_merge_are_refused() {
    assert_eq!(
        problems("registry = []\n"),
        ["registry: must list at least one registry (or leave it out for the local one)"]
    );
    assert_eq!(
        problems("registry = 5\n"),
        ["registry: must be a table ([registry]) or an array of tables ([[registry]])"]
    );
    assert_eq!(
        problems("[discovery]\nmode = \"merge\"\nfailback = \"1s\"\n"),
        ["discovery.failback: only applies to mode = \"failover\" (merge reads every registry all the time)"]
    );
    assert_eq!(
        problems("[discovery]\nfailback = \"10ms\"\n"),
        ["discovery.failback: must be at least 100ms"]
    );
}

#[test]
fn consul_rules_apply_to_the_service_when_any_registry_is_consul() {
    let found = problems(
        r#"
        [[registry]]
        name = "primary"
        kind = "etcd"
        [[registry]]
        name = "backup"
        kind = "consul"
        [service]
        name = "a"
        host = "10.0.0.1"
        port = 1
        weight = 0
        "#,
    );
    assert_eq!(
        found,
        ["service.weight: 0 is out of range for Consul weights (1-65535)"]
    );
}

#[test]
fn prefix_is_normalized() {
    let config =
        Config::from_toml("[registry]\nkind = \"etcd\"\nprefix = \"/game/\"\n").expect("valid");
    let RegistryBackend::Etcd(etcd) = &config.registries[0].backend else {
        panic!("etcd backend expected");
    };
    assert_eq!(etcd.prefix, "/game");
}

#[test]
fn a_zookeeper_registry_gets_its_keys_and_defaults() {
    let config = Config::from_toml(
        "[registry]\nkind = \"zookeeper\"\nservers = [\"zk1:2181\", \"10.0.0.2:2181\"]\nroot = \"/game/\"\nusername = \"squire\"\npassword = \"pw\"\nttl = \"6s\"\n",
    )
    .expect("valid");
    let registry = &config.registries[0];
    assert_eq!(registry.name, "zookeeper");
    assert_eq!(registry.ttl, Duration::from_secs(6));
    let RegistryBackend::ZooKeeper(zk) = &registry.backend else {
        panic!("zookeeper backend expected");
    };
    assert_eq!(zk.servers, ["zk1:2181", "10.0.0.2:2181"]);
    assert_eq!(zk.root, "/game");
    let (user, password) = zk.credentials.as_ref().expect("credentials");
    assert_eq!((user.as_str(), password.expose()), ("squire", "pw"));

    let defaults = Config::from_toml("[registry]\nkind = \"zookeeper\"\n").expect("valid");
    let RegistryBackend::ZooKeeper(zk) = &defaults.registries[0].backend else {
        panic!("zookeeper backend expected");
    };
    assert_eq!(zk.servers, ["127.0.0.1:2181"]);
    assert_eq!(zk.root, "/services");
    assert_eq!(zk.credentials, None);
}

#[test]
fn zookeeper_keys_elsewhere_and_other_keys_on_zookeeper_are_named() {
    assert_problems(
        &problems("[registry]\nkind = \"etcd\"\nservers = [\"a:1\"]\nroot = \"/x\"\n"),
        &[
            "registry.servers: only applies to kind = \"zookeeper\"",
            "registry.root: only applies to kind = \"zookeeper\"",
        ],
    );
    assert_problems(
        &problems(
            "[registry]\nkind = \"zookeeper\"\nendpoints = [\"a:1\"]\ntoken = \"t\"\ndir = \"/tmp\"\nservers = []\nroot = \"/\"\n",
        ),
        &[
            "registry.dir: only applies to kind = \"local\"",
            "registry.endpoints: only applies to kind = \"etcd\"",
            "registry.token: only applies to kind = \"consul\"",
            "registry.servers: must list at least one server",
            "registry.root: must name a node below '/'",
        ],
    );
    assert_problems(
        &problems(
            "[[registry]]\nname = \"zk\"\nkind = \"zookeeper\"\nservers = [\"zk1\"]\n[[registry]]\nname = \"e\"\nkind = \"etcd\"\n",
        ),
        &["registry.zk.servers[0]: \"zk1\" is not host:port"],
    );
}

#[test]
fn drain_spread_defaults_to_a_tenth_of_drain_timeout_and_at_least_a_second() {
    let spread = |agent: &str| {
        Config::from_toml(&format!("[agent]\n{agent}"))
            .expect("valid")
            .agent
            .drain_spread
    };
    assert_eq!(spread(""), Duration::from_secs(3));
    assert_eq!(spread("drain_timeout = \"2s\""), Duration::from_secs(1));
    assert_eq!(spread("drain_timeout = \"2m\""), Duration::from_secs(12));
    assert_eq!(spread("drain_spread = \"0s\""), Duration::ZERO);
    assert_problems(
        &problems("[agent]\ndrain_spread = \"later\""),
        &["agent.drain_spread: \"later\" is not a duration"],
    );
}

#[test]
fn connection_limits_apply_to_tcp_and_http_listeners() {
    let config = Config::from_toml(
        r#"
        [[upstream]]
        service = "battle"
        listen = "127.0.0.1:7001"
        max_connections = 500
        idle_timeout = "5m"
        tcp_keepalive = "15s"
        [[upstream]]
        service = "chat"
        listen = "127.0.0.1:7002"
        tcp_keepalive = "0s"
        [[upstream]]
        service = "lobby"
        listen = "127.0.0.1:7003"
        protocol = "http"
        "#,
    )
    .expect("valid");
    let [battle, chat, lobby] = &config.upstreams[..] else {
        panic!("three upstreams");
    };
    assert_eq!(battle.max_connections, 500);
    assert_eq!(battle.idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(battle.tcp_keepalive, Some(Duration::from_secs(15)));
    // tcp: no idle timeout unless asked; keep-alive on by default, "0s" off.
    assert_eq!(chat.idle_timeout, None);
    assert_eq!(chat.tcp_keepalive, None);
    assert_eq!(chat.max_connections, 10_000);
    assert_eq!(lobby.idle_timeout, Some(Duration::from_secs(60)));
    assert_eq!(lobby.tcp_keepalive, Some(Duration::from_secs(30)));

    assert_problems(
        &problems(
            r#"
            [[upstream]]
            service = "battle"
            listen = "127.0.0.1:7001"
            max_connections = 0
            idle_timeout = "0s"
            tcp_keepalive = "500ms"
            "#,
        ),
        &[
            "upstream.battle.max_connections: 0 is out of range",
            "upstream.battle.idle_timeout: must be greater than zero",
            "upstream.battle.tcp_keepalive: must be at least 1s",
        ],
    );
}

#[test]
fn a_syntax_error_names_the_place_but_never_echoes_the_line() {
    let text = "[registry]\nkind = \"etcd\"\nusername = \"game\"\npassword = \"hunter2\n";
    let error = Config::from_toml(text).expect_err("not TOML").to_string();
    assert!(error.contains("line 4, column 20"), "{error}");
    assert!(!error.contains("hunter2"), "the secret leaked: {error}");
}

#[test]
fn an_absurd_duration_is_a_problem_not_a_panic_later() {
    let text = "[agent]\ndrain_timeout = \"100000000000000h\"\n[registry]\nkind = \"local\"\nttl = \"99999d\"\n";
    let error = Config::from_toml(text).expect_err("absurd").to_string();
    assert!(
        error.contains("agent.drain_timeout: \"100000000000000h\" is too long: at most 30days"),
        "{error}"
    );
    assert!(error.contains("registry.ttl"), "{error}");
}

#[test]
fn the_backlog_defaults_from_the_agent_and_is_bounded() {
    let text = "[agent]\nbacklog = 1024\n[[upstream]]\nservice = \"a\"\nlisten = \"127.0.0.1:0\"\n[[upstream]]\nservice = \"b\"\nlisten = \"127.0.0.1:1\"\nbacklog = 64\n";
    let config = Config::from_toml(text).expect("valid");
    assert_eq!(config.agent.backlog, 1024);
    assert_eq!(config.upstreams[0].backlog, 1024);
    assert_eq!(config.upstreams[1].backlog, 64);
    let text = "[agent]\nbacklog = 0\n[[upstream]]\nservice = \"a\"\nlisten = \"127.0.0.1:0\"\nbacklog = 70000\n";
    let error = Config::from_toml(text)
        .expect_err("out of range")
        .to_string();
    assert!(
        error.contains("agent.backlog: 0 is out of range (1-65535)"),
        "{error}"
    );
    assert!(
        error.contains("upstream.a.backlog: 70000 is out of range"),
        "{error}"
    );
}

/// Every kind of broken line that holds a secret: the error says where
/// and why, never what the line holds.
#[test]
fn syntax_errors_never_show_a_value() {
    let broken = [
        "password = \"hunter2\n",
        "password = hunter2\n",
        "password = \"hunter2\" \"x\"\n",
        "password = 'hunter2\n",
        "password = \"hun\\qter2\"\n",
        "password = \"hunter2\"x\n",
        "password = 1hunter2\n",
        "password = \"\"\"hunter2\n",
        "password = [\"hunter2\"\n",
        "password = { a = \"hunter2\" \n",
        "password = \"hunter2\"\npassword = \"hunter2\"\n",
        "password = 2024-01-0hunter2\n",
        "password = \"\\u00zzhunter2\"\n",
        "token = \"hunter2\n",
        "hunter2\n",
    ];
    for line in broken {
        let text = format!("[registry]\nkind = \"etcd\"\nusername = \"u\"\n{line}");
        let error = Config::from_toml(&text).expect_err("not TOML").to_string();
        assert!(error.starts_with("not valid TOML: line "), "{error}");
        assert!(!error.contains("hunter2"), "{line:?} -> {error}");
    }
}

/// Secrets in the wrong type or the wrong place: the problem names the
/// field, never the value.
#[test]
fn validation_errors_never_show_a_secret() {
    let cases = [
        // A number where the password goes: serde would quote it.
        ("[registry]\nkind = \"etcd\"\nusername = \"u\"\npassword = 4242424242\n", "4242424242", "registry.password: expected a string, found an integer"),
        ("[registry]\nkind = \"consul\"\ntoken = [\"hunter2\"]\n", "hunter2", "registry.token: expected a string, found an array"),
        ("[registry]\nkind = \"consul\"\ntoken = \"hunter2 with spaces\"\n", "hunter2", "registry.token: must be printable ASCII"),
        ("[registry]\nkind = \"consul\"\naddress = \"http://u:hunter2@127.0.0.1:8500\"\n", "hunter2", "registry.address: must not hold credentials"),
        ("[registry]\nkind = \"consul\"\naddress = \"http://u:hun ter2@127.0.0.1:8500\"\n", "hun ter2", "registry.address: must not hold credentials"),
        ("[registry]\nkind = \"etcd\"\nendpoints = [\"http://u:hunter2@127.0.0.1:2379\"]\n", "hunter2", "registry.endpoints[0]: must not hold credentials"),
        ("[registry]\nkind = \"etcd\"\nendpoints = [\"u:hunter2@127.0.0.1:2379\"]\n", "hunter2", "registry.endpoints[0]: must not hold credentials"),
        ("[registry]\nkind = \"etcd\"\npassword = \"hunter2\"\n", "hunter2", "registry.username: required when password is set"),
        ("[registry]\nkind = \"local\"\npassword = \"hunter2\"\n", "hunter2", "registry.password: only applies to kind = \"etcd\" or \"zookeeper\""),
        ("[registry]\nkind = \"zookeeper\"\nservers = [\"u:hunter2@127.0.0.1:2181\"]\n", "hunter2", "registry.servers[0]: must not hold credentials"),
        ("[registry]\nkind = \"zookeeper\"\nusername = \"a:b\"\npassword = \"hunter2\"\n", "hunter2", "registry.username: must be non-empty and without ':'"),
        ("[service]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 1\n[[service.check]]\nkind = \"http\"\naddress = \"127.0.0.1:1\"\nheaders = { Authorization = \"Bearer hunter2\\n\" }\n", "hunter2", "service.check"),
        ("[service]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 1\n[[service.check]]\nkind = \"http\"\naddress = \"127.0.0.1:1\"\nheaders = { Authorization = 4242424242 }\n", "4242424242", "service.check"),
    ];
    for (text, secret, want) in cases {
        let error = Config::from_toml(text).expect_err("invalid").to_string();
        assert!(error.contains(want), "{text:?}: want {want:?} in {error}");
        assert!(!error.contains(secret), "{text:?} -> {error}");
    }
}

#[test]
fn health_check_header_values_do_not_print() {
    let config = Config::from_toml(
        "[service]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 1\n[[service.check]]\nkind = \"http\"\naddress = \"127.0.0.1:1\"\nheaders = { Authorization = \"Bearer hunter2\" }\n",
    )
    .expect("valid");
    let shown = format!("{config:?}");
    assert!(
        shown.contains("Authorization") && !shown.contains("hunter2"),
        "{shown}"
    );
}

#[test]
fn prefer_and_slow_start_get_defaults_and_parse() {
    let config =
        Config::from_toml("[[upstream]]\nservice = \"gate\"\nlisten = \"127.0.0.1:7001\"\n")
            .expect("valid");
    let gate = &config.upstreams[0];
    assert!(gate.prefer.is_empty());
    assert_eq!(gate.prefer.min_share, 0.5);
    assert!(!gate.slow_start.enabled());
    assert_eq!(gate.slow_start.min, 0.1);
    let config = Config::from_toml(
        r#"
        [service]
        name = "lobby"
        host = "10.0.0.5"
        port = 8001
        metadata = { zone = "b", rack = "r7" }

        [[upstream]]
        service = "battle"
        listen = "127.0.0.1:7002"
        prefer = { zone = "a" }
        prefer_min_share = 0.3
        slow_start = "30s"
        slow_start_min = 0.2

        [[upstream]]
        service = "chat"
        listen = "127.0.0.1:7003"
        prefer = ["zone", "rack"]
        "#,
    )
    .expect("valid");
    let battle = &config.upstreams[0];
    assert_eq!(
        battle.prefer.metadata,
        std::collections::BTreeMap::from([("zone".to_owned(), "a".to_owned())])
    );
    assert_eq!(battle.prefer.min_share, 0.3);
    assert_eq!(battle.slow_start.duration, Duration::from_secs(30));
    assert_eq!(battle.slow_start.min, 0.2);
    let chat = &config.upstreams[1];
    assert_eq!(
        chat.prefer.metadata,
        std::collections::BTreeMap::from([
            ("rack".to_owned(), "r7".to_owned()),
            ("zone".to_owned(), "b".to_owned())
        ]),
        "values from the squire's own [service].metadata"
    );
}

#[test]
fn prefer_and_slow_start_problems_name_the_key() {
    let found = problems(
        r#"
        [service]
        name = "lobby"
        host = "10.0.0.5"
        port = 8001

        [[upstream]]
        service = "a"
        listen = "127.0.0.1:7001"
        prefer = ["zone"]
        slow_start_min = 0.5

        [[upstream]]
        service = "b"
        listen = "127.0.0.1:7002"
        prefer = { zone = 3 }
        prefer_min_share = 2
        slow_start = "2h"

        [[upstream]]
        service = "c"
        listen = "127.0.0.1:7003"
        prefer = "zone"

        [[upstream]]
        service = "d"
        listen = "127.0.0.1:7004"
        prefer_min_share = 0.5
        "#,
    );
    assert_problems(
        &found,
        &[
            "upstream.a.prefer: service.metadata has no \"zone\"",
            "upstream.a.slow_start_min: only applies with slow_start",
            "upstream.b.prefer.zone: expected a non-empty string",
            "upstream.b.prefer_min_share: 2 is out of range (0-1)",
            "upstream.b.slow_start: must be at most 1h",
            "upstream.c.prefer: expected a table of metadata pairs",
            "upstream.d.prefer_min_share: only applies with prefer",
        ],
    );
    let found = problems(
        "[[upstream]]\nservice = \"a\"\nlisten = \"127.0.0.1:7001\"\nprefer = [\"zone\"]\n",
    );
    assert_problems(
        &found,
        &["upstream.a.prefer: \"zone\" takes its value from [service].metadata, and there is no [service]"],
    );
}
