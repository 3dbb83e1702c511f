//! Named lists (IP networks or strings) that policies refer to.

use axum::Extension;
use axum::extract::State;
use esper_common::http::Path;
use esper_common::{ApiError, Json};
use esper_engine::policy::{ALLOWLIST, ListKind, NamedList, PolicySpec, parse_net};

use super::{attempt_error, checked_write, store_error};
use crate::auth::Caller;
use crate::state::AppState;
use crate::store::ListRecord;
use crate::types::{Deleted, ListSummary, ListsResponse, PutListRequest, PutListResponse};

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no list `{name}`"))
}

/// The stored policies, each with its spec (one that does not parse refers to nothing).
async fn policy_specs(state: &AppState) -> Result<Vec<(String, PolicySpec)>, ApiError> {
    let policies = state
        .store
        .list_policies()
        .await
        .map_err(|e| store_error(state, e))?;
    Ok(policies
        .into_iter()
        .filter_map(|p| Some((p.id, serde_json::from_value(p.spec).ok()?)))
        .collect())
}

/// The first stored policy that refers to list `name`, if any.
async fn user_of(state: &AppState, name: &str) -> Result<Option<String>, ApiError> {
    Ok(policy_specs(state)
        .await?
        .into_iter()
        .find_map(|(id, spec)| spec.list_refs().any(|l| l == name).then_some(id)))
}

/// A policy that reads list `name` as another kind than `kind`, and the kind it reads:
/// stored as `kind`, the list would be empty to that policy (`!(x in list(...))` would
/// then hold for everyone).
async fn reader_of_other_kind(
    state: &AppState,
    name: &str,
    kind: ListKind,
) -> Result<Option<(String, ListKind)>, ApiError> {
    Ok(policy_specs(state)
        .await?
        .into_iter()
        .find_map(|(id, spec)| {
            spec.typed_list_refs()
                .into_iter()
                .find(|(l, k)| l == name && *k != kind)
                .map(|(_, k)| (id, k))
        }))
}

/// `GET /api/v1/lists`
pub async fn list(State(state): State<AppState>) -> Result<Json<ListsResponse>, ApiError> {
    let lists = state
        .store
        .list_lists()
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(ListsResponse {
        lists: lists
            .into_iter()
            .map(|l| ListSummary {
                items: l.items.len(),
                name: l.name,
                kind: l.kind,
                updated_at: l.updated_at,
            })
            .collect(),
    }))
}

/// `GET /api/v1/lists/{name}`
pub async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ListRecord>, ApiError> {
    state
        .store
        .get_list(&name)
        .await
        .map_err(|e| store_error(&state, e))?
        .map(Json)
        .ok_or_else(|| not_found(&name))
}

/// `PUT /api/v1/lists/{name}`: creates or replaces the list.
pub async fn put(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(body): Json<PutListRequest>,
) -> Result<Json<PutListResponse>, ApiError> {
    let kind: ListKind = body
        .kind
        .parse()
        .map_err(|e: String| ApiError::bad_request("invalid_list", e))?;
    let list = NamedList {
        name: name.clone(),
        kind,
        items: {
            // Kept once, in the order given: a list is a set.
            let mut seen = std::collections::HashSet::new();
            body.items
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| seen.insert(s.clone()))
                .collect()
        },
    };
    list.validate()
        .map_err(|e| ApiError::bad_request("invalid_list", e.to_string()))?;
    // The policies that read the list are checked at the revision the write is made over.
    let (state_ref, name_ref, items) = (&state, &name, &list.items);
    let record = checked_write(state_ref, |revision| async move {
        if let Some((policy, needed)) = reader_of_other_kind(state_ref, name_ref, kind).await? {
            return Err(ApiError::Conflict(format!(
                "list `{name_ref}` is used by policy `{policy}` as a {needed} list; it cannot \
                 become a {kind} list"
            ))
            .into());
        }
        state_ref
            .store
            .put_list(name_ref, &kind.to_string(), items.clone(), Some(revision))
            .await
            .map_err(|e| attempt_error(state_ref, e))
    })
    .await?;
    tracing::info!(list = %name, items = record.items.len(), by = %caller.0, "list stored");
    let revoked = if name == ALLOWLIST && kind == ListKind::Ip {
        let allow: Vec<_> = record.items.iter().filter_map(|i| parse_net(i)).collect();
        let by = format!("control:{} (allowlist)", caller.0);
        super::allowlist::revoke_covered(&state, &allow, &by).await?
    } else {
        Vec::new()
    };
    Ok(Json(PutListResponse { record, revoked }))
}

/// `DELETE /api/v1/lists/{name}`: refused while a policy refers to the list.
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let (state_ref, name_ref) = (&state, &name);
    let deleted = checked_write(state_ref, |revision| async move {
        if let Some(policy) = user_of(state_ref, name_ref).await? {
            return Err(ApiError::Conflict(format!(
                "list `{name_ref}` is used by policy `{policy}`; change or delete that policy \
                 first"
            ))
            .into());
        }
        state_ref
            .store
            .delete_list(name_ref, Some(revision))
            .await
            .map_err(|e| attempt_error(state_ref, e))
    })
    .await?;
    if !deleted {
        return Err(not_found(&name));
    }
    tracing::info!(list = %name, by = %caller.0, "list deleted");
    Ok(Json(Deleted { deleted }))
}
