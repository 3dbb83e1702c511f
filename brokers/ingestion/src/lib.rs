//! The ingestion broker: a bounded, leased work queue of request events behind HTTP.
//!
//! Proxies (and the control plane's analyze API) post batches of events; engine workers
//! claim them with a lease, evaluate them and ack them. Items whose lease expires come
//! back. The queue lives behind [`store::QueueStore`]: in memory, or on Redis Streams shared
//! by every broker instance (`REDIS_URL`).

pub mod api;
pub mod config;
pub mod metrics;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use esper_common::config::{ConfigError, Reloaded};
use esper_common::http::Accepted;
use esper_common::service::Served;
use esper_common::shutdown::Shutdown;
use tokio::net::TcpListener;

pub use api::{AppState, router};
pub use config::{Args, Config};
pub use metrics::Metrics;
pub use store::{MemoryQueue, QueueStore, RedisQueue, StoreError};

/// Why the ingestion broker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("ingestion broker: cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("ingestion broker: {0}")]
    Store(#[from] StoreError),
    #[error("ingestion broker: cannot use the listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error("ingestion broker: server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("ingestion broker: server task ended abnormally: {0}")]
    Task(String),
}

/// Opens the store the config asks for: Redis Streams when `redis_url` is set (Redis
/// must answer now), else the memory queue.
pub async fn open_store(config: &Config) -> Result<Arc<dyn QueueStore>, Error> {
    config.validate()?;
    match &config.redis_url {
        Some(url) => Ok(Arc::new(
            RedisQueue::open(
                url,
                &config.redis_prefix,
                config.max_queue_size,
                config.max_attempts,
            )
            .await?,
        )),
        None => Ok(Arc::new(MemoryQueue::with_max_attempts(
            config.max_queue_size,
            config.max_attempts,
        ))),
    }
}

/// A running broker: its serving task and the store behind it.
pub struct Broker {
    served: Served<Error>,
    store: Arc<dyn QueueStore>,
    accepted: Accepted,
}

/// Applies a configuration read again (SIGHUP) to a running broker: the tokens it
/// accepts change at once; the other settings at the next start.
#[derive(Clone, Debug)]
pub struct Reloader {
    accepted: Accepted,
}

impl Reloader {
    pub fn apply(&self, config: &Config) -> Reloaded {
        let mut done = Reloaded::default();
        self.accepted.reload(
            config.token.as_deref(),
            config.previous_token.as_deref(),
            &mut done,
        );
        done
    }
}

impl Broker {
    /// Applies reloaded configurations to this broker.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            accepted: self.accepted.clone(),
        }
    }

    /// The address the broker answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.served.local_addr()
    }

    /// The queue behind the broker.
    pub fn store(&self) -> &Arc<dyn QueueStore> {
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
    store: Arc<dyn QueueStore>,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<Broker, Error> {
    config.validate()?;
    let addr = listener.local_addr().map_err(Error::Listener)?;
    esper_common::http::warn_if_open(
        "the ingestion broker",
        addr,
        config.token.as_deref(),
        api::TOKEN_SETTING,
    );
    let metrics = Metrics::new()?;
    let state = AppState::new(&config, store.clone(), metrics, shutdown.clone());
    let accepted = state.accepted().clone();
    let app = router(state);
    tracing::info!(
        %addr,
        store = store.kind(),
        max_queue_size = config.max_queue_size,
        auth = config.token.is_some(),
        node = config.node_id.as_deref().unwrap_or("-"),
        "ingestion broker listening"
    );
    let drain = config.shutdown_timeout;
    let served = Served::spawn(addr, async move {
        esper_common::http::serve(listener, app, shutdown, drain)
            .await
            .map_err(Error::Serve)?;
        tracing::info!("ingestion broker stopped");
        Ok(())
    });
    Ok(Broker {
        served,
        store,
        accepted,
    })
}

/// Serves until `shutdown`, then drains in-flight requests and returns.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    start(config, listener, shutdown).await?.wait().await
}
