//! Entity keys: what a mitigation or a policy tracks (an IP, a network, a header value...).
//!
//! On the wire and in URLs a key is one string, `kind:value`: `ip:203.0.113.7`,
//! `cidr:203.0.113.0/24`, `header:x-api-key=abc`, `cookie:session=9f2c...`, and a
//! combination of these, `tuple:ip:203.0.113.7+header:user-agent=curl/8.5` (in each
//! part, `%` and `+` are written `%25` and `%2B`).

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
    /// tuples themselves.
    Tuple(Vec<EntityKey>),
}

/// Why a string is not an entity key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityParseError {
    #[error(
        "entity key `{0}` has no kind: expected `ip:ADDR`, `cidr:NET/LEN`, `header:NAME=VALUE`, `cookie:NAME=VALUE` or `tuple:KEY+KEY`"
    )]
    MissingKind(String),
    #[error("unknown entity kind `{0}`: expected ip, cidr, header, cookie or tuple")]
    UnknownKind(String),
    #[error("`{0}` is not a tuple of 2 or more entity keys joined by `+` (tuples do not nest)")]
    BadTuple(String),
    #[error("`{0}` is not an IP address")]
    BadIp(String),
    #[error("`{0}` is not a network in CIDR form (e.g. 203.0.113.0/24)")]
    BadCidr(String),
    #[error("`{0}` must be NAME=VALUE with a non-empty name")]
    BadNamedValue(String),
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
        }
    }

    /// A network key, truncated to its prefix. A full-length prefix stays a network key.
    pub fn network(addr: IpAddr, prefix_len: u8) -> Option<EntityKey> {
        IpNet::new(addr, prefix_len)
            .ok()
            .map(|n| EntityKey::Cidr(n.trunc()))
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

fn tuple(rest: &str) -> Result<EntityKey, EntityParseError> {
    let bad = || EntityParseError::BadTuple(rest.to_string());
    let mut parts = Vec::new();
    for text in rest.split('+') {
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
    if parts.len() < 2 {
        return Err(bad());
    }
    Ok(EntityKey::Tuple(parts))
}

fn named_value(rest: &str) -> Result<(String, String), EntityParseError> {
    match rest.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_ascii_lowercase(), value.to_string()))
        }
        _ => Err(EntityParseError::BadNamedValue(rest.to_string())),
    }
}

impl FromStr for EntityKey {
    type Err = EntityParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| EntityParseError::MissingKind(s.to_string()))?;
        match kind.to_ascii_lowercase().as_str() {
            "ip" => rest
                .parse::<IpAddr>()
                .map(EntityKey::Ip)
                .map_err(|_| EntityParseError::BadIp(rest.to_string())),
            "cidr" | "net" => rest
                .parse::<IpNet>()
                .map(|n| EntityKey::Cidr(n.trunc()))
                .map_err(|_| EntityParseError::BadCidr(rest.to_string())),
            "header" => named_value(rest).map(|(name, value)| EntityKey::Header { name, value }),
            "cookie" => named_value(rest).map(|(name, value)| EntityKey::Cookie { name, value }),
            "tuple" => tuple(rest),
            other => Err(EntityParseError::UnknownKind(other.to_string())),
        }
    }
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
        ] {
            let key: EntityKey = s.parse().unwrap();
            assert_eq!(key.to_string(), s);
            let json = serde_json::to_string(&key).unwrap();
            assert_eq!(serde_json::from_str::<EntityKey>(&json).unwrap(), key);
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
        assert!(matches!(
            "mac:x".parse::<EntityKey>(),
            Err(EntityParseError::UnknownKind(_))
        ));
    }
}
