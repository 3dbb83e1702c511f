//! Entity keys: what a mitigation or a policy tracks (an IP, a network, a header value...).
//!
//! On the wire and in URLs a key is one string, `kind:value`: `ip:203.0.113.7`,
//! `cidr:203.0.113.0/24`, `header:x-api-key=abc`, `cookie:session=9f2c...`, and a
//! combination of these, `tuple:ip:203.0.113.7+header:user-agent=curl/8.5` (in each
//! part, `%` and `+` are written `%25` and `%2B`), a path template,
//! `path:/users/{id}/orders` (see [`path_template`]), and a TLS client fingerprint,
//! `ja4:t13d1516h2_8daaf6152771_b0da82dd1658`.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A tracked entity. Header and cookie names are lower-cased; networks are truncated to
/// their prefix so that `10.1.2.3/24` and `10.1.2.0/24` are the same key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntityKey {
    /// One client address.
    Ip(IpAddr),
    /// A network (for example a /24 or a /64), matched by prefix.
    Cidr(IpNet),
    /// The value of a request header.
    Header { name: String, value: String },
    /// The (hashed) value of a named cookie.
    Cookie { name: String, value: String },
    /// A combination: a request matches when it matches every part. Parts are not
    /// tuples themselves, and are kept in one order ([`EntityKey::tuple`]).
    Tuple(Vec<EntityKey>),
    /// A normalised request path ([`path_template`]): ids and tokens replaced by
    /// placeholders, no query.
    Path(String),
    /// The JA4 fingerprint of the client's TLS ClientHello.
    Ja4(String),
}

/// Why a string is not an entity key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityParseError {
    #[error(
        "entity key `{0}` has no kind: expected `ip:ADDR`, `cidr:NET/LEN`, `header:NAME=VALUE`, `cookie:NAME=HASH`, `path:/TEMPLATE`, `ja4:FINGERPRINT` or `tuple:KEY+KEY`"
    )]
    MissingKind(String),
    #[error("unknown entity kind `{0}`: expected ip, cidr, header, cookie, path, ja4 or tuple")]
    UnknownKind(String),
    #[error("`{0}` is not a tuple of 2 or more entity keys joined by `+` (tuples do not nest)")]
    BadTuple(String),
    #[error("`{0}` is not an IP address")]
    BadIp(String),
    #[error("`{0}` is not a network in CIDR form (e.g. 203.0.113.0/24)")]
    BadCidr(String),
    #[error("`{0}` must be NAME=VALUE with a non-empty name")]
    BadNamedValue(String),
    #[error("`{0}`: header and cookie keys cannot hold control characters")]
    ControlCharacter(String),
    #[error("`{0}` is not a path template: it must start with `/` and have no query")]
    BadPath(String),
    #[error("`{0}` is not a JA4 fingerprint (letters, digits and `_`)")]
    BadJa4(String),
}

impl EntityKey {
    /// The kind as written before the colon.
    pub fn kind(&self) -> &'static str {
        match self {
            EntityKey::Ip(_) => "ip",
            EntityKey::Cidr(_) => "cidr",
            EntityKey::Header { .. } => "header",
            EntityKey::Cookie { .. } => "cookie",
            EntityKey::Tuple(_) => "tuple",
            EntityKey::Path(_) => "path",
            EntityKey::Ja4(_) => "ja4",
        }
    }

    /// A network key, truncated to its prefix. A full-length prefix stays a network key.
    pub fn network(addr: IpAddr, prefix_len: u8) -> Option<EntityKey> {
        IpNet::new(addr, prefix_len)
            .ok()
            .map(|n| EntityKey::Cidr(canonical_net(n.trunc())))
    }

    /// Does this key cover `ip`? (An `Ip` key covers only itself; a `Cidr` its network.)
    pub fn covers_ip(&self, ip: IpAddr) -> bool {
        match self {
            EntityKey::Ip(a) => *a == ip,
            EntityKey::Cidr(net) => net.contains(&ip),
            _ => false,
        }
    }
}

