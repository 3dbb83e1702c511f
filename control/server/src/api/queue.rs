//! The ingestion queue, through the ingestion broker: status, pause, resume.

use axum::extract::State;
use esper_common::{ApiError, Json};
use esper_protocol::ingestion::QueueStatus;

use super::broker_error;
use crate::auth::Caller;
use crate::state::AppState;

fn failed(state: &AppState, e: esper_protocol::ClientError) -> ApiError {
    broker_error(state, "ingestion", &state.ingestion.url(), e)
}

/// `GET /api/v1/queue/status`
pub async fn status(State(state): State<AppState>) -> Result<Json<QueueStatus>, ApiError> {
    state
        .ingestion
        .status()
        .await
        .map(Json)
        .map_err(|e| failed(&state, e))
}

/// `POST /api/v1/queue/pause`
pub async fn pause(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Json<QueueStatus>, ApiError> {
    let s = state
        .ingestion
        .pause()
        .await
        .map_err(|e| failed(&state, e))?;
    tracing::warn!(by = %caller.0, "ingestion paused");
    Ok(Json(s))
}

/// `POST /api/v1/queue/resume`
pub async fn resume(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<Json<QueueStatus>, ApiError> {
    let s = state
        .ingestion
        .resume()
        .await
        .map_err(|e| failed(&state, e))?;
    tracing::info!(by = %caller.0, "ingestion resumed");
    Ok(Json(s))
}
