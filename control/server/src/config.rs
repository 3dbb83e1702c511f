//! The control plane's configuration: the TOML form with its defaults, the environment
//! names (`ESPER_*`, `DATABASE_URL`), the command-line flags, and one validation pass.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use esper_common::config::{ConfigError, Vars, check_token, parse_duration_secs};
use serde::{Deserialize, Serialize};

/// Default API listener.
pub const DEFAULT_LISTEN: SocketAddr = any_addr(8080);
/// Default health listener (`/healthz`, `/readyz`, `/healthz/detailed`).
pub const DEFAULT_HEALTH_LISTEN: SocketAddr = any_addr(8081);
/// Default metrics listener (`/metrics`).
pub const DEFAULT_METRICS_LISTEN: SocketAddr = any_addr(9090);
/// Default control store.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://./.esper/esper.db?mode=rwc";
/// Default pool size of the control store.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: u32 = 8;
/// Default ingestion broker.
pub const DEFAULT_INGESTION_URL: &str = "http://127.0.0.1:8082";
/// Default mitigation broker.
pub const DEFAULT_MITIGATION_URL: &str = "http://127.0.0.1:8083";
/// Default request body limit (1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// Default drain time for in-flight requests at shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// A worker or proxy counts as alive when heard from within this long.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);
/// Default time a decision is kept in the log after it expired.
pub const DEFAULT_DECISION_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

const fn any_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
}

/// The control-plane server's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// API listener (`ESPER_LISTEN`, `ESPER_PORT`, `--listen`, `--port`).
    pub listen: SocketAddr,
    /// Serve the API over TLS (`ESPER_TLS`, `--tls`) with `tls_cert` and `tls_key`.
    /// Health and metrics stay plain HTTP: they are for the local orchestrator.
    pub tls: bool,
    /// PEM certificate chain, leaf first (`ESPER_TLS_CERT`, `--tls-cert`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate (`ESPER_TLS_KEY`, `--tls-key`).
    pub tls_key: Option<PathBuf>,
    /// Health listener (`ESPER_HEALTH_LISTEN`, `ESPER_HEALTH_PORT`, `--health-listen`).
    pub health_listen: SocketAddr,
    /// Metrics listener (`ESPER_METRICS_LISTEN`, `ESPER_METRICS_PORT`, `--metrics-listen`).
    pub metrics_listen: SocketAddr,
    /// Control store URL (`ESPER_DATABASE_URL`, `DATABASE_URL`, `--database-url`):
    /// `sqlite:` (the directory of the file is created when missing) or
    /// `postgres://user:password@host:port/db` for several instances over one database.
    pub database_url: String,
    /// Connections in the control store's pool (`ESPER_DATABASE_MAX_CONNECTIONS`).
    pub database_max_connections: u32,
    /// Apply pending schema migrations at start (`ESPER_MIGRATE`; `--no-migrations` turns
    /// it off, then run `esper server migrate` yourself).
    pub migrate: bool,
    /// Ingestion broker base URL (`ESPER_INGESTION_URL`, `--ingestion-url`).
    pub ingestion_url: String,
    /// Mitigation broker base URL (`ESPER_MITIGATION_URL`, `--mitigation-url`).
    pub mitigation_url: String,
    /// Bearer token sent to both brokers (`ESPER_BROKER_TOKEN`).
    pub broker_token: Option<String>,
    /// A bearer token the API always accepts, besides the stored ones (`ESPER_ADMIN_TOKEN`).
    /// With none configured and none stored, one is generated at first start and printed
    /// once.
    pub admin_token: Option<String>,
    /// Largest request body in bytes (`ESPER_BODY_LIMIT`).
    pub body_limit: usize,
    /// How long in-flight requests may run after shutdown begins
    /// (`ESPER_SHUTDOWN_TIMEOUT`, `--shutdown-timeout`).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A worker or proxy is alive when heard from within this long
    /// (`ESPER_HEARTBEAT_TIMEOUT`).
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// How long a decision stays in the log after it expired, for `decisions list` and
    /// an entity's history; pruned hourly. 0 keeps every decision
    /// (`ESPER_DECISION_RETENTION`).
    #[serde(with = "humantime_serde")]
    pub decision_retention: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: DEFAULT_LISTEN,
            tls: false,
            tls_cert: None,
            tls_key: None,
            health_listen: DEFAULT_HEALTH_LISTEN,
            metrics_listen: DEFAULT_METRICS_LISTEN,
            database_url: DEFAULT_DATABASE_URL.to_string(),
            database_max_connections: DEFAULT_DATABASE_MAX_CONNECTIONS,
            migrate: true,
            ingestion_url: DEFAULT_INGESTION_URL.to_string(),
            mitigation_url: DEFAULT_MITIGATION_URL.to_string(),
            broker_token: None,
            admin_token: None,
            body_limit: DEFAULT_BODY_LIMIT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            decision_retention: DEFAULT_DECISION_RETENTION,
        }
    }
}

