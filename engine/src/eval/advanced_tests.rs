//! Evaluator tests of filters, counting filters, aggregates, escalation, repeat
//! offenders, sequences, tuple entities, priorities and the allowlist.

use std::net::IpAddr;
use std::time::Duration;

use chrono::TimeZone;
use esper_protocol::{Action, RequestEvent};

use super::*;
use crate::policy::{ActivePolicies, ListKind, NamedList, parse_policies};

fn at(secs: f64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).single().unwrap()
        + chrono::Duration::milliseconds((secs * 1000.0) as i64)
}

fn ev(ip: &str, path: &str, status: u16, secs: f64) -> RequestEvent {
    let mut e = RequestEvent::new(ip.parse::<IpAddr>().unwrap(), "POST", path);
    e.status = status;
    e.timestamp = at(secs);
    e
}

fn setup(policies: &str) -> (Evaluator, PolicySet) {
    let state = Arc::new(MemoryState::new(Duration::from_secs(3600), 10_000));
    let ev = Evaluator::new(state, "w", &Registry::new());
    (
        ev,
        PolicySet::from_specs(1, parse_policies(policies).unwrap()),
    )
}

/// Evaluates each event alone at its own time (as a replay does).
async fn feed(e: &Evaluator, set: &PolicySet, events: &[RequestEvent]) -> Vec<Decision> {
    let mut out = Vec::new();
    for event in events {
        let r = e
            .evaluate(set, std::slice::from_ref(event), event.timestamp)
            .await
            .unwrap();
        e.commit(&r, event.timestamp).await.unwrap();
        out.extend(r.decisions);
    }
    out
}

#[tokio::test]
async fn count_if_counts_some_of_the_matched_requests() {
    let (e, set) = setup(
        r#"
[[policy]]
id = "login"
window = "1m"
threshold = 3
action = "block"
ttl = "10s"
filter = 'path == "/login"'
count_if = 'status == 401'
"#,
    );
    let mut events: Vec<_> = (0..2)
        .map(|i| ev("10.0.0.1", "/login", 401, f64::from(i)))
        .collect();
    events.extend((0..5).map(|i| ev("10.0.0.1", "/login", 200, 2.0 + f64::from(i))));
    events.push(ev("10.0.0.1", "/other", 401, 8.0));
    assert!(
        feed(&e, &set, &events).await.is_empty(),
        "200s and other paths do not count"
    );
    let d = feed(&e, &set, &[ev("10.0.0.1", "/login", 401, 9.0)]).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].counted, Some(3.0));
    assert_eq!(
        d[0].mitigation.reason.summary,
        "3 weighted events >= 3 in 60s (POST /login 401); when path == \"/login\"; counting status == 401"
    );
    // Once the decision has expired, a matched but uncounted request finds the count
    // still at the threshold and decides again.
    let d = feed(&e, &set, &[ev("10.0.0.1", "/login", 200, 20.0)]).await;
    assert_eq!(d.len(), 1);
    // An entity never counted is not tracked by uncounted requests.
    feed(&e, &set, &[ev("10.0.0.2", "/login", 200, 21.0)]).await;
    assert_eq!(e.state().stats().entities, 1);
}

