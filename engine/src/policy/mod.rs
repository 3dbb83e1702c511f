//! Policies v1: the TOML policy language, its validation, and the lists policies use.
//!
//! A policy file is a TOML document of `[[policy]]` tables. Each policy counts the
//! requests that match its conditions, per entity (an address, a network, a header or
//! cookie value), in a sliding window of event time; when an entity's weighted count
//! reaches the threshold, the policy decides a mitigation against that entity for `ttl`.
//! Events carry `weight = 1 / sample rate`, so a threshold means real requests even when
//! proxies sample.
//!
//! ```toml
//! [[policy]]
//! id = "login-brute-force"        # required; a-z, 0-9, '-' and '_', 1 to 64 chars, unique
//! description = "Repeated failed logins from one address"
//! enabled = true                  # default true; disabled policies are kept, not evaluated
//! mode = "enforce"                # enforce (default) | shadow: recorded, never enforced
//! entity = "ip"                   # default "ip"; see "Entities" below
//! window = "60s"                  # required; sliding window, 1s to 24h
//! threshold = 10                  # required; fires when the weighted count reaches it
//! action = "block"                # required; block | throttle | tarpit | challenge | log
//! ttl = "5m"                      # default 5m; how long the mitigation stands, 1s to 30days
//! scope = "global"                # global (default) | app:NAME
//!
//! [policy.match]                  # every given condition must hold; none given = any request
//! methods = ["POST"]              # case-insensitive
//! paths = ["/login"]              # exact, in normal form; the query string is ignored
//! path_prefixes = ["/api/"]
//! statuses = [401, "5xx"]         # codes or classes
//! hosts = ["shop.example"]        # case-insensitive; any port
//! apps = ["shop"]
//! user_agent_contains = ["curl", "python-requests"]   # case-insensitive substrings
//! ip_in_list = "office"           # a named IP list (CIDRs) of the control plane
//! ip_not_in_list = "partners"
//!
//! [[policy]]
//! id = "api-scrapers"
//! entity = "header:x-api-key"     # count per API key
//! window = "1m"
//! threshold = 600
//! action = "throttle"
//! rate = 5                        # throttle only: requests per second still allowed
//! burst = 10                      # throttle only: default rate rounded up
//! [policy.match]
//! path_prefixes = ["/api/"]
//!
//! [[policy]]
//! id = "scanner-tarpit"
//! mode = "shadow"
//! entity = "ip/24"
//! window = "10m"
//! threshold = 50
//! action = "tarpit"
//! delay = "2s"                    # tarpit only: how long each request is held, 1ms to 60s
//! # difficulty = 16               # challenge only: proof-of-work bits, 1 to 24 (default 16)
//! [policy.match]
//! statuses = [404]
//! ```
//!
//! Entities:
//! - `ip`: the client address.
//! - `ip/N`: the client's network. With N from 8 to 32, IPv4 clients are grouped by
//!   /N and IPv6 clients by /64 (what one subscriber usually holds); with N from 33 to
//!   128, IPv6 clients are grouped by /N and IPv4 clients are counted per address.
//!   `ip/V4,V6` sets both (`ip/24,48`). The mitigation is against the network
//!   (`cidr:203.0.113.0/24`).
//! - `header:NAME`: the value of a request header the proxy reports. Requests without
//!   the header are not counted.
//! - `cookie:NAME`: the (hashed) value of a named cookie. Requests without it are not
//!   counted.
//!
//! - `user_agent`: the user agent (mitigated as `header:user-agent=VALUE`).
//! - a list of these, `["ip", "user_agent"]`: counted and mitigated per combination
//!   (`tuple:ip:203.0.113.7+header:user-agent=curl/8.5`); the proxy applies it to
//!   requests that match every part.
//!
//! Expressions, aggregates, escalation and sequences:
//!
//! ```toml
//! [[policy]]
//! id = "credential-stuffing"
//! priority = 10                   # higher first; default 0
//! window = "10m"
//! threshold = 20
//! filter = 'method == "POST" && path == "/login"'     # see crate::expr; with `match`, both hold
//! count_if = 'status == 401'      # of the matched requests, which count (default: all)
//! aggregate = 'distinct(headers["x-login-user"])'      # count | rate | sum(FIELD) | distinct(FIELD)
//! action = "throttle"
//! rate = 1
//! ttl = "10m"
//! ttl_growth = 2.0                # repeat offenders: each decision's ttl doubles...
//! ttl_max = "24h"                 # ...up to this
//!
//! [[policy.escalation]]           # rungs above the policy's own action; the last that applies wins
//! threshold = 50                  # reached while a decision stands: escalate at once
//! action = "block"
//! ttl = "1h"
//!
//! [[policy.escalation]]
//! repeat = 3                      # from the third decision against the same entity on
//! action = "block"
//! ttl = "6h"
//!
//! [[policy]]
//! id = "login-after-failures"
//! within = "10m"                  # = window: the whole sequence must fit in it
//! threshold = 1                   # completed sequences in the window
//! action = "log"
//! sequence = [
//!   { when = 'path == "/login" && status == 401', min = 5 },
//!   { when = 'path == "/login" && status == 200' },
//! ]
//! ```
//!
//! `rate` is the weighted count per second over the window; `sum(bytes)` adds a field
//! times the weight; `distinct(path)` counts different values (exactly, up to 4096 per
//! entity; weights do not apply). Requests that match `filter` but not `count_if` add
//! nothing, yet once a decision has expired they let the policy decide again if the
//! count is still at the threshold. Offenses are remembered for the state TTL.
//!
//! `scope = "app:NAME"` also restricts the policy to that app's requests. Durations
//! are humantime strings (`"500ms"`, `"90s"`, `"5m"`, `"1h"`) or bare numbers of
//! seconds. The same shape, as JSON, is how the control plane stores policies and sends
//! them to workers (see [`ActivePolicies`]).
//!
//! Errors name the line, the column and the policy (inside an expression, the column
//! of the offending token):
//! `line 7, column 10: policy "login": unknown action "blok" (expected block, throttle, tarpit, challenge or log)`.

