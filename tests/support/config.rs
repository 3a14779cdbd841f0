//! The one builder of agent configs for the tests: an [`AgentToml`] made of
//! [`Section`]s, rendered as `agent.toml` text (`to_string()`), which is what
//! [`super::TestAgent::start`] takes and what a test writes to a file for the
//! real binary.
//!
//! ```ignore
//! AgentToml::local(dir.path())
//!     .service(Section::service("battle", backend.addr).set("id", "battle-0"))
//!     .upstream(Section::upstream("battle").set("retries", 1))
//! ```
//!
//! Values go through `toml::Value`, so strings and paths are quoted and
//! escaped as TOML wants. Tests that are about a particular text (config
//! validation, the invalid fixtures) write that text themselves.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use super::consul::FakeConsul;
use super::nacos::Nacos;
use super::zookeeper::ZooKeeper;
use super::Etcd;

/// One TOML table: keys in the order first set, then `raw` text as written
/// (for sub-tables such as `[[upstream.route]]`).
#[derive(Clone, Debug, Default)]
pub struct Section {
    keys: Vec<(String, toml::Value)>,
    raw: String,
}

impl Section {
    pub fn new() -> Section {
        Section::default()
    }

    /// Sets `key`, replacing an earlier value in place.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Section {
        let value = value.into();
        match self.keys.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = value,
            None => self.keys.push((key.to_owned(), value)),
        }
        self
    }

    /// Appends TOML text after the keys, as written.
    pub fn raw(mut self, toml: &str) -> Section {
        self.raw.push_str(toml);
        self.raw.push('\n');
        self
    }

    /// `kind = "local"` on `dir`, ttl 3s.
    pub fn local(dir: &Path) -> Section {
        Section::new()
            .set("kind", "local")
            .set("dir", dir.display().to_string())
            .set("ttl", "3s")
    }

    /// `kind = "etcd"` on the harness, keys under `prefix`, ttl 3s,
    /// timeout 2s.
    pub fn etcd(etcd: &Etcd, prefix: &str) -> Section {
        Section::new()
            .set("kind", "etcd")
            .set("endpoints", vec![etcd.endpoint()])
            .set("prefix", prefix)
            .set("ttl", "3s")
            .set("timeout", "2s")
    }

    /// `kind = "zookeeper"` on the harness, nodes under `root`, ttl 3s
    /// (the session timeout), timeout 2s.
    pub fn zookeeper(zk: &ZooKeeper, root: &str) -> Section {
        Section::new()
            .set("kind", "zookeeper")
            .set("servers", vec![zk.server()])
            .set("root", root)
            .set("ttl", "3s")
            .set("timeout", "2s")
    }

    /// `kind = "consul"` on the fake, ttl 2s, timeout 2s.
    pub fn consul(fake: &FakeConsul) -> Section {
        Section::new()
            .set("kind", "consul")
            .set("address", fake.address())
            .set("ttl", "2s")
            .set("timeout", "2s")
    }

    /// `kind = "nacos"` on the server, ttl 3s, timeout 2s, polled every
    /// 200ms, push on (the default) to its gRPC port.
    pub fn nacos(nacos: &Nacos) -> Section {
        Section::new()
            .set("kind", "nacos")
            .set("address", nacos.address())
            .set("grpc_port", i64::from(nacos.grpc_port()))
            .set("ttl", "3s")
            .set("timeout", "2s")
            .set("poll_interval", "200ms")
    }

    /// `[service]` announcing `name` at `addr` (the id defaults to
    /// `{name}-{host}-{port}`).
    pub fn service(name: &str, addr: SocketAddr) -> Section {
        Section::new()
            .set("name", name)
            .set("host", addr.ip().to_string())
            .set("port", i64::from(addr.port()))
    }

    /// A service with every field Knight's `ServiceInfo` carries: id
    /// `{name}-1`, tags `["game"]`, version 1.0.0, metadata `zone = "a"`.
    pub fn game_service(name: &str, addr: SocketAddr) -> Section {
        let metadata = toml::Table::from_iter([("zone".to_owned(), "a".into())]);
        Section::service(name, addr)
            .set("id", format!("{name}-1"))
            .set("tags", vec!["game"])
            .set("version", "1.0.0")
            .set("metadata", metadata)
    }

    /// `[[upstream]]` proxying `service` from 127.0.0.1:0.
    pub fn upstream(service: &str) -> Section {
        Section::new()
            .set("service", service)
            .set("listen", "127.0.0.1:0")
    }

    /// An upstream that gives up on an endpoint after 500 ms and retries
    /// once, and fails at once with no endpoint, so a dead or missing
    /// instance costs a test little.
    pub fn fast_upstream(service: &str) -> Section {
        Section::upstream(service)
            .set("connect_timeout", "500ms")
            .set("retries", 1)
            .set("endpoint_wait", "0s")
    }

    /// [`Section::fast_upstream`] with `protocol = "http"`.
    pub fn http_upstream(service: &str) -> Section {
        Section::fast_upstream(service).set("protocol", "http")
    }

    fn render(&self, header: &str, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(out, "{header}")?;
        for (key, value) in &self.keys {
            writeln!(out, "{key} = {value}")?;
        }
        write!(out, "{}", self.raw)
    }
}

