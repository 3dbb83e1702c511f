//! Esper's Pingora data plane: enforcement from an in-memory mitigation cache, sampling
//! and forwarding of request events, and the delta stream that keeps the cache fresh.
//!
//! [`start`] binds, spawns Pingora on its own thread and the background loops on the
//! current tokio runtime, and returns a [`ProxyHandle`]; [`run`] is `start` then `wait`.
//! [`ProxyHandle::reload`] swaps apps, allowlists, templates, trusted proxies and
//! certificates while serving; listeners stay as they are.

mod apps;
mod buffered;
pub mod cache;
mod challenge;
mod clientip;
pub mod config;
mod enforce;
mod follower;
mod forwarder;
mod heartbeat;
mod ja4;
mod live;
pub mod metrics;
mod ops;
mod proxy;
pub mod proxyproto;
mod queue;
mod remote;
mod report;
mod respond;
mod status;
mod throttle;
mod tls;
mod traffic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::Utc;
use esper_common::Shutdown;
use esper_common::config::ConfigError;
use esper_common::http::BindError;
use esper_protocol::{ChallengeKey, Endpoints, IngestionClient, Token};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use cache::MitigationCache;
pub use config::{AccessLog, AppConfig, Args, CertConfig, Config};
pub use metrics::{DropReason, Metrics};
pub use remote::check_document;

use crate::apps::{App, HealthKeeper};
use crate::challenge::Challenger;
use crate::enforce::Enforcer;
use crate::forwarder::Forwarder;
use crate::live::{Live, LiveState};
use crate::proxy::{EsperProxy, InFlight};
use crate::report::{ReportNames, Reporter};
use crate::status::Status;
use crate::tls::Certs;

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
    #[error("the control plane's configuration: {0}")]
    Remote(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot start the traffic thread: {0}")]
    Spawn(std::io::Error),
    #[error("the traffic thread stopped unexpectedly (panic)")]
    TrafficPanicked,
    #[error("cannot open the events recording {0}: {1}")]
    Record(String, std::io::Error),
    #[error("ops server failed: {0}")]
    Ops(std::io::Error),
}

/// Listeners bound by the caller (tests, `esper dev`); `None` binds the configured
/// address.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Client traffic (`config.listen` when `None`).
    pub traffic: Option<std::net::TcpListener>,
    /// TLS client traffic, used when certificates are configured (`config.tls_listen`
    /// when `None`).
    pub tls: Option<std::net::TcpListener>,
    /// Ops server (`config.ops_listen` when `None`).
    pub ops: Option<tokio::net::TcpListener>,
}

/// A running proxy.
pub struct ProxyHandle {
    traffic_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    reloader: Reloader,
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

    /// Where TLS client traffic is accepted, when certificates are configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Applies a new configuration while serving (see [`Reloader::reload`]).
    pub async fn reload(&self, config: Config) -> Result<(), ProxyError> {
        self.reloader.reload(config).await
    }

