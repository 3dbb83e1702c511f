//! Configuration from the control plane: a change stored there reaches a running proxy
//! without dropping an open keep-alive connection, and a bad one is refused while the
//! configuration in force stays.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use esper_protocol::ProxyConfigDoc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{
    CONTROL_TOKEN, config, control_plane, dead_url, eventually, get_host, named_upstream,
    start_proxy, upstream,
};

/// Sends `GET path` on a kept-alive connection and reads one answer: status and body.
async fn keep_alive_get(conn: &mut TcpStream, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "the proxy closed the kept-alive connection");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let head = text[..end].to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        if buf.len() >= end + 4 + len {
            let status = head.split(' ').nth(1).unwrap().parse().unwrap();
            return (status, text[end + 4..end + 4 + len].to_string());
        }
    }
}

async fn put_config(control: &str, toml: &str) -> ProxyConfigDoc {
    let resp = reqwest::Client::new()
        .put(format!("{control}/api/v1/proxies/config"))
        .bearer_auth(CONTROL_TOKEN)
        .json(&serde_json::json!({ "config": toml }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Whether the test proxy shows up in the fleet view of the control plane at `control`
/// within 5 s.
async fn heartbeats_reach(control: &str) -> bool {
    eventually(Duration::from_secs(5), || async {
        let list: serde_json::Value = reqwest::Client::new()
            .get(format!("{control}/api/v1/proxies"))
            .bearer_auth(CONTROL_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["proxies"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["proxy_id"] == "proxy-test"))
    })
    .await
}

#[tokio::test]
async fn control_plane_config_applies_without_dropping_connections() {
    let control = control_plane().await;
    let a = named_upstream("a").await;
    let b = named_upstream("b").await;
    let mut cfg = config(a.addr, &dead_url(), &dead_url());
    cfg.control_url = Some(control.url.clone());
    cfg.control_token = Some(CONTROL_TOKEN.into());
    let proxy = start_proxy(cfg).await;
    let mut conn = TcpStream::connect(proxy.handle().traffic_addr())
        .await
        .unwrap();
    assert_eq!(
        keep_alive_get(&mut conn, "/one").await,
        (200, "a /one".into())
    );

    // The control plane switches the upstream and allowlists a path.
    let doc = put_config(
        &control.url,
        &format!("upstream = \"{}\"\nallow_paths = [\"/health\"]\n", b.addr),
    )
    .await;
    assert_eq!(doc.revision, 1);
    let switched = eventually(Duration::from_secs(5), || async {
        get_host(&format!("{}/", proxy.url), "test").await.1 == "b /"
    })
    .await;
    assert!(switched, "new connections reach the new upstream");
    assert_eq!(
        proxy.metric("esper_proxy_remote_config_revision").await,
        1.0
    );
    // The connection opened before the change is still served.
    assert_eq!(
        keep_alive_get(&mut conn, "/two").await,
        (200, "b /two".into())
    );

    // A configuration the proxy cannot apply is refused; the one in force stays.
    put_config(&control.url, "sample_rate = 7.0").await;
    let refused = eventually(Duration::from_secs(5), || async {
        proxy
            .metric("esper_proxy_remote_config_total{result=\"refused\"}")
            .await
            == 1.0
    })
    .await;
    assert!(refused, "the bad configuration is refused");
    assert_eq!(
        proxy.metric("esper_proxy_remote_config_revision").await,
        1.0
    );
    assert_eq!(get_host(&format!("{}/", proxy.url), "test").await.1, "b /");
    assert_eq!(
        keep_alive_get(&mut conn, "/three").await,
        (200, "b /three".into())
    );

    // Not TOML at all: the control plane itself says no.
    let resp = reqwest::Client::new()
        .put(format!("{}/api/v1/proxies/config", control.url))
        .bearer_auth(CONTROL_TOKEN)
        .json(&serde_json::json!({ "config": "upstream = " }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    drop(conn);
    proxy.stop().await.unwrap();
    control.stop().await;
}

#[tokio::test]
async fn a_local_reload_keeps_the_control_plane_document_and_the_next_document_keeps_it() {
    let control = control_plane().await;
    let a = named_upstream("a").await;
    let b = upstream().await;
    let mut cfg = config(a.addr, &dead_url(), &dead_url());
    cfg.control_url = Some(control.url.clone());
    cfg.control_token = Some(CONTROL_TOKEN.into());
    let proxy = start_proxy(cfg.clone()).await;
    let body_now = || async { get_host(&format!("{}/", proxy.url), "test").await.1 };
    let revision = |n: f64| {
        let proxy = &proxy;
        async move {
            eventually(Duration::from_secs(5), || async {
                proxy.metric("esper_proxy_remote_config_revision").await == n
            })
            .await
        }
    };

    // The control plane moves the traffic to `b`.
    let to_b = format!("upstream = \"{}\"\n", b.addr);
    put_config(&control.url, &to_b).await;
    assert!(revision(1.0).await);
    assert_eq!(body_now().await, "hello from upstream");
    assert_eq!(b.last_header("x-real-ip"), "127.0.0.1");

    // A local reload (what SIGHUP does) that stops adding X-Real-IP: the control
    // plane's upstream stays in force.
    let mut local = cfg.clone();
    local.forward_headers = vec!["x-forwarded-proto".into()];
    proxy.handle().reload(local).await.unwrap();
    assert_eq!(body_now().await, "hello from upstream");
    assert_eq!(b.last_header("x-real-ip"), "");

    // The next document is laid over the reloaded local configuration, not the one
    // from start-up: still no X-Real-IP.
    put_config(&control.url, &format!("{to_b}sample_rate = 0.5\n")).await;
    assert!(revision(2.0).await);
    assert_eq!(body_now().await, "hello from upstream");
    assert_eq!(b.last_header("x-real-ip"), "");
    proxy.stop().await.unwrap();
    control.stop().await;
}

/// A local reload naming another control plane moves the proxy to it at once: its
/// long poll on the old one is left, the new one's document applies although its
/// revision is below the last one seen on the old, and heartbeats go to the new one.
#[tokio::test]
async fn a_reload_moves_the_proxy_to_another_control_plane() {
    let (old, new) = (control_plane().await, control_plane().await);
    let a = named_upstream("a").await;
    let b = named_upstream("b").await;
    let mut cfg = config(a.addr, &dead_url(), &dead_url());
    cfg.control_url = Some(old.url.clone());
    cfg.control_token = Some(CONTROL_TOKEN.into());
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.stream_wait = Duration::from_secs(60);
    let proxy = start_proxy(cfg.clone()).await;
    let body_now = || async { get_host(&format!("{}/", proxy.url), "test").await.1 };
    for sample_rate in ["0.5", "0.25"] {
        put_config(&old.url, &format!("sample_rate = {sample_rate}\n")).await;
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxy.metric("esper_proxy_remote_config_revision").await == 2.0
        })
        .await
    );
    assert_eq!(body_now().await, "a /");
    let doc = put_config(&new.url, &format!("upstream = \"{}\"\n", b.addr)).await;
    assert_eq!(doc.revision, 1);

    cfg.control_url = Some(new.url.clone());
    proxy.handle().reload(cfg).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            body_now().await == "b /"
        })
        .await,
        "the new control plane's document applies"
    );
    assert!(
        heartbeats_reach(&new.url).await,
        "heartbeats reach the new control plane"
    );
    proxy.stop().await.unwrap();
    old.stop().await;
    new.stop().await;
}

