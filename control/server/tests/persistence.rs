//! A mitigation broker with `PERSISTENCE_ENABLED` against a real control plane: its
//! durable copy survives the control plane being down (bounded outbox, retried, full
//! outbox refused with 503), and a broker started on an empty store restores the
//! mitigations still in force, including when the control plane comes up after it.
//! Over a real Redis the outbox outlives the broker, and brokers sharing it deliver it
//! once, in order, handing over when one stops.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use esper_common::{Shutdown, ShutdownTrigger};
use esper_control::{Listeners, Started};
use esper_protocol::mitigation::RevokeRequest;
use esper_protocol::{Action, ClientError, Mitigation, MitigationClient, Origin, Reason};
use serde_json::Value;
use support::redis_server::{RedisServer, shared, unique_prefix};
use support::{TOKEN, TempDir, call, closed_addr, eventually};
use tokio::net::TcpListener;

/// A control plane on a chosen API address (so it can stop and come back there).
struct Control {
    trigger: ShutdownTrigger,
    started: Started,
}

impl Control {
    async fn start(dir: &TempDir, api: SocketAddr) -> Control {
        Control::start_with_body_limit(dir, api, esper_control::config::DEFAULT_BODY_LIMIT).await
    }

    async fn start_with_body_limit(dir: &TempDir, api: SocketAddr, body_limit: usize) -> Control {
        let (i, m) = support::Brokers::down().await;
        let cfg = esper_control::Config {
            body_limit,
            ..support::config(dir, &i, &m)
        };
        let any = "127.0.0.1:0";
        let listeners = Listeners {
            api: TcpListener::bind(api).await.unwrap(),
            health: TcpListener::bind(any).await.unwrap(),
            metrics: TcpListener::bind(any).await.unwrap(),
        };
        let (trigger, shutdown) = Shutdown::new();
        let started = esper_control::start(cfg, listeners, shutdown)
            .await
            .unwrap();
        Control { trigger, started }
    }

    async fn stop(self) {
        self.trigger.trigger();
        self.started.wait().await.unwrap();
    }
}

/// A mitigation broker keeping its durable copy at `control`.
struct Broker {
    client: MitigationClient,
    base: String,
    trigger: ShutdownTrigger,
    broker: esper_mitigation::Broker,
}

impl Broker {
    /// Over a memory store (the outbox in memory).
    async fn start(control: SocketAddr, outbox: usize) -> Broker {
        Broker::start_on(control, outbox, None, TOKEN).await
    }

    /// Over the Redis store at `redis` = (URL, key prefix), which keeps the outbox, with
    /// `token` for the control plane.
    async fn start_on(
        control: SocketAddr,
        outbox: usize,
        redis: Option<(&str, &str)>,
        token: &str,
    ) -> Broker {
        let mut config = esper_mitigation::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            persistence_enabled: true,
            control_url: format!("http://{control}"),
            control_token: Some(token.into()),
            persistence_outbox: outbox,
            shutdown_timeout: Duration::from_secs(2),
            ..esper_mitigation::Config::default()
        };
        if let Some((url, prefix)) = redis {
            config.redis_url = Some(url.into());
            config.redis_prefix = prefix.into();
        }
        let (trigger, shutdown) = Shutdown::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broker = esper_mitigation::start(config, listener, shutdown)
            .await
            .unwrap();
        let base = format!("http://{}", broker.local_addr());
        Broker {
            client: MitigationClient::new(&base, None),
            base,
            trigger,
            broker,
        }
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    async fn active_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .client
            .active(None)
            .await
            .unwrap()
            .mitigations
            .into_iter()
            .map(|m| m.id)
            .collect();
        ids.sort();
        ids
    }

    async fn stop(self) {
        self.trigger.trigger();
        self.broker.wait().await.unwrap();
    }
}

fn ban(ip: &str) -> Mitigation {
    Mitigation::new(
        format!("ip:{ip}").parse().unwrap(),
        Action::Block,
        Duration::from_secs(600),
        Origin::Manual,
        Reason {
            policy_id: None,
            summary: "persistence test".into(),
        },
    )
}

