//! Policies compiled once into matchers: upper/lower-cased strings, parsed networks,
//! status bitsets and compiled filter expressions, so matching an event allocates
//! nothing.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use esper_protocol::{Action, DecisionMode, EntityKey, RequestEvent, Scope, path_template};
use ipnet::IpNet;

use super::state::{PolicyKey, Rules, Rung};
use super::window::WindowParams;
use crate::expr::{
    Cond, IpSet, Lists, Reads, ValueField, compile_filter, contains_fold, host_only,
};
use crate::policy::{
    ActionKind, ActivePolicies, AggregateSpec, EntitySpec, ListKind, NamedList, PolicyMode,
    PolicyScope, PolicySpec, StatusMatch,
};

/// Statuses 0..640 as a bitset.
#[derive(Clone, Debug, Default, PartialEq)]
struct StatusSet([u64; 10]);

impl StatusSet {
    fn insert(&mut self, code: u16) {
        if let Some(word) = self.0.get_mut(usize::from(code / 64)) {
            *word |= 1 << (code % 64);
        }
    }

    fn contains(&self, code: u16) -> bool {
        self.0
            .get(usize::from(code / 64))
            .is_some_and(|w| w & (1 << (code % 64)) != 0)
    }
}

/// The request conditions of one policy.
#[derive(Clone, Debug, Default)]
struct Matcher {
    methods: Vec<String>,
    paths: Vec<String>,
    prefixes: Vec<String>,
    statuses: Option<StatusSet>,
    hosts: Vec<String>,
    apps: Vec<String>,
    user_agents: Vec<String>,
    ip_in: Option<Vec<IpNet>>,
    ip_not_in: Option<Vec<IpNet>>,
}

fn in_nets(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

impl Matcher {
    fn matches(&self, ev: &RequestEvent, ip: IpAddr) -> bool {
        if !self.methods.is_empty()
            && !self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(&ev.method))
        {
            return false;
        }
        if !self.apps.is_empty() && !self.apps.contains(&ev.app) {
            return false;
        }
        if let Some(statuses) = &self.statuses
            && !statuses.contains(ev.status)
        {
            return false;
        }
        let path = ev.path.split('?').next().unwrap_or("");
        if !self.paths.is_empty() && !self.paths.iter().any(|p| p == path) {
            return false;
        }
        if !self.prefixes.is_empty() && !self.prefixes.iter().any(|p| path.starts_with(p.as_str()))
        {
            return false;
        }
        if !self.hosts.is_empty() {
            let host = host_only(&ev.host);
            if !self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
                return false;
            }
        }
        if !self.user_agents.is_empty() {
            let ua = ev.user_agent.as_deref().unwrap_or("");
            if !self.user_agents.iter().any(|n| contains_fold(ua, n)) {
                return false;
            }
        }
        if let Some(nets) = &self.ip_in
            && !in_nets(nets, ip)
        {
            return false;
        }
        if let Some(nets) = &self.ip_not_in
            && in_nets(nets, ip)
        {
            return false;
        }
        true
    }
}

/// One policy ready to evaluate.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    pub key: PolicyKey,
    pub spec: Arc<PolicySpec>,
    pub version: Option<i64>,
    pub params: WindowParams,
    pub action: Action,
    pub scope: Scope,
    pub mode: DecisionMode,
    /// The decision state's view of the policy (aggregate, ladder, sequence).
    pub rules: Arc<Rules>,
    /// The action at each escalation level (0: the policy's own).
    pub actions: Vec<Action>,
    /// For policies with expressions, their condition as written (shortened), recorded
    /// in decision summaries; empty for `match`-table policies, whose summary says
    /// enough.
    pub condition: String,
    matcher: Matcher,
    filter: Option<Cond>,
    count_if: Option<Cond>,
    value: Option<ValueField>,
    steps: Vec<Cond>,
}

impl CompiledPolicy {
    /// Does the event match this policy (its `match` table and its `filter`)?
    pub fn matches(&self, ev: &RequestEvent) -> bool {
        self.matches_ip(ev, ev.client_ip.to_canonical())
    }

    /// [`matches`](Self::matches) with the canonical client address already computed.
    #[inline]
    pub fn matches_ip(&self, ev: &RequestEvent, ip: IpAddr) -> bool {
        self.matcher.matches(ev, ip) && self.filter.as_ref().is_none_or(|f| f.eval(ev, ip))
    }

