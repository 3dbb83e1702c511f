//! The mitigation broker's HTTP API: publish, active list, entity lookup, revoke, cache
//! clear and the cursor-based delta stream (long-poll), plus health and metrics on the
//! same listener.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use esper_common::health::{self, ComponentHealth, HealthCheck, HealthReport};
use esper_common::http::{
    Accepted, ApiError, Json, Path, Query, loopback_unless_token, method_not_allowed,
    standard_layers, with_bearer,
};
use esper_common::shutdown::Shutdown;
use esper_protocol::mitigation::{
    MitigationList, PublishRequest, PublishResponse, RevokeRequest, RevokeResponse,
};
use esper_protocol::{DeltaPage, EntityKey, Mitigation};
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::persist::{Full, Persistence, WriteError, WritePermit, cap_policy_expiry};
use crate::store::{MitigationStore, Published, StoreError, Write, apply};

const DEFAULT_ACTIVE_LIMIT: usize = 1_000;
const MAX_ACTIVE_LIMIT: usize = 100_000;
const MAX_ID_LEN: usize = 256;
const RETRY_AFTER_STORE_SECS: u64 = 1;
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
const KINDS: [&str; 7] = ["ip", "cidr", "header", "cookie", "path", "ja4", "tuple"];

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn MitigationStore>,
    metrics: Metrics,
    shutdown: Shutdown,
    accepted: Accepted,
    body_limit: usize,
    cache_ttl: Duration,
    page_size: usize,
    max_stream_wait: Duration,
    persistence: Option<Arc<Persistence>>,
}

impl AppState {
    /// The state for `router`, from a validated config; `persistence` is the durable
    /// copy's outbox when `persistence_enabled`.
    pub fn new(
        config: &Config,
        store: Arc<dyn MitigationStore>,
        metrics: Metrics,
        shutdown: Shutdown,
        persistence: Option<Arc<Persistence>>,
    ) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                store,
                metrics,
                shutdown,
                accepted: Accepted::new(config.token.as_deref(), config.previous_token.as_deref()),
                body_limit: config.max_body_bytes,
                cache_ttl: config.cache_ttl,
                page_size: config.stream_page_size,
                max_stream_wait: config.max_stream_wait,
                persistence,
            }),
        }
    }

    /// The store behind the API.
    pub fn store(&self) -> &Arc<dyn MitigationStore> {
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
        .route("/api/mitigations", post(publish))
        .route("/api/mitigations/active", get(active))
        .route("/api/mitigations/entity/{*entity}", get(entity))
        .route("/api/mitigations/revoke", post(revoke))
        .route("/api/mitigations/stream", get(stream))
        .with_state(state.clone());
    let admin = Router::new()
        .route("/api/cache/clear", post(clear))
        .with_state(state.clone());
    let admin = loopback_unless_token(admin, state.inner.accepted.clone(), TOKEN_SETTING);
    let api = with_bearer(api.merge(admin), state.inner.accepted.clone());
    let ops = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    let check = Arc::new(StoreHealth {
        store: state.inner.store.clone(),
        persistence: state.inner.persistence.clone(),
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
            Some(0) => tracing::error!(error = %e, "mitigation store call failed"),
            Some(more) => {
                tracing::error!(error = %e, more, "mitigation store call failed (and `more` since the last line)")
            }
            None => tracing::debug!(error = %e, "mitigation store call failed"),
        }
        // The store's own words (Redis out of memory, or not answering) tell the
        // caller's operator what to fix.
        ApiError::Unavailable {
            code: "store_unavailable",
            message: match &e {
                StoreError::Unavailable(reason) => {
                    format!("the mitigation store is unavailable ({reason}); retry later")
                }
            },
            retry_after: Some(RETRY_AFTER_STORE_SECS),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::Full => Full.into(),
            WriteError::Store(e) => e.into(),
        }
    }
}

impl From<Full> for ApiError {
    fn from(_: Full) -> ApiError {
        ApiError::Unavailable {
            code: esper_protocol::error::refusal::PERSISTENCE_BACKLOG,
            message:
                "the durable copy's outbox is full while the control plane catches up; retry later"
                    .into(),
            retry_after: Some(RETRY_AFTER_STORE_SECS),
        }
    }
}

