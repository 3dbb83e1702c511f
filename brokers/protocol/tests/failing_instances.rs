//! A client given several instances leaves one that fails a call for the next: one whose
//! answer says it cannot serve (its store unreachable, a gateway in front of it failing),
//! and one that accepts calls and never answers. The call goes on with it when repeating
//! it changes nothing; a refusal every instance would give alike does not move it. A
//! call built just before a reload named other instances goes to those.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../testing/counting_http.rs"]
mod counting_http;

use std::time::Duration;

use counting_http::{Behaviour, CountingServer};
use esper_protocol::{
    ClientError, Endpoints, IngestionClient, MitigationClient, RequestEvent, Resend, ServiceClient,
    Token,
};

const ACKED: &str = r#"{"acked":1}"#;
const STORE_DOWN: &str =
    r#"{"error":"store_unavailable","message":"the queue store is unavailable; retry later"}"#;
const UNAVAILABLE: &str = "503 Service Unavailable\r\nretry-after: 1";

async fn answering(json: &'static str) -> CountingServer {
    CountingServer::start(Behaviour {
        json: Some(json),
        ..Behaviour::default()
    })
    .await
}

async fn failing(status: &'static str, json: Option<&'static str>) -> CountingServer {
    CountingServer::start(Behaviour {
        status: Some(status),
        json,
        ..Behaviour::default()
    })
    .await
}

fn both(a: &CountingServer, b: &CountingServer) -> String {
    format!("{},{}", a.url(), b.url())
}

#[tokio::test]
async fn an_instance_whose_store_is_down_is_left_for_the_next() {
    let down = failing(UNAVAILABLE, Some(STORE_DOWN)).await;
    let alive = answering(ACKED).await;
    let client = IngestionClient::new(&both(&down, &alive), None);
    assert_eq!(client.ack("w1", vec!["a".into()]).await.unwrap().acked, 1);
    assert_eq!(client.ack("w1", vec!["b".into()]).await.unwrap().acked, 1);
    assert_eq!((down.requests(), alive.requests()), (1, 2));
}

#[tokio::test]
async fn a_gateways_error_page_moves_on_too() {
    // nginx in front of an instance whose process is gone: a 502 with an HTML page.
    let gateway = failing("502 Bad Gateway", None).await;
    let alive = answering(ACKED).await;
    let client = IngestionClient::new(&both(&gateway, &alive), None);
    client.ack("w1", vec!["a".into()]).await.unwrap();
    client.ack("w1", vec!["b".into()]).await.unwrap();
    assert_eq!((gateway.requests(), alive.requests()), (1, 2));
}

#[tokio::test]
async fn a_full_queue_is_the_answer_of_every_instance_and_does_not_move_on() {
    // Instances over one store share the queue: the next would say the same.
    let full = failing(
        UNAVAILABLE,
        Some(r#"{"error":"queue_full","message":"ingestion queue is full"}"#),
    )
    .await;
    let other = answering(r#"{"accepted":1,"depth":1}"#).await;
    let client = IngestionClient::new(&both(&full, &other), None);
    for _ in 0..2 {
        let err = client.ingest(vec![event()]).await.unwrap_err();
        let ClientError::Backpressure {
            code, retry_after, ..
        } = err
        else {
            panic!("{err}");
        };
        assert_eq!(
            (code.as_str(), retry_after),
            ("queue_full", Some(Duration::from_secs(1)))
        );
    }
    assert_eq!((full.requests(), other.requests()), (2, 0));
}

#[tokio::test]
async fn a_failed_count_is_not_sent_on_but_the_next_call_goes_elsewhere() {
    // A clear's answer says how many it removed; the instance that failed may have
    // removed some, so the caller hears of the failure. Later calls leave it.
    let broken = failing("500 Internal Server Error", None).await;
    let alive = answering(r#"{"revoked":2}"#).await;
    let client = MitigationClient::new(&both(&broken, &alive), None);
    let err = client.clear().await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 500, .. }), "{err}");
    assert_eq!(client.clear().await.unwrap().revoked, 2);
    assert_eq!((broken.requests(), alive.requests()), (1, 1));
}

#[tokio::test]
async fn an_instance_that_hangs_is_waited_on_once_then_left() {
    let hung = CountingServer::start(Behaviour {
        delay: Duration::from_secs(30),
        ..Behaviour::default()
    })
    .await;
    let alive = answering(ACKED).await;
    let client = IngestionClient::new(&both(&hung, &alive), None);
    // A readiness probe gives up after 2 s, and is not sent on: the instance may still
    // be working on it.
    assert!(!client.ready().await);
    assert_eq!((hung.requests(), alive.requests()), (1, 0));
    assert!(client.ready().await);
    assert_eq!((hung.requests(), alive.requests()), (1, 1));
}

#[tokio::test]
async fn an_answer_that_stalls_is_a_timeout_not_a_failure_to_send_on() {
    // A 503 whose body never arrives: the instance may still be working on the call.
    let stalled = CountingServer::start(Behaviour {
        status: Some(UNAVAILABLE),
        json: Some(STORE_DOWN),
        stall_body: true,
        ..Behaviour::default()
    })
    .await;
    let alive = answering(ACKED).await;
    let client = IngestionClient::new(&both(&stalled, &alive), None);
    assert!(!client.ready().await);
    assert_eq!((stalled.requests(), alive.requests()), (1, 0));
    assert!(client.ready().await, "later calls leave it");
    assert_eq!((stalled.requests(), alive.requests()), (1, 1));
}

#[tokio::test]
async fn when_every_instance_fails_the_caller_gets_an_answer() {
    let down = failing(UNAVAILABLE, Some(STORE_DOWN)).await;
    let gateway = failing("504 Gateway Timeout", None).await;
    let client = IngestionClient::new(&both(&down, &gateway), None);
    let err = client.ack("w1", vec!["a".into()]).await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 504, .. }), "{err}");
    assert_eq!((down.requests(), gateway.requests()), (1, 1));
    // Each has been left once, so the next call asks both again.
    client.ack("w1", vec!["b".into()]).await.unwrap_err();
    assert_eq!((down.requests(), gateway.requests()), (2, 2));
}

#[tokio::test]
async fn one_instance_that_cannot_serve_is_asked_once() {
    let down = failing(UNAVAILABLE, Some(STORE_DOWN)).await;
    let client = IngestionClient::new(&down.url(), None);
    let err = client.ack("w1", vec!["a".into()]).await.unwrap_err();
    let ClientError::Backpressure { code, .. } = err else {
        panic!("{err}");
    };
    assert_eq!(code, "store_unavailable");
    assert_eq!(down.requests(), 1);
}

fn event() -> RequestEvent {
    RequestEvent::new("192.0.2.7".parse().unwrap(), "GET", "/")
}

#[tokio::test]
async fn a_call_built_before_a_reload_goes_to_the_instances_named_since() {
    let old = answering(ACKED).await;
    let new = answering(ACKED).await;
    let client = ServiceClient::with_http(
        reqwest::Client::new(),
        Endpoints::new(&old.url()),
        Token::default(),
    );
    let built = client.req(reqwest::Method::GET, "/api/queue/status");
    assert!(client.endpoints().set(&new.url()));
    let resp = client.call(built, Resend::Unanswered).await.unwrap();
    assert!(resp.status().is_success());
    assert_eq!((old.requests(), new.requests()), (0, 1));
}