    /// Does a matching event count (`count_if`)?
    #[inline]
    pub fn counts(&self, ev: &RequestEvent, ip: IpAddr) -> bool {
        self.count_if.as_ref().is_none_or(|f| f.eval(ev, ip))
    }

    /// The amount a counted event adds: its weight, times the summed field for sums.
    #[inline]
    pub fn amount(&self, ev: &RequestEvent, weight: f64) -> f64 {
        match (&self.spec.aggregate, &self.value) {
            (AggregateSpec::Sum(_), Some(v)) => weight * v.number(ev).max(0.0),
            _ => weight,
        }
    }

    /// For distinct aggregates, the fingerprint of the event's value.
    #[inline]
    pub fn distinct_value(&self, ev: &RequestEvent) -> Option<u64> {
        match (&self.spec.aggregate, &self.value) {
            (AggregateSpec::Distinct(_), Some(v)) => v.fingerprint(ev),
            _ => None,
        }
    }

    /// For sequences, the steps whose condition the event meets, as a bit mask.
    #[inline]
    pub fn step_mask(&self, ev: &RequestEvent, ip: IpAddr) -> u32 {
        self.steps
            .iter()
            .enumerate()
            .filter(|(_, c)| c.eval(ev, ip))
            .fold(0, |m, (i, _)| m | (1 << i))
    }

    pub fn is_sequence(&self) -> bool {
        !self.steps.is_empty()
    }

    /// The entity the event counts for; `None` when the event lacks the header or
    /// cookie the policy counts by.
    pub fn entity_of(&self, ev: &RequestEvent) -> Option<EntityKey> {
        entity_key(&self.spec.entity, ev, ev.client_ip.to_canonical())
    }

    /// Adds the headers and cookies this policy reads (its entity, filter, `count_if`,
    /// aggregated value and steps) to `out`.
    pub fn reads(&self, out: &mut Reads) {
        fn entity(spec: &EntitySpec, out: &mut Reads) {
            match spec {
                EntitySpec::Header(name) => {
                    out.headers.insert(name.to_ascii_lowercase());
                }
                EntitySpec::Cookie(name) => {
                    out.cookies.insert(name.to_ascii_lowercase());
                }
                EntitySpec::Tuple(parts) => parts.iter().for_each(|p| entity(p, out)),
                EntitySpec::Ip
                | EntitySpec::Network { .. }
                | EntitySpec::UserAgent
                | EntitySpec::PathTemplate
                | EntitySpec::Ja4 => {}
            }
        }
        entity(&self.spec.entity, out);
        for cond in self.filter.iter().chain(&self.count_if).chain(&self.steps) {
            out.cond(cond);
        }
        if let Some(value) = &self.value {
            out.value(value);
        }
    }

    /// The window length in whole seconds (for decisions).
    pub fn window_secs(&self) -> u64 {
        self.spec.window.as_secs()
    }
}

/// The entity an event counts for under `spec`.
fn entity_key(spec: &EntitySpec, ev: &RequestEvent, ip: IpAddr) -> Option<EntityKey> {
    let named = |name: &str, value: Option<&String>| {
        value
            .filter(|v| !v.is_empty())
            .map(|value| (name.to_string(), value.clone()))
    };
    match spec {
        EntitySpec::Ip => Some(EntityKey::Ip(ip)),
        EntitySpec::Network { v4, v6 } => {
            EntityKey::network(ip, if ip.is_ipv4() { *v4 } else { *v6 })
        }
        EntitySpec::Header(name) => {
            named(name, ev.headers.get(name)).map(|(name, value)| EntityKey::Header { name, value })
        }
        EntitySpec::Cookie(name) => {
            named(name, ev.cookies.get(name)).map(|(name, value)| EntityKey::Cookie { name, value })
        }
        EntitySpec::UserAgent => named("user-agent", ev.user_agent.as_ref())
            .map(|(name, value)| EntityKey::Header { name, value }),
        EntitySpec::PathTemplate => Some(EntityKey::Path(path_template(&ev.path))),
        EntitySpec::Ja4 => ev
            .tls
            .as_ref()
            .and_then(|t| t.fingerprint.as_ref())
            .filter(|fp| !fp.is_empty())
            .map(|fp| EntityKey::Ja4(fp.clone())),
        EntitySpec::Tuple(parts) => parts
            .iter()
            .map(|p| entity_key(p, ev, ip))
            .collect::<Option<Vec<_>>>()
            .map(EntityKey::tuple),
    }
}

