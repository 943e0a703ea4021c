//! Who may do what over DNS: one [`Acl`] type for `--allow-query`, `--allow-recursion` and
//! `--rate-limit-exempt`, and the networks their defaults are made of.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// A set of clients: everyone, or the addresses inside some networks (none: nobody).
/// IPv4-mapped IPv6 sources count as their IPv4 address.
#[derive(Clone, Debug)]
pub enum Acl {
    Everyone,
    Only(Arc<Nets>),
}

/// Networks as (address, mask) integers, checked with one AND and one compare each (the RRL
/// exemption is checked for every UDP response).
#[derive(Debug)]
pub struct Nets {
    nets: Vec<IpNet>,
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl Acl {
    pub fn only(nets: Vec<IpNet>) -> Acl {
        let v4 = nets
            .iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some((u32::from(n.network()), u32::from(n.netmask()))),
                IpNet::V6(_) => None,
            })
            .collect();
        let v6 = nets
            .iter()
            .filter_map(|n| match n {
                IpNet::V6(n) => Some((u128::from(n.network()), u128::from(n.netmask()))),
                IpNet::V4(_) => None,
            })
            .collect();
        Acl::Only(Arc::new(Nets { nets, v4, v6 }))
    }

    pub fn nobody() -> Acl {
        Acl::only(Vec::new())
    }

    #[inline]
    pub fn allows(&self, ip: IpAddr) -> bool {
        match self {
            Acl::Everyone => true,
            Acl::Only(nets) => {
                let v4 = match ip {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(v6) => v6.to_ipv4_mapped(),
                };
                match (v4, ip) {
                    (Some(v4), _) => {
                        let a = u32::from(v4);
                        nets.v4.iter().any(|&(net, mask)| a & mask == net)
                    }
                    (None, IpAddr::V6(v6)) => {
                        let a = u128::from(v6);
                        nets.v6.iter().any(|&(net, mask)| a & mask == net)
                    }
                    (None, IpAddr::V4(_)) => false,
                }
            }
        }
    }

    pub fn is_everyone(&self) -> bool {
        matches!(self, Acl::Everyone)
    }
}

impl fmt::Display for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Acl::Everyone => f.write_str("everyone"),
            Acl::Only(nets) if nets.nets.is_empty() => f.write_str("nobody"),
            Acl::Only(nets) => {
                let s: Vec<String> = nets.nets.iter().map(ToString::to_string).collect();
                f.write_str(&s.join(","))
            }
        }
    }
}

/// Loopback plus the private networks (RFC 1918, RFC 4193) of this host's interfaces that do
/// not carry a default route: the networks a server inside a cluster serves, without the one
/// it reaches the world through (whose neighbours an attacker outside can impersonate) and
/// never link-local. The default of `--allow-recursion` and `--rate-limit-exempt`.
pub fn trusted_local_networks() -> Vec<IpNet> {
    let default_ifaces = default_route_interfaces();
    let mut nets: Vec<IpNet> = vec![
        "127.0.0.0/8".parse().expect("a network"),
        "::1/128".parse().expect("a network"),
    ];
    for (iface, net) in interface_networks() {
        if is_private(&net) && !default_ifaces.contains(&iface) {
            nets.push(net);
        }
    }
    nets.sort();
    nets.dedup();
    nets
}

fn is_private(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.addr().is_private(),
        IpNet::V6(n) => (n.addr().segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The interfaces that carry a default route (IPv4 or IPv6), from /proc/net.
fn default_route_interfaces() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(s) = std::fs::read_to_string("/proc/net/route") {
        for line in s.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            if f.len() > 7 && f[1] == "00000000" && f[7] == "00000000" {
                out.push(f[0].to_string());
            }
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/net/ipv6_route") {
        for line in s.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // dest prefixlen src srclen nexthop metric refcnt use flags iface
            if f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo" {
                out.push(f[9].to_string());
            }
        }
    }
    out
}

/// Every (interface, network) of this host's addresses.
pub fn interface_networks() -> Vec<(String, IpNet)> {
    let mut nets = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return nets;
        }
        let mut p = ifap;
        while !p.is_null() {
            let ifa = &*p;
            p = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                .to_string_lossy()
                .into_owned();
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                    let prefix = u32::from_be(m.sin_addr.s_addr).count_ones() as u8;
                    if let Ok(n) = ipnet::Ipv4Net::new(ip, prefix) {
                        nets.push((name, IpNet::V4(n.trunc())));
                    }
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                    let prefix: u32 = m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum();
                    if let Ok(n) = ipnet::Ipv6Net::new(ip, prefix as u8) {
                        nets.push((name, IpNet::V6(n.trunc())));
                    }
                }
                _ => {}
            }
        }
        libc::freeifaddrs(ifap);
    }
    nets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acls_say_who() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let only = Acl::only(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(only.allows(ip("10.1.2.3")));
        assert!(only.allows(ip("::ffff:10.1.2.3")));
        assert!(!only.allows(ip("192.0.2.1")));
        assert!(!only.allows(ip("fd00::1")));
        let v6 = Acl::only(vec![
            "fd00::/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        assert!(v6.allows(ip("fd12::7")) && v6.allows(ip("::1")));
        assert!(!v6.allows(ip("fe80::1")) && !v6.allows(ip("10.0.0.1")));
        assert!(!Acl::nobody().allows(ip("127.0.0.1")));
        assert!(Acl::Everyone.allows(ip("192.0.2.1")));
        assert_eq!(Acl::nobody().to_string(), "nobody");
    }

    #[test]
    fn the_trusted_default_is_loopback_and_private_never_link_local_or_public() {
        let nets = trusted_local_networks();
        assert!(nets
            .iter()
            .any(|n| n.contains(&"127.0.0.1".parse::<IpAddr>().unwrap())));
        for n in &nets {
            let link_local = match n {
                IpNet::V4(n) => n.addr().is_link_local(),
                IpNet::V6(n) => (n.addr().segments()[0] & 0xffc0) == 0xfe80,
            };
            assert!(!link_local, "{n} is link-local");
            assert!(
                n.addr().is_loopback() || is_private(n),
                "{n} is neither loopback nor private"
            );
        }
        // The networks of the interface with the default route are left out.
        let defaults = default_route_interfaces();
        for (iface, net) in interface_networks() {
            if defaults.contains(&iface) && !net.addr().is_loopback() {
                assert!(
                    !nets.contains(&net),
                    "{net} of {iface} (default route) is trusted"
                );
            }
        }
    }
}
