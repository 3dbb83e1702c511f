//! The queue-store suite against Redis, and the Redis-only promises: brokers over one
//! Redis share one queue (and its pause switch), a client given both leaves one that lost
//! its Redis for the other, and a broker rides out a Redis restart.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use esper_ingestion::{Config, RedisQueue};
use esper_protocol::{ClientError, IngestionClient};
use support::redis_server::{RedisServer, shared, unique_prefix};
use support::relay::{Mode, Relay};
use support::store_suite::{
    SUITE_CAPACITY, SUITE_MAX_ATTEMPTS, many_lapsed_leases_go_out_before_new_items,
    queue_store_suite,
};
use support::{TestBroker, config, events, expect_error, tag};

async fn open(url: &str, prefix: &str) -> RedisQueue {
    RedisQueue::open(url, prefix, SUITE_CAPACITY, SUITE_MAX_ATTEMPTS)
        .await
        .unwrap()
}

fn redis_config(url: &str, prefix: &str) -> Config {
    Config {
        redis_url: Some(url.to_string()),
        redis_prefix: prefix.to_string(),
        ..config()
    }
}

#[tokio::test]
async fn redis_queue_passes_the_store_suite() {
    let prefix = unique_prefix("suite");
    queue_store_suite(Arc::new(open(&shared().url(), &prefix).await)).await;
}

#[tokio::test]
async fn many_lapsed_leases_go_out_before_new_items_from_redis() {
    let prefix = unique_prefix("lapsed");
    let store = RedisQueue::open(&shared().url(), &prefix, 5_000, 5)
        .await
        .unwrap();
    many_lapsed_leases_go_out_before_new_items(Arc::new(store)).await;
}

#[tokio::test]
async fn an_event_this_broker_cannot_read_is_skipped_not_the_whole_claim() {
    use esper_ingestion::QueueStore;
    use esper_ingestion::store::ClaimSpec;
    let url = shared().url();
    let prefix = unique_prefix("unreadable");
    let store = RedisQueue::open(&url, &prefix, 100, 2).await.unwrap();
    store.enqueue(events("a", 1)).await.unwrap();
    // An item as another version of the broker might have written it.
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(format!("{{{prefix}}}:ingest:stream"))
        .arg("*")
        .arg("e")
        .arg(r#"{"a_field_from_elsewhere":1}"#)
        .query_async(&mut raw)
        .await
        .unwrap();
    store.enqueue(events("b", 1)).await.unwrap();
    let claim = ClaimSpec {
        consumer: "w1".into(),
        max: 10,
        lease: Duration::from_millis(50),
        wait: Duration::ZERO,
        linger: Duration::ZERO,
    };
    let got = store.claim(&claim).await.unwrap();
    let tags: Vec<String> = got.iter().map(|i| tag(&i.event)).collect();
    assert_eq!(tags, ["a0", "b0"]);
    assert_eq!(store.items(None, 10).await.unwrap().len(), 2);
    let ids: Vec<String> = got.iter().map(|i| i.item_id.clone()).collect();
    assert_eq!(store.ack("w1", &ids).await.unwrap(), 2);
    // The unreadable one lapses and is offered again, then goes to the dead letters
    // after its attempts, where it stays for whoever can read it.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(store.claim(&claim).await.unwrap().is_empty());
    }
    let s = store.status().await.unwrap();
    assert_eq!((s.depth, s.leased, s.dead_letter), (0, 0, 1), "{s:?}");
    store.purge().await.unwrap();
}