/// Runs a store write and its note for the durable copy to the end even when the client
/// goes away meanwhile (axum drops a handler whose connection closed): a write applied
/// but never noted would be missing from the decision log, and a restore under way
/// could undo it.
async fn whole<T: Send + 'static>(
    write: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(write).await.map_err(ApiError::internal)?
}

/// Applies a write, through the durable copy when there is one: what it changed, and a
/// publish's stream position.
async fn written(inner: &Inner, write: Write<'_>) -> Result<(usize, Option<String>), ApiError> {
    match &inner.persistence {
        Some(p) => Ok(p.write(&*inner.store, write).await?),
        None => Ok(apply(&*inner.store, write).await?),
    }
}

/// Refuses a write the durable copy could not take (policy `reject`); the permit is
/// held until the write is queued for the durable copy.
async fn admit(s: &AppState, n: usize) -> Result<Option<WritePermit>, ApiError> {
    match &s.inner.persistence {
        Some(p) => Ok(Some(p.admit(n).await?)),
        None => Ok(None),
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.trim().is_empty() || id.chars().count() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(format!("id must be 1 to {MAX_ID_LEN} printable characters"));
    }
    Ok(())
}

fn check_mitigation(m: &Mitigation) -> Result<(), String> {
    check_id(&m.id)?;
    m.check_times()?;
    m.check_not_ahead(chrono::Utc::now())?;
    // What an operator named by hand; the engine's keys come from what proxies
    // reported, and refusing one of them would stall its batch for ever.
    if m.origin == esper_protocol::Origin::Manual {
        m.entity.check_matchable()?;
        m.scope.check()?;
    }
    m.action.check()
}

async fn publish(
    State(s): State<AppState>,
    Json(req): Json<PublishRequest>,
) -> Result<Json<PublishResponse>, ApiError> {
    let mut ids = std::collections::HashSet::with_capacity(req.mitigations.len());
    for (i, m) in req.mitigations.iter().enumerate() {
        check_mitigation(m).map_err(|e| {
            ApiError::bad_request("invalid_mitigation", format!("mitigations[{i}]: {e}"))
        })?;
        // One id twice in a batch: only the last would be stored, the other lost.
        if !ids.insert(m.id.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_mitigation",
                format!("mitigations[{i}]: id `{}` appears twice in the batch", m.id),
            ));
        }
    }
    let permit = admit(&s, req.mitigations.len()).await?;
    let now = chrono::Utc::now();
    let mut outlived = 0;
    let capped: Vec<Mitigation> = req
        .mitigations
        .into_iter()
        .filter_map(|m| {
            let active = m.is_active(now);
            let m = cap_policy_expiry(m, s.inner.cache_ttl);
            // A decision that arrives past its cap (a publish retried for long, a
            // creation stamped by a clock behind) has simply run its course. Sent on
            // as expired, it would end the copy under its id and be logged as that
            // id's revocation, and the engine would forgive the entity.
            if active && !m.is_active(now) {
                outlived += 1;
                return None;
            }
            Some(m)
        })
        .collect();
    if outlived > 0 {
        tracing::info!(
            outlived,
            cache_ttl = ?s.inner.cache_ttl,
            "policy decisions arrived past their cache_ttl cap; not stored"
        );
    }
    let inner = s.inner.clone();
    let published = whole(async move {
        let _permit = permit;
        let (accepted, cursor) = written(&inner, Write::Publish(&capped)).await?;
        Ok(Published {
            accepted,
            cursor: cursor.unwrap_or_default(),
        })
    })
    .await?;
    s.inner.metrics.published.inc_by(published.accepted as u64);
    Ok(Json(PublishResponse {
        // Taken, so the publisher does not send them again.
        accepted: published.accepted + outlived,
        cursor: published.cursor,
    }))
}

/// `GET /api/mitigations/active` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActiveQuery {
    limit: Option<usize>,
    kind: Option<String>,
}

