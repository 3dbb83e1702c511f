//! The policy types as written in TOML (and stored as JSON), and their validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PolicyError;
use super::advanced::{AggregateSpec, EscalationStep, SequenceStep};
use super::forms::{duration, number, opt_duration, opt_number};

/// Shortest and longest accepted `window`.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Shortest and longest accepted `ttl`.
pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// `ttl` when a policy does not set one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Longest accepted tarpit `delay` (a held connection costs the proxy a socket).
pub const MAX_DELAY: Duration = Duration::from_millis(esper_protocol::MAX_TARPIT_MS);
/// Largest accepted `threshold` and `rate`.
pub const MAX_COUNT: f64 = 1e12;
/// Largest accepted `burst`: the bound every publisher of a throttle checks.
pub const MAX_BURST: u32 = esper_protocol::mitigation::MAX_THROTTLE_BURST;
/// Longest policy and list id.
pub const MAX_ID_LEN: usize = 64;

/// One policy: which requests it counts, per which entity, over which window, and what
/// happens to an entity whose weighted count reaches the threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique id: 1 to 64 characters of `a-z`, `0-9`, `-` and `_`.
    pub id: String,
    /// What the policy is for, shown in listings and decisions.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Disabled policies are stored but not evaluated.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `enforce` publishes mitigations; `shadow` only records what it would have done.
    #[serde(default)]
    pub mode: PolicyMode,
    /// What is counted and mitigated: `ip`, `ip/N`, `header:NAME` or `cookie:NAME`.
    #[serde(default)]
    pub entity: EntitySpec,
    /// The sliding window the count covers, 1s to 24h. For a sequence (`within`), the
    /// time the whole sequence must fit in.
    #[serde(with = "duration", alias = "within")]
    pub window: Duration,
    /// The policy fires when the weighted count in the window reaches this.
    #[serde(serialize_with = "number")]
    pub threshold: f64,
    /// What the mitigation does: `block`, `throttle`, `tarpit` or `log`.
    pub action: ActionKind,
    /// Throttle only: requests per second the entity may still make.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "opt_number"
    )]
    pub rate: Option<f64>,
    /// Throttle only: burst allowance (default: `rate` rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Tarpit only: how long each request is held.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub delay: Option<Duration>,
    /// Challenge only: proof-of-work difficulty in bits, 1 to 24 (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<u8>,
    /// How long the mitigation stands (default 5m).
    #[serde(default = "default_ttl", with = "duration")]
    pub ttl: Duration,
    /// `global`, or `app:NAME` (the policy then only counts that app's requests and the
    /// mitigation only applies to it).
    #[serde(default)]
    pub scope: PolicyScope,
    /// Higher priorities are evaluated first, and their decisions come first when
    /// several policies decide on one event.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// A filter expression (see [`crate::expr`]); with `match`, both must hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Of the requests the policy matches, the ones that are counted (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count_if: Option<String>,
    /// What is measured over the window: `count` (default), `rate` (per second),
    /// `sum(FIELD)`, `distinct(FIELD)`.
    #[serde(default, skip_serializing_if = "AggregateSpec::is_count")]
    pub aggregate: AggregateSpec,
    /// Repeat offenders: each decision's ttl is the previous one's times this (>= 1).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "opt_number"
    )]
    pub ttl_growth: Option<f64>,
    /// The longest a grown ttl gets (default 30 days).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub ttl_max: Option<Duration>,
    /// Which requests count; every given condition must hold.
    #[serde(default, rename = "match", skip_serializing_if = "MatchSpec::is_empty")]
    pub matches: MatchSpec,
    /// Stronger actions for higher counts or repeat offenders.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escalation: Vec<EscalationStep>,
    /// An ordered pattern of conditions per entity; a completed pattern counts as one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sequence: Vec<SequenceStep>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

fn yes() -> bool {
    true
}

fn default_ttl() -> Duration {
    DEFAULT_TTL
}