impl fmt::Display for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntityKey::Ip(ip) => write!(f, "ip:{ip}"),
            EntityKey::Cidr(net) => write!(f, "cidr:{net}"),
            EntityKey::Header { name, value } => write!(f, "header:{name}={value}"),
            EntityKey::Cookie { name, value } => write!(f, "cookie:{name}={value}"),
            EntityKey::Path(template) => write!(f, "path:{template}"),
            EntityKey::Ja4(fp) => write!(f, "ja4:{fp}"),
            EntityKey::Tuple(parts) => {
                f.write_str("tuple:")?;
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str("+")?;
                    }
                    let text = part.to_string();
                    f.write_str(&text.replace('%', "%25").replace('+', "%2B"))?;
                }
                Ok(())
            }
        }
    }
}

impl EntityKey {
    /// The tuple of `parts` in its one form: parts sorted, once each. A request matches a
    /// tuple whatever the order its parts were named in, so two policies naming the same
    /// parts in another order decide against one entity, which one revocation ends.
    pub fn tuple(mut parts: Vec<EntityKey>) -> EntityKey {
        parts.sort();
        parts.dedup();
        EntityKey::Tuple(parts)
    }
}

fn tuple(rest: &str) -> Result<EntityKey, EntityParseError> {
    let bad = || EntityParseError::BadTuple(clip(rest));
    let mut parts = Vec::new();
    for text in rest.split('+') {
        if text.is_empty() {
            return Err(bad());
        }
        let text = text
            .replace("%2B", "+")
            .replace("%2b", "+")
            .replace("%25", "%");
        let part: EntityKey = text.parse()?;
        if matches!(part, EntityKey::Tuple(_)) {
            return Err(bad());
        }
        parts.push(part);
    }
    match EntityKey::tuple(parts) {
        EntityKey::Tuple(parts) if parts.len() < 2 => Err(bad()),
        key => Ok(key),
    }
}

/// Input quoted back in an error, cut short: a key is an entity's name, not a payload.
fn clip(text: &str) -> String {
    const SHOWN: usize = 64;
    match text.char_indices().nth(SHOWN) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

fn named_value(rest: &str) -> Result<(String, String), EntityParseError> {
    match rest.split_once('=') {
        // No request can carry them, so such a key could never match.
        Some(_) if rest.chars().any(|c| c.is_control() && c != '\t') => Err(
            EntityParseError::ControlCharacter(clip(&rest.escape_debug().to_string())),
        ),
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_ascii_lowercase(), value.to_string()))
        }
        _ => Err(EntityParseError::BadNamedValue(clip(rest))),
    }
}

/// An address (as a full-length network) or a CIDR network, truncated to its prefix, in
/// the form client addresses are matched in: an IPv4 network written IPv4-mapped
/// (`::ffff:192.0.2.0/120`) is the IPv4 one (`192.0.2.0/24`). Lists, allowlists and
/// trusted proxies read their entries with it.
pub fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => IpNet::from(s.parse::<IpAddr>().ok()?),
    };
    Some(canonical_net(net))
}

/// An IPv4 client seen through an IPv6 socket (`::ffff:192.0.2.1`) is the IPv4 client:
/// keys name it one way, so allowlists, lookups and revocations find it.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(|n| IpNet::V4(n.trunc()))
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

impl EntityKey {
    /// Refuses a key (alone or in a tuple) no request could match, as a manual
    /// mitigation names it: a header or cookie name that is not an HTTP token, or a
    /// cookie key holding a value rather than its hash (proxies report and match cookie
    /// values by hash; the message says which key would). Checked where mitigations are
    /// published by hand, not where keys are read: keys stored before stay readable.
    pub fn check_matchable(&self) -> Result<(), String> {
        let parts = match self {
            EntityKey::Tuple(parts) => parts.as_slice(),
            one => std::slice::from_ref(one),
        };
        for part in parts {
            if let EntityKey::Header { name, .. } | EntityKey::Cookie { name, .. } = part {
                // RFC 9110's token: no request carries a name with anything else.
                let token = name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !token {
                    return Err(format!(
                        "`{}` is not a header or cookie name (letters, digits and \
                         !#$%&'*+-.^_`|~): no request could match it",
                        clip(name)
                    ));
                }
            }
            if let EntityKey::Cookie { name, value } = part {
                let hashed = value.len() == crate::event::COOKIE_HASH_HEX_LEN
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if !hashed {
                    return Err(format!(
                        "cookie keys hold the value's hash (the first {} hex digits of its \
                         SHA-256), as proxies report it: for this value, cookie:{name}={}",
                        crate::event::COOKIE_HASH_HEX_LEN,
                        crate::event::hash_cookie_value(value)
                    ));
                }
            }
        }
        Ok(())
    }
}

