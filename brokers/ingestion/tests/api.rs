//! The ingestion broker over real HTTP: ingest, claim, ack, reclaim, backpressure,
//! pause/resume, inspection, purge, long-polls and metrics.

mod support;

use std::time::{Duration, Instant};

use esper_ingestion::Config;
use esper_protocol::ClientError;
use esper_protocol::ingestion::{ItemInfo, ItemList, ItemState, QueueStatus};
use serde_json::json;
use support::{
    TestBroker, config, event, events, expect_error, host_address, metric, post_from, tag,
};

const LONG_LEASE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn ingest_claim_ack_round_trip() {
    let b = TestBroker::with_defaults().await;
    let resp = b
        .post("/api/events", json!({ "events": events("e", 3) }))
        .await;
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, json!({ "accepted": 3, "depth": 3 }));

    let claimed = b
        .client
        .claim("w1", 10, LONG_LEASE, Duration::ZERO)
        .await
        .unwrap();
    let tags: Vec<String> = claimed.items.iter().map(|i| tag(&i.event)).collect();
    assert_eq!(tags, ["e0", "e1", "e2"]);
    let ids = claimed.items.iter().map(|i| i.item_id.clone()).collect();
    assert_eq!(b.client.ack("w1", ids).await.unwrap().acked, 3);

    let s = b.client.status().await.unwrap();
    assert_eq!(
        (s.depth, s.leased, s.ingested_total, s.acked_total),
        (0, 0, 3, 3)
    );
    assert_eq!(s.consumers.len(), 1);
    assert_eq!(s.consumers[0].consumer, "w1");
    // An empty batch is fine.
    assert_eq!(b.client.ingest(Vec::new()).await.unwrap().accepted, 0);

    // A client seen through a dual-stack socket is the IPv4 client it is.
    let mut mapped = event("mapped");
    mapped.client_ip = "::ffff:192.0.2.8".parse().unwrap();
    b.client.ingest(vec![mapped]).await.unwrap();
    let claimed = b
        .client
        .claim("w1", 10, LONG_LEASE, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        claimed.items[0].event.client_ip,
        "192.0.2.8".parse::<std::net::IpAddr>().unwrap()
    );
    b.stop().await;
}

#[tokio::test]
async fn fifo_across_batches() {
    let b = TestBroker::with_defaults().await;
    for prefix in ["a", "b", "c"] {
        b.client.ingest(events(prefix, 2)).await.unwrap();
    }
    let claimed = b
        .client
        .claim("w1", 100, LONG_LEASE, Duration::ZERO)
        .await
        .unwrap();
    let tags: Vec<String> = claimed.items.iter().map(|i| tag(&i.event)).collect();
    assert_eq!(tags, ["a0", "a1", "b0", "b1", "c0", "c1"]);
    b.stop().await;
}