/// Request conditions. All given conditions must hold; an absent (empty) one holds for
/// every request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// HTTP methods, case-insensitive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Exact paths (the query string is ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Path prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prefixes: Vec<String>,
    /// Response statuses: codes (`401`) or classes (`"5xx"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<StatusMatch>,
    /// Hosts, case-insensitive, any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Protected apps, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
    /// The user agent contains one of these, case-insensitive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_agent_contains: Vec<String>,
    /// The client address is in this named IP list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_in_list: Option<String>,
    /// The client address is not in this named IP list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_not_in_list: Option<String>,
}

impl MatchSpec {
    /// True when no condition is given (every request matches).
    pub fn is_empty(&self) -> bool {
        *self == MatchSpec::default()
    }
}

/// Whether a policy's decisions are enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyMode {
    #[default]
    Enforce,
    /// Decisions are recorded and counted, never published to proxies.
    Shadow,
}

/// The kind of mitigation a policy decides; its parameters are the policy's `rate`,
/// `burst` and `delay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActionKind {
    Block,
    Throttle,
    Tarpit,
    /// Answer with a proof-of-work page; a solved one earns a clearance cookie.
    Challenge,
    Log,
}

/// What a policy counts per.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum EntitySpec {
    /// The client address.
    #[default]
    Ip,
    /// The client's network: IPv4 clients by `/v4`, IPv6 clients by `/v6`.
    Network { v4: u8, v6: u8 },
    /// The value of a request header (name lower-cased).
    Header(String),
    /// The (hashed) value of a named cookie (name lower-cased).
    Cookie(String),
    /// The user agent (mitigated as `header:user-agent=VALUE`).
    UserAgent,
    /// The request path's template (`/users/{id}`: ids and tokens replaced, see
    /// `esper_protocol::path_template`), mitigated as `path:TEMPLATE`.
    PathTemplate,
    /// The JA4 fingerprint of the client's TLS ClientHello (`ja4:FINGERPRINT`); events
    /// without TLS are not counted.
    Ja4,
    /// A combination: counted and mitigated per tuple of values (`["ip",
    /// "user_agent"]`); events lacking one of them are not counted.
    Tuple(Vec<EntitySpec>),
}

/// IPv6 prefix used when `ip/N` gives only an IPv4 prefix: a /64 is what one
/// subscriber typically gets, as one IPv4 address is.
pub const DEFAULT_V6_PREFIX: u8 = 64;

/// Where a policy applies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyScope {
    #[default]
    Global,
    App(String),
}

/// One entry of `match.statuses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusMatch {
    /// One status code, 100 to 599.
    Code(u16),
    /// A class: `4` for `4xx`.
    Class(u8),
}

/// A validation failure: the key it concerns (`match.statuses`) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    /// Dotted path of the key; array items by index (`sequence.1.when`).
    pub key: String,
    pub message: String,
    /// For an expression, the byte offset of the error in it.
    pub offset: Option<usize>,
}

pub(super) fn field(key: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        key: key.into(),
        message: message.into(),
        offset: None,
    }
}

