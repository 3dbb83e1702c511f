//! Helpers shared by the end-to-end tests: free ports, real processes of the `esper`
//! binary, clients bound to distinct loopback addresses, and polling with deadlines.

#![allow(dead_code)]
// `ports.rs` is loaded by each of the helpers that start servers (they are shared with
// other crates, which load one of them at most), and here: a few copies of one function.
#![allow(clippy::duplicate_mod)]

#[path = "../../../server/tests/support/postgres.rs"]
pub mod postgres;
#[path = "../../../../brokers/testing/redis_server.rs"]
pub mod redis_server;
#[path = "../../../../brokers/testing/relay.rs"]
pub mod relay;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The admin token every test stack is started with.
pub const TOKEN: &str = "test-admin-token-0123456789";
/// The broker token every test stack is started with.
pub const BROKER_TOKEN: &str = "test-broker-token-0123456789";

#[path = "../../../../brokers/testing/ports.rs"]
mod ports;
/// A free TCP port on 127.0.0.1, below the ephemeral range (see `ports.rs`).
pub use ports::free_port;

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "esper-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process whose output is captured (for diagnostics) and which is killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pub output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `esper ARGS...` with `env` added.
    pub fn esper(name: &str, args: &[String], env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_esper"));
        // Tracing settings of the shell running the tests must not reach the stacks.
        for (k, _) in std::env::vars() {
            if k.starts_with("OTEL_") || k == "ESPER_TRACING" {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .env("LOG_LEVEL", "info")
            .env("LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn esper");
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    out.lock().map(|mut o| o.push(line)).ok();
                }
            });
        }
        Proc {
            name: name.to_string(),
            child,
            output,
        }
    }

    /// Starts `esper COMMAND... --config FILE` with `env` added.
    pub fn esper_config(command: &[&str], file: &Path, env: &[(&str, String)]) -> Proc {
        let mut args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
        args.extend(["--config".to_string(), file.display().to_string()]);
        Proc::esper(command[0], &args, env)
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        self.output.lock().map(|o| o.join("\n")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `timeout` for exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The process id (to signal it).
    pub fn child_id(&self) -> u32 {
        self.child.id()
    }

    /// Has it exited? With which code?
    pub fn try_exit(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().ok().flatten().map(|s| s.code())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- output of {} -----\n{}", self.name, self.log());
        }
    }
}

/// An HTTP client whose connections come from `ip` (127.0.0.2, 127.0.0.3, ...), so the
/// proxy sees distinct clients.
pub fn client_from(ip: &str) -> reqwest::Client {
    let ip: IpAddr = ip.parse().expect("ip");
    reqwest::Client::builder()
        .local_address(ip)
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `url` answers 200.
pub async fn wait_ready(url: &str, timeout: Duration) {
    let http = reqwest::Client::new();
    eventually(timeout, url, || {
        let http = http.clone();
        async move {
            match http.get(url).send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        }
    })
    .await
}

/// The shipped example policy `conf/policies/login-brute-force.toml` (10 failed logins
/// per address in a minute => block), with its TTL shortened to `ttl` so a test can watch
/// the block expire.
pub fn write_login_policy(dir: &Path, ttl: &str) -> PathBuf {
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conf/policies/login-brute-force.toml");
    let text = std::fs::read_to_string(&example).expect("read the example policy");
    assert!(
        text.contains("ttl = \"10m\""),
        "the example policy changed; update this helper"
    );
    let path = dir.join("login.toml");
    std::fs::write(
        &path,
        text.replace("ttl = \"10m\"", &format!("ttl = \"{ttl}\"")),
    )
    .expect("write policy");
    path
}

/// Where a scenario's processes keep their state: embedded (memory brokers, SQLite) or
/// production (both brokers on one real redis-server, the control plane on a real
/// PostgreSQL).
pub struct Stores {
    /// `REDIS_URL` of both brokers, with a key prefix only this scenario uses.
    pub redis: Option<(String, String)>,
    /// `DATABASE_URL` of the control plane; SQLite in `dir` when `None`.
    pub database_url: Option<String>,
}

impl Stores {
    /// Memory brokers, memory engine state, SQLite.
    pub fn embedded() -> Stores {
        Stores {
            redis: None,
            database_url: None,
        }
    }

    /// The shared test redis-server (a fresh key prefix) and a fresh PostgreSQL database.
    pub async fn production(tag: &str) -> Stores {
        let redis = redis_server::shared();
        Stores {
            redis: Some((redis.url(), redis_server::unique_prefix(tag))),
            database_url: Some(postgres::shared().fresh_database().await),
        }
    }

    /// Environment of either broker.
    pub fn broker_env(&self) -> Vec<(&'static str, String)> {
        match &self.redis {
            Some((url, prefix)) => vec![
                ("REDIS_URL", url.clone()),
                ("ESPER_REDIS_PREFIX", prefix.clone()),
            ],
            None => Vec::new(),
        }
    }

    /// Environment of the engine worker: its state in memory, or on the scenario's Redis
    /// under the scenario's own key prefix.
    pub fn worker_env(&self) -> Vec<(&'static str, String)> {
        match &self.redis {
            Some((url, prefix)) => vec![
                ("ESPER_STATE_BACKEND", "redis".to_string()),
                ("REDIS_URL", url.clone()),
                (
                    "ESPER_STATE_KEY_PREFIX",
                    format!("{}:state", prefix.replace('-', "_")),
                ),
            ],
            None => vec![("ESPER_STATE_BACKEND", "memory".to_string())],
        }
    }

    /// The control plane's `--database-url`: PostgreSQL, or SQLite in `dir`.
    pub fn database_url(&self, dir: &Path) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.join("control.db").display()))
    }
}
