//! The engine worker following a real control plane: policies and lists from
//! `/api/v1/policies/active`, decisions into the decision log, heartbeats into the fleet
//! view.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use esper_control::{DecisionsResponse, WorkersResponse};
use esper_engine::worker::{Config, StateBackendKind};
use esper_protocol::control::Seen;
use esper_protocol::{DecisionMode, RequestEvent, WorkerHeartbeat};
use reqwest::Method;
use support::relay::{Mode, Relay};
use support::*;

const POLICIES: &str = r#"
[[policy]]
id = "login-brute-force"
window = "60s"
threshold = 10
action = "block"
[policy.match]
methods = ["POST"]
paths = ["/login"]
statuses = [401]
ip_not_in_list = "office"

[[policy]]
id = "scrapers"
mode = "shadow"
entity = "ip/24"
window = "60s"
threshold = 5
action = "throttle"
rate = 1
[policy.match]
path_prefixes = ["/login"]
"#;

fn config(control: &str, ingestion: &str, mitigation: &str) -> Config {
    Config {
        worker_id: "worker-ctl".into(),
        concurrency: 2,
        claim_wait: Duration::from_millis(200),
        ingestion_url: ingestion.into(),
        mitigation_url: mitigation.into(),
        control_url: control.into(),
        control_token: Some(CONTROL_TOKEN.into()),
        policy_refresh: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(200),
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// The control plane's decision log once it holds `n` decisions (waiting up to `limit`).
async fn logged_decisions(api: &str, n: usize, limit: Duration) -> DecisionsResponse {
    eventually(limit, &format!("{n} logged decisions"), || async {
        let log: DecisionsResponse =
            control_request(Method::GET, format!("{api}/api/v1/decisions"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
        (log.decisions.len() == n).then_some(log)
    })
    .await
}

/// The test worker as the fleet view of the control plane at `api` shows it, once it
/// is there.
async fn listed(api: &str) -> Option<Seen<WorkerHeartbeat>> {
    let list: WorkersResponse = control_request(Method::GET, format!("{api}/api/v1/workers"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    list.workers
        .into_iter()
        .find(|w| w.beat.worker_id == "worker-ctl")
}

/// Stops a control plane and the two brokers.
async fn stop_stack(
    ctl: Running<esper_control::Error>,
    ing: Running<esper_ingestion::Error>,
    mit: Running<esper_mitigation::Error>,
) {
    ctl.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

/// Waits until the worker whose ops address is `ops` evaluates `n` policies.
async fn policies_loaded(ops: &str, n: f64) {
    eventually(Duration::from_secs(10), "policies loaded", || async {
        (sample(&metrics(ops).await, "esper_policies_loaded") == n).then_some(())
    })
    .await;
}

/// The office list and [`POLICIES`], through the control plane's API at `api`.
async fn set_up_policies(api: &str) {
    let resp = control_request(Method::PUT, format!("{api}/api/v1/lists/office"))
        .json(&serde_json::json!({"kind": "ip", "items": ["192.0.2.0/24"]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let resp = control_request(Method::POST, format!("{api}/api/v1/policies"))
        .header("content-type", "application/toml")
        .body(POLICIES)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_from_the_control_plane_decisions_into_its_log() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control");
    let ctl = control(&dir, &ing.url(), &mit.url()).await;
    let api = ctl.url();

    set_up_policies(&api).await;

    let worker = worker(config(&api, &ing.url(), &mit.url())).await;
    let ops = worker.url();
    policies_loaded(&ops, 2.0).await;

    // .2 is blocked; the office address is not, however often it fails; both /24s
    // cross the shadow policy's threshold, which only records its decisions.
    let (ingest, mitigations) = clients(&ing.url(), &mit.url());
    let mut events: Vec<RequestEvent> = logins("127.0.0.2", 10);
    events.extend(logins("192.0.2.10", 12));
    ingest.ingest(events).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    let active = mitigations.active(None).await.unwrap();
    assert_eq!(active.total, 1, "{active:?}");
    assert_eq!(
        active.mitigations[0].entity,
        "ip:127.0.0.2".parse().unwrap()
    );

    let log = logged_decisions(&api, 3, Duration::from_secs(10)).await;
    let mut seen: Vec<(String, String, DecisionMode, Option<i64>)> = log
        .decisions
        .iter()
        .map(|l| {
            let d = &l.decision;
            assert_eq!(d.decided_by, "worker-ctl");
            (
                d.policy_id.clone().unwrap(),
                d.mitigation.entity.to_string(),
                d.mode,
                d.policy_version,
            )
        })
        .collect();
    seen.sort_by(|a, b| a.1.cmp(&b.1));
    let expected = [
        ("scrapers", "cidr:127.0.0.0/24", DecisionMode::Shadow),
        ("scrapers", "cidr:192.0.2.0/24", DecisionMode::Shadow),
        ("login-brute-force", "ip:127.0.0.2", DecisionMode::Enforce),
    ];
    assert_eq!(seen.len(), expected.len());
    for ((policy, entity, mode, version), (p, e, m)) in seen.iter().zip(expected) {
        assert_eq!((policy.as_str(), entity.as_str(), *mode), (p, e, m));
        assert!(version.is_some_and(|v| v >= 1), "{version:?}");
    }
    let text = metrics(&ops).await;
    assert_eq!(
        sample(
            &text,
            r#"esper_would_have_mitigated_total{policy="scrapers"}"#
        ),
        2.0
    );

    // The worker shows up in the fleet view.
    let me = listed(&api)
        .await
        .expect("the worker's heartbeat is recorded");
    assert_eq!(me.beat.state_backend, "memory");
    assert!(me.beat.policies_revision >= 2);

    // Disabling a policy reaches the worker.
    let resp = control_request(
        Method::POST,
        format!("{api}/api/v1/policies/scrapers/disable"),
    )
    .send()
    .await
    .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    eventually(Duration::from_secs(10), "one policy loaded", || async {
        (sample(&metrics(&ops).await, "esper_policies_loaded") == 1.0).then_some(())
    })
    .await;

    worker.stop().await.unwrap();
    stop_stack(ctl, ing, mit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_more_than_the_log_takes_in_one_request_are_logged_in_parts() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control-small");
    // Room for the policies, not for more than a few decisions a request.
    let ctl = control_with(esper_control::Config {
        body_limit: 2048,
        ..control_config(&dir, &ing.url(), &mit.url())
    })
    .await;
    let api = ctl.url();
    set_up_policies(&api).await;
    let worker = worker(config(&api, &ing.url(), &mit.url())).await;
    let ops = worker.url();
    policies_loaded(&ops, 2.0).await;
    let (ingest, _) = clients(&ing.url(), &mit.url());
    let events: Vec<RequestEvent> = (2..22)
        .flat_map(|i| logins(&format!("127.0.0.{i}"), 10))
        .collect();
    ingest.ingest(events).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    // 20 blocked addresses and their /24 in shadow mode, none dropped.
    let log = logged_decisions(&api, 21, Duration::from_secs(10)).await;
    let enforced = log
        .decisions
        .iter()
        .filter(|l| l.decision.mode == DecisionMode::Enforce)
        .count();
    assert_eq!(enforced, 20);
    assert_eq!(
        sample(&metrics(&ops).await, "esper_decisions_dropped_total"),
        0.0
    );
    worker.stop().await.unwrap();
    stop_stack(ctl, ing, mit).await;
}

/// `control_url` may list several instances of the control plane, as the broker URLs
/// do: a worker whose first one is down follows the next for policies, decisions and
/// heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_several_control_planes_uses_one_that_answers() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control-instances");
    let ctl = control(&dir, &ing.url(), &mit.url()).await;
    let api = ctl.url();
    set_up_policies(&api).await;
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let worker = worker(config(
        &format!("http://{closed},{api}"),
        &ing.url(),
        &mit.url(),
    ))
    .await;
    policies_loaded(&worker.url(), 2.0).await;
    let (ingest, _) = clients(&ing.url(), &mit.url());
    ingest.ingest(logins("127.0.0.2", 10)).await.unwrap();
    logged_decisions(&api, 2, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "the worker's heartbeat", || {
        listed(&api)
    })
    .await;
    worker.stop().await.unwrap();
    stop_stack(ctl, ing, mit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_told_to_drain_finishes_its_work_and_exits() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control-drain");
    let ctl = control(&dir, &ing.url(), &mit.url()).await;
    let api = ctl.url();
    set_up_policies(&api).await;
    let worker = worker(config(&api, &ing.url(), &mit.url())).await;
    eventually(
        Duration::from_secs(10),
        "the worker's heartbeat",
        || async { listed(&api).await.filter(|w| w.alive) },
    )
    .await;
    let drain =
        |id: &str| control_request(Method::POST, format!("{api}/api/v1/workers/{id}/drain"));
    let resp = drain("nobody").send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "not_found");

    let (ingest, mitigations) = clients(&ing.url(), &mit.url());
    ingest.ingest(logins("127.0.0.2", 10)).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    let resp = drain("worker-ctl").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"worker_id": "worker-ctl", "draining": true})
    );
    worker.ended(Duration::from_secs(15)).await.unwrap();
    assert_eq!(mitigations.active(None).await.unwrap().total, 1);
    // Its decision reached the log before it went.
    logged_decisions(&api, 2, Duration::from_secs(5)).await;
    let last = listed(&api).await.unwrap();
    assert_eq!(last.beat.state, "draining");
    stop_stack(ctl, ing, mit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_follows_a_control_plane_over_tls_with_a_private_ca() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control-tls");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (crt, key) = (dir.0.join("api.crt"), dir.0.join("api.key"));
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.key_pair.serialize_pem()).unwrap();
    let ctl = control_with(esper_control::Config {
        tls: true,
        tls_cert: Some(crt.clone()),
        tls_key: Some(key),
        ..control_config(&dir, &ing.url(), &mit.url())
    })
    .await;
    let api = format!("https://{}", ctl.addr);
    let ca = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    let resp = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap()
        .post(format!("{api}/api/v1/policies"))
        .bearer_auth(CONTROL_TOKEN)
        .header("content-type", "application/toml")
        .body(LOGIN_POLICY)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());

    let worker = worker(Config {
        ca_cert: Some(crt),
        ..config(&api, &ing.url(), &mit.url())
    })
    .await;
    let ops = worker.url();
    eventually(
        Duration::from_secs(10),
        "policies loaded over TLS",
        || async { (sample(&metrics(&ops).await, "esper_policies_loaded") == 1.0).then_some(()) },
    )
    .await;

    // A CA file that is not there stops the start with an error naming it.
    let missing = dir.0.join("missing.pem");
    let (_trigger, shutdown) = esper_common::Shutdown::new();
    let err = esper_engine::worker::run(
        Config {
            ca_cert: Some(missing),
            ..config(&api, &ing.url(), &mit.url())
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        shutdown,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("ca_cert") && err.contains("missing.pem"),
        "{err}"
    );
}

/// The decision log's outbox lives in the shared state: decisions made while the
/// control plane is away outlive the worker that made them, and the next worker over the
/// same Redis delivers them once a control plane is back. A worker the control plane
/// refuses keeps them and gives up its turn (else the lease would stay with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_made_while_the_control_plane_is_away_outlive_their_worker() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control-outbox");
    let ctl = control(&dir, &ing.url(), &mit.url()).await;
    set_up_policies(&ctl.url()).await;

    let prefix = redis_server::unique_prefix("outbox").replace('-', "_");
    let over_redis = |id: &str, control: &str| Config {
        worker_id: id.into(),
        state_backend: StateBackendKind::Redis,
        state_redis_url: redis_server::shared().url(),
        state_key_prefix: prefix.clone(),
        ..config(control, &ing.url(), &mit.url())
    };
    let first = worker(over_redis("worker-gone", &ctl.url())).await;
    let ops = first.url();
    policies_loaded(&ops, 2.0).await;
    ctl.stop().await.unwrap();

    // Enforcement goes on without the control plane; the records wait in Redis.
    let (ingest, mitigations) = clients(&ing.url(), &mit.url());
    ingest.ingest(logins("127.0.0.2", 10)).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    assert_eq!(mitigations.active(None).await.unwrap().total, 1);
    eventually(Duration::from_secs(10), "2 decisions pending", || async {
        (sample(&metrics(&ops).await, "esper_decisions_pending") == 2.0).then_some(())
    })
    .await;
    first.stop().await.unwrap();

    // The store is the same file: a control plane back on it. A worker it refuses (a
    // wrong token) claims the records first (its gauge is set by the claim: it has no
    // policies, so it commits nothing), is refused at once, keeps them, and gives up
    // its turn: else it would renew its lease at every retry and the next worker would
    // never deliver.
    let back = control(&dir, &ing.url(), &mit.url()).await;
    let api = back.url();
    let refused = worker(Config {
        control_token: Some("not-the-token".into()),
        ..over_redis("worker-refused", &api)
    })
    .await;
    let ops = refused.url();
    eventually(
        Duration::from_secs(10),
        "a claim by the refused worker",
        || async { (sample(&metrics(&ops).await, "esper_decisions_pending") == 2.0).then_some(()) },
    )
    .await;
    let second = worker(over_redis("worker-next", &api)).await;
    let log = logged_decisions(&api, 2, Duration::from_secs(15)).await;
    let mut seen: Vec<(String, String, DecisionMode)> = log
        .decisions
        .iter()
        .map(|l| {
            let d = &l.decision;
            (
                d.decided_by.clone(),
                d.mitigation.entity.to_string(),
                d.mode,
            )
        })
        .collect();
    seen.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        seen,
        [
            (
                "worker-gone".to_string(),
                "cidr:127.0.0.0/24".to_string(),
                DecisionMode::Shadow
            ),
            (
                "worker-gone".to_string(),
                "ip:127.0.0.2".to_string(),
                DecisionMode::Enforce
            ),
        ]
    );
    assert_eq!(
        sample(
            &metrics(&refused.url()).await,
            "esper_decisions_dropped_total"
        ),
        0.0
    );
    let ops = second.url();
    eventually(Duration::from_secs(5), "the outbox emptied", || async {
        (sample(&metrics(&ops).await, "esper_decisions_pending") == 0.0).then_some(())
    })
    .await;

    refused.stop().await.unwrap();
    second.stop().await.unwrap();
    back.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

/// One worker, one control plane that goes away and comes back: the records wait in the
/// outbox while deliveries fail and back off, and the same worker delivers them, once
/// each, when the control plane answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_wait_out_a_control_plane_outage_and_arrive_after_it() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control-outage");
    let ctl = control(&dir, &ing.url(), &mit.url()).await;
    set_up_policies(&ctl.url()).await;
    let relay = Relay::start(ctl.addr).await;
    let w = worker(config(&relay.url(), &ing.url(), &mit.url())).await;
    let ops = w.url();
    policies_loaded(&ops, 2.0).await;

    relay.set(Mode::Refuse);
    let (ingest, mitigations) = clients(&ing.url(), &mit.url());
    ingest.ingest(logins("127.0.0.2", 10)).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    assert_eq!(mitigations.active(None).await.unwrap().total, 1);
    eventually(
        Duration::from_secs(10),
        "deliveries failing with 2 decisions pending",
        || async {
            let m = metrics(&ops).await;
            (sample(&m, "esper_decisions_pending") == 2.0
                && sample(&m, "esper_control_errors_total") >= 3.0)
                .then_some(())
        },
    )
    .await;

    relay.set(Mode::Pass);
    // The back-off doubles from 0.5 s: an outage of a few seconds is retried within a
    // few more.
    let log = logged_decisions(&ctl.url(), 2, Duration::from_secs(20)).await;
    assert_eq!(log.decisions.len(), 2, "{log:?}");
    assert!(
        log.decisions
            .iter()
            .all(|l| l.decision.decided_by == "worker-ctl"),
        "{log:?}"
    );
    eventually(Duration::from_secs(5), "the outbox emptied", || async {
        (sample(&metrics(&ops).await, "esper_decisions_pending") == 0.0).then_some(())
    })
    .await;
    assert_eq!(
        sample(&metrics(&ops).await, "esper_decisions_dropped_total"),
        0.0
    );

    w.stop().await.unwrap();
    ctl.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

/// A control plane that accepts requests and never answers holds up neither
/// enforcement nor the worker's shutdown: the last flush gets the time it is given
/// (`shutdown_timeout`, here 1 s), the records stay in the shared outbox, and the next
/// worker delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_hangs_holds_up_neither_enforcement_nor_shutdown() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control-hangs");
    let ctl = control(&dir, &ing.url(), &mit.url()).await;
    set_up_policies(&ctl.url()).await;
    let relay = Relay::start(ctl.addr).await;
    let prefix = redis_server::unique_prefix("hangs").replace('-', "_");
    let over_redis = |id: &str| Config {
        worker_id: id.into(),
        state_backend: StateBackendKind::Redis,
        state_redis_url: redis_server::shared().url(),
        state_key_prefix: prefix.clone(),
        shutdown_timeout: Duration::from_secs(1),
        ..config(&relay.url(), &ing.url(), &mit.url())
    };
    let hung = worker(over_redis("worker-hung")).await;
    let ops = hung.url();
    policies_loaded(&ops, 2.0).await;

    relay.set(Mode::Stall);
    let (ingest, mitigations) = clients(&ing.url(), &mit.url());
    ingest.ingest(logins("127.0.0.2", 10)).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    assert_eq!(mitigations.active(None).await.unwrap().total, 1);
    eventually(
        Duration::from_secs(10),
        "a delivery stuck in the relay",
        || async {
            (relay.stalled_request_seen()
                && sample(&metrics(&ops).await, "esper_decisions_pending") == 2.0)
                .then_some(())
        },
    )
    .await;

    let stopping = Instant::now();
    hung.stop().await.unwrap();
    // The control client's own timeout is 10 s; a stop bounded by it would take longer.
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(6), "stopped in {took:?}");

    relay.set(Mode::Pass);
    let next = worker(over_redis("worker-next")).await;
    let log = logged_decisions(&ctl.url(), 2, Duration::from_secs(15)).await;
    assert!(
        log.decisions
            .iter()
            .all(|l| l.decision.decided_by == "worker-hung"),
        "{log:?}"
    );

    next.stop().await.unwrap();
    ctl.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

/// With no batches coming, the decision outbox's reads (every second) are what find the
/// shared state down: cleanups and clock readings come minutes and half a minute apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_state_down_shows_in_readiness_without_batches() {
    let mut redis = redis_server::RedisServer::start();
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control-state-down");
    let ctl = control(&dir, &ing.url(), &mit.url()).await;
    set_up_policies(&ctl.url()).await;
    let w = worker(Config {
        state_backend: StateBackendKind::Redis,
        state_redis_url: redis.url(),
        state_key_prefix: redis_server::unique_prefix("down").replace('-', "_"),
        ..config(&ctl.url(), &ing.url(), &mit.url())
    })
    .await;
    let ops = w.url();
    policies_loaded(&ops, 2.0).await;
    let state_healthy = || async {
        let body: serde_json::Value = reqwest::get(format!("{ops}/healthz/detailed"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "state")
            .map(|c| c["healthy"] == true)
            .unwrap()
    };
    assert!(state_healthy().await);
    redis.stop();
    eventually(
        Duration::from_secs(5),
        "the state reported down",
        || async { (!state_healthy().await).then_some(()) },
    )
    .await;
    w.stop().await.unwrap();
    stop_stack(ctl, ing, mit).await;
}
