//! The written forms of policy values: `"enforce"`, `"ip/24"`, `"app:shop"`, `"5xx"`,
//! durations such as `"90s"`, and numbers written as integers when whole. Parsing goes
//! through `FromStr`, so TOML and JSON errors carry the same wording.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::spec::{
    ActionKind, DEFAULT_V6_PREFIX, EntitySpec, PolicyMode, PolicyScope, StatusMatch, is_token,
};

impl FromStr for PolicyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(PolicyMode::Enforce),
            "shadow" => Ok(PolicyMode::Shadow),
            other => Err(format!(
                "unknown mode \"{other}\" (expected enforce or shadow)"
            )),
        }
    }
}

impl fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyMode::Enforce => "enforce",
            PolicyMode::Shadow => "shadow",
        })
    }
}

impl FromStr for ActionKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "block" => Ok(ActionKind::Block),
            "throttle" => Ok(ActionKind::Throttle),
            "tarpit" => Ok(ActionKind::Tarpit),
            "challenge" => Ok(ActionKind::Challenge),
            "log" => Ok(ActionKind::Log),
            other => Err(format!(
                "unknown action \"{other}\" (expected block, throttle, tarpit, challenge or log)"
            )),
        }
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActionKind::Block => "block",
            ActionKind::Throttle => "throttle",
            ActionKind::Tarpit => "tarpit",
            ActionKind::Challenge => "challenge",
            ActionKind::Log => "log",
        })
    }
}

const ENTITY_HELP: &str = "expected ip, ip/N, ip/V4,V6, header:NAME, cookie:NAME, user_agent, path, ja4 or a list of these";

/// Most parts of a tuple entity.
pub const MAX_TUPLE: usize = 4;

fn prefix(s: &str, max: u8, min: u8, family: &str) -> Result<u8, String> {
    match s.trim().parse::<u8>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "entity prefix \"{s}\" is not an {family} prefix length ({min} to {max})"
        )),
    }
}

impl FromStr for EntitySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "ip" {
            return Ok(EntitySpec::Ip);
        }
        if s == "user_agent" || s == "user-agent" {
            return Ok(EntitySpec::UserAgent);
        }
        if s == "path" || s == "path_template" {
            return Ok(EntitySpec::PathTemplate);
        }
        if s == "ja4" || s == "tls_fingerprint" {
            return Ok(EntitySpec::Ja4);
        }
        if s.contains('+') {
            return tuple(s.split('+').map(str::trim).map(str::to_string).collect());
        }
        if let Some(rest) = s.strip_prefix("ip/") {
            return match rest.split_once(',') {
                Some((v4, v6)) => Ok(EntitySpec::Network {
                    v4: prefix(v4, 32, 8, "IPv4")?,
                    v6: prefix(v6, 128, 16, "IPv6")?,
                }),
                None => match rest.trim().parse::<u8>() {
                    Ok(n @ 8..=32) => Ok(EntitySpec::Network {
                        v4: n,
                        v6: DEFAULT_V6_PREFIX,
                    }),
                    Ok(n @ 33..=128) => Ok(EntitySpec::Network { v4: 32, v6: n }),
                    _ => Err(format!(
                        "entity prefix \"{rest}\" is not a prefix length (8 to 32 for IPv4, 33 to 128 for IPv6)"
                    )),
                },
            };
        }
        let named = |kind: &str, name: &str| -> Result<String, String> {
            if is_token(name) {
                Ok(name.to_ascii_lowercase())
            } else {
                Err(format!(
                    "entity \"{s}\" needs a {kind} name ({ENTITY_HELP})"
                ))
            }
        };
        if let Some(name) = s.strip_prefix("header:") {
            return named("header", name).map(EntitySpec::Header);
        }
        if let Some(name) = s.strip_prefix("cookie:") {
            return named("cookie", name).map(EntitySpec::Cookie);
        }
        Err(format!("unknown entity \"{s}\" ({ENTITY_HELP})"))
    }
}

