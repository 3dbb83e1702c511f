//! A call whose request went out on a connection that then closed without an answer
//! (the instance died with it on the wire, or closed the idle connection as it was
//! written) is sent again when repeating it changes nothing, and never when its answer
//! counts what it did.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../testing/counting_http.rs"]
mod counting_http;

use counting_http::{Behaviour, CountingServer};
use esper_protocol::{IngestionClient, MitigationClient};

const ACKED: &str = r#"{"acked":1}"#;

#[tokio::test]
async fn a_read_on_a_pooled_connection_that_dies_is_sent_again_on_a_new_one() {
    // The first request is answered and its connection pooled; the second, sent on it,
    // gets the connection closed instead.
    let server = CountingServer::start(Behaviour {
        hang_up_after: 1,
        hang_ups: 1,
        ..Behaviour::default()
    })
    .await;
    let client = IngestionClient::new(&server.url(), None);
    assert!(client.ready().await);
    assert!(client.ready().await, "the second call is sent again");
    assert_eq!((server.opened(), server.requests()), (2, 3));
}

#[tokio::test]
async fn an_acknowledgement_is_sent_again_and_a_count_is_not() {
    let server = CountingServer::start(Behaviour {
        hang_ups: 1,
        json: Some(ACKED),
        ..Behaviour::default()
    })
    .await;
    let client = IngestionClient::new(&server.url(), None);
    let acked = client.ack("w1", vec!["item-1".into()]).await.unwrap();
    assert_eq!(acked.acked, 1);
    assert_eq!(server.requests(), 2);

    // A purge's answer says how many items it dropped: a repeat after a first that
    // was done would say none, so the caller hears of the failure instead.
    let server = CountingServer::start(Behaviour {
        hang_ups: 1,
        json: Some(r#"{"purged":3}"#),
        ..Behaviour::default()
    })
    .await;
    let client = IngestionClient::new(&server.url(), None);
    let err = client.purge().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains(&server.url()), "{err}");
    assert_eq!(server.requests(), 1);
    assert_eq!(client.purge().await.unwrap().purged, 3);
}

#[tokio::test]
async fn an_unanswered_call_goes_on_to_the_next_instance_and_stays_there() {
    let dead = CountingServer::start(Behaviour {
        hang_ups: usize::MAX,
        ..Behaviour::default()
    })
    .await;
    let alive = CountingServer::start(Behaviour {
        json: Some(ACKED),
        ..Behaviour::default()
    })
    .await;
    let client = IngestionClient::new(&format!("{},{}/", dead.url(), alive.url()), None);
    client.ack("w1", vec!["item-1".into()]).await.unwrap();
    client.ack("w1", vec!["item-2".into()]).await.unwrap();
    assert_eq!((dead.requests(), alive.requests()), (1, 2));

    // A revoke is not sent on: the instance that dropped it may have done it.
    let dead = CountingServer::start(Behaviour {
        hang_ups: usize::MAX,
        ..Behaviour::default()
    })
    .await;
    let alive = CountingServer::start(Behaviour {
        json: Some(r#"{"revoked":0}"#),
        ..Behaviour::default()
    })
    .await;
    let client = MitigationClient::new(&format!("{},{}", dead.url(), alive.url()), None);
    assert!(client.clear().await.is_err());
    assert_eq!((dead.requests(), alive.requests()), (1, 0));
    // But the next call leaves the instance that dropped it.
    assert_eq!(client.clear().await.unwrap().revoked, 0);
    assert_eq!((dead.requests(), alive.requests()), (1, 1));
}

#[tokio::test]
async fn a_call_that_timed_out_is_not_sent_again() {
    // The instance may still be working on it: a repeat would double its load.
    let server = CountingServer::start(Behaviour {
        delay: std::time::Duration::from_secs(3),
        ..Behaviour::default()
    })
    .await;
    let client = IngestionClient::new(&server.url(), None);
    // A readiness probe gives up after 2 s.
    assert!(!client.ready().await);
    assert_eq!((server.opened(), server.requests()), (1, 1));
}