    /// A handle that reloads the configuration, usable after `wait` took the proxy
    /// handle (for a signal handler).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
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

/// Applies new configurations to a running proxy.
#[derive(Clone)]
pub struct Reloader {
    live: LiveState,
    certs: Option<Arc<Certs>>,
    started: Arc<Config>,
    /// The two sources of the configuration in force; held through a reload, so reloads
    /// apply one at a time.
    layers: Arc<tokio::sync::Mutex<Layers>>,
    /// The apps' health checks, joined by each app's next generation.
    health: Arc<HealthKeeper>,
    /// Signs challenges; a reload brings a new `challenge_secret` to it.
    challenger: Arc<Challenger>,
    /// The control plane's challenge key (and the one it replaced), once it answered:
    /// what signs whenever the configuration sets no `challenge_secret`.
    deployment_key: Arc<parking_lot::Mutex<Option<ChallengeKey>>>,
    /// Shows which key signs (`esper_proxy_challenge_key_revision`).
    metrics: Arc<Metrics>,
    /// What the forwarder and the stream followers send to the brokers.
    broker_token: Token,
    /// What the heartbeats and the control plane followers send.
    control_token: Token,
    /// Where the forwarder, the stream follower, the heartbeats and the control plane
    /// followers connect (the last `None` without a control plane).
    ingestion: Endpoints,
    mitigation: Endpoints,
    control: Option<Endpoints>,
    /// The headers and cookies events carry: the configuration's and the policies'.
    report_names: Arc<ReportNames>,
}

/// The local configuration (file, environment and flags, as last read at start or on
/// SIGHUP) and the control plane's latest document laid over it.
struct Layers {
    local: Config,
    remote: Option<String>,
}

impl Layers {
    /// `local` with the control plane's latest document, if any, laid over it.
    fn over(&self, local: &Config) -> Result<Config, ProxyError> {
        match &self.remote {
            Some(doc) => remote::overlay(local, doc).map_err(ProxyError::Remote),
            None => Ok(local.clone()),
        }
    }
}

impl Reloader {
    /// A new local configuration (a SIGHUP, or a caller of the handle): validated and
    /// applied with the control plane's latest document, if any, still laid over it, so
    /// neither source undoes the other. It swaps in apps (upstream pools, sampling,
    /// templates), default app, trusted proxies, allowlists and certificates. Requests in
    /// flight finish with the state they started with; no connection is dropped. A new
    /// `challenge_secret` signs from then on, the one before still honoured; new broker and
    /// control tokens, and new addresses of the brokers and the control plane, are used
    /// from the next request on (the long polls in flight move at once). Listeners and
    /// the other process-wide settings keep their start-up values (a warning names any
    /// that changed). On error nothing changes.
    pub async fn reload(&self, config: Config) -> Result<(), ProxyError> {
        let mut layers = self.layers.lock().await;
        let merged = layers.over(&config)?;
        self.apply(merged, true, &[]).await?;
        layers.local = config;
        Ok(())
    }

    /// A new document from the control plane, laid over the local configuration and
    /// applied as [`Reloader::reload`] does. On error nothing changes.
    pub async fn reload_remote(&self, doc: &str) -> Result<(), ProxyError> {
        let mut layers = self.layers.lock().await;
        let merged = remote::overlay(&layers.local, doc).map_err(ProxyError::Remote)?;
        self.apply(merged, true, &[]).await?;
        layers.remote = Some(doc.to_string());
        Ok(())
    }

    /// The control plane's challenge key, used unless the configuration in force sets
    /// its own `challenge_secret` (which always wins). `true` when it now signs.
    ///
    /// Besides it, the proxy honours the key the control plane says it replaced, and no
    /// other: a rotation that drops the key before refuses its cookies here too. On the
    /// first answer of a control plane that never rotated, the proxy's own start-up key
    /// stays honoured instead, for the cookies it signed before the control plane
    /// answered.
    pub async fn use_deployment_key(&self, key: &ChallengeKey) -> bool {
        let layers = self.layers.lock().await;
        let first = self.deployment_key.lock().replace(key.clone()).is_none();
        let configured = layers
            .over(&layers.local)
            .map_or(true, |c| c.challenge_secret.is_some());
        if configured {
            return false;
        }
        self.metrics.challenge_key_revision.set(key.revision);
        if first && key.previous.is_none() && key.revision <= 1 {
            self.challenger.set_key(key.key.as_bytes())
        } else {
            self.challenger.set_keys(
                key.key.as_bytes(),
                key.previous.as_deref().map(str::as_bytes),
            )
        }
    }

