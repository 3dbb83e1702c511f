//! Helpers shared by the engine's integration tests: real ingestion and mitigation
//! brokers and an engine worker, each on an ephemeral loopback port, plus events and
//! polling helpers.
// `duplicate_mod`: the Redis and PostgreSQL helpers both load `ports.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::duplicate_mod)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use esper_common::shutdown::{Shutdown, ShutdownTrigger};
use esper_engine::worker::{Config, WorkerError};
use esper_protocol::{IngestionClient, MitigationClient, RequestEvent};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A service task and the trigger that stops it.
pub struct Running<E> {
    pub addr: SocketAddr,
    trigger: ShutdownTrigger,
    task: JoinHandle<Result<(), E>>,
}

impl<E: std::fmt::Debug> Running<E> {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Triggers shutdown and waits (at most 15s) for a clean exit.
    pub async fn stop(self) -> Result<(), E> {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("service stops within 15s")
            .expect("service task does not panic")
    }

    /// Waits (at most `within`) for the service to end by itself.
    pub async fn ended(self, within: Duration) -> Result<(), E> {
        let _keep = self.trigger;
        tokio::time::timeout(within, self.task)
            .await
            .expect("service ends by itself")
            .expect("service task does not panic")
    }
}

async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// An ingestion broker on `127.0.0.1:0` with the memory queue.
pub async fn ingestion() -> Running<esper_ingestion::Error> {
    ingestion_with_attempts(esper_ingestion::Config::default().max_attempts).await
}

/// An ingestion broker that dead-letters an item after `max_attempts` lapsed leases.
pub async fn ingestion_with_attempts(max_attempts: u32) -> Running<esper_ingestion::Error> {
    let listener = loopback().await;
    let addr = listener.local_addr().unwrap();
    let config = esper_ingestion::Config {
        listen: addr,
        batch_timeout: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(2),
        max_attempts,
        ..esper_ingestion::Config::default()
    };
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(esper_ingestion::run(config, listener, shutdown));
    Running {
        addr,
        trigger,
        task,
    }
}

/// A mitigation broker on `listener`.
pub async fn mitigation_on(listener: TcpListener) -> Running<esper_mitigation::Error> {
    let addr = listener.local_addr().unwrap();
    let config = esper_mitigation::Config {
        listen: addr,
        shutdown_timeout: Duration::from_secs(2),
        ..esper_mitigation::Config::default()
    };
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(esper_mitigation::run(config, listener, shutdown));
    Running {
        addr,
        trigger,
        task,
    }
}

/// A mitigation broker on `127.0.0.1:0`.
pub async fn mitigation() -> Running<esper_mitigation::Error> {
    mitigation_on(loopback().await).await
}

/// A loopback address where nothing listens (yet).
pub async fn free_addr() -> SocketAddr {
    loopback().await.local_addr().unwrap()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "esper-engine-{name}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `text` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        // Write then rename, so a worker re-reading the file never sees half of it.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A worker config for tests: policies from `policies`, no control plane, quick claims
/// and refreshes.
pub fn worker_config(ingestion: &str, mitigation: &str, policies: PathBuf) -> Config {
    Config {
        worker_id: "worker-test".into(),
        concurrency: 2,
        batch_size: 50,
        lease: Duration::from_secs(2),
        claim_wait: Duration::from_millis(200),
        ingestion_url: ingestion.into(),
        mitigation_url: mitigation.into(),
        control_url: String::new(),
        policies_file: Some(policies),
        policy_refresh: Duration::from_millis(200),
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// An engine worker with its ops listener on `127.0.0.1:0`.
pub async fn worker(config: Config) -> Running<WorkerError> {
    let listener = loopback().await;
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(esper_engine::worker::run(config, listener, shutdown));
    Running {
        addr,
        trigger,
        task,
    }
}

/// A failed login from `ip`.
pub fn login(ip: &str) -> RequestEvent {
    let mut ev = RequestEvent::new(ip.parse::<IpAddr>().unwrap(), "POST", "/login");
    ev.status = 401;
    ev.host = "shop.example".into();
    ev
}

/// `n` failed logins from `ip`.
pub fn logins(ip: &str, n: usize) -> Vec<RequestEvent> {
    (0..n).map(|_| login(ip)).collect()
}

/// Polls `check` every 50ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the queue has nothing waiting and nothing leased.
pub async fn drained(client: &IngestionClient, limit: Duration) {
    eventually(limit, "an empty queue", || async {
        let s = client.status().await.ok()?;
        (s.depth == 0 && s.leased == 0).then_some(())
    })
    .await
}

/// The worker's `/metrics` text.
pub async fn metrics(ops: &str) -> String {
    reqwest::get(format!("{ops}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample line (`name{labels} value`), 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Clients of both brokers.
pub fn clients(ingestion: &str, mitigation: &str) -> (IngestionClient, MitigationClient) {
    (
        IngestionClient::new(ingestion, None),
        MitigationClient::new(mitigation, None),
    )
}

pub const LOGIN_POLICY: &str = r#"
[[policy]]
id = "login-brute-force"
description = "Repeated failed logins from one address"
entity = "ip"
window = "60s"
threshold = 10
action = "block"
ttl = "5m"
[policy.match]
methods = ["POST"]
paths = ["/login"]
statuses = [401]
"#;

/// The admin token of test control planes.
pub const CONTROL_TOKEN: &str = "engine-test-token-0123456789";

/// A control plane on loopback ephemeral ports, its store a SQLite file in `dir`.
pub async fn control(
    dir: &TempDir,
    ingestion: &str,
    mitigation: &str,
) -> Running<esper_control::Error> {
    control_with(control_config(dir, ingestion, mitigation)).await
}

/// The configuration [`control`] starts with.
pub fn control_config(dir: &TempDir, ingestion: &str, mitigation: &str) -> esper_control::Config {
    esper_control::Config {
        database_url: format!("sqlite://{}?mode=rwc", dir.0.join("esper.db").display()),
        ingestion_url: ingestion.to_string(),
        mitigation_url: mitigation.to_string(),
        admin_token: Some(CONTROL_TOKEN.to_string()),
        shutdown_timeout: Duration::from_secs(2),
        ..esper_control::Config::default()
    }
}

/// A control plane with `config` on loopback ephemeral ports.
pub async fn control_with(config: esper_control::Config) -> Running<esper_control::Error> {
    let listeners = esper_control::Listeners {
        api: loopback().await,
        health: loopback().await,
        metrics: loopback().await,
    };
    let (trigger, shutdown) = Shutdown::new();
    let started = esper_control::start(config, listeners, shutdown)
        .await
        .unwrap();
    let addr = started.api_addr;
    let task = tokio::spawn(started.wait());
    Running {
        addr,
        trigger,
        task,
    }
}

/// A request to the control plane's API with the admin token.
pub fn control_request(method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, url)
        .bearer_auth(CONTROL_TOKEN)
}

/// A switchable TCP relay, to take a service away and bring it back.
#[path = "../../../brokers/testing/relay.rs"]
pub mod relay;

/// The throwaway `redis-server` shared with the broker tests.
#[path = "../../../brokers/testing/redis_server.rs"]
pub mod redis_server;

#[path = "../../../control/server/tests/support/postgres.rs"]
pub mod postgres;
