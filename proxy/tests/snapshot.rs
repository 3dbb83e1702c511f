//! A snapshot larger than one page of the delta stream: the proxy assembles every page
//! before it enforces any of them, keeps enforcing what it held while the pages arrive,
//! and starts the snapshot over when a page fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use esper_protocol::{Action, Mitigation, Origin, Reason};
use parking_lot::Mutex;
use support::{
    Mitigations, config, dead_url, eventually, mitigations_with, start_proxy, status_from, upstream,
};
use tokio::sync::Notify;

const PAGE: usize = 100;
const WITHIN: Duration = Duration::from_secs(5);

/// A broker whose snapshots arrive in pages of `PAGE`.
async fn paged_broker() -> Mitigations {
    let config = esper_mitigation::Config {
        stream_page_size: PAGE,
        ..esper_mitigation::Config::default()
    };
    mitigations_with("127.0.0.1:0".parse().unwrap(), config).await
}

/// The client address of the `i`th mitigation of a set.
fn addr(set: u8, i: usize) -> String {
    format!("127.{set}.{}.{}", i / 200, i % 200 + 1)
}

/// Blocks for `n` addresses of `set`, published in one call.
async fn publish_set(broker: &Mitigations, set: u8, n: usize) {
    let ms: Vec<Mitigation> = (0..n)
        .map(|i| {
            Mitigation::new(
                format!("ip:{}", addr(set, i)).parse().unwrap(),
                Action::Block,
                Duration::from_secs(600),
                Origin::Manual,
                Reason::default(),
            )
        })
        .collect();
    broker.client.publish(ms).await.unwrap();
}

/// Some addresses of a set of `n`: the first, one on each page, the last.
fn samples(set: u8, n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n).step_by(PAGE).map(|i| addr(set, i + 7)).collect();
    v.push(addr(set, 0));
    v.push(addr(set, n - 1));
    v
}

async fn all_status(addrs: &[String], url: &str, want: u16) -> bool {
    for a in addrs {
        if status_from(a, url).await != want {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn a_snapshot_of_several_pages_is_enforced_whole() {
    let up = upstream().await;
    let broker = paged_broker().await;
    let n = 3 * PAGE + 50;
    publish_set(&broker, 1, n).await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &broker.url)).await;
    assert!(
        eventually(WITHIN, || async {
            proxy.metric("esper_proxy_stream_snapshots_total").await == 1.0
        })
        .await,
        "the snapshot is installed"
    );
    assert_eq!(proxy.metric("esper_proxy_cache_entries").await, n as f64);
    assert!(all_status(&samples(1, n), &proxy.url, 403).await);
    assert_eq!(status_from(&addr(1, n), &proxy.url).await, 200);
    proxy.stop().await.unwrap();
    broker.stop().await;
}

/// What the relay does with the next snapshot page request.
#[derive(Default)]
struct Relay {
    /// Where requests go.
    target: Mutex<String>,
    /// Hold the next snapshot page request until `release` (and say so on `held`).
    hold: AtomicBool,
    held: Notify,
    release: Notify,
    /// Answer the next snapshot page request with a 503.
    fail: AtomicBool,
    /// The query of every stream request, in order.
    queries: Mutex<Vec<String>>,
}

async fn relay_request(State(relay): State<Arc<Relay>>, req: Request) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let query = req.uri().query().unwrap_or_default().to_string();
    let page_request = query.contains("snapshot_after=");
    if req.uri().path() == "/api/mitigations/stream" {
        relay.queries.lock().push(query);
    }
    if page_request && relay.fail.swap(false, Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "relay says no").into_response();
    }
    if page_request && relay.hold.swap(false, Ordering::SeqCst) {
        relay.held.notify_one();
        relay.release.notified().await;
    }
    let target = relay.target.lock().clone();
    let resp = reqwest::get(format!("{target}{path}")).await.unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let body = resp.bytes().await.unwrap();
    (status, [("content-type", "application/json")], body).into_response()
}