mod advanced;
mod forms;
mod list;
mod locate;
mod spec;

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use advanced::{AggregateSpec, EscalationStep, MAX_DISTINCT, SequenceStep};
pub use list::{
    ALLOWLIST, ActivePolicies, ListKind, MAX_LIST_ITEMS, NamedList, parse_net, validate_references,
};
pub use spec::{
    ActionKind, DEFAULT_DIFFICULTY, DEFAULT_TTL, DEFAULT_V6_PREFIX, EntitySpec, MAX_BURST,
    MAX_DIFFICULTY, MAX_TTL, MatchSpec, PolicyMode, PolicyScope, PolicySpec, StatusMatch,
    is_valid_id,
};

/// Why a policy document or a policy is not valid. Line and column (1-based) are given
/// when the error was found in TOML text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The id of the policy the error concerns, when known.
    pub policy: Option<String>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: ")?,
            (Some(l), None) => write!(f, "line {l}: ")?,
            _ => {}
        }
        if let Some(p) = &self.policy {
            write!(f, "policy \"{p}\": ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    policy: Vec<PolicySpec>,
}

/// Parses a document of `[[policy]]` tables and validates every policy; ids must be
/// unique. The first error found is returned, with its position.
pub fn parse_policies(toml_text: &str) -> Result<Vec<PolicySpec>, PolicyError> {
    let doc: Document = match toml::from_str(toml_text) {
        Ok(doc) => doc,
        Err(e) => return Err(locate::syntax_error(toml_text, &e)),
    };
    let mut seen = HashSet::new();
    for (index, policy) in doc.policy.iter().enumerate() {
        if let Err(e) = policy.check() {
            return Err(locate::field_error(toml_text, index, &policy.id, e));
        }
        if !seen.insert(policy.id.as_str()) {
            let e = spec::field("id", "another policy already has this id");
            return Err(locate::field_error(toml_text, index, &policy.id, e));
        }
    }
    Ok(doc.policy)
}

/// Renders policies as a TOML document that [`parse_policies`] reads back unchanged.
pub fn policies_to_toml(policies: &[PolicySpec]) -> String {
    let doc = Document {
        policy: policies.to_vec(),
    };
    match toml::to_string(&doc) {
        Ok(text) => text,
        // Every field has a TOML form; this only guards against a future field that
        // has none.
        Err(e) => format!("# cannot render policies as TOML: {e}\n"),
    }
}

#[cfg(test)]
mod tests;
