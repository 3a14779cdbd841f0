//! `squire init`: an annotated `agent.toml` for one service, one registry
//! kind and any upstreams, that `squire check` accepts as it is.

use std::fmt::Write;
use std::net::SocketAddr;

/// The registry kinds a template can be written for, and the keys each
/// needs beyond `kind`, `ttl` and `timeout`, with their comments.
const REGISTRIES: &[(&str, &str)] = &[
    (
        "local",
        "# dir = \"/run/squire\"            # shared by the squires on this host; default\n\
         #                                # $XDG_RUNTIME_DIR/squire, else /tmp/squire-registry\n",
    ),
    (
        "etcd",
        "endpoints = [\"http://127.0.0.1:2379\"]  # every member; https:// with a CA, see README\n\
         prefix = \"/services\"              # keys are {prefix}/{service}/{id}\n\
         # username = \"squire\"             # etcd auth: both or neither\n\
         # password = \"...\"\n",
    ),
    (
        "consul",
        "address = \"http://127.0.0.1:8500\" # the local Consul agent\n\
         # token = \"...\"                   # ACL token, sent as X-Consul-Token\n\
         # datacenter = \"dc1\"\n",
    ),
    (
        "zookeeper",
        "servers = [\"127.0.0.1:2181\"]      # every server of the ensemble; ttl is the session timeout\n\
         root = \"/services\"                # our node is {root}/{service}/{id}, ephemeral\n\
         # username = \"squire\"             # digest auth: both or neither\n\
         # password = \"...\"\n",
    ),
    (
        "nacos",
        "address = \"http://127.0.0.1:8848\" # the Nacos server (Open API)\n\
         # namespace = \"dev\"              # default: the public namespace\n\
         group = \"DEFAULT_GROUP\"\n\
         # username = \"nacos\"             # Nacos auth: both or neither\n\
         # password = \"...\"\n",
    ),
    (
        "eureka",
        "url = \"http://127.0.0.1:8761/eureka\"  # the service URL (Spring's defaultZone)\n\
         poll_interval = \"5s\"               # Eureka has no watch: changes are polled\n",
    ),
];

/// The kinds `--registry` takes.
pub fn kinds() -> Vec<&'static str> {
    REGISTRIES.iter().map(|(kind, _)| *kind).collect()
}

/// One `--upstream SERVICE=LISTEN[:tcp|http]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    pub service: String,
    pub listen: SocketAddr,
    pub protocol: &'static str,
}

impl std::str::FromStr for UpstreamSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<UpstreamSpec, String> {
        let (service, rest) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?} is not SERVICE=LISTEN[:tcp|http]"))?;
        if service.is_empty() {
            return Err(format!("{spec:?} names no service"));
        }
        let (listen, protocol) = match rest.rsplit_once(':') {
            Some((addr, "tcp")) => (addr, "tcp"),
            Some((addr, "http")) => (addr, "http"),
            _ => (rest, "tcp"),
        };
        let listen = listen
            .parse()
            .map_err(|_| format!("{listen:?} is not a listen address like 127.0.0.1:7001"))?;
        Ok(UpstreamSpec {
            service: service.to_owned(),
            listen,
            protocol,
        })
    }
}

/// What `squire init` was asked for.
pub struct Template<'a> {
    pub registry: &'a str,
    /// The admin API's address (default 127.0.0.1:9901).
    pub admin: Option<SocketAddr>,
    pub service: Option<(&'a str, u16)>,
    pub upstreams: &'a [UpstreamSpec],
}