/// The ids in force in the control plane's decision log, sorted.
async fn logged_in_force(api: SocketAddr) -> Vec<String> {
    let (status, body) = call(
        reqwest::Client::new()
            .get(format!("http://{api}/api/v1/decisions?active=true"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<String> = body["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["decision"]["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// Three entries for the outbox: `m1` and `m2` published, then `m1` revoked.
async fn publish_two_revoke_the_first(b: &Broker, m1: &Mitigation, m2: &Mitigation) {
    b.client
        .publish(vec![m1.clone(), m2.clone()])
        .await
        .unwrap();
    b.client
        .revoke(&RevokeRequest {
            id: Some(m1.id.clone()),
            entity: None,
        })
        .await
        .unwrap();
}

/// The decision log's record of `m`.
async fn logged(api: SocketAddr, m: &Mitigation) -> Value {
    let (status, body) = call(
        reqwest::Client::new()
            .get(format!("http://{api}/api/v1/decisions?entity={}", m.entity))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["decision"]["id"] == m.id.as_str())
        .cloned()
        .unwrap_or(Value::Null)
}

/// The `decision_log` health component's detail.
async fn log_detail(b: &Broker) -> String {
    let h = health_detail(b).await;
    h["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "decision_log")
        .and_then(|c| c["detail"].as_str())
        .unwrap_or_default()
        .to_string()
}

async fn health_detail(b: &Broker) -> Value {
    let (_, body) = call(reqwest::Client::new().get(format!("{}/healthz/detailed", b.base))).await;
    body
}

fn sorted(ids: &[&Mitigation]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|m| m.id.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_durable_copy_survives_a_control_plane_outage_and_restores_a_fresh_broker() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    // The control plane is down while the broker takes writes.
    let a = Broker::start(api, 3).await;
    let (m1, m2, m3, m4) = (
        ban("192.0.2.1"),
        ban("192.0.2.2"),
        ban("192.0.2.3"),
        ban("192.0.2.4"),
    );
    publish_two_revoke_the_first(&a, &m1, &m2).await;
    // Full: the write is refused before it changes anything, and counted.
    match a.client.publish(vec![m3.clone(), m4.clone()]).await {
        Err(ClientError::Backpressure {
            code, retry_after, ..
        }) => {
            assert_eq!(code, "persistence_backlog");
            assert!(retry_after.is_some());
        }
        other => panic!("expected 503 persistence_backlog, got {other:?}"),
    }
    assert_eq!(a.active_ids().await, sorted(&[&m2]));
    assert_eq!(a.metric("esper_persistence_rejected_total").await, 1.0);
    assert_eq!(a.metric("esper_persistence_pending").await, 3.0);
    eventually("the outage to show in health", || async {
        let h = health_detail(&a).await;
        h["status"] == "degraded"
            && h["components"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "decision_log" && c["healthy"] == false)
    })
    .await;
    assert!(
        a.client.ready().await,
        "the broker stays ready without the log"
    );

    // The control plane comes back: the outbox drains in order, the publisher's retry
    // goes through.
    let control = Control::start(&dir, api).await;
    eventually("the outbox to drain", || async {
        a.metric("esper_persistence_pending").await == 0.0
    })
    .await;
    a.client
        .publish(vec![m3.clone(), m4.clone()])
        .await
        .unwrap();
    eventually("every write in the log", || async {
        logged_in_force(api).await == sorted(&[&m2, &m3, &m4])
    })
    .await;
    let (_, body) = call(
        reqwest::Client::new()
            .get(format!("http://{api}/api/v1/decisions?entity=ip:192.0.2.1"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(body["decisions"][0]["revoked_by"], "mitigation-broker");
    assert!(a.metric("esper_persistence_sent_total").await >= 5.0);
    a.stop().await;

    // A fresh broker on an empty memory store restores what is in force.
    let b = Broker::start(api, 100).await;
    eventually("the restore", || async {
        b.active_ids().await == sorted(&[&m2, &m3, &m4])
    })
    .await;
    assert_eq!(b.metric("esper_persistence_restored_total").await, 3.0);
    // A clear reaches the log too: nothing is in force any more.
    b.client.clear().await.unwrap();
    eventually("the clear in the log", || async {
        logged_in_force(api).await.is_empty()
    })
    .await;
    b.stop().await;
    control.stop().await;
}

/// `systemctl reload esper-broker-mitigation` after the control plane moved: what the
/// outbox holds for the old address, which no longer answers, goes to the new one.
#[tokio::test]
async fn a_reload_sends_the_durable_copy_to_the_moved_control_plane() {
    let dir = TempDir::new();
    let (gone, moved) = (closed_addr().await, closed_addr().await);
    let b = Broker::start(gone, 100).await;
    let m1 = ban("192.0.2.31");
    b.client.publish(vec![m1.clone()]).await.unwrap();
    let control = Control::start(&dir, moved).await;

    let done = b.broker.reloader().apply(&esper_mitigation::Config {
        persistence_enabled: true,
        control_url: format!("http://{moved}"),
        control_token: Some(TOKEN.into()),
        persistence_outbox: 100,
        ..esper_mitigation::Config::default()
    });
    assert_eq!(done.applied, ["control_url"], "{done:?}");
    eventually(
        "the outbox delivered to the moved control plane",
        || async { logged_in_force(moved).await == [m1.id.clone()] },
    )
    .await;
    b.stop().await;
    control.stop().await;
}

#[tokio::test]
async fn a_run_larger_than_the_logs_body_limit_is_logged_in_parts() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start_with_body_limit(&dir, api, 16 * 1024).await;
    let b = Broker::start(api, 1000).await;
    let with_summary = |i: usize, len: usize| Mitigation {
        reason: Reason {
            policy_id: None,
            summary: "x".repeat(len),
        },
        ..ban(&format!("192.0.2.{i}"))
    };
    // About 40 KB in one run, more than the log takes in one request, and one
    // decision too large for it even alone.
    let fitting: Vec<Mitigation> = (1..=40).map(|i| with_summary(i, 1000)).collect();
    let mut run = fitting.clone();
    run.insert(20, with_summary(100, 20 * 1024));
    b.client.publish(run).await.unwrap();
    let expected = sorted(&fitting.iter().collect::<Vec<_>>());
    eventually("every decision that fits in the log", || async {
        logged_in_force(api).await == expected
    })
    .await;
    assert_eq!(b.metric("esper_persistence_sent_total").await, 40.0);
    assert_eq!(
        b.metric("esper_persistence_dropped_total{reason=\"refused\"}")
            .await,
        1.0
    );
    b.stop().await;
    control.stop().await;
}

#[tokio::test]
async fn a_broker_started_before_the_control_plane_restores_once_it_answers() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start(&dir, api).await;
    let a = Broker::start(api, 100).await;
    let kept = ban("198.51.100.7");
    a.client.publish(vec![kept.clone()]).await.unwrap();
    eventually("the decision in the log", || async {
        logged_in_force(api).await == sorted(&[&kept])
    })
    .await;
    a.stop().await;
    control.stop().await;

    // Control plane down when the new broker starts: it serves, and says restore pending.
    let b = Broker::start(api, 100).await;
    assert!(b.client.ready().await);
    let h = health_detail(&b).await;
    let detail = h["components"][1]["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("restore pending"), "{detail}");
    assert!(b.active_ids().await.is_empty());
    let control = Control::start(&dir, api).await;
    eventually("the late restore", || async {
        b.active_ids().await == sorted(&[&kept])
    })
    .await;
    b.stop().await;
    control.stop().await;
}

/// An HTTP relay to `upstream` that holds the answer to every request for a second page
/// of the decision log (`before=` in the query) until `release` is notified: the page
/// is read when asked for, and arrives later.
async fn holding_relay(upstream: SocketAddr, release: Arc<tokio::sync::Notify>) -> SocketAddr {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, Uri};
    let client = reqwest::Client::new();
    let relay = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let (client, release) = (client.clone(), release.clone());
        async move {
            let held = uri.query().is_some_and(|q| q.contains("before="));
            let mut req = client.request(method, format!("http://{upstream}{uri}"));
            for (name, value) in &headers {
                if name != "host" {
                    req = req.header(name, value);
                }
            }
            let resp = req.body(body).send().await.unwrap();
            let status = resp.status();
            let content_type = resp.headers().get("content-type").cloned();
            let body = resp.bytes().await.unwrap();
            if held {
                release.notified().await;
            }
            let mut answer = axum::response::Response::new(axum::body::Body::from(body));
            *answer.status_mut() = status;
            if let Some(ct) = content_type {
                answer.headers_mut().insert("content-type", ct);
            }
            answer
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(relay))
            .await
            .unwrap()
    });
    addr
}

/// Logs 1,500 mitigations (more than one restore page of 1,000) through a broker,
/// stopped once they are in the log.
async fn logged_1500(api: SocketAddr) -> Vec<Mitigation> {
    let a = Broker::start(api, 5000).await;
    let all: Vec<Mitigation> = (0..1500)
        .map(|i| ban(&format!("10.7.{}.{}", i / 250, i % 250)))
        .collect();
    for chunk in all.chunks(500) {
        a.client.publish(chunk.to_vec()).await.unwrap();
    }
    eventually("every decision in the log", || async {
        a.metric("esper_persistence_pending").await == 0.0
    })
    .await;
    a.stop().await;
    all
}

/// Once `restorer` holds the first restore page, revokes one mitigation of the second
/// (held back by its relay) through `writer` and changes another; then releases the
/// page and checks the restore undid neither write. Returns the revoked mitigation.
async fn writes_during_the_restore_stand(
    all: &[Mitigation],
    restorer: &Broker,
    writer: &Broker,
    release: &tokio::sync::Notify,
) -> Mitigation {
    let active = || async {
        restorer
            .client
            .active(Some(10_000))
            .await
            .unwrap()
            .mitigations
    };
    eventually("the first restore page", || async {
        active().await.len() == 1000
    })
    .await;
    let first_page: Vec<String> = active().await.into_iter().map(|m| m.id).collect();
    let mut later = all.iter().filter(|m| !first_page.contains(&m.id));
    let (revoked, changed) = (later.next().unwrap(), later.next().unwrap());
    let n = writer
        .client
        .revoke(&RevokeRequest {
            id: Some(revoked.id.clone()),
            entity: None,
        })
        .await
        .unwrap();
    assert_eq!(n.revoked, 0, "not restored yet");
    let newer = Mitigation {
        action: Action::Log,
        ..changed.clone()
    };
    writer.client.publish(vec![newer.clone()]).await.unwrap();
    release.notify_one();

    eventually("the rest of the restore", || async {
        active().await.len() == 1499
    })
    .await;
    let active = active().await;
    assert!(
        active.iter().all(|m| m.id != revoked.id),
        "a revoked mitigation came back"
    );
    let now = active.iter().find(|m| m.id == changed.id).unwrap();
    assert_eq!(
        now.action,
        Action::Log,
        "the restore overwrote a newer write"
    );
    revoked.clone()
}

/// How many decisions with `id` the log holds in force.
async fn in_force_in_the_log(api: SocketAddr, id: &str) -> usize {
    let (status, body) = call(
        reqwest::Client::new()
            .get(format!("http://{api}/api/v1/decisions?active=true&id={id}"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["decisions"].as_array().unwrap().len()
}

#[tokio::test]
async fn writes_made_while_a_restore_is_under_way_are_not_undone_by_it() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start(&dir, api).await;
    let all = logged_1500(api).await;
    // A fresh broker restores through a relay that holds the second page back; an
    // operator's writes through it meanwhile reach the log only after that page.
    let release = Arc::new(tokio::sync::Notify::new());
    let relay = holding_relay(api, release.clone()).await;
    let b = Broker::start(relay, 5000).await;
    let _ = writes_during_the_restore_stand(&all, &b, &b, &release).await;
    b.stop().await;
    control.stop().await;
}

/// Logs 1,500 mitigations, then starts a broker over `redis` that restores them
/// through a relay holding back the second page, once it holds the first page. Returns
/// what was logged, the broker, and what releases the held page.
async fn restoring_its_first_page(
    api: SocketAddr,
    redis: Option<(&str, &str)>,
) -> (Vec<Mitigation>, Broker, Arc<tokio::sync::Notify>) {
    let all = logged_1500(api).await;
    let release = Arc::new(tokio::sync::Notify::new());
    let relay = holding_relay(api, release.clone()).await;
    let b = Broker::start_on(relay, 5000, redis, TOKEN).await;
    eventually("the first restore page", || async {
        b.active_ids().await.len() == 1000
    })
    .await;
    (all, b, release)
}

#[tokio::test]
async fn a_restore_over_shared_redis_does_not_undo_writes_through_another_instance() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start(&dir, api).await;
    // Two brokers over one empty Redis prefix: the first restores, its second page held
    // back; the second, started once the store holds the first page, restores nothing
    // and takes the operator's writes. Their outbox entries wait behind the restorer's
    // delivery lease, so the held page still lists them as they were.
    let (url, prefix) = (shared().url(), unique_prefix("restore"));
    let redis = Some((url.as_str(), prefix.as_str()));
    let (all, b, release) = restoring_its_first_page(api, redis).await;
    let c = Broker::start_on(api, 5000, redis, TOKEN).await;
    let revoked = writes_during_the_restore_stand(&all, &b, &c, &release).await;
    assert_eq!(c.metric("esper_persistence_restored_total").await, 0.0);
    eventually("the revocation in the log", || async {
        in_force_in_the_log(api, &revoked.id).await == 0
    })
    .await;
    b.stop().await;
    c.stop().await;
    control.stop().await;
}

#[tokio::test]
async fn a_restore_over_redis_left_half_way_is_finished_by_the_next_broker() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start(&dir, api).await;
    let (url, prefix) = (shared().url(), unique_prefix("resume"));
    let redis = Some((url.as_str(), prefix.as_str()));
    // The first broker restores its first page, then stops while the second is held
    // back: the store holds 1,000 of the 1,500 in force.
    let (all, b, release) = restoring_its_first_page(api, redis).await;
    tokio::time::timeout(Duration::from_secs(10), b.stop())
        .await
        .expect("a stop does not wait for the held page");
    // Not empty, yet not whole: the next broker over the store restores the rest.
    let c = Broker::start_on(api, 5000, redis, TOKEN).await;
    eventually("the restore taken over", || async {
        c.client
            .active(Some(10_000))
            .await
            .unwrap()
            .mitigations
            .len()
            == all.len()
    })
    .await;
    eventually("the restore counted as done", || async {
        log_detail(&c).await.contains("mitigations restored")
    })
    .await;
    release.notify_one();
    c.stop().await;
    // Finished: a broker started now restores nothing.
    let d = Broker::start_on(api, 5000, redis, TOKEN).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.metric("esper_persistence_restored_total").await, 0.0);
    assert!(log_detail(&d).await.contains("nothing to restore"));
    d.stop().await;
    control.stop().await;
}

#[tokio::test]
async fn the_decision_log_endpoints_refuse_bad_input_clearly() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start(&dir, api).await;
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(format!("http://{api}/api/v1/decisions/revoke"))
            .bearer_auth(TOKEN)
            .json(&body)
    };
    let at = "2026-01-01T00:00:00Z";
    for body in [
        serde_json::json!({"revoked_at": at, "revoked_by": "x"}),
        serde_json::json!({"id": "a", "all": true, "revoked_at": at, "revoked_by": "x"}),
        serde_json::json!({"id": "a", "revoked_at": at, "revoked_by": " "}),
    ] {
        let (status, answer) = call(post(body.clone())).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"], "invalid_body", "{answer}");
    }
    let (status, answer) = call(post(
        serde_json::json!({"all": true, "revoked_at": at, "revoked_by": "x"}),
    ))
    .await;
    assert_eq!(
        (status, &answer["revoked"]),
        (200, &Value::from(0)),
        "{answer}"
    );
    let (status, answer) = call(
        http.get(format!(
            "http://{api}/api/v1/decisions?active=true&before=yesterday"
        ))
        .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "invalid_query");
    let (status, _) = call(
        http.post(format!("http://{api}/api/v1/decisions/revoke"))
            .json(&serde_json::json!({"all": true, "revoked_at": at, "revoked_by": "x"})),
    )
    .await;
    assert_eq!(status, 401, "the log is behind the API token");
    control.stop().await;
}

#[tokio::test]
async fn the_outbox_in_redis_outlives_its_broker_and_is_delivered_by_the_next() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let (url, prefix) = (shared().url(), unique_prefix("outbox"));
    let redis = Some((url.as_str(), prefix.as_str()));
    // The control plane is down while the broker takes writes.
    let a = Broker::start_on(api, 3, redis, TOKEN).await;
    let (m1, m2, m3) = (ban("192.0.2.1"), ban("192.0.2.2"), ban("192.0.2.3"));
    publish_two_revoke_the_first(&a, &m1, &m2).await;
    // Full: refused in the same step as the write, so nothing changed.
    match a.client.publish(vec![m3.clone()]).await {
        Err(ClientError::Backpressure { code, .. }) => assert_eq!(code, "persistence_backlog"),
        other => panic!("expected 503 persistence_backlog, got {other:?}"),
    }
    assert_eq!(a.active_ids().await, sorted(&[&m2]));
    assert_eq!(a.metric("esper_persistence_rejected_total").await, 1.0);
    assert_eq!(a.metric("esper_persistence_pending").await, 3.0);
    let detail = log_detail(&a).await;
    assert!(
        detail.contains("3 entries waiting in the store's outbox"),
        "{detail}"
    );
    // It stops with the control plane still down: a memory outbox would be lost here.
    a.stop().await;

    // The next broker over the same Redis delivers what the first one left.
    let control = Control::start(&dir, api).await;
    let b = Broker::start_on(api, 3, redis, TOKEN).await;
    eventually("the left outbox in the log", || async {
        logged_in_force(api).await == sorted(&[&m2])
    })
    .await;
    let record = logged(api, &m1).await;
    assert_eq!(record["revoked_by"], "mitigation-broker", "{record}");
    eventually("the outbox to drain", || async {
        b.metric("esper_persistence_pending").await == 0.0
    })
    .await;
    assert_eq!(b.metric("esper_persistence_sent_total").await, 3.0);
    // The publisher's retry goes through now.
    b.client.publish(vec![m3.clone()]).await.unwrap();
    eventually("the retried write in the log", || async {
        logged_in_force(api).await == sorted(&[&m2, &m3])
    })
    .await;
    b.stop().await;
    control.stop().await;
}

/// Which of two brokers sharing an outbox stands by: `Some(true)` for `a`, `Some(false)`
/// for `b`, `None` until exactly one does.
async fn standing_by(a: &Broker, b: &Broker) -> Option<bool> {
    let by_other = |d: String| d.contains("delivered by another instance");
    match (by_other(log_detail(a).await), by_other(log_detail(b).await)) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        _ => None,
    }
}

