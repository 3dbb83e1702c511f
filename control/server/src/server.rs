//! Starting and stopping the control plane: open and migrate the store, make sure a token
//! exists, serve the API, health and metrics listeners, follow the mitigation broker,
//! and shut down on the caller's signal or on `POST /api/v1/admin/shutdown`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use esper_common::config::{ConfigError, Reloaded};
use esper_common::http::{bind, serve, standard_layers};
use esper_common::tls::TlsListener;
use esper_common::{Shutdown, ShutdownTrigger};
use esper_protocol::{IngestionClient, MitigationClient};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::health::ControlHealth;
use crate::heartbeats::Heartbeats;
use crate::metrics::Metrics;
use crate::mirror::{self, Mirror};
use crate::state::{AppState, Inner, Stopper};
use crate::store::{self, ControlStore};
use crate::{Error, api, auth};

/// How often the fleet and policy gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
/// Upper bound handed to the shared server loop; the real drain is the stopper's.
const SERVE_DRAIN_CAP: Duration = Duration::from_secs(24 * 3600);

/// The three listeners of the control plane, bound by the caller (the binary binds the
/// configured addresses; tests and `esper dev` bind 127.0.0.1:0).
#[derive(Debug)]
pub struct Listeners {
    pub api: TcpListener,
    pub health: TcpListener,
    pub metrics: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses, with one clear error per failure.
    pub async fn bind(config: &Config) -> Result<Listeners, Error> {
        Ok(Listeners {
            api: bind("API", config.listen).await?,
            health: bind("health", config.health_listen).await?,
            metrics: bind("metrics", config.metrics_listen).await?,
        })
    }

    /// Three ephemeral loopback listeners.
    pub async fn loopback() -> Result<Listeners, Error> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Ok(Listeners {
            api: bind("API", any).await?,
            health: bind("health", any).await?,
            metrics: bind("metrics", any).await?,
        })
    }
}

fn local(what: &'static str, l: &TcpListener) -> Result<SocketAddr, Error> {
    l.local_addr()
        .map_err(|source| Error::Serve { what, source })
}

/// A running control plane.
#[derive(Debug)]
pub struct Started {
    /// The API token generated at this start (first start with no token configured or
    /// stored); show it to the operator once.
    pub generated_token: Option<String>,
    pub api_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Applies the settings that can change while the server runs (SIGHUP).
    pub reloader: Reloader,
    task: JoinHandle<Result<(), Error>>,
}