#[tokio::test]
async fn rates_sums_and_distinct_counts() {
    let (e, set) = setup(
        r#"
[[policy]]
id = "rate"
window = "10s"
threshold = 2
aggregate = "rate"
action = "log"

[[policy]]
id = "bytes"
window = "1m"
threshold = 1000
aggregate = "sum(bytes)"
action = "log"

[[policy]]
id = "paths"
window = "1m"
threshold = 4
aggregate = "distinct(path)"
action = "log"
"#,
    );
    let mut events = Vec::new();
    for i in 0..19 {
        let mut x = ev(
            "10.0.0.1",
            if i % 2 == 0 { "/a" } else { "/b" },
            200,
            f64::from(i) * 0.5,
        );
        x.bytes = 50;
        events.push(x);
    }
    assert!(
        feed(&e, &set, &events).await.is_empty(),
        "19 in 10s: 1.9/s, 950 bytes, 2 paths"
    );
    let mut x = ev("10.0.0.1", "/c", 200, 9.6);
    x.bytes = 50;
    let d = feed(&e, &set, &[x]).await;
    let mut got: Vec<_> = d
        .iter()
        .map(|d| (d.policy_id.clone().unwrap(), d.counted.unwrap()))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, vec![("bytes".into(), 1000.0), ("rate".into(), 2.0)]);
    let rate = d
        .iter()
        .find(|d| d.policy_id.as_deref() == Some("rate"))
        .unwrap();
    assert!(
        rate.mitigation
            .reason
            .summary
            .starts_with("2 requests/s >= 2 in 10s"),
        "{}",
        rate.mitigation.reason.summary
    );
    let d = feed(
        &e,
        &set,
        &[
            ev("10.0.0.1", "/c", 200, 9.7),
            ev("10.0.0.1", "/d", 200, 9.8),
        ],
    )
    .await;
    assert_eq!(
        d.len(),
        1,
        "a repeated path is one value; the fourth path fires"
    );
    assert_eq!(
        (d[0].policy_id.as_deref(), d[0].counted),
        (Some("paths"), Some(4.0))
    );
    assert!(
        d[0].mitigation
            .reason
            .summary
            .starts_with("4 distinct(path) >= 4 in 60s"),
        "{}",
        d[0].mitigation.reason.summary
    );
}

#[tokio::test]
async fn distinct_counts_roll_back() {
    let (e, set) = setup(
        "[[policy]]\nid = \"p\"\nwindow = \"1m\"\nthreshold = 3\naggregate = \"distinct(path)\"\naction = \"log\"\n",
    );
    let batch = [
        ev("10.0.0.1", "/a", 200, 1.0),
        ev("10.0.0.1", "/b", 200, 1.0),
        ev("10.0.0.1", "/c", 200, 1.0),
    ];
    let r = e.evaluate(&set, &batch, at(2.0)).await.unwrap();
    assert_eq!(r.decisions.len(), 1);
    e.rollback(&r).await.unwrap();
    let r = e.evaluate(&set, &batch[..2], at(2.0)).await.unwrap();
    assert!(r.decisions.is_empty(), "the rolled back values are gone");
    e.commit(&r, at(2.0)).await.unwrap();
}

const LADDER: &str = r#"
[[policy]]
id = "ladder"
window = "1m"
threshold = 5
action = "throttle"
rate = 1
ttl = "1m"
ttl_growth = 2
ttl_max = "3m"

[[policy.escalation]]
threshold = 10
action = "block"
ttl = "1m"

[[policy.escalation]]
repeat = 2
action = "tarpit"
delay = "1s"
"#;

#[tokio::test]
async fn a_standing_decision_escalates_at_a_higher_threshold() {
    let (e, set) = setup(LADDER);
    let events: Vec<_> = (0..12)
        .map(|i| ev("10.0.0.1", "/", 200, f64::from(i) * 0.1))
        .collect();
    let d = feed(&e, &set, &events).await;
    let got: Vec<_> = d
        .iter()
        .map(|d| {
            (
                d.mitigation.action.clone(),
                d.counted.unwrap(),
                d.threshold.unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                Action::Throttle {
                    rate: 1.0,
                    burst: 1
                },
                5.0,
                5.0
            ),
            (Action::Block, 10.0, 10.0),
        ]
    );
    assert!(
        d[1].mitigation
            .reason
            .summary
            .ends_with("escalation step 1, offense 1"),
        "{}",
        d[1].mitigation.reason.summary
    );
}

