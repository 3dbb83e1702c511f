//! The `/api/v1/*` router and the error mapping its handlers share.

use axum::Router;
use axum::middleware::from_fn_with_state;
use axum::routing::{delete, get, post};
use esper_common::ApiError;
use esper_common::http::{method_not_allowed, standard_layers};
use esper_protocol::ClientError;

use crate::auth;
use crate::state::AppState;
use crate::store::StoreError;

mod admin;
mod allowlist;
mod analyze;
mod decisions;
mod fleet;
mod lists;
mod mitigations;
mod policies;
mod proxy_config;
pub use proxy_config::check_proxy_documents_with;
mod queue;
mod status;
mod tokens;

/// Builds the API router: every route needs a bearer token whose role allows the call.
pub fn router(state: AppState, body_limit: usize) -> Router {
    let api = Router::new()
        .route("/api/v1/status", get(status::status))
        .route(
            "/api/v1/policies",
            get(policies::list).post(policies::apply),
        )
        .route("/api/v1/policies/validate", post(policies::validate))
        .route("/api/v1/policies/active", get(policies::active))
        .route(
            "/api/v1/policies/{id}",
            get(policies::show).delete(policies::delete),
        )
        .route("/api/v1/policies/{id}/versions", get(policies::versions))
        .route("/api/v1/policies/{id}/{op}", post(policies::toggle))
        .route("/api/v1/lists", get(lists::list))
        .route(
            "/api/v1/lists/{name}",
            get(lists::show).put(lists::put).delete(lists::delete),
        )
        .route(
            "/api/v1/mitigations",
            get(mitigations::list).post(mitigations::add),
        )
        .route(
            "/api/v1/mitigations/entity/{*entity}",
            get(mitigations::entity),
        )
        .route("/api/v1/mitigations/revoke", post(mitigations::revoke))
        .route(
            "/api/v1/decisions",
            get(decisions::list).post(decisions::record),
        )
        .route("/api/v1/decisions/revoke", post(decisions::revoke))
        .route("/api/v1/decisions/revocations", get(decisions::revocations))
        .route("/api/v1/queue/status", get(queue::status))
        .route("/api/v1/queue/pause", post(queue::pause))
        .route("/api/v1/queue/resume", post(queue::resume))
        .route("/api/v1/workers", get(fleet::workers))
        .route("/api/v1/workers/heartbeat", post(fleet::worker_beat))
        .route("/api/v1/workers/{id}/drain", post(fleet::drain_worker))
        .route("/api/v1/proxies", get(fleet::proxies))
        .route("/api/v1/proxies/heartbeat", post(fleet::proxy_beat))
        .route(
            "/api/v1/proxies/config",
            get(proxy_config::get).put(proxy_config::put),
        )
        .route(
            "/api/v1/proxies/challenge-key",
            get(proxy_config::challenge_key),
        )
        .route("/api/v1/proxies/reported", get(proxy_config::reported))
        .route(
            "/api/v1/proxies/challenge-key/rotate",
            post(proxy_config::rotate_challenge_key),
        )
        .route("/api/v1/analyze", post(analyze::analyze))
        .route("/api/v1/admin/shutdown", post(admin::shutdown))
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/api/v1/tokens/{name}", delete(tokens::revoke))
        .route_layer(from_fn_with_state(state.clone(), auth::require_token))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    standard_layers(state.metrics.http.layer(api), body_limit)
}

/// One try of a write made from what was read ([`checked_write`]).
pub(crate) enum Attempt {
    /// What was read changed before the write: read and check again.
    Stale,
    Failed(ApiError),
}

impl From<ApiError> for Attempt {
    fn from(e: ApiError) -> Attempt {
        Attempt::Failed(e)
    }
}

/// A store failure within an [`Attempt`].
pub(crate) fn attempt_error(state: &AppState, e: StoreError) -> Attempt {
    match e {
        StoreError::Stale(_) => Attempt::Stale,
        e => Attempt::Failed(store_error(state, e)),
    }
}

/// How often a write is tried while what it was checked against keeps changing.
const WRITE_TRIES: usize = 3;

