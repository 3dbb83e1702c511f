//! Esper's Pingora data plane: enforcement from an in-memory mitigation cache, sampling
//! and forwarding of request events, and the delta stream that keeps the cache fresh.
//!
//! [`start`] binds, spawns Pingora on its own thread and the background loops on the
//! current tokio runtime, and returns a [`ProxyHandle`]; [`run`] is `start` then `wait`.

pub mod cache;
mod challenge;
mod clientip;
pub mod config;
mod enforce;
mod follower;
mod forwarder;
mod heartbeat;
pub mod metrics;
mod ops;
mod proxy;
pub mod proxyproto;
mod report;
mod respond;
mod status;
mod throttle;
mod traffic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use chrono::Utc;
use esper_common::Shutdown;
use esper_common::config::ConfigError;
use esper_common::http::BindError;
use esper_protocol::{IngestionClient, MitigationClient};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use cache::MitigationCache;
pub use config::{Args, Config};
pub use metrics::{DropReason, Metrics};

use crate::challenge::Challenger;
use crate::clientip::{Networks, Paths};
use crate::enforce::Enforcer;
use crate::forwarder::Forwarder;
use crate::proxy::{EdgePolicy, EsperProxy, InFlight, Upstream};
use crate::report::Reporter;
use crate::respond::Templates;
use crate::status::Status;

/// Time the ops server gets to finish its own requests at shutdown.
const OPS_DRAIN: Duration = Duration::from_secs(2);
/// Proxy id when none is configured and the host name cannot be read.
const FALLBACK_PROXY_ID: &str = "proxy-1";

/// Why the proxy could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot resolve upstream `{upstream}`: {reason}")]
    Upstream { upstream: String, reason: String },
    #[error("cannot start the traffic thread: {0}")]
    Spawn(std::io::Error),
    #[error("the traffic thread stopped unexpectedly (panic)")]
    TrafficPanicked,
    #[error("ops server failed: {0}")]
    Ops(std::io::Error),
}

/// Listeners bound by the caller (tests, `esper dev`); `None` binds the configured
/// address.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Client traffic (`config.listen` when `None`).
    pub traffic: Option<std::net::TcpListener>,
    /// Ops server (`config.ops_listen` when `None`).
    pub ops: Option<tokio::net::TcpListener>,
}

/// A running proxy.
pub struct ProxyHandle {
    traffic_addr: SocketAddr,
    ops_addr: SocketAddr,
    traffic: ThreadHandle<()>,
    forwarder: JoinHandle<()>,
    finish: watch::Sender<bool>,
    ops: JoinHandle<std::io::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
    cache: Arc<MitigationCache>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    shutdown: Shutdown,
}

impl ProxyHandle {
    /// Where client traffic is accepted.
    pub fn traffic_addr(&self) -> SocketAddr {
        self.traffic_addr
    }