#[tokio::test]
async fn brokers_sharing_a_redis_outbox_deliver_it_once_in_order_and_hand_over_on_stop() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start(&dir, api).await;
    let (url, prefix) = (shared().url(), unique_prefix("shared-outbox"));
    let redis = Some((url.as_str(), prefix.as_str()));
    let a = Broker::start_on(api, 100, redis, TOKEN).await;
    let b = Broker::start_on(api, 100, redis, TOKEN).await;

    // A ban through one broker, its revocation through the other, then a new ban of
    // the same address through the first: the log must get them in that order, or the
    // revocation would also mark the new ban.
    let first = ban("192.0.2.10");
    let again = ban("192.0.2.10");
    a.client.publish(vec![first.clone()]).await.unwrap();
    b.client
        .revoke(&RevokeRequest {
            id: None,
            entity: Some(first.entity.clone()),
        })
        .await
        .unwrap();
    a.client.publish(vec![again.clone()]).await.unwrap();
    eventually("the three writes in the log", || async {
        logged_in_force(api).await == sorted(&[&again]) && !logged(api, &first).await.is_null()
    })
    .await;
    assert_eq!(logged(api, &first).await["revoked_by"], "mitigation-broker");
    let sent = a.metric("esper_persistence_sent_total").await
        + b.metric("esper_persistence_sent_total").await;
    assert_eq!(sent, 3.0, "each write delivered once, by one broker");

    // One delivers, the other stands by; stopping the one that delivers hands over at
    // once (well before its lease would run out).
    eventually("one broker to stand by", || async {
        standing_by(&a, &b).await.is_some()
    })
    .await;
    let (stays, goes) = if standing_by(&a, &b).await == Some(true) {
        (a, b)
    } else {
        (b, a)
    };
    goes.stop().await;
    let later = ban("192.0.2.11");
    stays.client.publish(vec![later.clone()]).await.unwrap();
    eventually("the remaining broker to deliver", || async {
        logged_in_force(api).await == sorted(&[&again, &later])
    })
    .await;
    stays.stop().await;
    control.stop().await;
}

