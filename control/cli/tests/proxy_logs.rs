//! What the proxy's log says while the ingestion broker refuses every batch: one warning,
//! not one a batch, and a line when it takes events again.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{Proc, TempDir, free_addr};

/// An ingestion broker that refuses every batch with 401 until `accept` is set.
async fn refusing_broker(accept: Arc<AtomicBool>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || {
        let accept = accept.clone();
        async move {
            if accept.load(Ordering::SeqCst) {
                (
                    axum::http::StatusCode::ACCEPTED,
                    r#"{"accepted":1,"depth":0}"#,
                )
            } else {
                (
                    axum::http::StatusCode::UNAUTHORIZED,
                    r#"{"error":"unauthorized","message":"wrong token"}"#,
                )
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refusing_every_batch_is_warned_of_once() {
    let accept = Arc::new(AtomicBool::new(false));
    let broker = refusing_broker(accept.clone()).await;
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = app.local_addr().unwrap();
    tokio::spawn(
        async move { axum::serve(app, axum::Router::new().fallback(|| async { "ok" })).await },
    );
    let dir = TempDir::new("proxy-logs");
    let file = dir.path().join("esper.toml");
    let (listen, ops) = (free_addr(), free_addr());
    std::fs::write(
        &file,
        format!(
            "[proxy]\nupstream = \"{upstream}\"\nlisten = \"{listen}\"\nops_listen = \"{ops}\"\n\
             ingestion_url = \"http://{broker}\"\nmitigation_url = \"http://127.0.0.1:9\"\n\
             flush_interval = \"50ms\"\n"
        ),
    )
    .unwrap();
    let mut proxy = Proc::esper_config(&["proxy", "run"], &file, &[]);
    let client = reqwest::Client::new();
    let url = format!("http://{listen}/");
    // Traffic for two seconds: dozens of batches, each refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut served = 0;
    while served < 40 {
        assert!(Instant::now() < deadline, "{}", proxy.log());
        if client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warned = proxy.log().matches("cannot deliver events").count();
    assert_eq!(warned, 1, "{}", proxy.log());

    accept.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy
        .log()
        .contains("ingestion broker accepts events again")
    {
        assert!(Instant::now() < deadline, "{}", proxy.log());
        let _ = client.get(&url).send().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        proxy.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        proxy.log()
    );
}

/// Sends the start of a request head and hangs up, as any client can.
async fn cut_off_request(proxy: SocketAddr) {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(proxy).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x").await.unwrap();
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_a_client_cuts_off_is_logged_only_at_debug() {
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = app.local_addr().unwrap();
    tokio::spawn(
        async move { axum::serve(app, axum::Router::new().fallback(|| async { "ok" })).await },
    );
    let dir = TempDir::new("proxy-client-faults");
    for (level, shown) in [("info", false), ("debug", true)] {
        let file = dir.path().join(format!("{level}.toml"));
        let (listen, ops) = (free_addr(), free_addr());
        std::fs::write(
            &file,
            format!(
                "[proxy]\nupstream = \"{upstream}\"\nlisten = \"{listen}\"\nops_listen = \"{ops}\"\n\
                 ingestion_url = \"http://127.0.0.1:9\"\nmitigation_url = \"http://127.0.0.1:9\"\n"
            ),
        )
        .unwrap();
        let mut proxy = Proc::esper_config(
            &["proxy", "run"],
            &file,
            &[("LOG_LEVEL", level.to_string())],
        );
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !client
            .get(format!("http://{listen}/"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(Instant::now() < deadline, "{}", proxy.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..5 {
            cut_off_request(listen).await;
        }
        // Time for the lines they would write.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(proxy.terminate(Duration::from_secs(15)), Some(0));
        let log = proxy.log();
        let lines = log.matches("Fail to proxy: Downstream").count();
        if shown {
            assert_eq!(lines, 5, "{log}");
        } else {
            assert_eq!(lines, 0, "{log}");
            assert!(!log.contains("ERROR"), "{log}");
        }
    }
}
