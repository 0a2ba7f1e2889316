//! The client's address behind reverse proxies: the connection's peer, unless the peer is
//! one of the configured trusted proxies; then the address they forwarded for, read from
//! `X-Forwarded-For` from the right past every trusted hop (Keycloak's
//! `proxy-trusted-addresses`, Tomcat's `RemoteIpValve`). A header from anyone else is
//! ignored: a client could write any address in it.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::HeaderMap;
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// Addresses and networks of the reverse proxies in front of a server (`"10.0.0.0/8"`,
/// `"127.0.0.1"`), whose `X-Forwarded-For` is believed. Empty: none is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Whether `ip` is one of the proxies.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The address a request came from, by the connection's `peer` and its `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        // Nearest hop first: each proxy appends the address it took the request from.
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .flat_map(|value| value.as_bytes().rsplit(|byte| *byte == b','));
        let mut client = peer;
        for hop in hops {
            // A hop that is not an address ends the trust: the last believed one stands.
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// An entry of `X-Forwarded-For`: an address, possibly with a port.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(hop).ok()?.trim();
    let ip = IpAddr::from_str(text)
        .ok()
        .or_else(|| SocketAddr::from_str(text).ok().map(|addr| addr.ip()))?;
    Some(ip.to_canonical())
}

impl TryFrom<Vec<String>> for TrustedProxies {
    type Error = String;

    fn try_from(entries: Vec<String>) -> Result<Self, String> {
        entries
            .iter()
            .map(|entry| {
                IpNet::from_str(entry)
                    .or_else(|_| IpAddr::from_str(entry).map(IpNet::from))
                    .map(canonical)
                    .map_err(|_| format!("{entry:?} is not an IP address or network (10.0.0.0/8)"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// `net` as addresses are compared with it: an IPv4-mapped IPv6 network as the IPv4 one
/// (addresses are made canonical the same way).
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .addr()
            .to_ipv4_mapped()
            .and_then(|v4| Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map_or(net, IpNet::V4),
        _ => net,
    }
}

impl From<TrustedProxies> for Vec<String> {
    fn from(proxies: TrustedProxies) -> Self {
        proxies.0.iter().map(ToString::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn proxies(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::try_from(entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>())
            .unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_proxy() {
        let trusted = proxies(&["10.0.0.0/8", "127.0.0.1"]);
        let headers = forwarded(&["203.0.113.7"]);
        assert_eq!(
            trusted.client(ip("198.51.100.1"), &headers),
            ip("198.51.100.1")
        );
        assert_eq!(trusted.client(ip("10.1.2.3"), &headers), ip("203.0.113.7"));
        assert_eq!(trusted.client(ip("127.0.0.1"), &headers), ip("203.0.113.7"));
        assert_eq!(
            TrustedProxies::default().client(ip("127.0.0.1"), &headers),
            ip("127.0.0.1")
        );
        // A trusted proxy that forwarded nothing is the client.
        assert_eq!(
            trusted.client(ip("10.1.2.3"), &HeaderMap::new()),
            ip("10.1.2.3")
        );
    }

    #[test]
    fn the_client_is_the_first_untrusted_hop_from_the_right() {
        let trusted = proxies(&["10.0.0.0/8"]);
        // What the client wrote itself (the first entries) is not believed past the hop a
        // trusted proxy vouches for.
        let headers = forwarded(&["1.1.1.1, 203.0.113.7", "10.0.0.5"]);
        assert_eq!(trusted.client(ip("10.0.0.9"), &headers), ip("203.0.113.7"));
        let headers = forwarded(&["1.1.1.1, 203.0.113.7, 10.0.0.5"]);
        assert_eq!(trusted.client(ip("10.0.0.9"), &headers), ip("203.0.113.7"));
        // Every hop trusted: the farthest one.
        let headers = forwarded(&["10.0.0.1, 10.0.0.5"]);
        assert_eq!(trusted.client(ip("10.0.0.9"), &headers), ip("10.0.0.1"));
    }

    #[test]
    fn garbage_in_the_header_stops_at_the_last_believed_hop() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let headers = forwarded(&["203.0.113.7, unknown, 10.0.0.5"]);
        assert_eq!(trusted.client(ip("10.0.0.9"), &headers), ip("10.0.0.5"));
        let headers = forwarded(&[" 203.0.113.7:4711 ", "[2001:db8::1]:80"]);
        assert_eq!(trusted.client(ip("10.0.0.9"), &headers), ip("2001:db8::1"));
        // IPv4 peers on an IPv6 socket are matched as IPv4, and so are networks written
        // as IPv4-mapped IPv6 ones.
        let mapped = ip("::ffff:10.0.0.9");
        let client = forwarded(&["203.0.113.7"]);
        assert_eq!(trusted.client(mapped, &client), ip("203.0.113.7"));
        let written_mapped = proxies(&["::ffff:10.0.0.0/104"]);
        assert_eq!(written_mapped.client(mapped, &client), ip("203.0.113.7"));
        assert_eq!(
            written_mapped.client(ip("10.0.0.9"), &client),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn entries_are_addresses_or_networks() {
        assert_eq!(
            Vec::<String>::from(proxies(&["127.0.0.1"])),
            ["127.0.0.1/32"]
        );
        let error = TrustedProxies::try_from(vec!["10.0.0.0/33".to_owned()]).unwrap_err();
        assert!(error.contains("10.0.0.0/33"), "{error}");
        assert!(TrustedProxies::try_from(vec!["proxy.local".to_owned()]).is_err());
    }
}