#[tokio::test]
async fn a_broker_that_cannot_deliver_leaves_the_shared_outbox_to_one_that_can() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start(&dir, api).await;
    let (url, prefix) = (shared().url(), unique_prefix("bad-token"));
    let redis = Some((url.as_str(), prefix.as_str()));
    // Its token is wrong: the control plane answers 401 to everything it sends.
    let bad = Broker::start_on(api, 100, redis, "not-the-token").await;
    let m = ban("192.0.2.20");
    bad.client.publish(vec![m.clone()]).await.unwrap();
    eventually("the refusal to show in health", || async {
        log_detail(&bad).await.contains("401")
    })
    .await;
    assert!(logged_in_force(api).await.is_empty());

    // A broker set up right, over the same Redis, delivers what the other could not.
    let good = Broker::start_on(api, 100, redis, TOKEN).await;
    eventually("the write in the log", || async {
        logged_in_force(api).await == sorted(&[&m])
    })
    .await;
    let refused = "esper_persistence_dropped_total{reason=\"refused\"}";
    assert_eq!(
        bad.metric(refused).await,
        0.0,
        "nothing dropped for a bad token"
    );
    assert_eq!(good.metric(refused).await, 0.0);
    bad.stop().await;
    good.stop().await;
    control.stop().await;
}