/// Applies a configuration read again to the running server: the settings operators
/// rotate, the admin token, the broker token and the API's certificate, take effect at
/// once; the others at the next start.
#[derive(Clone)]
pub struct Reloader {
    state: AppState,
    tls: Option<Arc<arc_swap::ArcSwap<esper_common::tls::ServerConfig>>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Reloader {
    pub async fn apply(&self, config: &Config) -> Reloaded {
        let mut done = Reloaded::default();
        let wanted = config.admin_token.clone().filter(|t| !t.is_empty());
        let change = self.state.admin_change.lock().await;
        if self.state.admin_token.load().as_deref() != wanted.as_ref() {
            // Without it, the stored admin tokens are the only way in: keep it unless
            // there is one (a start would generate one; a running server cannot show it).
            let left = match &wanted {
                Some(_) => Ok(()),
                None => match self.state.store.admin_token_count().await {
                    Ok(0) => Err("no stored admin token would be left to use the API; \
                                   create one first"
                        .to_string()),
                    Ok(_) => Ok(()),
                    Err(e) => Err(format!("cannot count the stored admin tokens: {e}")),
                },
            };
            match left {
                Ok(()) => {
                    self.state.admin_token.store(wanted.map(Arc::new));
                    done.applied.push("admin_token");
                }
                Err(why) => done.kept.push(("admin_token", why)),
            }
        }
        drop(change);
        // Both clients (the mirror's included: it holds a clone) send it from their
        // next request on.
        let broker = config.broker_token.clone();
        let ingestion = self.state.ingestion.token().set(broker.clone());
        let mitigation = self.state.mitigation.token().set(broker);
        done.applied_if(ingestion | mitigation, "broker_token");
        // The mirror follows the new mitigation broker at once; one that does not know
        // its cursor answers with a snapshot.
        done.applied_if(
            self.state.ingestion.endpoints().set(&config.ingestion_url),
            "ingestion_url",
        );
        done.applied_if(
            self.state
                .mitigation
                .endpoints()
                .set(&config.mitigation_url),
            "mitigation_url",
        );
        // Read again whether or not the paths changed: a renewed certificate is
        // usually written over the old files.
        match (&self.tls, config.tls, &config.tls_cert, &config.tls_key) {
            (Some(swap), true, Some(cert), Some(key)) => {
                match esper_common::tls::server_config(cert, key) {
                    Ok(c) => {
                        swap.store(c);
                        done.applied.extend(["tls_cert", "tls_key"]);
                    }
                    Err(e) => {
                        done.kept.push(("tls_cert", e.to_string()));
                        done.kept.push(("tls_key", e.to_string()));
                    }
                }
            }
            (Some(_), _, _, _) | (None, true, _, _) => done
                .kept
                .push(("tls", "turning TLS on or off takes a restart".into())),
            (None, false, _, _) => {}
        }
        done
    }
}

impl Started {
    /// Waits until the server has shut down and drained.
    pub async fn wait(self) -> Result<(), Error> {
        self.task.await.map_err(|e| Error::Task(e.to_string()))?
    }
}

/// Opens the store named in `config` and applies pending migrations (`esper server
/// migrate`); returns the migrations applied now.
pub async fn migrate(config: &Config) -> Result<Vec<String>, Error> {
    config.validate()?;
    let store = store::open(&config.database_url, 1).await?;
    let applied = store.migrate().await;
    store.close().await;
    Ok(applied?)
}

async fn prepare_store(config: &Config) -> Result<Arc<dyn ControlStore>, Error> {
    let store = store::open(&config.database_url, config.database_max_connections).await?;
    if config.migrate {
        for m in store.migrate().await? {
            tracing::info!(migration = %m, "applied a control store migration");
        }
    } else {
        let pending = store.pending_migrations().await?;
        if !pending.is_empty() {
            store.close().await;
            return Err(Error::PendingMigrations(pending.join(", ")));
        }
    }
    Ok(store)
}

/// Starts the control plane on `listeners`; it runs until `shutdown` fires or the API
/// asks it to stop. Store, migration and token errors are returned before anything is
/// served.
pub async fn start(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<Started, Error> {
    start_staged(config, listeners, shutdown.clone(), shutdown, None).await
}

/// [`start`], with the mirror of the mitigation broker's stream stopped by `unfollow`
/// (or with the rest): a process that also runs the broker and stops it first (`esper
/// dev`) stops following it before, as a proxy would, rather than warn that it went.
/// With `host`, a shutdown asked through the API fires it instead of stopping this
/// server at once: the process stops its parts in its order, this one when `shutdown`
/// fires, with the drain the API asked for.
pub async fn start_staged(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
    unfollow: Shutdown,
    host: Option<ShutdownTrigger>,
) -> Result<Started, Error> {
    config.validate()?;
    let store = prepare_store(&config).await?;
    let generated_token = auth::ensure_token(&*store, config.admin_token.as_deref()).await?;
    let metrics = Metrics::new()?;

    // Our own trigger, fired by the caller's signal or by the shutdown endpoint.
    let (trigger, stop) = Shutdown::new();
    let stopper = Arc::new(Stopper::new(trigger, config.shutdown_timeout, host));
    {
        let (stopper, stop) = (stopper.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.wait() => stopper.stop_default(),
                _ = stop.wait() => {}
            }
        });
    }

    let broker_token = config.broker_token.clone();
    let state = AppState(Arc::new(Inner {
        store: store.clone(),
        ingestion: IngestionClient::new(&config.ingestion_url, broker_token.clone()),
        mitigation: MitigationClient::new(&config.mitigation_url, broker_token),
        heartbeats: Heartbeats::new(store.clone(), config.heartbeat_timeout),
        mirror: Arc::new(Mirror::new()),
        metrics: metrics.clone(),
        admin_token: arc_swap::ArcSwapOption::from(config.admin_token.clone().map(Arc::new)),
        admin_change: tokio::sync::Mutex::new(()),
        started: Instant::now(),
        shutdown_timeout: config.shutdown_timeout,
        stopper: stopper.clone(),
        active_cache: Mutex::new(None),
        reported_cache: Mutex::new(None),
        policies_changed: tokio::sync::Notify::new(),
        proxy_config_changed: tokio::sync::Notify::new(),
        challenge_key_changed: tokio::sync::Notify::new(),
        stopping: stop.clone(),
        token_uses: Mutex::new(std::collections::HashMap::new()),
    }));

    // Certificate problems are start-up errors, before anything is served.
    let tls = match (&config.tls, &config.tls_cert, &config.tls_key) {
        (true, Some(cert), Some(key)) => Some(Arc::new(arc_swap::ArcSwap::new(
            esper_common::tls::server_config(cert, key)
                .map_err(|e| ConfigError::invalid("tls_cert", cert.display(), e.to_string()))?,
        ))),
        _ => None,
    };
    let reloader = Reloader {
        state: state.clone(),
        tls: tls.clone(),
    };
    let api_addr = local("API", &listeners.api)?;
    let health_addr = local("health", &listeners.health)?;
    let metrics_addr = local("metrics", &listeners.metrics)?;
    let api_router = api::router(state.clone(), config.body_limit);
    let health_router = standard_layers(
        esper_common::health::routes(
            Arc::new(ControlHealth {
                state: state.clone(),
            }),
            stop.clone(),
        ),
        config.body_limit,
    );
    let metrics_router = standard_layers(
        esper_common::metrics::route(metrics.registry.clone()),
        config.body_limit,
    );