/// FNV-1a: a fingerprint that is the same in every process (unlike `DefaultHasher`),
/// so workers sharing a state backend agree on keys.
use crate::expr::fnv1a;

/// The state key of a policy: its id and a fingerprint of its spec and version.
pub fn policy_key(spec: &PolicySpec, version: Option<i64>) -> PolicyKey {
    let mut text = serde_json::to_string(spec).unwrap_or_default();
    if let Some(v) = version {
        text.push_str(&format!("#v{v}"));
    }
    PolicyKey {
        id: Arc::from(spec.id.as_str()),
        fingerprint: fnv1a(text.as_bytes()),
    }
}

fn list_nets(
    lists: &[NamedList],
    name: &str,
    policy: &str,
    warnings: &mut Vec<String>,
) -> Vec<IpNet> {
    match lists.iter().find(|l| l.name == name) {
        Some(l) if l.kind == ListKind::Ip => l.networks(),
        Some(_) => {
            warnings.push(format!(
                "policy \"{policy}\": list \"{name}\" is not an IP list; it matches no address"
            ));
            Vec::new()
        }
        None => {
            warnings.push(format!(
                "policy \"{policy}\": list \"{name}\" does not exist; it matches no address"
            ));
            Vec::new()
        }
    }
}

fn lists_of(active: &ActivePolicies) -> &[NamedList] {
    &active.lists
}

/// Compiles one policy; a missing or non-IP list is an empty list (with a warning).
pub fn compile(
    spec: &PolicySpec,
    version: Option<i64>,
    lists: &[NamedList],
    warnings: &mut Vec<String>,
) -> CompiledPolicy {
    let m = &spec.matches;
    let mut statuses = None;
    if !m.statuses.is_empty() {
        let mut set = StatusSet::default();
        for s in &m.statuses {
            match *s {
                StatusMatch::Code(c) => set.insert(c),
                StatusMatch::Class(c) => {
                    (u16::from(c) * 100..u16::from(c) * 100 + 100).for_each(|code| set.insert(code))
                }
            }
        }
        statuses = Some(set);
    }
    let mut apps = m.apps.clone();
    if let PolicyScope::App(app) = &spec.scope
        && apps.is_empty()
    {
        apps.push(app.clone());
    }
    let matcher = Matcher {
        methods: m.methods.iter().map(|s| s.to_ascii_uppercase()).collect(),
        paths: m.paths.clone(),
        prefixes: m.path_prefixes.clone(),
        statuses,
        hosts: m
            .hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect(),
        apps,
        user_agents: m
            .user_agent_contains
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.to_ascii_lowercase())
            .collect(),
        ip_in: m
            .ip_in_list
            .as_deref()
            .map(|n| list_nets(lists, n, &spec.id, warnings)),
        ip_not_in: m
            .ip_not_in_list
            .as_deref()
            .map(|n| list_nets(lists, n, &spec.id, warnings)),
    };
    let mut expr_lists = Lists::new(Some(lists));
    let mut compile_expr = |src: &str| match compile_filter(src, &mut expr_lists) {
        Ok(c) => c,
        Err(e) => {
            // Validation refuses these; a worker must still keep running.
            warnings.push(format!(
                "policy \"{}\": expression {e}; it matches nothing",
                spec.id
            ));
            Cond::Const(false)
        }
    };
    let filter = spec.filter.as_deref().map(&mut compile_expr);
    let count_if = spec.count_if.as_deref().map(&mut compile_expr);
    let steps: Vec<Cond> = spec
        .sequence
        .iter()
        .map(|s| compile_expr(&s.when))
        .collect();
    for (name, kind) in &expr_lists.refs {
        if !lists.iter().any(|l| l.name == *name && l.kind == *kind) {
            warnings.push(format!(
                "policy \"{}\": {kind} list \"{name}\" does not exist; it is empty",
                spec.id
            ));
        }
    }
    let value = spec.aggregate.value_field().and_then(Result::ok);
    let params = WindowParams::new(spec.window, spec.threshold, spec.ttl);
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let rules = Rules {
        distinct: matches!(spec.aggregate, AggregateSpec::Distinct(_)),
        scale: match spec.aggregate {
            AggregateSpec::Rate => 1.0 / spec.window.as_secs_f64().max(1e-3),
            _ => 1.0,
        },
        sequence: spec.sequence.iter().map(|s| s.min).collect(),
        ladder: spec
            .escalation
            .iter()
            .map(|r| Rung {
                repeat: r.repeat.unwrap_or(1),
                threshold: r.threshold.unwrap_or(0.0),
                ttl_ms: ms(r.ttl.unwrap_or(spec.ttl)),
            })
            .collect(),
        growth: spec.ttl_growth.unwrap_or(1.0),
        ttl_max_ms: ms(spec.ttl_max.unwrap_or(crate::policy::MAX_TTL)),
    };
    let mut actions = vec![action_of(
        spec.action,
        spec.rate,
        spec.burst,
        spec.delay,
        spec.difficulty,
    )];
    actions.extend(
        spec.escalation
            .iter()
            .map(|r| action_of(r.action, r.rate, r.burst, r.delay, r.difficulty)),
    );
    CompiledPolicy {
        key: policy_key(spec, version),
        spec: Arc::new(spec.clone()),
        version,
        params,
        action: actions[0].clone(),
        scope: match &spec.scope {
            PolicyScope::Global => Scope::Global,
            PolicyScope::App(app) => Scope::App(app.clone()),
        },
        mode: match spec.mode {
            PolicyMode::Enforce => DecisionMode::Enforce,
            PolicyMode::Shadow => DecisionMode::Shadow,
        },
        rules: Arc::new(rules),
        actions,
        condition: summary_condition(spec),
        matcher,
        filter,
        count_if,
        value,
        steps,
    }
}

