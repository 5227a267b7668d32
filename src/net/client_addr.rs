//! The client's address: the TCP peer, or — when the peer is a trusted proxy (an Ingress, a
//! load balancer: config `trusted_proxies`) — the address that proxy recorded in
//! `x-forwarded-for`. The failed-attempt limit and the access log use it: behind an Ingress
//! every client shares the Ingress's address, and one attacker's failures would block them all.
//!
//! `x-forwarded-for` is read right to left, skipping trusted hops: the first untrusted address
//! is the client, since every hop appends and only the trusted ones can be believed (a client
//! can put anything at the left). Nothing is believed when the peer itself is not trusted.

use std::net::IpAddr;

use http::HeaderMap;

/// One network, `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("expected an address or CIDR such as `10.0.0.0/8`, got `{s}`"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.trim().parse::<u8>() {
                Ok(b) if b <= max => b,
                _ => return Err(format!("the prefix length of `{s}` must be 0 to {max}")),
            },
        };
        // Addresses are compared in canonical form (an IPv4-mapped IPv6 peer is its IPv4
        // address), so a mapped network is the IPv4 network it maps.
        if let IpAddr::V6(v6) = net {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), bits >= 96) {
                return Ok(Cidr { net: IpAddr::V4(v4), bits: bits - 96 });
            }
        }
        Ok(Cidr { net, bits })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix_eq(u128::from(u32::from(n)) << 96, u128::from(u32::from(a)) << 96, self.bits)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(u128::from(n), u128::from(a), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, bits: u8) -> bool {
    bits == 0 || (a ^ b) >> (128 - u32::from(bits)) == 0
}

/// The configured `trusted_proxies`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client's address for a request that arrived from `peer`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if self.0.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        // Header lines are hops in order; within a line, addresses are too. Split as bytes: a
        // client's junk (even non-ASCII) at the left of a line must not hide the hops a trusted
        // proxy appended at its right.
        let hops: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .collect();
        for hop in hops.iter().rev() {
            let parsed = std::str::from_utf8(hop).ok().and_then(|h| h.trim().parse::<IpAddr>().ok());
            match parsed.ok_or(()) {
                Ok(ip) => {
                    client = ip.to_canonical();
                    if !self.trusts(ip) {
                        break;
                    }
                }
                // Garbage where an address should be: nothing further left can be believed.
                Err(_) => break,
            }
        }
        client
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")) && !c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped IPv6 is the IPv4 address");
        let one: Cidr = "192.168.1.7".parse().unwrap();
        assert!(one.contains(ip("192.168.1.7")) && !one.contains(ip("192.168.1.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")) && !v6.contains(ip("10.0.0.1")));
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(
            mapped.contains(ip("10.9.9.9"))
                && mapped.contains(ip("::ffff:10.1.1.1"))
                && !mapped.contains(ip("11.0.0.1"))
        );
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_trusted_peers_are_believed_and_only_trusted_hops_skipped() {
        let t = TrustedProxies(vec!["10.0.0.0/8".parse().unwrap()]);
        // Not trusted: the header is ignored.
        assert_eq!(t.client_ip(ip("203.0.113.9"), &xff(&["1.2.3.4"])), ip("203.0.113.9"));
        // Trusted ingress: the address it appended.
        assert_eq!(t.client_ip(ip("10.0.0.5"), &xff(&["1.2.3.4"])), ip("1.2.3.4"));
        // A client's forged left part is skipped: the rightmost untrusted hop wins.
        assert_eq!(t.client_ip(ip("10.0.0.5"), &xff(&["6.6.6.6, 1.2.3.4, 10.0.0.7"])), ip("1.2.3.4"));
        assert_eq!(t.client_ip(ip("10.0.0.5"), &xff(&["6.6.6.6", "1.2.3.4"])), ip("1.2.3.4"));
        // Non-ASCII junk a client put at the left of the line the proxy appended to.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", http::HeaderValue::from_bytes(b"\x80junk, 1.2.3.4").unwrap());
        assert_eq!(t.client_ip(ip("10.0.0.5"), &h), ip("1.2.3.4"));
        // Garbage stops the walk; no header: the peer.
        assert_eq!(t.client_ip(ip("10.0.0.5"), &xff(&["1.2.3.4, junk"])), ip("10.0.0.5"));
        assert_eq!(t.client_ip(ip("10.0.0.5"), &HeaderMap::new()), ip("10.0.0.5"));
        // Nothing configured: always the peer.
        assert_eq!(TrustedProxies::default().client_ip(ip("10.0.0.5"), &xff(&["1.2.3.4"])), ip("10.0.0.5"));
    }
}
