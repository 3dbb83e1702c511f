//! `GET /api/v1/status`: the whole stack at a glance, as `esperctl status` shows it.

use std::time::Duration;

use axum::extract::State;
use esper_common::{ApiError, Json};

use super::describe;
use crate::state::AppState;
use crate::types::{IngestionStatus, MitigationStatus, PolicyCounts, ServerStatus, StatusReport};

/// How long status waits for each broker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

async fn within<T, E>(
    fut: impl std::future::Future<Output = Result<T, E>>,
    show: impl Fn(&E) -> String,
) -> Result<T, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(show(&e)),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

/// Gathers the report; brokers that do not answer are reported unreachable.
pub(crate) async fn gather_status(state: &AppState) -> StatusReport {
    let (queue, active, policies, revision, workers, proxies, ping) = tokio::join!(
        within(state.ingestion.status(), describe),
        within(state.mitigation.active(Some(1)), describe),
        within(state.store.list_policies(), ToString::to_string),
        within(state.store.revision(), ToString::to_string),
        within(state.heartbeats.workers.list(), ToString::to_string),
        within(state.heartbeats.proxies.list(), ToString::to_string),
        // Readiness's check, which names the cause (connection refused) where a read
        // through the pool only knows it waited in vain.
        within(state.store.ping(), ToString::to_string),
    );
    // The reads decide; the ping only names the cause when one failed (a ping alone
    // failing, a busy single-connection store, is not an unreadable store).
    let store_error = [
        policies.as_ref().err(),
        revision.as_ref().err(),
        workers.as_ref().err(),
        proxies.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    .next()
    .map(|read| ping.as_ref().err().unwrap_or(read).clone());
    // The gauges keep their last reading while the store cannot be read: zero would
    // read as every policy gone.
    if let Ok(policies) = &policies {
        state.metrics.policies_total.set(policies.len() as i64);
        state
            .metrics
            .policies_enabled
            .set(policies.iter().filter(|p| p.enabled).count() as i64);
    }
    let policies = policies.unwrap_or_default();
    let counts = PolicyCounts {
        total: policies.len() as u64,
        enabled: policies.iter().filter(|p| p.enabled).count() as u64,
        revision: revision.unwrap_or(0),
    };
    StatusReport {
        server: ServerStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: state.started.elapsed().as_secs(),
            store: state.store.kind().to_string(),
            store_reachable: store_error.is_none(),
            store_error,
        },
        ingestion: IngestionStatus {
            url: state.ingestion.url().to_string(),
            reachable: queue.is_ok(),
            error: queue.as_ref().err().cloned(),
            queue: queue.ok(),
        },
        mitigation: MitigationStatus {
            url: state.mitigation.url().to_string(),
            reachable: active.is_ok(),
            active: active.as_ref().map(|l| l.total as u64).unwrap_or(0),
            error: active.err(),
        },
        workers: workers.unwrap_or_default(),
        proxies: proxies.unwrap_or_default(),
        policies: counts,
    }
}

/// `GET /api/v1/status`
pub async fn status(State(state): State<AppState>) -> Result<Json<StatusReport>, ApiError> {
    Ok(Json(gather_status(&state).await))
}
