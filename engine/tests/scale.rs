//! Scaling out changes nothing: one recorded event log, evaluated by one worker and by
//! four concurrent workers sharing Redis state, or sharing PostgreSQL state, gives the
//! same decisions (same entities, same policies, same counted values), each event
//! counted exactly once. Real ingestion and mitigation brokers over HTTP, real workers,
//! a real `redis-server` and a real PostgreSQL cluster.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use esper_engine::worker::StateBackendKind;
use esper_protocol::RequestEvent;
use support::*;

const POLICIES: &str = r#"
[[policy]]
id = "login-brute-force"
entity = "ip"
window = "5m"
threshold = 10
action = "block"
ttl = "10m"
[policy.match]
methods = ["POST"]
paths = ["/login"]
statuses = [401]
[[policy.escalation]]
threshold = 20
action = "block"
ttl = "30m"

[[policy]]
id = "page-scan"
entity = "ip"
window = "5m"
threshold = 5
aggregate = "distinct(path)"
action = "throttle"
rate = 1
burst = 2
ttl = "10m"
[policy.match]
methods = ["GET"]
path_prefixes = ["/p/"]

[[policy]]
id = "api-user"
entity = "header:x-api-key"
window = "5m"
threshold = 15
action = "tarpit"
delay = "2s"
ttl = "10m"
[policy.match]
path_prefixes = ["/api/"]
"#;

const IPS: u32 = 40;
const USERS: u32 = 12;

fn ip(i: u32) -> IpAddr {
    format!("10.9.{}.{}", i / 200, i % 200 + 1).parse().unwrap()
}

/// The log: per address `i`, `i % 25` failed logins and `i % 8` distinct pages (each
/// fetched twice); per API key `u`, `u * 2` API calls; all in the same minute, in a fixed
/// shuffled order, with every seventh event sent twice.
fn recorded_log() -> Vec<RequestEvent> {
    let mut events = Vec::new();
    for i in 0..IPS {
        for _ in 0..i % 25 {
            let mut e = RequestEvent::new(ip(i), "POST", "/login");
            e.status = 401;
            events.push(e);
        }
        for k in 0..i % 8 {
            for _ in 0..2 {
                events.push(RequestEvent::new(ip(i), "GET", &format!("/p/{k}")));
            }
        }
    }
    for u in 0..USERS {
        for n in 0..u * 2 {
            let mut e = RequestEvent::new(ip(IPS + n % 3), "GET", "/api/orders");
            e.headers.insert("x-api-key".into(), format!("key-{u}"));
            events.push(e);
        }
    }
    let now = chrono::Utc::now();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (n, e) in events.iter_mut().enumerate() {
        e.id = format!("log-{n:05}");
        e.timestamp = now - chrono::Duration::milliseconds((next() % 20_000) as i64);
    }
    for i in (1..events.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        events.swap(i, j);
    }
    let again: Vec<_> = events.iter().step_by(7).cloned().collect();
    events.extend(again);
    events
}

/// What the log must decide, worked out from its design: (policy, entity, counted).
fn expected() -> BTreeSet<(String, String, String)> {
    let mut want = BTreeSet::new();
    for i in 0..IPS {
        let entity = format!("ip:{}", ip(i));
        if i % 25 >= 10 {
            want.insert(("login-brute-force".into(), entity.clone(), "10".into()));
        }
        if i % 25 >= 20 {
            want.insert(("login-brute-force".into(), entity.clone(), "20".into()));
        }
        if i % 8 >= 5 {
            want.insert(("page-scan".into(), entity, "5".into()));
        }
    }
    for u in 0..USERS {
        if u * 2 >= 15 {
            want.insert((
                "api-user".into(),
                format!("header:x-api-key=key-{u}"),
                "15".into(),
            ));
        }
    }
    want
}

/// Runs the log through `workers` workers sharing one fresh Redis (key prefix) or
/// PostgreSQL (database) state; returns the decisions and the events the workers
/// counted in all.
async fn evaluate(
    log: &[RequestEvent],
    workers: usize,
    backend: StateBackendKind,
) -> (BTreeSet<(String, String, String)>, f64) {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("scale");
    let policies = dir.write("policies.toml", POLICIES);
    let prefix = redis_server::unique_prefix("scale").replace('-', "_");
    let database = match backend {
        StateBackendKind::Postgres => postgres::shared().fresh_database().await,
        _ => String::new(),
    };
    let mut running = Vec::new();
    for w in 0..workers {
        let mut config = worker_config(&ing.url(), &mit.url(), policies.clone());
        config.worker_id = format!("worker-{w}");
        config.batch_size = 16;
        config.state_backend = backend;
        match backend {
            StateBackendKind::Postgres => {
                config.state_database_url = database.clone();
                config.state_database_pool = 2;
            }
            _ => {
                config.state_redis_url = redis_server::shared().url();
                config.state_key_prefix = prefix.clone();
            }
        }
        config.evaluation_timeout = Duration::from_secs(1);
        running.push(worker(config).await);
    }
    let (ingest, mitigations) = clients(&ing.url(), &mit.url());
    for chunk in log.chunks(100) {
        ingest.ingest(chunk.to_vec()).await.unwrap();
    }
    drained(&ingest, Duration::from_secs(60)).await;
    let active = mitigations.active(None).await.unwrap();
    let decisions = active
        .mitigations
        .iter()
        .map(|m| {
            let counted = m.reason.summary.split(' ').next().unwrap_or("").to_string();
            (
                m.reason.policy_id.clone().unwrap_or_default(),
                m.entity.to_string(),
                counted,
            )
        })
        .collect::<BTreeSet<_>>();
    assert_eq!(decisions.len(), active.total, "one decision per crossing");
    let mut counted = 0.0;
    for w in running {
        counted += sample(&metrics(&w.url()).await, "esper_events_evaluated_total");
        w.stop().await.unwrap();
    }
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
    (decisions, counted)
}

/// One worker, then four, over fresh `backend` state: the decisions the log must make,
/// the same both times, each event counted once.
async fn one_and_four_decide_the_same(backend: StateBackendKind) {
    let log = recorded_log();
    let distinct = log
        .iter()
        .map(|e| e.id.as_str())
        .collect::<BTreeSet<_>>()
        .len();
    assert!(log.len() > distinct, "the log repeats some events");
    let want = expected();
    let (one, counted_one) = evaluate(&log, 1, backend).await;
    assert_eq!(one, want);
    let (four, counted_four) = evaluate(&log, 4, backend).await;
    assert_eq!(four, one, "four workers decide what one worker decides");
    assert_eq!(counted_one, distinct as f64, "each event counted once");
    assert_eq!(
        counted_four, distinct as f64,
        "each event counted once, in all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_and_four_workers_decide_the_same_over_redis() {
    one_and_four_decide_the_same(StateBackendKind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_and_four_workers_decide_the_same_over_postgres() {
    one_and_four_decide_the_same(StateBackendKind::Postgres).await;
}
