//! The proxy configuration proxies follow: `PUT` stores a TOML document (checked to be a
//! TOML table; each proxy validates the options and refuses what it cannot apply), `GET`
//! answers it, long-polling with `after=REVISION&wait=SECS` until a newer one exists.
//! Also the challenge key the proxies share.

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use esper_common::http::Query;
use esper_common::{ApiError, Json};
use esper_protocol::{ChallengeKey, ProxyConfigDoc, PutProxyConfig};
use serde::Deserialize;

use super::store_error;
use crate::auth::Caller;
use crate::state::AppState;

/// Longest long-poll a proxy may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a long-poll rereads the store, for changes written through another
/// control-plane instance (changes through this one wake it at once).
const RECHECK: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigParams {
    /// Answer only a revision newer than this one.
    after: Option<i64>,
    /// Seconds to wait for one (at most 60).
    wait: Option<u64>,
}

/// `GET /api/v1/proxies/config[?after=N&wait=SECS]`: the configuration (200), 404 when
/// none was ever stored and no wait was asked, or 204 when none newer than `after`
/// appeared within `wait`.
pub async fn get(
    State(state): State<AppState>,
    Query(p): Query<ConfigParams>,
) -> Result<Response, ApiError> {
    let after = p.after.unwrap_or(i64::MIN);
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(p.wait.unwrap_or(0)).min(MAX_WAIT);
    loop {
        // Registered before reading, so a change between the read and the wait wakes us.
        let changed = state.proxy_config_changed.notified();
        let doc = state
            .store
            .proxy_config()
            .await
            .map_err(|e| store_error(&state, e))?;
        match doc {
            Some(doc) if doc.revision > after => return Ok(Json(doc).into_response()),
            None if p.wait.is_none() => {
                return Err(ApiError::NotFound("no proxy configuration stored".into()));
            }
            _ => {}
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let _ = tokio::time::timeout((deadline - now).min(RECHECK), changed).await;
    }
}

/// `PUT /api/v1/proxies/config`: replaces the configuration; proxies pick it up.
pub async fn put(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<PutProxyConfig>,
) -> Result<Json<ProxyConfigDoc>, ApiError> {
    if let Err(e) = body.config.parse::<toml::Table>() {
        return Err(ApiError::bad_request(
            "invalid_config",
            format!("config is not a TOML table: {}", e.message()),
        ));
    }
    let doc = state
        .store
        .put_proxy_config(&body.config, &caller.0)
        .await
        .map_err(|e| store_error(&state, e))?;
    state.proxy_config_changed.notify_waiters();
    tracing::info!(revision = doc.revision, by = %caller.0, "proxy configuration stored");
    Ok(Json(doc))
}

/// The name of the proxies' shared challenge key among the stored secrets.
const CHALLENGE_KEY: &str = "challenge_key";

/// `GET /api/v1/proxies/challenge-key`: the deployment's challenge key, made (256
/// random bits, hex) the first time it is asked for.
pub async fn challenge_key(State(state): State<AppState>) -> Result<Json<ChallengeKey>, ApiError> {
    let fresh = hex::encode(rand::random::<[u8; 32]>());
    let key = state
        .store
        .secret(CHALLENGE_KEY, &fresh)
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(ChallengeKey { key }))
}