/// `HOST:PORT`, or a bare `HOST` that keeps the current port.
fn listen_value(name: &str, value: &str, current: SocketAddr) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = value.parse::<SocketAddr>() {
        return Ok(a);
    }
    value
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, current.port()))
        .map_err(|_| ConfigError::invalid(name, value, "expected HOST:PORT, e.g. 0.0.0.0:8080"))
}

fn apply_listen(
    vars: &Vars<'_>,
    listen_names: &[&str],
    port_names: &[&str],
    target: &mut SocketAddr,
) -> Result<(), ConfigError> {
    if let Some((name, value)) = vars.lookup(listen_names) {
        *target = listen_value(&name, &value, *target)?;
    }
    let mut port = target.port();
    vars.parse(port_names, &mut port)?;
    target.set_port(port);
    Ok(())
}

fn check_http_url(option: &str, url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(()),
        _ => Err(ConfigError::invalid(
            option,
            url,
            "expected an http:// or https:// URL, e.g. http://127.0.0.1:8082",
        )),
    }
}

impl Config {
    /// Reads the environment names over the current values.
    pub fn apply_env(&mut self, vars: &Vars<'_>) -> Result<(), ConfigError> {
        apply_listen(vars, &["ESPER_LISTEN"], &["ESPER_PORT"], &mut self.listen)?;
        vars.bool(&["ESPER_TLS"], &mut self.tls)?;
        for (name, target) in [
            ("ESPER_TLS_CERT", &mut self.tls_cert),
            ("ESPER_TLS_KEY", &mut self.tls_key),
        ] {
            if let Some((_, v)) = vars.lookup(&[name]) {
                *target = Some(PathBuf::from(v));
            }
        }
        apply_listen(
            vars,
            &["ESPER_HEALTH_LISTEN"],
            &["ESPER_HEALTH_PORT"],
            &mut self.health_listen,
        )?;
        apply_listen(
            vars,
            &["ESPER_METRICS_LISTEN"],
            &["ESPER_METRICS_PORT"],
            &mut self.metrics_listen,
        )?;
        vars.string(
            &["ESPER_DATABASE_URL", "DATABASE_URL"],
            &mut self.database_url,
        );
        vars.parse(
            &["ESPER_DATABASE_MAX_CONNECTIONS"],
            &mut self.database_max_connections,
        )?;
        vars.bool(&["ESPER_MIGRATE"], &mut self.migrate)?;
        vars.string(&["ESPER_INGESTION_URL"], &mut self.ingestion_url);
        vars.string(&["ESPER_MITIGATION_URL"], &mut self.mitigation_url);
        vars.secret(
            &["ESPER_BROKER_TOKEN", "ADMIN_TOKEN"],
            &mut self.broker_token,
        )?;
        vars.secret(&["ESPER_ADMIN_TOKEN"], &mut self.admin_token)?;
        vars.parse(&["ESPER_BODY_LIMIT"], &mut self.body_limit)?;
        vars.duration(
            &["ESPER_SHUTDOWN_TIMEOUT"],
            Duration::from_secs(1),
            &mut self.shutdown_timeout,
        )?;
        vars.duration(
            &["ESPER_HEARTBEAT_TIMEOUT"],
            Duration::from_secs(1),
            &mut self.heartbeat_timeout,
        )?;
        vars.duration(
            &["ESPER_DECISION_RETENTION"],
            Duration::from_secs(1),
            &mut self.decision_retention,
        )?;
        Ok(())
    }

    /// Checks the whole configuration once; the error names the option and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.database_url.trim();
        if crate::store::is_postgres_url(url) {
            if url.parse::<sqlx::postgres::PgConnectOptions>().is_err() {
                return Err(ConfigError::invalid(
                    "database_url",
                    crate::store::redact_url(url),
                    "not a valid PostgreSQL URL, e.g. postgres://esper:PASSWORD@db:5432/esper",
                ));
            }
        } else if !url.starts_with("sqlite:") {
            return Err(ConfigError::invalid(
                "database_url",
                crate::store::redact_url(url),
                "expected a sqlite:// or postgres:// URL, e.g. sqlite://./.esper/esper.db?mode=rwc",
            ));
        }
        if self.database_max_connections == 0 {
            return Err(ConfigError::invalid(
                "database_max_connections",
                0,
                "must be at least 1",
            ));
        }
        if self.tls {
            for (option, path) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
                if path.is_none() {
                    return Err(ConfigError::invalid(
                        "tls",
                        "true",
                        format!("serving the API over TLS needs {option} (a PEM file)"),
                    ));
                }
            }
        }
        // Either may list several instances of its broker, comma-separated.
        for (option, urls) in [
            ("ingestion_url", &self.ingestion_url),
            ("mitigation_url", &self.mitigation_url),
        ] {
            for url in urls.split(',') {
                check_http_url(option, url.trim())?;
            }
        }
        if self.body_limit < 1024 {
            return Err(ConfigError::invalid(
                "body_limit",
                self.body_limit,
                "must be at least 1024 bytes",
            ));
        }
        if self.heartbeat_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "heartbeat_timeout",
                "0s",
                "must be more than zero",
            ));
        }
        check_token("admin_token", self.admin_token.as_deref())?;
        check_token("broker_token", self.broker_token.as_deref())?;
        Ok(())
    }

    /// A complete, commented TOML configuration with every option at its default.
    pub fn template() -> &'static str {
        include_str!("config_template.toml")
    }
}