impl FromStr for EntityKey {
    type Err = EntityParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| EntityParseError::MissingKind(clip(s)))?;
        match kind.to_ascii_lowercase().as_str() {
            "ip" => rest
                .parse::<IpAddr>()
                .map(|ip| EntityKey::Ip(ip.to_canonical()))
                .map_err(|_| EntityParseError::BadIp(clip(rest))),
            "cidr" | "net" => rest
                .parse::<IpNet>()
                .map(|n| EntityKey::Cidr(canonical_net(n.trunc())))
                .map_err(|_| EntityParseError::BadCidr(clip(rest))),
            "header" => named_value(rest).map(|(name, value)| EntityKey::Header { name, value }),
            "cookie" => named_value(rest).map(|(name, value)| EntityKey::Cookie { name, value }),
            "tuple" => tuple(rest),
            // Normalised as request paths are, so `path:/a//b` matches `/a/b`.
            "path" if rest.starts_with('/') && !rest.contains(['?', '#']) => {
                Ok(EntityKey::Path(normalize_path(rest).into_owned()))
            }
            "path" => Err(EntityParseError::BadPath(clip(rest))),
            "ja4"
                if !rest.is_empty()
                    && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                Ok(EntityKey::Ja4(rest.to_string()))
            }
            "ja4" => Err(EntityParseError::BadJa4(rest.to_string())),
            other => Err(EntityParseError::UnknownKind(clip(other))),
        }
    }
}

/// The template of a request path: the query is dropped, the path normalised
/// ([`normalize_path`]), and each segment that looks like an identifier is replaced by a
/// placeholder, so that `/users/42/orders?page=2`, `/users/7/orders` and
/// `/users//7/./orders` are all `/users/{id}/orders`:
///
/// - digits only: `{id}`;
/// - a UUID (8-4-4-4-12 hex digits): `{uuid}`;
/// - 16 or more hex digits: `{hex}`;
/// - 20 or more characters of base64 or base64url containing a digit: `{token}`.
///
/// The proxy and the engine use this same function, so a mitigation a policy decides on
/// a template is enforced on every path with that template.
pub fn path_template(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 1);
    write_path_template(path, &mut out);
    out
}

/// [`path_template`] written into `out` (cleared first), so a caller can reuse one buffer.
pub fn write_path_template(path: &str, out: &mut String) {
    out.clear();
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = normalize_path(path);
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment_template(segment).unwrap_or(segment));
    }
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
}

/// A request path in the form servers resolve it to, for matching routes, allowlists
/// and path mitigations: percent-escapes of unreserved characters decoded (`%61` is `a`,
/// `%2E` is `.`) and the others' hex digits upper-cased, `;` parameters dropped from each
/// segment (as Java servers do, so `/static/..;/admin` is `/admin` and
/// `/cart;jsessionid=1` is `/cart`), runs of `/` merged, and `.` and `..` segments removed
/// (RFC 3986, section 5.2.4; `..` never climbs above the root).
/// `%2F` stays encoded: servers disagree on whether it separates segments. A path
/// already in that form is returned as it is, without allocating.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal_path(path) {
        return Cow::Borrowed(path);
    }
    Cow::Owned(normalize_slow(path))
}

