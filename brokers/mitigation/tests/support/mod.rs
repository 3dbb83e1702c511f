//! Helpers shared by the mitigation broker's integration tests: a broker on an ephemeral
//! loopback port and mitigations; raw HTTP calls and error-body checks come from
//! `brokers/testing/http.rs`.
#![allow(dead_code, clippy::unwrap_used)]

#[path = "../../../testing/http.rs"]
pub mod http;
#[path = "../../../testing/redis_server.rs"]
pub mod redis_server;
pub mod store_suite;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use esper_common::shutdown::{Shutdown, ShutdownTrigger};
use esper_mitigation::{Broker, Config, MitigationStore};
use esper_protocol::{Action, Mitigation, MitigationClient, Origin, Reason};
use tokio::net::TcpListener;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use http::{HttpCalls, expect_error, host_address, metric, post_from};

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
/// Raw HTTP calls (`post`, `get`, `metrics`, `url`, `base`, `http`) come from
/// [`HttpCalls`] through `Deref`.
pub struct TestBroker {
    pub client: MitigationClient,
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
        let broker = esper_mitigation::start(config, listener, shutdown)
            .await
            .unwrap();
        let calls = HttpCalls::new(broker.local_addr(), token.clone());
        TestBroker {
            client: MitigationClient::new(&calls.base, token),
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

    pub fn store(&self) -> Arc<dyn MitigationStore> {
        self.broker.store().clone()
    }

    pub fn trigger(&self) -> &ShutdownTrigger {
        &self.trigger
    }

    pub fn reloader(&self) -> esper_mitigation::Reloader {
        self.broker.reloader()
    }

    /// Fires the shutdown and waits (bounded) for a clean exit.
    pub async fn stop(self) {
        http::stop(&self.trigger, self.broker.wait()).await;
    }
}

impl Deref for TestBroker {
    type Target = HttpCalls;

    fn deref(&self) -> &HttpCalls {
        &self.calls
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
