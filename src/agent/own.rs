//! This squire's own addresses, which no endpoint may be: the admin API,
//! every listener, and the host's interface addresses (a listener on a
//! wildcard address takes connects to any of them). Read when the agent
//! binds and again at every reload, and handed to discovery on a watch so
//! that a newly bound listener is refused as an endpoint at once.

use std::net::{IpAddr, SocketAddr};

use crate::balance::OwnAddrs;

/// `admin` and `listeners` as bound, with the interface addresses now.
pub(super) fn own_addrs(
    admin: SocketAddr,
    listeners: impl IntoIterator<Item = SocketAddr>,
) -> OwnAddrs {
    let mut all = vec![admin];
    for listen in listeners {
        if !all.contains(&listen) {
            all.push(listen);
        }
    }
    OwnAddrs {
        listeners: all,
        local: interface_addrs(),
    }
}

/// Every address of every interface (`getifaddrs`); empty if it fails,
/// which only loses the refusal of a host address at a wildcard listener
/// (loopback addresses are recognised without it).
fn interface_addrs() -> Vec<IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid out pointer; on success it is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot list the interface addresses; endpoints at this host's addresses are not recognised as our own");
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, not yet
        // freed; `ifa_addr` is null or points at a sockaddr of the family
        // it says, for as long as the list lives.
        let (next, ip) = unsafe {
            let node = &*at;
            let addr = node.ifa_addr;
            let ip = if addr.is_null() {
                None
            } else {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(v6.sin6_addr.s6_addr))
                    }
                    _ => None,
                }
            };
            (node.ifa_next, ip)
        };
        if let Some(ip) = ip {
            if !found.contains(&ip) {
                found.push(ip);
            }
        }
        at = next;
    }
    // SAFETY: `list` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interface_addresses_include_loopback() {
        let own = own_addrs("127.0.0.1:9901".parse().expect("addr"), []);
        assert!(
            own.local.contains(&IpAddr::from([127, 0, 0, 1])),
            "{:?}",
            own.local
        );
        assert_eq!(own.listeners.len(), 1);
    }
}
