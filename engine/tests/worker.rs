//! The engine worker against real ingestion and mitigation brokers over HTTP.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use esper_protocol::{Action, Origin};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_the_brute_forcer_once_counts_duplicates_once_and_acks_everything() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("block");
    let policies = dir.write("policies.toml", LOGIN_POLICY);
    let worker = worker(worker_config(&ing.url(), &mit.url(), policies)).await;
    let ops = worker.url();
    let (ingest, mitigations) = clients(&ing.url(), &mit.url());

    // 12 failed logins from .2 (over the threshold), 5 from .3 (under it), and 6 from
    // .4 sent twice each: 12 queue items, but only 6 distinct events, under the threshold.
    let mut events = logins("127.0.0.2", 12);
    events.extend(logins("127.0.0.3", 5));
    let fours = logins("127.0.0.4", 6);
    events.extend(fours.clone());
    ingest.ingest(events).await.unwrap();
    ingest.ingest(fours).await.unwrap();

    drained(&ingest, Duration::from_secs(10)).await;
    let active = mitigations.active(None).await.unwrap();
    assert_eq!(active.total, 1, "{active:?}");
    let m = &active.mitigations[0];
    assert_eq!(m.entity, "ip:127.0.0.2".parse().unwrap());
    assert_eq!(m.action, Action::Block);
    assert_eq!(m.origin, Origin::Policy);
    assert_eq!(m.reason.policy_id.as_deref(), Some("login-brute-force"));
    assert!(
        m.reason
            .summary
            .starts_with("10 weighted events >= 10 in 60s (POST /login 401)"),
        "{}",
        m.reason.summary
    );
    let ttl = m.expires_at - m.created_at;
    assert_eq!(ttl.num_seconds(), 300);

    let text = metrics(&ops).await;
    assert_eq!(
        sample(&text, "esper_events_evaluated_total"),
        23.0,
        "{text}"
    );
    assert_eq!(sample(&text, "esper_duplicate_events_total"), 6.0, "{text}");
    assert_eq!(
        sample(
            &text,
            r#"esper_decisions_total{mode="enforce",policy="login-brute-force"}"#
        ),
        1.0
    );
    assert_eq!(sample(&text, "esper_mitigations_published_total"), 1.0);
    assert_eq!(sample(&text, "esper_policies_loaded"), 1.0);
    assert!(text.contains("esper_evaluation_duration_seconds_bucket"));
    assert!(text.contains("esper_worker_utilization_ratio"));

    let status = ingest.status().await.unwrap();
    assert_eq!((status.depth, status.leased), (0, 0));
    assert_eq!(status.acked_total, 29);
    let ready = reqwest::get(format!("{ops}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);

    worker.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_do_not_wait_do_not_spin_on_an_empty_queue() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("spin");
    let policies = dir.write("policies.toml", LOGIN_POLICY);
    let mut config = worker_config(&ing.url(), &mit.url(), policies);
    config.claim_wait = Duration::ZERO;
    let worker = worker(config).await;
    let claims = || async {
        sample(
            &metrics(&ing.url()).await,
            r#"esper_requests_total{method="POST",route="/api/queue/claim",status="200"}"#,
        )
    };
    // Once the worker is claiming, two slots for one second: about 20 claims at the
    // 100 ms spacing, where a spinning loop makes thousands.
    eventually(Duration::from_secs(5), "the first claims", || async {
        (claims().await > 0.0).then_some(())
    })
    .await;
    let before = claims().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let made = claims().await - before;
    assert!(made <= 60.0, "{made} claims in a second");
    // And it still takes work at once when some comes.
    let (ingest, _) = clients(&ing.url(), &mit.url());
    ingest.ingest(logins("127.0.0.9", 3)).await.unwrap();
    drained(&ingest, Duration::from_secs(5)).await;
    worker.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_is_rolled_back_and_redelivered_events_decide_again() {
    let ing = ingestion().await;
    // The mitigation broker is down at first: its port is known but nothing listens.
    let mit_addr = free_addr().await;
    let mit_url = format!("http://{mit_addr}");
    let dir = TempDir::new("redeliver");
    let policies = dir.write("policies.toml", LOGIN_POLICY);
    let worker = worker(worker_config(&ing.url(), &mit_url, policies)).await;
    let (ingest, mitigations) = clients(&ing.url(), &mit_url);

    ingest.ingest(logins("127.0.0.2", 10)).await.unwrap();
    let ops = worker.url();
    // The worker retries the publish while the lease leaves room, then rolls the batch
    // back and leaves it unacknowledged.
    eventually(Duration::from_secs(10), "a batch given back", || async {
        let text = metrics(&ops).await;
        (sample(&text, r#"esper_batches_total{outcome="retried"}"#) >= 1.0).then_some(())
    })
    .await;
    // Nothing was acknowledged: the events are still in the queue (leased or back).
    let status = ingest.status().await.unwrap();
    assert_eq!(status.depth + status.leased, 10, "{status:?}");
    assert_eq!(status.acked_total, 0);
    let text = metrics(&ops).await;
    assert_eq!(sample(&text, "esper_events_evaluated_total"), 0.0, "{text}");

    // The broker comes up; after the lease the events come back, are counted once more
    // from scratch, decide again and are acknowledged.
    let listener = tokio::net::TcpListener::bind(mit_addr).await.unwrap();
    let mit = mitigation_on(listener).await;
    drained(&ingest, Duration::from_secs(15)).await;
    let active = mitigations.active(None).await.unwrap();
    assert_eq!(active.total, 1, "{active:?}");
    assert_eq!(
        active.mitigations[0].entity,
        "ip:127.0.0.2".parse().unwrap()
    );
    let text = metrics(&ops).await;
    assert_eq!(
        sample(&text, "esper_events_evaluated_total"),
        10.0,
        "{text}"
    );
    assert_eq!(sample(&text, "esper_duplicate_events_total"), 0.0, "{text}");
    assert!(sample(&text, "esper_publish_errors_total") >= 2.0, "{text}");
    assert!(
        sample(&text, r#"esper_batches_total{outcome="acked"}"#) >= 1.0,
        "{text}"
    );

    worker.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mitigation_broker_down_for_many_leases_sends_nothing_to_the_dead_letter_list() {
    // Two attempts per item, leases of 2 s: an outage of 10 s spans five leases.
    let ing = ingestion_with_attempts(2).await;
    let mit_addr = free_addr().await;
    let mit_url = format!("http://{mit_addr}");
    let dir = TempDir::new("outage");
    let policies = dir.write("policies.toml", LOGIN_POLICY);
    let worker = worker(worker_config(&ing.url(), &mit_url, policies)).await;
    let (ingest, mitigations) = clients(&ing.url(), &mit_url);
    ingest.ingest(logins("127.0.0.3", 10)).await.unwrap();
    let ops = worker.url();
    eventually(Duration::from_secs(10), "a batch given back", || async {
        let text = metrics(&ops).await;
        (sample(&text, r#"esper_batches_total{outcome="retried"}"#) >= 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let status = ingest.status().await.unwrap();
    assert_eq!(status.dead_letter, 0, "{status:?}");
    assert_eq!(status.depth + status.leased, 10, "{status:?}");

    let listener = tokio::net::TcpListener::bind(mit_addr).await.unwrap();
    let mit = mitigation_on(listener).await;
    drained(&ingest, Duration::from_secs(15)).await;
    let active = mitigations.active(None).await.unwrap();
    assert_eq!(
        active.total, 1,
        "the decision is made once the broker is back"
    );
    assert_eq!(ingest.status().await.unwrap().dead_lettered_total, 0);
    worker.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_file_is_reloaded() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("reload");
    let policies = dir.write(
        "policies.toml",
        &LOGIN_POLICY.replace("threshold = 10", "threshold = 100"),
    );
    let worker = worker(worker_config(&ing.url(), &mit.url(), policies)).await;
    let ops = worker.url();
    let (ingest, mitigations) = clients(&ing.url(), &mit.url());

    ingest.ingest(logins("127.0.0.5", 3)).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    assert_eq!(mitigations.active(None).await.unwrap().total, 0);

    // A file that does not parse leaves the policies in force.
    dir.write("policies.toml", "[[policy]]\nid = \"broken\"\n");
    let text = eventually(Duration::from_secs(5), "a load error", || async {
        let text = metrics(&ops).await;
        (sample(&text, "esper_policy_load_errors_total") >= 1.0).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "esper_policies_revision"), 1.0);
    assert_eq!(sample(&text, "esper_policies_loaded"), 1.0);

    dir.write(
        "policies.toml",
        &LOGIN_POLICY
            .replace("threshold = 10", "threshold = 3")
            .replace("action = \"block\"", "action = \"tarpit\"\ndelay = \"2s\""),
    );
    eventually(Duration::from_secs(5), "revision 2", || async {
        (sample(&metrics(&ops).await, "esper_policies_revision") == 2.0).then_some(())
    })
    .await;
    ingest.ingest(logins("127.0.0.6", 3)).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    let active = mitigations.active(None).await.unwrap();
    assert_eq!(active.total, 1, "{active:?}");
    assert_eq!(
        active.mitigations[0].action,
        Action::Tarpit { delay_ms: 2000 }
    );

    worker.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_brokers_it_is_not_ready_and_still_stops_cleanly() {
    let dir = TempDir::new("down");
    let policies = dir.write("policies.toml", LOGIN_POLICY);
    let down = format!("http://{}", free_addr().await);
    let worker = worker(worker_config(&down, &down, policies)).await;
    let ops = worker.url();
    eventually(Duration::from_secs(5), "a failed claim", || async {
        (sample(&metrics(&ops).await, "esper_claim_errors_total") >= 1.0).then_some(())
    })
    .await;
    let ready = reqwest::get(format!("{ops}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    let ingestion = body["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ingestion")
        .unwrap();
    assert_eq!(ingestion["healthy"], false);
    assert_eq!(
        reqwest::get(format!("{ops}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    // A wrong method gets the JSON error every API answers with.
    let wrong = reqwest::Client::new()
        .post(format!("{ops}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
    let body: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "method_not_allowed");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_policy_file_is_a_start_up_error() {
    let dir = TempDir::new("bad");
    let policies = dir.write(
        "policies.toml",
        "[[policy]]\nid = \"login\"\nwindow = \"1m\"\nthreshold = 5\naction = \"blok\"\n",
    );
    let config = worker_config("http://127.0.0.1:1", "http://127.0.0.1:1", policies.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_trigger, shutdown) = esper_common::Shutdown::new();
    let err = esper_engine::worker::run(config.clone(), listener, shutdown)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "policies file {}: line 5, column 10: policy \"login\": unknown action \"blok\" (expected block, throttle, tarpit, challenge or log)",
            policies.display()
        )
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_trigger, shutdown) = esper_common::Shutdown::new();
    let bad = esper_engine::worker::Config {
        concurrency: 0,
        ..config
    };
    let err = esper_engine::worker::run(bad, listener, shutdown)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid concurrency = `0`: must be between 1 and 1024"
    );
}

/// The state component of `/readyz` for the worker at `ops`: (ready, healthy, detail).
async fn state_readiness(ops: &str) -> (u16, bool, String) {
    let ready = reqwest::get(format!("{ops}/readyz")).await.unwrap();
    let status = ready.status().as_u16();
    let body: serde_json::Value = ready.json().await.unwrap();
    let state = body["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "state")
        .unwrap()
        .clone();
    (
        status,
        state["healthy"] == true,
        state["detail"].as_str().unwrap_or_default().to_string(),
    )
}

/// Every batch fails while a shared state is down, so the worker is not ready then; it
/// is again once the state answers and the batches go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_is_not_ready_while_its_shared_state_is_down() {
    let mut redis = redis_server::RedisServer::start();
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("state-down");
    let policies = dir.write("policies.toml", LOGIN_POLICY);
    let worker = worker(esper_engine::worker::Config {
        state_backend: esper_engine::worker::StateBackendKind::Redis,
        state_redis_url: redis.url(),
        state_key_prefix: redis_server::unique_prefix("ready").replace('-', "_"),
        ..worker_config(&ing.url(), &mit.url(), policies)
    })
    .await;
    let ops = worker.url();
    let (ingest, _) = clients(&ing.url(), &mit.url());
    ingest.ingest(logins("127.0.0.2", 2)).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    assert_eq!(state_readiness(&ops).await.0, 200);

    redis.stop();
    ingest.ingest(logins("127.0.0.3", 2)).await.unwrap();
    let detail = eventually(Duration::from_secs(10), "an unready state", || async {
        let (status, healthy, detail) = state_readiness(&ops).await;
        (status == 503 && !healthy).then_some(detail)
    })
    .await;
    assert!(detail.contains("Redis"), "{detail}");

    redis.restart();
    drained(&ingest, Duration::from_secs(20)).await;
    let (status, healthy, _) = state_readiness(&ops).await;
    assert_eq!((status, healthy), (200, true));
    worker.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}