    /// Rebuilds, with the configuration in force, the apps with an upstream host name
    /// that resolves to other addresses than those in use; `true` when there was one.
    /// The other apps are kept as they are, with their pools' health.
    pub async fn refresh_resolved(&self) -> Result<bool, ProxyError> {
        let layers = self.layers.lock().await;
        let live = self.live.load_full();
        let mut unmoved = Vec::new();
        for app in live.router.apps() {
            if !app.resolves_elsewhere().await {
                unmoved.push(app.clone());
            }
        }
        if unmoved.len() == live.router.apps().len() {
            return Ok(false);
        }
        // The layers change only with the live state, so this is the configuration the
        // apps kept were built from.
        let merged = layers.over(&layers.local)?;
        self.apply(merged, false, &unmoved).await?;
        Ok(true)
    }

    /// `warn`: name the options that changed but apply only after a restart (not again
    /// when the configuration itself did not change). `keep`: apps taken as they are.
    async fn apply(&self, config: Config, warn: bool, keep: &[Arc<App>]) -> Result<(), ProxyError> {
        config.validate()?;
        if warn {
            for option in restart_only_changes(&self.started, &config) {
                tracing::warn!(option, "changed option takes effect only after a restart");
            }
        }
        let live = Live::build_keeping(&config, keep, &self.health).await?;
        if let Some(certs) = &self.certs
            && !config.tls_certificates.is_empty()
        {
            certs
                .replace(&config.tls_certificates)
                .map_err(ProxyError::Tls)?;
        }
        let apps: Vec<String> = live.router.apps().iter().map(|a| a.name.clone()).collect();
        self.live.store(Arc::new(live));
        if self
            .report_names
            .set_local(&config.report_headers, &config.report_cookies)
        {
            tracing::info!(
                headers = ?config.report_headers,
                cookies = ?config.report_cookies,
                "the reported headers and cookies changed: events carry them from the next request on"
            );
        }
        // A secret set (again) signs; one taken away leaves the control plane's key, if
        // it answered, else the key in use.
        let deployment = self.deployment_key.lock().clone();
        self.metrics.challenge_key_revision.set(match &deployment {
            Some(k) if config.challenge_secret.is_none() => k.revision,
            _ => 0,
        });
        let key = config
            .challenge_secret
            .clone()
            .or_else(|| deployment.map(|k| k.key));
        if let Some(key) = key
            && self.challenger.set_key(key.as_bytes())
        {
            tracing::info!(
                "the challenge key changed: new challenges and cookies are signed with it"
            );
        }
        // Only the local configuration sets them (a control plane's document cannot).
        for (changed, what) in [
            (self.broker_token.set(config.broker_token.clone()), "broker"),
            (
                self.control_token.set(config.control_token.clone()),
                "control plane",
            ),
        ] {
            if changed {
                tracing::info!("the {what} token changed: sent from the next request on");
            }
        }
        let mut moved = vec![
            (
                "ingestion broker",
                &self.ingestion,
                config.ingestion_url.as_str(),
            ),
            (
                "mitigation broker",
                &self.mitigation,
                config.mitigation_url.as_str(),
            ),
        ];
        // Turning the control plane on or off takes a restart (named above).
        if let (Some(control), Some(url)) = (&self.control, &config.control_url) {
            moved.push(("control plane", control, url.as_str()));
        }
        for (what, endpoints, url) in moved {
            if endpoints.set(url) {
                tracing::info!(
                    url,
                    "the {what}'s address changed: used from the next request on"
                );
            }
        }
        tracing::info!(?apps, "configuration reloaded");
        Ok(())
    }
}

/// Resolves the upstreams' host names every `interval` and rebuilds the apps when one
/// moved, until shutdown.
async fn resolve_again(reloader: Reloader, interval: Duration, shutdown: Shutdown) {
    while !shutdown.sleep(interval).await {
        if let Err(e) = reloader.refresh_resolved().await {
            tracing::warn!(error = %e, "upstreams resolved to new addresses but the apps could not be rebuilt; the current ones stay");
        }
    }
}

/// The options a reload applies: what [`Live::build`] reads, and the certificates.
const RELOADED: &[&str] = &[
    "upstream",
    "upstream_tls",
    "upstream_connect_timeout",
    "upstream_read_timeout",
    "upstream_write_timeout",
    "upstream_idle_timeout",
    "app",
    "sample_rate",
    "report_headers",
    "report_cookies",
    "trusted_proxies",
    "real_ip_header",
    "forward_headers",
    "preserve_header_case",
    "access_log",
    "allow_ips",
    "allow_paths",
    "templates_dir",
    "apps",
    "default_app",
    "unknown_host_status",
    "tls_certificates",
    "challenge_secret",
    "broker_token",
    "control_token",
    "ingestion_url",
    "mitigation_url",
    "control_url",
];

/// The options that differ between `started` and `next` but keep their start-up values
/// until a restart. Compared field by field through their serialised form, so an option
/// added later is reported until it is made reloadable, never silently ignored.
fn restart_only_changes(started: &Config, next: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(started), serde_json::to_value(next))
    else {
        return Vec::new();
    };
    let mut changed: Vec<String> = a
        .iter()
        .filter(|(k, v)| !RELOADED.contains(&k.as_str()) && b.get(k.as_str()) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    // Certificates reload, but the TLS listener is opened or not at start.
    if started.tls_certificates.is_empty() != next.tls_certificates.is_empty() {
        changed.push("tls_certificates (TLS listener)".into());
    }
    // A control plane's address reloads, but its followers are started or not at start.
    if started.control_url.is_some() != next.control_url.is_some() {
        changed.push("control_url (heartbeats and control plane followers)".into());
    }
    changed
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

fn bind_traffic(what: &str, addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    std::net::TcpListener::bind(addr).map_err(|e| BindError {
        what: what.into(),
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
    let health = Arc::new(HealthKeeper::default());
    let live: LiveState = Arc::new(ArcSwap::from_pointee(Live::build(&config, &health).await?));
    // Certificates before listeners: a bad file is the error reported, not a busy port.
    let tls_parts = if config.tls_certificates.is_empty() {
        None
    } else {
        let loaded = Arc::new(Certs::load(&config.tls_certificates).map_err(ProxyError::Tls)?);
        let acceptor = tls::acceptor(loaded.clone(), config.tls_http2).map_err(ProxyError::Tls)?;
        Some((loaded, acceptor))
    };
    let traffic_listener = match listeners.traffic {
        Some(l) => l,
        None => bind_traffic("proxy traffic listener", config.listen)?,
    };
    let traffic_addr = traffic_listener.local_addr().map_err(ProxyError::Spawn)?;
    if config.proxy_protocol && config.trusted_proxies.is_empty() {
        tracing::warn!(
            "proxy_protocol is on and trusted_proxies is empty: any peer that reaches the \
             listener can name any client address; list the load balancers' networks, or \
             make sure only they can connect"
        );
    }
    let mut endpoints = vec![traffic::Endpoint {
        listener: traffic_listener,
        proxy_protocol: config.proxy_protocol,
        tls: None,
    }];
    let mut certs = None;
    let mut tls_addr = None;
    if let Some((loaded, acceptor)) = tls_parts {
        let listener = match listeners.tls {
            Some(l) => l,
            None => bind_traffic("proxy TLS listener", config.tls_listen)?,
        };
        tls_addr = Some(listener.local_addr().map_err(ProxyError::Spawn)?);
        endpoints.push(traffic::Endpoint {
            listener,
            proxy_protocol: config.proxy_protocol,
            tls: Some(Arc::new(acceptor)),
        });
        certs = Some(loaded);
    }
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

    let cache = Arc::new(MitigationCache::with_limit(config.cache_max_entries));
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(Status::default());
    let in_flight = InFlight::default();
    let threads = config.effective_threads();
    // One buffer per traffic thread; the forwarder wakes when one holds a batch.
    let queue = Arc::new(queue::EventQueue::new(
        config.buffer,
        threads,
        config.batch_size,
    ));
    let recorder = match &config.record_events {
        Some(path) => Some(
            forwarder::Recorder::open(path.clone())
                .await
                .map_err(|e| ProxyError::Record(path.display().to_string(), e))?,
        ),
        None => None,
    };

    let secret = match &config.challenge_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => {
            if config.control_url.is_some() {
                tracing::info!(
                    "no challenge_secret (ESPER_CHALLENGE_SECRET): signing challenges with the \
                     control plane's key, shared by every proxy, once it answers"
                );
            } else {
                tracing::warn!(
                    "no challenge_secret (ESPER_CHALLENGE_SECRET) and no control plane: using a \
                     random key, so clearance cookies are honoured by this process only"
                );
            }
            rand::random::<[u8; 32]>().to_vec()
        }
    };
    let challenger = Arc::new(Challenger::new(
        &secret,
        config.challenge_ttl,
        config.challenge_fallback_delay,
    ));
    let report_names = Arc::new(ReportNames::new(
        &config.report_headers,
        &config.report_cookies,
    ));
    let app = EsperProxy::new(
        live.clone(),
        challenger.clone(),
        Enforcer::new(
            cache.clone(),
            metrics.clone(),
            config.throttle_entities,
            config.tarpit_concurrency,
            config.tarpit_max,
        ),
        Reporter::new(
            queue.clone(),
            metrics.clone(),
            proxy_id.clone(),
            report_names.clone(),
        ),
        metrics.clone(),
        in_flight.clone(),
    );
    let traffic = traffic::spawn(
        app,
        endpoints,
        live.clone(),
        threads,
        config.drain_timeout,
        in_flight.clone(),
        shutdown.clone(),
    )
    .map_err(ProxyError::Spawn)?;
    status.set_serving(true);
    let apps: Vec<String> = live
        .load()
        .router
        .apps()
        .iter()
        .map(|a| a.name.clone())
        .collect();
    tracing::info!(
        listen = %traffic_addr,
        tls = ?tls_addr,
        ops = %ops_addr,
        ?apps,
        proxy_id = %proxy_id,
        threads,
        "esper-proxy serving"
    );

    let (finish, finish_rx) = watch::channel(false);
    // Shared with the clients that send them, so a reload replaces them in every one.
    let broker_token = Token::new(config.broker_token.clone());
    let control_token = Token::new(config.control_token.clone());
    let ingestion = Endpoints::new(&config.ingestion_url);
    let mitigation = Endpoints::new(&config.mitigation_url);
    let control = config.control_url.as_deref().map(Endpoints::new);
    let mut forwarder = Forwarder::new(
        queue,
        IngestionClient::new(&config.ingestion_url, None)
            .with_token(broker_token.clone())
            .with_endpoints(ingestion.clone()),
        config.flush_interval,
        metrics.clone(),
        status.clone(),
    );
    if let Some(recorder) = recorder {
        forwarder = forwarder.record(recorder);
    }
    let forwarder = tokio::spawn(forwarder.run(finish_rx));
    let mut tasks = vec![
        tokio::spawn(follower::follow(
            mitigation.clone(),
            broker_token.clone(),
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
    if let Some(control) = control.clone() {
        tasks.push(tokio::spawn(heartbeat::run(
            control,
            control_token.clone(),
            config.heartbeat_interval,
            heartbeat::Reporter {
                proxy_id,
                apps: live.clone(),
                started_at: Utc::now(),
                cache: cache.clone(),
                metrics: metrics.clone(),
                status: status.clone(),
            },
            shutdown.clone(),
        )));
    }
    match live::UpstreamHealth::new(live.clone()) {
        Ok(collector) => {
            if let Err(e) = metrics.registry().register(Box::new(collector)) {
                tracing::warn!(error = %e, "upstream health is not exported as a metric");
            }
        }
        Err(e) => tracing::warn!(error = %e, "upstream health is not exported as a metric"),
    }
    let reloader = Reloader {
        live,
        certs: certs.clone(),
        started: Arc::new(config.clone()),
        layers: Arc::new(tokio::sync::Mutex::new(Layers {
            local: config.clone(),
            remote: None,
        })),
        health,
        challenger,
        deployment_key: Arc::default(),
        metrics: metrics.clone(),
        broker_token,
        control_token: control_token.clone(),
        ingestion: ingestion.clone(),
        mitigation: mitigation.clone(),
        control: control.clone(),
        report_names: report_names.clone(),
    };
    let control_for_health = control.clone();
    // Asked even with a secret set: a reload may take the secret away.
    if let Some(control) = control.clone() {
        tasks.push(tokio::spawn(remote::follow_challenge_key(
            remote::Follow {
                control,
                token: control_token.clone(),
                reloader: reloader.clone(),
                metrics: metrics.clone(),
                status: status.clone(),
                wait: config.stream_wait,
            },
            shutdown.clone(),
        )));
    }
    if let Some(control) = control
        && config.follow_control_config
    {
        let follow = || remote::Follow {
            control: control.clone(),
            token: control_token.clone(),
            reloader: reloader.clone(),
            metrics: metrics.clone(),
            status: status.clone(),
            wait: config.stream_wait,
        };
        tasks.push(tokio::spawn(remote::follow(follow(), shutdown.clone())));
        tasks.push(tokio::spawn(remote::follow_reported(
            follow(),
            report_names.clone(),
            shutdown.clone(),
        )));
    }
    let router = ops::router(
        ops::Health {
            traffic_addr,
            ingestion,
            mitigation,
            cache: cache.clone(),
            metrics: metrics.clone(),
            status: status.clone(),
            in_flight,
            control: control_for_health,
            report_names,
        },
        shutdown.clone(),
    );
    let ops = tokio::spawn(esper_common::http::serve(
        ops_listener,
        router,
        shutdown.clone(),
        OPS_DRAIN,
    ));

    if !config.upstream_resolve_interval.is_zero() {
        tasks.push(tokio::spawn(resolve_again(
            reloader.clone(),
            config.upstream_resolve_interval,
            shutdown.clone(),
        )));
    }
    if let Some(certs) = &certs {
        tasks.push(tokio::spawn(tls::watch(
            certs.clone(),
            config.tls_reload_interval,
            shutdown.clone(),
        )));
    }
    Ok(ProxyHandle {
        traffic_addr,
        tls_addr,
        reloader,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_every_changed_option_it_does_not_apply() {
        let started = Config {
            upstream: "127.0.0.1:3000".into(),
            ..Config::default()
        };
        let mut next = started.clone();
        next.sample_rate = 0.5;
        next.allow_paths = vec!["/healthz".into()];
        next.mitigation_url = "http://10.0.0.9:8083".into();
        assert!(restart_only_changes(&started, &next).is_empty());
        next.tarpit_max = Duration::from_secs(1);
        next.challenge_ttl = Duration::from_secs(1);
        next.listen = "127.0.0.1:1".parse().unwrap();
        next.tls_certificates = vec![CertConfig {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            hosts: Vec::new(),
        }];
        next.control_url = Some("http://10.0.0.9:8080".into());
        let mut changed = restart_only_changes(&started, &next);
        changed.sort();
        assert_eq!(
            changed,
            [
                "challenge_ttl",
                "control_url (heartbeats and control plane followers)",
                "listen",
                "tarpit_max",
                "tls_certificates (TLS listener)"
            ]
        );
    }

    #[test]
    fn the_reloaded_options_are_options() {
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(Config::default()) else {
            panic!("a config serialises to an object");
        };
        for name in RELOADED {
            assert!(fields.contains_key(*name), "{name}");
        }
    }
}
