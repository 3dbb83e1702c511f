//! The ingestion broker's HTTP API: batch ingest with backpressure, claim with a lease
//! (long-poll), ack, queue status, pause/resume, item inspection and purge, plus health
//! and metrics on the same listener.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use esper_common::health::{self, ComponentHealth, HealthCheck, HealthReport};
use esper_common::http::{
    Accepted, ApiError, Json, Path, Query, loopback_unless_token, method_not_allowed,
    standard_layers, with_bearer,
};
use esper_common::shutdown::Shutdown;
use esper_protocol::ingestion::{
    AckRequest, AckResponse, ClaimRequest, ClaimResponse, IngestRequest, IngestResponse, ItemInfo,
    ItemList, ItemState, PurgeResponse, QueueStatus,
};
use serde::Deserialize;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::{ClaimSpec, Enqueued, QueueStore, Refusal, StoreError};

/// Most items one claim may ask for.
pub const MAX_CLAIM_ITEMS: usize = 10_000;
/// Shortest lease a claim may ask for.
pub const MIN_LEASE: Duration = Duration::from_millis(10);
/// Most item ids one ack may carry.
pub const MAX_ACK_IDS: usize = 100_000;
const MAX_CONSUMER_LEN: usize = 128;
const DEFAULT_ITEMS_LIMIT: usize = 100;
const MAX_ITEMS_LIMIT: usize = 10_000;
const RETRY_AFTER_FULL_SECS: u64 = 1;
const RETRY_AFTER_PAUSED_SECS: u64 = 5;
const RETRY_AFTER_STORE_SECS: u64 = 1;
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn QueueStore>,
    metrics: Metrics,
    shutdown: Shutdown,
    accepted: Accepted,
    body_limit: usize,
    batch_timeout: Duration,
    max_claim_wait: Duration,
    max_lease: Duration,
}

impl AppState {
    /// The state for `router`, from a validated config.
    pub fn new(
        config: &Config,
        store: Arc<dyn QueueStore>,
        metrics: Metrics,
        shutdown: Shutdown,
    ) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                store,
                metrics,
                shutdown,
                accepted: Accepted::new(config.token.as_deref(), config.previous_token.as_deref()),
                body_limit: config.max_body_bytes,
                batch_timeout: config.batch_timeout,
                max_claim_wait: config.max_claim_wait,
                max_lease: config.max_lease,
            }),
        }
    }

    /// The queue behind the API.
    pub fn store(&self) -> &Arc<dyn QueueStore> {
        &self.inner.store
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The tokens the API accepts; a reload replaces them.
    pub fn accepted(&self) -> &Accepted {
        &self.inner.accepted
    }
}

/// The environment variable of the broker token, named in refusals and warnings.
pub const TOKEN_SETTING: &str = "ESPER_BROKER_TOKEN";

/// The whole service: `/api/*` (behind the bearer token when one is configured), the
/// health endpoints and `/metrics` (always open), with the standard layers.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/events", post(ingest))
        .route("/api/queue/claim", post(claim))
        .route("/api/queue/ack", post(ack))
        .route("/api/queue/status", get(status))
        .route("/api/queue/pause", post(pause))
        .route("/api/queue/resume", post(resume))
        .route("/api/queue/items", get(items))
        .route("/api/queue/items/{item_id}", get(item))
        .with_state(state.clone());
    let admin = Router::new()
        .route("/api/queue/purge", post(purge))
        .with_state(state.clone());
    let admin = loopback_unless_token(admin, state.inner.accepted.clone(), TOKEN_SETTING);
    let api = with_bearer(api.merge(admin), state.inner.accepted.clone());
    let ops = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    let check = Arc::new(StoreHealth {
        store: state.inner.store.clone(),
    });
    let app = api
        .merge(ops)
        .merge(health::routes(check, state.inner.shutdown.clone()))
        .method_not_allowed_fallback(method_not_allowed);
    let app = standard_layers(app, state.inner.body_limit);
    state.inner.metrics.http.layer(app)
}

