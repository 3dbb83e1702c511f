//! The engine worker's configuration: defaults, environment names, flags, validation and
//! the commented template that `config` subcommands print.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use esper_common::config::{
    ConfigError, Vars, check_token, parse_duration_ms, parse_duration_secs,
};
use serde::{Deserialize, Serialize};

/// Default ops listener (`/healthz`, `/readyz`, `/healthz/detailed`, `/metrics`).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9091);
pub const DEFAULT_CONCURRENCY: u32 = 4;
pub const DEFAULT_BATCH_SIZE: u32 = 100;
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
pub const DEFAULT_CLAIM_WAIT: Duration = Duration::from_secs(1);
pub const DEFAULT_INGESTION_URL: &str = "http://127.0.0.1:8082";
pub const DEFAULT_MITIGATION_URL: &str = "http://127.0.0.1:8083";
pub const DEFAULT_CONTROL_URL: &str = "http://127.0.0.1:8080";
pub const DEFAULT_POLICY_REFRESH: Duration = Duration::from_secs(2);
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_STATE_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_STATE_CLEANUP_INTERVAL: Duration = Duration::from_secs(300);
pub const DEFAULT_STATE_CACHE_SIZE: usize = 1_000_000;
pub const DEFAULT_STATE_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The postgres state backend's database: local, as the control plane's would be.
pub const DEFAULT_STATE_DATABASE_URL: &str = "postgres://esper@127.0.0.1:5432/esper";
/// Connections per worker to the postgres state backend: one per concurrent batch step
/// of the default concurrency, and some room.
pub const DEFAULT_STATE_DATABASE_POOL: u32 = 8;
pub const DEFAULT_STATE_KEY_PREFIX: &str = "esper:state";
pub const DEFAULT_EVALUATION_TIMEOUT: Duration = Duration::from_millis(100);
pub const DEFAULT_DECISION_BUFFER: usize = 10_000;
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle connections kept to each broker and to the control plane.
pub const DEFAULT_CONNECTION_POOL_SIZE: u32 = 32;

const MAX_CONCURRENCY: u32 = 1024;
const MAX_IO_THREADS: u32 = 1024;
const MAX_CONNECTION_POOL_SIZE: u32 = 10_000;
const MAX_BATCH_SIZE: u32 = 10_000;

/// Where the engine's hot state lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackendKind {
    /// In this process: fast, lost on restart, not shared between workers.
    #[default]
    Memory,
    /// In Redis, shared by every worker that uses the same Redis and key prefix.
    Redis,
    /// In PostgreSQL: shared like Redis, and durable.
    Postgres,
}

impl FromStr for StateBackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "memory" => Ok(StateBackendKind::Memory),
            "redis" => Ok(StateBackendKind::Redis),
            "postgres" | "postgresql" => Ok(StateBackendKind::Postgres),
            other => Err(format!(
                "`{other}` is not a state backend (memory, redis or postgres)"
            )),
        }
    }
}

impl fmt::Display for StateBackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateBackendKind::Memory => "memory",
            StateBackendKind::Redis => "redis",
            StateBackendKind::Postgres => "postgres",
        })
    }
}

