//! Who the client really is: the connection's address, unless it belongs to a trusted
//! proxy, in which case the header those proxies set (`X-Forwarded-For`, or `Forwarded`
//! when configured) is walked from the right and the first address that is not a trusted
//! proxy wins. What a client writes on the left of that header is its own claim and never
//! trusted, and the other header is not read at all: a proxy in front passes it on as the
//! client wrote it. Also the allowlists that bypass every mitigation.

use std::borrow::Cow;
use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

use crate::config::RealIpHeader;

const FORWARDED: &str = "forwarded";
const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";

/// A list of networks, checked linearly (such lists are short).
#[derive(Clone, Debug, Default)]
pub struct Networks(Vec<IpNet>);

impl Networks {
    /// The networks of `nets`; IPv4-mapped IPv6 addresses match their IPv4 networks.
    pub fn new(nets: &[IpNet]) -> Networks {
        Networks(nets.to_vec())
    }

    /// Is the list empty?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Does one of the networks hold `ip`?
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// The client address of a request that arrived from `peer` with `headers`, the trusted
/// proxies naming the client in `header`.
pub fn resolve(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &Networks,
    header: RealIpHeader,
) -> IpAddr {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    match header {
        RealIpHeader::XForwardedFor => walk(peer, trusted, x_forwarded_for_hops(headers)),
        RealIpHeader::Forwarded => walk(peer, trusted, forwarded_hops(headers)),
    }
}

/// Walks hops from the nearest (right) to the farthest; an address that cannot be
/// read ends the walk at the last one known.
fn walk(peer: IpAddr, trusted: &Networks, hops: impl Iterator<Item = Option<IpAddr>>) -> IpAddr {
    let mut client = peer;
    for hop in hops {
        let Some(ip) = hop else { return client };
        client = ip.to_canonical();
        if !trusted.contains(client) {
            return client;
        }
    }
    client
}

/// The comma-separated items of every line of `name`, nearest (rightmost) first. Each
/// item is decoded on its own: a byte that is not text makes its item unreadable (which
/// ends a walk there) instead of hiding the hops a trusted proxy appended to its line.
fn items<'a>(headers: &'a HeaderMap, name: &str) -> impl Iterator<Item = Option<&'a str>> + 'a {
    headers
        .get_all(name)
        .iter()
        .rev()
        .flat_map(|v| v.as_bytes().rsplit(|b| *b == b','))
        .map(|item| std::str::from_utf8(item).ok())
}

/// `X-Forwarded-For` addresses, nearest first, across every header line.
fn x_forwarded_for_hops(headers: &HeaderMap) -> impl Iterator<Item = Option<IpAddr>> + '_ {
    items(headers, X_FORWARDED_FOR)
        .map(|item| item.map(str::trim))
        .filter(|item| *item != Some(""))
        .map(|item| item.and_then(parse_node))
}

/// `Forwarded: for=...` addresses (RFC 7239), nearest first.
fn forwarded_hops(headers: &HeaderMap) -> impl Iterator<Item = Option<IpAddr>> + '_ {
    forwarded_elements(headers).map(|(hop, _)| hop)
}

/// The `Forwarded` elements that name a hop, nearest first: its address (`for=`) and
/// the scheme it was reached by (`proto=`), if given.
fn forwarded_elements(
    headers: &HeaderMap,
) -> impl Iterator<Item = (Option<IpAddr>, Option<&str>)> + '_ {
    items(headers, FORWARDED).filter_map(|element| {
        let Some(element) = element else {
            return Some((None, None));
        };
        let (mut hop, mut proto) = (None, None);
        for pair in element.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim() {
                k if k.eq_ignore_ascii_case("for") => hop = hop.or(Some(v)),
                k if k.eq_ignore_ascii_case("proto") => proto = proto.or(Some(v)),
                _ => {}
            }
        }
        let Some(hop) = hop else {
            // An element that names no hop (a balancer set to add only `proto=`) cannot
            // be walked past: what lies beyond it is what the client wrote.
            return (!element.trim().is_empty()).then_some((None, proto));
        };
        Some((parse_node(hop), proto))
    })
}

