//! The durable decision log: workers (and mitigation brokers with persistence) append
//! batches, idempotent on the decision id; operators query it newest first; a broker
//! marks its revocations and reads back what is still in force to restore itself.

use axum::extract::State;
use chrono::Utc;
use esper_common::http::Query;
use esper_common::{ApiError, Json};
use esper_protocol::decision_log::MAX_REVOCATION_PAGE;
use esper_protocol::mitigation::{RevokeResponse, check_time, not_ahead};
use esper_protocol::{
    DecisionBatch, DecisionMode, DecisionRevoke, EntityKey, PageMark, RevocationMark,
    RevokedDecisions,
};
use serde::Deserialize;

use super::store_error;
use crate::state::AppState;
use crate::store::{DecisionQuery, RevokeTarget};
use crate::types::{DecisionsResponse, RecordResponse};

/// Default and largest `limit`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Most decisions in one batch.
const MAX_BATCH: usize = 5000;
/// Longest `revoked_by` name.
const MAX_REVOKED_BY: usize = 128;

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
    for d in &batch.decisions {
        check_time("decided_at", &d.decided_at)
            .and_then(|()| d.mitigation.check_times())
            .map_err(|e| {
                ApiError::bad_request("invalid_body", format!("decision `{}`: {e}", d.id))
            })?;
    }
    // The log lists newest first: one dated in the far future would head it for ever.
    // The mitigation broker refuses the same, so what it enforces its copy here keeps.
    let now = Utc::now();
    for d in &batch.decisions {
        not_ahead("decided_at", &d.decided_at, now).map_err(|e| {
            ApiError::bad_request("invalid_body", format!("decision `{}`: {e}", d.id))
        })?;
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
    id: Option<String>,
    entity: Option<String>,
    policy: Option<String>,
    mode: Option<String>,
    active: Option<bool>,
    before: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/decisions?id=&entity=&policy=&mode=&active=&before=&limit=`; `active=true`
/// keeps the decisions still in force, `before=<decided_at>,<id>` starts after that one.
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
    let before = match p.before.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(PageMark::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "before must be `<RFC 3339 time>,<decision id>`",
            )
        })?),
        None => None,
    };
    let q = DecisionQuery {
        id: p.id.filter(|s| !s.is_empty()),
        entity,
        policy: p.policy.filter(|s| !s.is_empty()),
        mode,
        active: p.active.unwrap_or(false),
        before,
        limit: super::limit(p.limit, DEFAULT_LIMIT, MAX_LIMIT)?,
    };
    let decisions = state
        .store
        .query_decisions(&q)
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(DecisionsResponse { decisions }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationParams {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/decisions/revocations?after=<seq>,<id>&limit=`: the policy decisions
/// revoked while in force and not yet past their expiry, in the order revoked. Workers
/// follow it to re-arm those policies for those entities.
pub async fn revocations(
    State(state): State<AppState>,
    Query(p): Query<RevocationParams>,
) -> Result<Json<RevokedDecisions>, ApiError> {
    let after = match p.after.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(RevocationMark::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "after must be `<revocation seq>` or `<revocation seq>,<decision id>`",
            )
        })?),
        None => None,
    };
    let limit = super::limit(p.limit, DEFAULT_LIMIT, MAX_REVOCATION_PAGE)?;
    let page = state
        .store
        .revocations(after.as_ref(), Utc::now(), limit)
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(page))
}

/// `POST /api/v1/decisions/revoke`: marks logged decisions revoked (by id, entity, or
/// all in force) as of `revoked_at`, without calling any broker: the broker that sends
/// it has already revoked.
pub async fn revoke(
    State(state): State<AppState>,
    Json(req): Json<DecisionRevoke>,
) -> Result<Json<RevokeResponse>, ApiError> {
    let target = match (&req.id, &req.entity, req.all) {
        (Some(id), None, false) if !id.trim().is_empty() => RevokeTarget::Id(id.clone()),
        (None, Some(e), false) => RevokeTarget::Entity(e.clone()),
        (None, None, true) => RevokeTarget::All,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "give exactly one of `id`, `entity` or `all: true`",
            ));
        }
    };
    let by = req.revoked_by.trim();
    if by.is_empty() || by.chars().count() > MAX_REVOKED_BY {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("revoked_by must be 1 to {MAX_REVOKED_BY} characters"),
        ));
    }
    check_time("revoked_at", &req.revoked_at)
        .map_err(|e| ApiError::bad_request("invalid_body", e))?;
    // A revocation cannot be dated in the future: it would mark decisions made later.
    let at = req.revoked_at.min(Utc::now());
    let marked = state
        .store
        .mark_revoked(&target, by, at)
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(RevokeResponse {
        revoked: usize::try_from(marked).unwrap_or(usize::MAX),
    }))
}
