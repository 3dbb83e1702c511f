//! Evaluator tests: thresholds, weights, cooldowns, dedup, entities, conditions, shadow
//! mode and reloads, over the memory backend.

use std::net::IpAddr;
use std::time::Duration;

use chrono::TimeZone;
use esper_protocol::{Action, EntityKey, Scope};

use super::*;
use crate::policy::{ActivePolicies, ListKind, NamedList, parse_policies};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).single().unwrap()
}

fn at(secs: f64) -> DateTime<Utc> {
    t0() + chrono::Duration::milliseconds((secs * 1000.0) as i64)
}

fn event(ip: &str, method: &str, path: &str, status: u16, secs: f64) -> RequestEvent {
    let mut ev = RequestEvent::new(ip.parse::<IpAddr>().unwrap(), method, path);
    ev.status = status;
    ev.timestamp = at(secs);
    ev
}

fn login(ip: &str, secs: f64) -> RequestEvent {
    event(ip, "POST", "/login", 401, secs)
}

const LOGIN: &str = r#"
[[policy]]
id = "login"
window = "60s"
threshold = 10
action = "block"
ttl = "5m"
[policy.match]
methods = ["post"]
paths = ["/login"]
statuses = [401]
"#;

fn setup(policies: &str) -> (Evaluator, PolicySet, Registry) {
    let registry = Registry::new();
    let state = Arc::new(MemoryState::new(Duration::from_secs(3600), 10_000));
    let ev = Evaluator::new(state, "worker-test", &registry);
    let set = PolicySet::from_specs(1, parse_policies(policies).unwrap());
    (ev, set, registry)
}

/// Evaluates and commits at wall-clock `now`, returning the decisions.
async fn run(
    ev: &Evaluator,
    set: &PolicySet,
    events: &[RequestEvent],
    now: DateTime<Utc>,
) -> Vec<Decision> {
    let out = ev.evaluate(set, events, now).await.unwrap();
    ev.commit(&out, now).await.unwrap();
    out.decisions
}

#[tokio::test]
async fn fires_exactly_at_the_threshold_with_a_full_decision() {
    let (ev, set, registry) = setup(LOGIN);
    let nine: Vec<_> = (0..9).map(|i| login("127.0.0.2", f64::from(i))).collect();
    assert!(run(&ev, &set, &nine, at(10.0)).await.is_empty());
    let tenth = [login("127.0.0.2", 9.5)];
    let d = run(&ev, &set, &tenth, at(10.0)).await;
    assert_eq!(d.len(), 1);
    let d = &d[0];
    assert_eq!(d.mitigation.entity, "ip:127.0.0.2".parse().unwrap());
    assert_eq!(d.mitigation.action, Action::Block);
    assert_eq!(d.mitigation.scope, Scope::Global);
    assert_eq!(d.mitigation.origin, Origin::Policy);
    assert_eq!(
        d.mitigation.reason.summary,
        "10 weighted events >= 10 in 60s (POST /login 401)"
    );
    assert_eq!(d.mitigation.reason.policy_id.as_deref(), Some("login"));
    assert_eq!(d.mitigation.created_at, at(10.0));
    assert_eq!(d.mitigation.expires_at, at(310.0));
    assert_eq!(d.id, d.mitigation.id);
    assert_eq!(d.mode, DecisionMode::Enforce);
    assert_eq!(
        (d.counted, d.threshold, d.window_secs),
        (Some(10.0), Some(10.0), Some(60))
    );
    assert_eq!(d.policy_version, None);
    assert_eq!(d.decided_by, "worker-test");
    let text = esper_common::metrics::render(&registry);
    assert!(
        text.contains(r#"esper_decisions_total{mode="enforce",policy="login"} 1"#),
        "{text}"
    );
    assert!(text.contains("esper_events_evaluated_total 10"), "{text}");
}

#[tokio::test]
async fn a_path_written_another_way_is_the_same_path() {
    // `paths = ["/login"]` and `path == "/login"` see the path the app resolves.
    const BY_EXPR: &str = r#"
[[policy]]
id = "login-expr"
window = "60s"
threshold = 5
action = "block"
filter = 'method == "POST" && path == "/login" && status == 401'
"#;
    for policies in [LOGIN, BY_EXPR] {
        let (ev, set, _) = setup(policies);
        let spellings = [
            "//login",
            "/./login",
            "/login;jsessionid=1",
            "/%6Cogin",
            "/x/../login",
        ];
        let events: Vec<_> = (0..10)
            .map(|i| {
                let mut e = event(
                    "127.0.0.2",
                    "POST",
                    spellings[i % spellings.len()],
                    401,
                    f64::from(i as u32) / 10.0,
                );
                e.id = format!("e{i}");
                e
            })
            .collect();
        let d = run(&ev, &set, &events, at(2.0)).await;
        assert_eq!(d.len(), 1, "{policies}");
    }
}

#[tokio::test]
async fn weights_count_as_many_events() {
    let (ev, set, _) = setup(LOGIN);
    let mut heavy = login("127.0.0.2", 0.0);
    heavy.weight = 4.0;
    let mut events = vec![heavy.clone(), {
        let mut e = heavy.clone();
        e.id = "x".into();
        e
    }];
    assert!(run(&ev, &set, &events, at(1.0)).await.is_empty(), "8 < 10");
    events = vec![login("127.0.0.2", 0.5), login("127.0.0.2", 0.6)];
    let d = run(&ev, &set, &events, at(1.0)).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].counted, Some(10.0));
}

