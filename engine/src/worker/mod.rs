//! The engine worker service: `concurrency` loops that claim events from the ingestion
//! broker, evaluate them, publish mitigations to the mitigation broker and acknowledge;
//! a policy follower; decision log and heartbeats to the control plane; state cleanup;
//! and the ops listener (`/healthz`, `/readyz`, `/healthz/detailed`, `/metrics`).

mod config;
mod control;
mod memory;
mod policies;
mod slot;
mod status;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use esper_common::config::{ConfigError, Reloaded};
use esper_common::{Shutdown, ShutdownTrigger};
use esper_protocol::{Endpoints, IngestionClient, MitigationClient, Token, WorkerHeartbeat};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use config::{
    Args, Config, DEFAULT_BATCH_SIZE, DEFAULT_CLAIM_WAIT, DEFAULT_CONCURRENCY, DEFAULT_CONTROL_URL,
    DEFAULT_DECISION_BUFFER, DEFAULT_EVALUATION_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_INGESTION_URL, DEFAULT_LEASE, DEFAULT_LISTEN, DEFAULT_MITIGATION_URL,
    DEFAULT_POLICY_REFRESH, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_STATE_CACHE_SIZE,
    DEFAULT_STATE_CLEANUP_INTERVAL, DEFAULT_STATE_DATABASE_POOL, DEFAULT_STATE_DATABASE_URL,
    DEFAULT_STATE_KEY_PREFIX, DEFAULT_STATE_REDIS_URL, DEFAULT_STATE_TTL, StateBackendKind,
};
pub use control::ControlClient;
pub use memory::{ByteSize, resident_bytes};
pub use policies::{PolicyFileError, read_policy_file};

use crate::eval::{
    Evaluator, MemoryState, PostgresState, PostgresStateConfig, Reading, RedisState,
    RedisStateConfig, StateBackend, StateError,
};
use control::DecisionLog;
use policies::{Follower, PolicyHandle, Source};
use status::{Metrics, Status, WorkerHealth};

