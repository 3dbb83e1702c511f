//! Policies: list, show, apply (TOML or JSON), validate, enable/disable/shadow/enforce,
//! delete, history, and the active set workers poll.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use esper_common::http::{Body, Path};
use esper_common::{ApiError, Json};
use esper_engine::policy::{
    ActivePolicies, ListKind, NamedList, PolicyMode, PolicySpec, parse_policies, policies_to_toml,
    validate_references,
};
use serde::Deserialize;

use super::{Attempt, attempt_error, checked_write, store_error};
use crate::auth::Caller;
use crate::state::AppState;
use crate::store::{ListRecord, PolicyRecord, PolicyWrite};
use crate::types::{
    ApplyResponse, Deleted, PolicyDetail, PolicyHistory, PolicyListResponse, PolicySummary,
    ValidateResponse,
};

/// Ids that would collide with fixed routes under `/api/v1/policies/`.
const RESERVED_IDS: &[&str] = &["active", "validate"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    policies: Vec<PolicySpec>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_policy", message)
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("no policy `{id}`"))
}

/// Reads a policy document: `application/toml` (a `[[policy]]` document) or JSON
/// (`{"policies": [...]}`), validated, ids unique.
/// A policy request that cannot be used: an API error, or a content type we do not read.
pub enum BodyError {
    Api(ApiError),
    MediaType,
}

impl From<ApiError> for BodyError {
    fn from(e: ApiError) -> BodyError {
        BodyError::Api(e)
    }
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        match self {
            BodyError::Api(e) => e.into_response(),
            BodyError::MediaType => {
                let body = esper_protocol::ApiErrorBody {
                    error: "unsupported_media_type".into(),
                    message: "send `Content-Type: application/toml` (a [[policy]] document) or \
                              `application/json` ({\"policies\": [...]})"
                        .into(),
                };
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, axum::Json(body)).into_response()
            }
        }
    }
}

fn read_policies(
    headers: &HeaderMap,
    body: Result<Body, ApiError>,
) -> Result<Vec<PolicySpec>, BodyError> {
    let Body(body) = body?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let specs = match content_type.as_str() {
        "application/toml" | "text/toml" | "text/x-toml" | "application/x-toml" => {
            let text = std::str::from_utf8(&body)
                .map_err(|_| ApiError::bad_request("invalid_body", "the body is not UTF-8"))?;
            parse_policies(text).map_err(|e| invalid(e.to_string()))?
        }
        "application/json" => {
            // serde would read `[[...]]` as `{"policies": [...]}`, field by field.
            if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
                return Err(invalid(
                    "expected an object (`{\"policies\": [...]}`), found an array",
                )
                .into());
            }
            let doc: PolicyBody = serde_json::from_slice(&body).map_err(|e| {
                let message = esper_common::plain::plain_serde(&e.to_string());
                if e.is_syntax() || e.is_eof() {
                    ApiError::bad_request("invalid_json", message)
                } else {
                    invalid(message)
                }
            })?;
            let mut seen = HashSet::new();
            for p in &doc.policies {
                p.validate().map_err(|e| invalid(e.to_string()))?;
                if !seen.insert(p.id.as_str()) {
                    return Err(invalid(format!(
                        "policy \"{}\": another policy already has this id",
                        p.id
                    ))
                    .into());
                }
            }
            doc.policies
        }
        _ => return Err(BodyError::MediaType),
    };
    if let Some(p) = specs.iter().find(|p| RESERVED_IDS.contains(&p.id.as_str())) {
        return Err(invalid(format!(
            "policy \"{}\": this id is reserved; choose another",
            p.id
        ))
        .into());
    }
    Ok(specs)
}

pub(crate) fn named_list(l: &ListRecord) -> NamedList {
    NamedList {
        name: l.name.clone(),
        kind: l.kind.parse().unwrap_or(ListKind::String),
        items: l.items.clone(),
    }
}

async fn check_references(state: &AppState, specs: &[PolicySpec]) -> Result<(), ApiError> {
    let lists = state
        .store
        .list_lists()
        .await
        .map_err(|e| store_error(state, e))?;
    let lists: Vec<NamedList> = lists.iter().map(named_list).collect();
    validate_references(specs, &lists).map_err(|e| invalid(e.to_string()))
}