/// Is `s` a valid policy or list id?
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl PolicySpec {
    /// Checks every rule a policy must follow. The error names the policy.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.check().map_err(|e| PolicyError {
            line: None,
            column: None,
            policy: Some(self.id.clone()),
            message: e.message,
        })
    }

    /// The names of the lists the policy refers to.
    pub fn list_refs(&self) -> impl Iterator<Item = String> + use<> {
        let mut names: Vec<String> = self.typed_list_refs().into_iter().map(|(n, _)| n).collect();
        names.dedup();
        names.into_iter()
    }

    /// The lists the policy refers to, with the kind each use needs.
    pub fn typed_list_refs(&self) -> Vec<(String, super::ListKind)> {
        let mut out: Vec<(String, super::ListKind)> = self
            .matches
            .ip_in_list
            .iter()
            .chain(self.matches.ip_not_in_list.iter())
            .map(|n| (n.clone(), super::ListKind::Ip))
            .collect();
        let mut lists = crate::expr::Lists::new(None);
        for src in self.expressions() {
            // Invalid expressions are reported by validation; they refer to nothing.
            let _ = crate::expr::compile_filter(src, &mut lists);
        }
        for r in lists.refs {
            if !out.contains(&r) {
                out.push(r);
            }
        }
        out
    }

    /// Every expression of the policy: filter, count_if, sequence steps.
    pub fn expressions(&self) -> impl Iterator<Item = &str> {
        self.filter
            .iter()
            .chain(self.count_if.iter())
            .map(String::as_str)
            .chain(self.sequence.iter().map(|s| s.when.as_str()))
    }

    /// The throttle burst in force: `burst`, or `rate` rounded up (at least 1).
    pub fn effective_burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.rate.unwrap_or(1.0).ceil().clamp(1.0, MAX_BURST as f64) as u32)
    }

    pub(crate) fn check(&self) -> Result<(), FieldError> {
        if !is_valid_id(&self.id) {
            return Err(field(
                "id",
                format!(
                    "id \"{}\" must be 1 to {MAX_ID_LEN} characters of a-z, 0-9, '-' and '_'",
                    self.id
                ),
            ));
        }
        if self.window < MIN_WINDOW || self.window > MAX_WINDOW {
            return Err(field(
                "window",
                format!(
                    "window {} is out of range (1s to 24h)",
                    humantime::format_duration(self.window)
                ),
            ));
        }
        if !(self.threshold.is_finite() && self.threshold > 0.0 && self.threshold <= MAX_COUNT) {
            return Err(field(
                "threshold",
                format!(
                    "threshold {} must be above 0 (and at most 1e12)",
                    self.threshold
                ),
            ));
        }
        if self.ttl < MIN_TTL || self.ttl > MAX_TTL {
            return Err(field(
                "ttl",
                format!(
                    "ttl {} is out of range (1s to 30days)",
                    humantime::format_duration(self.ttl)
                ),
            ));
        }
        check_action(
            self.action,
            self.rate,
            self.burst,
            self.delay,
            self.difficulty,
            "",
        )?;
        self.check_advanced()?;
        if let PolicyScope::App(app) = &self.scope
            && !self.matches.apps.is_empty()
            && !self.matches.apps.iter().any(|a| a == app)
        {
            return Err(field(
                "match.apps",
                format!(
                    "match.apps does not include \"{app}\", the app of the policy's scope, so the policy could never match"
                ),
            ));
        }
        self.matches.check()
    }
}

/// Highest challenge difficulty: beyond it a browser needs minutes (the proxy caps it too).
pub const MAX_DIFFICULTY: u8 = esper_protocol::MAX_CHALLENGE_DIFFICULTY;
/// Difficulty of a challenge policy that names none: well under a second in a browser.
pub const DEFAULT_DIFFICULTY: u8 = 16;