/// A whole agent config: `[agent]`, `[discovery]`, one registry (`[registry]`)
/// or several (`[[registry]]`), an optional `[service]` with its checks, and
/// any number of `[[upstream]]`s.
#[derive(Clone, Debug)]
pub struct AgentToml {
    agent: Section,
    discovery: Section,
    registries: Vec<Section>,
    service: Option<Section>,
    checks: Vec<Section>,
    upstreams: Vec<Section>,
}

impl AgentToml {
    /// Admin on 127.0.0.1:0, `drain_delay = "0s"`, `drain_timeout = "2s"`,
    /// on `registry`. With a local registry, `state_dir` is `{dir}/.state` (never a service
    /// name), so an agent run as a process writes nothing outside the test's
    /// directory; [`super::TestAgent`] gives every other agent a temp dir.
    pub fn new(registry: Section) -> AgentToml {
        let mut agent = Section::new()
            .set("admin", "127.0.0.1:0")
            .set("drain_delay", "0s")
            .set("drain_timeout", "2s");
        if let Some((_, toml::Value::String(dir))) = registry.keys.iter().find(|(k, _)| k == "dir")
        {
            agent = agent.set("state_dir", format!("{dir}/.state"));
        }
        AgentToml {
            agent,
            discovery: Section::new(),
            registries: vec![registry],
            service: None,
            checks: Vec::new(),
            upstreams: Vec::new(),
        }
    }

    pub fn local(dir: &Path) -> AgentToml {
        AgentToml::new(Section::local(dir))
    }

    pub fn etcd(etcd: &Etcd, prefix: &str) -> AgentToml {
        AgentToml::new(Section::etcd(etcd, prefix))
    }

    pub fn zookeeper(zk: &ZooKeeper, root: &str) -> AgentToml {
        AgentToml::new(Section::zookeeper(zk, root))
    }

    pub fn consul(fake: &FakeConsul) -> AgentToml {
        AgentToml::new(Section::consul(fake))
    }

    pub fn nacos(nacos: &Nacos) -> AgentToml {
        AgentToml::new(Section::nacos(nacos))
    }

    /// One more registry; with several, each needs a `name`.
    pub fn registry(mut self, registry: Section) -> AgentToml {
        self.registries.push(registry);
        self
    }

    /// Sets a key in `[agent]`.
    pub fn agent(mut self, key: &str, value: impl Into<toml::Value>) -> AgentToml {
        self.agent = self.agent.set(key, value);
        self
    }

    /// Sets a key in `[agent]` unless the test set it already.
    pub fn agent_default(mut self, key: &str, value: impl Into<toml::Value>) -> AgentToml {
        if !self.agent.keys.iter().any(|(k, _)| k == key) {
            self.agent = self.agent.set(key, value);
        }
        self
    }

    /// Sets a key in `[discovery]`.
    pub fn discovery(mut self, key: &str, value: impl Into<toml::Value>) -> AgentToml {
        self.discovery = self.discovery.set(key, value);
        self
    }

    pub fn service(mut self, service: Section) -> AgentToml {
        self.service = Some(service);
        self
    }

    /// A `[[service.check]]`.
    pub fn check(mut self, check: Section) -> AgentToml {
        self.checks.push(check);
        self
    }

    pub fn upstream(mut self, upstream: Section) -> AgentToml {
        self.upstreams.push(upstream);
        self
    }
}

impl fmt::Display for AgentToml {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.agent.render("[agent]", out)?;
        if !self.discovery.keys.is_empty() {
            self.discovery.render("[discovery]", out)?;
        }
        let header = match self.registries.len() {
            1 => "[registry]",
            _ => "[[registry]]",
        };
        for registry in &self.registries {
            registry.render(header, out)?;
        }
        if let Some(service) = &self.service {
            service.render("[service]", out)?;
        }
        for check in &self.checks {
            check.render("[[service.check]]", out)?;
        }
        for upstream in &self.upstreams {
            upstream.render("[[upstream]]", out)?;
        }
        Ok(())
    }
}
