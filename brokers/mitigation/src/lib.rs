//! The mitigation broker: active mitigations, per-entity lookup and a cursor-based delta
//! stream.
//!
//! Engine workers (and the control plane, for manual bans) publish mitigations; proxies
//! follow the delta stream to keep their caches fresh; operators list, look up, revoke
//! and clear. State lives behind [`store::MitigationStore`]: in memory, or in Redis
//! shared by every broker instance (`REDIS_URL`).

pub mod api;
pub mod config;
pub mod metrics;
pub mod persist;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use esper_common::config::{ConfigError, Reloaded};
use esper_common::http::Accepted;
use esper_common::service::Served;
use esper_common::shutdown::Shutdown;
use tokio::net::TcpListener;

pub use api::{AppState, router};
pub use config::{Args, Config};
pub use metrics::Metrics;
pub use persist::Persistence;
pub use store::{
    Claim, Journal, LogAppend, Logged, MemoryMitigations, MitigationStore, RedisMitigations,
    RestorePage, StoreError, Write,
};

/// Why the mitigation broker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("mitigation broker: cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("mitigation broker: {0}")]
    Store(#[from] StoreError),
    #[error("mitigation broker: cannot use the listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error("mitigation broker: server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("mitigation broker: server task ended abnormally: {0}")]
    Task(String),
}

/// Opens the store the config asks for: Redis when `redis_url` is set (Redis must
/// answer now), else memory.
pub async fn open_store(config: &Config) -> Result<Arc<dyn MitigationStore>, Error> {
    config.validate()?;
    match &config.redis_url {
        Some(url) => Ok(Arc::new(
            RedisMitigations::open(url, &config.redis_prefix, config.stream_retention).await?,
        )),
        None => Ok(Arc::new(MemoryMitigations::new(config.stream_retention))),
    }
}

/// A running broker: its serving task and the store behind it.
pub struct Broker {
    served: Served<Error>,
    store: Arc<dyn MitigationStore>,
    reloader: Reloader,
}

/// Applies a configuration read again (SIGHUP) to a running broker: the tokens it
/// accepts, and the control plane its durable copy goes to with the token it sends,
/// change at once; the other settings at the next start.
#[derive(Clone, Debug)]
pub struct Reloader {
    accepted: Accepted,
    /// The decision log client's with persistence on; else one nothing sends, kept to
    /// tell a change.
    control_token: esper_protocol::Token,
    control: esper_protocol::Endpoints,
}

impl Reloader {
    pub fn apply(&self, config: &Config) -> Reloaded {
        let mut done = Reloaded::default();
        self.accepted.reload(
            config.token.as_deref(),
            config.previous_token.as_deref(),
            &mut done,
        );
        done.applied_if(
            self.control_token.set(config.control_token.clone()),
            "control_token",
        );
        done.applied_if(self.control.set(&config.control_url), "control_url");
        done
    }
}

impl Broker {
    /// Applies reloaded configurations to this broker.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The address the broker answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.served.local_addr()
    }

    /// The store behind the broker.
    pub fn store(&self) -> &Arc<dyn MitigationStore> {
        &self.store
    }

    /// Waits until the broker has stopped (after the shutdown signal and the drain).
    pub async fn wait(self) -> Result<(), Error> {
        self.served.wait(Error::Task).await
    }
}

/// Validates `config`, opens its store and serves on `listener` until `shutdown`.
pub async fn start(
    config: Config,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<Broker, Error> {
    let store = open_store(&config).await?;
    start_with_store(config, store, listener, shutdown).await
}

/// Like [`start`], over a store the caller opened (tests run the API over any store).
pub async fn start_with_store(
    config: Config,
    store: Arc<dyn MitigationStore>,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<Broker, Error> {
    config.validate()?;
    let addr = listener.local_addr().map_err(Error::Listener)?;
    esper_common::http::warn_if_open(
        "the mitigation broker",
        addr,
        config.token.as_deref(),
        api::TOKEN_SETTING,
    );
    let metrics = Metrics::new()?;
    // A first look at the stream gives a store that never had one its generation now,
    // so that one going missing later means the store lost its data (a restore is then
    // due), not that it was never used.
    store.changes(None, 1).await?;
    let persistence = if config.persistence_enabled {
        let restore = persist::store_is_empty(&*store).await?;
        let journal = store.clone().journal();
        let p = Arc::new(Persistence::new(&config, metrics.clone(), journal));
        Some((p, restore))
    } else {
        None
    };
    let state = AppState::new(
        &config,
        store.clone(),
        metrics.clone(),
        shutdown.clone(),
        persistence.as_ref().map(|(p, _)| p.clone()),
    );
    let reloader = Reloader {
        accepted: state.accepted().clone(),
        control_token: match &persistence {
            Some((p, _)) => p.control_token().clone(),
            None => esper_protocol::Token::new(config.control_token.clone()),
        },
        control: match &persistence {
            Some((p, _)) => p.control_endpoints().clone(),
            None => esper_protocol::Endpoints::new(&config.control_url),
        },
    };
    let app = router(state);
    tracing::info!(
        %addr,
        store = store.kind(),
        cache_ttl = ?config.cache_ttl,
        auth = config.token.is_some(),
        node = config.node_id.as_deref().unwrap_or("-"),
        persistence = config.persistence_enabled,
        "mitigation broker listening"
    );
    // The outbox is delivered until the API has drained, so the last flush holds every
    // write the broker accepted: its own stop signal fires after serving ends.
    let (persist_stop, persist_shutdown) = Shutdown::new();
    let persister = persistence.map(|(p, restore)| {
        tokio::spawn(persist::run(
            p,
            store.clone(),
            config.cache_ttl,
            restore,
            persist_shutdown,
        ))
    });
    let sweeper = tokio::spawn(sweep_expired(
        store.clone(),
        metrics,
        shutdown.clone(),
        config.sweep_interval,
    ));
    let drain = config.shutdown_timeout;
    let served = Served::spawn(addr, async move {
        let outcome = esper_common::http::serve(listener, app, shutdown, drain).await;
        // The sweeper stops on the same shutdown signal; if serving failed before it,
        // stop the sweeper ourselves. Either way nothing outlives the broker.
        if outcome.is_err() {
            sweeper.abort();
            if let Some(p) = &persister {
                p.abort();
            }
        }
        if let Err(e) = sweeper.await
            && e.is_panic()
        {
            tracing::warn!(error = %e, "expiry sweeper panicked");
        }
        persist_stop.trigger();
        if let Some(p) = persister
            && let Err(e) = p.await
            && e.is_panic()
        {
            tracing::warn!(error = %e, "persistence task panicked");
        }
        outcome.map_err(Error::Serve)?;
        tracing::info!("mitigation broker stopped");
        Ok(())
    });
    Ok(Broker {
        served,
        store,
        reloader,
    })
}

/// Serves until `shutdown`, then drains in-flight requests and returns.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    start(config, listener, shutdown).await?.wait().await
}

/// Drops expired mitigations every `interval` and keeps the active gauges current.
async fn sweep_expired(
    store: Arc<dyn MitigationStore>,
    metrics: Metrics,
    shutdown: Shutdown,
    interval: Duration,
) {
    while !shutdown.sleep(interval).await {
        match store.sweep().await {
            Ok(n) => metrics.expired.inc_by(n as u64),
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
        if let Ok(counts) = store.counts().await {
            metrics.observe_counts(&counts);
        }
    }
}
