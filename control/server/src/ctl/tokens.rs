//! `esperctl tokens ...`

use reqwest::Method;
use serde_json::json;

use super::client::{Body, decode, segment};
use super::table::{Table, relative, rfc3339};
use super::{CtlError, Ctx, TokenCmd};
use crate::auth::check_token_name;
use crate::types::{CreatedToken, TokensResponse};

pub async fn run(ctx: &Ctx, cmd: TokenCmd) -> Result<(), CtlError> {
    match cmd {
        TokenCmd::List => list(ctx).await,
        TokenCmd::Create { name, role } => create(ctx, &name, role.as_str()).await,
        TokenCmd::Revoke { name } => revoke(ctx, &name).await,
    }
}

async fn list(ctx: &Ctx) -> Result<(), CtlError> {
    let v = ctx.client.get("/api/v1/tokens").await?;
    ctx.emit(v, |v| {
        let r: TokensResponse = decode(&ctx.client, v)?;
        if r.tokens.is_empty() {
            return Ok("no stored tokens (only the configured admin token)\n".into());
        }
        let mut t = Table::new(&["NAME", "ROLE", "CREATED", "BY", "LAST USED"]);
        let now = chrono::Utc::now();
        for k in r.tokens {
            t.row(vec![
                k.name,
                k.role.to_string(),
                rfc3339(k.created_at),
                if k.created_by.is_empty() {
                    "-".into()
                } else {
                    k.created_by
                },
                k.last_used_at
                    .map_or_else(|| "never".into(), |t| relative(t, now)),
            ]);
        }
        Ok(t.render())
    })
}

async fn create(ctx: &Ctx, name: &str, role: &str) -> Result<(), CtlError> {
    check_token_name(name).map_err(CtlError::Input)?;
    let v = ctx
        .client
        .send_text(
            Method::POST,
            "/api/v1/tokens",
            Some(Body::Json(json!({"name": name, "role": role}))),
        )
        .await?;
    ctx.emit(v, |v| {
        let r: CreatedToken = decode(&ctx.client, v)?;
        // The token alone on the last line, for `| tail -1` in scripts.
        Ok(format!(
            "token {} created with the {} role; it is shown this once:\n{}\n",
            r.record.name, r.record.role, r.token
        ))
    })
}

async fn revoke(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    let v = ctx
        .client
        .send_text(
            Method::DELETE,
            &format!("/api/v1/tokens/{}", segment(name)),
            None,
        )
        .await?;
    ctx.emit(v, |_| {
        Ok(format!(
            "token {name} revoked: it is refused from its next request\n"
        ))
    })
}
