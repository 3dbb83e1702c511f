//! Traffic passes through the proxy to a real upstream: status, body, headers and
//! request ids; the brokers being down changes nothing for clients; shutdown drains
//! in-flight requests and frees the port; pooled upstream connections are reused, an
//! upstream closing them is not an error, and the optional idle timeout closes them.

#[path = "../../brokers/testing/counting_http.rs"]
mod counting_http;
mod support;

use std::time::{Duration, Instant};

use counting_http::{Behaviour, CountingServer};
use support::{client_from, config, dead_url, start_proxy, upstream};

#[tokio::test]
async fn forwards_status_body_headers_and_request_ids() {
    let up = upstream().await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &dead_url())).await;
    let client = client_from("127.0.0.1");

    let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "yes");
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        uuid::Uuid::parse_str(&generated).unwrap().get_version_num(),
        4
    );
    assert_eq!(resp.text().await.unwrap(), "hello from upstream");
    assert_eq!(up.last_header("x-request-id"), generated);
    assert_eq!(up.last_header("x-forwarded-for"), "127.0.0.1");
    assert_eq!(up.last_header("x-forwarded-proto"), "http");

    // A client's own request id is passed through both ways.
    let resp = client
        .post(format!("{}/login", proxy.url))
        .header("x-request-id", "client-chosen-1")
        .body("user=a&pass=b")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["x-request-id"], "client-chosen-1");
    assert_eq!(resp.text().await.unwrap(), "bad credentials");
    assert_eq!(up.last_header("x-request-id"), "client-chosen-1");

    // An unusable one is replaced before it reaches the upstream.
    let resp = client
        .get(format!("{}/", proxy.url))
        .header("x-request-id", "<script>")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    let replaced = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(replaced, "<script>");
    assert_eq!(up.last_header("x-request-id"), replaced);
    // The client is not a trusted proxy: its own X-Forwarded-For claim is dropped.
    assert_eq!(up.last_header("x-forwarded-for"), "127.0.0.1");
    assert_eq!(up.last_header("x-real-ip"), "127.0.0.1");

    // Counted in the logging phase, which ends just after the client has its answer.
    let counted = support::eventually(Duration::from_secs(2), || async {
        proxy.metric("esper_requests_total{action=\"allow\"}").await == 3.0
    })
    .await;
    assert!(counted);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = gone.local_addr().unwrap();
    drop(gone);
    let proxy = start_proxy(config(addr, &dead_url(), &dead_url())).await;
    let resp = client_from("127.0.0.1")
        .get(format!("{}/", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn brokers_down_still_serves_and_counts_drops() {
    let up = upstream().await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &dead_url())).await;
    let client = client_from("127.0.0.1");
    for _ in 0..5 {
        let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let dropped = support::eventually(Duration::from_secs(5), || async {
        proxy
            .metric("esper_proxy_events_dropped_total{reason=\"send_failed\"}")
            .await
            >= 5.0
    })
    .await;
    assert!(dropped, "events to a dead broker are dropped and counted");

    // Ready (traffic is served) but degraded, and the detail says why.
    let ready = reqwest::get(format!("{}/readyz", proxy.ops_url))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let report: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(report["status"], "degraded");
    let components = report["components"].as_array().unwrap();
    let find = |name: &str| {
        components
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    assert_eq!(find("traffic")["healthy"], true);
    assert_eq!(find("mitigation_stream")["healthy"], false);
    assert_eq!(find("ingestion")["healthy"], false);
    assert!(
        find("ingestion")["detail"]
            .as_str()
            .unwrap()
            .contains("dropped")
    );
    assert_eq!(proxy.metric("esper_proxy_stream_connected").await, 0.0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_frees_the_port() {
    let up = upstream().await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &dead_url())).await;
    let url = proxy.url.clone();
    let addr = proxy.handle().traffic_addr();

    let slow = tokio::spawn({
        let url = url.clone();
        async move {
            client_from("127.0.0.1")
                .get(format!("{url}/slow"))
                .send()
                .await
                .unwrap()
        }
    });
    // Let the slow request reach the upstream before stopping.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let began = Instant::now();
    proxy.stop().await.unwrap();
    let took = began.elapsed();

    let resp = slow.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow answer");
    assert!(took < Duration::from_secs(3), "drain took {took:?}");
    // The listener is gone: new connections are refused and the port can be bound again.
    assert!(
        client_from("127.0.0.1")
            .get(format!("{url}/"))
            .send()
            .await
            .is_err()
    );
    std::net::TcpListener::bind(addr).unwrap();
}

#[tokio::test]
async fn an_idle_proxy_stops_at_once() {
    let up = upstream().await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &dead_url())).await;
    let resp = reqwest::get(format!("{}/", proxy.url)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let began = Instant::now();
    proxy.stop().await.unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "took {:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn a_busy_listen_address_is_one_clear_error() {
    let up = upstream().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.listen = taken.local_addr().unwrap();
    let (_trigger, shutdown) = esper_common::Shutdown::new();
    let err = esper_proxy::start(cfg, Default::default(), shutdown)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("cannot bind proxy traffic listener to 127.0.0.1:"),
        "{err}"
    );
    assert!(err.ends_with("address already in use"), "{err}");
}

/// The upstream: counts its connections, and closes each one `close_after` after its
/// last answer when set (as app servers close idle keep-alive connections).
async fn counting_upstream(close_after: Option<Duration>) -> CountingServer {
    CountingServer::start(Behaviour {
        delay: Duration::ZERO,
        close_after,
    })
    .await
}

#[tokio::test]
async fn pooled_upstream_connections_are_reused() {
    // The default timeout, and none at all.
    for idle in [None, Some(Duration::ZERO)] {
        let up = counting_upstream(None).await;
        let mut cfg = config(up.addr, &dead_url(), &dead_url());
        if let Some(idle) = idle {
            cfg.upstream_idle_timeout = idle;
        }
        let proxy = start_proxy(cfg).await;
        let client = client_from("127.0.0.1");
        for _ in 0..3 {
            let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        // One upstream connection served all three, and the proxy never closed it.
        assert_eq!(up.opened(), 1, "{idle:?}");
        assert_eq!(up.closed_by_client(), 0, "{idle:?}");
        proxy.stop().await.unwrap();
    }
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_is_not_an_error() {
    let up = counting_upstream(Some(Duration::from_millis(100))).await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &dead_url())).await;
    let client = client_from("127.0.0.1");
    for _ in 0..3 {
        let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "ok");
        // Longer than the upstream keeps an idle connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Each request found its pooled connection closed and used a new one.
    assert_eq!(up.opened(), 3);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_timeout_closes_pooled_connections() {
    let up = counting_upstream(None).await;
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.upstream_idle_timeout = Duration::from_millis(150);
    let proxy = start_proxy(cfg).await;
    let client = client_from("127.0.0.1");
    let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let closed = support::eventually(Duration::from_secs(5), || async {
        up.closed_by_client() == 1
    })
    .await;
    assert!(
        closed,
        "the proxy did not close its idle upstream connection"
    );
    let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.opened(), 2);
    proxy.stop().await.unwrap();
}