/// The engine worker's settings (the TOML form; see [`Config::template`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This worker's id, unique in the fleet; empty means `HOSTNAME-PID`.
    pub worker_id: String,
    /// Address of `/healthz`, `/readyz`, `/healthz/detailed` and `/metrics`.
    pub listen: SocketAddr,
    /// Claim-evaluate-publish loops running in parallel.
    pub concurrency: u32,
    /// Threads of the async runtime that runs the loops and all their I/O; 0 means one
    /// per core.
    pub io_threads: u32,
    /// Idle HTTP connections kept to each broker and to the control plane, so loops
    /// that claim and publish at once do not open new ones.
    pub connection_pool_size: u32,
    /// Events claimed per batch.
    pub batch_size: u32,
    /// How long claimed events stay leased; unacknowledged ones come back after it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long a claim waits for work when the queue is empty (long-poll).
    #[serde(with = "humantime_serde")]
    pub claim_wait: Duration,
    /// The ingestion broker.
    pub ingestion_url: String,
    /// The mitigation broker.
    pub mitigation_url: String,
    /// The control plane (policies, decision log, heartbeats); empty for none.
    pub control_url: String,
    /// Bearer token for the control plane.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_token: Option<String>,
    /// Bearer token for both brokers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_token: Option<String>,
    /// PEM CA certificates trusted, besides the public roots, for an `https://` control
    /// plane whose certificate comes from a private CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Read policies from this TOML file (re-read when it changes) instead of the
    /// control plane.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies_file: Option<PathBuf>,
    /// How often policies are checked for changes.
    #[serde(with = "humantime_serde")]
    pub policy_refresh: Duration,
    /// How often the worker reports to the control plane.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Where windows, cooldowns and processed event ids live.
    pub state_backend: StateBackendKind,
    /// How long processed event ids are remembered for deduplication.
    #[serde(with = "humantime_serde")]
    pub state_ttl: Duration,
    /// How often idle entities and expired event ids are removed.
    #[serde(with = "humantime_serde")]
    pub state_cleanup_interval: Duration,
    /// Most (policy, entity) pairs tracked, and most event ids remembered.
    pub state_cache_size: usize,
    /// The Redis of the `redis` state backend.
    pub state_redis_url: String,
    /// Prefix of the shared state's Redis keys; workers that share state use the same
    /// one.
    pub state_key_prefix: String,
    /// The database of the `postgres` state backend (`postgres://...`).
    pub state_database_url: String,
    /// Connections to it per worker.
    pub state_database_pool: u32,
    /// Longest one batch's evaluation against the state may take.
    #[serde(with = "humantime_serde")]
    pub evaluation_timeout: Duration,
    /// Above this resident memory no new batch is claimed until it is below again
    /// (`4G`, `512M`, bytes); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<super::memory::ByteSize>,
    /// Decisions held for the control plane while it is unreachable.
    pub decision_buffer: usize,
    /// How long the batches in hand may take to finish once shutdown begins.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            worker_id: String::new(),
            listen: DEFAULT_LISTEN,
            concurrency: DEFAULT_CONCURRENCY,
            io_threads: 0,
            connection_pool_size: DEFAULT_CONNECTION_POOL_SIZE,
            batch_size: DEFAULT_BATCH_SIZE,
            lease: DEFAULT_LEASE,
            claim_wait: DEFAULT_CLAIM_WAIT,
            ingestion_url: DEFAULT_INGESTION_URL.to_string(),
            mitigation_url: DEFAULT_MITIGATION_URL.to_string(),
            control_url: DEFAULT_CONTROL_URL.to_string(),
            control_token: None,
            broker_token: None,
            ca_cert: None,
            policies_file: None,
            policy_refresh: DEFAULT_POLICY_REFRESH,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            state_backend: StateBackendKind::Memory,
            state_ttl: DEFAULT_STATE_TTL,
            state_cleanup_interval: DEFAULT_STATE_CLEANUP_INTERVAL,
            state_cache_size: DEFAULT_STATE_CACHE_SIZE,
            memory_limit: None,
            state_redis_url: DEFAULT_STATE_REDIS_URL.to_string(),
            state_key_prefix: DEFAULT_STATE_KEY_PREFIX.to_string(),
            state_database_url: DEFAULT_STATE_DATABASE_URL.to_string(),
            state_database_pool: DEFAULT_STATE_DATABASE_POOL,
            evaluation_timeout: DEFAULT_EVALUATION_TIMEOUT,
            decision_buffer: DEFAULT_DECISION_BUFFER,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

