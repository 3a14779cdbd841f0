//! The endpoint policy: which registry entries an upstream may dial.
//!
//! A registry value is a connect target chosen by whoever can write to the
//! registry, so before an instance becomes an [`Endpoint`](super::Endpoint)
//! every address it stands for is checked, once per snapshot build and
//! never per connection. An instance is refused when its host is not a
//! valid host name or IP address ([`Refusal::BadHost`]), its name did not
//! resolve ([`Refusal::Unresolvable`]), or any of its addresses
//!
//! - is unspecified (`0.0.0.0`, `::`: a connect to it lands on this host),
//! - is this squire's own listener or admin address ([`OwnAddrs`]),
//! - falls in a denied range, or outside the allowed ones ([`Ranges`]).
//!
//! IPv4-mapped IPv6 addresses (`::ffff:169.254.169.254`) are checked as the
//! IPv4 address they are. Everything here is pure: discovery resolves the
//! names and hands the addresses in; [`super::Upstream::refresh`] applies
//! the checks to every snapshot it builds, whatever fed it (a watch, the
//! last known instances on disk, a reload's prefill).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use crate::registry::Instance;

/// Why an instance is not dialled. The names are the `reason` label of
/// `squire_registry_entries_refused_total` and of `/v1/services`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// `0.0.0.0` or `::` (also IPv4-mapped).
    Unspecified,
    /// One of this squire's own listeners or its admin API.
    Own,
    /// In a range of the `deny` list.
    DeniedRange,
    /// Outside every range of an `allow` list.
    NotAllowed,
    /// Not an IP address nor a valid host name (RFC 1035/1123 syntax, at
    /// most 253 characters).
    BadHost,
    /// A host name that has not resolved yet (retried at every refresh).
    Unresolvable,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unspecified => "unspecified",
            Refusal::Own => "self",
            Refusal::DeniedRange => "denied_range",
            Refusal::NotAllowed => "not_allowed",
            Refusal::BadHost => "bad_host",
            Refusal::Unresolvable => "unresolvable",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance as discovery hands it to [`super::Upstream::refresh`]: the
/// addresses its host stands for (the IP itself, or what the name resolved
/// to), or why it has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub instance: Instance,
    pub addrs: Result<Arc<[SocketAddr]>, Refusal>,
}

impl Resolved {
    /// An instance whose host is an IP address: its one address, with no
    /// lookup; `None` for a host name.
    pub fn literal(instance: Instance) -> Option<Resolved> {
        match host(&instance.host) {
            Ok(Host::Ip(ip)) => {
                let addr = SocketAddr::new(ip, instance.port);
                Some(Resolved {
                    addrs: Ok(Arc::from([addr])),
                    instance,
                })
            }
            _ => None,
        }
    }
}

/// An instance refused, as logs and `/v1/services` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub id: String,
    /// `host:port`, the host cut short if it is long (see [`shown_address`]).
    pub address: String,
    pub reason: Refusal,
}

/// What a registry host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    Ip(IpAddr),
    /// A syntactically valid host name, to be resolved.
    Name(&'a str),
}

/// The longest host name (RFC 1035: 253 characters without the root dot).
pub const MAX_HOST_NAME: usize = 253;

/// Reads a registry host: an IP address (IPv6 without brackets), or a host
/// name of letters, digits, `-` and `_` (Docker and Compose service names
/// use it) in dot-separated labels of 1-63 characters that neither start
/// nor end with `-`, at most [`MAX_HOST_NAME`] characters, a trailing root
/// dot allowed. A last label of digits only (`127.1`, `0`) is refused: it is
/// the resolver's shorthand for an address, not a name.
pub fn host(text: &str) -> Result<Host<'_>, Refusal> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() || name.len() > MAX_HOST_NAME {
        return Err(Refusal::BadHost);
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        return Err(Refusal::BadHost);
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Refusal::BadHost);
    }
    Ok(Host::Name(text))
}

/// `host:port` of `instance` for logs and the admin API: a host longer than
/// 64 bytes is cut there and its length said, so a hostile 100 KB name
/// costs one short line.
pub fn shown_address(instance: &Instance) -> String {
    const SHOWN: usize = 64;
    if instance.host.len() <= SHOWN {
        return instance.authority();
    }
    let mut end = SHOWN;
    while !instance.host.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}...({} bytes):{}",
        &instance.host[..end],
        instance.host.len(),
        instance.port
    )
}