/// Store failures are logged once per period: down under load, the store would
/// otherwise write an error line per request.
static STORE_ERRORS: esper_common::throttle::Throttled =
    esper_common::throttle::Throttled::new(std::time::Duration::from_secs(10));

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match STORE_ERRORS.admit() {
            Some(0) => tracing::error!(error = %e, "queue store call failed"),
            Some(more) => {
                tracing::error!(error = %e, more, "queue store call failed (and `more` since the last line)")
            }
            None => tracing::debug!(error = %e, "queue store call failed"),
        }
        // The store's own words (Redis out of memory, or not answering) tell the
        // caller's operator what to fix.
        ApiError::Unavailable {
            code: "store_unavailable",
            message: match &e {
                StoreError::Unavailable(reason) => {
                    format!("the queue store is unavailable ({reason}); retry later")
                }
            },
            retry_after: Some(RETRY_AFTER_STORE_SECS),
        }
    }
}

fn refusal(reason: Refusal, batch: usize, held: u64, capacity: u64) -> ApiError {
    match reason {
        Refusal::Paused => ApiError::Unavailable {
            code: esper_protocol::error::refusal::QUEUE_PAUSED,
            message: format!("ingestion is paused; the batch of {batch} events was not queued"),
            retry_after: Some(RETRY_AFTER_PAUSED_SECS),
        },
        Refusal::Full => ApiError::Unavailable {
            code: esper_protocol::error::refusal::QUEUE_FULL,
            message: format!(
                "ingestion queue is full ({held} of {capacity} items); the batch of {batch} events was not queued"
            ),
            retry_after: Some(RETRY_AFTER_FULL_SECS),
        },
        Refusal::TooLarge => ApiError::bad_request(
            "batch_too_large",
            format!(
                "a batch of {batch} events can never fit a queue of {capacity} items; send smaller batches"
            ),
        ),
    }
}

async fn ingest(
    State(s): State<AppState>,
    Json(mut req): Json<IngestRequest>,
) -> Result<(StatusCode, Json<IngestResponse>), ApiError> {
    let n = req.events.len();
    // A reporter on a dual-stack socket sees IPv4 clients as `::ffff:a.b.c.d`; workers
    // key them (and their networks) as the IPv4 clients they are.
    for e in &mut req.events {
        e.client_ip = e.client_ip.to_canonical();
    }
    if let Some((i, why)) = req
        .events
        .iter()
        .enumerate()
        .find_map(|(i, e)| e.check().err().map(|why| (i, why)))
    {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("events[{i}]: {why}"),
        ));
    }
    match s.inner.store.enqueue(req.events).await? {
        Enqueued::Accepted { depth } => {
            s.inner.metrics.ingested.inc_by(n as u64);
            Ok((
                StatusCode::ACCEPTED,
                Json(IngestResponse { accepted: n, depth }),
            ))
        }
        Enqueued::Refused {
            reason,
            held,
            capacity,
        } => {
            s.inner
                .metrics
                .rejected
                .with_label_values(&[reason.label()])
                .inc_by(n as u64);
            tracing::debug!(events = n, reason = reason.label(), "batch refused");
            Err(refusal(reason, n, held, capacity))
        }
    }
}

fn check_consumer(consumer: &str) -> Result<(), ApiError> {
    if consumer.trim().is_empty()
        || consumer.chars().count() > MAX_CONSUMER_LEN
        || consumer.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "invalid_consumer",
            format!("consumer must be 1 to {MAX_CONSUMER_LEN} printable characters"),
        ));
    }
    Ok(())
}

fn claim_spec(s: &Inner, req: ClaimRequest) -> Result<ClaimSpec, ApiError> {
    check_consumer(&req.consumer)?;
    if req.max == 0 || req.max > MAX_CLAIM_ITEMS {
        return Err(ApiError::bad_request(
            "invalid_claim",
            format!(
                "max must be between 1 and {MAX_CLAIM_ITEMS}, got {}",
                req.max
            ),
        ));
    }
    let lease = Duration::from_millis(req.lease_ms);
    if lease < MIN_LEASE || lease > s.max_lease {
        return Err(ApiError::bad_request(
            "invalid_claim",
            format!(
                "lease_ms must be between {} and {} (max_lease), got {}",
                MIN_LEASE.as_millis(),
                s.max_lease.as_millis(),
                req.lease_ms
            ),
        ));
    }
    Ok(ClaimSpec {
        consumer: req.consumer,
        max: req.max,
        lease,
        wait: Duration::from_millis(req.wait_ms).min(s.max_claim_wait),
        linger: s.batch_timeout,
    })
}

