//! API authentication: a bearer token is accepted when it equals the configured admin
//! token (compared in constant time) or when its SHA-256 is stored in the `tokens` table.
//! With neither configured nor stored, the first start generates a token and shows it once.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use esper_common::ApiError;
use esper_common::http::token_matches;
use sha2::{Digest, Sha256};

use crate::state::AppState;
use crate::store::{ControlStore, StoreError};

/// Who made an authenticated request: the stored token's name, or `admin` for the
/// configured admin token. Handlers record it in policy history and the decision log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub String);

/// The name under which the generated first token is stored.
pub const INITIAL_TOKEN_NAME: &str = "initial";

/// Hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token (192 bits).
pub fn generate_token() -> String {
    format!("esper_{}", hex::encode(rand::random::<[u8; 24]>()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Middleware for `/api/v1/*`.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = match &state.admin_token {
        Some(admin) if token_matches(req.headers(), admin) => Some("admin".to_string()),
        _ => match bearer(req.headers()) {
            None => None,
            Some(t) => match state.store.token_name(&hash_token(t)).await {
                Ok(name) => name,
                Err(e) => {
                    state.metrics.store_errors.inc();
                    tracing::error!(error = %e, "cannot check a token against the store");
                    return ApiError::Unavailable {
                        code: "store_unavailable",
                        message: "the control store is not reachable; try again".into(),
                        retry_after: Some(1),
                    }
                    .into_response();
                }
            },
        },
    };
    match caller {
        Some(name) => {
            req.extensions_mut().insert(Caller(name));
            next.run(req).await
        }
        None => ApiError::Unauthorized.into_response(),
    }
}

/// Makes sure some token can reach the API. Returns the token generated now, if one was.
pub async fn ensure_token(
    store: &dyn ControlStore,
    admin_token: Option<&str>,
) -> Result<Option<String>, StoreError> {
    if admin_token.is_some() || store.token_count().await? > 0 {
        return Ok(None);
    }
    let token = generate_token();
    // Two instances starting on one empty store both count none: one stores its token,
    // and the other starts with it (whose value that instance printed).
    if !store
        .add_token(INITIAL_TOKEN_NAME, &hash_token(&token))
        .await?
    {
        tracing::info!(
            "another control-plane instance generated the initial API token; it printed it"
        );
        return Ok(None);
    }
    tracing::warn!(
        token = %token,
        "no API token was configured or stored, so one was generated; it is shown this once: \
         keep it (ESPER_TOKEN for esperctl)"
    );
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_stably_and_are_random() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (a, b) = (generate_token(), generate_token());
        assert_ne!(a, b);
        assert!(a.starts_with("esper_") && a.len() == 6 + 48);
    }
}
