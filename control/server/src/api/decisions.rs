//! The durable decision log: workers append batches (idempotent on the decision id);
//! operators query it newest first.

use axum::extract::State;
use esper_common::http::Query;
use esper_common::{ApiError, Json};
use esper_protocol::{DecisionBatch, DecisionMode, EntityKey};
use serde::Deserialize;

use super::store_error;
use crate::state::AppState;
use crate::store::DecisionQuery;
use crate::types::{DecisionsResponse, RecordResponse};

/// Default and largest `limit`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Most decisions in one batch.
const MAX_BATCH: usize = 5000;

/// `POST /api/v1/decisions`
pub async fn record(
    State(state): State<AppState>,
    Json(batch): Json<DecisionBatch>,
) -> Result<Json<RecordResponse>, ApiError> {
    let received = batch.decisions.len();
    if received > MAX_BATCH {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!("{received} decisions in one batch; send at most {MAX_BATCH}"),
        ));
    }
    if let Some(d) = batch.decisions.iter().find(|d| d.id.trim().is_empty()) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("a decision for {} has an empty id", d.mitigation.entity),
        ));
    }
    let recorded = state
        .store
        .record_decisions(&batch.decisions)
        .await
        .map_err(|e| store_error(&state, e))?;
    state.metrics.decisions_logged.inc_by(recorded as u64);
    Ok(Json(RecordResponse { received, recorded }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionParams {
    entity: Option<String>,
    policy: Option<String>,
    mode: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/decisions?entity=&policy=&mode=&limit=`
pub async fn list(
    State(state): State<AppState>,
    Query(p): Query<DecisionParams>,
) -> Result<Json<DecisionsResponse>, ApiError> {
    let entity = match p.entity.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(
            s.parse::<EntityKey>()
                .map_err(|e| ApiError::bad_request("invalid_query", format!("entity: {e}")))?,
        ),
        None => None,
    };
    let mode = match p.mode.as_deref().filter(|s| !s.is_empty()) {
        Some("enforce") => Some(DecisionMode::Enforce),
        Some("shadow") => Some(DecisionMode::Shadow),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("mode `{other}` is not enforce or shadow"),
            ));
        }
        None => None,
    };
    let q = DecisionQuery {
        entity,
        policy: p.policy.filter(|s| !s.is_empty()),
        mode,
        limit: p.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
    };
    let decisions = state
        .store
        .query_decisions(&q)
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(DecisionsResponse { decisions }))
}
