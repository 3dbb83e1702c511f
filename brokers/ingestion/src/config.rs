//! The ingestion broker's configuration: defaults, environment names, flags, validation
//! and the commented template that `config` subcommands print.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use esper_common::config::{
    ConfigError, Vars, check_broker_tokens, parse_duration_ms, parse_duration_secs,
};
use serde::{Deserialize, Serialize};

/// Default listener: API, health and metrics on one port.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8082);
/// Default queue bound (waiting and leased items together).
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 1_000_000;
/// Default time a partly filled claim lingers for more items.
pub const DEFAULT_BATCH_TIMEOUT: Duration = Duration::from_millis(100);
/// Default cap on a claim's long-poll.
pub const DEFAULT_MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);
/// Default cap on the lease a claim may ask for.
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(3600);
/// Default request body limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Default claims an item may have before it goes to the dead-letter list.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default key prefix in Redis.
pub const DEFAULT_REDIS_PREFIX: &str = "esper";
/// Default drain time for in-flight requests once shutdown begins.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

const MAX_BATCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CLAIM_WAIT_CAP: Duration = Duration::from_secs(300);
const MIN_LEASE_CAP: Duration = Duration::from_secs(1);
const MAX_LEASE_CAP: Duration = Duration::from_secs(24 * 3600);
const MIN_BODY_BYTES: usize = 1024;
const MAX_BODY_BYTES: usize = 1024 * 1024 * 1024;
const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3600);
const MAX_MAX_ATTEMPTS: u32 = 1000;

/// The ingestion broker's settings (the TOML form; see [`Config::template`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the API, `/healthz`, `/readyz`, `/healthz/detailed` and `/metrics` listen on.
    pub listen: SocketAddr,
    /// Items the queue holds, waiting and leased together; a batch that does not fit is
    /// refused whole with 503 `queue_full`.
    pub max_queue_size: usize,
    /// How long a claim that found some items, but fewer than it asked for, waits for more
    /// before answering (never beyond the claim's own `wait_ms`; 0 answers at once).
    #[serde(with = "humantime_serde")]
    pub batch_timeout: Duration,
    /// The longest a claim long-polls an empty queue; a larger `wait_ms` is capped to it.
    #[serde(with = "humantime_serde")]
    pub max_claim_wait: Duration,
    /// The longest lease a claim may ask for; longer requests get 400.
    #[serde(with = "humantime_serde")]
    pub max_lease: Duration,
    /// Claims an item may have: an item whose lease expires after its last allowed claim
    /// goes to the dead-letter list instead of back to the queue.
    pub max_attempts: u32,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long in-flight requests may run once shutdown begins.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Bearer token every `/api/*` route requires when set; health and metrics stay open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A token accepted besides `token` while clients move to it from this one (a
    /// rotation without refusals); a reload applies both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_token: Option<String>,
    /// Key prefix in Redis (`{prefix}:ingest:*`); instances with the same Redis and
    /// prefix share one queue.
    pub redis_prefix: String,
    /// Redis URL for a queue on Redis Streams shared by every instance; unset keeps the
    /// queue in memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Instances are meant to share one Redis: starting without `redis_url` is an error.
    pub cluster_mode: bool,
    /// This instance's name in logs and health details (default: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN,
            max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
            batch_timeout: DEFAULT_BATCH_TIMEOUT,
            max_claim_wait: DEFAULT_MAX_CLAIM_WAIT,
            max_lease: DEFAULT_MAX_LEASE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            token: None,
            previous_token: None,
            redis_prefix: DEFAULT_REDIS_PREFIX.to_string(),
            redis_url: None,
            cluster_mode: false,
            node_id: None,
        }
    }
}

impl Config {
    /// Reads the environment names (seed names first, so the `ESPER_*` names win).
    pub fn apply_env(&mut self, vars: &Vars<'_>) -> Result<(), ConfigError> {
        let mut port = self.listen.port();
        vars.parse(&["BROKER_PORT"], &mut port)?;
        self.listen.set_port(port);
        vars.parse(&["ESPER_INGESTION_LISTEN"], &mut self.listen)?;
        vars.parse(
            &["ESPER_INGESTION_MAX_QUEUE_SIZE", "MAX_QUEUE_SIZE"],
            &mut self.max_queue_size,
        )?;
        let ms = Duration::from_millis(1);
        let secs = Duration::from_secs(1);
        vars.duration(&["BATCH_TIMEOUT_MS"], ms, &mut self.batch_timeout)?;
        vars.duration(
            &["ESPER_INGESTION_BATCH_TIMEOUT"],
            secs,
            &mut self.batch_timeout,
        )?;
        vars.duration(
            &["ESPER_INGESTION_MAX_CLAIM_WAIT"],
            secs,
            &mut self.max_claim_wait,
        )?;
        vars.duration(&["ESPER_INGESTION_MAX_LEASE"], secs, &mut self.max_lease)?;
        vars.parse(&["ESPER_INGESTION_MAX_ATTEMPTS"], &mut self.max_attempts)?;
        vars.parse(&["ESPER_MAX_BODY_BYTES"], &mut self.max_body_bytes)?;
        vars.duration(
            &["ESPER_SHUTDOWN_TIMEOUT"],
            secs,
            &mut self.shutdown_timeout,
        )?;
        vars.secret(&["ESPER_BROKER_TOKEN", "ADMIN_TOKEN"], &mut self.token)?;
        vars.secret(&["ESPER_BROKER_PREVIOUS_TOKEN"], &mut self.previous_token)?;
        vars.string_opt(
            &["ESPER_INGESTION_REDIS_URL", "REDIS_URL"],
            &mut self.redis_url,
        );
        vars.string(&["ESPER_REDIS_PREFIX"], &mut self.redis_prefix);
        vars.bool(
            &["ESPER_CLUSTER_MODE", "CLUSTER_MODE"],
            &mut self.cluster_mode,
        )?;
        vars.string_opt(&["ESPER_NODE_ID", "NODE_ID"], &mut self.node_id);
        Ok(())
    }