/// The stored policy `id`, or the 404 that names it.
async fn stored(state: &AppState, id: &str) -> Result<PolicyRecord, ApiError> {
    state
        .store
        .get_policy(id)
        .await
        .map_err(|e| store_error(state, e))?
        .ok_or_else(|| not_found(id))
}

fn spec_of(record: &PolicyRecord) -> Result<PolicySpec, ApiError> {
    serde_json::from_value(record.spec.clone()).map_err(|e| {
        ApiError::internal(format!(
            "stored policy `{}` version {} does not parse: {e}",
            record.id, record.version
        ))
    })
}

fn write_of(spec: &PolicySpec, change: &str, caller: &Caller) -> Result<PolicyWrite, ApiError> {
    Ok(PolicyWrite {
        id: spec.id.clone(),
        enabled: spec.enabled,
        mode: spec.mode.to_string(),
        spec: serde_json::to_value(spec).map_err(ApiError::internal)?,
        change: change.to_string(),
        changed_by: caller.0.clone(),
        expected_version: None,
    })
}

/// Writes policies over `expected_revision` (see [`checked_write`]).
async fn write(
    state: &AppState,
    writes: Vec<PolicyWrite>,
    expected_revision: Option<i64>,
) -> Result<Json<ApplyResponse>, Attempt> {
    let applied = state
        .store
        .put_policies(writes, expected_revision)
        .await
        .map_err(|e| attempt_error(state, e))?;
    let revision = state
        .store
        .revision()
        .await
        .map_err(|e| store_error(state, e))?;
    state.metrics.policy_revision.set(revision);
    state.policies_changed.notify_waiters();
    for a in applied.iter().filter(|a| a.changed) {
        tracing::info!(policy = %a.id, version = a.version, revision, "policy changed");
    }
    Ok(Json(ApplyResponse { applied, revision }))
}

/// `GET /api/v1/policies`
pub async fn list(State(state): State<AppState>) -> Result<Json<PolicyListResponse>, ApiError> {
    let records = state
        .store
        .list_policies()
        .await
        .map_err(|e| store_error(&state, e))?;
    let revision = state
        .store
        .revision()
        .await
        .map_err(|e| store_error(&state, e))?;
    let mut policies = Vec::with_capacity(records.len());
    for r in &records {
        let spec = spec_of(r)?;
        policies.push(PolicySummary {
            id: r.id.clone(),
            version: r.version,
            enabled: r.enabled,
            mode: r.mode.clone(),
            action: spec.action.to_string(),
            entity: spec.entity.to_string(),
            threshold: spec.threshold,
            window: humantime::format_duration(spec.window).to_string(),
            scope: spec.scope.to_string(),
            description: spec.description.clone(),
            updated_at: r.updated_at,
        });
    }
    Ok(Json(PolicyListResponse { policies, revision }))
}

/// `GET /api/v1/policies/{id}`
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PolicyDetail>, ApiError> {
    let record = stored(&state, &id).await?;
    let spec = spec_of(&record)?;
    Ok(Json(PolicyDetail {
        toml: policies_to_toml(std::slice::from_ref(&spec)),
        id: record.id,
        version: record.version,
        enabled: record.enabled,
        mode: record.mode,
        spec: record.spec,
        created_at: record.created_at,
        updated_at: record.updated_at,
    }))
}

/// What apply checks beyond the document itself: it has policies, and the lists they
/// name exist.
async fn check_applicable(state: &AppState, specs: &[PolicySpec]) -> Result<(), ApiError> {
    if specs.is_empty() {
        return Err(invalid(
            "nothing to apply: the document has no [[policy]] tables",
        ));
    }
    check_references(state, specs).await
}

/// `POST /api/v1/policies`: validates, then upserts every policy of the document at once.
pub async fn apply(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Body, ApiError>,
) -> Result<Json<ApplyResponse>, BodyError> {
    let specs = read_policies(&headers, body)?;
    // The lists the policies name are checked at the revision the write is made over.
    let state = &state;
    let (specs, caller) = (&specs, &caller);
    Ok(checked_write(state, |revision| async move {
        check_applicable(state, specs).await?;
        let writes = specs
            .iter()
            .map(|s| write_of(s, "apply", caller))
            .collect::<Result<Vec<_>, _>>()?;
        write(state, writes, Some(revision)).await
    })
    .await?)
}