#[tokio::test]
async fn a_standing_decision_holds_back_new_ones_until_it_expires() {
    let (ev, set, _) = setup(LOGIN);
    let burst: Vec<_> = (0..25)
        .map(|i| login("127.0.0.2", f64::from(i) / 10.0))
        .collect();
    assert_eq!(run(&ev, &set, &burst, at(3.0)).await.len(), 1);
    let more: Vec<_> = (0..10)
        .map(|i| login("127.0.0.2", 4.0 + f64::from(i)))
        .collect();
    assert!(run(&ev, &set, &more, at(20.0)).await.is_empty());
    // After the ttl (5m of wall time), a persisting attacker is decided against again.
    let later: Vec<_> = (0..10)
        .map(|i| login("127.0.0.2", 300.0 + f64::from(i)))
        .collect();
    let d = run(&ev, &set, &later, at(315.0)).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].mitigation.created_at, at(315.0));
}

#[tokio::test]
async fn windows_run_on_event_time() {
    let (ev, set, _) = setup(LOGIN);
    // Nine events a minute apart never make ten within 60s, whatever the wall clock.
    let spread: Vec<_> = (0..20)
        .map(|i| login("127.0.0.2", f64::from(i) * 61.0))
        .collect();
    assert!(run(&ev, &set, &spread, at(2000.0)).await.is_empty());
    // Events from the future (clock skew) count as now.
    let (ev, set, _) = setup(LOGIN);
    let future: Vec<_> = (0..10)
        .map(|i| login("127.0.0.2", 3600.0 + f64::from(i)))
        .collect();
    let d = run(&ev, &set, &future, at(0.0)).await;
    assert_eq!(d.len(), 1);
    // Late events (older than the window behind the newest) are ignored.
    let (ev, set, _) = setup(LOGIN);
    run(&ev, &set, &[login("127.0.0.9", 1000.0)], at(1000.0)).await;
    let late: Vec<_> = (0..10).map(|i| login("127.0.0.9", f64::from(i))).collect();
    let out = ev.evaluate(&set, &late, at(1000.0)).await.unwrap();
    assert_eq!((out.late, out.decisions.len()), (10, 0));
}

#[tokio::test]
async fn the_same_event_id_counts_once() {
    let (ev, set, registry) = setup(LOGIN);
    let nine: Vec<_> = (0..9).map(|i| login("127.0.0.2", f64::from(i))).collect();
    run(&ev, &set, &nine, at(10.0)).await;
    let again = run(&ev, &set, &nine, at(10.0)).await;
    assert!(again.is_empty());
    let out = ev
        .evaluate(&set, &[nine[0].clone(), nine[0].clone()], at(10.0))
        .await
        .unwrap();
    assert_eq!((out.evaluated, out.duplicates), (0, 2));
    ev.commit(&out, at(10.0)).await.unwrap();
    assert!(esper_common::metrics::render(&registry).contains("esper_duplicate_events_total 11"));
}