async fn active(
    State(s): State<AppState>,
    Query(q): Query<ActiveQuery>,
) -> Result<Json<MitigationList>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_ACTIVE_LIMIT);
    if limit == 0 || limit > MAX_ACTIVE_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_ACTIVE_LIMIT}, got {limit}"),
        ));
    }
    let kind = q.kind.as_deref().map(str::to_ascii_lowercase);
    if let Some(k) = &kind
        && !KINDS.contains(&k.as_str())
    {
        let shown: String = k.chars().take(32).collect();
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("kind must be one of {}; got `{shown}`", KINDS.join(", ")),
        ));
    }
    let page = s.inner.store.active(kind.as_deref(), limit).await?;
    Ok(Json(MitigationList {
        mitigations: page.mitigations,
        total: page.total,
    }))
}

fn parse_entity(text: &str) -> Result<EntityKey, ApiError> {
    text.parse::<EntityKey>()
        .map_err(|e| ApiError::bad_request("invalid_entity", e.to_string()))
}

async fn entity(
    State(s): State<AppState>,
    Path(text): Path<String>,
) -> Result<Json<MitigationList>, ApiError> {
    let key = parse_entity(&text)?;
    let mitigations = s.inner.store.for_entity(&key).await?;
    Ok(Json(MitigationList {
        total: mitigations.len(),
        mitigations,
    }))
}

async fn revoke(
    State(s): State<AppState>,
    Json(req): Json<RevokeRequest>,
) -> Result<Json<RevokeResponse>, ApiError> {
    match (&req.id, &req.entity) {
        (Some(id), None) => {
            check_id(id).map_err(|e| ApiError::bad_request("invalid_revoke", e))?;
        }
        (None, Some(_)) => {}
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_revoke",
                "give `id` (one mitigation) or `entity` (all of an entity's mitigations)",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_revoke",
                "give either `id` or `entity`, not both",
            ));
        }
    }
    let permit = admit(&s, 1).await?;
    let inner = s.inner.clone();
    let revoked = whole(async move {
        let _permit = permit;
        let write = match (&req.id, &req.entity) {
            (Some(id), _) => Write::RevokeId(id),
            (None, Some(entity)) => Write::RevokeEntity(entity),
            (None, None) => return Ok(0),
        };
        Ok(written(&inner, write).await?.0)
    })
    .await?;
    s.inner.metrics.revoked.inc_by(revoked as u64);
    Ok(Json(RevokeResponse { revoked }))
}

async fn clear(State(s): State<AppState>) -> Result<Json<RevokeResponse>, ApiError> {
    let permit = admit(&s, 1).await?;
    let inner = s.inner.clone();
    let revoked = whole(async move {
        let _permit = permit;
        Ok(written(&inner, Write::Clear).await?.0)
    })
    .await?;
    s.inner.metrics.clears.inc();
    tracing::warn!(
        dropped = revoked,
        "mitigation cache cleared; every follower gets a fresh snapshot"
    );
    Ok(Json(RevokeResponse { revoked }))
}

/// `GET /api/mitigations/stream` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    cursor: Option<String>,
    wait_ms: Option<u64>,
    /// A snapshot page's `more`: the next page of the snapshot at `cursor`.
    snapshot_after: Option<String>,
}