/// The scheme the client used, as the trusted proxies in front tell it in the header
/// they name the client in: a lone `http` or `https` in `X-Forwarded-Proto`, or the
/// `proto=` of the `Forwarded` element that names the client (the one added by the
/// proxy the client connected to). `None` when the peer is not trusted or nothing
/// usable was told; the other header is then the client's own claim, never read.
pub fn told_scheme(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &Networks,
    header: RealIpHeader,
) -> Option<&'static str> {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(peer) {
        return None;
    }
    let scheme = |v: &[u8]| {
        if v.eq_ignore_ascii_case(b"https") {
            Some("https")
        } else if v.eq_ignore_ascii_case(b"http") {
            Some("http")
        } else {
            None
        }
    };
    match header {
        RealIpHeader::XForwardedFor => {
            let mut values = headers.get_all(X_FORWARDED_PROTO).iter();
            let only = values.next()?;
            if values.next().is_some() {
                return None;
            }
            scheme(only.as_bytes())
        }
        RealIpHeader::Forwarded => {
            // The same walk as for the address: the first element naming a hop that is
            // not a trusted proxy is the client's.
            let mut last = None;
            for (hop, proto) in forwarded_elements(headers) {
                let hop = hop?;
                last = proto;
                if !trusted.contains(hop.to_canonical()) {
                    break;
                }
            }
            scheme(last?.as_bytes())
        }
    }
}

/// An address as it appears in those headers: `192.0.2.1`, `192.0.2.1:80`,
/// `2001:db8::1`, `[2001:db8::1]:80`; `unknown` or an obfuscated name is `None`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    let (host, _port) = s.rsplit_once(':')?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Paths that bypass mitigations: exact, or a prefix when written with a trailing `*`.
#[derive(Clone, Debug, Default)]
pub struct Paths {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl Paths {
    /// The list from config entries (`/healthz`, `/static/*`).
    pub fn new(entries: &[String]) -> Paths {
        let mut paths = Paths::default();
        for e in entries {
            match e.strip_suffix('*') {
                Some(prefix) => paths.prefixes.push(prefix.to_string()),
                None => paths.exact.push(e.clone()),
            }
        }
        paths
    }

    /// Does the request path `path` match an entry? Only a path already in normal form
    /// can: one with escapes, `;` parameters, `.` or `..` segments, repeated slashes or
    /// backslashes may
    /// resolve at the upstream to somewhere the list does not cover (`/static/../admin`),
    /// and which way depends on the upstream, so it gets no bypass.
    pub fn contains(&self, path: &str) -> bool {
        if self.exact.is_empty() && self.prefixes.is_empty() {
            return false;
        }
        let normal = matches!(esper_protocol::normalize_path(path), Cow::Borrowed(_))
            && !path.contains('\\');
        normal
            && (self.exact.iter().any(|p| p == path)
                || self.prefixes.iter().any(|p| path.starts_with(p)))
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const XFF: RealIpHeader = RealIpHeader::XForwardedFor;
    const FWD: RealIpHeader = RealIpHeader::Forwarded;

    fn nets(list: &[&str]) -> Networks {
        Networks::new(&list.iter().map(|s| s.parse().unwrap()).collect::<Vec<_>>())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_scheme_is_told_by_trusted_proxies_in_their_header() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        let told = |h: &HeaderMap, header| told_scheme(peer, h, &trusted, header);
        let xfp = headers(&[("x-forwarded-proto", "HTTPS")]);
        assert_eq!(told(&xfp, XFF), Some("https"));
        assert_eq!(told(&xfp, FWD), None, "not the header the proxies speak");
        assert_eq!(
            told_scheme(ip("192.0.2.1"), &xfp, &trusted, XFF),
            None,
            "a client's claim"
        );
        for odd in ["https, http", "gopher", ""] {
            assert_eq!(
                told(&headers(&[("x-forwarded-proto", odd)]), XFF),
                None,
                "{odd}"
            );
        }
        let two = headers(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-proto", "http"),
        ]);
        assert_eq!(told(&two, XFF), None);

        let fwd = |v: &str| headers(&[("forwarded", v)]);
        assert_eq!(told(&fwd("for=192.0.2.7;proto=https"), FWD), Some("https"));
        assert_eq!(
            told(&fwd("Proto=\"HTTP\"; For=192.0.2.7"), FWD),
            Some("http")
        );
        assert_eq!(told(&fwd("for=192.0.2.7"), FWD), None);
        assert_eq!(
            told(
                &fwd("for=192.0.2.7;proto=https, for=10.0.0.9;proto=http"),
                FWD
            ),
            Some("https"),
            "the element naming the client"
        );
        assert_eq!(
            told(&fwd("for=6.6.6.6;proto=https, for=192.0.2.7"), FWD),
            None,
            "a client's element says nothing"
        );
        assert_eq!(
            told(
                &fwd("for=192.0.2.7;proto=https, for=unknown;proto=https"),
                FWD
            ),
            None,
            "the walk stops at an unreadable hop"
        );
        assert_eq!(told(&fwd("for=10.0.0.9;proto=https"), FWD), Some("https"));
    }