async fn claim(
    State(s): State<AppState>,
    Json(req): Json<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    let spec = claim_spec(&s.inner, req)?;
    let shutdown = s.inner.shutdown.clone();
    // On shutdown a waiting claim answers at once (empty) so the drain is not held up.
    let items = tokio::select! {
        biased;
        r = s.inner.store.claim(&spec) => r?,
        _ = shutdown.wait() => Vec::new(),
    };
    s.inner.metrics.claimed.inc_by(items.len() as u64);
    Ok(Json(ClaimResponse { items }))
}

async fn ack(
    State(s): State<AppState>,
    Json(req): Json<AckRequest>,
) -> Result<Json<AckResponse>, ApiError> {
    check_consumer(&req.consumer)?;
    if req.item_ids.len() > MAX_ACK_IDS {
        return Err(ApiError::bad_request(
            "invalid_ack",
            format!(
                "at most {MAX_ACK_IDS} item ids per ack, got {}",
                req.item_ids.len()
            ),
        ));
    }
    let acked = s.inner.store.ack(&req.consumer, &req.item_ids).await?;
    s.inner.metrics.acked.inc_by(acked as u64);
    Ok(Json(AckResponse { acked }))
}

async fn current_status(s: &AppState) -> Result<QueueStatus, ApiError> {
    let status = s.inner.store.status().await?;
    s.inner.metrics.observe(&status);
    Ok(status)
}

async fn status(State(s): State<AppState>) -> Result<Json<QueueStatus>, ApiError> {
    current_status(&s).await.map(Json)
}

async fn pause(State(s): State<AppState>) -> Result<Json<QueueStatus>, ApiError> {
    s.inner.store.set_paused(true).await?;
    tracing::info!("ingest paused; claims continue");
    current_status(&s).await.map(Json)
}

async fn resume(State(s): State<AppState>) -> Result<Json<QueueStatus>, ApiError> {
    s.inner.store.set_paused(false).await?;
    tracing::info!("ingest resumed");
    current_status(&s).await.map(Json)
}

/// `GET /api/queue/items` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemsQuery {
    limit: Option<usize>,
    state: Option<ItemState>,
}

async fn items(
    State(s): State<AppState>,
    Query(q): Query<ItemsQuery>,
) -> Result<Json<ItemList>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_ITEMS_LIMIT);
    if limit == 0 || limit > MAX_ITEMS_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_ITEMS_LIMIT}, got {limit}"),
        ));
    }
    let items = s.inner.store.items(q.state, limit).await?;
    Ok(Json(ItemList { items }))
}

async fn item(
    State(s): State<AppState>,
    Path(item_id): Path<String>,
) -> Result<Json<ItemInfo>, ApiError> {
    match s.inner.store.item(&item_id).await? {
        Some(info) => Ok(Json(info)),
        None => {
            let shown: String = item_id.chars().take(64).collect();
            Err(ApiError::NotFound(format!(
                "no queued item `{shown}` (acked, purged, or never queued)"
            )))
        }
    }
}

async fn purge(State(s): State<AppState>) -> Result<Json<PurgeResponse>, ApiError> {
    let purged = s.inner.store.purge().await?;
    tracing::warn!(purged, "purged the waiting items of the ingestion queue");
    Ok(Json(PurgeResponse { purged }))
}

async fn metrics(State(s): State<AppState>) -> Response {
    match s.inner.store.status().await {
        Ok(status) => s.inner.metrics.observe(&status),
        Err(e) => tracing::warn!(error = %e, "cannot read queue status for metrics"),
    }
    let mut resp = esper_common::metrics::render(&s.inner.metrics.registry).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// Readiness: the store answers.
struct StoreHealth {
    store: Arc<dyn QueueStore>,
}

#[async_trait::async_trait]
impl HealthCheck for StoreHealth {
    async fn report(&self) -> HealthReport {
        let kind = self.store.kind();
        let component = match tokio::time::timeout(HEALTH_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => ComponentHealth::new("queue_store", true, true, format!("{kind} store")),
            Ok(Err(e)) => ComponentHealth::new("queue_store", false, true, e.to_string()),
            Err(_) => ComponentHealth::new(
                "queue_store",
                false,
                true,
                format!("{kind} store did not answer within {HEALTH_TIMEOUT:?}"),
            ),
        };
        HealthReport::new("ingestion-broker", vec![component])
    }
}
