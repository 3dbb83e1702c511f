//! Heartbeats of engine workers and proxies, and their listings.

use axum::extract::State;
use esper_common::{ApiError, Json};
use esper_protocol::{ProxyHeartbeat, WorkerHeartbeat};

use super::store_error;
use crate::state::AppState;
use crate::types::{HeartbeatAck, ProxiesResponse, WorkersResponse};

/// Longest worker or proxy id.
const MAX_ID_LEN: usize = 128;

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.trim().is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("{what} must be 1 to {MAX_ID_LEN} printable characters"),
        ));
    }
    Ok(())
}

async fn ack(state: &AppState) -> Result<Json<HeartbeatAck>, ApiError> {
    let policies_revision = state
        .store
        .revision()
        .await
        .map_err(|e| store_error(state, e))?;
    Ok(Json(HeartbeatAck {
        ok: true,
        policies_revision,
    }))
}

/// `POST /api/v1/workers/heartbeat`
pub async fn worker_beat(
    State(state): State<AppState>,
    Json(beat): Json<WorkerHeartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    check_id("worker_id", &beat.worker_id)?;
    let id = beat.worker_id.clone();
    state.heartbeats.workers.beat(&id, beat);
    state
        .metrics
        .workers_alive
        .set(state.heartbeats.workers.alive() as i64);
    ack(&state).await
}

/// `POST /api/v1/proxies/heartbeat`
pub async fn proxy_beat(
    State(state): State<AppState>,
    Json(beat): Json<ProxyHeartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    check_id("proxy_id", &beat.proxy_id)?;
    let id = beat.proxy_id.clone();
    state.heartbeats.proxies.beat(&id, beat);
    state
        .metrics
        .proxies_alive
        .set(state.heartbeats.proxies.alive() as i64);
    ack(&state).await
}

/// `GET /api/v1/workers`
pub async fn workers(State(state): State<AppState>) -> Json<WorkersResponse> {
    Json(WorkersResponse {
        workers: state.heartbeats.workers.list(),
    })
}

/// `GET /api/v1/proxies`
pub async fn proxies(State(state): State<AppState>) -> Json<ProxiesResponse> {
    Json(ProxiesResponse {
        proxies: state.heartbeats.proxies.list(),
    })
}
