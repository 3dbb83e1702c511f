//! Helpers shared by the control-plane integration tests: temporary directories, and a
//! complete in-process stack (real ingestion and mitigation brokers, a control plane on
//! a SQLite file) on loopback ephemeral ports.

// `duplicate_mod`: the Redis and PostgreSQL helpers both load `ports.rs`.
#![allow(dead_code, clippy::duplicate_mod)]

#[path = "../../../../brokers/testing/ports.rs"]
mod ports;
pub mod postgres;
#[path = "../../../../brokers/testing/redis_server.rs"]
pub mod redis_server;
#[path = "../../../../brokers/testing/relay.rs"]
pub mod relay;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use esper_common::{Shutdown, ShutdownTrigger};
use esper_control::{Config, Listeners, Started};
use reqwest::{Method, RequestBuilder};
use serde_json::Value;
use tokio::net::TcpListener;

/// The admin token every test stack is configured with.
pub const TOKEN: &str = "test-admin-token-0123456789";

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("esper-control-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The SQLite URL of `esper.db` in this directory.
    pub fn db_url(&self) -> String {
        format!("sqlite://{}?mode=rwc", self.0.join("esper.db").display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// An address nothing listens on, below the ephemeral range so that no other test's
/// `127.0.0.1:0` takes it before a test binds it (a control plane that comes back).
pub async fn closed_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ports::free_port()))
}

/// A control-plane config for tests: the store in `dir`, brokers at the given URLs.
pub fn config(dir: &TempDir, ingestion: &str, mitigation: &str) -> Config {
    Config {
        database_url: dir.db_url(),
        ingestion_url: ingestion.to_string(),
        mitigation_url: mitigation.to_string(),
        admin_token: Some(TOKEN.to_string()),
        shutdown_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

/// Real brokers, each with its own shutdown.
pub struct Brokers {
    pub ingestion_url: String,
    pub mitigation_url: String,
    _trigger: ShutdownTrigger,
}

impl Brokers {
    pub async fn start() -> Brokers {
        let (trigger, shutdown) = Shutdown::new();
        let ingestion = esper_ingestion::start(
            esper_ingestion::Config::default(),
            loopback().await,
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mitigation = esper_mitigation::start(
            esper_mitigation::Config::default(),
            loopback().await,
            shutdown,
        )
        .await
        .unwrap();
        Brokers {
            ingestion_url: format!("http://{}", ingestion.local_addr()),
            mitigation_url: format!("http://{}", mitigation.local_addr()),
            _trigger: trigger,
        }
    }

    /// URLs where nothing answers.
    pub async fn down() -> (String, String) {
        (
            format!("http://{}", closed_addr().await),
            format!("http://{}", closed_addr().await),
        )
    }
}

/// A running control plane and an HTTP client for it.
pub struct Stack {
    pub dir: TempDir,
    pub api: String,
    pub health: String,
    pub metrics: String,
    pub http: reqwest::Client,
    pub brokers: Option<Brokers>,
    pub started: Option<Started>,
    trigger: ShutdownTrigger,
}

impl Stack {
    /// Brokers and a control plane with the admin token [`TOKEN`].
    pub async fn start() -> Stack {
        let brokers = Brokers::start().await;
        let dir = TempDir::new();
        let cfg = config(&dir, &brokers.ingestion_url, &brokers.mitigation_url);
        Stack::with_config(dir, cfg, Some(brokers)).await
    }

    /// A control plane whose brokers are down.
    pub async fn without_brokers() -> Stack {
        let (i, m) = Brokers::down().await;
        let dir = TempDir::new();
        let cfg = config(&dir, &i, &m);
        Stack::with_config(dir, cfg, None).await
    }

    /// A control plane with `cfg` (its store normally in `dir`).
    pub async fn with_config(dir: TempDir, cfg: Config, brokers: Option<Brokers>) -> Stack {
        let (trigger, shutdown) = Shutdown::new();
        let started = esper_control::start(cfg, Listeners::loopback().await.unwrap(), shutdown)
            .await
            .unwrap();
        Stack {
            dir,
            api: format!("http://{}", started.api_addr),
            health: format!("http://{}", started.health_addr),
            metrics: format!("http://{}", started.metrics_addr),
            http: reqwest::Client::new(),
            brokers,
            started: Some(started),
            trigger,
        }
    }

    /// A request with the admin token.
    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(TOKEN)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        call(self.req(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        call(self.req(Method::POST, path).json(&body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        call(self.req(Method::PUT, path).json(&body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        call(self.req(Method::DELETE, path)).await
    }

    /// `POST /api/v1/policies` with a TOML document.
    pub async fn apply_toml(&self, toml: &str) -> (u16, Value) {
        call(
            self.req(Method::POST, "/api/v1/policies")
                .header("content-type", "application/toml")
                .body(toml.to_string()),
        )
        .await
    }

    /// Stops the control plane and waits for it.
    pub async fn stop(mut self) {
        self.trigger.trigger();
        if let Some(s) = self.started.take() {
            s.wait().await.unwrap();
        }
    }
}

/// A running worker's heartbeat, as `esper worker` sends it.
pub fn worker_beat(id: &str) -> Value {
    serde_json::json!({"worker_id": id, "concurrency": 4, "batch_size": 100,
           "state_backend": "memory", "policies_revision": 0, "events_total": 10,
           "decisions_total": 1, "utilization": 0.25, "state": "running",
           "started_at": chrono::Utc::now()})
}

/// Sends a request; returns the status and the JSON body (`null` when not JSON).
pub async fn call(rb: RequestBuilder) -> (u16, Value) {
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Retries `check` every 50 ms for up to 5 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A policy document used across tests.
pub const POLICIES: &str = r#"
[[policy]]
id = "login-burst"
description = "Repeated logins from one address"
window = "60s"
threshold = 10
action = "block"
ttl = "10m"
[policy.match]
methods = ["POST"]
paths = ["/login"]

[[policy]]
id = "api-scrapers"
entity = "header:x-api-key"
window = "1m"
threshold = 600
action = "throttle"
rate = 5
"#;
