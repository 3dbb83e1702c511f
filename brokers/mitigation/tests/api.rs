//! The mitigation broker over real HTTP: publish, active list, entity lookup, revoke,
//! clear, the delta stream (snapshots, increments, long-polls), expiry, the cache cap
//! and metrics.

mod support;

use std::time::{Duration, Instant};

use chrono::Utc;
use esper_mitigation::Config;
use esper_protocol::mitigation::{MitigationList, RevokeRequest};
use esper_protocol::{Action, Change, DeltaPage, Origin};
use serde_json::json;
use support::{
    TestBroker, block, config, expect_error, host_address, metric, mitigation, post_from,
};

fn ids(list: &MitigationList) -> Vec<String> {
    let mut v: Vec<String> = list.mitigations.iter().map(|m| m.id.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn publish_list_lookup_and_revoke() {
    let b = TestBroker::with_defaults().await;
    let published = b
        .client
        .publish(vec![
            block("a1", "ip:192.0.2.1"),
            mitigation(
                "a2",
                "ip:192.0.2.1",
                Action::Throttle {
                    rate: 2.0,
                    burst: 4,
                },
                Duration::from_secs(600),
            ),
            block("net", "cidr:198.51.100.0/24"),
        ])
        .await
        .unwrap();
    assert_eq!(published.accepted, 3);
    assert!(!published.cursor.is_empty());

    let all = b.client.active(None).await.unwrap();
    assert_eq!(
        (all.total, ids(&all)),
        (3, vec!["a1".into(), "a2".into(), "net".into()])
    );
    let limited = b.client.active(Some(1)).await.unwrap();
    assert_eq!((limited.total, limited.mitigations.len()), (3, 1));
    let resp = b.get("/api/mitigations/active?kind=cidr").await;
    let nets: MitigationList = resp.json().await.unwrap();
    assert_eq!(ids(&nets), ["net"]);

    let ip = b
        .client
        .entity(&"ip:192.0.2.1".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(ids(&ip), ["a1", "a2"]);
    // An address inside a mitigated network finds the network's mitigation.
    let inside = b
        .client
        .entity(&"ip:198.51.100.7".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(ids(&inside), ["net"]);
    // Unencoded keys work too, slashes included.
    let raw: MitigationList = b
        .get("/api/mitigations/entity/cidr:198.51.100.0/24")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&raw), ["net"]);
    let none = b
        .client
        .entity(&"ip:192.0.2.99".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(none.total, 0);

    let by_id = RevokeRequest {
        id: Some("net".into()),
        entity: None,
    };
    assert_eq!(b.client.revoke(&by_id).await.unwrap().revoked, 1);
    assert_eq!(b.client.revoke(&by_id).await.unwrap().revoked, 0);
    let by_entity = RevokeRequest {
        id: None,
        entity: Some("ip:192.0.2.1".parse().unwrap()),
    };
    assert_eq!(b.client.revoke(&by_entity).await.unwrap().revoked, 2);
    assert_eq!(b.client.active(None).await.unwrap().total, 0);

    let text = b.metrics().await;
    assert_eq!(
        metric(&text, "esper_mitigations_published_total"),
        Some(3.0)
    );
    assert_eq!(metric(&text, "esper_mitigations_revoked_total"), Some(3.0));
    b.stop().await;
}

#[tokio::test]
async fn revoke_needs_exactly_one_target_and_publish_checks_values() {
    let b = TestBroker::with_defaults().await;
    let resp = b.post("/api/mitigations/revoke", json!({})).await;
    expect_error(resp, 400, "invalid_revoke").await;
    let resp = b
        .post(
            "/api/mitigations/revoke",
            json!({"id": "x", "entity": "ip:192.0.2.1"}),
        )
        .await;
    expect_error(resp, 400, "invalid_revoke").await;

    let bad = mitigation(
        "t",
        "ip:192.0.2.1",
        Action::Throttle {
            rate: 0.0,
            burst: 1,
        },
        Duration::from_secs(60),
    );
    let resp = b
        .post(
            "/api/mitigations",
            json!({"mitigations": [block("ok", "ip:192.0.2.2"), bad]}),
        )
        .await;
    let err = expect_error(resp, 400, "invalid_mitigation").await;
    assert!(err.message.starts_with("mitigations[1]"), "{}", err.message);
    assert_eq!(
        b.client.active(None).await.unwrap().total,
        0,
        "nothing applied"
    );
    b.stop().await;
}

#[tokio::test]
async fn the_stream_starts_with_a_snapshot_then_sends_changes() {
    let b = TestBroker::with_defaults().await;
    b.client
        .publish(vec![block("first", "ip:192.0.2.1")])
        .await
        .unwrap();
    let snap = b.client.stream(None, Duration::ZERO).await.unwrap();
    assert!(snap.snapshot);
    assert_eq!(snap.changes.len(), 1);

    b.client
        .publish(vec![block("second", "ip:192.0.2.2")])
        .await
        .unwrap();
    b.client
        .revoke(&RevokeRequest {
            id: Some("first".into()),
            entity: None,
        })
        .await
        .unwrap();
    let page = b
        .client
        .stream(Some(&snap.cursor), Duration::ZERO)
        .await
        .unwrap();
    assert!(!page.snapshot);
    match &page.changes[..] {
        [Change::Upsert { mitigation }, Change::Remove { id }] => {
            assert_eq!(mitigation.id, "second");
            assert_eq!(id, "first");
        }
        other => panic!("unexpected changes {other:?}"),
    }
    let idle = b
        .client
        .stream(Some(&page.cursor), Duration::ZERO)
        .await
        .unwrap();
    assert!(!idle.snapshot && idle.changes.is_empty());
    assert_eq!(idle.cursor, page.cursor);
    b.stop().await;
}

#[tokio::test]
async fn a_snapshot_page_may_end_on_an_id_of_many_bytes() {
    let b = TestBroker::start(Config {
        stream_page_size: 1,
        ..config()
    })
    .await;
    // 200 characters, 400 bytes: an id the broker takes must be one a page can end on.
    let wide = "é".repeat(200);
    b.client
        .publish(vec![
            block(&wide, "ip:192.0.2.1"),
            block("z", "ip:192.0.2.2"),
        ])
        .await
        .unwrap();
    let first = b.client.stream(None, Duration::ZERO).await.unwrap();
    let more = first.more.expect("a second page");
    let second = b.client.snapshot_next(&first.cursor, &more).await.unwrap();
    let ids: Vec<String> = first
        .changes
        .iter()
        .chain(&second.changes)
        .map(|c| match c {
            Change::Upsert { mitigation } => mitigation.id.clone(),
            Change::Remove { id } => id.clone(),
        })
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&wide));
    b.stop().await;
}

#[tokio::test]
async fn a_large_snapshot_arrives_in_pages() {
    let b = TestBroker::start(Config {
        stream_page_size: 500,
        ..config()
    })
    .await;
    let total = 3_000;
    for batch in 0..total / 500 {
        let ms = (batch * 500..(batch + 1) * 500)
            .map(|i| {
                block(
                    &format!("m{i:05}"),
                    &format!("ip:10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                )
            })
            .collect();
        b.client.publish(ms).await.unwrap();
    }
    let mut page = b.client.stream(None, Duration::ZERO).await.unwrap();
    let cursor = page.cursor.clone();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        assert!(page.snapshot);
        assert_eq!(page.cursor, cursor);
        assert!(page.changes.len() <= 500);
        pages += 1;
        seen.extend(page.changes.iter().map(|c| match c {
            Change::Upsert { mitigation } => mitigation.id.clone(),
            Change::Remove { id } => panic!("a snapshot holds upserts only, found -{id}"),
        }));
        let Some(more) = page.more.take() else { break };
        // A change while the pages are fetched reaches the follower as a delta.
        if pages == 2 {
            b.client
                .publish(vec![block("late", "ip:192.0.2.99")])
                .await
                .unwrap();
        }
        page = b.client.snapshot_next(&cursor, &more).await.unwrap();
    }
    assert_eq!(pages, 6);
    let want: Vec<String> = (0..total).map(|i| format!("m{i:05}")).collect();
    assert_eq!(seen, want, "every mitigation exactly once, by id");
    let deltas = b
        .client
        .stream(Some(&cursor), Duration::ZERO)
        .await
        .unwrap();
    assert!(!deltas.snapshot);
    assert!(
        matches!(&deltas.changes[..], [Change::Upsert { mitigation }] if mitigation.id == "late")
    );
    let text = b.metrics().await;
    assert_eq!(metric(&text, "esper_stream_snapshots_total"), Some(1.0));
    b.stop().await;
}

#[tokio::test]
async fn a_waiting_follower_wakes_on_publish() {
    let b = TestBroker::with_defaults().await;
    let cursor = b.client.stream(None, Duration::ZERO).await.unwrap().cursor;
    let client = b.client.clone();
    let follower = tokio::spawn(async move {
        let page = client.stream(Some(&cursor), Duration::from_secs(20)).await;
        (page, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = b.metrics().await;
    assert_eq!(metric(&text, "esper_stream_followers"), Some(1.0));

    let sent = Instant::now();
    b.client
        .publish(vec![block("now", "ip:192.0.2.1")])
        .await
        .unwrap();
    let (page, answered) = follower.await.unwrap();
    let page = page.unwrap();
    assert_eq!(page.changes.len(), 1);
    let lag = answered.duration_since(sent);
    assert!(
        lag < Duration::from_millis(300),
        "follower woke {lag:?} after publish"
    );
    let text = b.metrics().await;
    assert_eq!(metric(&text, "esper_stream_followers"), Some(0.0));
    b.stop().await;
}

#[tokio::test]
async fn an_idle_long_poll_answers_empty_with_the_same_cursor() {
    let b = TestBroker::with_defaults().await;
    let cursor = b.client.stream(None, Duration::ZERO).await.unwrap().cursor;
    let started = Instant::now();
    let page = b
        .client
        .stream(Some(&cursor), Duration::from_millis(300))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(!page.snapshot && page.changes.is_empty());
    assert_eq!(page.cursor, cursor);
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(3),
        "{took:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_long_poll_returns_early_on_shutdown() {
    let b = TestBroker::with_defaults().await;
    let cursor = b.client.stream(None, Duration::ZERO).await.unwrap().cursor;
    let client = b.client.clone();
    let follower = tokio::spawn(async move {
        let started = Instant::now();
        let page = client.stream(Some(&cursor), Duration::from_secs(30)).await;
        (page, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.trigger().trigger();
    let (page, took) = follower.await.unwrap();
    assert!(page.unwrap().changes.is_empty());
    assert!(took < Duration::from_secs(3), "{took:?}");
    b.stop().await;
}

#[tokio::test]
async fn stale_and_foreign_cursors_get_snapshots() {
    let b = TestBroker::start(Config {
        stream_retention: 3,
        ..config()
    })
    .await;
    let start = b.client.stream(None, Duration::ZERO).await.unwrap().cursor;
    for i in 0..5 {
        b.client
            .publish(vec![block(&format!("m{i}"), &format!("ip:10.0.0.{i}"))])
            .await
            .unwrap();
    }
    for cursor in [start.as_str(), "nonsense", "0123456789abcdef-1"] {
        let page = b.client.stream(Some(cursor), Duration::ZERO).await.unwrap();
        assert!(page.snapshot, "cursor `{cursor}`");
        assert_eq!(page.changes.len(), 5);
    }
    let text = b.metrics().await;
    assert_eq!(metric(&text, "esper_stream_snapshots_total"), Some(4.0));
    b.stop().await;
}

#[tokio::test]
async fn clear_forces_every_follower_to_resnapshot() {
    let b = TestBroker::start(Config {
        token: Some("admin-token".into()),
        ..config()
    })
    .await;
    b.client
        .publish(vec![block("a", "ip:192.0.2.1"), block("b", "ip:192.0.2.2")])
        .await
        .unwrap();
    let cursor = b.client.stream(None, Duration::ZERO).await.unwrap().cursor;

    // The seed's `curl -X POST .../api/cache/clear -H "Authorization: Bearer $ADMIN_TOKEN"`.
    let resp = b
        .http
        .post(b.url("/api/cache/clear"))
        .bearer_auth("admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cleared: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(cleared, json!({"revoked": 2}));

    let page = b
        .client
        .stream(Some(&cursor), Duration::ZERO)
        .await
        .unwrap();
    assert!(page.snapshot && page.changes.is_empty());
    b.client
        .publish(vec![block("c", "ip:192.0.2.3")])
        .await
        .unwrap();
    let next = b
        .client
        .stream(Some(&page.cursor), Duration::ZERO)
        .await
        .unwrap();
    assert!(!next.snapshot);
    assert_eq!(next.changes.len(), 1);
    b.stop().await;
}

#[tokio::test]
async fn expired_mitigations_are_swept() {
    let b = TestBroker::with_defaults().await;
    b.client
        .publish(vec![
            mitigation(
                "short",
                "ip:192.0.2.1",
                Action::Block,
                Duration::from_millis(200),
            ),
            block("long", "ip:192.0.2.2"),
        ])
        .await
        .unwrap();
    assert_eq!(b.client.active(None).await.unwrap().total, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = b.client.active(None).await.unwrap();
    assert_eq!(ids(&left), ["long"]);
    let snapshot: DeltaPage = b.client.stream(None, Duration::ZERO).await.unwrap();
    assert_eq!(snapshot.changes.len(), 1);
    let text = b.metrics().await;
    assert_eq!(metric(&text, "esper_mitigations_expired_total"), Some(1.0));
    assert_eq!(
        metric(&text, "esper_mitigations_active{action=\"block\"}"),
        Some(1.0)
    );
    b.stop().await;
}

#[tokio::test]
async fn cache_ttl_caps_policy_decisions_only() {
    let b = TestBroker::start(Config {
        cache_ttl: Duration::from_secs(60),
        ..config()
    })
    .await;
    let day = Duration::from_secs(86_400);
    let mut auto = mitigation("auto", "ip:192.0.2.1", Action::Block, day);
    auto.origin = Origin::Policy;
    let mut late = mitigation("late", "ip:192.0.2.3", Action::Block, day);
    late.origin = Origin::Policy;
    late.created_at = Utc::now() - chrono::Duration::seconds(30);
    let manual = mitigation("manual", "ip:192.0.2.2", Action::Block, day);
    let first = b
        .client
        .publish(vec![auto, late.clone(), manual])
        .await
        .unwrap();
    let list = b.client.active(None).await.unwrap();
    let expiry = |id: &str| {
        list.mitigations
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.expires_at)
            .unwrap()
    };
    assert!(expiry("auto") <= Utc::now() + chrono::Duration::seconds(61));
    assert!(expiry("manual") > Utc::now() + chrono::Duration::hours(23));
    // The cap counts from the decision's creation, not its arrival.
    assert_eq!(
        expiry("late"),
        late.created_at + chrono::Duration::seconds(60)
    );
    // So a publish retried (after a timeout, say) stores the same copy: no new delta.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = b.client.publish(vec![late]).await.unwrap();
    assert_eq!((again.accepted, again.cursor), (1, first.cursor.clone()));
    // One that arrives past its cap has run its course: taken, not stored, and not
    // turned into the end (a revocation) of its id either.
    let mut stale = mitigation("stale", "ip:192.0.2.4", Action::Block, day);
    stale.origin = Origin::Policy;
    stale.created_at = Utc::now() - chrono::Duration::seconds(120);
    let outlived = b.client.publish(vec![stale]).await.unwrap();
    assert_eq!((outlived.accepted, outlived.cursor), (1, first.cursor));
    let list = b.client.active(None).await.unwrap();
    assert!(list.mitigations.iter().all(|m| m.id != "stale"), "{list:?}");
    b.stop().await;
}

#[tokio::test]
async fn health_and_metrics_describe_the_broker() {
    let b = TestBroker::with_defaults().await;
    for path in ["/healthz", "/readyz", "/healthz/detailed"] {
        assert_eq!(b.get(path).await.status(), 200, "{path}");
    }
    let detailed: serde_json::Value = b.get("/healthz/detailed").await.json().await.unwrap();
    assert_eq!(detailed["components"][0]["name"], "mitigation_store");
    assert!(b.client.ready().await);

    b.client
        .publish(vec![
            block("a", "ip:192.0.2.1"),
            mitigation(
                "b",
                "ip:192.0.2.2",
                Action::Tarpit { delay_ms: 100 },
                Duration::from_secs(60),
            ),
        ])
        .await
        .unwrap();
    b.client.active(None).await.unwrap();
    let text = b.metrics().await;
    for (action, n) in [
        ("block", 1.0),
        ("tarpit", 1.0),
        ("throttle", 0.0),
        ("log", 0.0),
    ] {
        let series = format!("esper_mitigations_active{{action=\"{action}\"}}");
        assert_eq!(metric(&text, &series), Some(n), "{series}");
    }
    assert_eq!(
        metric(
            &text,
            "esper_requests_total{method=\"GET\",route=\"/api/mitigations/active\",status=\"200\"}"
        ),
        Some(1.0)
    );
    b.stop().await;
}

#[tokio::test]
async fn start_refuses_unreachable_redis_and_a_bad_control_url_clearly() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (cfg, expected) in [
        (
            Config {
                redis_url: Some(format!("redis://:pw@127.0.0.1:{port}")),
                ..config()
            },
            "mitigation broker: mitigation store unavailable: cannot reach Redis",
        ),
        (
            Config {
                persistence_enabled: true,
                control_url: "ftp://user:pw@127.0.0.1".into(),
                ..config()
            },
            "invalid control_url",
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_trigger, shutdown) = esper_common::shutdown::Shutdown::new();
        let err = esper_mitigation::start(cfg, listener, shutdown)
            .await
            .err()
            .expect("start must fail")
            .to_string();
        assert!(err.starts_with(expected), "{err}");
        assert!(!err.contains("pw@"), "secrets stay out of errors: {err}");
    }
}

#[tokio::test]
async fn without_a_token_only_loopback_clients_may_clear_the_cache() {
    let b = TestBroker::start_on(config(), "0.0.0.0:0").await;
    b.client
        .publish(vec![block("a", "ip:192.0.2.1")])
        .await
        .unwrap();
    if let Some(host) = host_address() {
        let (status, body) = post_from(host, host, b.port(), "/api/cache/clear").await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"], "token_required");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("ESPER_BROKER_TOKEN"), "{message}");
        assert_eq!(
            b.client.active(None).await.unwrap().total,
            1,
            "nothing cleared"
        );
        // The rest of the API stays open to it, as configured.
        let (status, _) = post_from(host, host, b.port(), "/api/mitigations/revoke").await;
        assert_eq!(status, 400, "an empty revoke is bad input, not refused");
    } else {
        eprintln!("no address besides loopback on this host: the refusal is not exercised");
    }
    let loopback = "127.0.0.1".parse().unwrap();
    let (status, body) = post_from(loopback, loopback, b.port(), "/api/cache/clear").await;
    assert_eq!((status, body), (200, json!({"revoked": 1})));
    b.stop().await;
}

/// A client given several instances of the broker goes on to the next when one does not
/// answer, and says which URLs it tried when none does.
#[tokio::test]
async fn a_client_of_several_instances_goes_on_to_one_that_answers() {
    let b = TestBroker::with_defaults().await;
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let urls = format!("http://{closed}, http://127.0.0.1:{}/", b.port());
    let client = esper_protocol::MitigationClient::new(&urls, None);
    let published = client
        .publish(vec![block("a", "ip:192.0.2.1")])
        .await
        .unwrap();
    assert_eq!(published.accepted, 1);
    assert_eq!(client.active(None).await.unwrap().total, 1);
    assert!(client.ready().await);

    let down =
        esper_protocol::MitigationClient::new(&format!("http://{closed},http://{closed}"), None);
    let err = down.active(None).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains(&closed.to_string()), "{err}");
    b.stop().await;
}

/// A token rotation without a refusal: the broker takes the new token and keeps the old
/// one beside it (`previous_token`) while clients move over, then drops it.
#[tokio::test]
async fn a_reload_rotates_the_token_and_keeps_the_previous_one_until_told() {
    let old = "old-broker-token-1";
    let new = "new-broker-token-2";
    let b = TestBroker::start(Config {
        token: Some(old.into()),
        ..config()
    })
    .await;
    let status = |token: &'static str| {
        let (http, url) = (b.http.clone(), b.url("/api/mitigations/active"));
        async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!((status(old).await, status(new).await), (200, 401));

    let done = b.reloader().apply(&Config {
        token: Some(new.into()),
        previous_token: Some(old.into()),
        ..config()
    });
    assert_eq!(done.applied, ["token", "previous_token"], "{done:?}");
    assert_eq!((status(old).await, status(new).await), (200, 200));
    // A client moved over sends the new token from its next call.
    b.client.token().set(Some(new.into()));
    b.client
        .publish(vec![block("a", "ip:192.0.2.1")])
        .await
        .unwrap();

    let done = b.reloader().apply(&Config {
        token: Some(new.into()),
        ..config()
    });
    assert_eq!(done.applied, ["token", "previous_token"], "{done:?}");
    assert_eq!((status(old).await, status(new).await), (401, 200));
    // Persistence is off: nothing sends it, but it is taken, not left for a restart.
    let done = b.reloader().apply(&Config {
        token: Some(new.into()),
        control_token: Some("ctl".into()),
        ..config()
    });
    assert_eq!(done.applied, ["control_token"], "{done:?}");
    b.stop().await;
}

/// A broker that starts on an empty store with its decision log unreachable marks its
/// snapshots as restoring (followers keep what they hold); once cleared, they are whole
/// again, since a clear is meant to reach every follower.
#[tokio::test]
async fn snapshots_say_restoring_until_a_clear() {
    let b = TestBroker::start(Config {
        persistence_enabled: true,
        control_url: "http://127.0.0.1:1".into(),
        ..config()
    })
    .await;
    let page = b.client.stream(None, Duration::ZERO).await.unwrap();
    assert!(page.snapshot && page.restoring, "{page:?}");
    b.client.clear().await.unwrap();
    let page = b.client.stream(None, Duration::ZERO).await.unwrap();
    assert!(page.snapshot && !page.restoring, "{page:?}");
}
