//! `ip_hash`: affinity by client address.
//!
//! The client's IP address (without the port, and with an IPv4-mapped IPv6
//! address taken as the IPv4 address) is the key of the same weighted
//! Maglev table that `consistent_hash` uses ([`super::consistent_hash`]), so
//! `ip_hash` is `consistent_hash` with `hash_key = "client_ip"` under the
//! name nginx users know.
//!
//! Behind a localhost sidecar every client address is 127.0.0.1, which
//! sends every connection to one instance: `ip_hash` is only useful on a
//! listener bound to a routable address that remote clients reach directly.

use std::net::IpAddr;

use super::hash;

/// The affinity key of a client address.
pub fn key(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => hash::key(&v4.octets()),
        IpAddr::V6(v6) => hash::key(&v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_does_not_matter_and_mapped_v4_is_v4() {
        let v4: IpAddr = "10.0.0.7".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().expect("ip");
        assert_eq!(key(v4), key(mapped));
        assert_ne!(key(v4), key("10.0.0.8".parse().expect("ip")));
    }
}
