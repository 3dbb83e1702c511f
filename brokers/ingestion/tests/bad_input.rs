//! Bad input gets a clear 4xx with the JSON error body, never a 500: malformed JSON,
//! unknown fields, oversized bodies, bad queries and paths, wrong methods, tokens.

mod support;

use esper_ingestion::Config;
use serde_json::json;
use support::{TestBroker, config, event, expect_error};

#[tokio::test]
async fn malformed_and_mistyped_bodies_are_400() {
    let b = TestBroker::with_defaults().await;
    let raw = |body: &'static str| {
        b.http
            .post(b.url("/api/events"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(raw("{\"events\": [").await.unwrap(), 400, "invalid_json").await;
    let err = expect_error(
        raw("{\"events\": [], \"extra\": 1}").await.unwrap(),
        400,
        "invalid_body",
    )
    .await;
    assert!(err.message.contains("extra"), "{}", err.message);
    expect_error(raw("{\"events\": 5}").await.unwrap(), 400, "invalid_body").await;

    let mut ev = serde_json::to_value(event("x")).unwrap();
    ev["client_ip"] = json!("not-an-ip");
    let resp = b.post("/api/events", json!({ "events": [ev] })).await;
    expect_error(resp, 400, "invalid_body").await;
    // Workers count an id once: an empty one would make every such event one event.
    let mut ev = serde_json::to_value(event("x")).unwrap();
    ev["id"] = json!(" ");
    let resp = b
        .post("/api/events", json!({ "events": [event("ok"), ev] }))
        .await;
    let err = expect_error(resp, 400, "invalid_body").await;
    assert!(err.message.starts_with("events[1]: id"), "{}", err.message);
    // A weight is a count of requests: a negative one would take counts back.
    let mut ev = serde_json::to_value(event("y")).unwrap();
    ev["weight"] = json!(-5);
    let resp = b.post("/api/events", json!({ "events": [ev] })).await;
    let err = expect_error(resp, 400, "invalid_body").await;
    assert!(
        err.message.starts_with("events[0]: weight must be above 0"),
        "{}",
        err.message
    );
    assert_eq!(
        b.client.status().await.unwrap().depth,
        0,
        "none of the batch is taken"
    );

    let resp = b
        .http
        .post(b.url("/api/queue/ack"))
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_error(resp, 415, "unsupported_media_type").await;
    let resp = b
        .post(
            "/api/queue/ack",
            json!({"consumer": "w", "item_ids": [], "x": 1}),
        )
        .await;
    expect_error(resp, 400, "invalid_body").await;
    b.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let b = TestBroker::start(Config {
        max_body_bytes: 2048,
        ..config()
    })
    .await;
    let events: Vec<_> = (0..50).map(|i| event(&format!("big{i}"))).collect();
    let resp = b.post("/api/events", json!({ "events": events })).await;
    let err = expect_error(resp, 413, "payload_too_large").await;
    assert_eq!(
        err.message,
        "request body is larger than the limit of 2048 bytes"
    );
    assert_eq!(b.client.status().await.unwrap().depth, 0);
    b.stop().await;
}

#[tokio::test]
async fn bad_queries_paths_and_methods_are_4xx() {
    let b = TestBroker::with_defaults().await;
    for q in [
        "?state=bogus",
        "?limit=abc",
        "?limit=0",
        "?limit=999999",
        "?nope=1",
    ] {
        let resp = b.get(&format!("/api/queue/items{q}")).await;
        expect_error(resp, 400, "invalid_query").await;
    }
    let resp = b.get("/api/queue/items/%FF").await;
    expect_error(resp, 400, "invalid_path").await;
    let resp = b.get("/api/queue/items/not-an-item").await;
    expect_error(resp, 404, "not_found").await;
    let resp = b.get("/api/nowhere").await;
    expect_error(resp, 404, "not_found").await;
    let resp = b.get("/api/events").await;
    expect_error(resp, 405, "method_not_allowed").await;
    b.stop().await;
}

#[tokio::test]
async fn the_token_guards_every_api_route_but_not_health_or_metrics() {
    let b = TestBroker::start(Config {
        token: Some("s3cret".into()),
        ..config()
    })
    .await;
    let anonymous = [
        ("GET", "/api/queue/status"),
        ("GET", "/api/queue/items"),
        ("GET", "/api/queue/items/1"),
        ("POST", "/api/events"),
        ("POST", "/api/queue/claim"),
        ("POST", "/api/queue/ack"),
        ("POST", "/api/queue/pause"),
        ("POST", "/api/queue/resume"),
        ("POST", "/api/queue/purge"),
    ];
    for (method, path) in anonymous {
        let rb = match method {
            "GET" => b.http.get(b.url(path)),
            _ => b.http.post(b.url(path)).json(&json!({})),
        };
        let resp = rb.send().await.unwrap();
        assert_eq!(resp.headers()["www-authenticate"], "Bearer", "{path}");
        expect_error(resp, 401, "unauthorized").await;
        let resp = match method {
            "GET" => b.http.get(b.url(path)),
            _ => b.http.post(b.url(path)).json(&json!({})),
        }
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
        expect_error(resp, 401, "unauthorized").await;
    }
    assert!(!b.client.status().await.unwrap().paused);
    for path in ["/healthz", "/readyz", "/healthz/detailed", "/metrics"] {
        let resp = b.http.get(b.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    b.stop().await;
}