#[tokio::test]
async fn rolled_back_batches_decide_again_when_redelivered() {
    let (ev, set, _) = setup(LOGIN);
    let ten: Vec<_> = (0..10).map(|i| login("127.0.0.2", f64::from(i))).collect();
    let first = ev.evaluate(&set, &ten, at(10.0)).await.unwrap();
    assert_eq!(first.mitigations().len(), 1);
    ev.rollback(&first).await.unwrap();
    let second = ev.evaluate(&set, &ten, at(11.0)).await.unwrap();
    assert_eq!(second.duplicates, 0);
    assert_eq!(second.decisions.len(), 1);
    assert_eq!(second.decisions[0].counted, Some(10.0));
    ev.commit(&second, at(11.0)).await.unwrap();
}

#[tokio::test]
async fn events_in_flight_elsewhere_are_busy_not_duplicates() {
    let (ev, set, _) = setup(LOGIN);
    let ten: Vec<_> = (0..10).map(|i| login("127.0.0.2", f64::from(i))).collect();
    let first = ev.evaluate(&set, &ten, at(10.0)).await.unwrap();
    let second = ev.evaluate(&set, &ten, at(10.0)).await.unwrap();
    assert_eq!(second.busy, vec![true; 10]);
    assert_eq!((second.evaluated, second.duplicates), (0, 0));
    assert!(second.decisions.is_empty());
    ev.commit(&second, at(10.0)).await.unwrap();
    ev.commit(&first, at(10.0)).await.unwrap();
    let third = ev.evaluate(&set, &ten, at(10.0)).await.unwrap();
    assert_eq!(third.busy, vec![false; 10]);
    assert_eq!(third.duplicates, 10);
}

#[tokio::test]
async fn entity_kinds() {
    let policies = r#"
[[policy]]
id = "net"
entity = "ip/24"
window = "1m"
threshold = 3
action = "log"
[[policy]]
id = "v6net"
entity = "ip/16,48"
window = "1m"
threshold = 2
action = "log"
[[policy]]
id = "key"
entity = "header:X-Api-Key"
window = "1m"
threshold = 2
action = "throttle"
rate = 2.5
[[policy]]
id = "session"
entity = "cookie:sid"
window = "1m"
threshold = 2
action = "tarpit"
delay = "1500ms"
"#;
    let (ev, set, _) = setup(policies);
    let mut events = vec![
        event("10.1.2.3", "GET", "/", 200, 0.0),
        event("10.1.2.4", "GET", "/", 200, 0.0),
        event("::ffff:10.1.2.5", "GET", "/", 200, 0.0),
        event("2001:db8:1:2::1", "GET", "/", 200, 0.0),
        event("2001:db8:1:3::1", "GET", "/", 200, 0.0),
    ];
    for (i, e) in events.iter_mut().enumerate().take(2) {
        e.headers.insert("x-api-key".into(), "k1".into());
        e.cookies.insert("sid".into(), format!("s{i}"));
    }
    events[2].cookies.insert("sid".into(), "s1".into());
    let mut d = run(&ev, &set, &events, at(1.0)).await;
    d.sort_by(|a, b| a.policy_id.cmp(&b.policy_id));
    let got: Vec<_> = d
        .iter()
        .map(|d| {
            (
                d.policy_id.clone().unwrap(),
                d.mitigation.entity.to_string(),
                d.mitigation.action.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "key".into(),
                "header:x-api-key=k1".into(),
                Action::Throttle {
                    rate: 2.5,
                    burst: 3
                }
            ),
            ("net".into(), "cidr:10.1.2.0/24".into(), Action::Log),
            (
                "session".into(),
                "cookie:sid=s1".into(),
                Action::Tarpit { delay_ms: 1500 }
            ),
            ("v6net".into(), "cidr:10.1.0.0/16".into(), Action::Log),
            ("v6net".into(), "cidr:2001:db8:1::/48".into(), Action::Log),
        ]
    );
    let key = EntityKey::network("2001:db8:1:2::1".parse().unwrap(), 48).unwrap();
    assert_eq!(key.to_string(), "cidr:2001:db8:1::/48");
}