#[tokio::test]
async fn repeat_offenders_climb_the_ladder_with_growing_ttls() {
    let (e, set) = setup(LADDER);
    let mut decisions = Vec::new();
    // Five requests each time; each burst comes after the previous decision expired.
    for (round, start) in [0.0, 100.0, 300.0, 700.0].into_iter().enumerate() {
        let events: Vec<_> = (0..5)
            .map(|i| ev("10.0.0.1", "/", 200, start + f64::from(i) * 0.1))
            .collect();
        let d = feed(&e, &set, &events).await;
        assert_eq!(d.len(), 1, "round {round}");
        decisions.extend(d);
    }
    let got: Vec<_> = decisions
        .iter()
        .map(|d| {
            let ttl = (d.mitigation.expires_at - d.mitigation.created_at).num_seconds();
            (d.mitigation.action.clone(), ttl)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                Action::Throttle {
                    rate: 1.0,
                    burst: 1
                },
                60
            ),
            (Action::Tarpit { delay_ms: 1000 }, 120),
            (Action::Tarpit { delay_ms: 1000 }, 180),
            (Action::Tarpit { delay_ms: 1000 }, 180),
        ]
    );
    // Another entity starts from the bottom.
    let events: Vec<_> = (0..5)
        .map(|i| ev("10.0.0.2", "/", 200, 700.0 + f64::from(i)))
        .collect();
    let d = feed(&e, &set, &events).await;
    assert_eq!(
        d[0].mitigation.action,
        Action::Throttle {
            rate: 1.0,
            burst: 1
        }
    );
}

const TAKEOVER: &str = r#"
[[policy]]
id = "takeover"
within = "10m"
threshold = 1
action = "block"
sequence = [
  { when = 'path == "/login" && status == 401', min = 3 },
  { when = 'path == "/login" && status == 200' },
]
"#;

#[tokio::test]
async fn sequences_fire_on_the_whole_pattern_in_time() {
    let (e, set) = setup(TAKEOVER);
    let mut events: Vec<_> = (0..2)
        .map(|i| ev("10.0.0.1", "/login", 401, f64::from(i)))
        .collect();
    events.push(ev("10.0.0.1", "/login", 200, 3.0));
    assert!(
        feed(&e, &set, &events).await.is_empty(),
        "two failures are not enough"
    );
    let mut events: Vec<_> = (0..4)
        .map(|i| ev("10.0.0.2", "/login", 401, f64::from(i)))
        .collect();
    events.push(ev("10.0.0.2", "/home", 200, 5.0));
    events.push(ev("10.0.0.2", "/login", 200, 6.0));
    let d = feed(&e, &set, &events).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].mitigation.entity.to_string(), "ip:10.0.0.2");
    assert!(
        d[0].mitigation
            .reason
            .summary
            .starts_with("1 completed sequences >= 1 in 600s"),
        "{}",
        d[0].mitigation.reason.summary
    );
    // Too slow: the success comes more than 10 minutes after the first failure.
    let mut events: Vec<_> = (0..3)
        .map(|i| ev("10.0.0.3", "/login", 401, f64::from(i)))
        .collect();
    events.push(ev("10.0.0.3", "/login", 200, 700.0));
    assert!(feed(&e, &set, &events).await.is_empty());
}

#[tokio::test]
async fn sequences_slide_with_their_latest_start() {
    let (e, set) = setup(TAKEOVER);
    // The last three failures and the success fit in 10 minutes; the first failure,
    // at 0 s, does not, and a sequence counted from it would miss them.
    let events = [0.0, 590.0, 595.0, 598.0]
        .map(|t| ev("10.0.0.4", "/login", 401, t))
        .into_iter()
        .chain([ev("10.0.0.4", "/login", 200, 605.0)])
        .collect::<Vec<_>>();
    let d = feed(&e, &set, &events).await;
    assert_eq!(d.len(), 1, "{d:?}");
    // Low and slow: a failure a minute for ten minutes, then the success.
    let mut events: Vec<_> = (0..=10)
        .map(|i| ev("10.0.0.5", "/login", 401, f64::from(i) * 60.0))
        .collect();
    events.push(ev("10.0.0.5", "/login", 200, 610.0));
    let d = feed(&e, &set, &events).await;
    assert_eq!(d.len(), 1, "{d:?}");
    // Failures spread so that no three of them and the success fit in 10 minutes.
    let events = [0.0, 1.0, 400.0]
        .map(|t| ev("10.0.0.6", "/login", 401, t))
        .into_iter()
        .chain([ev("10.0.0.6", "/login", 200, 700.0)])
        .collect::<Vec<_>>();
    assert!(feed(&e, &set, &events).await.is_empty());
}

