//! The mitigation broker's configuration: defaults, environment names, flags, validation
//! and the commented template that `config` subcommands print.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use esper_common::config::{
    ConfigError, Vars, check_broker_tokens, check_token, parse_duration_ms, parse_duration_secs,
};
use serde::{Deserialize, Serialize};

/// Default listener: API, health and metrics on one port.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8083);
/// Default cap on how long the broker keeps a policy decision (`CACHE_TTL_SECONDS`).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(900);
/// Default number of changes the delta stream keeps for followers.
pub const DEFAULT_STREAM_RETENTION: usize = 100_000;
/// Default most changes in one delta page.
pub const DEFAULT_STREAM_PAGE_SIZE: usize = 10_000;
/// Default cap on a stream long-poll.
pub const DEFAULT_MAX_STREAM_WAIT: Duration = Duration::from_secs(60);
/// Default interval of the expiry sweeper.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Default request body limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Default key prefix in Redis.
pub const DEFAULT_REDIS_PREFIX: &str = "esper";
/// Default drain time for in-flight requests once shutdown begins.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default control plane, whose decision log keeps the durable copy.
pub const DEFAULT_CONTROL_URL: &str = "http://127.0.0.1:8080";
/// Default most decisions and revocations waiting for the control plane.
pub const DEFAULT_PERSISTENCE_OUTBOX: usize = 100_000;

const MAX_STREAM_RETENTION: usize = 10_000_000;
const MAX_STREAM_PAGE_SIZE: usize = 100_000;
const MAX_STREAM_WAIT_CAP: Duration = Duration::from_secs(300);
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
const MIN_BODY_BYTES: usize = 1024;
const MAX_BODY_BYTES: usize = 1024 * 1024 * 1024;
const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3600);
const MAX_PERSISTENCE_OUTBOX: usize = 10_000_000;

/// What a broker with persistence does when its outbox to the decision log is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse the publish (or revoke) with 503 and `Retry-After`, so nothing is lost:
    /// the publisher retries once the control plane has caught up.
    #[default]
    Reject,
    /// Accept it and drop the oldest waiting entries from the durable copy: enforcement
    /// goes on, the log misses what was dropped.
    DropOldest,
}

impl std::str::FromStr for WhenFull {
    type Err = String;

    fn from_str(s: &str) -> Result<WhenFull, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "reject" => Ok(WhenFull::Reject),
            "drop_oldest" => Ok(WhenFull::DropOldest),
            _ => Err("expected reject or drop_oldest".into()),
        }
    }
}