    let follower = {
        let follow = mirror::follow(state.mirror.clone(), state.mitigation.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = follow => {}
                _ = unfollow.wait() => {}
            }
        })
    };
    let gauges = tokio::spawn(refresh_gauges(state.clone(), stop.clone()));
    let pruner = tokio::spawn(prune_decisions(
        state.clone(),
        config.decision_retention,
        stop.clone(),
    ));
    tracing::info!(%api_addr, %health_addr, %metrics_addr, tls = tls.is_some(), store = store.kind(), "control plane serving");

    let task = tokio::spawn(async move {
        let (a, h, m) = tokio::join!(
            async {
                match tls {
                    Some(tls) => {
                        let api = TlsListener::swappable(listeners.api, tls)?;
                        serve_until(api, api_router, &stop, &stopper).await
                    }
                    None => serve_until(listeners.api, api_router, &stop, &stopper).await,
                }
            },
            serve_until(listeners.health, health_router, &stop, &stopper),
            serve_until(listeners.metrics, metrics_router, &stop, &stopper),
        );
        let _ = tokio::join!(follower, gauges, pruner);
        drop(state);
        store.close().await;
        tracing::info!("control plane stopped");
        a.map_err(|source| Error::Serve {
            what: "API",
            source,
        })?;
        h.map_err(|source| Error::Serve {
            what: "health",
            source,
        })?;
        m.map_err(|source| Error::Serve {
            what: "metrics",
            source,
        })?;
        Ok(())
    });
    Ok(Started {
        generated_token,
        api_addr,
        health_addr,
        metrics_addr,
        reloader,
        task,
    })
}

/// Starts the control plane and runs it until shutdown.
pub async fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    start(config, listeners, shutdown).await?.wait().await
}

/// Serves until `stop`, then lets in-flight requests run for the stopper's drain.
async fn serve_until<L: axum::serve::Listener<Addr = SocketAddr>>(
    listener: L,
    router: Router,
    stop: &Shutdown,
    stopper: &Stopper,
) -> std::io::Result<()> {
    let served = serve(listener, router, stop.clone(), SERVE_DRAIN_CAP);
    tokio::select! {
        r = served => r,
        _ = async { stop.wait().await; tokio::time::sleep(stopper.drain()).await } => {
            tracing::warn!(drain = ?stopper.drain(), "requests still running after the drain timeout; closing");
            Ok(())
        }
    }
}

/// Deletes decisions expired longer ago than `retention`, at start and every
/// [`PRUNE_INTERVAL`], until `stop` (0: never). Every instance on one store prunes; the
/// deletes are idempotent.
async fn prune_decisions(state: AppState, retention: Duration, stop: Shutdown) {
    let Ok(retention) = chrono::Duration::from_std(retention) else {
        return;
    };
    if retention.is_zero() {
        return;
    }
    loop {
        if let Some(before) = chrono::Utc::now().checked_sub_signed(retention) {
            match state.store.prune_decisions(before).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(pruned = n, %before, "decisions expired before the retention pruned")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prune the decision log; trying again later")
                }
            }
        }
        if stop.sleep(PRUNE_INTERVAL).await {
            return;
        }
    }
}

/// How often members silent for an hour, or past the most kept, are forgotten (and at
/// start).
const MEMBER_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// How often the decision log is pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

async fn refresh_gauges(state: AppState, stop: Shutdown) {
    let mut pruned: Option<Instant> = None;
    loop {
        let m = &state.metrics;
        if pruned.is_none_or(|at| at.elapsed() >= MEMBER_PRUNE_INTERVAL) {
            pruned = Some(Instant::now());
            if let Err(e) = state.heartbeats.prune().await {
                tracing::warn!(error = %e, "cannot forget silent workers and proxies; trying again later");
            }
        }
        if let Ok(n) = state.heartbeats.workers.alive().await {
            m.workers_alive.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Ok(n) = state.heartbeats.proxies.alive().await {
            m.proxies_alive.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        m.mirrored_mitigations.set(state.mirror.len() as i64);
        if let Ok(policies) = state.store.list_policies().await {
            m.policies_total.set(policies.len() as i64);
            m.policies_enabled
                .set(policies.iter().filter(|p| p.enabled).count() as i64);
        }
        if let Ok(rev) = state.store.revision().await {
            m.policy_revision.set(rev);
        }
        if stop.sleep(GAUGE_INTERVAL).await {
            return;
        }
    }
}
