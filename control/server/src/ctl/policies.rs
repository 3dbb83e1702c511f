//! `esperctl policies ...`

use std::path::Path;

use esper_engine::policy::{PolicySpec, parse_policies};
use esper_engine::replay::{ReplayReport, read_events, replay_specs};
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
        PolicyCmd::Test { file, events } => test(ctx, &file, &events).await,
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
    let (text, policies) = load_specs(file)?;
    Ok((text, policies.len()))
}

fn load_specs(file: &Path) -> Result<(String, Vec<PolicySpec>), CtlError> {
    let text = read_input(file)?;
    let shown = file.display();
    match parse_policies(&text) {
        Ok(policies) => Ok((text, policies)),
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
    // `apply` refuses such a file; validating it must not promise otherwise.
    if n == 0 {
        return Err(CtlError::Input(format!(
            "{}: no [[policy]] tables: nothing to apply",
            file.display()
        )));
    }
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

/// `esperctl policies test -f FILE --events EVENTS.jsonl`
async fn test(ctx: &Ctx, file: &Path, events: &Path) -> Result<(), CtlError> {
    // The first read would take all of stdin, and the second find nothing.
    if file.as_os_str() == "-" && events.as_os_str() == "-" {
        return Err(CtlError::Input(
            "-f and --events cannot both read stdin; give one of them as a file".into(),
        ));
    }
    let (_, specs) = load_specs(file)?;
    if specs.is_empty() {
        return Err(CtlError::Input(format!(
            "{}: no [[policy]] tables: nothing to test",
            file.display()
        )));
    }
    let text = read_input(events)?;
    let events =
        read_events(&text).map_err(|e| CtlError::Input(format!("{}: {e}", events.display())))?;
    let report = replay_specs(specs, &events)
        .await
        .map_err(|e| CtlError::Input(e.to_string()))?;
    let v = serde_json::to_string(&report)
        .map_err(|e| CtlError::Input(format!("cannot render the report: {e}")))?;
    ctx.emit(v, |_| Ok(replay_table(&report)))
}

/// The decisions of a replay, one a row, then a count.
pub fn replay_table(report: &ReplayReport) -> String {
    let mut out = String::new();
    for w in &report.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    if report.decisions.is_empty() {
        out.push_str(&format!(
            "{}, no decisions\n",
            counted(report.events, "event")
        ));
        return out;
    }
    let mut t = Table::new(&[
        "TIME",
        "POLICY",
        "ENTITY",
        "ACTION",
        "TTL",
        "MODE",
        "VALUE",
        "CONDITION",
    ]);
    for d in &report.decisions {
        t.row(vec![
            rfc3339(d.time),
            d.policy.clone(),
            d.entity.to_string(),
            d.action.to_string(),
            humantime::format_duration(std::time::Duration::from_secs(d.ttl_secs)).to_string(),
            match d.mode {
                esper_protocol::DecisionMode::Enforce => "enforce".into(),
                esper_protocol::DecisionMode::Shadow => "shadow".into(),
            },
            format!(
                "{} >= {} in {}s",
                number(d.counted),
                number(d.threshold),
                d.window_secs
            ),
            d.condition.clone(),
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!(
        "{}, {}\n",
        counted(report.events, "event"),
        counted(report.decisions.len(), "decision")
    ));
    out
}

/// `1 event`, `2 events`.
fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn number(v: f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replay_tables_show_when_what_and_why() {
        let specs = parse_policies(
            "[[policy]]\nid = \"login\"\nwindow = \"1m\"\nthreshold = 2\naction = \"block\"\nfilter = 'status == 401'\n",
        )
        .unwrap();
        let line = |s: u32| {
            format!(
                r#"{{"timestamp":"2026-01-01T12:00:0{s}Z","client_ip":"192.0.2.1","method":"POST","path":"/login","status":401}}"#
            )
        };
        let events = read_events(&format!("{}\n{}\n", line(1), line(2))).unwrap();
        let report = replay_specs(specs.clone(), &events).await.unwrap();
        let text = replay_table(&report);
        let row = text.lines().nth(1).unwrap();
        for part in [
            "2026-01-01T12:00:02Z",
            "login",
            "ip:192.0.2.1",
            "block",
            "5m",
            "enforce",
            "2 >= 2 in 60s",
            "status == 401",
        ] {
            assert!(row.contains(part), "{part} in {text}");
        }
        assert!(text.ends_with("2 events, 1 decision\n"), "{text}");
        let none = replay_specs(specs, &events[..1]).await.unwrap();
        assert_eq!(replay_table(&none), "1 event, no decisions\n");
    }
}