/// `POST /api/v1/policies/validate`: the same checks as apply, nothing stored.
pub async fn validate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Body, ApiError>,
) -> Result<Json<ValidateResponse>, BodyError> {
    let specs = read_policies(&headers, body)?;
    check_applicable(&state, &specs).await?;
    Ok(Json(ValidateResponse {
        valid: true,
        policies: specs.len(),
    }))
}

/// `POST /api/v1/policies/{id}/enable | disable | shadow | enforce`
pub async fn toggle(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, op)): Path<(String, String)>,
) -> Result<Json<ApplyResponse>, ApiError> {
    let change: fn(&mut PolicySpec) = match op.as_str() {
        "enable" => |s| s.enabled = true,
        "disable" => |s| s.enabled = false,
        "shadow" => |s| s.mode = PolicyMode::Shadow,
        "enforce" => |s| s.mode = PolicyMode::Enforce,
        _ => {
            return Err(ApiError::NotFound(format!(
                "no such policy operation `{op}` (enable, disable, shadow or enforce)"
            )));
        }
    };
    // Read, change, and write only over the version read: an apply or a delete in
    // between would otherwise be undone. Taken again from the newer version.
    let (state, id, op, caller) = (&state, &id, &op, &caller);
    checked_write(state, |_| async move {
        let record = stored(state, id).await?;
        let mut spec = spec_of(&record)?;
        change(&mut spec);
        let mut w = write_of(&spec, op, caller)?;
        w.expected_version = Some(record.version);
        write(state, vec![w], None).await
    })
    .await
}

/// `DELETE /api/v1/policies/{id}`: the history stays.
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let deleted = state
        .store
        .delete_policy(&id, &caller.0)
        .await
        .map_err(|e| store_error(&state, e))?;
    if !deleted {
        return Err(not_found(&id));
    }
    state.policies_changed.notify_waiters();
    tracing::info!(policy = %id, by = %caller.0, "policy deleted");
    Ok(Json(Deleted { deleted }))
}

/// `GET /api/v1/policies/{id}/versions`, oldest first.
pub async fn versions(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PolicyHistory>, ApiError> {
    let versions = state
        .store
        .policy_versions(&id)
        .await
        .map_err(|e| store_error(&state, e))?;
    if versions.is_empty() {
        return Err(not_found(&id));
    }
    Ok(Json(PolicyHistory { id, versions }))
}

/// `GET /api/v1/policies/active`: what workers evaluate. Rebuilt only when the revision
/// moved, so polling every few seconds costs one small query.
pub async fn active(State(state): State<AppState>) -> Result<Response, ApiError> {
    let active = current(&state).await?;
    Ok(axum::Json(&*active).into_response())
}

/// The active policies of the store's revision, built again only when it moved.
pub(crate) async fn current(state: &AppState) -> Result<Arc<ActivePolicies>, ApiError> {
    let revision = state
        .store
        .revision()
        .await
        .map_err(|e| store_error(state, e))?;
    let cached = state.active_cache.lock().clone();
    Ok(match cached {
        Some(a) if a.revision == revision => a,
        _ => {
            let fresh = Arc::new(build_active(state).await?);
            *state.active_cache.lock() = Some(fresh.clone());
            fresh
        }
    })
}

async fn build_active(state: &AppState) -> Result<ActivePolicies, ApiError> {
    let snap = state
        .store
        .active_snapshot()
        .await
        .map_err(|e| store_error(state, e))?;
    let mut policies = Vec::with_capacity(snap.policies.len());
    let mut versions = BTreeMap::new();
    for r in &snap.policies {
        match spec_of(r) {
            Ok(spec) => {
                versions.insert(r.id.clone(), r.version);
                policies.push(spec);
            }
            // One unreadable row must not stop every other policy from being evaluated.
            Err(e) => tracing::error!(policy = %r.id, error = %e, "skipping an unreadable policy"),
        }
    }
    state.metrics.policy_revision.set(snap.revision);
    let lists: Vec<_> = snap.lists.iter().map(named_list).collect();
    // The IP list named `allowlist`, when there is one, is the global allowlist.
    let allowlist = lists
        .iter()
        .any(|l| l.name == esper_engine::policy::ALLOWLIST && l.kind == ListKind::Ip)
        .then(|| esper_engine::policy::ALLOWLIST.to_string());
    Ok(ActivePolicies {
        revision: snap.revision,
        policies,
        lists,
        versions,
        allowlist,
    })
}