impl Config {
    /// Reads the environment names (`ESPER_*`, and the seed's `ESPER_STATE_BACKEND`).
    pub fn apply_env(&mut self, vars: &Vars<'_>) -> Result<(), ConfigError> {
        let secs = Duration::from_secs(1);
        let ms = Duration::from_millis(1);
        vars.string(&["ESPER_WORKER_ID"], &mut self.worker_id);
        vars.parse(&["ESPER_WORKER_LISTEN"], &mut self.listen)?;
        vars.parse(&["ESPER_CONCURRENCY"], &mut self.concurrency)?;
        vars.parse(&["ESPER_IO_THREADS"], &mut self.io_threads)?;
        vars.parse(
            &["ESPER_CONNECTION_POOL_SIZE"],
            &mut self.connection_pool_size,
        )?;
        vars.parse(&["ESPER_BATCH_SIZE"], &mut self.batch_size)?;
        vars.duration(&["ESPER_LEASE"], secs, &mut self.lease)?;
        vars.duration(&["ESPER_CLAIM_WAIT"], ms, &mut self.claim_wait)?;
        vars.string(&["ESPER_INGESTION_URL"], &mut self.ingestion_url);
        vars.string(&["ESPER_MITIGATION_URL"], &mut self.mitigation_url);
        vars.string(&["ESPER_CONTROL_URL"], &mut self.control_url);
        vars.secret(
            &["ESPER_CONTROL_TOKEN", "ESPER_TOKEN"],
            &mut self.control_token,
        )?;
        vars.secret(
            &["ESPER_BROKER_TOKEN", "ADMIN_TOKEN"],
            &mut self.broker_token,
        )?;
        if let Some((_, path)) = vars.lookup(&["ESPER_CA_CERT"]) {
            self.ca_cert = Some(PathBuf::from(path));
        }
        if let Some((_, path)) = vars.lookup(&["ESPER_POLICIES_FILE", "ESPER_POLICIES"]) {
            self.policies_file = Some(PathBuf::from(path));
        }
        vars.duration(&["ESPER_POLICY_REFRESH"], secs, &mut self.policy_refresh)?;
        vars.duration(
            &["ESPER_HEARTBEAT_INTERVAL"],
            secs,
            &mut self.heartbeat_interval,
        )?;
        vars.parse(&["ESPER_STATE_BACKEND"], &mut self.state_backend)?;
        vars.duration(&["ESPER_STATE_TTL"], secs, &mut self.state_ttl)?;
        vars.duration(
            &["ESPER_STATE_CLEANUP_INTERVAL"],
            secs,
            &mut self.state_cleanup_interval,
        )?;
        vars.parse(&["ESPER_STATE_CACHE_SIZE"], &mut self.state_cache_size)?;
        vars.parse_opt(&["ESPER_MEMORY_LIMIT"], &mut self.memory_limit)?;
        vars.string(&["ESPER_REDIS_URL", "REDIS_URL"], &mut self.state_redis_url);
        vars.string(&["ESPER_STATE_KEY_PREFIX"], &mut self.state_key_prefix);
        vars.string(
            &[
                "ESPER_STATE_DATABASE_URL",
                "ESPER_DATABASE_URL",
                "DATABASE_URL",
            ],
            &mut self.state_database_url,
        );
        vars.parse(
            &["ESPER_STATE_DATABASE_POOL"],
            &mut self.state_database_pool,
        )?;
        vars.duration(
            &["ESPER_EVALUATION_TIMEOUT"],
            ms,
            &mut self.evaluation_timeout,
        )?;
        vars.parse(&["ESPER_DECISION_BUFFER"], &mut self.decision_buffer)?;
        vars.duration(
            &["ESPER_WORKER_SHUTDOWN_TIMEOUT", "ESPER_SHUTDOWN_TIMEOUT"],
            secs,
            &mut self.shutdown_timeout,
        )?;
        Ok(())
    }