/// Longest condition recorded in a decision summary, in characters.
const MAX_SUMMARY_CONDITION: usize = 200;

fn summary_condition(spec: &PolicySpec) -> String {
    if spec.expressions().next().is_none() {
        return String::new();
    }
    let text = spec
        .condition()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if text.chars().count() <= MAX_SUMMARY_CONDITION {
        return text;
    }
    let mut short: String = text.chars().take(MAX_SUMMARY_CONDITION - 3).collect();
    short.push_str("...");
    short
}

/// The wire action of a policy's (or an escalation step's) action and parameters.
fn action_of(
    kind: ActionKind,
    rate: Option<f64>,
    burst: Option<u32>,
    delay: Option<Duration>,
    difficulty: Option<u8>,
) -> Action {
    match kind {
        ActionKind::Block => Action::Block,
        ActionKind::Throttle => {
            let rate = rate.unwrap_or(1.0);
            Action::Throttle {
                rate,
                burst: burst.unwrap_or_else(|| {
                    rate.ceil().clamp(1.0, f64::from(crate::policy::MAX_BURST)) as u32
                }),
            }
        }
        ActionKind::Tarpit => Action::Tarpit {
            delay_ms: delay
                .unwrap_or(Duration::from_secs(1))
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
        },
        ActionKind::Challenge => Action::Challenge {
            difficulty: difficulty.unwrap_or(crate::policy::DEFAULT_DIFFICULTY),
        },
        ActionKind::Log => Action::Log,
    }
}

/// The compiled, enabled policies of one revision.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    pub revision: i64,
    policies: Vec<CompiledPolicy>,
    warnings: Vec<String>,
    /// Addresses no policy decides against.
    allowlist: Option<IpSet>,
}

impl PolicySet {
    /// Compiles the enabled policies of `active`. Invalid policies are skipped with a
    /// warning: the control plane validates them, but a worker must keep running.
    pub fn compile(active: &ActivePolicies) -> PolicySet {
        let mut warnings = Vec::new();
        let mut policies = Vec::new();
        for spec in active.policies.iter().filter(|p| p.enabled) {
            if let Err(e) = spec.validate() {
                warnings.push(format!("skipped: {e}"));
                continue;
            }
            if policies
                .iter()
                .any(|p: &CompiledPolicy| *p.key.id == *spec.id)
            {
                warnings.push(format!("skipped: policy \"{}\": duplicate id", spec.id));
                continue;
            }
            let version = active.versions.get(&spec.id).copied();
            policies.push(compile(spec, version, &active.lists, &mut warnings));
        }
        // Higher priorities first; equal priorities keep their order.
        policies.sort_by_key(|p| std::cmp::Reverse(p.spec.priority));
        let allowlist = active.allowlist.as_deref().map(|name| {
            IpSet::new(list_nets(
                lists_of(active),
                name,
                "allowlist",
                &mut warnings,
            ))
        });
        PolicySet {
            revision: active.revision,
            policies,
            warnings,
            allowlist,
        }
    }