/// Checks an action and its parameters; `prefix` is prepended to keys
/// (`escalation.0.`).
pub(super) fn check_action(
    action: ActionKind,
    rate: Option<f64>,
    burst: Option<u32>,
    delay: Option<Duration>,
    difficulty: Option<u8>,
    prefix: &str,
) -> Result<(), FieldError> {
    let field = |key: &str, message: &str| field(format!("{prefix}{key}"), message);
    match (action == ActionKind::Challenge, difficulty) {
        (true, Some(d)) if d == 0 || d > MAX_DIFFICULTY => {
            return Err(field(
                "difficulty",
                &format!("difficulty {d} is out of range (1 to {MAX_DIFFICULTY})"),
            ));
        }
        (false, Some(_)) => {
            return Err(field(
                "difficulty",
                "`difficulty` only applies to action challenge",
            ));
        }
        _ => {}
    }
    {
        let throttle = action == ActionKind::Throttle;
        match (throttle, rate) {
            (true, None) => {
                return Err(field(
                    "action",
                    "action throttle needs `rate` (requests per second)",
                ));
            }
            (true, Some(rate)) if !(rate.is_finite() && rate > 0.0 && rate <= MAX_COUNT) => {
                return Err(field(
                    "rate",
                    &format!(
                        "rate {rate} must be above 0 requests per second (at most {MAX_COUNT:e})"
                    ),
                ));
            }
            (false, Some(_)) => {
                return Err(field("rate", "`rate` only applies to action throttle"));
            }
            _ => {}
        }
        match (throttle, burst) {
            (true, Some(b)) if b == 0 || b > MAX_BURST => {
                return Err(field(
                    "burst",
                    &format!("burst {b} must be 1 to {MAX_BURST}"),
                ));
            }
            (false, Some(_)) => {
                return Err(field("burst", "`burst` only applies to action throttle"));
            }
            _ => {}
        }
        match (action == ActionKind::Tarpit, delay) {
            (true, None) => Err(field(
                "action",
                "action tarpit needs `delay` (how long each request is held)",
            )),
            (true, Some(d)) if d < Duration::from_millis(1) || d > MAX_DELAY => Err(field(
                "delay",
                &format!(
                    "delay {} is out of range (1ms to 60s)",
                    humantime::format_duration(d)
                ),
            )),
            (false, Some(_)) => Err(field("delay", "`delay` only applies to action tarpit")),
            _ => Ok(()),
        }
    }
}

impl MatchSpec {
    fn check(&self) -> Result<(), FieldError> {
        if let Some(m) = self.methods.iter().find(|m| !is_token(m)) {
            return Err(field(
                "match.methods",
                format!("\"{m}\" is not an HTTP method"),
            ));
        }
        for (key, list) in [
            ("match.paths", &self.paths),
            ("match.path_prefixes", &self.path_prefixes),
        ] {
            if let Some(p) = list.iter().find(|p| !p.starts_with('/')) {
                return Err(field(key, format!("path \"{p}\" must start with '/'")));
            }
            // Requests are matched by their path alone, in the form servers resolve it
            // to: an entry in another form would never match.
            if let Some(p) = list.iter().find(|p| p.contains(['?', '#'])) {
                return Err(field(
                    key,
                    format!(
                        "path \"{p}\" has a query or fragment: paths are matched without them \
                         (use `query` in a filter)"
                    ),
                ));
            }
            for p in list {
                let normal = esper_protocol::normalize_path(p);
                if normal != p.as_str() {
                    return Err(field(
                        key,
                        format!(
                            "path \"{p}\" is matched as servers resolve it: write \"{normal}\""
                        ),
                    ));
                }
            }
        }
        for h in &self.hosts {
            let bare = crate::expr::host_only(h.trim());
            if bare != h.trim() {
                return Err(field(
                    "match.hosts",
                    format!(
                        "host \"{h}\" is matched without its port (any port): write \"{bare}\""
                    ),
                ));
            }
        }
        for (key, list) in [
            ("match.hosts", &self.hosts),
            ("match.apps", &self.apps),
            ("match.user_agent_contains", &self.user_agent_contains),
        ] {
            if list.iter().any(|s| s.trim().is_empty()) {
                return Err(field(key, format!("{key} has an empty entry")));
            }
        }
        for (key, list) in [
            ("match.ip_in_list", &self.ip_in_list),
            ("match.ip_not_in_list", &self.ip_not_in_list),
        ] {
            if let Some(name) = list.as_deref().filter(|n| !is_valid_id(n)) {
                return Err(field(
                    key,
                    format!(
                        "list name \"{name}\" must be 1 to {MAX_ID_LEN} characters of a-z, 0-9, '-' and '_'"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl StatusMatch {
    /// Does `status` match?
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Code(c) => c == status,
            StatusMatch::Class(c) => status / 100 == u16::from(c),
        }
    }
}
