//! Policies compiled once into matchers: upper/lower-cased strings, parsed networks and
//! status bitsets, so matching an event allocates nothing.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use esper_protocol::{Action, DecisionMode, EntityKey, RequestEvent, Scope};
use ipnet::IpNet;

use super::state::PolicyKey;
use super::window::WindowParams;
use crate::policy::{
    ActionKind, ActivePolicies, EntitySpec, ListKind, NamedList, PolicyMode, PolicyScope,
    PolicySpec, StatusMatch,
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

/// Case-insensitive substring test; `needle` is lower-case and not empty.
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    h.len() >= n.len() && h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// The host without its port (`shop.example:8000`, `[::1]:8000`).
fn host_only(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
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
        if let Some(statuses) = &self.statuses {
            if !statuses.contains(ev.status) {
                return false;
            }
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
            if !self.user_agents.iter().any(|n| contains_ignore_case(ua, n)) {
                return false;
            }
        }
        if let Some(nets) = &self.ip_in {
            if !in_nets(nets, ip) {
                return false;
            }
        }
        if let Some(nets) = &self.ip_not_in {
            if in_nets(nets, ip) {
                return false;
            }
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
    matcher: Matcher,
}

impl CompiledPolicy {
    /// Does the event count for this policy?
    pub fn matches(&self, ev: &RequestEvent) -> bool {
        self.matcher.matches(ev, ev.client_ip.to_canonical())
    }

    /// The entity the event counts for; `None` when the event lacks the header or
    /// cookie the policy counts by.
    pub fn entity_of(&self, ev: &RequestEvent) -> Option<EntityKey> {
        let ip = ev.client_ip.to_canonical();
        match &self.spec.entity {
            EntitySpec::Ip => Some(EntityKey::Ip(ip)),
            EntitySpec::Network { v4, v6 } => {
                EntityKey::network(ip, if ip.is_ipv4() { *v4 } else { *v6 })
            }
            EntitySpec::Header(name) => {
                ev.headers
                    .get(name)
                    .filter(|v| !v.is_empty())
                    .map(|value| EntityKey::Header {
                        name: name.clone(),
                        value: value.clone(),
                    })
            }
            EntitySpec::Cookie(name) => {
                ev.cookies
                    .get(name)
                    .filter(|v| !v.is_empty())
                    .map(|value| EntityKey::Cookie {
                        name: name.clone(),
                        value: value.clone(),
                    })
            }
        }
    }

    /// The window length in whole seconds (for decisions).
    pub fn window_secs(&self) -> u64 {
        self.spec.window.as_secs()
    }
}

/// FNV-1a: a fingerprint that is the same in every process (unlike `DefaultHasher`),
/// so workers sharing a state backend agree on keys.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

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
    if let PolicyScope::App(app) = &spec.scope {
        if apps.is_empty() {
            apps.push(app.clone());
        }
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
    let action = match spec.action {
        ActionKind::Block => Action::Block,
        ActionKind::Throttle => Action::Throttle {
            rate: spec.rate.unwrap_or(1.0),
            burst: spec.effective_burst(),
        },
        ActionKind::Tarpit => Action::Tarpit {
            delay_ms: spec
                .delay
                .unwrap_or(Duration::from_secs(1))
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
        },
        ActionKind::Log => Action::Log,
    };
    CompiledPolicy {
        key: policy_key(spec, version),
        spec: Arc::new(spec.clone()),
        version,
        params: WindowParams::new(spec.window, spec.threshold, spec.ttl),
        action,
        scope: match &spec.scope {
            PolicyScope::Global => Scope::Global,
            PolicyScope::App(app) => Scope::App(app.clone()),
        },
        mode: match spec.mode {
            PolicyMode::Enforce => DecisionMode::Enforce,
            PolicyMode::Shadow => DecisionMode::Shadow,
        },
        matcher,
    }
}

/// The compiled, enabled policies of one revision.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    pub revision: i64,
    policies: Vec<CompiledPolicy>,
    warnings: Vec<String>,
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
        PolicySet {
            revision: active.revision,
            policies,
            warnings,
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

    pub fn policies(&self) -> &[CompiledPolicy] {
        &self.policies
    }

    /// The state keys of these policies (what a reload keeps).
    pub fn keys(&self) -> Vec<PolicyKey> {
        self.policies.iter().map(|p| p.key.clone()).collect()
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
    fn hosts_lose_their_port() {
        assert_eq!(host_only("shop.example:8000"), "shop.example");
        assert_eq!(host_only("shop.example"), "shop.example");
        assert_eq!(host_only("[::1]:8000"), "::1");
        assert_eq!(host_only("::1"), "::1");
    }

    #[test]
    fn substrings_ignore_case() {
        assert!(contains_ignore_case(
            "Python-Requests/2.31",
            "python-requests"
        ));
        assert!(!contains_ignore_case("curl", "curl/8"));
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
