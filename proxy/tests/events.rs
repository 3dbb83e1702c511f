//! Sampled request events reach the real ingestion broker with the request's facts and
//! the right weight; backpressure drops are counted and delivery resumes afterwards.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::IpAddr;
use std::time::Duration;

use esper_protocol::{EnforcedAction, hash_cookie_value};
use support::{client_from, config, dead_url, eventually, ingestion, start_proxy, upstream};

#[tokio::test]
async fn events_reach_the_ingestion_broker_with_the_request_facts() {
    let up = upstream().await;
    let broker = ingestion().await;
    let mut cfg = config(up.addr, &broker.url, &dead_url());
    cfg.app = "shop".into();
    cfg.report_cookies = vec!["session".into()];
    let proxy = start_proxy(cfg).await;
    let client = client_from("127.0.0.1");

    let resp = client
        .get(format!("{}/", proxy.url))
        .header("user-agent", "esper-test/1")
        .header("accept-language", "de-CH")
        .header("cookie", "session=abc123; theme=dark")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let resp = client
        .post(format!("{}/login", proxy.url))
        .header("x-request-id", "client-chosen-1")
        .body("user=a")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let mut events = broker.claim_events(2, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 2, "{events:?}");
    events.sort_by_key(|e| e.path.clone());
    let (get, post) = (&events[0], &events[1]);
    assert_eq!(
        (get.method.as_str(), get.path.as_str(), get.status),
        ("GET", "/", 200)
    );
    assert_eq!(
        (post.method.as_str(), post.path.as_str(), post.status),
        ("POST", "/login", 401)
    );
    for ev in &events {
        assert_eq!(ev.app, "shop");
        assert_eq!(ev.proxy_id, "proxy-test");
        assert_eq!(ev.client_ip, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(ev.host, proxy.url.trim_start_matches("http://"));
        assert_eq!(ev.action, EnforcedAction::Allow);
        assert_eq!(ev.weight, 1.0);
        assert!(ev.latency_us > 0);
    }
    // The event id is the request id this proxy made (so a block page's id finds its
    // event), but never one the client chose: that could make the engine deduplicate
    // its events away.
    assert_eq!(get.id, request_id);
    assert_ne!(post.id, "client-chosen-1");
    assert!(!post.id.is_empty());
    assert_ne!(get.id, post.id);
    assert_eq!(get.bytes, "hello from upstream".len() as u64);
    assert_eq!(get.user_agent.as_deref(), Some("esper-test/1"));
    assert_eq!(get.headers["accept-language"], "de-CH");
    assert_eq!(get.cookies.len(), 1);
    assert_eq!(get.cookies["session"], hash_cookie_value("abc123"));
    assert!(post.cookies.is_empty());

    let sent = eventually(Duration::from_secs(2), || async {
        proxy.metric("esper_proxy_events_sent_total").await == 2.0
    })
    .await;
    assert!(sent);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn sampling_at_one_half_reports_about_half_with_weight_two() {
    let up = upstream().await;
    let broker = ingestion().await;
    let mut cfg = config(up.addr, &broker.url, &dead_url());
    cfg.sample_rate = 0.5;
    let proxy = start_proxy(cfg).await;
    let client = client_from("127.0.0.1");
    for _ in 0..60 {
        let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    // Every request is reported or not by the time its response is read; the stop
    // flushes what is still queued.
    proxy.stop().await.unwrap();
    let events = broker.claim_events(60, Duration::from_millis(500)).await;
    assert!(
        (10..=50).contains(&events.len()),
        "{} of 60 sampled at 0.5",
        events.len()
    );
    assert!(events.iter().all(|e| e.weight == 2.0));
}

#[tokio::test]
async fn backpressure_drops_are_counted_and_delivery_resumes() {
    let up = upstream().await;
    let broker = ingestion().await;
    let proxy = start_proxy(config(up.addr, &broker.url, &dead_url())).await;
    let client = client_from("127.0.0.1");

    broker.client.pause().await.unwrap();
    for _ in 0..3 {
        client.get(format!("{}/", proxy.url)).send().await.unwrap();
    }
    let dropped = eventually(Duration::from_secs(5), || async {
        proxy
            .metric("esper_proxy_events_dropped_total{reason=\"backpressure\"}")
            .await
            >= 3.0
    })
    .await;
    assert!(dropped, "refused batches are dropped and counted");

    broker.client.resume().await.unwrap();
    client.get(format!("{}/", proxy.url)).send().await.unwrap();
    let events = broker.claim_events(1, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 1);
    let sent = eventually(Duration::from_secs(2), || async {
        proxy.metric("esper_proxy_events_sent_total").await == 1.0
    })
    .await;
    assert!(sent);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn queued_events_are_flushed_at_shutdown() {
    let up = upstream().await;
    let broker = ingestion().await;
    let mut cfg = config(up.addr, &broker.url, &dead_url());
    // Long enough that nothing is sent before the stop.
    cfg.flush_interval = Duration::from_secs(30);
    let proxy = start_proxy(cfg).await;
    let client = client_from("127.0.0.1");
    for _ in 0..5 {
        client.get(format!("{}/", proxy.url)).send().await.unwrap();
    }
    proxy.stop().await.unwrap();
    let events = broker.claim_events(5, Duration::from_secs(2)).await;
    assert_eq!(events.len(), 5);
}

/// The flush timer runs only while events come in: the first event after a quiet spell
/// is sent at once, and one that follows it within the interval waits for the interval,
/// however quiet the proxy is after it.
#[tokio::test]
async fn events_after_a_quiet_spell_go_at_once_and_the_rest_within_the_interval() {
    let up = upstream().await;
    let broker = ingestion().await;
    let mut cfg = config(up.addr, &broker.url, &dead_url());
    let interval = Duration::from_secs(4);
    cfg.flush_interval = interval;
    let proxy = start_proxy(cfg).await;
    let client = client_from("127.0.0.1");
    let get = |path: &'static str| {
        let client = client.clone();
        let url = format!("{}{path}", proxy.url);
        // A 404 from the upstream: reported like any answer.
        async move {
            client.get(url).send().await.unwrap();
        }
    };

    // Past the first interval, which brought nothing: the forwarder waits untimed.
    tokio::time::sleep(interval + Duration::from_millis(500)).await;
    let first_sent = tokio::time::Instant::now();
    get("/first").await;
    let events = broker.claim_events(1, Duration::from_secs(1)).await;
    assert_eq!(events.len(), 1, "the first event did not wait for a timer");
    assert_eq!(events[0].path, "/first");

    get("/second").await;
    assert!(
        broker
            .claim_events(1, Duration::from_secs(1))
            .await
            .is_empty(),
        "an event within the interval is batched, not sent at once"
    );
    let events = broker.claim_events(1, interval * 2).await;
    assert_eq!(events.len(), 1, "sent by the timer with no further traffic");
    assert_eq!(events[0].path, "/second");
    assert!(
        first_sent.elapsed() >= interval - Duration::from_millis(100),
        "not before the interval ran out"
    );
    proxy.stop().await.unwrap();
}

/// Events recorded with `record_events` replay through the policies-test code
/// (`esperctl policies test --events FILE`) to the decision the live engine would make.
#[tokio::test]
async fn recorded_events_replay_to_the_expected_decision() {
    let up = upstream().await;
    let broker = ingestion().await;
    let path = std::env::temp_dir().join(format!(
        "esper-record-{}-{:?}.jsonl",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    let mut cfg = config(up.addr, &broker.url, &dead_url());
    cfg.app = "shop".into();
    cfg.record_events = Some(path.clone());
    let proxy = start_proxy(cfg).await;
    let attacker = client_from("127.0.0.1");
    for _ in 0..12 {
        let resp = attacker
            .post(format!("{}/login", proxy.url))
            .body("user=a&password=guess")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    let resp = attacker
        .get(format!("{}/", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Recorded by the forwarder as it sends them, within a flush interval.
    let recorded = eventually(Duration::from_secs(5), || async {
        std::fs::read_to_string(&path).is_ok_and(|t| t.lines().count() == 13)
    })
    .await;
    assert!(recorded, "13 lines expected in {}", path.display());
    proxy.stop().await.unwrap();
    // Every event reached the broker too: recording is beside sending, not instead.
    assert_eq!(
        broker.claim_events(13, Duration::from_secs(5)).await.len(),
        13
    );

    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let events = esper_engine::replay::read_events(&text).unwrap();
    assert_eq!(events.len(), 13);
    assert!(
        events
            .iter()
            .all(|e| e.app == "shop" && e.proxy_id == "proxy-test")
    );
    let policy = include_str!("../../conf/policies/login-brute-force.toml");
    let specs = esper_engine::parse_policies(policy).unwrap();
    let report = esper_engine::replay::replay_specs(specs, &events)
        .await
        .unwrap();
    assert_eq!(report.events, 13);
    assert_eq!(report.decisions.len(), 1, "{report:?}");
    let d = &report.decisions[0];
    assert_eq!(d.policy, "login-brute-force");
    assert_eq!(d.entity.to_string(), "ip:127.0.0.1");
    assert_eq!(d.action, esper_protocol::Action::Block);
    // The tenth failure crosses the threshold of 10.
    assert_eq!(d.event_id, events[9].id);
}

/// Writes a policy document (TOML) to the control plane at `control`.
async fn apply_policies(control: &str, toml: &str) {
    let resp = reqwest::Client::new()
        .post(format!("{control}/api/v1/policies"))
        .bearer_auth(support::CONTROL_TOKEN)
        .header("content-type", "application/toml")
        .body(toml.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

#[tokio::test]
async fn events_carry_what_the_control_planes_policies_read() {
    let up = upstream().await;
    let broker = ingestion().await;
    let control = support::control_plane().await;
    let mut cfg = config(up.addr, &broker.url, &dead_url());
    cfg.control_url = Some(control.url.clone());
    cfg.control_token = Some(support::CONTROL_TOKEN.into());
    cfg.report_headers = vec!["accept-language".into()];
    let proxy = start_proxy(cfg.clone()).await;
    let client = client_from("127.0.0.1");
    // Sends one request and claims its event.
    let event = || async {
        let resp = client
            .get(format!("{}/", proxy.url))
            .header("accept-language", "fr")
            .header("x-api-key", "key-1")
            .header("x-login-user", "ann")
            .header("cookie", "cart=c1; theme=dark")
            .header("authorization", "Bearer secret")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut events = broker.claim_events(1, Duration::from_secs(5)).await;
        assert_eq!(events.len(), 1, "{events:?}");
        events.remove(0)
    };
    let names = |ev: &esper_protocol::RequestEvent| {
        let mut h: Vec<String> = ev.headers.keys().cloned().collect();
        h.sort();
        let mut c: Vec<String> = ev.cookies.keys().cloned().collect();
        c.sort();
        (h, c)
    };
    let ev = event().await;
    assert_eq!(names(&ev), (vec!["accept-language".into()], vec![]));

    // Policies that read a header, another as their distinct value, and a cookie.
    apply_policies(
        &control.url,
        r#"
[[policy]]
id = "api-key-abuse"
entity = "header:x-api-key"
window = "1m"
threshold = 100
action = "throttle"
rate = 5

[[policy]]
id = "stuffing"
window = "10m"
aggregate = 'distinct(headers["X-Login-User"])'
threshold = 20
filter = 'cookies["cart"] != ""'
action = "block"

[[policy]]
id = "bearers"
window = "1m"
threshold = 100
filter = 'has(headers["authorization"]) && headers["cookie"] != ""'
action = "log"
"#,
    )
    .await;
    let reported = eventually(Duration::from_secs(5), || async {
        let ev = event().await;
        names(&ev).0.len() == 3
    })
    .await;
    assert!(reported, "the policies' headers reach the events");
    let ev = event().await;
    assert_eq!(
        names(&ev),
        (
            vec![
                "accept-language".into(),
                "x-api-key".into(),
                "x-login-user".into()
            ],
            vec!["cart".into()]
        )
    );
    assert_eq!(ev.headers["x-api-key"], "key-1");
    // Credentials are never reported for a policy: only a proxy's own list can name them.
    assert!(!ev.headers.contains_key("authorization"), "{ev:?}");
    assert!(!ev.headers.contains_key("cookie"), "{ev:?}");
    assert_eq!(ev.cookies["cart"], hash_cookie_value("c1"));
    let health: serde_json::Value = reqwest::get(format!(
        "http://{}/healthz/detailed",
        proxy.handle().ops_addr()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(
        health.to_string().contains("x-login-user"),
        "health names what the policies read: {health}"
    );

    // A reload replaces the proxy's own list and keeps what the policies read.
    let mut next = cfg.clone();
    next.report_headers = vec!["referer".into()];
    proxy.handle().reload(next).await.unwrap();
    let ev = event().await;
    assert_eq!(
        names(&ev).0,
        ["x-api-key".to_string(), "x-login-user".into()]
    );

    // Disabled, a policy no longer has its header reported.
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/policies/stuffing/disable", control.url))
        .bearer_auth(support::CONTROL_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let dropped = eventually(Duration::from_secs(5), || async {
        names(&event().await) == (vec!["x-api-key".into()], vec![])
    })
    .await;
    assert!(
        dropped,
        "a disabled policy's header and cookie are no longer reported"
    );
    proxy.stop().await.unwrap();
    control.stop().await;
}
