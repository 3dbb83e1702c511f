//! Bad input gets a clear 4xx with the JSON error body, never a 500: malformed JSON,
//! unknown fields, oversized bodies, bad entity keys, bad queries, wrong methods, tokens.

mod support;

use esper_mitigation::Config;
use serde_json::json;
use support::{TestBroker, block, config, expect_error};

#[tokio::test]
async fn malformed_and_mistyped_bodies_are_400() {
    let b = TestBroker::with_defaults().await;
    let raw = |body: &'static str| {
        b.http
            .post(b.url("/api/mitigations"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(
        raw("{\"mitigations\": [").await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    let err = expect_error(
        raw("{\"mitigations\": [], \"x\": 1}").await.unwrap(),
        400,
        "invalid_body",
    )
    .await;
    assert!(err.message.contains('x'), "{}", err.message);

    let mut m = serde_json::to_value(block("a", "ip:192.0.2.1")).unwrap();
    m["entity"] = json!("ip:not-an-ip");
    let resp = b
        .post("/api/mitigations", json!({"mitigations": [m]}))
        .await;
    let err = expect_error(resp, 400, "invalid_body").await;
    assert!(err.message.contains("not an IP"), "{}", err.message);

    let mut m = serde_json::to_value(block("a", "ip:192.0.2.1")).unwrap();
    m["action"] = json!({"type": "explode"});
    let resp = b
        .post("/api/mitigations", json!({"mitigations": [m]}))
        .await;
    expect_error(resp, 400, "invalid_body").await;

    let resp = b
        .post("/api/mitigations/revoke", json!({"entity": "mac:aa"}))
        .await;
    expect_error(resp, 400, "invalid_body").await;
    let resp = b
        .http
        .post(b.url("/api/mitigations/revoke"))
        .body("{\"id\":\"a\"}")
        .send()
        .await
        .unwrap();
    expect_error(resp, 415, "unsupported_media_type").await;
    b.stop().await;
}

/// The broker refuses what no proxy could enforce, as the control plane and policies do,
/// and what it would store only in part.
#[tokio::test]
async fn unenforceable_or_ambiguous_mitigations_are_400() {
    let b = TestBroker::with_defaults().await;
    let publish = |m: serde_json::Value| b.post("/api/mitigations", json!({"mitigations": [m]}));
    for (action, says) in [
        (
            json!({"type": "challenge", "difficulty": 0}),
            "difficulty 0",
        ),
        (
            json!({"type": "challenge", "difficulty": 255}),
            "difficulty 255",
        ),
        (json!({"type": "tarpit", "delay_ms": 0}), "delay_ms 0"),
        (
            json!({"type": "throttle", "rate": 0.0, "burst": 1}),
            "rate 0",
        ),
    ] {
        let mut m = serde_json::to_value(block("a", "ip:192.0.2.1")).unwrap();
        m["action"] = action;
        let err = expect_error(publish(m).await, 400, "invalid_mitigation").await;
        assert!(err.message.contains(says), "{}", err.message);
    }
    for (field, time) in [
        ("created_at", "-0001-01-01T00:00:00Z"),
        ("expires_at", "+10000-01-01T00:00:00Z"),
        // The decision log refuses a creation this far ahead; the broker refuses it
        // alike, so it enforces nothing its durable copy lost.
        ("created_at", "9999-01-01T00:00:00Z"),
    ] {
        let mut m = serde_json::to_value(block("a", "ip:192.0.2.1")).unwrap();
        m[field] = json!(time);
        let err = expect_error(publish(m).await, 400, "invalid_mitigation").await;
        assert!(err.message.contains(field), "{}", err.message);
    }
    // What no proxy could match, named by hand: a cookie's value where its hash belongs,
    // an app no proxy can name, a header name no request carries.
    for (field, value, says) in [
        ("entity", json!("cookie:sid=rawvalue"), "cookie:sid="),
        ("scope", json!({"app": ""}), "scope app"),
        (
            "entity",
            json!("header:bad header=abc"),
            "not a header or cookie name",
        ),
    ] {
        let mut m = serde_json::to_value(block("a", "ip:192.0.2.1")).unwrap();
        m[field] = value;
        let err = expect_error(publish(m.clone()).await, 400, "invalid_mitigation").await;
        assert!(err.message.contains(says), "{}", err.message);
        // A policy's key comes from what proxies reported: taken, not refused, since
        // refusing it would stall the worker's batch for ever.
        m["origin"] = json!("policy");
        assert_eq!(publish(m).await.status(), 200, "{field} {says}");
    }
    let resp = b.post("/api/mitigations/revoke", json!({"id": "a"})).await;
    assert_eq!(resp.status(), 200);
    let mut m = serde_json::to_value(block("a", "ip:192.0.2.1")).unwrap();
    m["entity"] = json!("header:x-a=b\nc");
    let err = expect_error(publish(m).await, 400, "invalid_body").await;
    assert!(
        err.message.contains("control characters"),
        "{}",
        err.message
    );

    let twice =
        json!({"mitigations": [block("same", "ip:192.0.2.1"), block("same", "ip:192.0.2.2")]});
    let err = expect_error(
        b.post("/api/mitigations", twice).await,
        400,
        "invalid_mitigation",
    )
    .await;
    assert!(err.message.contains("appears twice"), "{}", err.message);
    let resp = b
        .http
        .get(b.url("/api/mitigations/active"))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["total"], 0,
        "nothing of a refused batch is stored: {body}"
    );

    // Every kind of key can be listed by kind.
    let path = block("p", "path:/users/{id}/orders");
    let resp = b
        .post("/api/mitigations", json!({"mitigations": [path]}))
        .await;
    assert_eq!(resp.status(), 200);
    let resp = b
        .http
        .get(b.url("/api/mitigations/active?kind=path"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["total"], 1, "{body}");
    b.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let b = TestBroker::start(Config {
        max_body_bytes: 2048,
        ..config()
    })
    .await;
    let many: Vec<_> = (0..40)
        .map(|i| block(&format!("m{i}"), "ip:192.0.2.1"))
        .collect();
    let resp = b
        .post("/api/mitigations", json!({"mitigations": many}))
        .await;
    expect_error(resp, 413, "payload_too_large").await;
    b.stop().await;
}

#[tokio::test]
async fn bad_entity_keys_queries_and_methods_are_4xx() {
    let b = TestBroker::with_defaults().await;
    for key in [
        "nope",
        "ip:999.1.1.1",
        "mac:aa",
        "cidr:10.0.0.0%2F99",
        "header:%3Dx",
    ] {
        let resp = b.get(&format!("/api/mitigations/entity/{key}")).await;
        let err = expect_error(resp, 400, "invalid_entity").await;
        assert!(!err.message.is_empty(), "{key}");
    }
    let resp = b.get("/api/mitigations/entity/%FF").await;
    expect_error(resp, 400, "invalid_path").await;
    for q in [
        "active?kind=mac",
        "active?limit=0",
        "active?limit=x",
        "active?limit=1000000",
        "active?bogus=1",
        "stream?wait_ms=-1",
        "stream?wait_ms=soon",
        "stream?since=1",
        "stream?snapshot_after=m1",
        "stream?cursor=abc-1&snapshot_after=",
    ] {
        let resp = b.get(&format!("/api/mitigations/{q}")).await;
        expect_error(resp, 400, "invalid_query").await;
    }
    let resp = b.get("/api/mitigations").await;
    expect_error(resp, 405, "method_not_allowed").await;
    let resp = b.get("/api/cache/clear").await;
    expect_error(resp, 405, "method_not_allowed").await;
    let resp = b.get("/api/nowhere").await;
    expect_error(resp, 404, "not_found").await;
    b.stop().await;
}

#[tokio::test]
async fn the_token_guards_every_api_route_but_not_health_or_metrics() {
    let b = TestBroker::start(Config {
        token: Some("admin-token".into()),
        ..config()
    })
    .await;
    b.client
        .publish(vec![block("a", "ip:192.0.2.1")])
        .await
        .unwrap();
    let routes = [
        ("GET", "/api/mitigations/active"),
        ("GET", "/api/mitigations/entity/ip:192.0.2.1"),
        ("GET", "/api/mitigations/stream"),
        ("POST", "/api/mitigations"),
        ("POST", "/api/mitigations/revoke"),
        ("POST", "/api/cache/clear"),
    ];
    for (method, path) in routes {
        for token in [None, Some("wrong")] {
            let rb = match method {
                "GET" => b.http.get(b.url(path)),
                _ => b.http.post(b.url(path)).json(&json!({})),
            };
            let rb = match token {
                Some(t) => rb.bearer_auth(t),
                None => rb,
            };
            let resp = rb.send().await.unwrap();
            expect_error(resp, 401, "unauthorized").await;
        }
    }
    // Nothing was cleared or revoked by the refused calls.
    assert_eq!(b.client.active(None).await.unwrap().total, 1);
    for path in ["/healthz", "/readyz", "/healthz/detailed", "/metrics"] {
        let resp = b.http.get(b.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    b.stop().await;
}
