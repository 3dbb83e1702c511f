//! Mitigations, through the mitigation broker: list, per-entity view (with the decision
//! log), manual mitigations and revocations (both also written to the decision log).

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use esper_common::http::{Path, Query};
use esper_common::{ApiError, Json};
use esper_protocol::mitigation::{MitigationList, RevokeRequest, RevokeResponse};
use esper_protocol::{Action, Decision, DecisionMode, EntityKey, Mitigation, Origin, Reason};
use serde::Deserialize;

use super::{broker_error, store_error};
use crate::auth::Caller;
use crate::state::AppState;
use crate::store::{DecisionQuery, RevokeTarget};
use crate::types::{EntityReport, ManualMitigationRequest};

/// Default and largest `limit` of the active list.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;
/// Decisions shown with an entity.
const ENTITY_DECISIONS: usize = 50;
/// `ttl` of a manual mitigation when none is given, and the longest allowed.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const MAX_REASON_LEN: usize = 1000;

fn parse_entity(s: &str) -> Result<EntityKey, ApiError> {
    s.parse().map_err(|e: esper_protocol::EntityParseError| {
        ApiError::bad_request("invalid_entity", e.to_string())
    })
}

/// A key no request could match (a name that is no token, a cookie's value where its
/// hash belongs) is refused, saying which key would.
fn check_matchable(entity: &EntityKey) -> Result<(), ApiError> {
    entity
        .check_matchable()
        .map_err(|e| ApiError::bad_request("invalid_entity", e))
}

/// Proof-of-work bits for `"challenge"` without parameters: well under a second in a
/// browser, thousands of requests' worth of CPU for a bot at scale.
const DEFAULT_CHALLENGE_DIFFICULTY: u8 = 16;

/// `"block"`, `"log"`, `"challenge"`, or a full action object, with its parameters checked.
fn parse_action(v: &serde_json::Value) -> Result<Action, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_action", m);
    let action = match v {
        serde_json::Value::String(name) => match name.as_str() {
            "block" => Action::Block,
            "log" => Action::Log,
            "challenge" => Action::Challenge {
                difficulty: DEFAULT_CHALLENGE_DIFFICULTY,
            },
            "throttle" => {
                return Err(bad(
                    "action throttle needs parameters: {\"type\": \"throttle\", \"rate\": 5, \"burst\": 10}".into(),
                ));
            }
            "tarpit" => {
                return Err(bad(
                    "action tarpit needs a delay: {\"type\": \"tarpit\", \"delay_ms\": 2000}"
                        .into(),
                ));
            }
            other => {
                return Err(bad(format!(
                    "unknown action `{other}` (expected block, throttle, tarpit, challenge or log)"
                )));
            }
        },
        serde_json::Value::Object(_) => {
            serde_json::from_value(v.clone()).map_err(|e| bad(format!("action: {e}")))?
        }
        _ => {
            return Err(bad(
                "action must be a name (\"block\") or an object ({\"type\": \"throttle\", ...})"
                    .into(),
            ));
        }
    };
    action.check().map_err(bad)?;
    Ok(action)
}

fn parse_ttl(ttl: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = ttl else {
        return Ok(DEFAULT_TTL);
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        ApiError::bad_request(
            "invalid_ttl",
            format!("ttl `{text}`: {e} (write e.g. 30m, 1h, 7d)"),
        )
    })?;
    if d < Duration::from_secs(1) || d > MAX_TTL {
        return Err(ApiError::bad_request(
            "invalid_ttl",
            format!("ttl `{text}` is out of range (1s to 365d)"),
        ));
    }
    Ok(d)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
}

/// `GET /api/v1/mitigations?limit=N`
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<MitigationList>, ApiError> {
    let limit = super::limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    state
        .mitigation
        .active(Some(limit))
        .await
        .map(Json)
        .map_err(|e| broker_error(&state, "mitigation", &state.mitigation.url(), e))
}

/// `GET /api/v1/mitigations/entity/{entity}`
pub async fn entity(
    State(state): State<AppState>,
    Path(entity): Path<String>,
) -> Result<Json<EntityReport>, ApiError> {
    let key = parse_entity(&entity)?;
    let active = state
        .mitigation
        .entity(&key)
        .await
        .map_err(|e| broker_error(&state, "mitigation", &state.mitigation.url(), e))?;
    let decisions = state
        .store
        .query_decisions(&DecisionQuery {
            entity: Some(key.clone()),
            limit: ENTITY_DECISIONS,
            ..Default::default()
        })
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(EntityReport {
        entity: key,
        mitigations: active.mitigations,
        decisions,
    }))
}

