//! The filter language: CEL-style boolean expressions over request events, compiled once
//! into a tree of typed conditions whose evaluation allocates nothing.
//!
//! ```text
//! method == "POST" && path == "/login" && status in [401, 403]
//! path.startsWith("/api/") && !(client_ip in list("office"))
//! headers["x-api-key"] != "" && user_agent.lowerAscii().contains("python")
//! path.matches("\\.(php|asp)$") || client_ip.in_cidr("10.0.0.0/8")
//! "x-api-key" in headers && latency_us > 500000
//! ```
//!
//! Fields: strings `method`, `path` (without the query), `query`, `host` (without the
//! port), `app`, `user_agent`, `proxy_id`, `tls_version`, `tls_fingerprint`, `action`
//! (what the proxy did: `allow`, `block`, `throttle`, `tarpit`, `challenge`, `log`),
//! `headers["name"]`, `cookies["name"]` (an absent one is `""`); numbers `status`,
//! `latency_us`, `bytes`, `weight`, `size(s)` / `s.size()`; the address `client_ip`.
//!
//! Operators: `==`, `!=`, `<`, `<=`, `>`, `>=` (numbers), `&&`, `||`, `!`, parentheses,
//! `x in [..]` (strings, numbers, or addresses and CIDRs for `client_ip`),
//! `x in list("name")` (a named list of the control plane: an IP list for `client_ip`,
//! a string list for strings), `"name" in headers` / `has(headers["name"])`,
//! `s.startsWith(..)`, `s.endsWith(..)`, `s.contains(..)`, `s.matches(regex)`,
//! `s.lowerAscii()` (case-insensitive comparison; no copy is made),
//! `client_ip.in_cidr("10.0.0.0/8")`.
//!
//! Every comparison sets a field against a constant; two fields cannot be compared.

mod compile;
mod lex;
mod parse;

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use esper_protocol::RequestEvent;
use ipnet::IpNet;

pub use compile::{Lists, compile_filter, compile_value};

/// Why an expression does not compile: the message and the byte offset in the
/// expression it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExprError {
    pub offset: usize,
    pub message: String,
}

impl ExprError {
    pub(crate) fn new(offset: usize, message: impl Into<String>) -> ExprError {
        ExprError {
            offset,
            message: message.into(),
        }
    }
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at offset {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for ExprError {}

/// A string field of an event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StrField {
    Method,
    Path,
    Query,
    Host,
    App,
    UserAgent,
    ProxyId,
    TlsVersion,
    TlsFingerprint,
    /// What the proxy did with the request: `allow`, `block`, `throttle`, `tarpit`,
    /// `challenge` or `log`.
    Action,
    Header(Box<str>),
    Cookie(Box<str>),
}

impl StrField {
    /// The field's value; `None` when the event does not have it.
    #[inline]
    pub fn get<'a>(&self, ev: &'a RequestEvent) -> Option<&'a str> {
        match self {
            StrField::Method => Some(&ev.method),
            StrField::Path => Some(ev.path.split_once('?').map_or(ev.path.as_str(), |(p, _)| p)),
            StrField::Query => Some(ev.path.split_once('?').map_or("", |(_, q)| q)),
            StrField::Host => Some(host_only(&ev.host)),
            StrField::App => Some(&ev.app),
            StrField::UserAgent => ev.user_agent.as_deref(),
            StrField::ProxyId => Some(&ev.proxy_id),
            StrField::TlsVersion => ev.tls.as_ref().map(|t| t.version.as_str()),
            StrField::TlsFingerprint => ev.tls.as_ref().and_then(|t| t.fingerprint.as_deref()),
            StrField::Action => Some(ev.action.as_str()),
            StrField::Header(name) => ev.headers.get(&**name).map(String::as_str),
            StrField::Cookie(name) => ev.cookies.get(&**name).map(String::as_str),
        }
    }

    /// The value, or `""` when absent.
    #[inline]
    pub fn value<'a>(&self, ev: &'a RequestEvent) -> &'a str {
        self.get(ev).unwrap_or("")
    }
}

