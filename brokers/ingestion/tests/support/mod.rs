//! Helpers shared by the ingestion broker's integration tests: a broker on an ephemeral
//! loopback port and events; raw HTTP calls and error-body checks come from
//! `brokers/testing/http.rs`.
#![allow(dead_code, clippy::unwrap_used)]

#[path = "../../../testing/http.rs"]
pub mod http;
#[path = "../../../testing/redis_server.rs"]
pub mod redis_server;
#[path = "../../../testing/relay.rs"]
#[allow(dead_code)]
pub mod relay;
pub mod store_suite;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use esper_common::shutdown::{Shutdown, ShutdownTrigger};
use esper_ingestion::{Broker, Config, QueueStore};
use esper_protocol::{IngestionClient, RequestEvent};
use tokio::net::TcpListener;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use http::{HttpCalls, expect_error, host_address, metric, post_from};

/// A config for tests: loopback, a small queue, no linger, short drain.
pub fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_queue_size: 100,
        batch_timeout: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

/// A broker serving on 127.0.0.1:0, stopped by [`TestBroker::stop`] (or on drop).
/// Raw HTTP calls (`post`, `get`, `metrics`, `url`, `base`, `http`) come from
/// [`HttpCalls`] through `Deref`.
pub struct TestBroker {
    pub client: IngestionClient,
    calls: HttpCalls,
    trigger: ShutdownTrigger,
    broker: Broker,
}

impl TestBroker {
    pub async fn start(config: Config) -> TestBroker {
        TestBroker::start_on(config, "127.0.0.1:0").await
    }

    /// A broker listening on `addr` (`0.0.0.0:0` to take clients from other hosts).
    pub async fn start_on(config: Config, addr: &str) -> TestBroker {
        let listener = TcpListener::bind(addr).await.unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let token = config.token.clone();
        let broker = esper_ingestion::start(config, listener, shutdown)
            .await
            .unwrap();
        let calls = HttpCalls::new(broker.local_addr(), token.clone());
        TestBroker {
            client: IngestionClient::new(&calls.base, token),
            calls,
            trigger,
            broker,
        }
    }

    pub fn port(&self) -> u16 {
        self.broker.local_addr().port()
    }

    pub async fn with_defaults() -> TestBroker {
        TestBroker::start(config()).await
    }

    pub fn store(&self) -> Arc<dyn QueueStore> {
        self.broker.store().clone()
    }

    /// Fires the shutdown and waits (bounded) for a clean exit.
    pub async fn stop(self) {
        http::stop(&self.trigger, self.broker.wait()).await;
    }

    pub fn trigger(&self) -> &ShutdownTrigger {
        &self.trigger
    }
}

impl Deref for TestBroker {
    type Target = HttpCalls;

    fn deref(&self) -> &HttpCalls {
        &self.calls
    }
}

/// An event whose path names it, so tests can follow it through the queue.
pub fn event(tag: &str) -> RequestEvent {
    RequestEvent::new("203.0.113.7".parse().unwrap(), "GET", &format!("/{tag}"))
}

/// Events tagged `{prefix}0`, `{prefix}1`, ...
pub fn events(prefix: &str, n: usize) -> Vec<RequestEvent> {
    (0..n).map(|i| event(&format!("{prefix}{i}"))).collect()
}

/// The tag of an event built by [`event`].
pub fn tag(event: &RequestEvent) -> String {
    event.path.trim_start_matches('/').to_string()
}
