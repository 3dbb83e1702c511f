//! A broker client built with a pool size keeps at most that many idle connections to
//! the broker: after a burst of concurrent calls, the rest are closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../testing/counting_http.rs"]
mod counting_http;

use std::time::{Duration, Instant};

use counting_http::{Behaviour, CountingServer};
use esper_protocol::IngestionClient;

#[tokio::test]
async fn a_pool_size_bounds_the_idle_connections_kept() {
    // Each answer waits, so the six concurrent calls need six connections.
    let server = CountingServer::start(Behaviour {
        delay: Duration::from_millis(200),
        close_after: None,
        ..Behaviour::default()
    })
    .await;
    let client = IngestionClient::with_pool_size(&server.url(), None, Some(2));
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.ready().await })
        })
        .collect();
    for call in calls {
        assert!(call.await.unwrap());
    }
    assert_eq!(server.opened(), 6);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.closed_by_client() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two stay for the next calls, which reuse them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.closed_by_client(), 4);
    assert!(client.ready().await);
    assert!(client.ready().await);
    assert_eq!(server.opened(), 6);
}