#[tokio::test]
async fn expired_leases_are_reclaimed() {
    let b = TestBroker::with_defaults().await;
    b.client.ingest(vec![event("slow")]).await.unwrap();
    let first = b
        .client
        .claim("dead-worker", 1, Duration::from_millis(200), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(first.items[0].attempts, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let second = b
        .client
        .claim("w2", 1, LONG_LEASE, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(second.items.len(), 1);
    assert_eq!(second.items[0].item_id, first.items[0].item_id);
    assert_eq!(second.items[0].attempts, 2);
    let stale = vec![first.items[0].item_id.clone()];
    assert_eq!(
        b.client
            .ack("dead-worker", stale.clone())
            .await
            .unwrap()
            .acked,
        0
    );
    assert_eq!(b.client.ack("w2", stale).await.unwrap().acked, 1);

    let s = b.client.status().await.unwrap();
    assert_eq!(s.reclaimed_total, 1);
    let text = b.metrics().await;
    assert_eq!(
        metric(&text, "esper_reclaimed_events_total{queue=\"ingestion\"}"),
        Some(1.0)
    );
    b.stop().await;
}

#[tokio::test]
async fn a_full_queue_refuses_whole_batches_with_retry_after() {
    let b = TestBroker::start(Config {
        max_queue_size: 5,
        ..config()
    })
    .await;
    b.client.ingest(events("a", 4)).await.unwrap();
    let resp = b
        .post("/api/events", json!({ "events": events("b", 2) }))
        .await;
    assert_eq!(resp.headers()["retry-after"], "1");
    let body = expect_error(resp, 503, "queue_full").await;
    assert!(body.message.contains("4 of 5"), "{}", body.message);

    let refused = b.client.ingest(events("c", 2)).await;
    match &refused {
        Err(ClientError::Backpressure {
            code, retry_after, ..
        }) => {
            assert_eq!(code, "queue_full");
            assert_eq!(*retry_after, Some(Duration::from_secs(1)));
        }
        other => panic!("expected backpressure, got {other:?}"),
    }
    // The broker's reason is kept for the caller's logs.
    let shown = refused.unwrap_err().to_string();
    assert!(
        shown.contains("4 of 5") && shown.contains("(queue_full)"),
        "{shown}"
    );
    // A batch larger than the whole queue can never fit: a 400, not a retry.
    let resp = b
        .post("/api/events", json!({ "events": events("d", 6) }))
        .await;
    expect_error(resp, 400, "batch_too_large").await;

    let s = b.client.status().await.unwrap();
    assert_eq!((s.depth, s.rejected_total, s.ingested_total), (4, 10, 4));
    let text = b.metrics().await;
    let full = "esper_rejected_events_total{queue=\"ingestion\",reason=\"full\"}";
    assert_eq!(metric(&text, full), Some(4.0));
    assert_eq!(
        metric(&text, "esper_queue_depth{queue=\"ingestion\"}"),
        Some(4.0)
    );
    b.stop().await;
}

#[tokio::test]
async fn pause_refuses_ingest_while_claims_drain() {
    let b = TestBroker::with_defaults().await;
    b.client.ingest(vec![event("before")]).await.unwrap();
    // The seed's `curl -X POST .../pause` sends no body at all.
    let resp = b.http.post(b.url("/api/queue/pause")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let s: QueueStatus = resp.json().await.unwrap();
    assert!(s.paused);

    let resp = b
        .post("/api/events", json!({ "events": [event("during")] }))
        .await;
    assert_eq!(resp.headers()["retry-after"], "5");
    expect_error(resp, 503, "queue_paused").await;
    let claimed = b
        .client
        .claim("w1", 10, LONG_LEASE, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(claimed.items.len(), 1);

    let s = b.client.resume().await.unwrap();
    assert!(!s.paused);
    assert_eq!(s.rejected_total, 1);
    assert_eq!(
        b.client.ingest(vec![event("after")]).await.unwrap().depth,
        1
    );
    let text = b.metrics().await;
    assert_eq!(
        metric(
            &text,
            "esper_rejected_events_total{queue=\"ingestion\",reason=\"paused\"}"
        ),
        Some(1.0)
    );
    b.stop().await;
}

#[tokio::test]
async fn items_can_be_inspected_and_purged() {
    let b = TestBroker::with_defaults().await;
    b.client.ingest(events("i", 3)).await.unwrap();
    let leased = b
        .client
        .claim("w1", 1, LONG_LEASE, Duration::ZERO)
        .await
        .unwrap();

    let list = |q: &'static str| {
        let b = &b;
        async move {
            let resp = b.get(&format!("/api/queue/items{q}")).await;
            assert_eq!(resp.status(), 200);
            resp.json::<ItemList>().await.unwrap().items
        }
    };
    assert_eq!(list("").await.len(), 3);
    assert_eq!(list("?state=pending").await.len(), 2);
    let only = list("?state=leased").await;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].consumer.as_deref(), Some("w1"));
    assert_eq!(list("?limit=1").await.len(), 1);

    let one: ItemInfo = b.client.item(&leased.items[0].item_id).await.unwrap();
    assert_eq!(one.state, ItemState::Leased);
    assert_eq!(tag(&one.event), "i0");
    let resp = b.get("/api/queue/items/999999").await;
    expect_error(resp, 404, "not_found").await;

    assert_eq!(b.client.purge().await.unwrap().purged, 2);
    let s = b.client.status().await.unwrap();
    assert_eq!((s.depth, s.leased), (0, 1));
    b.stop().await;
}

#[tokio::test]
async fn events_claimed_too_often_are_dead_lettered_and_shown() {
    let b = TestBroker::start(Config {
        max_attempts: 1,
        ..config()
    })
    .await;
    b.client.ingest(events("poison", 1)).await.unwrap();
    let lease = Duration::from_millis(50);
    let first = b
        .client
        .claim("w1", 5, lease, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(first.items.len(), 1);
    tokio::time::sleep(Duration::from_millis(120)).await;
    let again = b
        .client
        .claim("w2", 5, lease, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        again.items.is_empty(),
        "a dead letter is never handed out again"
    );

    let resp = b.get("/api/queue/items?state=dead_letter").await;
    assert_eq!(resp.status(), 200);
    let dead = resp.json::<ItemList>().await.unwrap().items;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].state, dead[0].attempts),
        (ItemState::DeadLetter, 1)
    );
    assert_eq!(dead[0].item_id, first.items[0].item_id);
    let s = b.client.status().await.unwrap();
    assert_eq!(
        (s.depth, s.leased, s.dead_letter, s.dead_lettered_total),
        (0, 0, 1, 1)
    );
    assert_eq!(
        metric(
            &b.metrics().await,
            "esper_queue_dead_letter{queue=\"ingestion\"}"
        ),
        Some(1.0)
    );
    assert_eq!(b.client.purge().await.unwrap().purged, 1);
    assert_eq!(b.client.status().await.unwrap().dead_letter, 0);
    b.stop().await;
}

