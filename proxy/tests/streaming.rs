//! What passes through untouched: a WebSocket conversation with a real WebSocket
//! upstream, and a streamed response whose chunks reach the client as they are made.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use support::{config, dead_url, start_proxy};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server: every text or binary message comes back as it was sent.
async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websockets_pass_through() {
    let upstream = echo_server().await;
    let proxy = start_proxy(config(upstream, &dead_url(), &dead_url())).await;
    let url = format!("ws://{}/socket", proxy.handle().traffic_addr());
    let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back, Message::text(format!("hello {i}")));
    }
    let blob: Vec<u8> = (0..=255).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn streamed_responses_arrive_as_they_are_made() {
    // The upstream sends its first chunk, then waits until the client has it: a proxy
    // that buffered the response would never deliver it.
    let got_first = Arc::new(Notify::new());
    let signal = got_first.clone();
    let router = Router::new().route(
        "/stream",
        get(move || {
            let signal = signal.clone();
            async move {
                let chunks = futures_util::stream::unfold(0u8, move |step| {
                    let signal = signal.clone();
                    async move {
                        match step {
                            0 => Some((Ok::<_, std::io::Error>("first;".to_string()), 1)),
                            1 => {
                                signal.notified().await;
                                Some((Ok("second;".to_string()), 2))
                            }
                            _ => None,
                        }
                    }
                });
                Body::from_stream(chunks)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let proxy = start_proxy(config(upstream, &dead_url(), &dead_url())).await;
    let mut resp = reqwest::get(format!("{}/stream", proxy.url)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(3), resp.chunk())
        .await
        .expect("the first chunk arrives before the response is complete")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"first;");
    got_first.notify_one();
    let mut rest = Vec::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"second;");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_http10_client_gets_an_answer_without_a_length_unchunked_then_a_close() {
    let router = Router::new().route(
        "/stream",
        get(|| async {
            let chunks = futures_util::stream::iter(["one ", "two"])
                .map(|c| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(c)));
            Body::from_stream(chunks)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let proxy = start_proxy(config(upstream, &dead_url(), &dead_url())).await;
    let addr = proxy.handle().traffic_addr();
    // Asking to keep the connection open: without a length, the close is the body's end.
    let answer = support::exchange(
        addr,
        "GET /stream HTTP/1.0\r\nHost: shop.example\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{answer}"
    );
    assert_eq!(body, "one two");
    // HTTP/1.1 clients keep their chunked coding.
    let answer = support::exchange(
        addr,
        "GET /stream HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{answer}"
    );
    proxy.stop().await.unwrap();
}