/// Checks every address an instance stands for; the first refusal wins.
/// Unspecified first, then this squire's own addresses, then the ranges.
pub fn check(addrs: &[SocketAddr], own: &OwnAddrs, ranges: &Ranges) -> Result<(), Refusal> {
    if addrs.is_empty() {
        return Err(Refusal::Unresolvable);
    }
    for addr in addrs {
        let ip = addr.ip().to_canonical();
        let addr = SocketAddr::new(ip, addr.port());
        if ip.is_unspecified() {
            return Err(Refusal::Unspecified);
        }
        if own.contains(addr) {
            return Err(Refusal::Own);
        }
        if ranges.deny.iter().any(|r| r.contains(ip)) {
            return Err(Refusal::DeniedRange);
        }
        if let Some(allow) = &ranges.allow {
            if !allow.iter().any(|r| r.contains(ip)) {
                return Err(Refusal::NotAllowed);
            }
        }
    }
    Ok(())
}

/// This squire's own addresses: a connect to any of them would reach one
/// of its own sockets (and loop, or talk to the admin API).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnAddrs {
    /// Every bound listener and the admin API, as bound.
    pub listeners: Vec<SocketAddr>,
    /// The host's interface addresses, for listeners on a wildcard address.
    pub local: Vec<IpAddr>,
}

impl OwnAddrs {
    /// Whether a connect to `addr` (canonical) lands on one of our
    /// listeners: one bound to exactly that address, or one bound to the
    /// wildcard of its port, which takes connects to every local address
    /// (any loopback address, any interface address; `[::]` also takes
    /// IPv4, being dual-stack by default). A listener on `127.0.0.1:P` is
    /// not reached by a connect to `10.0.0.5:P` or `127.0.0.2:P`: those may
    /// well be a real instance on the same host.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        self.listeners.iter().any(|listener| {
            if listener.port() != addr.port() {
                return false;
            }
            let bound = listener.ip().to_canonical();
            if !bound.is_unspecified() {
                return bound == ip;
            }
            let family = match ip {
                IpAddr::V4(_) => true, // [::] is dual-stack, 0.0.0.0 is v4
                IpAddr::V6(_) => bound.is_ipv6(),
            };
            family && (ip.is_loopback() || self.local.contains(&ip))
        })
    }
}

/// The address ranges an upstream may dial: none in `deny`, and when
/// `allow` is set, only those in it. Deny wins over allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    /// `None`: every range not denied.
    pub allow: Option<Vec<Cidr>>,
    pub deny: Vec<Cidr>,
}

impl Ranges {
    /// The `deny` default: link-local, where cloud metadata services live
    /// (169.254.169.254) and nothing a game fleet routes to.
    pub fn default_deny() -> Vec<Cidr> {
        vec![
            Cidr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16),
            Cidr::new(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
        ]
    }
}

impl Default for Ranges {
    fn default() -> Self {
        Ranges {
            allow: None,
            deny: Ranges::default_deny(),
        }
    }
}