    /// Checks every value once, before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        esper_common::config::check_instance(
            self.cluster_mode,
            self.redis_url.as_deref(),
            self.node_id.as_deref(),
        )?;
        if let Some(url) = &self.redis_url {
            check_redis_url(url)?;
        }
        check_redis_prefix(&self.redis_prefix)?;
        if self.max_attempts == 0 || self.max_attempts > MAX_MAX_ATTEMPTS {
            return Err(ConfigError::invalid(
                "max_attempts",
                self.max_attempts,
                format!("must be between 1 and {MAX_MAX_ATTEMPTS}"),
            ));
        }
        if self.max_queue_size == 0 {
            return Err(ConfigError::invalid(
                "max_queue_size",
                self.max_queue_size,
                "must be at least 1",
            ));
        }
        check_at_most("batch_timeout", self.batch_timeout, MAX_BATCH_TIMEOUT)?;
        check_at_most("max_claim_wait", self.max_claim_wait, MAX_CLAIM_WAIT_CAP)?;
        if self.max_lease < MIN_LEASE_CAP || self.max_lease > MAX_LEASE_CAP {
            return Err(ConfigError::invalid(
                "max_lease",
                humantime::format_duration(self.max_lease),
                "must be between 1s and 24h",
            ));
        }
        if !(MIN_BODY_BYTES..=MAX_BODY_BYTES).contains(&self.max_body_bytes) {
            return Err(ConfigError::invalid(
                "max_body_bytes",
                self.max_body_bytes,
                format!("must be between {MIN_BODY_BYTES} and {MAX_BODY_BYTES}"),
            ));
        }
        check_at_most(
            "shutdown_timeout",
            self.shutdown_timeout,
            MAX_SHUTDOWN_TIMEOUT,
        )?;
        check_broker_tokens(self.token.as_deref(), self.previous_token.as_deref())?;
        Ok(())
    }

    /// A complete, commented TOML configuration with every option at its default.
    pub fn template() -> &'static str {
        include_str!("template.toml")
    }
}

/// A `redis://` or `rediss://` URL; the message never shows the URL (it may hold a
/// password).
fn check_redis_url(url: &str) -> Result<(), ConfigError> {
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    if !scheme_ok || redis::Client::open(url).is_err() {
        return Err(ConfigError::invalid(
            "redis_url",
            "(hidden)",
            "must be a redis:// or rediss:// URL such as redis://localhost:6379/0",
        ));
    }
    Ok(())
}

fn check_redis_prefix(prefix: &str) -> Result<(), ConfigError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if !ok {
        return Err(ConfigError::invalid(
            "redis_prefix",
            prefix,
            "must be 1 to 64 characters of letters, digits, `-`, `_`, `.` or `:`",
        ));
    }
    Ok(())
}