/// An HTTP relay in front of the brokers, so a test can switch brokers and hold or
/// fail a snapshot page on its way.
async fn relay(target: &str) -> (Arc<Relay>, String) {
    let relay = Arc::new(Relay {
        target: Mutex::new(target.to_string()),
        ..Relay::default()
    });
    let app = Router::new()
        .fallback(relay_request)
        .with_state(relay.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (relay, url)
}

#[tokio::test]
async fn the_old_set_is_enforced_until_the_new_snapshot_is_complete() {
    let up = upstream().await;
    let (old_broker, new_broker) = (paged_broker().await, paged_broker().await);
    publish_set(&old_broker, 2, 10).await;
    let n = 2 * PAGE + 30;
    publish_set(&new_broker, 3, n).await;
    let (relay, url) = relay(&old_broker.url).await;
    let proxy = start_proxy(config(up.addr, &dead_url(), &url)).await;
    let old = samples(2, 10);
    assert!(eventually(WITHIN, || all_status(&old, &proxy.url, 403)).await);

    // The other broker does not know the proxy's cursor: it answers with the first page
    // of its snapshot, and the relay holds the request for the second.
    relay.hold.store(true, Ordering::SeqCst);
    let held = relay.held.notified();
    *relay.target.lock() = new_broker.url.clone();
    tokio::time::timeout(WITHIN, held).await.unwrap();
    let new = samples(3, n);
    assert!(
        all_status(&old, &proxy.url, 403).await,
        "the old set still holds"
    );
    assert!(
        all_status(&new, &proxy.url, 200).await,
        "no partial snapshot is enforced"
    );
    assert_eq!(proxy.metric("esper_proxy_cache_entries").await, 10.0);

    relay.release.notify_one();
    assert!(eventually(WITHIN, || all_status(&new, &proxy.url, 403)).await);
    assert!(
        all_status(&old, &proxy.url, 200).await,
        "the new set replaced the old"
    );
    assert_eq!(proxy.metric("esper_proxy_cache_entries").await, n as f64);
    proxy.stop().await.unwrap();
    old_broker.stop().await;
    new_broker.stop().await;
}

#[tokio::test]
async fn a_failed_page_starts_the_snapshot_over() {
    let up = upstream().await;
    let broker = paged_broker().await;
    let n = 2 * PAGE + 30;
    publish_set(&broker, 4, n).await;
    let (relay, url) = relay(&broker.url).await;
    relay.fail.store(true, Ordering::SeqCst);
    let proxy = start_proxy(config(up.addr, &dead_url(), &url)).await;
    let set = samples(4, n);
    assert!(eventually(WITHIN, || all_status(&set, &proxy.url, 403)).await);
    assert_eq!(proxy.metric("esper_proxy_cache_entries").await, n as f64);
    assert_eq!(
        proxy.metric("esper_proxy_stream_snapshots_total").await,
        1.0
    );
    // First page, the failed second page, then the snapshot again from its first page.
    let queries = relay.queries.lock().clone();
    let pages: Vec<bool> = queries
        .iter()
        .take(3)
        .map(|q| q.contains("snapshot_after="))
        .collect();
    assert_eq!(pages, [false, true, false], "{queries:?}");
    proxy.stop().await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn a_snapshot_from_a_broker_still_restoring_is_added_to_the_cache() {
    let up = upstream().await;
    let first = mitigations_with(
        "127.0.0.1:0".parse().unwrap(),
        esper_mitigation::Config::default(),
    )
    .await;
    let addr = first.broker.local_addr();
    let proxy = start_proxy(config(up.addr, &dead_url(), &first.url)).await;
    let url = proxy.url.clone();
    let held = first
        .publish("ip:127.0.0.2", Action::Block, Duration::from_secs(600))
        .await;
    assert!(
        eventually(WITHIN, || async {
            status_from("127.0.0.2", &url).await == 403
        })
        .await,
        "blocked"
    );
    // The broker comes back with an empty store and its decision log unreachable: its
    // restore is pending, so its snapshot is not the whole set in force.
    first.stop().await;
    let restoring = mitigations_with(
        addr,
        esper_mitigation::Config {
            persistence_enabled: true,
            control_url: dead_url(),
            ..esper_mitigation::Config::default()
        },
    )
    .await;
    restoring
        .publish("ip:127.0.0.3", Action::Block, Duration::from_secs(600))
        .await;
    assert!(
        eventually(WITHIN, || async {
            status_from("127.0.0.3", &url).await == 403
        })
        .await,
        "what the broker holds now is enforced"
    );
    assert_eq!(
        status_from("127.0.0.2", &url).await,
        403,
        "and what the proxy held stays enforced"
    );
    assert_eq!(status_from("127.0.0.4", &url).await, 200);
    // A revocation of what only the proxy holds still reaches it.
    restoring
        .client
        .revoke(&esper_protocol::mitigation::RevokeRequest {
            id: Some(held.id.clone()),
            entity: None,
        })
        .await
        .unwrap();
    assert!(
        eventually(WITHIN, || async {
            status_from("127.0.0.2", &url).await == 200
        })
        .await,
        "revoked"
    );
    proxy.stop().await.unwrap();
    restoring.stop().await;
}