async fn stream(
    State(s): State<AppState>,
    Query(q): Query<StreamQuery>,
) -> Result<Json<DeltaPage>, ApiError> {
    let inner = &s.inner;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(inner.max_stream_wait);
    let deadline = Instant::now() + wait;
    let cursor = q.cursor.as_deref();
    if let Some(after) = q.snapshot_after.as_deref() {
        let Some(cursor) = cursor else {
            return Err(ApiError::bad_request(
                "invalid_query",
                "snapshot_after needs the snapshot's cursor",
            ));
        };
        // Counted as ids are (in characters): a page may end on any id taken.
        if after.is_empty() || after.chars().count() > MAX_ID_LEN {
            return Err(ApiError::bad_request(
                "invalid_query",
                "snapshot_after must be a snapshot page's `more`",
            ));
        }
        let mut page = inner
            .store
            .snapshot_page(cursor, after, inner.page_size)
            .await?;
        // Another cursor: the snapshot could not be continued and starts over.
        if page.cursor != cursor {
            inner.metrics.snapshots.inc();
        }
        page.restoring = restoring(inner).await;
        return Ok(Json(page));
    }
    let mut changed = inner.store.subscribe();
    changed.borrow_and_update();
    let mut page = inner.store.changes(cursor, inner.page_size).await?;
    if page.snapshot || !page.changes.is_empty() || wait.is_zero() {
        return Ok(Json(sent(inner, page).await));
    }
    let _follower = inner.metrics.follower();
    loop {
        tokio::select! {
            biased;
            _ = inner.shutdown.wait() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            r = changed.changed() => {
                if r.is_err() {
                    break;
                }
            }
        }
        changed.borrow_and_update();
        page = inner.store.changes(cursor, inner.page_size).await?;
        if page.snapshot || !page.changes.is_empty() {
            break;
        }
    }
    Ok(Json(sent(inner, page).await))
}

/// Whether a snapshot served now is to be taken as incomplete (see
/// [`DeltaPage::restoring`]): followers then keep what they hold, which is still being
/// enforced, rather than replace it with a store that has not been restored yet.
async fn restoring(inner: &Inner) -> bool {
    match &inner.persistence {
        Some(p) => p.restoring().await,
        None => false,
    }
}

/// Counts an answer to a request for the changes after a cursor (a snapshot's first
/// page counts as one snapshot).
async fn sent(inner: &Inner, mut page: DeltaPage) -> DeltaPage {
    if page.snapshot {
        page.restoring = restoring(inner).await;
        inner.metrics.snapshots.inc();
    } else {
        inner.metrics.changes_sent.inc_by(page.changes.len() as u64);
    }
    page
}

async fn metrics(State(s): State<AppState>) -> Response {
    match s.inner.store.counts().await {
        Ok(counts) => s.inner.metrics.observe_counts(&counts),
        Err(e) => tracing::warn!(error = %e, "cannot count mitigations for metrics"),
    }
    let mut resp = esper_common::metrics::render(&s.inner.metrics.registry).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// Readiness: the store answers. The decision log, when persistence is on, is shown but
/// not required: the broker serves while the control plane is away.
struct StoreHealth {
    store: Arc<dyn MitigationStore>,
    persistence: Option<Arc<Persistence>>,
}

#[async_trait::async_trait]
impl HealthCheck for StoreHealth {
    async fn report(&self) -> HealthReport {
        let kind = self.store.kind();
        let component = match tokio::time::timeout(HEALTH_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => {
                ComponentHealth::new("mitigation_store", true, true, format!("{kind} store"))
            }
            Ok(Err(e)) => ComponentHealth::new("mitigation_store", false, true, e.to_string()),
            Err(_) => ComponentHealth::new(
                "mitigation_store",
                false,
                true,
                format!("{kind} store did not answer within {HEALTH_TIMEOUT:?}"),
            ),
        };
        let mut components = vec![component];
        if let Some(p) = &self.persistence {
            components.push(p.health());
        }
        HealthReport::new("mitigation-broker", components)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use esper_protocol::{Action, Origin, Reason};

    fn mitigation(origin: Origin, ttl: Duration) -> Mitigation {
        Mitigation::new(
            "ip:192.0.2.1".parse().unwrap(),
            Action::Block,
            ttl,
            origin,
            Reason::default(),
        )
    }

    #[test]
    fn throttle_and_tarpit_values_are_checked() {
        let mut m = mitigation(Origin::Manual, Duration::from_secs(60));
        m.action = Action::Throttle {
            rate: f64::NAN,
            burst: 1,
        };
        assert!(check_mitigation(&m).is_err());
        m.action = Action::Throttle {
            rate: 5.0,
            burst: 0,
        };
        assert!(check_mitigation(&m).is_err());
        m.action = Action::Tarpit { delay_ms: 1_000 };
        assert!(check_mitigation(&m).is_ok());
        m.id = " ".into();
        assert!(check_mitigation(&m).is_err());
    }
}