/// Largest request body the ops listener accepts (it serves only GETs).
const OPS_BODY_LIMIT: usize = 64 * 1024;
/// How often utilization is computed.
const UTILIZATION_INTERVAL: Duration = Duration::from_secs(5);
/// How often a worker over shared state reads the state's clock.
const CLOCK_SYNC_INTERVAL: Duration = Duration::from_secs(30);

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Policies(#[from] PolicyFileError),
    #[error("ops listener: {0}")]
    Serve(std::io::Error),
    #[error("worker task failed: {0}")]
    Task(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Opens the configured state backend (shared backends are reached now, so a wrong URL
/// is a start-up error).
pub async fn open_state(config: &Config) -> Result<Arc<dyn StateBackend>, WorkerError> {
    Ok(match config.state_backend {
        StateBackendKind::Memory => {
            Arc::new(MemoryState::new(config.state_ttl, config.state_cache_size))
        }
        StateBackendKind::Redis => Arc::new(
            RedisState::connect(RedisStateConfig {
                url: config.state_redis_url.clone(),
                prefix: config.state_key_prefix.clone(),
                ttl: config.state_ttl,
                lease: config.lease,
                capacity: config.state_cache_size,
            })
            .await?,
        ),
        StateBackendKind::Postgres => Arc::new(
            PostgresState::connect(PostgresStateConfig {
                url: config.state_database_url.clone(),
                pool_size: config.state_database_pool,
                ttl: config.state_ttl,
                lease: config.lease,
                capacity: config.state_cache_size,
            })
            .await?,
        ),
    })
}

/// Where a worker connects and with which tokens: a reload (SIGHUP) replaces them while
/// it runs, and every client uses the new ones from its next request on.
#[derive(Clone, Debug)]
pub struct Connections {
    /// Sent to both brokers.
    pub broker_token: Token,
    /// Sent to the control plane.
    pub control_token: Token,
    pub ingestion: Endpoints,
    pub mitigation: Endpoints,
    /// Empty when the worker runs without a control plane (policies from a file).
    pub control: Endpoints,
}

impl Connections {
    pub fn new(config: &Config) -> Connections {
        Connections {
            broker_token: Token::new(config.broker_token.clone()),
            control_token: Token::new(config.control_token.clone()),
            ingestion: Endpoints::new(&config.ingestion_url),
            mitigation: Endpoints::new(&config.mitigation_url),
            control: Endpoints::new(&config.control_url),
        }
    }

    /// Takes the tokens and service URLs of a configuration read again.
    pub fn apply(&self, config: &Config) -> Reloaded {
        let mut done = Reloaded::default();
        done.applied_if(
            self.broker_token.set(config.broker_token.clone()),
            "broker_token",
        );
        done.applied_if(
            self.control_token.set(config.control_token.clone()),
            "control_token",
        );
        done.applied_if(self.ingestion.set(&config.ingestion_url), "ingestion_url");
        done.applied_if(
            self.mitigation.set(&config.mitigation_url),
            "mitigation_url",
        );
        let had_control = !self.control.given().is_empty();
        let wants_control = !config.control_url.is_empty();
        if had_control != wants_control {
            done.kept.push((
                "control_url",
                if had_control {
                    "the worker follows the control plane's policies; a restart switches \
                     it to policies_file"
                } else {
                    "the worker started with policies_file and no control plane; a \
                     restart connects it"
                }
                .to_string(),
            ));
        } else {
            done.applied_if(self.control.set(&config.control_url), "control_url");
        }
        done
    }
}

/// Runs the worker until `shutdown`: stops claiming, finishes the batches in hand
/// (publish and ack, within `shutdown_timeout`), flushes decisions, and returns.
pub async fn run(
    config: Config,
    ops_listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), WorkerError> {
    let connections = Connections::new(&config);
    run_with(config, ops_listener, shutdown, connections).await
}

/// [`run`], connecting as `connections` say, which the caller may change while the
/// worker runs.
pub async fn run_with(
    config: Config,
    ops_listener: TcpListener,
    shutdown: Shutdown,
    connections: Connections,
) -> Result<(), WorkerError> {
    config.validate()?;
    // The caller's shutdown, or a drain asked through the control plane: one signal.
    let (drain, own) = Shutdown::new();
    let drain = Arc::new(drain);
    {
        let drain = drain.clone();
        let outer = shutdown;
        tokio::spawn(async move {
            outer.wait().await;
            drain.trigger();
        });
    }
    let shutdown = own;
    let worker_id = config.effective_worker_id();
    let started_at = Utc::now();
    let registry = Registry::new();
    let metrics = Metrics::new(&registry);
    let status = Arc::new(Status::default());
    let state = open_state(&config).await?;
    let evaluator = Evaluator::new(state.clone(), &worker_id, &registry);
    let warned = sync_clock(&evaluator, &metrics, &status, None).await;
    let handle = Arc::new(PolicyHandle::default());
    let pool = config.connection_pool_size as usize;
    let control = match &config.ca_cert {
        _ if config.control_url.is_empty() => None,
        ca => Some(
            ControlClient::for_worker(
                connections.control.clone(),
                connections.control_token.clone(),
                ca.as_deref(),
                pool,
            )
            .map_err(|e| {
                let shown = ca
                    .as_ref()
                    .map_or(String::new(), |c| c.display().to_string());
                ConfigError::invalid("ca_cert", shown, e)
            })?,
        ),
    };

    // A policy file must be usable at start-up: say so now rather than idle unready.
    let source = match &config.policies_file {
        Some(path) => {
            read_policy_file(path)?;
            Source::File {
                path: path.clone(),
                last: None,
                revision: 0,
            }
        }
        None => match &control {
            Some(c) => Source::Control(c.clone()),
            None => {
                return Err(ConfigError::invalid(
                    "control_url",
                    "",
                    "without a control plane, set policies_file (--policies FILE)",
                )
                .into());
            }
        },
    };
    let mut follower = Follower {
        source,
        revoked_after: None,
        revocations_failing: false,
        handle: handle.clone(),
        evaluator: evaluator.clone(),
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
    };
    follower.refresh().await;

    let log = control.as_ref().map(|_| {
        Arc::new(DecisionLog::new(
            evaluator.state().clone(),
            worker_id.clone(),
            config.decision_buffer,
            metrics.clone(),
        ))
    });
    let memory = match config.memory_limit {
        Some(limit) => Some(
            memory::MemoryGuard::new(limit, &registry)
                .map_err(|e| WorkerError::Task(format!("metrics: {e}")))?,
        ),
        None => None,
    };
    let shared = Arc::new(slot::Shared {
        worker_id: worker_id.clone(),
        batch_size: config.batch_size as usize,
        lease: config.lease,
        claim_wait: config.claim_wait,
        evaluation_timeout: config.evaluation_timeout,
        ingestion: IngestionClient::with_pool_size(&config.ingestion_url, None, Some(pool))
            .with_token(connections.broker_token.clone())
            .with_endpoints(connections.ingestion.clone()),
        mitigation: MitigationClient::with_pool_size(&config.mitigation_url, None, Some(pool))
            .with_token(connections.broker_token.clone())
            .with_endpoints(connections.mitigation.clone()),
        evaluator: evaluator.clone(),
        policies: handle.clone(),
        log: log.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
        memory: memory.clone(),
    });

    let health = Arc::new(WorkerHealth {
        status: status.clone(),
        policies: handle.clone(),
        state: state.clone(),
        claim_fresh: (config.claim_wait * 3).max(Duration::from_secs(15)),
        has_control: control.is_some(),
        memory: memory.clone(),
    });
    let router = esper_common::health::routes(health, shutdown.clone())
        .merge(esper_common::metrics::route(registry.clone()));
    let router = esper_common::http::standard_layers(router, OPS_BODY_LIMIT);
    let addr = ops_listener.local_addr().ok();
    let ops_shutdown = shutdown.clone();
    let ops = tokio::spawn(async move {
        esper_common::http::serve(ops_listener, router, ops_shutdown, Duration::from_secs(5)).await
    });
    let io_threads = tokio::runtime::Handle::current().metrics().num_workers();
    metrics.io_threads.set(io_threads as i64);
    tracing::info!(
        worker_id = %worker_id,
        ops = ?addr,
        concurrency = config.concurrency,
        io_threads,
        batch_size = config.batch_size,
        state_backend = state.name(),
        ingestion = %config.ingestion_url,
        mitigation = %config.mitigation_url,
        "engine worker started"
    );

    let mut background = JoinSet::new();
    background.spawn(follower.run(config.policy_refresh));
    background.spawn(cleanup_loop(
        evaluator.clone(),
        metrics.clone(),
        status.clone(),
        config.state_cleanup_interval,
        shutdown.clone(),
    ));
    background.spawn(clock_loop(
        evaluator.clone(),
        metrics.clone(),
        status.clone(),
        warned,
        shutdown.clone(),
    ));
    if let Some(guard) = &memory {
        background.spawn(guard.clone().watch(shutdown.clone()));
    }
    background.spawn(utilization_loop(
        status.clone(),
        metrics.clone(),
        config.concurrency,
        shutdown.clone(),
    ));
    // The outbox is delivered until the last batch is committed, not until shutdown
    // begins: batches in hand still add to it (the memory state's would be lost).
    let (slots_done, log_stop) = Shutdown::new();
    if let (Some(client), Some(log)) = (&control, &log) {
        background.spawn(log.clone().run(
            client.clone(),
            status.clone(),
            log_stop,
            config.shutdown_timeout.min(Duration::from_secs(10)),
        ));
        let beat = Heartbeat {
            client: client.clone(),
            worker_id: worker_id.clone(),
            config: config.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            policies: handle.clone(),
            started_at,
            drain: drain.clone(),
        };
        background.spawn(beat.run(config.heartbeat_interval, shutdown.clone()));
    }

    let mut slots = JoinSet::new();
    for _ in 0..config.concurrency {
        slots.spawn(slot::run(shared.clone(), shutdown.clone()));
    }
    let mut failure = None;
    let drain = async {
        shutdown.wait().await;
        tokio::time::sleep(config.shutdown_timeout).await;
    };
    tokio::pin!(drain);
    loop {
        tokio::select! {
            joined = slots.join_next() => match joined {
                None => break,
                Some(Err(e)) => failure = Some(WorkerError::Task(e.to_string())),
                Some(Ok(())) => {}
            },
            _ = &mut drain => {
                tracing::warn!(timeout = ?config.shutdown_timeout, "batches still in hand after the shutdown timeout; they will be redelivered");
                slots.abort_all();
                break;
            }
        }
    }
    slots_done.trigger();
    while let Some(joined) = background.join_next().await {
        if let Err(e) = joined {
            failure.get_or_insert(WorkerError::Task(e.to_string()));
        }
    }
    match ops.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            failure.get_or_insert(WorkerError::Serve(e));
        }
        Err(e) => {
            failure.get_or_insert(WorkerError::Task(e.to_string()));
        }
    }
    tracing::info!(worker_id = %worker_id, "engine worker stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Removes idle entities and expired event ids every `every`.
async fn cleanup_loop(
    evaluator: Evaluator,
    metrics: Metrics,
    status: Arc<Status>,
    every: Duration,
    shutdown: Shutdown,
) {
    let state = evaluator.state();
    while !shutdown.sleep(every).await {
        let now = evaluator.clock().now().timestamp_millis();
        match state.cleanup(now).await {
            Ok(r) => {
                status.state_check.ok();
                metrics
                    .state_cleaned
                    .inc_by((r.entities + r.event_ids) as u64);
                tracing::debug!(
                    entities = r.entities,
                    event_ids = r.event_ids,
                    "state cleaned"
                );
            }
            Err(e) => {
                status.state_check.failed(&e);
                tracing::warn!(error = %e, "state cleanup failed");
            }
        }
        metrics.observe_state(state.as_ref());
    }
}

/// Reads the shared state's clock again every [`CLOCK_SYNC_INTERVAL`]: clocks drift, or
/// are stepped, while the worker runs.
async fn clock_loop(
    evaluator: Evaluator,
    metrics: Metrics,
    status: Arc<Status>,
    mut warned: Option<i64>,
    shutdown: Shutdown,
) {
    while !shutdown.sleep(CLOCK_SYNC_INTERVAL).await {
        warned = sync_clock(&evaluator, &metrics, &status, warned).await;
    }
}

/// An offset past this is logged: the worker keeps to the store's clock, but one of the
/// two hosts is off, and both matter (proxies and brokers judge the decisions' times by
/// their own clocks, which the store's should match).
const CLOCK_WARN_MS: i64 = 1_000;

/// Reads the store's clock; returns the offset last warned about, so a warning is given
/// when the offset first passes the bound and again when it has moved by as much since,
/// not at every reading.
async fn sync_clock(
    evaluator: &Evaluator,
    metrics: &Metrics,
    status: &Status,
    warned: Option<i64>,
) -> Option<i64> {
    let reading = evaluator.clock().sync(evaluator.state().as_ref()).await;
    // The reading doubles as a check of the shared state while no batches come.
    match &reading {
        Ok(_) => status.state_check.ok(),
        Err(e) => status.state_check.failed(e),
    }
    match reading {
        Ok(Reading::Offset(offset)) => {
            metrics.clock_offset.set(offset as f64 / 1000.0);
            if offset.abs() < CLOCK_WARN_MS {
                return None;
            }
            if warned.is_some_and(|w| (offset - w).abs() < CLOCK_WARN_MS) {
                return warned;
            }
            tracing::warn!(
                offset_ms = offset,
                state_backend = evaluator.state().name(),
                "this host's clock and the shared state's disagree; evaluating by the \
                 state's (check time sync on both hosts)"
            );
            Some(offset)
        }
        Ok(Reading::Local) => None,
        Ok(Reading::Slow(round_trip)) => {
            tracing::debug!(
                ?round_trip,
                "the shared state's clock answered too slowly to use"
            );
            warned
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the shared state's clock");
            warned
        }
    }
}

/// Turns the loops' busy time into `esper_worker_utilization_ratio`.
async fn utilization_loop(
    status: Arc<Status>,
    metrics: Metrics,
    concurrency: u32,
    shutdown: Shutdown,
) {
    let mut last = Instant::now();
    let mut last_busy = status.busy_ns.load(Ordering::Relaxed);
    while !shutdown.sleep(UTILIZATION_INTERVAL).await {
        let busy = status.busy_ns.load(Ordering::Relaxed);
        let elapsed = last.elapsed().as_nanos() as f64 * f64::from(concurrency.max(1));
        let ratio = (busy.saturating_sub(last_busy) as f64 / elapsed.max(1.0)).clamp(0.0, 1.0);
        metrics.utilization.set(ratio);
        last = Instant::now();
        last_busy = busy;
    }
}

/// The periodic `POST /api/v1/workers/heartbeat`, best effort.
/// How long a stop waits for a heartbeat already sent before sending its last.
const IN_FLIGHT_BEAT: Duration = Duration::from_secs(1);

struct Heartbeat {
    client: ControlClient,
    worker_id: String,
    config: Config,
    status: Arc<Status>,
    metrics: Metrics,
    policies: Arc<PolicyHandle>,
    started_at: chrono::DateTime<Utc>,
    /// Stops the worker as a signal would, when the control plane asks it to drain.
    drain: Arc<ShutdownTrigger>,
}

impl Heartbeat {
    fn beat(&self, state: &str) -> WorkerHeartbeat {
        WorkerHeartbeat {
            worker_id: self.worker_id.clone(),
            concurrency: self.config.concurrency,
            batch_size: self.config.batch_size,
            state_backend: self.config.state_backend.to_string(),
            policies_revision: self.policies.current().map_or(0, |p| p.revision),
            events_total: self.status.events_total.load(Ordering::Relaxed),
            decisions_total: self.status.decisions_total.load(Ordering::Relaxed),
            utilization: self.metrics.utilization.get(),
            state: state.to_string(),
            started_at: self.started_at,
        }
    }

    async fn send(&self, state: &str) {
        match self.client.heartbeat(&self.beat(state)).await {
            Ok(drain) => {
                self.status.control.ok();
                if drain {
                    tracing::info!("the control plane asks this worker to drain; stopping");
                    self.drain.trigger();
                }
            }
            Err(e) => {
                self.metrics.control_errors.inc();
                self.status.control.failed(&e);
                tracing::debug!(error = %e, "heartbeat failed");
            }
        }
    }

    async fn run(self, every: Duration, shutdown: Shutdown) {
        loop {
            let beat = self.send("running");
            tokio::pin!(beat);
            tokio::select! {
                biased;
                _ = shutdown.wait() => {
                    // A beat on the wire is let land first, or it could be recorded after
                    // the `draining` one and list this worker as running again; but only
                    // briefly, so a control plane that hangs does not hold up the stop.
                    let _ = tokio::time::timeout(IN_FLIGHT_BEAT, &mut beat).await;
                    break;
                }
                _ = &mut beat => {}
            }
            if shutdown.sleep(every).await {
                break;
            }
        }
        // Tell the fleet view this worker is going away; short, best effort.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.send("draining")).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_moves_the_connections_but_not_to_or_from_a_control_plane() {
        let started = Config {
            control_url: String::new(),
            ..Config::default()
        };
        let connections = Connections::new(&started);
        let moved = Config {
            ingestion_url: "http://10.0.0.1:8082,http://10.0.0.2:8082".into(),
            control_url: "http://10.0.0.3:8080".into(),
            ..started.clone()
        };
        let done = connections.apply(&moved);
        assert_eq!(done.applied, ["ingestion_url"]);
        assert_eq!(done.kept.len(), 1);
        assert_eq!(done.kept[0].0, "control_url");
        assert_eq!(
            connections.ingestion.load().urls(),
            ["http://10.0.0.1:8082", "http://10.0.0.2:8082"]
        );
        assert!(connections.control.given().is_empty());
        assert!(connections.apply(&moved).applied.is_empty());

        let with_control = Connections::new(&Config::default());
        let done = with_control.apply(&Config {
            control_url: "http://10.0.0.3:8080".into(),
            ..Config::default()
        });
        assert_eq!(done.applied, ["control_url"]);
        assert_eq!(with_control.control.given(), "http://10.0.0.3:8080");
    }
}