#[tokio::test]
async fn no_item_is_handed_out_past_its_attempts_however_many_leases_ran_out() {
    use esper_ingestion::QueueStore;
    use esper_ingestion::store::ClaimSpec;
    let prefix = unique_prefix("attempts");
    let store = RedisQueue::open(&shared().url(), &prefix, 5_000, 1)
        .await
        .unwrap();
    store.enqueue(events("e", 1_500)).await.unwrap();
    let claim = |consumer: &str, max: usize, lease: Duration| ClaimSpec {
        consumer: consumer.to_string(),
        max,
        lease,
        wait: Duration::ZERO,
        linger: Duration::ZERO,
    };
    let first = store
        .claim(&claim("w1", 1_500, Duration::from_millis(10)))
        .await
        .unwrap();
    assert_eq!(first.len(), 1_500);
    tokio::time::sleep(Duration::from_millis(60)).await;
    // 1,500 leases ran out, each item claimed once of its one attempt: more than the
    // first dead-letter pass looks at, and none may go out again.
    let again = store
        .claim(&claim("w2", 100, Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        again.iter().all(|i| i.attempts <= 1),
        "{:?}",
        again.iter().map(|i| i.attempts).collect::<Vec<_>>()
    );
    assert!(again.is_empty(), "{} handed out again", again.len());
    store.purge().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_passes_the_store_suite_split_over_two_connections() {
    // Two stores on one prefix are one queue: the suite holds through either.
    let prefix = unique_prefix("split");
    let url = shared().url();
    let _other = open(&url, &prefix).await;
    queue_store_suite(Arc::new(open(&url, &prefix).await)).await;
}

#[tokio::test]
async fn two_brokers_over_one_redis_share_the_queue_and_its_pause() {
    let prefix = unique_prefix("two");
    let url = shared().url();
    let a = TestBroker::start(redis_config(&url, &prefix)).await;
    let b = TestBroker::start(redis_config(&url, &prefix)).await;

    a.client.ingest(events("a", 3)).await.unwrap();
    b.client.ingest(events("b", 2)).await.unwrap();
    assert_eq!(a.client.status().await.unwrap().depth, 5);
    let claimed = b
        .client
        .claim("w1", 10, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    let tags: Vec<String> = claimed.items.iter().map(|i| tag(&i.event)).collect();
    assert_eq!(tags, ["a0", "a1", "a2", "b0", "b1"]);
    let one = a.client.item(&claimed.items[0].item_id).await.unwrap();
    assert_eq!(one.consumer.as_deref(), Some("w1"));
    let ids: Vec<String> = claimed.items.iter().map(|i| i.item_id.clone()).collect();
    assert_eq!(a.client.ack("w1", ids).await.unwrap().acked, 5);
    let s = b.client.status().await.unwrap();
    assert_eq!((s.depth, s.leased, s.acked_total), (0, 0, 5));

    a.client.pause().await.unwrap();
    assert!(b.client.status().await.unwrap().paused);
    let resp = b
        .post(
            "/api/events",
            serde_json::json!({ "events": events("c", 1) }),
        )
        .await;
    assert_eq!(resp.headers()["retry-after"], "5");
    expect_error(resp, 503, "queue_paused").await;
    b.client.resume().await.unwrap();
    a.client.ingest(events("c", 1)).await.unwrap();

    // A long-poll on one broker wakes for an enqueue through the other.
    let waiter = {
        let client = b.client.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            client
                .claim("w2", 5, Duration::from_secs(30), Duration::from_secs(5))
                .await
                .map(|r| (r.items.len(), started.elapsed()))
        })
    };
    let got = b
        .client
        .claim("w2", 5, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(got.items.len(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.client.ingest(events("d", 1)).await.unwrap();
    let (n, took) = waiter.await.unwrap().unwrap();
    assert_eq!(n, 1);
    assert!(took < Duration::from_secs(2), "{took:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn max_queue_size_holds_across_brokers() {
    let prefix = unique_prefix("full");
    let url = shared().url();
    let cfg = Config {
        max_queue_size: 4,
        ..redis_config(&url, &prefix)
    };
    let a = TestBroker::start(cfg.clone()).await;
    let b = TestBroker::start(cfg).await;
    a.client.ingest(events("a", 3)).await.unwrap();
    match b.client.ingest(events("b", 2)).await {
        Err(ClientError::Backpressure {
            code, retry_after, ..
        }) => {
            assert_eq!(code, "queue_full");
            assert_eq!(retry_after, Some(Duration::from_secs(1)));
        }
        other => panic!("expected backpressure, got {other:?}"),
    }
    assert_eq!(a.client.status().await.unwrap().rejected_total, 2);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_client_leaves_a_broker_that_lost_its_redis_for_one_that_has_it() {
    let prefix = unique_prefix("lost");
    let url = shared().url();
    let redis_addr = url.trim_start_matches("redis://").parse().unwrap();
    // Broker a reaches Redis through a relay the test can cut; b directly.
    let cut = Relay::start(redis_addr).await;
    let a = TestBroker::start(redis_config(&format!("redis://{}", cut.addr), &prefix)).await;
    let b = TestBroker::start(redis_config(&url, &prefix)).await;
    let client = IngestionClient::new(&format!("{},{}", a.base, b.base), None);
    client.ingest(events("a", 2)).await.unwrap();
    assert_eq!(client.endpoints().load().current(), 0);

    cut.set(Mode::Refuse);
    wait_until(
        "broker a unready without its Redis",
        Duration::from_secs(5),
        async || !a.client.ready().await,
    )
    .await;
    // a answers 503 `store_unavailable`: the batch goes on to b, and so do later calls.
    client.ingest(events("b", 2)).await.unwrap();
    assert_eq!(client.endpoints().load().current(), 1);
    let claimed = client
        .claim("w1", 10, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    let tags: Vec<String> = claimed.items.iter().map(|i| tag(&i.event)).collect();
    assert_eq!(tags, ["a0", "a1", "b0", "b1"]);
    let ids = claimed.items.iter().map(|i| i.item_id.clone()).collect();
    assert_eq!(client.ack("w1", ids).await.unwrap().acked, 4);
    let s = b.client.status().await.unwrap();
    assert_eq!((s.depth, s.leased, s.acked_total), (0, 0, 4));

    // A refusal b gives for the queue they share is an answer, not a failure of b.
    b.client.pause().await.unwrap();
    match client.ingest(events("c", 1)).await {
        Err(ClientError::Backpressure { code, .. }) => assert_eq!(code, "queue_paused"),
        other => panic!("expected the pause, got {other:?}"),
    }
    assert_eq!(client.endpoints().load().current(), 1);
    a.stop().await;
    b.stop().await;
}

async fn wait_until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {limit:?}");
}

#[tokio::test]
async fn a_broker_answers_503_while_redis_is_down_and_recovers_on_its_own() {
    let mut server = RedisServer::start();
    let b = TestBroker::start(Config {
        max_queue_size: 10_000,
        ..redis_config(&server.url(), "restart")
    })
    .await;
    b.client.ingest(events("a", 2)).await.unwrap();
    assert!(b.client.ready().await);

    // Load from a producer that keeps sending throughout.
    let producer = {
        let client = b.client.clone();
        tokio::spawn(async move {
            let (mut ok, mut refused) = (0u32, 0u32);
            for _ in 0..60 {
                match client.ingest(events("load", 5)).await {
                    Ok(_) => ok += 1,
                    Err(ClientError::Backpressure { code, .. }) => {
                        assert_eq!(code, "store_unavailable");
                        refused += 1;
                    }
                    Err(e) => panic!("unexpected error while Redis restarts: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop();
    wait_until(
        "readyz 503 while Redis is down",
        Duration::from_secs(5),
        async || !b.client.ready().await,
    )
    .await;
    let resp = b
        .post(
            "/api/events",
            serde_json::json!({ "events": events("x", 1) }),
        )
        .await;
    assert_eq!(resp.headers()["retry-after"], "1");
    expect_error(resp, 503, "store_unavailable").await;
    let resp = b.get("/api/queue/status").await;
    expect_error(resp, 503, "store_unavailable").await;

    server.restart();
    wait_until(
        "readyz 200 after Redis is back",
        Duration::from_secs(10),
        async || b.client.ready().await,
    )
    .await;
    // The restarted Redis kept nothing (no persistence); the queue is usable again.
    b.client.ingest(events("after", 1)).await.unwrap();
    let got = b
        .client
        .claim("w1", 100, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert!(got.items.iter().any(|i| tag(&i.event) == "after0"));
    let (ok, refused) = producer.await.unwrap();
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    b.stop().await;
}

#[tokio::test]
async fn a_redis_out_of_memory_is_not_ready_though_it_answers_ping() {
    let server = RedisServer::start();
    let b = TestBroker::start(redis_config(&server.url(), "oom")).await;
    assert!(b.client.ready().await);
    server.out_of_memory(true);
    assert!(!b.client.ready().await, "every write fails: not ready");
    // A refused write says why, in the store's words.
    let refused = b
        .client
        .ingest(events("oom", 1))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("OOM"), "{refused}");
    server.out_of_memory(false);
    assert!(b.client.ready().await, "ready again once writes succeed");
}