/// Command-line flags of `esper server run`; they win over the environment and the file.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct Args {
    /// API listener address, e.g. 0.0.0.0:8080.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// API listener port (keeps the listen host).
    #[arg(long)]
    pub port: Option<u16>,
    /// Serve the API over TLS (needs --tls-cert and --tls-key, or their settings).
    #[arg(long)]
    pub tls: bool,
    /// PEM certificate chain for the API, leaf first.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the API certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Health listener address.
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,
    /// Metrics listener address.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Control store URL (sqlite://PATH?mode=rwc or postgres://USER:PASSWORD@HOST/DB).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Do not apply schema migrations at start.
    #[arg(long)]
    pub no_migrations: bool,
    /// Ingestion broker base URL.
    #[arg(long, value_name = "URL")]
    pub ingestion_url: Option<String>,
    /// Mitigation broker base URL.
    #[arg(long, value_name = "URL")]
    pub mitigation_url: Option<String>,
    /// Drain time for in-flight requests at shutdown (e.g. 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub shutdown_timeout: Option<Duration>,
}

impl Args {
    /// Applies the flags that were given.
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(a) = self.listen {
            cfg.listen = a;
        }
        if let Some(p) = self.port {
            cfg.listen.set_port(p);
        }
        if self.tls {
            cfg.tls = true;
        }
        if let Some(p) = &self.tls_cert {
            cfg.tls_cert = Some(p.clone());
        }
        if let Some(p) = &self.tls_key {
            cfg.tls_key = Some(p.clone());
        }
        if let Some(a) = self.health_listen {
            cfg.health_listen = a;
        }
        if let Some(a) = self.metrics_listen {
            cfg.metrics_listen = a;
        }
        if let Some(u) = &self.database_url {
            cfg.database_url = u.clone();
        }
        if self.no_migrations {
            cfg.migrate = false;
        }
        if let Some(u) = &self.ingestion_url {
            cfg.ingestion_url = u.clone();
        }
        if let Some(u) = &self.mitigation_url {
            cfg.mitigation_url = u.clone();
        }
        if let Some(d) = self.shutdown_timeout {
            cfg.shutdown_timeout = d;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use esper_common::config::EnvSource;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn with_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map = env(pairs);
        let src: &dyn EnvSource = &map;
        let mut c = Config::default();
        c.apply_env(&Vars::new(src))?;
        Ok(c)
    }

    #[test]
    fn template_parses_to_the_defaults() {
        let parsed: Config = toml::from_str(Config::template()).unwrap();
        assert_eq!(parsed, Config::default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn environment_names_apply() {
        let c = with_env(&[
            ("ESPER_PORT", "9000"),
            ("ESPER_HEALTH_LISTEN", "127.0.0.1"),
            ("DATABASE_URL", "sqlite::memory:"),
            ("ESPER_MIGRATE", "false"),
            ("ESPER_ADMIN_TOKEN", "s3cret-token"),
            ("ESPER_SHUTDOWN_TIMEOUT", "5"),
            ("ESPER_DECISION_RETENTION", "7d"),
        ])
        .unwrap();
        assert_eq!(c.decision_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.health_listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.database_url, "sqlite::memory:");
        assert!(!c.migrate);
        assert_eq!(c.admin_token.as_deref(), Some("s3cret-token"));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
        let c = with_env(&[
            ("ESPER_DATABASE_URL", "sqlite://a.db"),
            ("DATABASE_URL", "sqlite://b.db"),
        ])
        .unwrap();
        assert_eq!(c.database_url, "sqlite://a.db", "the ESPER_ name wins");
    }

    #[test]
    fn bad_values_name_the_option() {
        let err = with_env(&[("ESPER_LISTEN", "here")]).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid ESPER_LISTEN = `here`"),
            "{err}"
        );
        let c = with_env(&[("DATABASE_URL", "postgresql://u:pw@db/esper")]).unwrap();
        c.validate().unwrap();
        let c = with_env(&[("DATABASE_URL", "mysql://u:pw@db/esper")]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("invalid database_url = `mysql://u:***@db/esper`: expected"),
            "{err}"
        );
        let c = with_env(&[("ESPER_INGESTION_URL", "127.0.0.1:8082")]).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("invalid ingestion_url = `127.0.0.1:8082`")
        );
    }

    #[test]
    fn flags_win() {
        let mut c = with_env(&[("ESPER_PORT", "9000")]).unwrap();
        let args = Args {
            port: Some(8443),
            no_migrations: true,
            ..Args::default()
        };
        args.apply(&mut c);
        assert_eq!(c.listen.port(), 8443);
        assert!(!c.migrate);
    }
}