#[tokio::test]
async fn a_long_poll_wakes_as_soon_as_events_arrive() {
    let b = TestBroker::with_defaults().await;
    let client = b.client.clone();
    let poll = tokio::spawn(async move {
        let r = client
            .claim("w1", 10, LONG_LEASE, Duration::from_secs(10))
            .await;
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let sent = Instant::now();
    b.client.ingest(vec![event("wake")]).await.unwrap();
    let (r, answered) = poll.await.unwrap();
    assert_eq!(r.unwrap().items.len(), 1);
    let lag = answered.duration_since(sent);
    assert!(
        lag < Duration::from_millis(500),
        "claim answered {lag:?} after ingest"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_long_poll_returns_early_on_shutdown() {
    let b = TestBroker::with_defaults().await;
    let client = b.client.clone();
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let r = client
            .claim("w1", 10, LONG_LEASE, Duration::from_secs(20))
            .await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.trigger().trigger();
    let (r, took) = poll.await.unwrap();
    assert!(r.unwrap().items.is_empty());
    assert!(took < Duration::from_secs(3), "{took:?}");
    b.stop().await;
}

#[tokio::test]
async fn batch_timeout_lingers_for_fuller_batches_within_wait() {
    let b = TestBroker::start(Config {
        batch_timeout: Duration::from_millis(300),
        ..config()
    })
    .await;
    b.client.ingest(vec![event("one")]).await.unwrap();
    let started = Instant::now();
    let r = b
        .client
        .claim("w1", 10, LONG_LEASE, Duration::from_secs(5))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.items.len(), 1);
    assert!(took >= Duration::from_millis(250), "{took:?}");

    // wait_ms = 0 never waits, linger or not.
    b.client.ingest(vec![event("two")]).await.unwrap();
    let started = Instant::now();
    let r = b
        .client
        .claim("w1", 10, LONG_LEASE, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r.items.len(), 1);
    assert!(started.elapsed() < Duration::from_millis(200));
    b.stop().await;
}

#[tokio::test]
async fn claim_bounds_are_checked() {
    let b = TestBroker::start(Config {
        max_claim_wait: Duration::from_millis(300),
        ..config()
    })
    .await;
    let bad = [
        (
            json!({"consumer": "w", "max": 0, "lease_ms": 1000}),
            "invalid_claim",
        ),
        (
            json!({"consumer": "w", "max": 10001, "lease_ms": 1000}),
            "invalid_claim",
        ),
        (
            json!({"consumer": "w", "max": 1, "lease_ms": 0}),
            "invalid_claim",
        ),
        (
            json!({"consumer": "w", "max": 1, "lease_ms": 86_400_000u64}),
            "invalid_claim",
        ),
        (
            json!({"consumer": "", "max": 1, "lease_ms": 1000}),
            "invalid_consumer",
        ),
        (
            json!({"consumer": "a\u{7}b", "max": 1, "lease_ms": 1000}),
            "invalid_consumer",
        ),
        (
            json!({"consumer": "w", "max": -1, "lease_ms": 1000}),
            "invalid_body",
        ),
    ];
    for (body, code) in bad {
        let resp = b.post("/api/queue/claim", body.clone()).await;
        let err = expect_error(resp, 400, code).await;
        assert!(!err.message.contains("internal"), "{body}: {}", err.message);
    }
    let resp = b
        .post("/api/queue/ack", json!({"consumer": "", "item_ids": []}))
        .await;
    expect_error(resp, 400, "invalid_consumer").await;

    // An absurd wait is capped at max_claim_wait, not refused.
    let started = Instant::now();
    let resp = b
        .post(
            "/api/queue/claim",
            json!({"consumer": "w", "max": 1, "lease_ms": 1000, "wait_ms": 1_000_000_000_000u64}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    b.stop().await;
}

#[tokio::test]
async fn health_and_metrics_describe_the_broker() {
    let b = TestBroker::with_defaults().await;
    for path in ["/healthz", "/readyz", "/healthz/detailed"] {
        assert_eq!(b.get(path).await.status(), 200, "{path}");
    }
    let detailed: serde_json::Value = b.get("/healthz/detailed").await.json().await.unwrap();
    assert_eq!(detailed["status"], "ok");
    assert_eq!(detailed["components"][0]["name"], "queue_store");
    assert!(b.client.ready().await);

    b.client.ingest(events("m", 2)).await.unwrap();
    let resp = b.http.get(b.url("/metrics")).send().await.unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    assert_eq!(
        metric(&text, "esper_queue_depth{queue=\"ingestion\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "esper_ingested_events_total{queue=\"ingestion\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            "esper_requests_total{method=\"POST\",route=\"/api/events\",status=\"202\"}"
        ),
        Some(1.0)
    );
    assert!(text.contains("esper_request_duration_seconds_bucket"));
    b.stop().await;
}

#[tokio::test]
async fn start_fails_clearly_when_redis_is_unreachable() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_trigger, shutdown) = esper_common::shutdown::Shutdown::new();
    let cfg = Config {
        redis_url: Some(format!("redis://:pw@127.0.0.1:{port}")),
        ..config()
    };
    let err = esper_ingestion::start(cfg, listener, shutdown)
        .await
        .err()
        .expect("start must fail")
        .to_string();
    assert!(
        err.starts_with("ingestion broker: queue store unavailable: cannot reach Redis"),
        "{err}"
    );
    assert!(!err.contains("pw@"), "{err}");
}

#[tokio::test]
async fn without_a_token_only_loopback_clients_may_purge_the_queue() {
    let b = TestBroker::start_on(config(), "0.0.0.0:0").await;
    b.client.ingest(events("p", 2)).await.unwrap();
    if let Some(host) = host_address() {
        let (status, body) = post_from(host, host, b.port(), "/api/queue/purge").await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"], "token_required");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("ESPER_BROKER_TOKEN"), "{message}");
        assert_eq!(b.client.status().await.unwrap().depth, 2, "nothing purged");
        // The rest of the API stays open to it, as configured.
        let (status, _) = post_from(host, host, b.port(), "/api/queue/pause").await;
        assert_eq!(status, 200);
    } else {
        eprintln!("no address besides loopback on this host: the refusal is not exercised");
    }
    let loopback = "127.0.0.1".parse().unwrap();
    let (status, body) = post_from(loopback, loopback, b.port(), "/api/queue/purge").await;
    assert_eq!((status, body), (200, json!({"purged": 2})));
    b.stop().await;
}
