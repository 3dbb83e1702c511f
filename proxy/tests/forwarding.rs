//! Traffic passes through the proxy to a real upstream: status, body, headers and
//! request ids; the brokers being down changes nothing for clients; shutdown drains
//! in-flight requests and frees the port; pooled upstream connections are reused, an
//! upstream closing them is not an error, and none idle past the idle timeout is reused
//! (those left behind are closed); a reload moves the proxy to other brokers;
//! header names go out lowercase unless their case is kept.

#![allow(clippy::unwrap_used)]

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

/// An upstream that cannot be reached is a 502 in the proxy's own format, with the
/// request id, as every answer the proxy writes.
#[tokio::test]
async fn a_request_naming_no_host_reaches_the_app_with_one() {
    // HTTP/1.0 needs no Host (HAProxy's default health check sends none); the request
    // goes upstream as HTTP/1.1, which does.
    let up = upstream().await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &dead_url())).await;
    let answer = support::exchange(proxy.handle().traffic_addr(), "GET / HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.last_header("host"), up.addr.to_string());
    // A request with its own Host keeps it.
    let answer = support::exchange(
        proxy.handle().traffic_addr(),
        "GET / HTTP/1.0\r\nHost: shop.example\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.last_header("host"), "shop.example");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    let addr = support::refusing_addr();
    let proxy = start_proxy(config(addr, &dead_url(), &dead_url())).await;
    let client = client_from("127.0.0.1");
    let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    // Not reused after a failure, and the client is told.
    assert_eq!(resp.headers()["connection"], "close");
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = resp.text().await.unwrap();
    assert!(
        page.contains("502 Bad Gateway") && page.contains(&id),
        "{page}"
    );

    let resp = client
        .get(format!("{}/api", proxy.url))
        .header("accept", "application/json")
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-request-id"], "trace-me-42");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "bad_gateway", "{body}");
    assert_eq!(body["request_id"], "trace-me-42", "{body}");
    proxy.stop().await.unwrap();
}

/// An upstream that takes requests and answers the first after `delay`, or never.
async fn slow_upstream(delay: Option<Duration>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let Some(delay) = delay else {
                    // Holds the connection open, silent.
                    let _ = conn.read(&mut buf).await;
                    return;
                };
                tokio::time::sleep(delay).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                    .await;
                let _ = conn.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_is_a_504_after_the_read_timeout() {
    assert_eq!(
        esper_proxy::Config::default().upstream_read_timeout,
        Duration::from_secs(60),
        "nginx's proxy_read_timeout"
    );
    let silent = slow_upstream(None).await;
    let mut cfg = config(silent, &dead_url(), &dead_url());
    cfg.upstream_read_timeout = Duration::from_millis(300);
    let proxy = start_proxy(cfg).await;
    let client = client_from("127.0.0.1");
    let started = Instant::now();
    let resp = client
        .get(format!("{}/", proxy.url))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "gateway_timeout", "{body}");
    proxy.stop().await.unwrap();

    // One that answers within the timeout is answered.
    let slow = slow_upstream(Some(Duration::from_millis(200))).await;
    let mut cfg = config(slow, &dead_url(), &dead_url());
    cfg.upstream_read_timeout = Duration::from_secs(5);
    let proxy = start_proxy(cfg).await;
    let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow");
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
        ..Behaviour::default()
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

/// A proxy with `upstream_idle_timeout` of `idle`, in front of an upstream that keeps
/// its connections open.
async fn with_idle_timeout(idle: Duration) -> (CountingServer, support::TestProxy) {
    let up = counting_upstream(None).await;
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.upstream_idle_timeout = idle;
    let proxy = start_proxy(cfg).await;
    (up, proxy)
}

#[tokio::test]
async fn a_connection_idle_past_the_timeout_is_not_reused() {
    let (up, proxy) = with_idle_timeout(Duration::from_millis(300)).await;
    let client = client_from("127.0.0.1");
    for _ in 0..2 {
        let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(up.opened(), 2);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn connections_no_longer_reused_are_closed() {
    let (up, proxy) = with_idle_timeout(Duration::from_millis(800)).await;
    let client = client_from("127.0.0.1");
    // Steady traffic over more than three windows: each window's requests share one
    // connection, and the last of them arm the timer on it.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2_500) {
        let resp = client.get(format!("{}/", proxy.url)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(up.opened() >= 4, "opened {}", up.opened());
    let closed = support::eventually(Duration::from_secs(5), || async {
        up.closed_by_client() >= 1
    })
    .await;
    assert!(
        closed,
        "the proxy closed none of the connections it no longer reuses"
    );
    proxy.stop().await.unwrap();
}

/// An upstream that records each request head as it arrived and answers with header
/// names in mixed case and a reason phrase of its own.
async fn recording_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        let answer = b"HTTP/1.1 200 All Good\r\nContent-Length: 2\r\nX-App-Thing: two\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn header_names_go_out_lowercase_unless_their_case_is_kept() {
    let (up, heads) = recording_upstream().await;
    let last_head = || heads.lock().unwrap().last().cloned().unwrap();
    let origin =
        "GET /case?q=1 HTTP/1.1\r\nHost: test\r\nX-Client-Thing: one\r\nConnection: close\r\n\r\n";
    let absolute = "GET http://test/abs?x=1 HTTP/1.1\r\nHost: test\r\nX-Client-Thing: one\r\nConnection: close\r\n\r\n";

    // By default, names as HAProxy and Envoy send them: lowercase but for a few common
    // ones; the target, the values and the upstream's reason phrase are untouched.
    let proxy = start_proxy(config(up, &dead_url(), &dead_url())).await;
    let addr = proxy.handle().traffic_addr();
    let answer = support::exchange(addr, origin).await;
    let head = last_head();
    assert!(head.starts_with("GET /case?q=1 HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nHost: test\r\n"), "{head}");
    assert!(head.contains("\r\nx-client-thing: one\r\n"), "{head}");
    assert!(
        head.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nx-real-ip: 127.0.0.1\r\n"), "{head}");
    assert!(head.contains("\r\nx-forwarded-proto: http\r\n"), "{head}");
    assert!(head.contains("\r\nx-request-id: "), "{head}");
    assert!(answer.starts_with("HTTP/1.1 200 All Good\r\n"), "{answer}");
    assert!(answer.contains("\r\nx-app-thing: two\r\n"), "{answer}");
    assert!(answer.contains("\r\nContent-Length: 2\r\n"), "{answer}");
    assert!(answer.contains("\r\nx-request-id: "), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");

    // An absolute-form target is passed on as Pingora keeps it, names and all.
    support::exchange(addr, absolute).await;
    let absolute_default = last_head();
    assert!(
        absolute_default.contains("\r\nX-Client-Thing: one\r\n"),
        "{absolute_default}"
    );
    assert!(
        absolute_default.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
        "{absolute_default}"
    );

    // Kept (a reload turns it on), every name goes out as it came in.
    let mut cfg = config(up, &dead_url(), &dead_url());
    cfg.preserve_header_case = true;
    proxy.handle().reload(cfg).await.unwrap();
    let answer = support::exchange(addr, origin).await;
    let head = last_head();
    assert!(head.starts_with("GET /case?q=1 HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nX-Client-Thing: one\r\n"), "{head}");
    assert!(
        head.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
        "{head}"
    );
    assert!(answer.starts_with("HTTP/1.1 200 All Good\r\n"), "{answer}");
    assert!(answer.contains("\r\nX-App-Thing: two\r\n"), "{answer}");
    assert!(answer.contains("\r\nx-request-id: "), "{answer}");
    support::exchange(addr, absolute).await;
    assert_eq!(
        last_head().lines().next(),
        absolute_default.lines().next(),
        "the same target either way"
    );
    proxy.stop().await.unwrap();
}

/// A broker token rotated and reloaded is sent from then on, with no restart: the
/// mitigation broker's stream is followed again and events reach the ingestion broker.
/// A reload naming other brokers moves the proxy at once: the stream's long poll in
/// flight is left (the wait here is far longer than the test allows), the new broker
/// does not know the cursor and answers with a snapshot, which replaces the cache, and
/// events go to the new ingestion broker.
#[tokio::test]
async fn a_reload_moves_the_proxy_to_other_brokers() {
    let (ingestion_a, ingestion_b) = (support::ingestion().await, support::ingestion().await);
    let (mitigations_a, mitigations_b) =
        (support::mitigations().await, support::mitigations().await);
    let up = upstream().await;
    let mut cfg = config(up.addr, &ingestion_a.url, &mitigations_a.url);
    cfg.stream_wait = Duration::from_secs(60);
    let proxy = start_proxy(cfg.clone()).await;
    let ttl = Duration::from_secs(600);
    mitigations_a
        .publish("ip:127.0.0.5", esper_protocol::Action::Block, ttl)
        .await;
    mitigations_b
        .publish("ip:127.0.0.7", esper_protocol::Action::Block, ttl)
        .await;
    assert!(support::wait_for_status("127.0.0.5", &proxy.url, 403, Duration::from_secs(10)).await);
    assert_eq!(support::status_from("127.0.0.7", &proxy.url).await, 200);
    let before = ingestion_a
        .claim_until(Duration::from_secs(10), |events| {
            events
                .iter()
                .any(|e| e.client_ip.to_string() == "127.0.0.7")
        })
        .await;
    assert!(
        !before.is_empty(),
        "events go to the first ingestion broker"
    );

    cfg.ingestion_url = ingestion_b.url.clone();
    cfg.mitigation_url = format!("{},{}", dead_url(), mitigations_b.url);
    proxy.handle().reload(cfg).await.unwrap();
    assert!(
        support::wait_for_status("127.0.0.7", &proxy.url, 403, Duration::from_secs(10)).await,
        "the new broker's block is followed without waiting out the old long poll"
    );
    assert_eq!(
        support::status_from("127.0.0.5", &proxy.url).await,
        200,
        "the new broker's snapshot replaced what the old one had published"
    );
    let resp = client_from("127.0.0.6")
        .get(format!("{}/after-move", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let after = ingestion_b
        .claim_until(Duration::from_secs(10), |events| {
            events.iter().any(|e| e.path == "/after-move")
        })
        .await;
    assert!(
        after.iter().any(|e| e.path == "/after-move"),
        "events go to the new ingestion broker"
    );
    let detail: serde_json::Value = reqwest::get(format!("{}/healthz/detailed", proxy.ops_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = detail.to_string();
    assert!(
        text.contains(&ingestion_b.url) && text.contains(&mitigations_b.url),
        "the health report names the brokers in force: {text}"
    );
    assert!(!text.contains(&format!("{} ", ingestion_a.url)), "{text}");

    proxy.stop().await.unwrap();
    for m in [mitigations_a, mitigations_b] {
        m.stop().await;
    }
    for i in [ingestion_a, ingestion_b] {
        i.stop().await;
    }
}

#[tokio::test]
async fn a_reload_sends_the_rotated_broker_token() {
    let (old, new) = ("old-broker-token-1", "new-broker-token-2");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop_ingestion, shutdown) = esper_common::Shutdown::new();
    let ingestion = esper_ingestion::start(
        esper_ingestion::Config {
            token: Some(new.into()),
            ..esper_ingestion::Config::default()
        },
        listener,
        shutdown,
    )
    .await
    .unwrap();
    let ingestion_url = format!("http://{}", ingestion.local_addr());
    let mitigations = support::mitigations_with(
        "127.0.0.1:0".parse().unwrap(),
        esper_mitigation::Config {
            token: Some(new.into()),
            ..esper_mitigation::Config::default()
        },
    )
    .await;
    mitigations.client.token().set(Some(new.into()));
    let up = upstream().await;
    let mut cfg = config(up.addr, &ingestion_url, &mitigations.url);
    cfg.broker_token = Some(old.into());
    let proxy = start_proxy(cfg.clone()).await;
    mitigations
        .publish(
            "ip:127.0.0.5",
            esper_protocol::Action::Block,
            Duration::from_secs(600),
        )
        .await;
    // Refused by the brokers: its events are dropped as refused, and it cannot follow
    // the stream.
    assert_eq!(support::status_from("127.0.0.5", &proxy.url).await, 200);
    let refused = support::eventually(Duration::from_secs(5), || async {
        proxy
            .metric("esper_proxy_events_dropped_total{reason=\"rejected\"}")
            .await
            >= 1.0
    })
    .await;
    assert!(refused, "the old token is refused");
    assert_eq!(support::status_from("127.0.0.5", &proxy.url).await, 200);
    assert_eq!(proxy.metric("esper_proxy_stream_connected").await, 0.0);

    cfg.broker_token = Some(new.into());
    proxy.handle().reload(cfg).await.unwrap();
    assert!(
        support::wait_for_status("127.0.0.5", &proxy.url, 403, Duration::from_secs(10)).await,
        "the block is followed with the new token"
    );
    let resp = client_from("127.0.0.6")
        .get(format!("{}/after-reload", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let claimer = esper_protocol::IngestionClient::new(&ingestion_url, Some(new.into()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut delivered = false;
    while !delivered && Instant::now() < deadline {
        let claimed = claimer
            .claim(
                "test",
                100,
                Duration::from_secs(60),
                Duration::from_millis(200),
            )
            .await
            .unwrap();
        delivered = claimed
            .items
            .iter()
            .any(|i| i.event.path == "/after-reload");
    }
    assert!(delivered, "events are sent with the new token");

    proxy.stop().await.unwrap();
    mitigations.stop().await;
    stop_ingestion.trigger();
    ingestion.wait().await.unwrap();
}