fn check_at_most(option: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::invalid(
            option,
            humantime::format_duration(value),
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(())
}

/// Command-line flags of `esper broker run ingestion`; they win over everything else.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct Args {
    /// Address for the API, health and metrics [default: 0.0.0.0:8082]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Port to listen on, keeping the configured address
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Items the queue holds (waiting + leased) before ingest answers 503 [default: 1000000]
    #[arg(long, value_name = "N")]
    pub max_queue_size: Option<usize>,
    /// How long a partly filled claim waits for more items (bare number = ms) [default: 100ms]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub batch_timeout: Option<Duration>,
    /// Cap on a claim's long-poll (bare number = seconds) [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub max_claim_wait: Option<Duration>,
    /// Longest lease a claim may ask for (bare number = seconds) [default: 1h]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub max_lease: Option<Duration>,
    /// Claims an item may have before it goes to the dead-letter list [default: 5]
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Largest request body accepted, in bytes [default: 8388608]
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Drain time for in-flight requests on shutdown (bare number = seconds) [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub shutdown_timeout: Option<Duration>,
    /// Redis URL: keep the queue in Redis Streams, shared by every instance [default: memory]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Key prefix in Redis [default: esper]
    #[arg(long, value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
}

impl Args {
    /// Applies the flags that were given.
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if let Some(p) = self.port {
            cfg.listen.set_port(p);
        }
        if let Some(v) = self.max_queue_size {
            cfg.max_queue_size = v;
        }
        if let Some(v) = self.batch_timeout {
            cfg.batch_timeout = v;
        }
        if let Some(v) = self.max_claim_wait {
            cfg.max_claim_wait = v;
        }
        if let Some(v) = self.max_lease {
            cfg.max_lease = v;
        }
        if let Some(v) = self.max_attempts {
            cfg.max_attempts = v;
        }
        if let Some(v) = &self.redis_url {
            cfg.redis_url = Some(v.clone());
        }
        if let Some(v) = &self.redis_prefix {
            cfg.redis_prefix = v.clone();
        }
        if let Some(v) = self.max_body_bytes {
            cfg.max_body_bytes = v;
        }
        if let Some(v) = self.shutdown_timeout {
            cfg.shutdown_timeout = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use esper_common::config::load;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn template_parses_to_the_defaults() {
        let parsed: Config = toml::from_str(Config::template()).unwrap();
        assert_eq!(parsed, Config::default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn seed_and_esper_names_are_read() {
        let vars = env(&[
            ("BROKER_PORT", "9182"),
            ("MAX_QUEUE_SIZE", "500"),
            ("BATCH_TIMEOUT_MS", "250"),
            ("ADMIN_TOKEN", "admin"),
            ("ESPER_BROKER_TOKEN", "broker"),
            ("ESPER_INGESTION_MAX_CLAIM_WAIT", "5"),
            ("ESPER_MAX_BODY_BYTES", "4096"),
        ]);
        let c: Config = load(None, &vars, Config::apply_env).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9182".parse().unwrap());
        assert_eq!(c.max_queue_size, 500);
        assert_eq!(c.batch_timeout, Duration::from_millis(250));
        assert_eq!(c.max_claim_wait, Duration::from_secs(5));
        assert_eq!(c.max_body_bytes, 4096);
        assert_eq!(c.token.as_deref(), Some("broker"));

        let vars = env(&[
            ("BROKER_PORT", "9182"),
            ("ESPER_INGESTION_LISTEN", "127.0.0.1:7000"),
            ("BATCH_TIMEOUT_MS", "250"),
            ("ESPER_INGESTION_BATCH_TIMEOUT", "20ms"),
        ]);
        let c: Config = load(None, &vars, Config::apply_env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.batch_timeout, Duration::from_millis(20));
    }

    #[test]
    fn cluster_mode_needs_redis_and_node_id_names_the_instance() {
        let vars = env(&[("CLUSTER_MODE", "true"), ("NODE_ID", "broker-1")]);
        let c: Config = load(None, &vars, Config::apply_env).unwrap();
        assert!(c.cluster_mode);
        assert_eq!(c.node_id.as_deref(), Some("broker-1"));
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("cluster_mode") && err.contains("redis_url"),
            "{err}"
        );
        let with_redis = Config {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            ..c
        };
        with_redis.validate().unwrap();
        for bad in ["", "broker 1", "a/b", &"x".repeat(65)] {
            let c = Config {
                node_id: Some(bad.to_string()),
                ..Config::default()
            };
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("node_id"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn flags_win() {
        let mut c = Config::default();
        Args {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            port: Some(2),
            max_queue_size: Some(3),
            batch_timeout: Some(Duration::ZERO),
            ..Args::default()
        }
        .apply(&mut c);
        assert_eq!(c.listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(c.max_queue_size, 3);
        assert_eq!(c.batch_timeout, Duration::ZERO);
    }

    #[test]
    fn redis_settings_are_read_and_checked_without_showing_the_url() {
        let vars = env(&[
            ("REDIS_URL", "redis://:secret@localhost:6379"),
            ("ESPER_REDIS_PREFIX", "tenant-a"),
            ("ESPER_INGESTION_MAX_ATTEMPTS", "3"),
        ]);
        let c: Config = load(None, &vars, Config::apply_env).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.redis_url.as_deref(),
            Some("redis://:secret@localhost:6379")
        );
        assert_eq!((c.redis_prefix.as_str(), c.max_attempts), ("tenant-a", 3));

        let vars = env(&[("REDIS_URL", "http://:secret@localhost:6379")]);
        let c: Config = load(None, &vars, Config::apply_env).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid redis_url = `(hidden)`"), "{err}");
        assert!(!err.contains("secret"));
        for bad in [
            Config {
                redis_prefix: "a b".into(),
                ..Config::default()
            },
            Config {
                max_attempts: 0,
                ..Config::default()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }

    #[test]
    fn bad_values_name_option_and_value() {
        let err = load::<Config, _>(None, &env(&[("MAX_QUEUE_SIZE", "lots")]), Config::apply_env)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid MAX_QUEUE_SIZE = `lots`"), "{err}");
        let c = Config {
            max_queue_size: 0,
            ..Config::default()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid max_queue_size = `0`: must be at least 1"
        );
        let c = Config {
            max_claim_wait: Duration::from_secs(3600),
            ..Config::default()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid max_claim_wait = `1h`: must be at most 5m"
        );
        let c = Config {
            token: Some("two words".into()),
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
