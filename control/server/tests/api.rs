//! The control-plane API over real HTTP: auth, policies, lists, mitigations through a
//! real mitigation broker, the decision log, analyze through a real ingestion broker,
//! status, heartbeats, health, metrics and bad input.

#![allow(clippy::unwrap_used)]

mod support;

use chrono::Utc;
use reqwest::Method;
use serde_json::{Value, json};
use support::{POLICIES, Stack, TOKEN, call, eventually, worker_beat};

#[tokio::test]
async fn every_api_route_needs_a_valid_token() {
    let s = Stack::without_brokers().await;
    let url = format!("{}/api/v1/policies", s.api);
    let (status, body) = call(s.http.get(&url)).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "unauthorized");
    let (status, body) = call(s.http.get(&url).bearer_auth("wrong")).await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "missing or invalid bearer token");
    let (status, _) = call(
        s.http
            .post(format!("{}/api/v1/admin/shutdown", s.api))
            .json(&json!({})),
    )
    .await;
    assert_eq!(status, 401, "shutdown is protected too");
    let (status, body) = call(s.http.get(&url).bearer_auth(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["policies"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn policies_apply_version_and_toggle() {
    let s = Stack::without_brokers().await;
    let (status, body) = s.apply_toml(POLICIES).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["applied"],
        json!([
            {"id": "login-burst", "version": 1, "changed": true},
            {"id": "api-scrapers", "version": 1, "changed": true}
        ])
    );
    let rev1 = body["revision"].as_i64().unwrap();

    let (_, body) = s.apply_toml(POLICIES).await;
    assert_eq!(
        body["applied"][0],
        json!({"id": "login-burst", "version": 1, "changed": false})
    );
    assert_eq!(
        body["revision"].as_i64().unwrap(),
        rev1,
        "no change, same revision"
    );

    let changed = POLICIES.replace("threshold = 10", "threshold = 20");
    let (_, body) = s.apply_toml(&changed).await;
    assert_eq!(
        body["applied"][0],
        json!({"id": "login-burst", "version": 2, "changed": true})
    );
    assert_eq!(body["applied"][1]["changed"], false);

    let (status, list) = s.get("/api/v1/policies").await;
    assert_eq!(status, 200);
    let login = &list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "login-burst")
        .unwrap()
        .clone();
    assert_eq!(login["version"], 2);
    assert_eq!(login["threshold"], 20.0);
    assert_eq!(login["window"], "1m");
    assert_eq!(login["action"], "block");
    assert_eq!(login["entity"], "ip");
    assert_eq!(login["mode"], "enforce");

    let (status, detail) = s.get("/api/v1/policies/login-burst").await;
    assert_eq!(status, 200);
    assert_eq!(detail["spec"]["threshold"], 20);
    let back = esper_engine::policy::parse_policies(detail["toml"].as_str().unwrap()).unwrap();
    assert_eq!(back[0].id, "login-burst");
    assert_eq!(back[0].threshold, 20.0);

    let (status, body) = s
        .post("/api/v1/policies/login-burst/disable", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"][0]["version"], 3);
    let (_, body) = s
        .post("/api/v1/policies/login-burst/disable", json!({}))
        .await;
    assert_eq!(body["applied"][0]["changed"], false, "already disabled");
    let (_, body) = s
        .post("/api/v1/policies/api-scrapers/shadow", json!({}))
        .await;
    assert_eq!(body["applied"][0]["version"], 2);

    let (status, active) = s.get("/api/v1/policies/active").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = active["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["api-scrapers"], "disabled policies are not active");
    assert_eq!(active["policies"][0]["mode"], "shadow");
    assert_eq!(active["versions"]["api-scrapers"], 2);
    let rev = active["revision"].as_i64().unwrap();
    assert!(rev > rev1);

    let (_, body) = s
        .post("/api/v1/policies/login-burst/enable", json!({}))
        .await;
    assert_eq!(body["applied"][0]["version"], 4);
    let (_, active) = s.get("/api/v1/policies/active").await;
    assert_eq!(active["policies"].as_array().unwrap().len(), 2);
    assert!(active["revision"].as_i64().unwrap() > rev);

    let (status, hist) = s.get("/api/v1/policies/login-burst/versions").await;
    assert_eq!(status, 200);
    let changes: Vec<(i64, &str, &str)> = hist["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap(),
                v["change"].as_str().unwrap(),
                v["changed_by"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            (1, "apply", "admin"),
            (2, "apply", "admin"),
            (3, "disable", "admin"),
            (4, "enable", "admin")
        ]
    );
    assert_eq!(hist["versions"][0]["spec"]["threshold"], 10);

    let (status, _) = s.delete("/api/v1/policies/login-burst").await;
    assert_eq!(status, 200);
    let (status, body) = s.get("/api/v1/policies/login-burst").await;
    assert_eq!(status, 404);
    assert_eq!(body["message"], "no policy `login-burst`");
    let (status, hist) = s.get("/api/v1/policies/login-burst/versions").await;
    assert_eq!(status, 200, "history outlives the policy");
    assert_eq!(
        hist["versions"].as_array().unwrap().last().unwrap()["change"],
        "delete"
    );
    let (status, _) = s.post("/api/v1/policies/nope/enable", json!({})).await;
    assert_eq!(status, 404);
    let (status, _) = s
        .post("/api/v1/policies/api-scrapers/explode", json!({}))
        .await;
    assert_eq!(status, 404);
    s.stop().await;
}

/// Errors read in the words of JSON and of HTTP, whatever the route and the mistake.
#[tokio::test]
async fn bad_requests_get_json_errors_without_rust_type_names() {
    let s = Stack::without_brokers().await;
    let resp = s
        .req(Method::POST, "/api/v1/mitigations")
        .header("content-type", "application/json")
        .body("42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["message"], "invalid type: integer `42`, expected an object at line 1 column 2",
        "{body}"
    );
    let resp = s
        .req(Method::POST, "/api/v1/workers/%FF/drain")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_path", "{body}");
    let (status, body) = s
        .apply_toml(
            "[[policy]]\nid = \"x\"\nwindow = \"1m\"\nthreshold = \"ten\"\naction = \"block\"\n",
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("expected a number"),
        "{body}"
    );
    s.stop().await;
}

#[tokio::test]
async fn policy_errors_are_precise() {
    let s = Stack::without_brokers().await;
    let (status, body) = s
        .apply_toml("[[policy]]\nid = \"x\"\nwindow = \"1m\"\nthreshold = 5\naction = \"blok\"\n")
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_policy");
    assert_eq!(
        body["message"],
        "line 5, column 10: policy \"x\": unknown action \"blok\" (expected block, throttle, tarpit, challenge or log)"
    );
    let (status, body) = s.apply_toml("[[policy]\nid = 1").await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("line 1, column"),
        "{body}"
    );
    let (status, body) = s
        .apply_toml(
            "[[policy]]\nid = \"t\"\nwindow = \"1m\"\nthreshold = 5\naction = \"throttle\"\n",
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("action throttle needs `rate`"),
        "{body}"
    );
    let (status, body) = s
        .apply_toml("[[policy]]\nid = \"l\"\nwindow = \"1m\"\nthreshold = 5\naction = \"block\"\n[policy.match]\nip_not_in_list = \"office\"\n")
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body["message"],
        "policy \"l\": refers to list \"office\", which does not exist"
    );
    let (status, body) = s.apply_toml("# nothing here\n").await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no [[policy]] tables")
    );

    // JSON bodies take the same shape and get the same checks.
    let (status, body) = s
        .post(
            "/api/v1/policies",
            json!({"policies": [{"id": "j", "window": "1m", "threshold": 0, "action": "log"}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body["message"],
        "policy \"j\": threshold 0 must be above 0 (and at most 1e12)"
    );
    let (status, body) = s
        .post("/api/v1/policies", json!({"policies": [{"id": "j", "window": "1m", "threshold": 3, "action": "log", "colour": "red"}]}))
        .await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{body}"
    );
    let (status, body) = s
        .post(
            "/api/v1/policies",
            json!({"policies": [{"id": "j", "window": "1m", "threshold": 3, "action": "log"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = call(
        s.req(Method::POST, "/api/v1/policies")
            .header("content-type", "text/plain")
            .body("x"),
    )
    .await;
    assert_eq!(status, 415);
    assert_eq!(body["error"], "unsupported_media_type");

    let (status, body) = call(
        s.req(Method::POST, "/api/v1/policies/validate")
            .header("content-type", "application/toml")
            .body(POLICIES),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"valid": true, "policies": 2}));
    let (status, body) = call(
        s.req(Method::POST, "/api/v1/policies/validate")
            .header("content-type", "application/toml")
            .body(POLICIES.replace("60s", "2d")),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("window 2days is out of range"),
        "{body}"
    );
    // An empty document is refused alike by both.
    for path in ["/api/v1/policies/validate", "/api/v1/policies"] {
        let (status, body) = call(
            s.req(Method::POST, path)
                .header("content-type", "application/toml")
                .body(""),
        )
        .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("nothing to apply"),
            "{body}"
        );
    }
    let (_, list) = s.get("/api/v1/policies").await;
    assert_eq!(
        list["policies"].as_array().unwrap().len(),
        1,
        "validate stores nothing"
    );
    s.stop().await;
}

#[tokio::test]
async fn lists_are_validated_and_guarded_by_their_users() {
    let s = Stack::without_brokers().await;
    let (status, body) = s
        .put(
            "/api/v1/lists/office",
            json!({"kind": "ip", "items": ["10.0.0.0/8", "192.0.2.1"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"], json!(["10.0.0.0/8", "192.0.2.1"]));
    let (_, rev) = s.get("/api/v1/policies/active").await;
    assert_eq!(rev["lists"][0]["name"], "office");
    let (status, body) = s
        .put(
            "/api/v1/lists/agents",
            json!({"kind": "string", "items": ["foo", "bar", " foo "]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"], json!(["foo", "bar"]), "a list is a set");
    let (status, body) = s
        .put(
            "/api/v1/lists/allowlist",
            json!({"kind": "string", "items": ["203.0.113.0/24"]}),
        )
        .await;
    assert_eq!(status, 400, "the allowlist holds addresses only: {body}");

    let (status, body) = s
        .put(
            "/api/v1/lists/office",
            json!({"kind": "ip", "items": ["10.0.0.1", "nope"]}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_list");
    assert_eq!(
        body["message"],
        "list \"office\" item 2: \"nope\" is not an IP address or CIDR network"
    );
    let (status, body) = s
        .put("/api/v1/lists/office", json!({"kind": "mac", "items": []}))
        .await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("unknown list kind")
    );
    let (status, _) = s
        .put(
            "/api/v1/lists/Bad%20Name",
            json!({"kind": "ip", "items": []}),
        )
        .await;
    assert_eq!(status, 400);

    let policy = "[[policy]]\nid = \"outsiders\"\nwindow = \"1m\"\nthreshold = 5\naction = \"block\"\n[policy.match]\nip_not_in_list = \"office\"\n";
    let (status, body) = s.apply_toml(policy).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.delete("/api/v1/lists/office").await;
    assert_eq!(status, 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("used by policy `outsiders`")
    );
    let (status, _) = s
        .put(
            "/api/v1/lists/office",
            json!({"kind": "string", "items": ["x"]}),
        )
        .await;
    assert_eq!(status, 409, "an IP list in use cannot become a string list");

    // A string list in use may change its items, not its kind.
    let (status, _) = s
        .put(
            "/api/v1/lists/bad-agents",
            json!({"kind": "string", "items": ["curl"]}),
        )
        .await;
    assert_eq!(status, 200);
    let agents = "[[policy]]\nid = \"agents\"\nwindow = \"1m\"\nthreshold = 5\naction = \"block\"\nfilter = 'user_agent in list(\"bad-agents\")'\n";
    let (status, body) = s.apply_toml(agents).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s
        .put(
            "/api/v1/lists/bad-agents",
            json!({"kind": "string", "items": ["curl", "wget"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s
        .put(
            "/api/v1/lists/bad-agents",
            json!({"kind": "ip", "items": ["192.0.2.1"]}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("used by policy `agents` as a string list"),
        "{body}"
    );
    s.delete("/api/v1/policies/agents").await;
    s.delete("/api/v1/lists/bad-agents").await;

    let (status, body) = s.get("/api/v1/lists").await;
    assert_eq!(status, 200);
    assert_eq!(body["lists"][0]["items"], 2);
    s.delete("/api/v1/policies/outsiders").await;
    let (status, _) = s.delete("/api/v1/lists/office").await;
    assert_eq!(status, 200);
    let (status, _) = s.get("/api/v1/lists/office").await;
    assert_eq!(status, 404);
    s.stop().await;
}

#[tokio::test]
async fn manual_ban_lookup_analyze_and_revoke() {
    let s = Stack::start().await;
    let (status, m) = s
        .post("/api/v1/mitigations", json!({"entity": "ip:198.51.100.7", "action": "block", "ttl": "1h", "reason": "credential stuffing"}))
        .await;
    assert_eq!(status, 201, "{m}");
    assert_eq!(m["origin"], "manual");
    assert_eq!(m["action"], json!({"type": "block"}));
    assert_eq!(m["reason"]["summary"], "credential stuffing");
    let id = m["id"].as_str().unwrap().to_string();

    let (status, list) = s.get("/api/v1/mitigations?limit=10").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 1);

    let (status, e) = s.get("/api/v1/mitigations/entity/ip:198.51.100.7").await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["mitigations"][0]["id"], id);
    assert_eq!(e["decisions"][0]["decision"]["decided_by"], "control:admin");
    assert_eq!(
        e["decisions"][0]["decision"]["mitigation"]["origin"],
        "manual"
    );

    let (status, a) = s
        .post(
            "/api/v1/analyze",
            json!({"client_ip": "198.51.100.7", "method": "POST", "path": "/login"}),
        )
        .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["action"], "block");
    assert_eq!(a["mitigation"]["id"], id);
    assert_eq!(a["enqueued"], true);
    // An app on a dual-stack socket reports the same client as `::ffff:...`.
    let (status, a) = s
        .post(
            "/api/v1/analyze",
            json!({"client_ip": "::ffff:198.51.100.7", "method": "GET", "path": "/"}),
        )
        .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["action"], "block", "{a}");
    // So is a key written that way: one client, one key.
    let (status, e) = s
        .get("/api/v1/mitigations/entity/ip:::ffff:198.51.100.7")
        .await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["entity"], "ip:198.51.100.7");
    assert_eq!(e["mitigations"][0]["id"], id);

    let (status, body) = s
        .post(
            "/api/v1/mitigations/revoke",
            json!({"id": "00000000-0000-0000-0000-000000000000"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_found");

    let (status, r) = s
        .post(
            "/api/v1/mitigations/revoke",
            json!({"entity": "ip:198.51.100.7"}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["revoked"], 1);
    let (_, e) = s.get("/api/v1/mitigations/entity/ip:198.51.100.7").await;
    assert_eq!(e["mitigations"], json!([]));
    assert_eq!(e["decisions"][0]["revoked_by"], "control:admin");
    let (_, a) = s
        .post(
            "/api/v1/analyze",
            json!({"client_ip": "198.51.100.7", "method": "GET", "path": "/"}),
        )
        .await;
    assert_eq!(a["action"], "allow");
    assert_eq!(a["mitigation"], Value::Null);

    // A path mitigation answers analyze as the proxy enforces it: by the path's template.
    let (status, p) = s
        .post(
            "/api/v1/mitigations",
            json!({"entity": "path:/users/{id}/orders", "action": "block", "ttl": "1h"}),
        )
        .await;
    assert_eq!(status, 201, "{p}");
    let analyzed = async |path: &str| {
        let (status, a) = s
            .post(
                "/api/v1/analyze",
                json!({"client_ip": "203.0.113.44", "method": "GET", "path": path}),
            )
            .await;
        assert_eq!(status, 200, "{a}");
        a["action"].as_str().unwrap().to_string()
    };
    assert_eq!(analyzed("/users/42/orders?page=2").await, "block");
    assert_eq!(analyzed("/users/42/profile").await, "allow");
    let (status, _) = s
        .post(
            "/api/v1/mitigations/revoke",
            json!({"entity": "path:/users/{id}/orders"}),
        )
        .await;
    assert_eq!(status, 200);

    let (status, body) = s.post("/api/v1/mitigations/revoke", json!({})).await;
    assert_eq!(status, 400);
    assert_eq!(body["message"], "give exactly one of `id` or `entity`");
    let (status, body) = s
        .post(
            "/api/v1/mitigations",
            json!({"entity": "198.51.100.7", "action": "block"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_entity");
    let (status, body) = s
        .post(
            "/api/v1/mitigations",
            json!({"entity": "ip:198.51.100.7", "action": "throttle"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_action");
    let (status, body) = s
        .post(
            "/api/v1/mitigations",
            json!({"entity": "ip:198.51.100.7", "action": "block", "ttl": "forever"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_ttl");
    let (status, _) = s.get("/api/v1/mitigations/entity/nonsense").await;
    assert_eq!(status, 400);
    // Proxies match cookies by hash: a key with the raw value could never match.
    let (status, body) = s
        .post(
            "/api/v1/mitigations",
            json!({"entity": "cookie:sid=abc", "action": "block"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("cookie:sid=ba7816bf8f01cfea"),
        "{body}"
    );
    let (status, body) = s
        .post(
            "/api/v1/mitigations",
            json!({"entity": "cookie:sid=ba7816bf8f01cfea", "action": "block", "ttl": "1m"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // Nor could a header name no request carries, or an app no proxy names.
    let (status, body) = s
        .post(
            "/api/v1/mitigations",
            json!({"entity": "header:bad header=abc", "action": "block"}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_entity")),
        "{body}"
    );
    let (status, body) = s
        .post(
            "/api/v1/mitigations",
            json!({"entity": "ip:198.51.100.8", "action": "block", "scope": {"app": " "}}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope")),
        "{body}"
    );
    s.stop().await;
}

#[tokio::test]
async fn analyze_sees_network_mitigations_published_by_others_and_enqueues() {
    let s = Stack::start().await;
    let brokers = s.brokers.as_ref().unwrap();
    // An engine publishes straight to the broker; the control plane learns of it
    // through the delta stream.
    let mitigation = esper_protocol::MitigationClient::new(&brokers.mitigation_url, None);
    let m = esper_protocol::Mitigation::new(
        "cidr:203.0.113.0/24".parse().unwrap(),
        esper_protocol::Action::Tarpit { delay_ms: 1500 },
        std::time::Duration::from_secs(600),
        esper_protocol::Origin::Policy,
        esper_protocol::Reason {
            policy_id: Some("scanners".into()),
            summary: "scan".into(),
        },
    );
    mitigation.publish(vec![m.clone()]).await.unwrap();
    let probe = json!({"client_ip": "203.0.113.9", "method": "GET", "path": "/wp-admin", "app": "shop",
                       "headers": {"User-Agent": "x"}, "cookies": {"sid": "secret"}});
    eventually("the mirror to pick up the network mitigation", || async {
        let (_, a) = s.post("/api/v1/analyze", probe.clone()).await;
        a["action"] == "tarpit"
    })
    .await;
    let (_, a) = s.post("/api/v1/analyze", probe.clone()).await;
    assert_eq!(a["mitigation"]["id"], m.id.as_str());

    let (status, q) = s.get("/api/v1/queue/status").await;
    assert_eq!(status, 200, "{q}");
    assert!(q["depth"].as_u64().unwrap() >= 2, "{q}");
    let ingestion = esper_protocol::IngestionClient::new(&brokers.ingestion_url, None);
    let claimed = ingestion
        .claim(
            "test",
            1,
            std::time::Duration::from_secs(30),
            std::time::Duration::ZERO,
        )
        .await
        .unwrap();
    let ev = &claimed.items[0].event;
    assert_eq!(ev.proxy_id, "control");
    assert_eq!(ev.app, "shop");
    assert_eq!(ev.path, "/wp-admin");
    assert_eq!(ev.headers["user-agent"], "x");
    assert_eq!(
        ev.cookies["sid"],
        esper_protocol::hash_cookie_value("secret"),
        "cookie values leave hashed"
    );

    let (status, q) = s.post("/api/v1/queue/pause", json!({})).await;
    assert_eq!(status, 200, "{q}");
    assert_eq!(q["paused"], true);
    let (_, a) = s.post("/api/v1/analyze", probe.clone()).await;
    assert_eq!(a["enqueued"], false, "a paused queue still gets an answer");
    assert_eq!(a["action"], "tarpit");
    let (_, q) = s.post("/api/v1/queue/resume", json!({})).await;
    assert_eq!(q["paused"], false);

    let (status, body) = s
        .post(
            "/api/v1/analyze",
            json!({"client_ip": "nope", "method": "GET", "path": "/"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = s
        .post(
            "/api/v1/analyze",
            json!({"client_ip": "192.0.2.1", "method": "G T", "path": "/"}),
        )
        .await;
    assert_eq!(status, 400);
    s.stop().await;
}

#[tokio::test]
async fn a_broker_refusing_this_servers_setup_is_502_not_the_callers_fault() {
    // The ingestion URL names the mitigation broker: its 404 is the server's setup.
    let brokers = support::Brokers::start().await;
    let dir = support::TempDir::new();
    let cfg = support::config(&dir, &brokers.mitigation_url, &brokers.mitigation_url);
    let s = Stack::with_config(dir, cfg, Some(brokers)).await;
    let (status, body) = s.get("/api/v1/queue/status").await;
    assert_eq!(
        (status, &body["error"]),
        (502, &json!("broker_misconfigured")),
        "{body}"
    );
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("check the broker token and URL"), "{msg}");
    s.stop().await;
}

#[tokio::test]
async fn broker_failures_are_502_with_a_clear_message() {
    let s = Stack::without_brokers().await;
    let (status, body) = s
        .post(
            "/api/v1/mitigations",
            json!({"entity": "ip:192.0.2.1", "action": "block"}),
        )
        .await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "broker_unavailable");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.starts_with("cannot reach the mitigation broker at http://127.0.0.1:"),
        "{msg}"
    );
    assert!(msg.ends_with("connection refused"), "{msg}");
    let (status, body) = s.get("/api/v1/queue/status").await;
    assert_eq!(status, 502);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("cannot reach the ingestion broker")
    );
    let (status, a) = s
        .post(
            "/api/v1/analyze",
            json!({"client_ip": "192.0.2.1", "method": "GET", "path": "/"}),
        )
        .await;
    assert_eq!(status, 200, "analyze answers even with both brokers down");
    assert_eq!(
        a,
        json!({"action": "allow", "mitigation": null, "enqueued": false})
    );
    s.stop().await;
}

fn decision(id: &str, entity: &str, mode: &str, secs_ago: i64) -> Value {
    let at = Utc::now() - chrono::Duration::seconds(secs_ago);
    json!({
        "id": id,
        "mitigation": {
            "id": id, "entity": entity, "action": {"type": "block"},
            "reason": {"policy_id": "login-burst", "summary": "12 >= 10 in 60s"},
            "origin": "policy", "created_at": at, "expires_at": at + chrono::Duration::minutes(10)
        },
        "mode": mode, "policy_id": "login-burst", "policy_version": 2,
        "counted": 12.0, "threshold": 10.0, "window_secs": 60,
        "decided_by": "worker-1", "decided_at": at
    })
}

#[tokio::test]
async fn the_decision_log_is_idempotent_and_filtered() {
    let s = Stack::without_brokers().await;
    let batch = json!({"decisions": [
        decision("d1", "ip:192.0.2.1", "enforce", 30),
        decision("d2", "ip:192.0.2.1", "shadow", 20),
        decision("d3", "ip:192.0.2.2", "enforce", 10),
    ]});
    let (status, r) = s.post("/api/v1/decisions", batch.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r, json!({"received": 3, "recorded": 3}));
    let (_, r) = s.post("/api/v1/decisions", batch).await;
    assert_eq!(
        r,
        json!({"received": 3, "recorded": 0}),
        "a retried batch is not logged twice"
    );
    // Dated in the far future, a decision would head the newest-first log for ever.
    let ahead = json!({"decisions": [decision("d-future", "ip:192.0.2.9", "enforce", -7200)]});
    let (status, r) = s.post("/api/v1/decisions", ahead).await;
    assert_eq!(status, 400, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("ahead of this server's clock"),
        "{r}"
    );

    // Times the log could not read back (it keeps four-digit years) are refused, so a
    // bad record cannot break the reads, and the workers' revocation feed, that meet it.
    let mut old = decision("d-old", "ip:192.0.2.9", "enforce", 0);
    old["decided_at"] = json!("-0001-01-01T00:00:00Z");
    let mut far = decision("d-far", "ip:192.0.2.9", "enforce", 0);
    far["mitigation"]["expires_at"] = json!("+10000-01-01T00:00:00Z");
    for (bad, says) in [(old, "decided_at"), (far, "expires_at")] {
        let (status, r) = s
            .post("/api/v1/decisions", json!({"decisions": [bad]}))
            .await;
        assert_eq!((status, &r["error"]), (400, &json!("invalid_body")), "{r}");
        assert!(r["message"].as_str().unwrap().contains(says), "{r}");
    }
    let ancient = json!({"id": "d1", "revoked_at": "-0001-01-01T00:00:00Z", "revoked_by": "ops"});
    let (status, r) = s.post("/api/v1/decisions/revoke", ancient).await;
    assert_eq!((status, &r["error"]), (400, &json!("invalid_body")), "{r}");

    let ids = |v: &Value| -> Vec<String> {
        v["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["decision"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = s.get("/api/v1/decisions").await;
    assert_eq!(ids(&all), ["d3", "d2", "d1"]);
    let (_, some) = s
        .get("/api/v1/decisions?entity=ip:192.0.2.1&mode=shadow")
        .await;
    assert_eq!(ids(&some), ["d2"]);
    let (_, some) = s.get("/api/v1/decisions?policy=login-burst&limit=1").await;
    assert_eq!(ids(&some), ["d3"]);
    let (status, body) = s.get("/api/v1/decisions?mode=loud").await;
    assert_eq!(status, 400);
    assert_eq!(body["message"], "mode `loud` is not enforce or shadow");
    let (status, body) = s.get("/api/v1/decisions?limit=many").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_query");
    for bad in ["0", "1001"] {
        let (status, body) = s.get(&format!("/api/v1/decisions?limit={bad}")).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            body["message"],
            format!("limit must be 1 to 1000, got {bad}")
        );
    }
    let (status, body) = s.get("/api/v1/mitigations?limit=0").await;
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("invalid_query")),
        "{body}"
    );

    // Workers read the revoked policy decisions, to re-arm those policies.
    let (_, none) = s.get("/api/v1/decisions/revocations").await;
    assert_eq!(none, json!({"revocations": [], "next": "0"}));
    let revoke = json!({"id": "d1", "revoked_at": chrono::Utc::now(), "revoked_by": "ops"});
    let (status, r) = s.post("/api/v1/decisions/revoke", revoke).await;
    assert_eq!((status, &r["revoked"]), (200, &json!(1)), "{r}");
    let (status, r) = s.get("/api/v1/decisions/revocations?limit=10").await;
    assert_eq!(status, 200, "{r}");
    let revoked = &r["revocations"];
    assert_eq!(revoked.as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(revoked[0]["id"], "d1");
    assert_eq!(revoked[0]["seq"], 1);
    assert_eq!(revoked[0]["policy_id"], "login-burst");
    assert_eq!(revoked[0]["entity"], "ip:192.0.2.1");
    assert_eq!(r["next"], "1");
    let (_, r) = s.get("/api/v1/decisions/revocations?limit=1").await;
    assert_eq!(r["next"], "1,d1", "a full page goes on from its last");
    let (_, r) = s.get("/api/v1/decisions/revocations?after=1,d1").await;
    assert_eq!(
        r,
        json!({"revocations": [], "next": "1"}),
        "nothing after the last"
    );
    let (status, body) = s.get("/api/v1/decisions/revocations?after=yesterday").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_query");
    // A limit out of range is refused, as every other `limit` is, not quietly clamped.
    for bad in [0, 5001] {
        let (status, body) = s
            .get(&format!("/api/v1/decisions/revocations?limit={bad}"))
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            body["message"],
            format!("limit must be 1 to 5000, got {bad}")
        );
    }

    let text = s
        .http
        .get(format!("{}/metrics", s.metrics))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("esper_decisions_logged_total 3"), "{text}");
    assert!(
        text.contains(
            "esper_requests_total{method=\"POST\",route=\"/api/v1/decisions\",status=\"200\"} 2"
        ),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test]
async fn heartbeats_status_and_health() {
    let s = Stack::start().await;
    let (_, ready) = call(s.http.get(format!("{}/healthz/detailed", s.health))).await;
    assert_eq!(ready["status"], "degraded", "no worker yet: {ready}");

    let (status, ack) = s
        .post("/api/v1/workers/heartbeat", worker_beat("worker-1"))
        .await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack["ok"], true);
    let proxy = json!({"proxy_id": "edge-1", "apps": ["shop"], "cache_entries": 0, "requests_total": 5,
                       "events_sent_total": 5, "events_dropped_total": 0, "stream_connected": true,
                       "started_at": Utc::now()});
    let (status, _) = s.post("/api/v1/proxies/heartbeat", proxy.clone()).await;
    assert_eq!(status, 200);
    let (status, body) = s.post("/api/v1/workers/heartbeat", worker_beat("")).await;
    assert_eq!(status, 400, "{body}");
    // A heartbeat is kept for an hour: what one may hold is bounded.
    let mut crowded = proxy.clone();
    crowded["proxy_id"] = json!("edge-2");
    crowded["apps"] = json!(vec!["app"; 1001]);
    let (status, body) = s.post("/api/v1/proxies/heartbeat", crowded).await;
    assert_eq!(status, 400, "{body}");
    let mut long = proxy.clone();
    long["proxy_id"] = json!("edge-2");
    long["apps"] = json!(["x".repeat(129)]);
    let (status, body) = s.post("/api/v1/proxies/heartbeat", long).await;
    assert_eq!(status, 400, "{body}");

    let (_, w) = s.get("/api/v1/workers").await;
    assert_eq!(w["workers"][0]["worker_id"], "worker-1");
    assert_eq!(w["workers"][0]["alive"], true);
    let (_, p) = s.get("/api/v1/proxies").await;
    assert_eq!(p["proxies"][0]["proxy_id"], "edge-1");

    s.apply_toml(POLICIES).await;
    s.post("/api/v1/policies/api-scrapers/disable", json!({}))
        .await;
    let (status, st) = s.get("/api/v1/status").await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["server"]["store"], "sqlite");
    assert_eq!(st["server"]["store_reachable"], true);
    assert_eq!(st["ingestion"]["reachable"], true);
    assert_eq!(st["ingestion"]["queue"]["depth"], 0);
    assert_eq!(st["mitigation"]["reachable"], true);
    assert_eq!(st["mitigation"]["active"], 0);
    assert_eq!(st["policies"]["total"], 2);
    assert_eq!(st["policies"]["enabled"], 1);
    assert_eq!(st["workers"].as_array().unwrap().len(), 1);
    assert_eq!(st["proxies"].as_array().unwrap().len(), 1);
    let report: esper_control::StatusReport = serde_json::from_value(st).unwrap();
    assert!(report.policies.revision >= 2);

    let (status, h) = call(s.http.get(format!("{}/healthz/detailed", s.health))).await;
    assert_eq!(status, 200);
    assert_eq!(h["status"], "ok", "{h}");
    let (status, _) = call(s.http.get(format!("{}/readyz", s.health))).await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test]
async fn brokers_down_is_degraded_not_unready() {
    let s = Stack::without_brokers().await;
    let (status, h) = call(s.http.get(format!("{}/readyz", s.health))).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["status"], "degraded");
    let broker = h["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mitigation_broker")
        .unwrap()
        .clone();
    assert_eq!(broker["healthy"], false);
    let (status, _) = call(s.http.get(format!("{}/healthz", s.health))).await;
    assert_eq!(status, 200);
    let (_, st) = s.get("/api/v1/status").await;
    assert_eq!(st["ingestion"]["reachable"], false);
    assert!(
        st["ingestion"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot reach")
    );
    assert_eq!(st["mitigation"]["reachable"], false);
    s.stop().await;
}

#[tokio::test]
async fn bad_input_gets_clear_4xx_json() {
    let s = Stack::without_brokers().await;
    let raw = |body: &'static str| {
        s.req(Method::POST, "/api/v1/decisions")
            .header("content-type", "application/json")
            .body(body)
    };
    let (status, body) = call(raw("{\"decisions\": [")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_json");
    let (status, body) = call(raw("{\"decisions\": [], \"extra\": 1}")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_body");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `extra`"),
        "{body}"
    );
    // An array is not taken for an object, field by field.
    for path in ["/api/v1/mitigations", "/api/v1/admin/shutdown"] {
        let (status, body) = call(
            s.req(Method::POST, path)
                .header("content-type", "application/json")
                .body(r#"["ip:192.0.2.1", "block", "1m"]"#),
        )
        .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["message"], "expected an object, found an array");
    }
    let (status, body) = call(
        s.req(Method::POST, "/api/v1/admin/shutdown")
            .header("content-type", "application/json")
            .body("[]"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(
        s.req(Method::POST, "/api/v1/policies")
            .header("content-type", "application/json")
            .body("[[]]"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("found an array"),
        "{body}"
    );
    // Media types are case-insensitive.
    let (status, body) = call(
        s.req(Method::POST, "/api/v1/mitigations")
            .header("content-type", "Application/JSON")
            .body("{}"),
    )
    .await;
    assert_eq!(status, 400, "read as JSON: {body}");
    assert_eq!(body["error"], "invalid_body");
    assert_eq!(s.get("/api/v1/status").await.0, 200, "still serving");
    let (status, body) = call(s.req(Method::POST, "/api/v1/decisions").body("{}")).await;
    assert_eq!(status, 415, "{body}");
    let big = "x".repeat(2 * 1024 * 1024);
    let (status, body) = call(
        s.req(Method::POST, "/api/v1/policies")
            .header("content-type", "application/toml")
            .body(big.clone()),
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "payload_too_large");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("request body is larger than the limit of "),
        "{body}"
    );
    let (status, body) = call(
        s.req(Method::POST, "/api/v1/analyze")
            .header("content-type", "application/json")
            .body(big),
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "payload_too_large");
    let (status, body) = s.get("/api/v1/nothing-here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    let (status, body) = call(s.req(Method::PATCH, "/api/v1/policies")).await;
    assert_eq!(status, 405);
    assert_eq!(body["error"], "method_not_allowed");
    let (status, _) = s
        .post("/api/v1/admin/shutdown", json!({"timeout_secs": 99999}))
        .await;
    assert_eq!(status, 400);
    s.stop().await;
}

#[tokio::test]
async fn the_allowlist_wins_over_manual_mitigations() {
    let s = Stack::start().await;
    let ban = |entity: &str| json!({"entity": entity, "action": "block", "ttl": "1h"});
    let (status, other) = s.post("/api/v1/mitigations", ban("ip:198.51.100.7")).await;
    assert_eq!(status, 201, "{other}");
    let (status, office) = s.post("/api/v1/mitigations", ban("ip:192.0.2.5")).await;
    assert_eq!(status, 201, "{office}");

    // Allowlisting the office network takes back the ban on it, and only that one.
    let (status, body) = s
        .put(
            "/api/v1/lists/allowlist",
            json!({"kind": "ip", "items": ["192.0.2.0/24"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked"], json!([office["id"]]));
    let (_, active) = s.get("/api/v1/mitigations").await;
    let ids: Vec<_> = active["mitigations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [other["id"].clone()], "{active}");
    let (_, log) = s.get("/api/v1/decisions?entity=ip:192.0.2.5").await;
    assert!(
        log["decisions"][0]["revoked_by"]
            .as_str()
            .is_some_and(|b| b.contains("allowlist")),
        "{log}"
    );

    // New bans on covered addresses, networks or tuples are refused with a reason.
    for (entity, how) in [
        ("ip:192.0.2.9", "is covered by"),
        // Wider than the entry, it would still block the entry's addresses.
        ("cidr:192.0.0.0/16", "would reach"),
        ("tuple:ip:192.0.2.9+header:user-agent=curl", "is covered by"),
    ] {
        let (status, body) = s.post("/api/v1/mitigations", ban(entity)).await;
        assert_eq!(status, 409, "{entity}: {body}");
        assert_eq!(body["error"], "conflict");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{entity} {how} allowlist entry 192.0.2.0/24")),
            "{body}"
        );
    }
    let (status, _) = s.post("/api/v1/mitigations", ban("ip:203.0.113.1")).await;
    assert_eq!(status, 201);
    // An unchanged re-put revokes nothing more.
    let (_, body) = s
        .put(
            "/api/v1/lists/allowlist",
            json!({"kind": "ip", "items": ["192.0.2.0/24"]}),
        )
        .await;
    assert!(body.get("revoked").is_none(), "{body}");
    // An entry written IPv4-mapped is the IPv4 address.
    let (status, body) = s
        .put(
            "/api/v1/lists/allowlist",
            json!({"kind": "ip", "items": ["192.0.2.0/24", "::ffff:198.51.100.7"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked"], json!([other["id"]]));
    let (status, body) = s.post("/api/v1/mitigations", ban("ip:198.51.100.7")).await;
    assert_eq!(status, 409, "{body}");
    s.stop().await;
}

#[tokio::test]
async fn the_proxies_challenge_key_is_made_once_and_needs_a_token() {
    let s = Stack::without_brokers().await;
    let url = format!("{}/api/v1/proxies/challenge-key", s.api);
    let (status, _) = call(s.http.get(&url)).await;
    assert_eq!(status, 401);
    let (status, first) = s.get("/api/v1/proxies/challenge-key").await;
    assert_eq!(status, 200, "{first}");
    let key = first["key"].as_str().unwrap();
    assert_eq!(key.len(), 64, "256 bits in hex");
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(first["revision"], 1);
    assert!(first.get("previous").is_none(), "{first}");
    let (_, again) = s.get("/api/v1/proxies/challenge-key").await;
    assert_eq!(again, first, "the same key every time");
    s.stop().await;
}

#[tokio::test]
async fn a_rotated_challenge_key_reaches_a_waiting_long_poll_and_keeps_the_one_before() {
    let s = Stack::without_brokers().await;
    let (_, first) = s.get("/api/v1/proxies/challenge-key").await;
    let (status, _) = call(
        s.http
            .post(format!("{}/api/v1/proxies/challenge-key/rotate", s.api)),
    )
    .await;
    assert_eq!(status, 401, "rotating needs a token");

    // Nothing newer than revision 1 within a short wait: 204.
    let started = std::time::Instant::now();
    let (status, _) = s.get("/api/v1/proxies/challenge-key?after=1&wait=1").await;
    assert_eq!(status, 204);
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));

    // A long-poll waiting when the key rotates answers the new key at once.
    let poll = s
        .req(Method::GET, "/api/v1/proxies/challenge-key?after=1&wait=30")
        .send();
    let waiting = tokio::spawn(async move {
        let resp = poll.await.unwrap();
        let status = resp.status().as_u16();
        (
            status,
            resp.json::<Value>().await.unwrap(),
            std::time::Instant::now(),
        )
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // No body: the key replaced stays honoured.
    let (status, rotated) = call(s.req(Method::POST, "/api/v1/proxies/challenge-key/rotate")).await;
    let rotated_at = std::time::Instant::now();
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["revision"], 2);
    assert_eq!(rotated["previous_honoured"], true);
    assert!(
        rotated.get("key").is_none(),
        "no key material in the answer: {rotated}"
    );
    let (status, second, answered) = waiting.await.unwrap();
    assert_eq!(status, 200, "{second}");
    assert!(
        answered.duration_since(rotated_at) < std::time::Duration::from_secs(1),
        "the waiting poll answered when the key changed, not at the end of its wait"
    );
    assert_eq!(second["revision"], 2);
    assert_ne!(second["key"], first["key"]);
    assert_eq!(second["previous"], first["key"]);
    let (_, read) = s.get("/api/v1/proxies/challenge-key").await;
    assert_eq!(read, second);

    // After a leak: the key replaced is no longer honoured.
    let (status, dropped) = s
        .post(
            "/api/v1/proxies/challenge-key/rotate",
            json!({"keep_previous": false}),
        )
        .await;
    assert_eq!(status, 200, "{dropped}");
    assert_eq!(dropped["revision"], 3);
    assert_eq!(dropped["previous_honoured"], false);
    let (_, third) = s.get("/api/v1/proxies/challenge-key?after=2").await;
    assert_eq!(third["revision"], 3);
    assert!(third.get("previous").is_none(), "{third}");

    let (status, body) = s
        .post("/api/v1/proxies/challenge-key/rotate", json!({"keep": 1}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_body");
    // A body given is JSON, as on every other route: no rotation on a text body.
    let resp = s
        .req(Method::POST, "/api/v1/proxies/challenge-key/rotate")
        .header("content-type", "text/plain")
        .body("{\"keep_previous\": true}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unsupported_media_type");
    let (_, still) = s.get("/api/v1/proxies/challenge-key").await;
    assert_eq!(still["revision"], 3, "{still}");
    let (status, body) = s.get("/api/v1/proxies/challenge-key?after=x").await;
    assert_eq!(status, 400, "{body}");

    // A stop does not wait out the long-polls: they answer "nothing new" at once.
    let polls: Vec<_> = [
        "/api/v1/proxies/challenge-key?after=3&wait=30",
        "/api/v1/proxies/config?after=0&wait=30",
    ]
    .into_iter()
    .map(|path| {
        let poll = s.req(Method::GET, path).send();
        tokio::spawn(async move { poll.await.map(|r| r.status().as_u16()) })
    })
    .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let stopping = std::time::Instant::now();
    s.stop().await;
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(5),
        "stopped in {:?}",
        stopping.elapsed()
    );
    for poll in polls {
        assert_eq!(poll.await.unwrap().unwrap(), 204);
    }
}

/// Creates a token through the API as the admin; returns the token.
async fn new_token(s: &support::Stack, name: &str, role: &str) -> String {
    let (status, body) = s
        .post("/api/v1/tokens", json!({"name": name, "role": role}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["name"], name);
    assert_eq!(body["role"], role);
    assert_eq!(body["created_by"], "admin");
    // The creation time answered is the one listed.
    let (_, list) = s.get("/api/v1/tokens").await;
    let listed = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap();
    assert_eq!(listed["created_at"], body["created_at"], "{list}");
    body["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn tokens_have_roles_and_are_revoked_at_once() {
    let s = Stack::without_brokers().await;
    let read = new_token(&s, "audit", "read").await;
    let service = new_token(&s, "edge", "service").await;
    let ops = new_token(&s, "ops", "admin").await;
    assert!(read.starts_with("esper_") && read != service && service != ops);
    let as_token = |token: &str, method: Method, path: &str| {
        s.http
            .request(method, format!("{}{path}", s.api))
            .bearer_auth(token)
    };

    // The read role reads, validates, and changes nothing.
    let (status, _) = call(as_token(&read, Method::GET, "/api/v1/policies")).await;
    assert_eq!(status, 200);
    let (status, body) = call(
        as_token(&read, Method::POST, "/api/v1/policies/validate")
            .header("content-type", "application/toml")
            .body(POLICIES),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        as_token(&read, Method::POST, "/api/v1/policies")
            .header("content-type", "application/toml")
            .body(POLICIES),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    assert_eq!(
        body["message"],
        "token `audit` has the read role, which may not call POST /api/v1/policies"
    );
    for path in [
        "/api/v1/proxies/challenge-key",
        "/api/v1/proxies/config",
        "/api/v1/tokens",
    ] {
        let (status, _) = call(as_token(&read, Method::GET, path)).await;
        assert_eq!(status, 403, "{path} is a secret or who holds access");
    }
    let (status, body) = s.get("/api/v1/policies").await;
    assert_eq!((status, body["policies"].clone()), (200, json!([])));

    // The service role makes the calls the parts make, each routed (no 404 or 405)...
    let (status, _) = s
        .put(
            "/api/v1/proxies/config",
            json!({"config": "allow_paths = [\"/health\"]"}),
        )
        .await;
    assert_eq!(status, 200);
    let beat = json!({"proxy_id": "edge-1", "apps": [], "cache_entries": 0, "requests_total": 0,
                      "events_sent_total": 0, "events_dropped_total": 0, "stream_connected": true,
                      "started_at": Utc::now()});
    let calls = [
        (Method::GET, "/api/v1/proxies/config", None),
        (Method::GET, "/api/v1/proxies/challenge-key", None),
        (Method::GET, "/api/v1/proxies/reported", None),
        (Method::POST, "/api/v1/proxies/heartbeat", Some(beat)),
        (Method::GET, "/api/v1/policies/active", None),
        (
            Method::POST,
            "/api/v1/workers/heartbeat",
            Some(worker_beat("w-1")),
        ),
        (Method::GET, "/api/v1/decisions", None),
        (
            Method::POST,
            "/api/v1/decisions",
            Some(json!({"decisions": []})),
        ),
        (Method::GET, "/api/v1/decisions/revocations", None),
    ];
    for (method, path, body) in calls {
        let mut rb = as_token(&service, method.clone(), path);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let (status, answer) = call(rb).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {answer}"
        );
    }
    let (status, body) = call(
        as_token(&service, Method::POST, "/api/v1/analyze")
            .json(&json!({"client_ip": "192.0.2.7", "method": "GET", "path": "/"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["enqueued"], false, "the brokers are down: {body}");
    // ...and nothing an operator does.
    for (method, path) in [
        (Method::GET, "/api/v1/status"),
        (Method::PUT, "/api/v1/proxies/config"),
        (Method::POST, "/api/v1/admin/shutdown"),
        (Method::DELETE, "/api/v1/lists/x"),
    ] {
        let (status, body) = call(as_token(&service, method.clone(), path).json(&json!({}))).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
    }

    // An admin token's changes are recorded under its name.
    let (status, _) = call(
        as_token(&ops, Method::POST, "/api/v1/policies")
            .header("content-type", "application/toml")
            .body(POLICIES),
    )
    .await;
    assert_eq!(status, 200);
    let (_, v) = s.get("/api/v1/policies/login-burst/versions").await;
    assert_eq!(v["versions"][0]["changed_by"], "ops");

    // Listed without the token or its hash.
    let (status, list) = s.get("/api/v1/tokens").await;
    assert_eq!(status, 200);
    let listed: Vec<(&str, &str)> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [("audit", "read"), ("edge", "service"), ("ops", "admin")]
    );
    assert!(
        !list.to_string().contains(&read[6..]),
        "no token in a listing"
    );
    assert!(list["tokens"][0].get("hash").is_none());
    // Each use is recorded (at most once a minute, off the request's path).
    eventually("the uses recorded", || async {
        let (_, list) = s.get("/api/v1/tokens").await;
        list["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["last_used_at"].is_string())
    })
    .await;

    // Bad names, roles and duplicates.
    for (body, status, fragment) in [
        (json!({"name": "audit", "role": "read"}), 409, "exists"),
        (json!({"name": "admin", "role": "read"}), 400, "reserved"),
        (
            json!({"name": "two words", "role": "read"}),
            400,
            "letters, digits",
        ),
        (
            json!({"name": "x", "role": "root"}),
            400,
            "unknown role `root`",
        ),
        (json!({"name": "x"}), 400, "role"),
    ] {
        let (got, answer) = s.post("/api/v1/tokens", body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(fragment),
            "{body}: {answer}"
        );
    }
    let (status, _) = call(as_token(&ops, Method::GET, "/api/v1/tokens")).await;
    assert_eq!(status, 200, "stored admin tokens manage tokens too");

    // Revoked: refused from the next request.
    let (status, body) = s.delete("/api/v1/tokens/audit").await;
    assert_eq!((status, body), (200, json!({"deleted": true})));
    let (status, _) = call(as_token(&read, Method::GET, "/api/v1/policies")).await;
    assert_eq!(status, 401);
    let (status, body) = s.delete("/api/v1/tokens/audit").await;
    assert_eq!(status, 404, "{body}");
    // With the admin token configured, the stored admin tokens may all go.
    let (status, _) = s.delete("/api/v1/tokens/ops").await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_and_the_deletion_of_its_list_are_never_both_written() {
    let s = Stack::without_brokers().await;
    let mut both_refused = 0;
    for round in 0..40 {
        let list = format!("/api/v1/lists/office{round}");
        let (status, _) = s
            .put(&list, json!({"kind": "ip", "items": ["10.0.0.0/8"]}))
            .await;
        assert_eq!(status, 200);
        let policy = format!(
            "[[policy]]\nid = \"p{round}\"\nwindow = \"1m\"\nthreshold = 5\naction = \"block\"\n\
             [policy.match]\nip_not_in_list = \"office{round}\"\n"
        );
        let ((applied, a), (deleted, d)) = tokio::join!(s.apply_toml(&policy), s.delete(&list));
        // Whichever is checked second sees the first: a policy naming a missing list
        // would read it as empty, and `ip_not_in_list` would then hold for everyone.
        match (applied, deleted) {
            (200, 409) | (400, 200) => {}
            (409, 409) => both_refused += 1,
            other => panic!("round {round}: {other:?}: {a} {d}"),
        }
    }
    let (_, active) = s.get("/api/v1/policies/active").await;
    let lists: Vec<&str> = active["lists"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    for p in active["policies"].as_array().unwrap() {
        let named = p["match"]["ip_not_in_list"].as_str().unwrap();
        assert!(
            lists.contains(&named),
            "{} names a missing list {named}",
            p["id"]
        );
    }
    assert!(both_refused < 40, "the retries settle it");
    s.stop().await;
}

/// The id of an operator's call goes with the broker calls made for it, so the broker's
/// log lines of the call carry the same id.
#[tokio::test]
async fn a_calls_request_id_goes_on_to_the_brokers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", fake.local_addr().unwrap());
    let seen = tokio::spawn(async move {
        let (mut conn, _) = fake.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"error":"not_found","message":"no such endpoint"}"#;
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    });
    let dir = support::TempDir::new();
    // The fake is the ingestion broker only: the mirror follows the mitigation broker.
    let nowhere = format!("http://{}", support::closed_addr().await);
    let cfg = support::config(&dir, &url, &nowhere);
    let s = Stack::with_config(dir, cfg, None).await;
    let (status, _) = call(
        s.req(Method::GET, "/api/v1/queue/status")
            .header("x-request-id", "call-7f3a"),
    )
    .await;
    assert_eq!(status, 502);
    let head = seen.await.unwrap();
    assert!(head.contains("x-request-id: call-7f3a"), "{head}");
    s.stop().await;
}

#[tokio::test]
async fn a_request_id_too_long_or_not_plain_is_replaced() {
    let s = Stack::without_brokers().await;
    let echoed = async |id: &[u8]| {
        let resp = s
            .req(Method::GET, "/api/v1/policies")
            .header(
                "x-request-id",
                reqwest::header::HeaderValue::from_bytes(id).unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.headers()["x-request-id"].as_bytes().to_vec()
    };
    assert_eq!(echoed(b"call-7f3a").await, b"call-7f3a");
    for unusable in [&[b'a'; 5000][..], b"bad \xff id", b"<script>"] {
        let fresh = echoed(unusable).await;
        assert_eq!(
            fresh.len(),
            36,
            "a fresh UUID: {:?}",
            String::from_utf8_lossy(&fresh)
        );
    }
    s.stop().await;
}

/// A reload that takes the configured admin token away, with no stored admin token to
/// use instead, keeps it: the API would be left with no way in.
#[tokio::test]
async fn a_reload_keeps_the_admin_token_when_it_is_the_only_way_in() {
    let (ingestion, mitigation) = support::Brokers::down().await;
    let dir = support::TempDir::new();
    let cfg = support::config(&dir, &ingestion, &mitigation);
    let s = Stack::with_config(dir, cfg.clone(), None).await;
    let reloader = s.started.as_ref().unwrap().reloader.clone();
    let none = esper_control::Config {
        admin_token: None,
        ..cfg
    };
    let done = reloader.apply(&none).await;
    assert!(done.applied.is_empty(), "{done:?}");
    assert_eq!(done.kept.len(), 1, "{done:?}");
    assert!(done.kept[0].1.contains("no stored admin token"), "{done:?}");
    let (status, _) = s.get("/api/v1/status").await;
    assert_eq!(status, 200);

    // With a stored admin token, it may go.
    let (status, body) = s
        .post("/api/v1/tokens", json!({"name": "ops", "role": "admin"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let done = reloader.apply(&none).await;
    assert_eq!(done.applied, ["admin_token"], "{done:?}");
    let (status, _) = s.get("/api/v1/status").await;
    assert_eq!(status, 401, "the configured token is gone");
    s.stop().await;
}

/// `systemctl reload esper-server` after the brokers' token was rotated: the server
/// sends the new one from its next call, without a restart.
#[tokio::test]
async fn a_reload_sends_the_rotated_broker_token() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (trigger, shutdown) = esper_common::Shutdown::new();
    let broker = esper_ingestion::start(
        esper_ingestion::Config {
            token: Some("rotated-broker-token".into()),
            ..esper_ingestion::Config::default()
        },
        listener,
        shutdown,
    )
    .await
    .unwrap();
    let url = format!("http://{}", broker.local_addr());
    let dir = support::TempDir::new();
    let nowhere = format!("http://{}", support::closed_addr().await);
    let cfg = esper_control::Config {
        broker_token: Some("first-broker-token".into()),
        ..support::config(&dir, &url, &nowhere)
    };
    let rotated = esper_control::Config {
        broker_token: Some("rotated-broker-token".into()),
        ..cfg.clone()
    };
    let s = Stack::with_config(dir, cfg, None).await;
    let (status, body) = s.get("/api/v1/queue/status").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "broker_misconfigured", "{body}");

    let reloader = s.started.as_ref().unwrap().reloader.clone();
    let done = reloader.apply(&rotated).await;
    assert_eq!(done.applied, ["broker_token"], "{done:?}");
    let (status, body) = s.get("/api/v1/queue/status").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        reloader.apply(&rotated).await.applied.is_empty(),
        "no change the second time"
    );
    s.stop().await;
    trigger.trigger();
    broker.wait().await.unwrap();
}

/// `systemctl reload esper-server` after the brokers moved: the server calls the new
/// ones from its next request, and its mirror follows the new mitigation broker at
/// once (its long poll on the old address is left).
#[tokio::test]
async fn a_reload_moves_the_server_to_other_brokers() {
    let s = Stack::without_brokers().await;
    let (status, body) = s.get("/api/v1/queue/status").await;
    assert_eq!(status, 502, "{body}");
    let brokers = support::Brokers::start().await;
    let published = esper_protocol::MitigationClient::new(&brokers.mitigation_url, None)
        .publish(vec![esper_protocol::Mitigation::new(
            "ip:198.51.100.9".parse().unwrap(),
            esper_protocol::Action::Block,
            std::time::Duration::from_secs(600),
            esper_protocol::Origin::Manual,
            esper_protocol::Reason::default(),
        )])
        .await
        .unwrap();
    assert_eq!(published.accepted, 1);

    let moved = esper_control::Config {
        ingestion_url: brokers.ingestion_url.clone(),
        mitigation_url: brokers.mitigation_url.clone(),
        ..support::config(&s.dir, "http://unused", "http://unused")
    };
    let reloader = s.started.as_ref().unwrap().reloader.clone();
    let done = reloader.apply(&moved).await;
    assert_eq!(
        done.applied,
        ["ingestion_url", "mitigation_url"],
        "{done:?}"
    );
    let (status, body) = s.get("/api/v1/queue/status").await;
    assert_eq!(status, 200, "{body}");
    // Answered from the mirror, which only the new broker's stream can have filled.
    eventually("the mirror follows the new broker", || async {
        let (status, a) = s
            .post(
                "/api/v1/analyze",
                json!({"client_ip": "198.51.100.9", "method": "GET", "path": "/"}),
            )
            .await;
        status == 200 && a["action"] == "block"
    })
    .await;
    assert!(reloader.apply(&moved).await.applied.is_empty());
    s.stop().await;
}

/// The proxies' configuration document cannot carry their credentials or the addresses
/// of their services, and must be a TOML table.
#[tokio::test]
async fn a_proxy_document_with_a_proxys_tokens_is_refused() {
    let s = Stack::without_brokers().await;
    for key in esper_protocol::control::PROXY_LOCAL_ONLY {
        let (status, body) = s
            .put(
                "/api/v1/proxies/config",
                json!({"config": format!("{key} = \"x\"\nallow_paths = [\"/health\"]")}),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], "invalid_config", "{body}");
        assert!(body["message"].as_str().unwrap().contains(key), "{body}");
    }
    let (status, body) = s
        .put("/api/v1/proxies/config", json!({"config": "not toml ="}))
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("invalid_config"))
    );
    let (status, body) = s.get("/api/v1/proxies/config").await;
    assert_eq!(status, 404, "nothing stored: {body}");
    s.stop().await;
}

#[tokio::test]
async fn proxies_learn_which_headers_and_cookies_the_policies_read() {
    let s = Stack::without_brokers().await;
    // No policy yet: nothing to report, at the store's first revision.
    let (status, first) = s.get("/api/v1/proxies/reported").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["headers"], json!([]));
    assert_eq!(first["cookies"], json!([]));
    let rev0 = first["revision"].as_i64().unwrap();
    let (status, _) = s
        .get(&format!("/api/v1/proxies/reported?after={rev0}&wait=1"))
        .await;
    assert_eq!(status, 204, "nothing newer within the wait");

    // A long-poll waiting when policies are applied answers at once.
    let poll = s
        .req(
            Method::GET,
            &format!("/api/v1/proxies/reported?after={rev0}&wait=30"),
        )
        .send();
    let waiting = tokio::spawn(async move {
        let resp = poll.await.unwrap();
        let status = resp.status().as_u16();
        (
            status,
            resp.json::<Value>().await.unwrap(),
            std::time::Instant::now(),
        )
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, body) = s
        .apply_toml(&format!(
            "{POLICIES}
[[policy]]
id = \"sessions\"
entity = \"cookie:Session\"
window = \"1m\"
threshold = 50
filter = 'headers[\"referer\"] == \"\" && cookies[\"cart\"] != \"\"'
action = \"log\"
"
        ))
        .await;
    let applied_at = std::time::Instant::now();
    assert_eq!(status, 200, "{body}");
    let (status, reported, answered) = waiting.await.unwrap();
    assert_eq!(status, 200, "{reported}");
    assert!(
        answered.duration_since(applied_at) < std::time::Duration::from_millis(400),
        "the waiting poll answered when the policies changed, not at its next recheck"
    );
    assert_eq!(reported["revision"], body["revision"]);
    assert_eq!(reported["headers"], json!(["referer", "x-api-key"]));
    assert_eq!(reported["cookies"], json!(["cart", "session"]));

    // Disabled policies are not evaluated, so their names are not asked for.
    let (status, _) = s
        .post("/api/v1/policies/api-scrapers/disable", json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, _) = s.delete("/api/v1/policies/sessions").await;
    assert_eq!(status, 200);
    let (_, now) = s.get("/api/v1/proxies/reported").await;
    assert_eq!(now["headers"], json!([]));
    assert_eq!(now["cookies"], json!([]));
    assert!(now["revision"].as_i64().unwrap() > reported["revision"].as_i64().unwrap());

    let (status, body) = s.get("/api/v1/proxies/reported?after=x").await;
    assert_eq!(status, 400, "{body}");
    s.stop().await;
}
