//! The part of the proxy's state a configuration reload replaces as a whole: apps and
//! their upstream pools, trusted proxies, allowlists, answer templates. Requests read it
//! through one `ArcSwap`, so a reload never pauses them and a request started before it
//! finishes with what it began with.

use std::sync::Arc;

use arc_swap::ArcSwap;
use esper_common::config::ConfigError;

use crate::apps::{App, HealthKeeper, Router, Shared, Timeouts};
use crate::clientip::{Networks, Paths};
use crate::config::Config;
use crate::respond::Templates;

/// What a reload swaps.
#[derive(Debug)]
pub struct Live {
    pub router: Router,
    pub trusted: Networks,
    /// The header `trusted` proxies name the client in.
    pub real_ip_header: crate::config::RealIpHeader,
    pub allow_ips: Networks,
    pub allow_paths: Paths,
    /// Templates of answers given outside any app (unknown host).
    pub templates: Templates,
    pub unknown_host_status: u16,
    pub forward: Forward,
    pub access_log: crate::config::AccessLog,
}

/// Which headers the proxy adds to what it forwards (`forward_headers`), and how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forward {
    pub forwarded_for: bool,
    pub proto: bool,
    pub real_ip: bool,
    pub request_id: bool,
    /// `preserve_header_case`.
    pub preserve_case: bool,
}

impl Forward {
    /// From the configured names (already validated).
    pub fn new(names: &[String], preserve_case: bool) -> Forward {
        let has = |name: &str| names.iter().any(|n| n.eq_ignore_ascii_case(name));
        Forward {
            forwarded_for: has("x-forwarded-for"),
            proto: has("x-forwarded-proto"),
            real_ip: has("x-real-ip"),
            request_id: has("x-request-id"),
            preserve_case,
        }
    }

    /// How many headers a request may gain.
    pub fn added(&self) -> usize {
        [
            self.forwarded_for,
            self.proto,
            self.real_ip,
            self.request_id,
        ]
        .into_iter()
        .filter(|on| *on)
        .count()
    }
}

/// The live state, shared by every request and the accept loops.
pub type LiveState = Arc<ArcSwap<Live>>;

impl Live {
    /// Builds the state of `config` (already validated): resolves every upstream, loads
    /// templates, starts health checks on the current runtime.
    pub async fn build(config: &Config, health: &HealthKeeper) -> Result<Live, ConfigError> {
        Live::build_keeping(config, &[], health).await
    }

    /// [`build`](Self::build), taking the apps of `keep` as they are (by name) instead
    /// of building them again: built from this same configuration, they keep their
    /// balancing state. The apps built join the health checks `health` keeps for them.
    pub async fn build_keeping(
        config: &Config,
        keep: &[Arc<App>],
        health: &HealthKeeper,
    ) -> Result<Live, ConfigError> {
        let shared = Shared {
            sample_rate: config.sample_rate,
            templates_dir: config.templates_dir.clone(),
            timeouts: Timeouts {
                connect: config.upstream_connect_timeout,
                read: config.upstream_read_timeout,
                write: config.upstream_write_timeout,
            },
            idle_timeout: config.upstream_idle_timeout,
        };
        let mut apps = Vec::new();
        for (i, cfg) in config.effective_apps().into_iter().enumerate() {
            // The value the option was given: the upstream itself, or the app's name.
            let (option, value) = if config.apps.is_empty() {
                ("upstream".to_string(), config.upstream.clone())
            } else {
                (format!("apps[{i}]"), cfg.name.clone())
            };
            let app = match keep.iter().find(|a| a.name == cfg.name) {
                Some(kept) => kept.clone(),
                None => Arc::new(
                    App::build(&cfg, &shared, health)
                        .await
                        .map_err(|reason| ConfigError::invalid(&option, &value, reason))?,
                ),
            };
            apps.push((cfg, app));
        }
        let templates = Templates::load(config.templates_dir.as_deref()).map_err(|reason| {
            ConfigError::invalid(
                "templates_dir",
                config
                    .templates_dir
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
                reason,
            )
        })?;
        Ok(Live {
            router: Router::new(apps, config.default_app.as_deref()),
            trusted: Networks::new(&config.trusted_proxies),
            real_ip_header: config.real_ip_header,
            allow_ips: Networks::new(&config.allow_ips),
            allow_paths: Paths::new(&config.allow_paths),
            templates,
            unknown_host_status: config.unknown_host_status,
            forward: Forward::new(&config.forward_headers, config.preserve_header_case),
            access_log: config.access_log,
        })
    }
}

/// `esper_proxy_upstream_healthy{app,upstream}`, read from the pools in force when
/// scraped, so apps and upstreams gone since are never reported.
pub struct UpstreamHealth {
    live: LiveState,
    desc: prometheus::core::Desc,
}

const UPSTREAM_HEALTHY: &str = "esper_proxy_upstream_healthy";
const UPSTREAM_HEALTHY_HELP: &str = "1 when the app's pool picks the upstream (healthy, or not checked), 0 when its health checks took it out";

impl UpstreamHealth {
    pub fn new(live: LiveState) -> Result<UpstreamHealth, prometheus::Error> {
        let desc = prometheus::core::Desc::new(
            UPSTREAM_HEALTHY.into(),
            UPSTREAM_HEALTHY_HELP.into(),
            vec!["app".into(), "upstream".into()],
            std::collections::HashMap::new(),
        )?;
        Ok(UpstreamHealth { live, desc })
    }
}

impl prometheus::core::Collector for UpstreamHealth {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Ok(gauges) = prometheus::GaugeVec::new(
            prometheus::Opts::new(UPSTREAM_HEALTHY, UPSTREAM_HEALTHY_HELP),
            &["app", "upstream"],
        ) else {
            return Vec::new();
        };
        let live = self.live.load();
        for app in live.router.apps() {
            for (upstream, ready) in app.upstream_health() {
                gauges
                    .with_label_values(&[app.name.as_str(), upstream.as_str()])
                    .set(if ready { 1.0 } else { 0.0 });
            }
        }
        gauges.collect()
    }
}