/// The host without its port (`shop.example:8000`, `[::1]:8000`).
pub fn host_only(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A numeric field of an event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NumField {
    Status,
    LatencyUs,
    Bytes,
    Weight,
    /// The length in bytes of a string field.
    Size(StrField),
}

impl NumField {
    #[inline]
    pub fn get(&self, ev: &RequestEvent) -> f64 {
        match self {
            NumField::Status => f64::from(ev.status),
            NumField::LatencyUs => ev.latency_us as f64,
            NumField::Bytes => ev.bytes as f64,
            NumField::Weight => ev.weight,
            NumField::Size(f) => f.value(ev).len() as f64,
        }
    }
}

/// A value an aggregate reads from an event: `distinct(path)`, `sum(bytes)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ValueField {
    Str(StrField),
    Num(NumField),
    ClientIp,
}

impl ValueField {
    /// A 64-bit fingerprint of the value (FNV-1a), for distinct counts; `None` when the
    /// event lacks the field or it is empty.
    pub fn fingerprint(&self, ev: &RequestEvent) -> Option<u64> {
        match self {
            ValueField::Str(f) => f
                .get(ev)
                .filter(|s| !s.is_empty())
                .map(|s| fnv1a(s.as_bytes())),
            ValueField::Num(f) => Some(fnv1a(&f.get(ev).to_bits().to_le_bytes())),
            ValueField::ClientIp => Some(match ev.client_ip.to_canonical() {
                IpAddr::V4(a) => fnv1a(&a.octets()),
                IpAddr::V6(a) => fnv1a(&a.octets()),
            }),
        }
    }

    /// The numeric value, for sums (a string field counts its length).
    pub fn number(&self, ev: &RequestEvent) -> f64 {
        match self {
            ValueField::Num(f) => f.get(ev),
            ValueField::Str(f) => f.value(ev).len() as f64,
            ValueField::ClientIp => 0.0,
        }
    }
}

/// FNV-1a, the same in every process.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A comparison of a number with a constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    #[inline]
    fn test(self, a: f64, b: f64) -> bool {
        match self {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
        }
    }
}

/// A set of strings: a short list is scanned, a long one hashed.
#[derive(Clone, Debug)]
pub enum StrSet {
    Few(Box<[Box<str>]>),
    Many(HashSet<Box<str>>),
}

impl StrSet {
    /// Most items kept in a list that is scanned rather than hashed.
    const FEW: usize = 8;

    pub fn new(items: Vec<String>) -> StrSet {
        if items.len() <= Self::FEW {
            StrSet::Few(items.into_iter().map(String::into_boxed_str).collect())
        } else {
            StrSet::Many(items.into_iter().map(String::into_boxed_str).collect())
        }
    }

    #[inline]
    fn contains(&self, s: &str, fold: bool) -> bool {
        match self {
            StrSet::Few(items) if fold => items.iter().any(|i| i.eq_ignore_ascii_case(s)),
            StrSet::Few(items) => items.iter().any(|i| **i == *s),
            // Items of a folded set are stored lower-case; the check then scans.
            StrSet::Many(set) if fold => set.iter().any(|i| i.eq_ignore_ascii_case(s)),
            StrSet::Many(set) => set.contains(s),
        }
    }
}

/// A set of addresses and networks.
#[derive(Clone, Debug, Default)]
pub struct IpSet {
    addrs: HashSet<IpAddr>,
    nets: Vec<IpNet>,
}

impl IpSet {
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> IpSet {
        let mut set = IpSet::default();
        for n in nets {
            if n.prefix_len() == n.max_prefix_len() {
                set.addrs.insert(n.addr());
            } else {
                set.nets.push(n);
            }
        }
        set
    }

    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.addrs.contains(&ip) || self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// Which string test a [`Cond::Str`] makes.
#[derive(Clone, Debug)]
pub enum StrTest {
    Eq(Box<str>),
    In(StrSet),
    StartsWith(Box<str>),
    EndsWith(Box<str>),
    Contains(Box<str>),
    Matches(regex::Regex),
    /// The field is present (a header, cookie, user agent or TLS fingerprint).
    Present,
}

/// A compiled condition.
#[derive(Clone, Debug)]
pub enum Cond {
    Const(bool),
    And(Box<[Cond]>),
    Or(Box<[Cond]>),
    Not(Box<Cond>),
    /// A string test; `fold` makes it ASCII case-insensitive (needles are lower-case).
    Str {
        field: StrField,
        fold: bool,
        test: StrTest,
    },
    Num(NumField, CmpOp, f64),
    NumIn(NumField, Box<[f64]>),
    Ip(IpSet),
}

fn starts_with_fold(h: &str, n: &str) -> bool {
    h.len() >= n.len() && h.as_bytes()[..n.len()].eq_ignore_ascii_case(n.as_bytes())
}

fn ends_with_fold(h: &str, n: &str) -> bool {
    h.len() >= n.len() && h.as_bytes()[h.len() - n.len()..].eq_ignore_ascii_case(n.as_bytes())
}

/// Case-insensitive substring test.
pub fn contains_fold(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || (h.len() >= n.len() && h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n)))
}