    #[test]
    fn a_byte_that_is_not_text_spoils_only_its_own_hop() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        let raw = |name: &'static str, v: &[u8]| {
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_bytes(v).unwrap());
            h
        };
        // The balancer appended the client it saw to the line the client wrote.
        let h = raw("x-forwarded-for", b"6.6.6.6\xff, 198.51.100.7");
        assert_eq!(
            resolve(ip("127.0.0.1"), &h, &trusted, XFF),
            ip("198.51.100.7")
        );
        let h = raw("forwarded", b"for=6.6.6.6;x=\xff, for=198.51.100.7");
        assert_eq!(
            resolve(ip("127.0.0.1"), &h, &trusted, FWD),
            ip("198.51.100.7")
        );
        // Past trusted hops, an unreadable one ends the walk at the last address known.
        let h = raw("x-forwarded-for", b"198.51.100.7, 6.6.6.6\xff, 10.0.0.5");
        assert_eq!(resolve(ip("127.0.0.1"), &h, &trusted, XFF), ip("10.0.0.5"));
        let h = raw("forwarded", b"for=198.51.100.7, for=\xff, for=10.0.0.5");
        assert_eq!(resolve(ip("127.0.0.1"), &h, &trusted, FWD), ip("10.0.0.5"));
    }

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_claim() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(
            resolve(ip("192.0.2.1"), &h, &nets(&[]), XFF),
            ip("192.0.2.1")
        );
        assert_eq!(
            resolve(ip("192.0.2.1"), &h, &nets(&["10.0.0.0/8"]), XFF),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn the_rightmost_untrusted_address_wins() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        // The client claims 6.6.6.6; the edge balancer 10.0.0.5 saw 198.51.100.7.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
            ("x-forwarded-for", "10.0.0.5"),
        ]);
        assert_eq!(
            resolve(ip("127.0.0.1"), &h, &trusted, XFF),
            ip("198.51.100.7")
        );
        // Every hop trusted: the farthest one.
        let h = headers(&[("x-forwarded-for", "10.1.1.1, 10.0.0.5")]);
        assert_eq!(resolve(ip("127.0.0.1"), &h, &trusted, XFF), ip("10.1.1.1"));
        // No header: the peer itself.
        assert_eq!(
            resolve(ip("127.0.0.1"), &HeaderMap::new(), &trusted, XFF),
            ip("127.0.0.1")
        );
        // Garbage stops the walk at the last address known.
        let h = headers(&[("x-forwarded-for", "198.51.100.7, junk, 10.0.0.5")]);
        assert_eq!(resolve(ip("127.0.0.1"), &h, &trusted, XFF), ip("10.0.0.5"));
    }

    #[test]
    fn only_the_configured_header_is_read() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[
            (
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https, For=10.0.0.9:80",
            ),
            ("x-forwarded-for", "192.0.2.200"),
        ]);
        assert_eq!(
            resolve(ip("10.0.0.2"), &h, &trusted, FWD),
            ip("2001:db8::7")
        );
        // A balancer that sets X-Forwarded-For passes a client's own `Forwarded` on: it
        // is not read, whatever it claims.
        assert_eq!(
            resolve(ip("10.0.0.2"), &h, &trusted, XFF),
            ip("192.0.2.200")
        );
        let claim = headers(&[("forwarded", "for=192.0.2.99")]);
        assert_eq!(
            resolve(ip("10.0.0.2"), &claim, &trusted, XFF),
            ip("10.0.0.2")
        );
        let claim = headers(&[("x-forwarded-for", "192.0.2.99")]);
        assert_eq!(
            resolve(ip("10.0.0.2"), &claim, &trusted, FWD),
            ip("10.0.0.2")
        );
        let h = headers(&[("forwarded", "for=unknown, for=10.0.0.3")]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted, FWD), ip("10.0.0.3"));
        // A balancer that adds only `proto=` names no hop: the walk stops there, as at
        // an unreadable hop, and the client's own `for=` beyond it is not taken.
        let h = headers(&[("forwarded", "for=6.6.6.6, proto=https")]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted, FWD), ip("10.0.0.2"));
        assert_eq!(told_scheme(ip("10.0.0.2"), &h, &trusted, FWD), None);
        // Empty elements (`a, , b`) are no hops at all.
        let h = headers(&[("forwarded", "for=192.0.2.5, , for=10.0.0.3")]);
        assert_eq!(resolve(ip("10.0.0.2"), &h, &trusted, FWD), ip("192.0.2.5"));
    }

    #[test]
    fn mapped_addresses_match_ipv4_networks() {
        let trusted = nets(&["127.0.0.0/8"]);
        assert!(trusted.contains(ip("::ffff:127.0.0.1")));
        assert!(!trusted.contains(ip("::1")));
    }

    #[test]
    fn path_lists_match_exactly_or_by_prefix() {
        let p = Paths::new(&["/healthz".into(), "/static/*".into()]);
        assert!(p.contains("/healthz"));
        assert!(!p.contains("/healthz/x"));
        assert!(p.contains("/static/app.js"));
        assert!(!p.contains("/"));
        // Paths an upstream may resolve outside the list get no bypass.
        for sneaky in [
            "/static/../admin",
            "/static/%2e%2e/admin",
            "/static/..%2fadmin",
            "/static//x",
            "/static/./x",
            "/static\\..\\admin",
            "/static/%61pp.js",
            "/healthz/..",
            "/static/..;/admin",
            "/static/x;y",
        ] {
            assert!(!p.contains(sneaky), "{sneaky}");
        }
    }

    proptest::proptest! {
        // Forwarding headers are written by clients; only trusted hops may name one.
        #[test]
        fn any_forwarding_headers_resolve_to_the_peer_or_an_address_they_name(
            xff in "[0-9a-fA-F:., \\[\\]a-z=;\"]{0,80}",
            fwd in proptest::option::of("[0-9a-fA-F:., \\[\\]a-z=;\"]{0,80}"),
            trusted_peer in proptest::bool::ANY,
            read_forwarded in proptest::bool::ANY,
        ) {
            let trusted = nets(&["10.0.0.0/8"]);
            let peer = if trusted_peer { ip("10.0.0.1") } else { ip("192.0.2.1") };
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&xff) {
                h.append("x-forwarded-for", v);
            }
            if let Some(Ok(v)) = fwd.as_deref().map(HeaderValue::from_str) {
                h.append("forwarded", v);
            }
            let header = if read_forwarded { FWD } else { XFF };
            let client = resolve(peer, &h, &trusted, header);
            if !trusted_peer {
                proptest::prop_assert_eq!(client, peer);
            } else if client != peer {
                // Whatever was picked, it was written in the header that is read.
                let text = if read_forwarded { fwd.unwrap_or_default() } else { xff };
                let written: Vec<IpAddr> = text
                    .split([' ', ',', ';', '=', '"', '[', ']'])
                    .filter_map(|t| {
                        t.parse::<IpAddr>()
                            .ok()
                            .or_else(|| t.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
                    })
                    .map(|a| a.to_canonical())
                    .collect();
                proptest::prop_assert!(written.contains(&client), "{} not in {}", client, text);
            }
        }
    }
}
