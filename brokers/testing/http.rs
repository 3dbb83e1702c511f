//! Raw HTTP against a broker under test: calls with the broker's bearer token, the
//! `/metrics` text and checks of the JSON error body. Included by path from each broker
//! crate's `tests/support/mod.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use esper_common::shutdown::ShutdownTrigger;
use esper_protocol::ApiErrorBody;

/// Raw HTTP calls to one broker, with its token when it has one.
pub struct HttpCalls {
    pub base: String,
    pub http: reqwest::Client,
    token: Option<String>,
}

impl HttpCalls {
    /// Calls to the broker answering on `addr`.
    pub fn new(addr: SocketAddr, token: Option<String>) -> HttpCalls {
        HttpCalls {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            token,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// POSTs a JSON body with the broker's token.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.auth(self.http.post(self.url(path)).json(&body))
            .send()
            .await
            .unwrap()
    }

    /// GETs with the broker's token.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.auth(self.http.get(self.url(path)))
            .send()
            .await
            .unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Fires the shutdown and waits (bounded) for the broker's clean exit.
pub async fn stop<E: std::fmt::Debug>(
    trigger: &ShutdownTrigger,
    wait: impl Future<Output = Result<(), E>>,
) {
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("broker did not stop within 5s")
        .unwrap();
}

/// Asserts the status and the JSON error body's code; returns the body.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> ApiErrorBody {
    assert_eq!(resp.status().as_u16(), status, "unexpected status");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("application/json"), "content-type `{ct}`");
    let body: ApiErrorBody = resp.json().await.unwrap();
    assert_eq!(body.error, code, "message: {}", body.message);
    assert!(!body.message.is_empty());
    body
}

/// The value of a metric line (`name{labels} value`) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One of this host's own addresses other than loopback (the source address of its
/// default route), when it has one: a client bound to it reaches a service listening on
/// all addresses as another host would.
pub fn host_address() -> Option<std::net::IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // Connecting a UDP socket only picks the route; nothing is sent.
    probe.connect("198.51.100.1:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// `POST path` on `port` from `from` to `to` (no token): the answer's status and JSON.
pub async fn post_from(
    from: std::net::IpAddr,
    to: std::net::IpAddr,
    port: u16,
    path: &str,
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::builder()
        .local_address(from)
        .build()
        .unwrap();
    let resp = client
        .post(format!("http://{}{path}", SocketAddr::new(to, port)))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}
