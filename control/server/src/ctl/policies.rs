//! `esperctl policies ...`

use std::path::Path;

use esper_engine::policy::parse_policies;
use reqwest::Method;

use super::client::{Body, decode, segment};
use super::table::{Table, rfc3339};
use super::{CtlError, Ctx, PolicyCmd, read_input};
use crate::types::{ApplyResponse, PolicyDetail, PolicyHistory, PolicyListResponse};

pub async fn run(ctx: &Ctx, cmd: PolicyCmd) -> Result<(), CtlError> {
    match cmd {
        PolicyCmd::List => list(ctx).await,
        PolicyCmd::Show { id } => show(ctx, &id).await,
        PolicyCmd::Apply { file } => apply(ctx, &file).await,
        PolicyCmd::Validate { file } => validate(ctx, &file),
        PolicyCmd::Enable { id } => toggle(ctx, &id, "enable").await,
        PolicyCmd::Disable { id } => toggle(ctx, &id, "disable").await,
        PolicyCmd::Shadow { id } => toggle(ctx, &id, "shadow").await,
        PolicyCmd::Enforce { id } => toggle(ctx, &id, "enforce").await,
        PolicyCmd::Delete { id } => delete(ctx, &id).await,
        PolicyCmd::History { id } => history(ctx, &id).await,
    }
}

/// Reads and validates a policy file; errors name the file, line and column.
fn load(file: &Path) -> Result<(String, usize), CtlError> {
    let text = read_input(file)?;
    let shown = file.display();
    match parse_policies(&text) {
        Ok(policies) => Ok((text, policies.len())),
        Err(e) if e.line.is_some() => Err(CtlError::Input(format!("{shown} {e}"))),
        Err(e) => Err(CtlError::Input(format!("{shown}: {e}"))),
    }
}

async fn list(ctx: &Ctx) -> Result<(), CtlError> {
    let v = ctx.client.get("/api/v1/policies").await?;
    ctx.emit(v, |v| {
        let r: PolicyListResponse = decode(&ctx.client, v)?;
        if r.policies.is_empty() {
            return Ok("no policies\n".to_string());
        }
        let mut t = Table::new(&[
            "ID",
            "VERSION",
            "ENABLED",
            "MODE",
            "ACTION",
            "ENTITY",
            "THRESHOLD",
            "WINDOW",
            "UPDATED",
        ]);
        for p in r.policies {
            t.row(vec![
                p.id,
                p.version.to_string(),
                if p.enabled { "yes" } else { "no" }.into(),
                p.mode,
                p.action,
                p.entity,
                p.threshold.to_string(),
                p.window,
                rfc3339(p.updated_at),
            ]);
        }
        Ok(t.render())
    })
}

async fn show(ctx: &Ctx, id: &str) -> Result<(), CtlError> {
    let v = ctx
        .client
        .get(&format!("/api/v1/policies/{}", segment(id)))
        .await?;
    ctx.emit(v, |v| {
        let p: PolicyDetail = decode(&ctx.client, v)?;
        Ok(format!(
            "# {} version {}, {}, {}, updated {}\n{}",
            p.id,
            p.version,
            if p.enabled { "enabled" } else { "disabled" },
            p.mode,
            rfc3339(p.updated_at),
            p.toml
        ))
    })
}

fn applied_table(ctx: &Ctx, v: serde_json::Value) -> Result<String, CtlError> {
    let r: ApplyResponse = decode(&ctx.client, v)?;
    let mut t = Table::new(&["ID", "VERSION", "RESULT"]);
    for a in r.applied {
        t.row(vec![
            a.id,
            a.version.to_string(),
            if a.changed { "changed" } else { "unchanged" }.into(),
        ]);
    }
    Ok(format!("{}revision {}\n", t.render(), r.revision))
}

async fn apply(ctx: &Ctx, file: &Path) -> Result<(), CtlError> {
    let (text, _) = load(file)?;
    let v = ctx
        .client
        .send_text(Method::POST, "/api/v1/policies", Some(Body::Toml(text)))
        .await?;
    ctx.emit(v, |v| applied_table(ctx, v))
}

fn validate(ctx: &Ctx, file: &Path) -> Result<(), CtlError> {
    let (_, n) = load(file)?;
    let v = serde_json::json!({"valid": true, "policies": n}).to_string();
    ctx.emit(v, |_| {
        Ok(format!(
            "{}: {n} {} valid\n",
            file.display(),
            if n == 1 { "policy" } else { "policies" }
        ))
    })
}

async fn toggle(ctx: &Ctx, id: &str, op: &str) -> Result<(), CtlError> {
    let v = ctx
        .client
        .post(
            &format!("/api/v1/policies/{}/{op}", segment(id)),
            &serde_json::json!({}),
        )
        .await?;
    ctx.emit(v, |v| applied_table(ctx, v))
}

async fn delete(ctx: &Ctx, id: &str) -> Result<(), CtlError> {
    let v = ctx
        .client
        .send_text(
            Method::DELETE,
            &format!("/api/v1/policies/{}", segment(id)),
            None,
        )
        .await?;
    ctx.emit(v, |_| Ok(format!("policy {id} deleted\n")))
}

async fn history(ctx: &Ctx, id: &str) -> Result<(), CtlError> {
    let v = ctx
        .client
        .get(&format!("/api/v1/policies/{}/versions", segment(id)))
        .await?;
    ctx.emit(v, |v| {
        let h: PolicyHistory = decode(&ctx.client, v)?;
        let mut t = Table::new(&["VERSION", "CHANGE", "BY", "AT"]);
        for r in h.versions {
            t.row(vec![
                r.version.to_string(),
                r.change,
                r.changed_by,
                rfc3339(r.created_at),
            ]);
        }
        Ok(t.render())
    })
}