#[tokio::test]
async fn delivery_of_the_redis_outbox_recovers_after_redis_comes_back() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start(&dir, api).await;
    let mut server = RedisServer::start();
    let url = server.url();
    let b = Broker::start_on(api, 100, Some((url.as_str(), "comeback")), TOKEN).await;
    let (m1, m2, m3) = (ban("192.0.2.31"), ban("192.0.2.32"), ban("192.0.2.33"));
    b.client.publish(vec![m1.clone()]).await.unwrap();
    eventually("the first write in the log", || async {
        logged_in_force(api).await == sorted(&[&m1])
    })
    .await;

    // Redis down: writes are refused whole (nothing changed, nothing queued) and the
    // delivery loop says why.
    server.stop();
    match b.client.publish(vec![m2.clone()]).await {
        Err(ClientError::Backpressure { code, .. }) => assert_eq!(code, "store_unavailable"),
        other => panic!("expected 503 store_unavailable, got {other:?}"),
    }
    eventually("the outbox's error in health", || async {
        log_detail(&b).await.contains("last error")
    })
    .await;

    // Redis back (empty: this test server keeps nothing): delivery goes on by itself.
    server.restart();
    eventually("writes to be taken again", || async {
        b.client.publish(vec![m3.clone()]).await.is_ok()
    })
    .await;
    eventually("the write in the log", || async {
        logged_in_force(api).await == sorted(&[&m1, &m3])
    })
    .await;
    eventually("the error to clear", || async {
        !log_detail(&b).await.contains("last error")
    })
    .await;
    b.stop().await;
    control.stop().await;
}

