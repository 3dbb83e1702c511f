//! The proxy configuration proxies follow: `PUT` stores a TOML document (checked to be a
//! TOML table, and as a proxy would check it when the binary registered the proxy's
//! check; each proxy still refuses what it cannot apply), `GET`
//! answers it, long-polling with `after=REVISION&wait=SECS` until a newer one exists.
//! Also the challenge key the proxies share.

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use esper_common::http::{OptionalJson, Query};
use esper_common::{ApiError, Json};
use esper_protocol::{
    ChallengeKey, ProxyConfigDoc, PutProxyConfig, ReportedFields, RotateChallengeKey,
    RotatedChallengeKey,
};
use serde::Deserialize;

use super::store_error;
use crate::auth::Caller;
use crate::state::AppState;

/// Checks a proxy document as a proxy would apply it; the binary that carries the proxy
/// registers it ([`check_proxy_documents_with`]). Without one, a document is only
/// checked to be a TOML table, and each proxy refuses what it cannot apply.
static DOCUMENT_CHECK: std::sync::OnceLock<DocumentCheck> = std::sync::OnceLock::new();

/// A proxy document's check: why a proxy would refuse it.
pub type DocumentCheck = fn(&str) -> Result<(), String>;

/// Makes `PUT /api/v1/proxies/config` refuse (400) a document `check` refuses. Set once
/// per process; later calls change nothing.
pub fn check_proxy_documents_with(check: DocumentCheck) {
    let _ = DOCUMENT_CHECK.set(check);
}

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
    long_poll(
        &state.proxy_config_changed,
        &state.stopping,
        p.wait,
        || async {
            let doc = state
                .store
                .proxy_config()
                .await
                .map_err(|e| store_error(&state, e))?;
            match doc {
                Some(doc) if doc.revision > after => Ok(Some(doc)),
                None if p.wait.is_none() => {
                    Err(ApiError::NotFound("no proxy configuration stored".into()))
                }
                _ => Ok(None),
            }
        },
    )
    .await
}

/// What `read` finds (200, as JSON), reading again whenever `changed` is notified (and
/// every [`RECHECK`], for changes written through another control-plane instance) until
/// it finds something, or 204 once `wait` seconds (at most [`MAX_WAIT`]) have passed.
async fn long_poll<T, F, Fut>(
    changed: &tokio::sync::Notify,
    stopping: &esper_common::Shutdown,
    wait: Option<u64>,
    mut read: F,
) -> Result<Response, ApiError>
where
    T: serde::Serialize,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, ApiError>>,
{
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(wait.unwrap_or(0)).min(MAX_WAIT);
    loop {
        // Registered before reading, so a change between the read and the wait wakes us.
        let notified = changed.notified();
        if let Some(found) = read().await? {
            return Ok(Json(found).into_response());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline || stopping.is_triggered() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        tokio::select! {
            _ = tokio::time::timeout((deadline - now).min(RECHECK), notified) => {}
            // Nothing new: the poller asks again, of an instance still serving.
            _ = stopping.wait() => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

/// `PUT /api/v1/proxies/config`: replaces the configuration; proxies pick it up.
pub async fn put(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<PutProxyConfig>,
) -> Result<Json<ProxyConfigDoc>, ApiError> {
    let table = body.config.parse::<toml::Table>().map_err(|e| {
        ApiError::bad_request(
            "invalid_config",
            format!("config is not a TOML table: {}", e.message()),
        )
    })?;
    if let Some(key) = esper_protocol::control::PROXY_LOCAL_ONLY
        .iter()
        .find(|k| table.contains_key(**k))
    {
        return Err(ApiError::bad_request(
            "invalid_config",
            format!("`{key}` is set on each proxy, not by the control plane"),
        ));
    }
    if let Some(check) = DOCUMENT_CHECK.get() {
        check(&body.config).map_err(|e| {
            ApiError::bad_request(
                "invalid_config",
                format!("a proxy would refuse this configuration: {e}"),
            )
        })?;
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

/// `GET /api/v1/proxies/reported[?after=N&wait=SECS]`: the headers and cookies the
/// enabled policies read, which proxies report besides their own lists; with `after`,
/// only for a policy revision newer than it (204 when none came within `wait`).
pub async fn reported(
    State(state): State<AppState>,
    Query(p): Query<ConfigParams>,
) -> Result<Response, ApiError> {
    let after = p.after.unwrap_or(i64::MIN);
    long_poll(&state.policies_changed, &state.stopping, p.wait, || async {
        let active = super::policies::current(&state).await?;
        if active.revision <= after {
            return Ok(None);
        }
        let cached = state.reported_cache.lock().clone();
        if let Some(fields) = cached.filter(|f| f.revision == active.revision) {
            return Ok(Some(fields));
        }
        let reads = esper_engine::eval::PolicySet::compile(&active).reads();
        let fields = ReportedFields {
            revision: active.revision,
            headers: reads.headers.into_iter().collect(),
            cookies: reads.cookies.into_iter().collect(),
        };
        *state.reported_cache.lock() = Some(fields.clone());
        Ok(Some(fields))
    })
    .await
}

/// The name of the proxies' shared challenge key among the stored secrets.
const CHALLENGE_KEY: &str = "challenge_key";

/// A fresh challenge key: 256 random bits, hex.
fn fresh_key() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// `GET /api/v1/proxies/challenge-key[?after=N&wait=SECS]`: the deployment's challenge
/// key, made the first time it is asked for, with the key it replaced while that is
/// still honoured; with `after`, only a key of a newer revision (204 when none came
/// within `wait`), so proxies follow rotations as they happen.
pub async fn challenge_key(
    State(state): State<AppState>,
    Query(p): Query<ConfigParams>,
) -> Result<Response, ApiError> {
    let after = p.after.unwrap_or(i64::MIN);
    long_poll(
        &state.challenge_key_changed,
        &state.stopping,
        p.wait,
        || async {
            let secret = state
                .store
                .secret(CHALLENGE_KEY, &fresh_key())
                .await
                .map_err(|e| store_error(&state, e))?;
            Ok((secret.revision > after).then_some(ChallengeKey {
                key: secret.value,
                previous: secret.previous,
                revision: secret.revision,
            }))
        },
    )
    .await
}

/// `POST /api/v1/proxies/challenge-key/rotate` (body optional: `{"keep_previous":
/// false}` to stop honouring what the replaced key signed): a new key, which every
/// proxy following the control plane signs with as soon as its long-poll answers.
pub async fn rotate_challenge_key(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    OptionalJson(asked): OptionalJson<RotateChallengeKey>,
) -> Result<Json<RotatedChallengeKey>, ApiError> {
    let secret = state
        .store
        .rotate_secret(CHALLENGE_KEY, &fresh_key(), asked.keep_previous)
        .await
        .map_err(|e| store_error(&state, e))?;
    state.challenge_key_changed.notify_waiters();
    let previous_honoured = secret.previous.is_some();
    tracing::info!(
        revision = secret.revision,
        by = %caller.0,
        previous_honoured,
        "challenge key rotated"
    );
    Ok(Json(RotatedChallengeKey {
        revision: secret.revision,
        rotated_at: secret.rotated_at.unwrap_or_else(chrono::Utc::now),
        previous_honoured,
    }))
}