/// Runs `attempt` with the revision read before it reads or checks anything, and again
/// (up to three times) when its write finds the revision or a version moved on: a
/// policy naming a list and that list's deletion, checked at the same moment, cannot
/// both be written.
pub(crate) async fn checked_write<T, F, Fut>(
    state: &AppState,
    mut attempt: F,
) -> Result<T, ApiError>
where
    F: FnMut(i64) -> Fut,
    Fut: std::future::Future<Output = Result<T, Attempt>>,
{
    for _ in 0..WRITE_TRIES {
        // From the table: another instance's write may not have been announced here yet.
        let revision = state
            .store
            .stored_revision()
            .await
            .map_err(|e| store_error(state, e))?;
        match attempt(revision).await {
            Ok(done) => return Ok(done),
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::Stale) => continue,
        }
    }
    Err(ApiError::Conflict(format!(
        "policies or lists kept changing while this change was checked ({WRITE_TRIES} \
         tries); try again"
    )))
}

/// A list's `limit` query: `default` when absent, else 1 to `max`.
pub(crate) fn limit(given: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match given {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {max}, got {n}"),
        )),
    }
}

/// A store failure as the client sees it; the detail goes to the log.
pub(crate) fn store_error(state: &AppState, e: StoreError) -> ApiError {
    if let StoreError::Stale(message) = e {
        // The store did its part: a read it was given went out of date.
        return ApiError::Conflict(message);
    }
    state.metrics.store_errors.inc();
    match e {
        StoreError::Corrupt(_) => ApiError::internal(e),
        other => {
            tracing::error!(error = %other, "control store operation failed");
            ApiError::Unavailable {
                code: "store_unavailable",
                message: "the control store failed; see the server log".into(),
                retry_after: None,
            }
        }
    }
}

/// A broker failure: 502 `broker_unavailable` when it cannot be reached or fails, 502
/// `broker_misconfigured` when it refuses this server's token or URL (401, 403, 404), 503
/// when it pushes back, 400 when it refused the request.
pub(crate) fn broker_error(state: &AppState, broker: &str, url: &str, e: ClientError) -> ApiError {
    state
        .metrics
        .broker_errors
        .with_label_values(&[broker])
        .inc();
    tracing::warn!(broker, url, error = %e, "broker call failed");
    match e {
        ClientError::Transport { source, .. } => ApiError::BadGateway {
            code: "broker_unavailable",
            message: format!(
                "cannot reach the {broker} broker at {url}: {}",
                transport_reason(&source)
            ),
        },
        ClientError::Backpressure {
            code,
            message,
            retry_after,
        } => ApiError::Unavailable {
            code: esper_protocol::error::refusal::BROKER_BUSY,
            message: format!(
                "the {broker} broker refused the request: {message} ({code}); retry later"
            ),
            retry_after: retry_after.map(|d| d.as_secs().max(1)),
        },
        // The broker refusing this server's token or URL is this server's setup, not
        // the caller's request.
        ref refused @ ClientError::Api {
            ref code,
            ref message,
            ..
        } if refused.is_setup_refusal() => ApiError::BadGateway {
            code: "broker_misconfigured",
            message: format!(
                "the {broker} broker at {url} refused this server ({code}: {message}); \
                 check the broker token and URL in the server's configuration"
            ),
        },
        ClientError::Api {
            status,
            code,
            message,
        } if status < 500 => ApiError::bad_request(
            "broker_rejected",
            format!("the {broker} broker refused the request: {message} ({code})"),
        ),
        other => ApiError::BadGateway {
            code: "broker_unavailable",
            message: format!("the {broker} broker at {url} failed: {other}"),
        },
    }
}

/// A broker error in one line, with the transport's root cause rather than reqwest's
/// generic sentence.
pub(crate) fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Transport { url, source } => {
            format!("cannot reach {url}: {}", transport_reason(source))
        }
        other => other.to_string(),
    }
}

/// The most specific reason in a transport error (`connection refused`, `timed out`).
pub fn transport_reason(e: &(dyn std::error::Error + 'static)) -> String {
    let reason = root_reason(e);
    // rustls reading a plain-HTTP answer where a TLS record should be.
    if reason.contains("InvalidContentType") {
        return "it does not answer TLS (an http:// address given as https://?)".into();
    }
    reason
}

fn root_reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = deepest.source() {
        if let Some(io) = next.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::TimedOut => "timed out".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                _ => io.to_string(),
            };
        }
        deepest = next;
    }
    if let Some(r) = e.downcast_ref::<reqwest::Error>()
        && r.is_timeout()
    {
        return "timed out".into();
    }
    deepest.to_string()
}
