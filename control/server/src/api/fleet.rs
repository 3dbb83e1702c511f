//! Heartbeats of engine workers and proxies, and their listings.

use axum::extract::State;
use axum::http::StatusCode;
use esper_common::http::Path;
use esper_common::{ApiError, Json};
use esper_protocol::{ProxyHeartbeat, WorkerHeartbeat};

use super::store_error;
use crate::heartbeats::NotDrained;
use crate::state::AppState;
use crate::types::{DrainResponse, HeartbeatAck, ProxiesResponse, WorkersResponse};

/// Longest worker or proxy id, and app name.
const MAX_ID_LEN: usize = 128;
/// Most apps one proxy reports: its heartbeat is kept for an hour.
const MAX_APPS: usize = 1_000;

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.trim().is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("{what} must be 1 to {MAX_ID_LEN} printable characters"),
        ));
    }
    Ok(())
}

async fn ack(state: &AppState, drain: bool) -> Result<Json<HeartbeatAck>, ApiError> {
    let policies_revision = state
        .store
        .revision()
        .await
        .map_err(|e| store_error(state, e))?;
    Ok(Json(HeartbeatAck {
        ok: true,
        policies_revision,
        drain,
    }))
}

/// `POST /api/v1/workers/heartbeat`
pub async fn worker_beat(
    State(state): State<AppState>,
    Json(beat): Json<WorkerHeartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    check_id("worker_id", &beat.worker_id)?;
    let drain = state
        .heartbeats
        .workers
        .beat(&beat)
        .await
        .map_err(|e| store_error(&state, e))?;
    if drain {
        tracing::info!(worker = %beat.worker_id, "worker told to drain");
    }
    ack(&state, drain).await
}

/// `POST /api/v1/workers/{id}/drain`: the worker stops claiming, finishes the batches in
/// hand and exits, once its next heartbeat (every few seconds) carries the request.
pub async fn drain_worker(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DrainResponse>), ApiError> {
    let asked = state
        .heartbeats
        .workers
        .drain(&id)
        .await
        .map_err(|e| store_error(&state, e))?;
    match asked {
        Ok(()) => Ok((
            StatusCode::ACCEPTED,
            Json(DrainResponse {
                worker_id: id,
                draining: true,
            }),
        )),
        Err(NotDrained::Unknown) => Err(ApiError::NotFound(format!(
            "no worker `{id}` has sent a heartbeat"
        ))),
        Err(NotDrained::Silent) => Err(ApiError::Conflict(format!(
            "worker `{id}` has not sent a heartbeat lately; it cannot be told"
        ))),
    }
}

/// `POST /api/v1/proxies/heartbeat`
pub async fn proxy_beat(
    State(state): State<AppState>,
    Json(beat): Json<ProxyHeartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    check_id("proxy_id", &beat.proxy_id)?;
    if beat.apps.len() > MAX_APPS {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("a proxy reports at most {MAX_APPS} apps"),
        ));
    }
    for app in &beat.apps {
        check_id("each app name", app)?;
    }
    // Proxies are not drained from here: their traffic is the load balancer's to move.
    state
        .heartbeats
        .proxies
        .beat(&beat)
        .await
        .map_err(|e| store_error(&state, e))?;
    ack(&state, false).await
}

/// `GET /api/v1/workers`
pub async fn workers(State(state): State<AppState>) -> Result<Json<WorkersResponse>, ApiError> {
    let workers = state
        .heartbeats
        .workers
        .list()
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(WorkersResponse { workers }))
}

/// `GET /api/v1/proxies`
pub async fn proxies(State(state): State<AppState>) -> Result<Json<ProxiesResponse>, ApiError> {
    let proxies = state
        .heartbeats
        .proxies
        .list()
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(ProxiesResponse { proxies }))
}
