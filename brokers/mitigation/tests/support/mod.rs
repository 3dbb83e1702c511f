//! Helpers shared by the mitigation broker's integration tests: a broker on an ephemeral
//! loopback port, mitigations, raw HTTP calls and checks of the JSON error body.
#![allow(dead_code, clippy::unwrap_used)]

#[path = "../../../testing/redis_server.rs"]
pub mod redis_server;
pub mod store_suite;

use std::sync::Arc;
use std::time::Duration;

use esper_common::shutdown::{Shutdown, ShutdownTrigger};
use esper_mitigation::{Broker, Config, MitigationStore};
use esper_protocol::{Action, ApiErrorBody, Mitigation, MitigationClient, Origin, Reason};
use tokio::net::TcpListener;

/// A config for tests: loopback, a fast sweeper, short drain.
pub fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        sweep_interval: Duration::from_millis(50),
        shutdown_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

/// A broker serving on 127.0.0.1:0, stopped by [`TestBroker::stop`] (or on drop).
pub struct TestBroker {
    pub base: String,
    pub client: MitigationClient,
    pub http: reqwest::Client,
    token: Option<String>,
    trigger: ShutdownTrigger,
    broker: Broker,
}

impl TestBroker {
    pub async fn start(config: Config) -> TestBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let token = config.token.clone();
        let broker = esper_mitigation::start(config, listener, shutdown)
            .await
            .unwrap();
        let base = format!("http://{}", broker.local_addr());
        TestBroker {
            client: MitigationClient::new(&base, token.clone()),
            base,
            http: reqwest::Client::new(),
            token,
            trigger,
            broker,
        }
    }

    pub async fn with_defaults() -> TestBroker {
        TestBroker::start(config()).await
    }

    pub fn store(&self) -> Arc<dyn MitigationStore> {
        self.broker.store().clone()
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

    pub fn trigger(&self) -> &ShutdownTrigger {
        &self.trigger
    }

    /// Fires the shutdown and waits (bounded) for a clean exit.
    pub async fn stop(self) {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(5), self.broker.wait())
            .await
            .expect("broker did not stop within 5s")
            .unwrap();
    }
}

/// A manual mitigation with a chosen id, in force for `ttl`.
pub fn mitigation(id: &str, entity: &str, action: Action, ttl: Duration) -> Mitigation {
    let mut m = Mitigation::new(
        entity.parse().unwrap(),
        action,
        ttl,
        Origin::Manual,
        Reason {
            policy_id: None,
            summary: format!("test {id}"),
        },
    );
    m.id = id.to_string();
    m
}

/// A blocking manual mitigation for an hour.
pub fn block(id: &str, entity: &str) -> Mitigation {
    mitigation(id, entity, Action::Block, Duration::from_secs(3600))
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