    /// Compiles policies that come without lists or versions (a policy file).
    pub fn from_specs(revision: i64, specs: Vec<PolicySpec>) -> PolicySet {
        PolicySet::compile(&ActivePolicies {
            revision,
            policies: specs,
            ..ActivePolicies::default()
        })
    }

    /// Is `ip` (canonical) on the allowlist?
    #[inline]
    pub fn allowed(&self, ip: IpAddr) -> bool {
        self.allowlist.as_ref().is_some_and(|l| l.contains(ip))
    }

    pub fn policies(&self) -> &[CompiledPolicy] {
        &self.policies
    }

    /// The state keys of these policies (what a reload keeps).
    pub fn keys(&self) -> Vec<PolicyKey> {
        self.policies.iter().map(|p| p.key.clone()).collect()
    }

    /// The headers and cookies these policies read, which proxies must report.
    pub fn reads(&self) -> Reads {
        let mut out = Reads::default();
        for p in &self.policies {
            p.reads(&mut out);
        }
        out
    }

    /// Problems found while compiling (skipped policies, missing lists).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_names_every_header_and_cookie_its_enabled_policies_read() {
        let specs = crate::policy::parse_policies(
            r#"
[[policy]]
id = "by-key"
entity = "header:X-Api-Key"
window = "1m"
threshold = 10
filter = 'has(headers["x-api-key"]) && !(cookies["Session"] == "" || size(headers["x-big"]) > 9)'
action = "block"

[[policy]]
id = "pairs"
entity = ["ip", "cookie:cart"]
window = "1m"
threshold = 5
aggregate = 'distinct(headers["x-login-user"])'
count_if = 'headers["x-counted"] != ""'
action = "log"

[[policy]]
id = "steps"
window = "1m"
threshold = 1
action = "log"
sequence = [
  { when = 'path == "/a" && headers["x-step"] == "1"' },
  { when = 'cookies["flow"] in ["x", "y"]' },
]

[[policy]]
id = "off"
enabled = false
entity = "header:x-disabled"
window = "1m"
threshold = 1
action = "block"

[[policy]]
id = "plain"
window = "1m"
threshold = 1
filter = 'user_agent.contains("curl")'
action = "block"
"#,
        )
        .unwrap();
        let set = PolicySet::from_specs(1, specs);
        assert!(set.warnings().is_empty(), "{:?}", set.warnings());
        let reads = set.reads();
        let names = |s: &std::collections::BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(&reads.headers),
            ["x-api-key", "x-big", "x-counted", "x-login-user", "x-step"]
        );
        assert_eq!(names(&reads.cookies), ["cart", "flow", "session"]);
        assert_eq!(PolicySet::default().reads(), Reads::default());
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_only("shop.example:8000"), "shop.example");
        assert_eq!(host_only("shop.example"), "shop.example");
        assert_eq!(host_only("[::1]:8000"), "::1");
        assert_eq!(host_only("::1"), "::1");
    }

    #[test]
    fn substrings_ignore_case() {
        assert!(contains_fold("Python-Requests/2.31", "python-requests"));
        assert!(!contains_fold("curl", "curl/8"));
    }

    #[test]
    fn status_sets() {
        let mut s = StatusSet::default();
        s.insert(401);
        s.insert(599);
        assert!(s.contains(401) && s.contains(599));
        assert!(!s.contains(400) && !s.contains(0) && !s.contains(1000));
    }

    #[test]
    fn fingerprints_follow_spec_and_version() {
        let spec: PolicySpec =
            serde_json::from_str(r#"{"id":"p","window":"1m","threshold":5,"action":"block"}"#)
                .unwrap();
        let a = policy_key(&spec, Some(1));
        assert_eq!(a, policy_key(&spec, Some(1)));
        assert_ne!(a, policy_key(&spec, Some(2)));
        let mut changed = spec.clone();
        changed.threshold = 6.0;
        assert_ne!(a.fingerprint, policy_key(&changed, Some(1)).fingerprint);
    }
}