#[tokio::test]
async fn sequence_progress_rolls_back() {
    let (e, set) = setup(TAKEOVER);
    let mut events: Vec<_> = (0..3)
        .map(|i| ev("10.0.0.1", "/login", 401, f64::from(i)))
        .collect();
    let r = e.evaluate(&set, &events, at(3.0)).await.unwrap();
    e.rollback(&r).await.unwrap();
    events = vec![ev("10.0.0.1", "/login", 200, 4.0)];
    assert!(
        feed(&e, &set, &events).await.is_empty(),
        "the failures were taken back"
    );
}

#[tokio::test]
async fn tuples_and_user_agents_are_entities() {
    let (e, set) = setup(
        r#"
[[policy]]
id = "pair"
entity = ["user_agent", "ip"]
window = "1m"
threshold = 2
action = "block"

[[policy]]
id = "agent"
entity = "user_agent"
window = "1m"
threshold = 3
action = "log"
"#,
    );
    // The tuple's key is in its one form (`ip` first), whatever the order named.
    let mk = |ip: &str, ua: Option<&str>| {
        let mut x = ev(ip, "/", 200, 1.0);
        x.user_agent = ua.map(str::to_string);
        x
    };
    let events = [
        mk("10.0.0.1", Some("curl/8")),
        mk("10.0.0.1", Some("Mozilla")),
        mk("10.0.0.2", Some("curl/8")),
        mk("10.0.0.1", None),
        mk("10.0.0.1", Some("curl/8")),
    ];
    let d = feed(&e, &set, &events).await;
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
            (
                "pair".to_string(),
                "tuple:ip:10.0.0.1+header:user-agent=curl/8".to_string()
            ),
            ("agent".to_string(), "header:user-agent=curl/8".to_string()),
        ]
    );
}

#[tokio::test]
async fn priorities_order_decisions_and_the_allowlist_wins() {
    let policies = parse_policies(
        r#"
[[policy]]
id = "low"
window = "1m"
threshold = 1
action = "log"

[[policy]]
id = "high"
priority = 5
window = "1m"
threshold = 1
action = "block"
"#,
    )
    .unwrap();
    let active = ActivePolicies {
        revision: 1,
        policies,
        lists: vec![NamedList {
            name: "allowlist".into(),
            kind: ListKind::Ip,
            items: vec!["10.9.0.0/16".into()],
        }],
        allowlist: Some("allowlist".into()),
        ..ActivePolicies::default()
    };
    let set = PolicySet::compile(&active);
    assert!(set.warnings().is_empty(), "{:?}", set.warnings());
    let e = Evaluator::new(
        Arc::new(MemoryState::new(Duration::from_secs(60), 100)),
        "w",
        &Registry::new(),
    );
    let d = feed(&e, &set, &[ev("10.0.0.1", "/", 200, 1.0)]).await;
    let ids: Vec<_> = d.iter().map(|d| d.policy_id.clone().unwrap()).collect();
    assert_eq!(ids, vec!["high", "low"]);
    assert!(
        feed(&e, &set, &[ev("10.9.3.4", "/", 200, 1.0)])
            .await
            .is_empty()
    );
    assert_eq!(
        e.state().stats().entities,
        2,
        "allowlisted addresses are not even tracked"
    );
}