#[tokio::test]
async fn path_template_and_tls_fingerprint_entities() {
    let policies = r#"
[[policy]]
id = "template"
entity = "path"
window = "1m"
threshold = 3
action = "block"
[[policy]]
id = "fingerprint"
entity = "ja4"
window = "1m"
threshold = 2
action = "challenge"
[[policy]]
id = "pair"
entity = ["ip", "path", "ja4"]
window = "1m"
threshold = 2
action = "log"
"#;
    let (ev, set, _) = setup(policies);
    let ja4 = "t13d1516h2_8daaf6152771_b0da82dd1658";
    let mut events = vec![
        event("10.0.0.1", "GET", "/users/1/orders", 200, 0.0),
        event("10.0.0.2", "GET", "/users/22/orders?page=2", 200, 0.1),
        event("10.0.0.3", "GET", "/users/333/profile", 200, 0.2),
        event("10.0.0.1", "GET", "/users/4444/orders", 200, 0.3),
    ];
    for e in &mut events[..2] {
        e.tls = Some(esper_protocol::TlsInfo {
            version: "TLSv1.3".into(),
            fingerprint: Some(ja4.into()),
        });
    }
    events[3].tls = events[0].tls.clone();
    let mut d = run(&ev, &set, &events, at(1.0)).await;
    d.sort_by(|a, b| a.policy_id.cmp(&b.policy_id));
    let got: Vec<_> = d
        .iter()
        .map(|d| {
            (
                d.policy_id.clone().unwrap(),
                d.mitigation.entity.to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("fingerprint".to_string(), format!("ja4:{ja4}")),
            (
                "pair".to_string(),
                format!("tuple:ip:10.0.0.1+path:/users/{{id}}/orders+ja4:{ja4}")
            ),
            (
                "template".to_string(),
                "path:/users/{id}/orders".to_string()
            ),
        ]
    );
    // Decided keys read back as the same keys.
    for d in &d {
        let text = d.mitigation.entity.to_string();
        assert_eq!(text.parse::<EntityKey>().unwrap(), d.mitigation.entity);
    }
}

#[tokio::test]
async fn match_conditions() {
    let policies = r#"
[[policy]]
id = "p"
window = "1m"
threshold = 1
action = "block"
scope = "app:shop"
[policy.match]
methods = ["GET", "post"]
path_prefixes = ["/api/"]
statuses = ["4xx", 503]
hosts = ["Shop.Example"]
user_agent_contains = ["CURL"]
ip_not_in_list = "office"
"#;
    let registry = Registry::new();
    let state = Arc::new(MemoryState::new(Duration::from_secs(3600), 10_000));
    let ev = Evaluator::new(state, "w", &registry);
    let active = ActivePolicies {
        revision: 1,
        policies: parse_policies(policies).unwrap(),
        lists: vec![NamedList {
            name: "office".into(),
            kind: ListKind::Ip,
            items: vec!["192.0.2.0/24".into()],
        }],
        ..ActivePolicies::default()
    };
    let set = PolicySet::compile(&active);
    assert!(set.warnings().is_empty(), "{:?}", set.warnings());
    let good = || {
        let mut e = event("203.0.113.1", "get", "/api/items?page=2", 404, 0.0);
        e.app = "shop".into();
        e.host = "shop.example:8443".into();
        e.user_agent = Some("curl/8.5".into());
        e
    };
    let mut variants: Vec<(&str, RequestEvent)> = vec![("good", good())];
    let mut e = good();
    e.method = "DELETE".into();
    variants.push(("method", e));
    let mut e = good();
    e.path = "/apix".into();
    variants.push(("path", e));
    let mut e = good();
    e.status = 500;
    variants.push(("status", e));
    let mut e = good();
    e.host = "blog.example".into();
    variants.push(("host", e));
    let mut e = good();
    e.user_agent = None;
    variants.push(("ua", e));
    let mut e = good();
    e.client_ip = "192.0.2.77".parse().unwrap();
    variants.push(("list", e));
    let mut e = good();
    e.app = "blog".into();
    variants.push(("scope", e));
    let p = &set.policies()[0];
    for (name, e) in &variants {
        assert_eq!(p.matches(e), *name == "good", "{name}");
    }
    let d = run(&ev, &set, &[good()], at(1.0)).await;
    assert_eq!(d[0].mitigation.scope, Scope::App("shop".into()));
}

#[tokio::test]
async fn missing_lists_match_no_address_and_warn() {
    let mut specs = parse_policies(LOGIN).unwrap();
    specs[0].matches.ip_in_list = Some("office".into());
    let set = PolicySet::from_specs(1, specs);
    assert_eq!(set.warnings().len(), 1, "{:?}", set.warnings());
    assert!(!set.policies()[0].matches(&login("127.0.0.2", 0.0)));
}

#[tokio::test]
async fn shadow_policies_decide_but_publish_nothing() {
    let (ev, set, registry) =
        setup(&LOGIN.replace("ttl = \"5m\"", "ttl = \"5m\"\nmode = \"shadow\""));
    let ten: Vec<_> = (0..10).map(|i| login("127.0.0.2", f64::from(i))).collect();
    let out = ev.evaluate(&set, &ten, at(10.0)).await.unwrap();
    assert_eq!(out.decisions.len(), 1);
    assert_eq!(out.decisions[0].mode, DecisionMode::Shadow);
    assert!(out.mitigations().is_empty());
    ev.commit(&out, at(10.0)).await.unwrap();
    let text = esper_common::metrics::render(&registry);
    assert!(
        text.contains(r#"esper_would_have_mitigated_total{policy="login"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"esper_decisions_total{mode="shadow",policy="login"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn disabled_policies_are_not_evaluated() {
    let set = PolicySet::from_specs(
        1,
        parse_policies(&LOGIN.replace("ttl", "enabled = false\nttl")).unwrap(),
    );
    assert!(set.is_empty());
}

#[tokio::test]
async fn reload_keeps_state_of_unchanged_policies_only() {
    let two = format!("{LOGIN}\n{}", LOGIN.replace("\"login\"", "\"other\""));
    let (ev, set, _) = setup(&two);
    let nine: Vec<_> = (0..9).map(|i| login("127.0.0.2", f64::from(i))).collect();
    assert!(run(&ev, &set, &nine, at(10.0)).await.is_empty());

    // "login" unchanged, "other" now has threshold 11: only "login" keeps its count.
    let changed = format!(
        "{LOGIN}\n{}",
        LOGIN
            .replace("\"login\"", "\"other\"")
            .replace("threshold = 10", "threshold = 11")
    );
    let set2 = PolicySet::from_specs(2, parse_policies(&changed).unwrap());
    ev.install(&set2).await.unwrap();
    assert_eq!(set2.policies()[0].key, set.policies()[0].key);
    let d = run(&ev, &set2, &[login("127.0.0.2", 9.5)], at(10.0)).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].policy_id.as_deref(), Some("login"));
    assert_eq!(ev.state().stats().entities, 2);

    // Removing a policy drops its state; a new version of the same spec does too.
    let mut active = ActivePolicies {
        revision: 3,
        policies: parse_policies(LOGIN).unwrap(),
        ..ActivePolicies::default()
    };
    active.versions.insert("login".into(), 7);
    let set3 = PolicySet::compile(&active);
    ev.install(&set3).await.unwrap();
    assert_eq!(ev.state().stats().entities, 0);
    let fresh: Vec<_> = (0..9).map(|i| login("127.0.0.2", f64::from(i))).collect();
    let d = run(&ev, &set3, &fresh, at(20.0)).await;
    assert!(d.is_empty());
    let d = run(&ev, &set3, &[login("127.0.0.2", 9.7)], at(20.0)).await;
    assert_eq!(d[0].policy_version, Some(7));
}

#[test]
fn numbers_in_summaries() {
    assert_eq!(number(12.0), "12");
    assert_eq!(number(12.25), "12.2");
}

#[tokio::test]
async fn challenge_policies_decide_challenges_with_their_difficulty() {
    let with = LOGIN.replace(
        "action = \"block\"",
        "action = \"challenge\"\ndifficulty = 12",
    );
    let without = LOGIN.replace("action = \"block\"", "action = \"challenge\"");
    for (text, difficulty) in [(with, 12), (without, crate::policy::DEFAULT_DIFFICULTY)] {
        let (ev, set, _) = setup(&text);
        let events: Vec<_> = (0..10).map(|i| login("127.0.0.2", f64::from(i))).collect();
        let d = run(&ev, &set, &events, at(10.0)).await;
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].mitigation.action, Action::Challenge { difficulty });
    }
}