/// `POST /api/v1/mitigations`: a manual mitigation, published now and logged.
pub async fn add(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<ManualMitigationRequest>,
) -> Result<(StatusCode, Json<Mitigation>), ApiError> {
    let entity = parse_entity(&req.entity)?;
    check_matchable(&entity)?;
    let action = parse_action(&req.action)?;
    super::allowlist::check_manual(&state, &entity).await?;
    let ttl = parse_ttl(req.ttl.as_deref())?;
    let summary = match req.reason.as_deref().map(str::trim) {
        Some(r) if r.len() > MAX_REASON_LEN => {
            return Err(ApiError::bad_request(
                "invalid_reason",
                format!("reason is longer than {MAX_REASON_LEN} bytes"),
            ));
        }
        Some(r) if !r.is_empty() => r.to_string(),
        _ => format!("manual mitigation by {}", caller.0),
    };
    let mut m = Mitigation::new(
        entity,
        action,
        ttl,
        Origin::Manual,
        Reason {
            policy_id: None,
            summary,
        },
    );
    if let Some(scope) = req.scope {
        scope
            .check()
            .map_err(|e| ApiError::bad_request("invalid_scope", e))?;
        m.scope = scope;
    }
    state
        .mitigation
        .publish(vec![m.clone()])
        .await
        .map_err(|e| broker_error(&state, "mitigation", &state.mitigation.url(), e))?;
    state.mirror.upsert(m.clone());
    state.metrics.manual_mitigations.inc();
    tracing::info!(id = %m.id, entity = %m.entity, action = %m.action, by = %caller.0, "manual mitigation published");
    let decision = Decision {
        id: m.id.clone(),
        mitigation: m.clone(),
        mode: DecisionMode::Enforce,
        policy_id: None,
        policy_version: None,
        counted: None,
        threshold: None,
        window_secs: None,
        decided_by: format!("control:{}", caller.0),
        decided_at: m.created_at,
    };
    // The mitigation is in force already; a log failure must not make the caller retry it.
    match state.store.record_decisions(&[decision]).await {
        Ok(n) => state.metrics.decisions_logged.inc_by(n as u64),
        Err(e) => {
            state.metrics.store_errors.inc();
            tracing::error!(id = %m.id, error = %e, "manual mitigation published but not logged");
        }
    }
    Ok((StatusCode::CREATED, Json(m)))
}

/// `POST /api/v1/mitigations/revoke` with `{"id": ...}` or `{"entity": ...}`.
pub async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<RevokeRequest>,
) -> Result<Json<RevokeResponse>, ApiError> {
    let target = match (&req.id, &req.entity) {
        (Some(id), None) if !id.trim().is_empty() => RevokeTarget::Id(id.clone()),
        (None, Some(e)) => RevokeTarget::Entity(e.clone()),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "give exactly one of `id` or `entity`",
            ));
        }
    };
    let resp = state
        .mitigation
        .revoke(&req)
        .await
        .map_err(|e| broker_error(&state, "mitigation", &state.mitigation.url(), e))?;
    state.mirror.revoke(req.id.as_deref(), req.entity.as_ref());
    state.metrics.revocations.inc_by(resp.revoked as u64);
    tracing::info!(?target, revoked = resp.revoked, by = %caller.0, "mitigations revoked");
    let logged = match state
        .store
        .mark_revoked(&target, &format!("control:{}", caller.0), Utc::now())
        .await
    {
        Ok(n) => n,
        Err(e) => {
            state.metrics.store_errors.inc();
            tracing::error!(error = %e, "revocation done but not recorded in the decision log");
            0
        }
    };
    // An id names one mitigation: none in force under it is most likely a typo. (An
    // entity with none is the state the caller asked for.)
    if let RevokeTarget::Id(id) = &target
        && resp.revoked == 0
        && logged == 0
    {
        return Err(ApiError::NotFound(format!("no mitigation `{id}` in force")));
    }
    Ok(Json(resp))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn actions_by_name_or_object() {
        assert_eq!(parse_action(&json!("block")).unwrap(), Action::Block);
        assert_eq!(
            parse_action(&json!("challenge")).unwrap(),
            Action::Challenge { difficulty: 16 }
        );
        assert!(parse_action(&json!({"type": "challenge", "difficulty": 30})).is_err());
        let t = parse_action(&json!({"type": "throttle", "rate": 5, "burst": 10})).unwrap();
        assert_eq!(
            t,
            Action::Throttle {
                rate: 5.0,
                burst: 10
            }
        );
        let e = parse_action(&json!("throttle")).unwrap_err().to_string();
        assert!(e.contains("needs parameters"), "{e}");
        let e = parse_action(&json!("ban")).unwrap_err().to_string();
        assert!(e.contains("unknown action `ban`"), "{e}");
        assert!(parse_action(&json!({"type": "tarpit", "delay_ms": 0})).is_err());
        assert!(parse_action(&json!(3)).is_err());
    }

    #[test]
    fn ttls_are_bounded() {
        assert_eq!(parse_ttl(None).unwrap(), DEFAULT_TTL);
        assert_eq!(parse_ttl(Some("2h")).unwrap(), Duration::from_secs(7200));
        assert!(parse_ttl(Some("soon")).is_err());
        assert!(parse_ttl(Some("0s")).is_err());
        assert!(parse_ttl(Some("400d")).is_err());
    }
}