/// [`normalize_path`] the long way, for any path.
fn normalize_slow(path: &str) -> String {
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len().saturating_sub(1);
    // Whether the result ends with a separator: after a trailing `/`, `.` or `..`.
    let mut trailing = false;
    for (i, segment) in segments.iter().enumerate() {
        trailing = false;
        let segment = segment.split(';').next().unwrap_or("");
        match segment {
            "" if i == 0 => {}
            "" => trailing = i == last,
            "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len() + 1);
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing || out.is_empty() {
        normal.push('/');
    }
    normal
}

/// No escapes or parameters, no empty segment but a trailing one, no `.` or `..`
/// segment, and rooted. One pass that looks past a byte only at a `/`, since every
/// request's path goes through it.
fn is_normal_path(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' | b';' => return false,
            b'/' => {
                let rest = &b[i + 1..];
                // `//`, or a `.` or `..` segment.
                if matches!(
                    rest,
                    [b'/', ..] | [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
                ) {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// Decodes `%XX` where XX is an unreserved character; upper-cases the hex of the others.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len() + 1);
    if b.first() != Some(&b'/') {
        out.push(b'/');
    }
    let hex = |c: u8| char::from(c).to_digit(16);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            let byte = (hi * 16 + lo) as u8;
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                out.push(byte);
            } else {
                out.push(b'%');
                out.push(b[i + 1].to_ascii_uppercase());
                out.push(b[i + 2].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII was put in place of ASCII escapes, so this is the input's UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The placeholder for a path segment that looks like an identifier.
fn segment_template(segment: &str) -> Option<&'static str> {
    let b = segment.as_bytes();
    if b.is_empty() {
        return None;
    }
    if b.iter().all(u8::is_ascii_digit) {
        return Some("{id}");
    }
    let hex = |s: &[u8]| s.iter().all(u8::is_ascii_hexdigit);
    if b.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b.split(|c| *c == b'-').all(hex)
    {
        return Some("{uuid}");
    }
    if b.len() >= 16 && hex(b) {
        return Some("{hex}");
    }
    let base64 = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'+' | b'=');
    if b.len() >= 20 && b.iter().all(base64) && b.iter().any(u8::is_ascii_digit) {
        return Some("{token}");
    }
    None
}

impl Serialize for EntityKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EntityKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind() {
        for s in [
            "ip:203.0.113.7",
            "ip:2001:db8::1",
            "cidr:203.0.113.0/24",
            "cidr:2001:db8::/64",
            "header:x-api-key=abc=def",
            "cookie:session=9f2c",
            "tuple:ip:203.0.113.7+header:user-agent=Mozilla/5.0 (%2Bhttp://x/) 100%25",
            "tuple:cidr:10.0.0.0/8+cookie:sid=ab",
            "path:/users/{id}/orders",
            "ja4:t13d1516h2_8daaf6152771_b0da82dd1658",
            "tuple:ip:10.0.0.1+path:/api/{token}%2Bx+ja4:t13d1516h2_8daaf6152771_b0da82dd1658",
        ] {
            let key: EntityKey = s.parse().unwrap();
            assert_eq!(key.to_string(), s);
            let json = serde_json::to_string(&key).unwrap();
            assert_eq!(serde_json::from_str::<EntityKey>(&json).unwrap(), key);
        }
    }

    #[test]
    fn mapped_ipv4_addresses_are_keyed_as_ipv4() {
        for (given, canonical) in [
            ("ip:::ffff:127.0.0.1", "ip:127.0.0.1"),
            ("cidr:::ffff:192.0.2.0/120", "cidr:192.0.2.0/24"),
            ("cidr:::ffff:192.0.2.7/128", "cidr:192.0.2.7/32"),
            // Wider than the mapped range: it covers IPv6 addresses too, so stays IPv6.
            ("cidr:::ffff:0:0/80", "cidr:::/80"),
            ("ip:2001:db8::1", "ip:2001:db8::1"),
        ] {
            let key: EntityKey = given.parse().unwrap();
            assert_eq!(key.to_string(), canonical, "{given}");
        }
        let plain: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            EntityKey::network(plain, 24).unwrap().to_string(),
            "cidr:10.1.2.0/24"
        );
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            EntityKey::network(mapped, 120).unwrap().to_string(),
            "cidr:10.1.2.0/24"
        );
    }

    #[test]
    fn list_entries_read_mapped_ipv4_as_ipv4() {
        for (given, net) in [
            ("::ffff:127.0.0.1", "127.0.0.1/32"),
            (" ::ffff:192.0.2.0/120 ", "192.0.2.0/24"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("::ffff:0:0/80", "::/80"),
        ] {
            assert_eq!(super::parse_net(given).unwrap().to_string(), net, "{given}");
        }
        assert_eq!(super::parse_net("not-an-ip"), None);
    }

    #[test]
    fn errors_quote_long_input_cut_short() {
        let long = format!("header:{}", "x".repeat(7000));
        let e = long.parse::<EntityKey>().unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("xxx..."), "{e}");
        let e = "tuple:".parse::<EntityKey>().unwrap_err();
        assert!(matches!(e, EntityParseError::BadTuple(_)), "{e}");
    }

    #[test]
    fn header_and_cookie_keys_refuse_control_characters() {
        for bad in ["header:x-a=b\nc", "cookie:sid=\0", "header:x\r=1"] {
            let e = bad.parse::<EntityKey>().unwrap_err();
            assert!(
                matches!(e, EntityParseError::ControlCharacter(_)),
                "{bad}: {e}"
            );
        }
        assert!("header:user-agent=a\tb".parse::<EntityKey>().is_ok());
    }

    #[test]
    fn path_templates_replace_identifiers() {
        for (path, template) in [
            ("/users/42/orders?page=2", "/users/{id}/orders"),
            ("/", "/"),
            ("", "/"),
            ("/static/app.css", "/static/app.css"),
            ("/o/123e4567-e89b-12d3-a456-426614174000/x", "/o/{uuid}/x"),
            ("/blob/9f86d081884c7d659a2feaa0c55ad015", "/blob/{hex}"),
            ("/reset/eyJhbGciOiJIUzI1NiJ9abc", "/reset/{token}"),
            (
                "/products/running-shoes-for-winter",
                "/products/running-shoes-for-winter",
            ),
            ("/a//b/", "/a/b/"),
            ("/users//7/./orders", "/users/{id}/orders"),
            ("/users/7/x/../orders", "/users/{id}/orders"),
            ("/%6cogin", "/login"),
            ("login", "/login"),
            ("/users/7;jsessionid=abc/orders", "/users/{id}/orders"),
        ] {
            assert_eq!(path_template(path), template, "{path}");
        }
    }

    #[test]
    fn paths_normalise_as_servers_resolve_them() {
        for (path, normal) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a..b/c.", "/a..b/c."),
            ("//", "/"),
            ("/a//b", "/a/b"),
            ("/static/../admin", "/admin"),
            ("/static/%2e%2e/admin", "/admin"),
            ("/static/.%2E/admin", "/admin"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../../etc", "/etc"),
            ("/..", "/"),
            ("/%7euser/%41", "/~user/A"),
            ("/a%2fb/%2F..", "/a%2Fb/%2F.."),
            ("/a%2Fb/%2e%2e", "/"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/bad%zz%4", "/bad%zz%4"),
            ("/static/..;/admin", "/admin"),
            ("/cart;jsessionid=1/x;a=b", "/cart/x"),
            ("/a/;x/b", "/a/b"),
            ("/a%3Bb", "/a%3Bb"),
            ("", "/"),
            ("rel/x", "/rel/x"),
        ] {
            assert_eq!(normalize_path(path), normal, "{path}");
        }
        assert!(matches!(normalize_path("/static/app.js"), Cow::Borrowed(_)));
        assert!(matches!(normalize_path("/a/b/"), Cow::Borrowed(_)));
    }

    proptest::proptest! {
        #[test]
        fn the_quick_check_never_passes_what_the_long_way_changes(path in "[/a.;%2eE]{0,12}") {
            // It may send a path the long way that comes back unchanged (`/%`), never the
            // other way round.
            if is_normal_path(&path) {
                proptest::prop_assert_eq!(normalize_slow(&path), path);
            }
        }

        #[test]
        fn normal_paths_are_a_fixed_point(path in "(/|[a-z.~]|%[0-9A-Fa-f]{2}){0,20}") {
            let once = normalize_path(&path).into_owned();
            proptest::prop_assert!(once.starts_with('/'));
            proptest::prop_assert!(!once.contains("//"));
            proptest::prop_assert!(!once.split('/').any(|s| s == "." || s == ".."));
            proptest::prop_assert_eq!(normalize_path(&once), once.as_str());
        }
    }

    #[test]
    fn path_keys_are_normalised() {
        let key: EntityKey = "path:/a//b/./{id}".parse().unwrap();
        assert_eq!(key, EntityKey::Path("/a/b/{id}".into()));
    }

    #[test]
    fn bad_paths_and_fingerprints_are_refused() {
        for s in ["path:users", "path:/a?b=1", "ja4:", "ja4:a b"] {
            assert!(s.parse::<EntityKey>().is_err(), "{s}");
        }
    }

    #[test]
    fn networks_are_truncated_and_names_lowercased() {
        let key: EntityKey = "cidr:10.1.2.3/24".parse().unwrap();
        assert_eq!(key.to_string(), "cidr:10.1.2.0/24");
        assert!(key.covers_ip("10.1.2.200".parse().unwrap()));
        assert!(!key.covers_ip("10.1.3.1".parse().unwrap()));
        let key: EntityKey = "header:X-Api-Key=Value".parse().unwrap();
        assert_eq!(key.to_string(), "header:x-api-key=Value");
    }

    #[test]
    fn rejects_bad_keys_with_clear_errors() {
        assert_eq!(
            "1.2.3.4".parse::<EntityKey>(),
            Err(EntityParseError::MissingKind("1.2.3.4".into()))
        );
        assert!(matches!(
            "ip:nope".parse::<EntityKey>(),
            Err(EntityParseError::BadIp(_))
        ));
        assert!(matches!(
            "cidr:1.2.3.4/40".parse::<EntityKey>(),
            Err(EntityParseError::BadCidr(_))
        ));
        assert!(matches!(
            "header:=x".parse::<EntityKey>(),
            Err(EntityParseError::BadNamedValue(_))
        ));
        // Read as written (stored keys stay readable); refused where they are published.
        for unmatchable in [
            "header:bad header=abc",
            "cookie:a;b=0123456789abcdef",
            "tuple:ip:10.0.0.1+header:x:y=1",
        ] {
            let key: EntityKey = unmatchable.parse().unwrap();
            let e = key.check_matchable().unwrap_err();
            assert!(
                e.contains("not a header or cookie name"),
                "{unmatchable}: {e}"
            );
        }
        let ok: EntityKey = "tuple:ip:10.0.0.1+cookie:sid=0123456789abcdef"
            .parse()
            .unwrap();
        assert_eq!(ok.check_matchable(), Ok(()));
        assert!(matches!(
            "tuple:ip:10.0.0.1".parse::<EntityKey>(),
            Err(EntityParseError::BadTuple(_))
        ));
        let t: EntityKey = "tuple:ip:10.0.0.1+header:ua=a%2Bb".parse().unwrap();
        assert_eq!(
            t,
            EntityKey::Tuple(vec![
                EntityKey::Ip("10.0.0.1".parse().unwrap()),
                EntityKey::Header {
                    name: "ua".into(),
                    value: "a+b".into()
                }
            ])
        );
        // One form whatever the order the parts were named in; a part named twice is
        // one part.
        let swapped: EntityKey = "tuple:header:ua=a%2Bb+ip:10.0.0.1".parse().unwrap();
        assert_eq!(swapped, t);
        assert_eq!(swapped.to_string(), "tuple:ip:10.0.0.1+header:ua=a%2Bb");
        assert!(matches!(
            "tuple:ip:10.0.0.1+ip:10.0.0.1".parse::<EntityKey>(),
            Err(EntityParseError::BadTuple(_))
        ));
        assert!(matches!(
            "mac:x".parse::<EntityKey>(),
            Err(EntityParseError::UnknownKind(_))
        ));
    }
}
