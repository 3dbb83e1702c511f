//! API tokens: list, create (the token is shown once), revoke. Admin only. A revoked
//! token is refused from its next request: every request looks its hash up.

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use esper_common::http::Path;
use esper_common::{ApiError, Json};

use super::store_error;
use crate::auth::{Caller, check_token_name, generate_token, hash_token};
use crate::state::AppState;
use crate::store::{TokenRecord, TokenRemoval, TokenRole};
use crate::types::{CreateTokenRequest, CreatedToken, Deleted, TokensResponse};

/// `GET /api/v1/tokens`
pub async fn list(State(state): State<AppState>) -> Result<Json<TokensResponse>, ApiError> {
    let tokens = state
        .store
        .list_tokens()
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(TokensResponse { tokens }))
}

/// `POST /api/v1/tokens`
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    check_token_name(&body.name).map_err(|e| ApiError::bad_request("invalid_token", e))?;
    let role: TokenRole = body
        .role
        .parse()
        .map_err(|e: String| ApiError::bad_request("invalid_token", e))?;
    let token = generate_token();
    let stored = state
        .store
        .add_token(&body.name, role, &hash_token(&token), &caller.0)
        .await
        .map_err(|e| store_error(&state, e))?;
    let Some(created_at) = stored else {
        return Err(ApiError::Conflict(format!(
            "a token named `{}` exists; revoke it first, or choose another name",
            body.name
        )));
    };
    tracing::info!(token = %body.name, %role, by = %caller.0, "API token created");
    let record = TokenRecord {
        name: body.name,
        role,
        created_at,
        created_by: caller.0,
        last_used_at: None,
    };
    Ok((StatusCode::CREATED, Json(CreatedToken { record, token })))
}

/// `DELETE /api/v1/tokens/{name}`
pub async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    // Without a configured admin token, the stored admin tokens are the only way in.
    let _change = state.admin_change.lock().await;
    let keep_an_admin = state.admin_token.load().is_none();
    match state
        .store
        .delete_token(&name, keep_an_admin)
        .await
        .map_err(|e| store_error(&state, e))?
    {
        TokenRemoval::Deleted => {
            tracing::info!(token = %name, by = %caller.0, "API token revoked");
            Ok(Json(Deleted { deleted: true }))
        }
        TokenRemoval::NotFound => Err(ApiError::NotFound(format!("no token `{name}`"))),
        TokenRemoval::LastAdmin => Err(ApiError::Conflict(format!(
            "token `{name}` is the last admin token and no admin_token is configured: \
             create another admin token first"
        ))),
    }
}