/// The mitigation broker's settings (the TOML form; see [`Config::template`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the API, `/healthz`, `/readyz`, `/healthz/detailed` and `/metrics` listen on.
    pub listen: SocketAddr,
    /// The longest the broker keeps a mitigation decided by a policy: a later
    /// `expires_at` is brought forward to its `created_at` + this. Manual and list
    /// mitigations keep their own expiry. 0 turns the cap off.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Changes the delta stream keeps; a follower whose cursor is older gets a snapshot.
    pub stream_retention: usize,
    /// Most changes in one delta page (the follower asks again at once for more), and
    /// most mitigations in one page of a snapshot.
    pub stream_page_size: usize,
    /// The longest a stream request long-polls; a larger `wait_ms` is capped to it.
    #[serde(with = "humantime_serde")]
    pub max_stream_wait: Duration,
    /// How often expired mitigations are dropped.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long in-flight requests may run once shutdown begins.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Keep a durable copy of every publish, revoke and clear in the control plane's
    /// decision log (through a bounded outbox with retry), and restore the mitigations
    /// still in force from it when the broker starts on an empty store.
    pub persistence_enabled: bool,
    /// The control plane whose decision log keeps the durable copy.
    pub control_url: String,
    /// Bearer token for the control plane's API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_token: Option<String>,
    /// Most decisions and revocations waiting for the control plane.
    pub persistence_outbox: usize,
    /// What happens when that outbox is full: `reject` or `drop_oldest`.
    pub persistence_when_full: WhenFull,
    /// Bearer token every `/api/*` route requires when set; health and metrics stay open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A token accepted besides `token` while clients move to it from this one (a
    /// rotation without refusals); a reload applies both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_token: Option<String>,
    /// Key prefix in Redis (`{prefix}:mit:*`); instances with the same Redis and prefix
    /// share one store and one delta stream.
    pub redis_prefix: String,
    /// Redis URL for a store shared by every instance; unset keeps mitigations in memory.
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
            cache_ttl: DEFAULT_CACHE_TTL,
            stream_retention: DEFAULT_STREAM_RETENTION,
            stream_page_size: DEFAULT_STREAM_PAGE_SIZE,
            max_stream_wait: DEFAULT_MAX_STREAM_WAIT,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            persistence_enabled: false,
            control_url: DEFAULT_CONTROL_URL.to_string(),
            control_token: None,
            persistence_outbox: DEFAULT_PERSISTENCE_OUTBOX,
            persistence_when_full: WhenFull::default(),
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
        vars.parse(&["ESPER_MITIGATION_LISTEN"], &mut self.listen)?;
        let secs = Duration::from_secs(1);
        vars.duration(
            &["ESPER_MITIGATION_CACHE_TTL", "CACHE_TTL_SECONDS"],
            secs,
            &mut self.cache_ttl,
        )?;
        vars.parse(&["ESPER_STREAM_RETENTION"], &mut self.stream_retention)?;
        vars.parse(&["ESPER_STREAM_PAGE_SIZE"], &mut self.stream_page_size)?;
        vars.duration(
            &["ESPER_MITIGATION_MAX_STREAM_WAIT"],
            secs,
            &mut self.max_stream_wait,
        )?;
        vars.duration(
            &["ESPER_MITIGATION_SWEEP_INTERVAL"],
            Duration::from_millis(1),
            &mut self.sweep_interval,
        )?;
        vars.parse(&["ESPER_MAX_BODY_BYTES"], &mut self.max_body_bytes)?;
        vars.duration(
            &["ESPER_SHUTDOWN_TIMEOUT"],
            secs,
            &mut self.shutdown_timeout,
        )?;
        vars.bool(
            &["ESPER_MITIGATION_PERSISTENCE", "PERSISTENCE_ENABLED"],
            &mut self.persistence_enabled,
        )?;
        vars.string(&["ESPER_CONTROL_URL"], &mut self.control_url);
        vars.secret(
            &["ESPER_CONTROL_TOKEN", "ESPER_TOKEN"],
            &mut self.control_token,
        )?;
        vars.parse(&["ESPER_PERSISTENCE_OUTBOX"], &mut self.persistence_outbox)?;
        vars.parse(
            &["ESPER_PERSISTENCE_WHEN_FULL"],
            &mut self.persistence_when_full,
        )?;
        vars.secret(&["ESPER_BROKER_TOKEN", "ADMIN_TOKEN"], &mut self.token)?;
        vars.secret(&["ESPER_BROKER_PREVIOUS_TOKEN"], &mut self.previous_token)?;
        vars.string_opt(
            &["ESPER_MITIGATION_REDIS_URL", "REDIS_URL"],
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
        check_token("control_token", self.control_token.as_deref())?;
        esper_common::config::check_instance(
            self.cluster_mode,
            self.redis_url.as_deref(),
            self.node_id.as_deref(),
        )?;
        if let Some(url) = &self.redis_url {
            check_redis_url(url)?;
        }
        check_redis_prefix(&self.redis_prefix)?;
        check_control_url(&self.control_url)?;
        check_range(
            "persistence_outbox",
            self.persistence_outbox,
            1,
            MAX_PERSISTENCE_OUTBOX,
        )?;
        check_range(
            "stream_retention",
            self.stream_retention,
            1,
            MAX_STREAM_RETENTION,
        )?;
        check_range(
            "stream_page_size",
            self.stream_page_size,
            1,
            MAX_STREAM_PAGE_SIZE,
        )?;
        check_range(
            "max_body_bytes",
            self.max_body_bytes,
            MIN_BODY_BYTES,
            MAX_BODY_BYTES,
        )?;
        check_duration(
            "max_stream_wait",
            self.max_stream_wait,
            Duration::ZERO,
            MAX_STREAM_WAIT_CAP,
        )?;
        check_duration(
            "sweep_interval",
            self.sweep_interval,
            MIN_SWEEP_INTERVAL,
            MAX_SWEEP_INTERVAL,
        )?;
        check_duration(
            "shutdown_timeout",
            self.shutdown_timeout,
            Duration::ZERO,
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

fn check_control_url(url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    if !rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')) {
        // A URL with user info may hold a password: keep it out of the message.
        let shown = if url.contains('@') { "(hidden)" } else { url };
        return Err(ConfigError::invalid(
            "control_url",
            shown,
            "expected an http:// or https:// URL such as http://127.0.0.1:8080",
        ));
    }
    Ok(())
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

fn check_range(option: &str, value: usize, min: usize, max: usize) -> Result<(), ConfigError> {
    if !(min..=max).contains(&value) {
        return Err(ConfigError::invalid(
            option,
            value,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(())
}

fn check_duration(
    option: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::invalid(
            option,
            humantime::format_duration(value),
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

/// Command-line flags of `esper broker run mitigation`; they win over everything else.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct Args {
    /// Address for the API, health and metrics [default: 0.0.0.0:8083]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Port to listen on, keeping the configured address
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Longest a policy decision is kept, 0 = no cap (bare number = seconds) [default: 15m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub cache_ttl: Option<Duration>,
    /// Changes kept for the delta stream [default: 100000]
    #[arg(long, value_name = "N")]
    pub stream_retention: Option<usize>,
    /// Most changes in one delta page [default: 10000]
    #[arg(long, value_name = "N")]
    pub stream_page_size: Option<usize>,
    /// Cap on a stream long-poll (bare number = seconds) [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub max_stream_wait: Option<Duration>,
    /// How often expired mitigations are dropped (bare number = ms) [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub sweep_interval: Option<Duration>,
    /// Largest request body accepted, in bytes [default: 8388608]
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Drain time for in-flight requests on shutdown (bare number = seconds) [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub shutdown_timeout: Option<Duration>,
    /// Redis URL: keep mitigations in Redis, shared by every instance [default: memory]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Key prefix in Redis [default: esper]
    #[arg(long, value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
    /// Keep a durable copy in the control plane's decision log, and restore from it
    #[arg(long)]
    pub persistence: bool,
    /// Control plane whose decision log keeps the durable copy [default: http://127.0.0.1:8080]
    #[arg(long, value_name = "URL")]
    pub control_url: Option<String>,
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
        if let Some(v) = self.cache_ttl {
            cfg.cache_ttl = v;
        }
        if let Some(v) = self.stream_retention {
            cfg.stream_retention = v;
        }
        if let Some(v) = self.stream_page_size {
            cfg.stream_page_size = v;
        }
        if let Some(v) = self.max_stream_wait {
            cfg.max_stream_wait = v;
        }
        if let Some(v) = self.sweep_interval {
            cfg.sweep_interval = v;
        }
        if let Some(v) = self.max_body_bytes {
            cfg.max_body_bytes = v;
        }
        if let Some(v) = self.shutdown_timeout {
            cfg.shutdown_timeout = v;
        }
        if let Some(v) = &self.redis_url {
            cfg.redis_url = Some(v.clone());
        }
        if let Some(v) = &self.redis_prefix {
            cfg.redis_prefix = v.clone();
        }
        if self.persistence {
            cfg.persistence_enabled = true;
        }
        if let Some(v) = &self.control_url {
            cfg.control_url = v.clone();
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
            ("BROKER_PORT", "9183"),
            ("CACHE_TTL_SECONDS", "60"),
            ("PERSISTENCE_ENABLED", "false"),
            ("ESPER_STREAM_RETENTION", "500"),
            ("ADMIN_TOKEN", "admin"),
        ]);
        let c: Config = load(None, &vars, Config::apply_env).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9183".parse().unwrap());
        assert_eq!(c.cache_ttl, Duration::from_secs(60));
        assert_eq!(c.stream_retention, 500);
        assert_eq!(c.token.as_deref(), Some("admin"));
        c.validate().unwrap();

        let vars = env(&[
            ("BROKER_PORT", "9183"),
            ("ESPER_MITIGATION_LISTEN", "127.0.0.1:7001"),
            ("CACHE_TTL_SECONDS", "60"),
            ("ESPER_MITIGATION_CACHE_TTL", "0"),
        ]);
        let c: Config = load(None, &vars, Config::apply_env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(c.cache_ttl, Duration::ZERO);
    }

    #[test]
    fn flags_win() {
        let mut c = Config::default();
        Args {
            port: Some(1),
            cache_ttl: Some(Duration::from_secs(5)),
            stream_retention: Some(7),
            ..Args::default()
        }
        .apply(&mut c);
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.cache_ttl, Duration::from_secs(5));
        assert_eq!(c.stream_retention, 7);
    }

    #[test]
    fn redis_and_persistence_settings_are_read_and_checked() {
        let c: Config = load(
            None,
            &env(&[
                ("REDIS_URL", "redis://:pw@localhost"),
                ("ESPER_REDIS_PREFIX", "tenant-b"),
            ]),
            Config::apply_env,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.redis_prefix, "tenant-b");
        let c: Config = load(
            None,
            &env(&[("REDIS_URL", "postgres://:pw@localhost")]),
            Config::apply_env,
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid redis_url = `(hidden)`"), "{err}");
        let c: Config = load(
            None,
            &env(&[
                ("PERSISTENCE_ENABLED", "true"),
                ("ESPER_CONTROL_URL", "http://10.0.0.5:8080"),
                ("ESPER_TOKEN", "ctl"),
                ("ESPER_PERSISTENCE_OUTBOX", "50"),
                ("ESPER_PERSISTENCE_WHEN_FULL", "drop-oldest"),
            ]),
            Config::apply_env,
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.persistence_enabled);
        assert_eq!(c.control_url, "http://10.0.0.5:8080");
        assert_eq!(c.control_token.as_deref(), Some("ctl"));
        assert_eq!(c.persistence_outbox, 50);
        assert_eq!(c.persistence_when_full, WhenFull::DropOldest);
        let err = load::<Config, _>(
            None,
            &env(&[("ESPER_PERSISTENCE_WHEN_FULL", "block")]),
            Config::apply_env,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid ESPER_PERSISTENCE_WHEN_FULL = `block`: expected reject or drop_oldest"
        );
        let c = Config {
            control_url: "127.0.0.1:8080".into(),
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("invalid control_url = `127.0.0.1:8080`")
        );
    }

    #[test]
    fn bad_values_name_option_and_value() {
        let err = load::<Config, _>(
            None,
            &env(&[("PERSISTENCE_ENABLED", "maybe")]),
            Config::apply_env,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid PERSISTENCE_ENABLED = `maybe`: expected true or false"
        );
        let c = Config {
            stream_retention: 0,
            ..Config::default()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid stream_retention = `0`: must be between 1 and 10000000"
        );
        let c = Config {
            sweep_interval: Duration::ZERO,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
