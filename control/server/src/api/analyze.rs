//! `POST /api/v1/analyze`: for apps that are not behind the proxy. The request's metadata
//! is enqueued for the engine and the answer is the actor's current mitigation: this
//! request is analysed, later ones are answered, as at the proxy.

use std::time::Duration;

use axum::extract::State;
use esper_common::{ApiError, Json};
use esper_protocol::{ClientError, EntityKey, RequestEvent, hash_cookie_value, path_template};

use crate::state::AppState;
use crate::types::{AnalyzeRequest, AnalyzeResponse};

/// The proxy id analyze events carry.
pub const ANALYZE_PROXY_ID: &str = "control";
/// How long the app waits for the ingestion broker before the event is given up.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_FIELD_LEN: usize = 8192;

fn check(req: &AnalyzeRequest) -> Result<(), ApiError> {
    let bad = |m: &str| Err(ApiError::bad_request("invalid_body", m));
    if req.method.is_empty()
        || req.method.len() > 32
        || !req.method.bytes().all(|b| b.is_ascii_alphabetic())
    {
        return bad("method must be an HTTP method such as GET or POST");
    }
    if req.path.is_empty() || req.path.len() > MAX_FIELD_LEN {
        return bad("path must be 1 to 8192 characters");
    }
    if let Some(s) = req.status
        && !(100..=599).contains(&s)
    {
        return bad("status must be 100 to 599");
    }
    Ok(())
}

fn event(req: AnalyzeRequest) -> RequestEvent {
    let mut ev = RequestEvent::new(req.client_ip, &req.method.to_ascii_uppercase(), &req.path);
    ev.proxy_id = ANALYZE_PROXY_ID.to_string();
    ev.app = req.app.unwrap_or_default();
    ev.host = req.host.unwrap_or_default();
    ev.status = req.status.unwrap_or(0);
    ev.user_agent = req.user_agent;
    ev.headers = req
        .headers
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    ev.cookies = req
        .cookies
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, hash_cookie_value(&v)))
        .collect();
    ev
}

/// The path, header and cookie entity keys of an event, as mitigations name them and
/// the proxy looks them up (a path by its template).
fn entity_keys(ev: &RequestEvent) -> Vec<EntityKey> {
    let path = EntityKey::Path(path_template(&ev.path));
    let headers = ev.headers.iter().map(|(name, value)| EntityKey::Header {
        name: name.clone(),
        value: value.clone(),
    });
    let cookies = ev.cookies.iter().map(|(name, value)| EntityKey::Cookie {
        name: name.to_ascii_lowercase(),
        value: value.clone(),
    });
    std::iter::once(path)
        .chain(headers)
        .chain(cookies)
        .collect()
}

/// `POST /api/v1/analyze`
pub async fn analyze(
    State(state): State<AppState>,
    Json(mut req): Json<AnalyzeRequest>,
) -> Result<Json<AnalyzeResponse>, ApiError> {
    check(&req)?;
    // An app on a dual-stack socket reports IPv4 clients as `::ffff:a.b.c.d`; keys
    // name them as IPv4, as the proxy does.
    req.client_ip = req.client_ip.to_canonical();
    let ip = req.client_ip;
    let app = req.app.clone().unwrap_or_default();
    let ev = event(req);
    let keys = entity_keys(&ev);
    let enqueued =
        match tokio::time::timeout(ENQUEUE_TIMEOUT, state.ingestion.ingest(vec![ev])).await {
            Ok(Ok(_)) => true,
            Ok(Err(ClientError::Backpressure { code, .. })) => {
                tracing::debug!(%code, "ingestion broker refused an analyze event");
                false
            }
            Ok(Err(e)) => {
                state
                    .metrics
                    .broker_errors
                    .with_label_values(&["ingestion"])
                    .inc();
                tracing::warn!(error = %e, "cannot enqueue an analyze event");
                false
            }
            Err(_) => {
                tracing::warn!("the ingestion broker did not take an analyze event in time");
                false
            }
        };
    if !enqueued {
        state.metrics.analyze_not_enqueued.inc();
    }
    let mitigation = state.mirror.best_for(ip, &keys, &app);
    let action = mitigation
        .as_ref()
        .map(|m| m.action.name())
        .unwrap_or("allow");
    state.metrics.analyze.with_label_values(&[action]).inc();
    Ok(Json(AnalyzeResponse {
        action: action.to_string(),
        mitigation,
        enqueued,
    }))
}
