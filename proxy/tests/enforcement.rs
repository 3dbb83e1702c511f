//! Mitigations published to the real mitigation broker reach the proxy through the delta
//! stream and are enforced per client address: block (HTML or JSON), CIDR, app scope,
//! throttle, tarpit, revoke, expiry; and the cache keeps working while the brokers are down.

mod support;

use std::time::Duration;

use esper_protocol::mitigation::RevokeRequest;
use esper_protocol::{Action, Scope};
use support::{
    client_from, config, dead_url, eventually, ingestion, mitigations, mitigations_on, start_proxy,
    status_from, upstream, wait_for_status,
};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_published_block_stops_one_client_and_revoke_lifts_it() {
    let up = upstream().await;
    let broker = mitigations().await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &broker.url)).await;
    assert_eq!(status_from("127.0.0.2", &proxy.url).await, 200);

    let m = broker
        .publish("ip:127.0.0.2", Action::Block, Duration::from_secs(600))
        .await;
    assert!(
        wait_for_status("127.0.0.2", &proxy.url, 403, SECOND).await,
        "blocked within a second of publishing"
    );
    assert_eq!(status_from("127.0.0.3", &proxy.url).await, 200);

    // A browser gets an HTML page, an API client JSON; both carry the request id.
    let blocked = client_from("127.0.0.2");
    let resp = blocked.get(format!("{}/", proxy.url)).send().await.unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let page = resp.text().await.unwrap();
    assert!(
        page.contains("403 Forbidden") && page.contains(&id),
        "{page}"
    );
    let resp = blocked
        .post(format!("{}/login", proxy.url))
        .header("accept", "application/json")
        .header("x-request-id", "api-call-7")
        .body("user=a")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "blocked");
    assert_eq!(body["request_id"], "api-call-7");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(
        up.seen.lock().len(),
        2,
        "blocked requests never reach the upstream"
    );

    let revoked = broker
        .client
        .revoke(&RevokeRequest {
            id: Some(m.id.clone()),
            entity: None,
        })
        .await
        .unwrap();
    assert_eq!(revoked.revoked, 1);
    assert!(
        wait_for_status("127.0.0.2", &proxy.url, 200, SECOND).await,
        "revoking lifts the block"
    );
    assert!(proxy.metric("esper_proxy_deltas_applied_total").await >= 2.0);
    assert_eq!(proxy.metric("esper_proxy_stream_connected").await, 1.0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn cidr_and_scope_decide_who_is_covered() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.app = "shop".into();
    let proxy = start_proxy(cfg).await;

    broker
        .publish("cidr:127.0.1.0/24", Action::Block, Duration::from_secs(600))
        .await;
    let mut elsewhere = esper_protocol::Mitigation::new(
        "ip:127.0.3.1".parse().unwrap(),
        Action::Block,
        Duration::from_secs(600),
        esper_protocol::Origin::Manual,
        Default::default(),
    );
    elsewhere.scope = Scope::App("blog".into());
    broker.publish_one(elsewhere).await;
    let mut here = esper_protocol::Mitigation::new(
        "ip:127.0.3.2".parse().unwrap(),
        Action::Block,
        Duration::from_secs(600),
        esper_protocol::Origin::Manual,
        Default::default(),
    );
    here.scope = Scope::App("shop".into());
    broker.publish_one(here).await;

    assert!(wait_for_status("127.0.3.2", &proxy.url, 403, SECOND).await);
    assert_eq!(status_from("127.0.1.7", &proxy.url).await, 403);
    assert_eq!(status_from("127.0.1.250", &proxy.url).await, 403);
    assert_eq!(status_from("127.0.2.7", &proxy.url).await, 200);
    // Scoped to another app: not enforced here.
    assert_eq!(status_from("127.0.3.1", &proxy.url).await, 200);
    let counted = eventually(SECOND, || async {
        proxy.metric("esper_proxy_cache_entries").await == 3.0
    })
    .await;
    assert!(counted);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_throttle_answers_429_with_retry_after() {
    let up = upstream().await;
    let broker = mitigations().await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &broker.url)).await;
    broker
        .publish(
            "ip:127.0.0.4",
            Action::Throttle {
                rate: 0.2,
                burst: 3,
            },
            Duration::from_secs(600),
        )
        .await;
    assert!(
        wait_for_status("127.0.0.4", &proxy.url, 429, Duration::from_secs(2)).await,
        "the burst runs out"
    );
    let resp = client_from("127.0.0.4")
        .get(format!("{}/", proxy.url))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // Other clients are not throttled.
    for _ in 0..5 {
        assert_eq!(status_from("127.0.0.5", &proxy.url).await, 200);
    }
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_tarpit_delays_the_answer_within_its_bounds() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.tarpit_max = Duration::from_millis(600);
    cfg.tarpit_concurrency = 1;
    let proxy = start_proxy(cfg).await;
    // Asks for a minute: held for tarpit_max, then forwarded.
    broker
        .publish(
            "ip:127.0.0.6",
            Action::Tarpit { delay_ms: 60_000 },
            Duration::from_secs(600),
        )
        .await;
    let timed = |from: &'static str| {
        let url = format!("{}/", proxy.url);
        async move {
            let started = std::time::Instant::now();
            let resp = client_from(from).get(url).send().await.unwrap();
            (resp.status().as_u16(), started.elapsed())
        }
    };
    let held = eventually(2 * SECOND, || async {
        timed("127.0.0.6").await.1 >= Duration::from_millis(500)
    })
    .await;
    assert!(held, "the tarpit holds the request");
    let (status, took) = timed("127.0.0.6").await;
    assert_eq!(status, 200, "then the request is answered by the app");
    assert!(
        took >= Duration::from_millis(590) && took < Duration::from_secs(10),
        "held for tarpit_max, not the minute asked: {took:?}"
    );
    // One request held at a time: a second one at once is refused, not queued.
    let (first, second) = tokio::join!(timed("127.0.0.6"), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        timed("127.0.0.6").await
    });
    assert_eq!(first.0, 200);
    assert_eq!(second.0, 429, "the tarpit is full");
    assert!(second.1 < Duration::from_millis(500), "{:?}", second.1);
    // Other clients are not delayed.
    let (status, took) = timed("127.0.0.7").await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_millis(500), "{took:?}");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_tarpitted_request_whose_client_left_is_dropped_and_frees_its_slot() {
    use tokio::io::AsyncWriteExt;
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.tarpit_concurrency = 1;
    let proxy = start_proxy(cfg).await;
    broker
        .publish(
            "ip:127.0.0.8",
            Action::Tarpit { delay_ms: 1_500 },
            Duration::from_secs(600),
        )
        .await;
    let timed = || {
        let url = format!("{}/", proxy.url);
        async move {
            let started = std::time::Instant::now();
            let resp = client_from("127.0.0.8").get(url).send().await.unwrap();
            (resp.status().as_u16(), started.elapsed())
        }
    };
    let held = eventually(3 * SECOND, || async {
        timed().await.1 >= Duration::from_millis(1_400)
    })
    .await;
    assert!(held, "the tarpit holds the request");
    let forwarded = up.seen.lock().len();

    // A client that gives up while held (as bots do by the thousand): its request is
    // dropped at once, so it neither reaches the app nor keeps the tarpit's one slot.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.8:0".parse().unwrap()).unwrap();
    let addr = proxy.url.trim_start_matches("http://").parse().unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(conn);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, took) = timed().await;
    assert_eq!(status, 200, "the slot was freed when the client left");
    assert!(took >= Duration::from_millis(1_400), "{took:?}");
    assert_eq!(
        up.seen.lock().len(),
        forwarded + 1,
        "only the request whose client waited reached the app"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn enforced_actions_are_reported() {
    let up = upstream().await;
    let events = ingestion().await;
    let broker = mitigations().await;
    let proxy = start_proxy(config(up.addr, &events.url, &broker.url)).await;
    broker
        .publish("ip:127.0.0.2", Action::Block, Duration::from_secs(600))
        .await;
    broker
        .publish("ip:127.0.0.7", Action::Log, Duration::from_secs(600))
        .await;
    assert!(wait_for_status("127.0.0.2", &proxy.url, 403, SECOND).await);
    assert_eq!(status_from("127.0.0.7", &proxy.url).await, 200);
    proxy.stop().await.unwrap();

    let seen = events
        .claim_until(Duration::from_secs(3), |seen| {
            ["127.0.0.2", "127.0.0.7"]
                .iter()
                .all(|ip| seen.iter().any(|e| e.client_ip.to_string() == *ip))
        })
        .await;
    let blocked = seen
        .iter()
        .find(|e| e.client_ip.to_string() == "127.0.0.2" && e.status == 403)
        .expect("an event for the blocked request");
    assert_eq!(blocked.action, esper_protocol::EnforcedAction::Block);
    let logged = seen
        .iter()
        .find(|e| e.client_ip.to_string() == "127.0.0.7")
        .expect("an event for the logged request");
    assert_eq!(logged.action, esper_protocol::EnforcedAction::Log);
    assert_eq!(logged.status, 200);
}

#[tokio::test]
async fn brokers_down_keep_the_cache_enforced_and_expiring() {
    let up = upstream().await;
    let events = ingestion().await;
    let broker = mitigations().await;
    let mitigation_addr = broker.broker.local_addr();
    let proxy = start_proxy(config(up.addr, &events.url, &broker.url)).await;
    broker
        .publish("ip:127.0.0.2", Action::Block, Duration::from_secs(600))
        .await;
    broker
        .publish("ip:127.0.0.6", Action::Block, Duration::from_millis(1500))
        .await;
    assert!(wait_for_status("127.0.0.2", &proxy.url, 403, SECOND).await);
    assert_eq!(status_from("127.0.0.6", &proxy.url).await, 403);

    broker.stop().await;
    events.stop().await;
    let lost = eventually(Duration::from_secs(3), || async {
        proxy.metric("esper_proxy_stream_connected").await == 0.0
    })
    .await;
    assert!(lost, "the proxy notices the stream is gone");

    // Still enforcing what it has, still serving everyone else.
    assert_eq!(status_from("127.0.0.2", &proxy.url).await, 403);
    assert_eq!(status_from("127.0.0.3", &proxy.url).await, 200);
    // Expiry still applies without the broker.
    assert!(wait_for_status("127.0.0.6", &proxy.url, 200, Duration::from_secs(3)).await);
    // Events it cannot send are dropped and counted.
    let dropped = eventually(Duration::from_secs(5), || async {
        proxy
            .metric("esper_proxy_events_dropped_total{reason=\"send_failed\"}")
            .await
            >= 1.0
    })
    .await;
    assert!(dropped);
    let ready = reqwest::get(format!("{}/readyz", proxy.ops_url))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let report: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(report["status"], "degraded");

    // A broker back on the same address is followed again; its (new) state wins.
    let broker = mitigations_on(mitigation_addr).await;
    broker
        .publish("ip:127.0.0.8", Action::Block, Duration::from_secs(600))
        .await;
    assert!(
        wait_for_status("127.0.0.8", &proxy.url, 403, Duration::from_secs(8)).await,
        "the stream resumes after the outage"
    );
    assert_eq!(status_from("127.0.0.2", &proxy.url).await, 200);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_cache_makes_room_for_a_block_by_evicting_a_log() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.cache_max_entries = 3;
    let proxy = start_proxy(cfg).await;
    for i in 1..=3 {
        broker
            .publish(
                &format!("ip:127.0.3.{i}"),
                Action::Log,
                Duration::from_secs(600),
            )
            .await;
    }
    let full = eventually(2 * SECOND, || async {
        proxy.metric("esper_proxy_cache_entries").await == 3.0
    })
    .await;
    assert!(full, "three logs held");
    let block = broker
        .publish("ip:127.0.3.9", Action::Block, Duration::from_secs(600))
        .await;
    assert!(
        wait_for_status("127.0.3.9", &proxy.url, 403, Duration::from_secs(2)).await,
        "the block is enforced in a cache full of logs"
    );
    // The metrics follow the cache's change.
    let counted = eventually(2 * SECOND, || async {
        proxy.metric("esper_proxy_cache_evicted_total").await == 1.0
            && proxy.metric("esper_proxy_cache_entries").await == 3.0
    })
    .await;
    assert!(counted, "one log evicted, three entries held");
    assert_eq!(proxy.metric("esper_proxy_cache_refused_total").await, 0.0);

    // The block revoked, the snapshot reloaded brings the evicted log back.
    let snapshots = proxy.metric("esper_proxy_stream_snapshots_total").await;
    broker
        .client
        .revoke(&RevokeRequest {
            id: Some(block.id.clone()),
            entity: None,
        })
        .await
        .unwrap();
    let reloaded = eventually(2 * SECOND, || async {
        proxy.metric("esper_proxy_stream_snapshots_total").await > snapshots
            && proxy.metric("esper_proxy_cache_entries").await == 3.0
    })
    .await;
    assert!(reloaded, "a snapshot restores the three logs");
    assert_eq!(status_from("127.0.3.9", &proxy.url).await, 200);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_cache_refuses_new_mitigations_and_says_so() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.cache_max_entries = 3;
    let proxy = start_proxy(cfg).await;
    let mut published = Vec::new();
    for i in 1..=5 {
        let m = broker
            .publish(
                &format!("ip:127.0.1.{i}"),
                Action::Block,
                Duration::from_secs(600),
            )
            .await;
        published.push(m);
    }
    let counted = eventually(2 * SECOND, || async {
        proxy.metric("esper_proxy_cache_refused_total").await == 2.0
    })
    .await;
    assert!(counted, "two of five refused");
    assert_eq!(proxy.metric("esper_proxy_cache_entries").await, 3.0);
    let blocked = [
        status_from("127.0.1.1", &proxy.url).await,
        status_from("127.0.1.2", &proxy.url).await,
        status_from("127.0.1.3", &proxy.url).await,
        status_from("127.0.1.4", &proxy.url).await,
        status_from("127.0.1.5", &proxy.url).await,
    ];
    assert_eq!(
        blocked.iter().filter(|s| **s == 403).count(),
        3,
        "{blocked:?}"
    );

    // Room again (one revoked): a fresh snapshot brings in one of those refused.
    let held = blocked.iter().position(|s| *s == 403).unwrap();
    broker
        .client
        .revoke(&RevokeRequest {
            id: Some(published[held].id.clone()),
            entity: None,
        })
        .await
        .unwrap();
    let refilled = eventually(2 * SECOND, || async {
        let mut n = 0;
        for i in 1..=5 {
            if i != held + 1 && status_from(&format!("127.0.1.{i}"), &proxy.url).await == 403 {
                n += 1;
            }
        }
        n == 3
    })
    .await;
    assert!(refilled, "three of the four left are enforced");
    assert_eq!(proxy.metric("esper_proxy_cache_entries").await, 3.0);

    // Room again so soon after: no second snapshot yet. A broker that holds more than
    // the cache can would otherwise have the proxy take a snapshot at every expiry.
    let snapshots = proxy.metric("esper_proxy_stream_snapshots_total").await;
    let mut again = None;
    for i in 1..=5 {
        if i != held + 1 && status_from(&format!("127.0.1.{i}"), &proxy.url).await == 403 {
            again = Some(i - 1);
            break;
        }
    }
    let again = again.expect("a mitigation held");
    broker
        .client
        .revoke(&RevokeRequest {
            id: Some(published[again].id.clone()),
            entity: None,
        })
        .await
        .unwrap();
    let revoked = eventually(2 * SECOND, || async {
        proxy.metric("esper_proxy_cache_entries").await == 2.0
    })
    .await;
    assert!(revoked, "the revocation applied");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        proxy.metric("esper_proxy_stream_snapshots_total").await,
        snapshots,
        "a snapshot for room at most once a minute"
    );
    proxy.stop().await.unwrap();
}
