//! `POST /api/v1/admin/shutdown`: `esper server stop --graceful --timeout 30s` stops a
//! running server through its own API.

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use esper_common::{ApiError, Json};

use crate::auth::Caller;
use crate::state::AppState;
use crate::types::{ShutdownRequest, ShutdownResponse};

/// Longest drain a caller may ask for.
const MAX_DRAIN_SECS: u64 = 3600;
/// Time for this answer to leave before the listeners close.
const ANSWER_GRACE: Duration = Duration::from_millis(100);

/// Begins this server's shutdown shortly after answering 202.
pub async fn shutdown(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<ShutdownRequest>,
) -> Result<(StatusCode, Json<ShutdownResponse>), ApiError> {
    let timeout_secs = match (req.graceful, req.timeout_secs) {
        (false, _) => 0,
        (true, Some(s)) if s > MAX_DRAIN_SECS => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("timeout_secs {s} is above {MAX_DRAIN_SECS}"),
            ));
        }
        (true, Some(s)) => s,
        (true, None) => state.shutdown_timeout.as_secs(),
    };
    tracing::warn!(by = %caller.0, graceful = req.graceful, timeout_secs, "shutdown requested through the API");
    let stopper = state.stopper.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ANSWER_GRACE).await;
        stopper.stop(Duration::from_secs(timeout_secs));
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(ShutdownResponse {
            shutting_down: true,
            graceful: req.graceful,
            timeout_secs,
        }),
    ))
}