    /// Checks every value once, before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.state_backend {
            StateBackendKind::Memory => {}
            StateBackendKind::Redis => {
                let u = &self.state_redis_url;
                if !(u.starts_with("redis://") || u.starts_with("rediss://"))
                    || u.chars().any(char::is_whitespace)
                {
                    return Err(ConfigError::invalid(
                        "state_redis_url",
                        u,
                        "the redis state backend needs a redis:// or rediss:// URL",
                    ));
                }
            }
            StateBackendKind::Postgres => {
                let u = &self.state_database_url;
                if !(u.starts_with("postgres://") || u.starts_with("postgresql://"))
                    || u.chars().any(char::is_whitespace)
                {
                    return Err(ConfigError::invalid(
                        "state_database_url",
                        u,
                        "the postgres state backend needs a postgres:// or postgresql:// URL",
                    ));
                }
                if self.state_database_pool == 0 || self.state_database_pool > 1000 {
                    return Err(ConfigError::invalid(
                        "state_database_pool",
                        self.state_database_pool,
                        "must be between 1 and 1000",
                    ));
                }
            }
        }
        if self.state_key_prefix.is_empty()
            || self.state_key_prefix.len() > 64
            || !self
                .state_key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_:".contains(c))
        {
            return Err(ConfigError::invalid(
                "state_key_prefix",
                &self.state_key_prefix,
                "use up to 64 of a-z, A-Z, 0-9, '_' and ':'",
            ));
        }
        if !self.worker_id.is_empty()
            && (self.worker_id.len() > 128
                || !self
                    .worker_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)))
        {
            return Err(ConfigError::invalid(
                "worker_id",
                &self.worker_id,
                "use up to 128 of a-z, A-Z, 0-9, '-', '_', '.' and ':'",
            ));
        }
        range("concurrency", self.concurrency, 1, MAX_CONCURRENCY)?;
        range("io_threads", self.io_threads, 0, MAX_IO_THREADS)?;
        range(
            "connection_pool_size",
            self.connection_pool_size,
            1,
            MAX_CONNECTION_POOL_SIZE,
        )?;
        range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)?;
        duration_range(
            "lease",
            self.lease,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        duration_range(
            "claim_wait",
            self.claim_wait,
            Duration::ZERO,
            Duration::from_secs(30),
        )?;
        if self.lease <= self.evaluation_timeout {
            return Err(ConfigError::invalid(
                "lease",
                humantime::format_duration(self.lease),
                "must be longer than evaluation_timeout",
            ));
        }
        // Each may list several instances, comma-separated.
        for (option, urls) in [
            ("ingestion_url", &self.ingestion_url),
            ("mitigation_url", &self.mitigation_url),
            ("control_url", &self.control_url),
        ] {
            if option == "control_url" && urls.is_empty() {
                continue;
            }
            for one in urls.split(',') {
                url(option, one.trim())?;
            }
        }
        if self.control_url.is_empty() && self.policies_file.is_none() {
            return Err(ConfigError::invalid(
                "control_url",
                "",
                "without a control plane, set policies_file (--policies FILE)",
            ));
        }
        check_token("control_token", self.control_token.as_deref())?;
        check_token("broker_token", self.broker_token.as_deref())?;
        duration_range(
            "policy_refresh",
            self.policy_refresh,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        duration_range(
            "heartbeat_interval",
            self.heartbeat_interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        duration_range(
            "state_ttl",
            self.state_ttl,
            Duration::from_secs(1),
            Duration::from_secs(7 * 24 * 3600),
        )?;
        duration_range(
            "state_cleanup_interval",
            self.state_cleanup_interval,
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        )?;
        range("state_cache_size", self.state_cache_size, 1, 1 << 32)?;
        if let Some(limit) = self.memory_limit
            && limit.0 < 16 << 20
        {
            return Err(ConfigError::invalid(
                "memory_limit",
                limit,
                "must be at least 16M (the worker itself needs that much)",
            ));
        }
        duration_range(
            "evaluation_timeout",
            self.evaluation_timeout,
            Duration::from_millis(1),
            Duration::from_secs(60),
        )?;
        range("decision_buffer", self.decision_buffer, 1, 10_000_000)?;
        duration_range(
            "shutdown_timeout",
            self.shutdown_timeout,
            Duration::ZERO,
            Duration::from_secs(3600),
        )
    }

    /// A complete, commented TOML configuration with every option at its default.
    pub fn template() -> &'static str {
        include_str!("template.toml")
    }

    /// The worker id in force: `worker_id`, or `HOSTNAME-PID`.
    pub fn effective_worker_id(&self) -> String {
        if !self.worker_id.is_empty() {
            return self.worker_id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "worker".to_string());
        format!("{host}-{}", std::process::id())
    }
}