    /// Where the ops server listens.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// The mitigation cache the proxy enforces.
    pub fn cache(&self) -> &Arc<MitigationCache> {
        &self.cache
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Waits for the proxy to stop (after the shutdown signal): traffic drained, queued
    /// events flushed, background loops ended.
    pub async fn wait(self) -> Result<(), ProxyError> {
        let traffic = self.traffic;
        let joined = tokio::task::spawn_blocking(move || traffic.join()).await;
        self.status.set_serving(false);
        let traffic_ok = matches!(joined, Ok(Ok(())));
        if !traffic_ok || !self.shutdown.is_triggered() {
            // Traffic died on its own; nothing else will stop the loops.
            tracing::error!("traffic thread ended before shutdown");
            for t in &self.tasks {
                t.abort();
            }
            self.ops.abort();
        }
        // Traffic has stopped, so every finished request's event is queued by now.
        let _ = self.finish.send(true);
        let _ = self.forwarder.await;
        for t in self.tasks {
            let _ = t.await;
        }
        let ops = self.ops.await;
        if !traffic_ok {
            return Err(ProxyError::TrafficPanicked);
        }
        match ops {
            Ok(Err(e)) => Err(ProxyError::Ops(e)),
            _ => Ok(()),
        }
    }
}

/// The host name, for the default proxy id.
fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

async fn resolve_upstream(upstream: &str) -> Result<SocketAddr, ProxyError> {
    let err = |reason: String| ProxyError::Upstream {
        upstream: upstream.to_string(),
        reason,
    };
    tokio::net::lookup_host(upstream)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address found".into()))
}

fn bind_traffic(addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    std::net::TcpListener::bind(addr).map_err(|e| BindError {
        what: "proxy traffic listener".into(),
        addr,
        reason: match e.kind() {
            std::io::ErrorKind::AddrInUse => "address already in use".into(),
            std::io::ErrorKind::PermissionDenied => "permission denied".into(),
            _ => e.to_string(),
        },
    })
}

/// Validates `config`, binds, starts traffic on Pingora's own thread and the background
/// loops on the current runtime. Must be called from inside a tokio runtime.
pub async fn start(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<ProxyHandle, ProxyError> {
    config.validate()?;
    let upstream_addr = resolve_upstream(&config.upstream).await?;
    let (upstream_host, _) = config::split_host_port(&config.upstream)
        .map_err(|reason| ConfigError::invalid("upstream", &config.upstream, reason))?;
    let traffic_listener = match listeners.traffic {
        Some(l) => l,
        None => bind_traffic(config.listen)?,
    };
    let traffic_addr = traffic_listener.local_addr().map_err(ProxyError::Spawn)?;
    let ops_listener = match listeners.ops {
        Some(l) => l,
        None => esper_common::http::bind("proxy ops listener", config.ops_listen).await?,
    };
    let ops_addr = ops_listener.local_addr().map_err(ProxyError::Ops)?;
    let proxy_id = if config.proxy_id.is_empty() {
        host_name().unwrap_or_else(|| FALLBACK_PROXY_ID.to_string())
    } else {
        config.proxy_id.clone()
    };

    let cache = Arc::new(MitigationCache::new());
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(Status::default());
    let in_flight = InFlight::default();
    let (events_tx, events_rx) = mpsc::channel(config.buffer);

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
    let secret = match &config.challenge_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => {
            tracing::warn!(
                "no challenge_secret (ESPER_CHALLENGE_SECRET): using a random key, so \
                 clearance cookies are honoured by this process only"
            );
            rand::random::<[u8; 32]>().to_vec()
        }
    };
    let trusted = Networks::new(&config.trusted_proxies);
    let edge = EdgePolicy {
        trusted: trusted.clone(),
        allow_ips: Networks::new(&config.allow_ips),
        allow_paths: Paths::new(&config.allow_paths),
        templates,
        challenger: Challenger::new(
            &secret,
            config.challenge_ttl,
            config.challenge_fallback_delay,
        ),
    };
    let app = EsperProxy::new(
        edge,
        Enforcer::new(
            cache.clone(),
            metrics.clone(),
            config.app.clone(),
            config.throttle_entities,
            config.tarpit_concurrency,
            config.tarpit_max,
        ),
        Reporter::new(
            events_tx,
            metrics.clone(),
            config.sample_rate,
            config.app.clone(),
            proxy_id.clone(),
            &config.report_headers,
            &config.report_cookies,
        ),
        metrics.clone(),
        Upstream::new(
            upstream_addr,
            config.upstream_tls,
            upstream_host,
            config.upstream_connect_timeout,
            config.upstream_idle_timeout,
        ),
        in_flight.clone(),
    );
    let threads = config.effective_threads();
    let traffic = traffic::spawn(
        app,
        vec![traffic::Endpoint {
            listener: traffic_listener,
            proxy_protocol: config.proxy_protocol,
        }],
        trusted,
        threads,
        config.drain_timeout,
        in_flight.clone(),
        shutdown.clone(),
    )
    .map_err(ProxyError::Spawn)?;
    status.set_serving(true);
    tracing::info!(
        listen = %traffic_addr,
        ops = %ops_addr,
        upstream = %config.upstream,
        resolved = %upstream_addr,
        app = %config.app,
        proxy_id = %proxy_id,
        threads,
        "esper-proxy serving"
    );

    let (finish, finish_rx) = watch::channel(false);
    let forwarder = tokio::spawn(
        Forwarder::new(
            events_rx,
            IngestionClient::new(&config.ingestion_url, config.broker_token.clone()),
            config.batch_size,
            config.flush_interval,
            metrics.clone(),
            status.clone(),
        )
        .run(finish_rx),
    );
    let mut tasks = vec![
        tokio::spawn(follower::follow(
            MitigationClient::new(&config.mitigation_url, config.broker_token.clone()),
            cache.clone(),
            metrics.clone(),
            status.clone(),
            config.stream_wait,
            shutdown.clone(),
        )),
        tokio::spawn(follower::sweep(
            cache.clone(),
            metrics.clone(),
            shutdown.clone(),
        )),
    ];
    if let Some(url) = config.control_url.clone() {
        tasks.push(tokio::spawn(heartbeat::run(
            url,
            config.control_token.clone(),
            config.heartbeat_interval,
            heartbeat::Reporter {
                proxy_id,
                app: config.app.clone(),
                started_at: Utc::now(),
                cache: cache.clone(),
                metrics: metrics.clone(),
                status: status.clone(),
            },
            shutdown.clone(),
        )));
    }
    let router = ops::router(
        ops::Health {
            traffic_addr,
            ingestion_url: config.ingestion_url.clone(),
            mitigation_url: config.mitigation_url.clone(),
            cache: cache.clone(),
            metrics: metrics.clone(),
            status: status.clone(),
            in_flight,
        },
        shutdown.clone(),
    );
    let ops = tokio::spawn(esper_common::http::serve(
        ops_listener,
        router,
        shutdown.clone(),
        OPS_DRAIN,
    ));

    Ok(ProxyHandle {
        traffic_addr,
        ops_addr,
        traffic,
        forwarder,
        finish,
        ops,
        tasks,
        cache,
        metrics,
        status,
        shutdown,
    })
}

/// Starts the proxy and runs it until `shutdown` fires and it has drained.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), ProxyError> {
    start(config, listeners, shutdown).await?.wait().await
}