/// `control_url` may list several control plane instances (over one store): a proxy
/// whose first one is down follows the next, for its document and its heartbeats.
#[tokio::test]
async fn a_proxy_given_several_control_planes_uses_one_that_answers() {
    let control = control_plane().await;
    let b = named_upstream("b").await;
    let a = named_upstream("a").await;
    put_config(&control.url, &format!("upstream = \"{}\"\n", b.addr)).await;
    let mut cfg = config(a.addr, &dead_url(), &dead_url());
    cfg.control_url = Some(format!("{},{}", dead_url(), control.url));
    cfg.control_token = Some(CONTROL_TOKEN.into());
    cfg.heartbeat_interval = Duration::from_millis(100);
    let proxy = start_proxy(cfg).await;
    let applied = eventually(Duration::from_secs(5), || async {
        get_host(&format!("{}/", proxy.url), "test").await.1 == "b /"
    })
    .await;
    assert!(applied, "the document of the instance that answers applies");
    assert!(
        heartbeats_reach(&control.url).await,
        "heartbeats reach the instance that answers"
    );
    proxy.stop().await.unwrap();
    control.stop().await;
}

#[tokio::test]
async fn a_document_refused_for_a_passing_reason_is_tried_again() {
    let control = control_plane().await;
    let a = named_upstream("a").await;
    let mut cfg = config(a.addr, &dead_url(), &dead_url());
    cfg.control_url = Some(control.url.clone());
    cfg.control_token = Some(CONTROL_TOKEN.into());
    let proxy = start_proxy(cfg).await;
    // A templates directory that is not there yet: the document cannot be built.
    let dir = std::env::temp_dir().join(format!("esper-remote-templates-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    put_config(
        &control.url,
        &format!("templates_dir = \"{}\"\n", dir.display()),
    )
    .await;
    let refused = eventually(Duration::from_secs(5), || async {
        proxy
            .metric("esper_proxy_remote_config_total{result=\"refused\"}")
            .await
            >= 1.0
    })
    .await;
    assert!(refused);
    assert_eq!(
        proxy.metric("esper_proxy_remote_config_revision").await,
        0.0
    );
    // Once it is in place, the same revision is applied without a new one.
    std::fs::create_dir_all(&dir).unwrap();
    let applied = eventually(Duration::from_secs(10), || async {
        proxy.metric("esper_proxy_remote_config_revision").await == 1.0
    })
    .await;
    assert!(applied, "the document is applied on a later try");
    proxy.stop().await.unwrap();
    control.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `/healthz/detailed` names the control plane: answering, or the last failure (not
/// required for readiness: the configuration and key in force stay).
#[tokio::test]
async fn health_tells_whether_the_control_plane_answers() {
    let up = upstream().await;
    let component = |ops: String| async move {
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
            .find(|c| c["name"] == "control_plane")
            .cloned()
    };
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.control_url = Some(dead_url());
    let proxy = start_proxy(cfg).await;
    let ops = proxy.ops_url.clone();
    assert!(
        eventually(Duration::from_secs(5), || async {
            component(ops.clone())
                .await
                .is_some_and(|c| c["healthy"] == false && c["required"] == false)
        })
        .await,
        "{:?}",
        component(ops.clone()).await
    );
    proxy.stop().await.unwrap();

    let control = control_plane().await;
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.control_url = Some(control.url.clone());
    cfg.control_token = Some(CONTROL_TOKEN.into());
    let proxy = start_proxy(cfg).await;
    let ops = proxy.ops_url.clone();
    assert!(
        eventually(Duration::from_secs(5), || async {
            component(ops.clone())
                .await
                .is_some_and(|c| c["healthy"] == true)
        })
        .await
    );
    let without = start_proxy(config(up.addr, &dead_url(), &dead_url())).await;
    assert!(component(without.ops_url.clone()).await.is_none());
    without.stop().await.unwrap();
    proxy.stop().await.unwrap();
}

/// A control plane of an older version, without `/api/v1/proxies/reported`: the proxy
/// asks for the route once rather than in a loop (again a minute later).
#[tokio::test]
async fn a_control_plane_that_does_not_name_the_policies_headers_is_not_asked_in_a_loop() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    // Answers long-polls with "nothing newer" after a short wait, and 404 to the rest.
    let app = axum::Router::new()
        .route(
            "/api/v1/proxies/config",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                axum::http::StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/api/v1/proxies/challenge-key",
            axum::routing::get(|| async {
                axum::Json(serde_json::json!({"key": "k".repeat(64), "revision": 0}))
            }),
        )
        .route(
            "/api/v1/proxies/heartbeat",
            axum::routing::post(|| async { axum::http::StatusCode::OK }),
        )
        .fallback(move |req: axum::extract::Request| {
            let counter = counter.clone();
            async move {
                if req.uri().path() == "/api/v1/proxies/reported" {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                axum::http::StatusCode::NOT_FOUND
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let old = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let up = upstream().await;
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.control_url = Some(old);
    let proxy = start_proxy(cfg).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            asked.load(Ordering::SeqCst) == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(asked.load(Ordering::SeqCst), 1, "asked once, not in a loop");
    proxy.stop().await.unwrap();
}