/// An address range, `10.0.0.0/8` or `fd00::/8`; a bare address is the
/// range of that one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `network` with its host bits cleared.
    fn new(network: IpAddr, prefix: u8) -> Cidr {
        Cidr {
            network: mask(network, prefix),
            prefix,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & bits))
        }
        IpAddr::V6(v6) => {
            let bits = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & bits))
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// Refuses a prefix longer than the address and host bits set
    /// (`10.0.0.1/8`: a typo for `10.0.0.0/8` or for `10.0.0.1/32`?).
    /// An IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`) is read as the
    /// IPv4 range it is.
    fn from_str(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address range like 10.0.0.0/8 or fd00::/8"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0-{max}"))?,
        };
        let cidr = Cidr::new(ip, prefix);
        if cidr.network != ip {
            return Err(format!(
                "{text:?} has bits set past the prefix; write {cidr}"
            ));
        }
        Ok(match (ip, ip.to_canonical()) {
            (IpAddr::V6(_), v4 @ IpAddr::V4(_)) if prefix >= 96 => Cidr::new(v4, prefix - 96),
            _ => cidr,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    fn cidrs(texts: &[&str]) -> Vec<Cidr> {
        texts.iter().map(|t| t.parse().expect("cidr")).collect()
    }

    fn own(listeners: &[&str], local: &[&str]) -> OwnAddrs {
        OwnAddrs {
            listeners: listeners.iter().map(|l| addr(l)).collect(),
            local: local.iter().map(|l| l.parse().expect("ip")).collect(),
        }
    }

    fn verdict(target: &str, own: &OwnAddrs, ranges: &Ranges) -> Result<(), Refusal> {
        check(&[addr(target)], own, ranges)
    }

    #[test]
    fn unspecified_addresses_are_refused_in_every_spelling() {
        let (own, ranges) = (OwnAddrs::default(), Ranges::default());
        for target in ["0.0.0.0:80", "[::]:80", "[::ffff:0.0.0.0]:80"] {
            assert_eq!(
                verdict(target, &own, &ranges),
                Err(Refusal::Unspecified),
                "{target}"
            );
        }
        assert_eq!(verdict("127.0.0.1:80", &own, &ranges), Ok(()));
    }

    #[test]
    fn a_specific_listener_is_only_its_own_address() {
        let own = own(&["127.0.0.1:7000", "127.0.0.1:9901"], &["10.0.0.5"]);
        let ranges = Ranges::default();
        assert_eq!(verdict("127.0.0.1:7000", &own, &ranges), Err(Refusal::Own));
        assert_eq!(verdict("127.0.0.1:9901", &own, &ranges), Err(Refusal::Own));
        assert_eq!(
            verdict("[::ffff:127.0.0.1]:7000", &own, &ranges),
            Err(Refusal::Own)
        );
        // Another port, another loopback address, the host's own address:
        // none of them reaches a socket bound to 127.0.0.1:7000.
        assert_eq!(verdict("127.0.0.1:7001", &own, &ranges), Ok(()));
        assert_eq!(verdict("127.0.0.2:7000", &own, &ranges), Ok(()));
        assert_eq!(verdict("10.0.0.5:7000", &own, &ranges), Ok(()));
    }

    #[test]
    fn a_wildcard_listener_is_every_local_address_of_its_port() {
        let v4 = own(&["0.0.0.0:7000"], &["10.0.0.5", "fd00::5"]);
        let ranges = Ranges::default();
        for target in ["127.0.0.1:7000", "127.9.9.9:7000", "10.0.0.5:7000"] {
            assert_eq!(verdict(target, &v4, &ranges), Err(Refusal::Own), "{target}");
        }
        assert_eq!(
            verdict("10.0.0.6:7000", &v4, &ranges),
            Ok(()),
            "another host"
        );
        assert_eq!(
            verdict("[::1]:7000", &v4, &ranges),
            Ok(()),
            "0.0.0.0 is v4 only"
        );
        let dual = own(&["[::]:7000"], &["10.0.0.5", "fd00::5"]);
        for target in [
            "[::1]:7000",
            "[fd00::5]:7000",
            "127.0.0.1:7000",
            "10.0.0.5:7000",
        ] {
            assert_eq!(
                verdict(target, &dual, &ranges),
                Err(Refusal::Own),
                "{target}"
            );
        }
        assert_eq!(verdict("[fd00::6]:7000", &dual, &ranges), Ok(()));
    }

    #[test]
    fn link_local_is_denied_by_default_and_deny_beats_allow() {
        let own = OwnAddrs::default();
        let ranges = Ranges::default();
        for target in [
            "169.254.169.254:80",
            "[::ffff:169.254.169.254]:80",
            "[fe80::1]:80",
        ] {
            assert_eq!(
                verdict(target, &own, &ranges),
                Err(Refusal::DeniedRange),
                "{target}"
            );
        }
        let open = Ranges {
            allow: None,
            deny: Vec::new(),
        };
        assert_eq!(verdict("169.254.169.254:80", &own, &open), Ok(()));
        let allow = Ranges {
            allow: Some(cidrs(&["10.0.0.0/8", "fd00::/8"])),
            deny: cidrs(&["10.0.5.0/24"]),
        };
        assert_eq!(verdict("10.1.2.3:80", &own, &allow), Ok(()));
        assert_eq!(verdict("[fd00::1]:80", &own, &allow), Ok(()));
        assert_eq!(
            verdict("10.0.5.1:80", &own, &allow),
            Err(Refusal::DeniedRange)
        );
        assert_eq!(
            verdict("127.0.0.1:80", &own, &allow),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn one_bad_address_of_a_name_refuses_the_instance() {
        let addrs = [addr("127.0.0.1:80"), addr("169.254.1.1:80")];
        assert_eq!(
            check(&addrs, &OwnAddrs::default(), &Ranges::default()),
            Err(Refusal::DeniedRange)
        );
        assert_eq!(
            check(&[], &OwnAddrs::default(), &Ranges::default()),
            Err(Refusal::Unresolvable)
        );
    }

    #[test]
    fn hosts_are_addresses_or_valid_names() {
        assert_eq!(
            host("10.0.0.5"),
            Ok(Host::Ip("10.0.0.5".parse().expect("ip")))
        );
        assert_eq!(host("::1"), Ok(Host::Ip("::1".parse().expect("ip"))));
        for name in [
            "localhost",
            "game-7.eu.internal",
            "game-7.eu.internal.",
            "battle_server",
            "3com.net",
        ] {
            assert_eq!(host(name), Ok(Host::Name(name)), "{name}");
        }
        let long_label = "a".repeat(64);
        let just_fits = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(just_fits.len(), MAX_HOST_NAME);
        assert!(host(&just_fits).is_ok());
        let too_long = format!("{just_fits}e");
        let huge = "a.".repeat(50_000) + "b";
        for bad in [
            "",
            ".",
            "[::1]",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "a/b",
            "a:b",
            "fe80::1%eth0",
            "é.example",
            "127.1",
            "0",
            "0x7f.0.0.1",
            long_label.as_str(),
            too_long.as_str(),
            huge.as_str(),
        ] {
            assert_eq!(host(bad), Err(Refusal::BadHost), "{bad:?}");
        }
    }

    #[test]
    fn a_long_host_is_shown_short() {
        let mut instance =
            crate::registry::Instance::from_json(br#"{"name":"a","id":"a1","host":"h","port":7}"#)
                .expect("instance");
        assert_eq!(shown_address(&instance), "h:7");
        instance.host = "é".repeat(50_000);
        let shown = shown_address(&instance);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("...(100000 bytes):7"), "{shown}");
    }

    #[test]
    fn ranges_parse_strictly() {
        let parse = |t: &str| t.parse::<Cidr>();
        assert_eq!(parse("10.0.0.0/8").expect("v4").to_string(), "10.0.0.0/8");
        assert_eq!(parse("fd00::/8").expect("v6").to_string(), "fd00::/8");
        assert_eq!(parse("10.1.2.3").expect("host").to_string(), "10.1.2.3/32");
        assert_eq!(parse("0.0.0.0/0").expect("all").to_string(), "0.0.0.0/0");
        assert_eq!(
            parse("::ffff:10.0.0.0/104").expect("mapped").to_string(),
            "10.0.0.0/8"
        );
        assert!(parse("0.0.0.0/0")
            .expect("all")
            .contains("1.2.3.4".parse().expect("ip")));
        assert!(!parse("0.0.0.0/0")
            .expect("all")
            .contains("::1".parse().expect("ip")));
        assert_eq!(
            parse("10.0.0.1/8"),
            Err("\"10.0.0.1/8\" has bits set past the prefix; write 10.0.0.0/8".to_owned())
        );
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0/8",
            "ten/8",
            "/8",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn literal_instances_need_no_lookup() {
        let instance = |host: &str| {
            let mut i = crate::registry::Instance::from_json(
                br#"{"name":"a","id":"a1","host":"h","port":7}"#,
            )
            .expect("instance");
            i.host = host.into();
            i
        };
        let resolved = Resolved::literal(instance("::1")).expect("an address");
        assert_eq!(resolved.addrs.expect("addrs")[..], [addr("[::1]:7")]);
        assert!(Resolved::literal(instance("localhost")).is_none());
    }
}
