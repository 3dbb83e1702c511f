//! The PROXY protocol (HAProxy's, versions 1 and 2) a load balancer in front sends at the
//! start of each connection to say who the client is. Only the header is parsed; the
//! bytes after it belong to HTTP (or TLS) and are handed back untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest version 1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The 12-byte signature that opens a version 2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 2 address block (with TLVs) accepted; TLVs are skipped.
const V2_MAX_LEN: usize = 4096;

/// What a complete header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// The connection is relayed for this client.
    Proxied { source: SocketAddr },
    /// A health check of the balancer itself (v2 `LOCAL`) or an unknown family
    /// (`UNKNOWN`, `AF_UNIX`): use the connection's own address.
    Local,
}

/// Why a header is refused (the connection is closed).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed,
/// otherwise the header and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let v1 = b"PROXY ";
    let n = buf.len().min(v1.len());
    if buf[..n] == v1[..n] {
        return if n < v1.len() {
            Ok(None)
        } else {
            parse_v1(buf)
        };
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    Err(ProxyHeaderError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed;
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(bad("version 1 line longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| bad("not ASCII"))?;
    let mut parts = line.split(' ').skip(1);
    let header = match parts.next() {
        Some("UNKNOWN") => Header::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let src: IpAddr = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or(bad("bad source address"))?;
            let dst: IpAddr = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or(bad("bad destination address"))?;
            let sport: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or(bad("bad source port"))?;
            let _dport: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or(bad("bad destination port"))?;
            if parts.next().is_some() {
                return Err(bad("trailing fields"));
            }
            let v4 = family == "TCP4";
            if src.is_ipv4() != v4 || dst.is_ipv4() != v4 {
                return Err(bad("address family does not match"));
            }
            Header::Proxied {
                source: SocketAddr::new(src, sport),
            }
        }
        _ => return Err(bad("unknown protocol family")),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed;
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(bad("version 2 signature with another version"));
    }
    if len > V2_MAX_LEN {
        return Err(bad("version 2 address block too long"));
    }
    let total = 16 + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let header = match ver_cmd & 0x0f {
        0 => Header::Local,
        1 => match family {
            // TCP or UDP over IPv4.
            0x11 | 0x12 => {
                if body.len() < 12 {
                    return Err(bad("IPv4 address block too short"));
                }
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                let port = u16::from_be_bytes([body[8], body[9]]);
                Header::Proxied {
                    source: SocketAddr::new(IpAddr::V4(ip), port),
                }
            }
            // TCP or UDP over IPv6.
            0x21 | 0x22 => {
                if body.len() < 36 {
                    return Err(bad("IPv6 address block too short"));
                }
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[..16]);
                let port = u16::from_be_bytes([body[32], body[33]]);
                Header::Proxied {
                    source: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port),
                }
            }
            _ => Header::Local,
        },
        _ => return Err(bad("unknown version 2 command")),
    };
    Ok(Some((header, total)))
}

/// A version 1 header for `source` (tests and tools).
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A version 2 `PROXY` header over TCP for `source` (tests and tools). Both addresses
/// must be of one family.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn version_1_lines() {
        let buf = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n";
        let (h, used) = parse(buf).unwrap().unwrap();
        assert_eq!(
            h,
            Header::Proxied {
                source: addr("192.0.2.7:51000")
            }
        );
        assert_eq!(&buf[used..used + 3], b"GET");
        let (h, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            h,
            Header::Proxied {
                source: addr("[2001:db8::1]:1")
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((Header::Local, 15))
        );
        // Partial input asks for more; garbage is refused.
        assert_eq!(parse(b"PRO").unwrap(), None);
        assert_eq!(parse(b"PROXY TCP4 192.0.2.7").unwrap(), None);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::Missing));
        assert!(parse(b"PROXY TCP4 192.0.2.7 2001:db8::1 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 nope 10.0.0.1 1 2\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
        let long = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert!(parse(&long).is_err());
    }

    #[test]
    fn version_2_blocks() {
        let v4 = encode_v2(addr("203.0.113.9:4000"), addr("10.0.0.1:80"));
        let mut buf = v4.clone();
        buf.extend_from_slice(b"GET /");
        assert_eq!(
            parse(&buf).unwrap(),
            Some((
                Header::Proxied {
                    source: addr("203.0.113.9:4000")
                },
                v4.len()
            ))
        );
        for cut in 0..v4.len() {
            assert_eq!(parse(&v4[..cut]).unwrap(), None, "cut at {cut}");
        }
        let v6 = encode_v2(addr("[2001:db8::5]:7"), addr("[2001:db8::1]:443"));
        assert_eq!(
            parse(&v6).unwrap().unwrap().0,
            Header::Proxied {
                source: addr("[2001:db8::5]:7")
            }
        );
        // LOCAL (a balancer's own health check) keeps the socket address.
        let mut local = v4.clone();
        local[12] = 0x20;
        assert_eq!(parse(&local).unwrap().unwrap().0, Header::Local);
        let mut bad_version = v4;
        bad_version[12] = 0x31;
        assert!(parse(&bad_version).is_err());
    }

    #[test]
    fn version_1_encoding_round_trips() {
        let line = encode_v1(addr("198.51.100.4:1234"), addr("127.0.0.1:80"));
        assert_eq!(
            parse(&line).unwrap().unwrap(),
            (
                Header::Proxied {
                    source: addr("198.51.100.4:1234")
                },
                line.len()
            )
        );
    }

    fn socket() -> impl proptest::strategy::Strategy<Value = SocketAddr> {
        use proptest::prelude::*;
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
        ]
    }

    proptest::proptest! {
        // A connection's first bytes: hostile when the balancer in front is bypassed.
        #[test]
        fn any_bytes_are_parsed_without_panicking(bytes in proptest::collection::vec(0u8.., 0..300)) {
            if let Ok(Some((_, used))) = parse(&bytes) {
                proptest::prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn encoded_headers_round_trip_and_their_prefixes_ask_for_more(
            source in socket(),
            v2 in proptest::bool::ANY,
            rest in proptest::collection::vec(0u8.., 0..40),
            cut in 0usize..120,
        ) {
            // Both addresses of one family, as a balancer sends them.
            let destination = if source.is_ipv4() {
                SocketAddr::from(([127, 0, 0, 1], 443))
            } else {
                SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], 443))
            };
            let header = if v2 {
                encode_v2(source, destination)
            } else {
                encode_v1(source, destination)
            };
            let mut buf = header.clone();
            buf.extend(&rest);
            let (parsed, used) = parse(&buf).unwrap().unwrap();
            proptest::prop_assert_eq!(parsed, Header::Proxied { source });
            proptest::prop_assert_eq!(used, header.len());
            let cut = cut % header.len();
            proptest::prop_assert_eq!(parse(&header[..cut]), Ok(None));
        }
    }
}