impl fmt::Display for EntitySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntitySpec::Ip => f.write_str("ip"),
            EntitySpec::Network { v4, v6 } if *v6 == DEFAULT_V6_PREFIX => write!(f, "ip/{v4}"),
            EntitySpec::Network { v4: 32, v6 } => write!(f, "ip/{v6}"),
            EntitySpec::Network { v4, v6 } => write!(f, "ip/{v4},{v6}"),
            EntitySpec::Header(name) => write!(f, "header:{name}"),
            EntitySpec::Cookie(name) => write!(f, "cookie:{name}"),
            EntitySpec::UserAgent => f.write_str("user_agent"),
            EntitySpec::PathTemplate => f.write_str("path"),
            EntitySpec::Ja4 => f.write_str("ja4"),
            EntitySpec::Tuple(parts) => {
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str("+")?;
                    }
                    write!(f, "{p}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for PolicyScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "global" {
            return Ok(PolicyScope::Global);
        }
        match s.strip_prefix("app:") {
            Some(app) if !app.trim().is_empty() => Ok(PolicyScope::App(app.to_string())),
            _ => Err(format!(
                "unknown scope \"{s}\" (expected global or app:NAME)"
            )),
        }
    }
}

impl fmt::Display for PolicyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyScope::Global => f.write_str("global"),
            PolicyScope::App(app) => write!(f, "app:{app}"),
        }
    }
}

impl FromStr for StatusMatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("status \"{s}\" is not a code (100 to 599) or a class (1xx to 5xx)");
        let lower = s.to_ascii_lowercase();
        if let Some(class) = lower.strip_suffix("xx") {
            return match class.parse::<u8>() {
                Ok(c @ 1..=5) => Ok(StatusMatch::Class(c)),
                _ => Err(bad()),
            };
        }
        match s.parse::<u16>() {
            Ok(code @ 100..=599) => Ok(StatusMatch::Code(code)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for StatusMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusMatch::Code(c) => write!(f, "{c}"),
            StatusMatch::Class(c) => write!(f, "{c}xx"),
        }
    }
}

/// Serde as the string form (`Display` / `FromStr`), so errors carry our own wording.
macro_rules! string_serde {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

string_serde!(PolicyMode, ActionKind, PolicyScope);

/// A tuple entity from its parts' written forms.
fn tuple(parts: Vec<String>) -> Result<EntitySpec, String> {
    if !(2..=MAX_TUPLE).contains(&parts.len()) {
        return Err(format!("a tuple entity has 2 to {MAX_TUPLE} parts"));
    }
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        if p.contains('+') {
            return Err(format!("tuple part \"{p}\" cannot itself be a tuple"));
        }
        let spec: EntitySpec = p.parse()?;
        if out.contains(&spec) {
            return Err(format!("tuple part \"{p}\" is repeated"));
        }
        out.push(spec);
    }
    Ok(EntitySpec::Tuple(out))
}

/// An entity is a string, or a list of strings for a tuple.
impl Serialize for EntitySpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EntitySpec::Tuple(parts) => s.collect_seq(parts.iter().map(|p| p.to_string())),
            other => s.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for EntitySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EntitySpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an entity (\"ip\", \"header:NAME\", ...) or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EntitySpec, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<EntitySpec, A::Error> {
                let mut parts = Vec::new();
                while let Some(p) = seq.next_element::<String>()? {
                    parts.push(p);
                }
                tuple(parts).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for StatusMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StatusMatch::Code(c) => s.serialize_u16(*c),
            StatusMatch::Class(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for StatusMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StatusMatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status code (401) or class (\"5xx\")")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StatusMatch, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StatusMatch, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StatusMatch, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Writes whole numbers as integers (`threshold = 10`, not `10.0`).
pub(super) fn number<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

pub(super) fn opt_number<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => number(v, s),
        None => s.serialize_none(),
    }
}

/// Durations: a humantime string (`"90s"`, `"5m"`) or a bare number of seconds.
pub(super) mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(Visitor)
    }

    pub(super) struct Visitor;

    impl serde::de::Visitor<'_> for Visitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"30s\", \"5m\" or \"1h\"")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("duration {v} must not be negative")))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v.trim()).map_err(|e| {
                E::custom(format!(
                    "invalid duration \"{v}\": {e} (write e.g. 30s, 5m, 1h)"
                ))
            })
        }
    }
}

pub(super) mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    struct Wrapped(Duration);

    impl<'de> Deserialize<'de> for Wrapped {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::duration::deserialize(d).map(Wrapped)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}