#[tokio::test]
async fn a_redis_that_loses_its_data_is_restored_and_its_snapshot_marked_as_restoring() {
    let dir = TempDir::new();
    let api = closed_addr().await;
    let control = Control::start(&dir, api).await;
    let (url, prefix) = (shared().url(), unique_prefix("lost"));
    let b = Broker::start_on(api, 5000, Some((url.as_str(), prefix.as_str())), TOKEN).await;
    let (m1, m2) = (ban("192.0.2.41"), ban("192.0.2.42"));
    b.client
        .publish(vec![m1.clone(), m2.clone()])
        .await
        .unwrap();
    let both = sorted(&[&m1, &m2]);
    eventually("both in the log", || async {
        logged_in_force(api).await == both
    })
    .await;
    // A snapshot asked for now is whole (no restore pending or due).
    let whole_now = || async {
        !b.client
            .stream(None, Duration::ZERO)
            .await
            .unwrap()
            .restoring
    };
    // The start-up restore (the store was empty) ends first.
    eventually("the start-up restore done", whole_now).await;
    let first = b.client.stream(None, Duration::ZERO).await.unwrap();
    assert!(first.snapshot && !first.restoring, "{first:?}");

    // Every key of the broker's store goes, as a FLUSHALL or a Redis restarted without
    // persistence takes them, while the broker runs.
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}}}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();

    // A follower's cursor is of the lost generation: its snapshot says it is not whole,
    // and the broker restores what the log holds in force.
    let page = b
        .client
        .stream(Some(&first.cursor), Duration::ZERO)
        .await
        .unwrap();
    assert!(page.snapshot && page.restoring, "{page:?}");
    eventually("the lost mitigations restored", || async {
        b.active_ids().await == both
    })
    .await;
    eventually("later snapshots whole again", whole_now).await;
    // A follower that added the restoring snapshot to what it held takes a whole one
    // after the restore: the stream starts a new generation.
    eventually(
        "a whole snapshot for the restoring one's follower",
        || async {
            let after = b
                .client
                .stream(Some(&page.cursor), Duration::ZERO)
                .await
                .unwrap();
            after.snapshot && !after.restoring && after.changes.len() == 2
        },
    )
    .await;
    b.stop().await;
    control.stop().await;
}
