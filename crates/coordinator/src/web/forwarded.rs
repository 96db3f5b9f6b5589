//! Which client a request to the web UI comes from: the connection's peer, or, when the peer
//! is a reverse proxy `[http] trusted_proxies` names, the nearest hop in `X-Forwarded-For`
//! that is not such a proxy. Wrong tokens are counted against that address (`limit.rs`).

use axum::http::HeaderMap;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// Hops of `X-Forwarded-For` looked at, from the right: a chain of proxies is short, and the
/// header is the client's to make as long as it likes.
const MAX_HOPS: usize = 16;

/// The address a request is counted against. `X-Forwarded-For` is read from the right (each
/// proxy appends the address it was reached from; what the client wrote stands left of
/// that): the first hop that is not a trusted proxy is the client. A hop that is not an
/// address (the client's own writing, past every proxy) ends the walk at the proxy that
/// passed it on.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip));
    let mut last = peer.to_canonical();
    if !is_trusted(last) {
        return last;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev().take(MAX_HOPS) {
        let Some(ip) = parse_hop(hop) else {
            return last;
        };
        if !is_trusted(ip) {
            return ip;
        }
        last = ip;
    }
    last
}

/// One hop: an address, possibly with a port (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
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
    fn a_trusted_proxys_requests_count_against_the_client_it_names() {
        let trusted: Vec<IpNet> = vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let proxy = ip("127.0.0.1");
        // One proxy: the address it appended.
        assert_eq!(
            client_ip(proxy, &headers(&["192.0.2.7"]), &trusted),
            ip("192.0.2.7")
        );
        // Two proxies: past the inner one, to the client.
        assert_eq!(
            client_ip(proxy, &headers(&["192.0.2.7, 10.1.2.3"]), &trusted),
            ip("192.0.2.7")
        );
        // What the client wrote itself is left of what the proxy appended: not believed.
        assert_eq!(
            client_ip(proxy, &headers(&["203.0.113.9", "192.0.2.7"]), &trusted),
            ip("192.0.2.7")
        );
        assert_eq!(
            client_ip(proxy, &headers(&["not-an-address, 10.1.2.3"]), &trusted),
            ip("10.1.2.3")
        );
        // Ports and IPv6 as proxies write them; an IPv4-mapped peer is the IPv4 address.
        assert_eq!(
            client_ip(proxy, &headers(&["[2001:db8::5]:4711"]), &trusted),
            ip("2001:db8::5")
        );
        assert_eq!(
            client_ip(
                ip("::ffff:127.0.0.1"),
                &headers(&["192.0.2.8:80"]),
                &trusted
            ),
            ip("192.0.2.8")
        );
        // No header: the proxy itself.
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }

    #[test]
    fn anyone_else_is_counted_as_the_peer_whatever_it_writes() {
        let trusted: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        let peer = ip("192.0.2.50");
        assert_eq!(client_ip(peer, &headers(&["198.51.100.1"]), &trusted), peer);
        assert_eq!(client_ip(peer, &headers(&["198.51.100.1"]), &[]), peer);
        assert_eq!(
            client_ip(ip("127.0.0.1"), &headers(&["198.51.100.1"]), &[]),
            ip("127.0.0.1")
        );
    }
}