fn range<T: PartialOrd + fmt::Display>(
    option: &str,
    v: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::invalid(
            option,
            &v,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(())
}

fn duration_range(
    option: &str,
    v: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::invalid(
            option,
            humantime::format_duration(v),
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

fn url(option: &str, v: &str) -> Result<(), ConfigError> {
    let ok = (v.starts_with("http://") || v.starts_with("https://"))
        && v.split("://").nth(1).is_some_and(|rest| !rest.is_empty())
        && !v.chars().any(char::is_whitespace);
    if !ok {
        return Err(ConfigError::invalid(
            option,
            v,
            "must be an http:// or https:// URL",
        ));
    }
    Ok(())
}

/// Command-line flags of `esper worker run engine`; they win over everything else.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct Args {
    /// Unique id of this worker [default: HOSTNAME-PID]
    #[arg(long, value_name = "ID")]
    pub worker_id: Option<String>,
    /// Parallel claim-evaluate-publish loops [default: 4]
    #[arg(long, value_name = "N")]
    pub concurrency: Option<u32>,
    /// Threads of the async runtime; 0 means one per core (`ESPER_IO_THREADS`).
    #[arg(long, value_name = "N")]
    pub io_threads: Option<u32>,
    /// Idle connections kept to each broker and to the control plane
    /// (`ESPER_CONNECTION_POOL_SIZE`).
    #[arg(long, value_name = "N")]
    pub connection_pool_size: Option<u32>,
    /// Events per batch [default: 100]
    #[arg(long, value_name = "N")]
    pub batch_size: Option<u32>,
    /// How long claimed events stay leased (bare number = seconds) [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub lease: Option<Duration>,
    /// Where windows and dedup state live: memory, redis or postgres [default: memory]
    #[arg(long, value_name = "BACKEND")]
    pub state_backend: Option<StateBackendKind>,
    /// How long processed event ids are remembered (bare number = seconds) [default: 3600]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub state_ttl: Option<Duration>,
    /// How often idle state is removed (bare number = seconds) [default: 300]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub state_cleanup_interval: Option<Duration>,
    /// Most tracked entities and remembered event ids [default: 1000000]
    #[arg(long, value_name = "N")]
    pub state_cache_size: Option<usize>,
    /// Stop claiming while resident memory is above this (4G, 512M, bytes)
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<super::memory::ByteSize>,
    /// Redis of the redis state backend [default: redis://127.0.0.1:6379]
    #[arg(long, value_name = "URL")]
    pub state_redis_url: Option<String>,
    /// Database of the postgres state backend (postgres://USER:PASSWORD@HOST/DB)
    #[arg(long, value_name = "URL")]
    pub state_database_url: Option<String>,
    /// Longest one batch's evaluation may take (bare number = ms) [default: 100ms]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub evaluation_timeout: Option<Duration>,
    /// Read policies from this TOML file instead of the control plane
    #[arg(long = "policies", value_name = "FILE")]
    pub policies: Option<PathBuf>,
    /// Ingestion broker URL [default: http://127.0.0.1:8082]
    #[arg(long, value_name = "URL")]
    pub ingestion_url: Option<String>,
    /// Mitigation broker URL [default: http://127.0.0.1:8083]
    #[arg(long, value_name = "URL")]
    pub mitigation_url: Option<String>,
    /// Control plane URL; empty for none [default: http://127.0.0.1:8080]
    #[arg(long, value_name = "URL")]
    pub control_url: Option<String>,
    /// Also trust this PEM CA certificate for an https:// control plane
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Address of /healthz, /readyz and /metrics [default: 0.0.0.0:9091]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

impl Args {
    /// Applies the given flags over `cfg`.
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(v) = &self.worker_id {
            cfg.worker_id = v.clone();
        }
        if let Some(v) = self.concurrency {
            cfg.concurrency = v;
        }
        if let Some(v) = self.io_threads {
            cfg.io_threads = v;
        }
        if let Some(v) = self.connection_pool_size {
            cfg.connection_pool_size = v;
        }
        if let Some(v) = self.batch_size {
            cfg.batch_size = v;
        }
        if let Some(v) = self.lease {
            cfg.lease = v;
        }
        if let Some(v) = self.state_backend {
            cfg.state_backend = v;
        }
        if let Some(v) = self.state_ttl {
            cfg.state_ttl = v;
        }
        if let Some(v) = self.state_cleanup_interval {
            cfg.state_cleanup_interval = v;
        }
        if let Some(v) = self.memory_limit {
            cfg.memory_limit = Some(v);
        }
        if let Some(v) = self.state_cache_size {
            cfg.state_cache_size = v;
        }
        if let Some(v) = &self.state_redis_url {
            cfg.state_redis_url = v.clone();
        }
        if let Some(v) = &self.state_database_url {
            cfg.state_database_url = v.clone();
        }
        if let Some(v) = self.evaluation_timeout {
            cfg.evaluation_timeout = v;
        }
        if let Some(v) = &self.policies {
            cfg.policies_file = Some(v.clone());
        }
        if let Some(v) = &self.ingestion_url {
            cfg.ingestion_url = v.clone();
        }
        if let Some(v) = &self.mitigation_url {
            cfg.mitigation_url = v.clone();
        }
        if let Some(v) = &self.ca_cert {
            cfg.ca_cert = Some(v.clone());
        }
        if let Some(v) = &self.control_url {
            cfg.control_url = v.clone();
        }
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser;
    use esper_common::config::load;

    use super::*;

    #[test]
    fn the_template_is_the_defaults() {
        let parsed: Config = toml::from_str(Config::template()).unwrap();
        assert_eq!(parsed, Config::default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn flags_beat_env_beat_defaults() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let env: HashMap<String, String> = [
            ("ESPER_CONCURRENCY", "8"),
            ("ESPER_IO_THREADS", "2"),
            ("ESPER_CONNECTION_POOL_SIZE", "64"),
            ("ESPER_BATCH_SIZE", "50"),
            ("ESPER_STATE_TTL", "600"),
            ("ESPER_EVALUATION_TIMEOUT", "250"),
            ("ESPER_TOKEN", "ctl"),
            ("ESPER_WORKER_ID", "env-worker"),
            ("REDIS_URL", "redis://shared:6379"),
            ("ESPER_STATE_BACKEND", "redis"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut cfg: Config = load(None, &env, Config::apply_env).unwrap();
        assert_eq!(cfg.concurrency, 8);
        assert_eq!((cfg.io_threads, cfg.connection_pool_size), (2, 64));
        assert_eq!(cfg.state_ttl, Duration::from_secs(600));
        assert_eq!(cfg.evaluation_timeout, Duration::from_millis(250));
        assert_eq!(cfg.control_token.as_deref(), Some("ctl"));
        let cli = Cli::try_parse_from([
            "x",
            "--worker-id",
            "worker-3",
            "--concurrency",
            "16",
            "--io-threads",
            "16",
            "--connection-pool-size",
            "100",
            "--state-ttl",
            "2h",
            "--state-backend",
            "memory",
            "--policies",
            "p.toml",
        ])
        .unwrap();
        assert_eq!(cfg.state_redis_url, "redis://shared:6379");
        assert_eq!(cfg.state_backend, StateBackendKind::Redis);
        cli.args.apply(&mut cfg);
        assert_eq!(cfg.worker_id, "worker-3");
        assert_eq!(cfg.state_backend, StateBackendKind::Memory);
        assert_eq!(cfg.concurrency, 16);
        assert_eq!((cfg.io_threads, cfg.connection_pool_size), (16, 100));
        assert_eq!(cfg.batch_size, 50);
        assert_eq!(cfg.state_ttl, Duration::from_secs(7200));
        assert_eq!(cfg.policies_file, Some(PathBuf::from("p.toml")));
        cfg.validate().unwrap();
        assert_eq!(cfg.effective_worker_id(), "worker-3");
    }

    #[test]
    fn service_urls_may_list_instances() {
        let mut cfg = Config {
            mitigation_url: "http://mb1:8083, http://mb2:8083".into(),
            control_url: "http://cp1:8080, http://cp2:8080".into(),
            ..Config::default()
        };
        cfg.validate().unwrap();
        cfg.mitigation_url = "http://mb1:8083,mb2:8083".into();
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "invalid mitigation_url = `mb2:8083`: must be an http:// or https:// URL"
        );
        cfg.mitigation_url = DEFAULT_MITIGATION_URL.into();
        cfg.control_url = "http://cp1:8080,cp2".into();
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "invalid control_url = `cp2`: must be an http:// or https:// URL"
        );
    }

    #[test]
    fn invalid_values_name_the_option() {
        let mut cfg = Config {
            state_backend: StateBackendKind::Redis,
            state_redis_url: "localhost:6379".into(),
            ..Config::default()
        };
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "invalid state_redis_url = `localhost:6379`: the redis state backend needs a redis:// or rediss:// URL"
        );
        cfg.state_redis_url = DEFAULT_STATE_REDIS_URL.into();
        cfg.validate().unwrap();
        cfg.state_backend = StateBackendKind::Postgres;
        cfg.state_database_url = "sqlite://./esper.db".into();
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "invalid state_database_url = `sqlite://./esper.db`: the postgres state backend needs a postgres:// or postgresql:// URL"
        );
        cfg.state_database_url = "postgres://esper@db/esper".into();
        cfg.validate().unwrap();
        cfg.state_database_pool = 0;
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("state_database_pool")
        );
        cfg.state_database_pool = DEFAULT_STATE_DATABASE_POOL;
        cfg.state_backend = StateBackendKind::Redis;
        cfg.state_key_prefix = "a b".into();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("state_key_prefix")
        );
        cfg.state_key_prefix = DEFAULT_STATE_KEY_PREFIX.into();
        cfg.state_backend = StateBackendKind::Memory;
        cfg.concurrency = 0;
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("concurrency")
        );
        cfg.concurrency = 1;
        for (io_threads, pool, bad) in [(2000, 32, "io_threads"), (0, 0, "connection_pool_size")] {
            cfg.io_threads = io_threads;
            cfg.connection_pool_size = pool;
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        cfg.io_threads = 0;
        cfg.connection_pool_size = DEFAULT_CONNECTION_POOL_SIZE;
        cfg.control_url = String::new();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("policies_file")
        );
        cfg.policies_file = Some("p.toml".into());
        cfg.validate().unwrap();
        cfg.ingestion_url = "localhost:8082".into();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("ingestion_url")
        );
        let env: HashMap<String, String> =
            [("ESPER_STATE_BACKEND".to_string(), "disk".to_string())].into();
        let err = load::<Config, _>(None, &env, Config::apply_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid ESPER_STATE_BACKEND = `disk`: `disk` is not a state backend (memory, redis or postgres)"
        );
    }
}