impl Cond {
    /// Does the event satisfy the condition? `ip` is the event's canonical client address.
    pub fn eval(&self, ev: &RequestEvent, ip: IpAddr) -> bool {
        match self {
            Cond::Const(b) => *b,
            Cond::And(items) => items.iter().all(|c| c.eval(ev, ip)),
            Cond::Or(items) => items.iter().any(|c| c.eval(ev, ip)),
            Cond::Not(c) => !c.eval(ev, ip),
            Cond::Str { field, fold, test } => {
                let v = field.get(ev);
                if let StrTest::Present = test {
                    return v.is_some_and(|s| !s.is_empty());
                }
                let v = v.unwrap_or("");
                match (test, *fold) {
                    (StrTest::Eq(s), false) => v == &**s,
                    (StrTest::Eq(s), true) => v.eq_ignore_ascii_case(s),
                    (StrTest::In(set), fold) => set.contains(v, fold),
                    (StrTest::StartsWith(s), false) => v.starts_with(&**s),
                    (StrTest::StartsWith(s), true) => starts_with_fold(v, s),
                    (StrTest::EndsWith(s), false) => v.ends_with(&**s),
                    (StrTest::EndsWith(s), true) => ends_with_fold(v, s),
                    (StrTest::Contains(s), false) => v.contains(&**s),
                    (StrTest::Contains(s), true) => contains_fold(v, s),
                    (StrTest::Matches(re), _) => re.is_match(v),
                    (StrTest::Present, _) => false,
                }
            }
            Cond::Num(field, op, c) => op.test(field.get(ev), *c),
            Cond::NumIn(field, values) => {
                let v = field.get(ev);
                values.contains(&v)
            }
            Cond::Ip(set) => set.contains(ip),
        }
    }
}

/// The request headers and cookies something reads by name (lower-case), which a proxy
/// must report for it to see them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    pub headers: std::collections::BTreeSet<String>,
    pub cookies: std::collections::BTreeSet<String>,
}

impl Reads {
    fn field(&mut self, field: &StrField) {
        match field {
            StrField::Header(name) => {
                self.headers.insert(name.to_ascii_lowercase());
            }
            StrField::Cookie(name) => {
                self.cookies.insert(name.to_ascii_lowercase());
            }
            _ => {}
        }
    }

    fn num(&mut self, field: &NumField) {
        if let NumField::Size(f) = field {
            self.field(f);
        }
    }

    /// Adds what `value` reads.
    pub fn value(&mut self, value: &ValueField) {
        match value {
            ValueField::Str(f) => self.field(f),
            ValueField::Num(f) => self.num(f),
            ValueField::ClientIp => {}
        }
    }

    /// Adds what `cond` reads.
    pub fn cond(&mut self, cond: &Cond) {
        match cond {
            Cond::And(items) | Cond::Or(items) => items.iter().for_each(|c| self.cond(c)),
            Cond::Not(c) => self.cond(c),
            Cond::Str { field, .. } => self.field(field),
            Cond::Num(field, ..) | Cond::NumIn(field, _) => self.num(field),
            Cond::Const(_) | Cond::Ip(_) => {}
        }
    }
}

/// A compiled filter and its source, ready to evaluate.
#[derive(Clone, Debug)]
pub struct Filter {
    pub source: String,
    pub cond: Cond,
}

impl Filter {
    #[inline]
    pub fn eval(&self, ev: &RequestEvent, ip: IpAddr) -> bool {
        self.cond.eval(ev, ip)
    }
}

#[cfg(test)]
mod tests;