impl Template<'_> {
    /// The annotated configuration; `Err` for a registry kind there is no
    /// template for.
    pub fn render(&self) -> Result<String, String> {
        let keys = REGISTRIES
            .iter()
            .find(|(kind, _)| *kind == self.registry)
            .map(|(_, keys)| *keys)
            .ok_or_else(|| {
                format!(
                    "no registry kind {:?}; expected one of {}",
                    self.registry,
                    kinds().join(", ")
                )
            })?;
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "# squire agent configuration, written by `squire init`.\n\
             # Check it with `squire check -c FILE`; README.md documents every key.\n\
             \n\
             [agent]\n\
             admin = \"{admin}\"         # /live /ready /metrics /v1/services /v1/self (loopback only:\n\
             #                                # another address needs admin_token_file)\n\
             log = \"info\"                     # overridden by RUST_LOG\n\
             drain_delay = \"2s\"               # after deregistering, before we stop accepting\n\
             drain_timeout = \"30s\"            # how long open connections may finish\n\
             \n\
             [registry]\n\
             kind = \"{kind}\"\n\
             ttl = \"10s\"                      # our registration lives this long without a refresh\n\
             timeout = \"5s\"                   # bound on every registry call\n\
             {keys}",
            kind = self.registry,
            admin = self
                .admin
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901))),
        );
        match self.service {
            Some((name, port)) => {
                let _ = write!(
                    out,
                    "\n\
                     [service]                        # the local service this squire announces\n\
                     name = \"{name}\"\n\
                     host = \"127.0.0.1\"               # the address peers connect to: set the host's own\n\
                     port = {port}\n\
                     # tags = [\"game\"]\n\
                     # version = \"1.0.0\"\n\
                     # metadata = {{ zone = \"a\" }}\n\
                     \n\
                     [[service.check]]                # announced healthy once this passes `rise` times\n\
                     kind = \"tcp\"                     # or http (path = \"/health\"), grpc, exec\n\
                     interval = \"5s\"\n\
                     timeout = \"1s\"\n\
                     rise = 2\n\
                     fall = 3\n"
                );
            }
            None => out.push_str(
                "\n# [service]                      # the local service to announce, if any\n\
                 # name = \"battle\"\n\
                 # host = \"127.0.0.1\"\n\
                 # port = 7000\n",
            ),
        }
        for upstream in self.upstreams {
            let _ = write!(
                out,
                "\n\
                 [[upstream]]                     # apps connect to {listen} and reach a {service:?} instance\n\
                 service = \"{service}\"\n\
                 listen = \"{listen}\"\n\
                 protocol = \"{protocol}\"\n\
                 strategy = \"round_robin\"         # or least_connections, consistent_hash, ...\n\
                 connect_timeout = \"1s\"\n\
                 retries = 2\n",
                service = upstream.service,
                listen = upstream.listen,
                protocol = upstream.protocol,
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn every_kind_renders_a_config_that_validates() {
        let upstreams: Vec<UpstreamSpec> = ["gate=127.0.0.1:7001", "web=127.0.0.1:7002:http"]
            .iter()
            .map(|s| s.parse().expect("spec"))
            .collect();
        for kind in kinds() {
            for service in [Some(("battle", 7000)), None] {
                let text = Template {
                    registry: kind,
                    admin: None,
                    service,
                    upstreams: &upstreams,
                }
                .render()
                .expect("renders");
                let config =
                    Config::from_toml(&text).unwrap_or_else(|e| panic!("{kind}: {e}\n{text}"));
                assert_eq!(config.registries[0].backend.kind(), kind);
                assert_eq!(config.upstreams.len(), 2);
                assert_eq!(config.service.is_some(), service.is_some());
            }
        }
    }

    #[test]
    fn upstream_specs_parse_or_say_why() {
        let spec: UpstreamSpec = "web=127.0.0.1:7002:http".parse().expect("spec");
        assert_eq!(
            (spec.service.as_str(), spec.listen.port(), spec.protocol),
            ("web", 7002, "http")
        );
        assert_eq!(
            "gate=[::1]:7001"
                .parse::<UpstreamSpec>()
                .map(|s| s.protocol),
            Ok("tcp")
        );
        assert!("gate"
            .parse::<UpstreamSpec>()
            .is_err_and(|e| e.contains("SERVICE=LISTEN")));
        assert!("=1.2.3.4:5"
            .parse::<UpstreamSpec>()
            .is_err_and(|e| e.contains("no service")));
        assert!("g=nowhere"
            .parse::<UpstreamSpec>()
            .is_err_and(|e| e.contains("listen address")));
        let unknown = Template {
            registry: "mdns",
            admin: None,
            service: None,
            upstreams: &[],
        }
        .render();
        assert!(unknown.is_err_and(|e| e.contains("local, etcd, consul, zookeeper, nacos, eureka")));
    }
}
