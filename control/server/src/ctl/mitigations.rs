//! `esperctl mitigations ...`

use std::time::Duration;

use chrono::Utc;
use esper_protocol::mitigation::{
    MAX_THROTTLE_BURST, MAX_THROTTLE_RATE, MitigationList, RevokeResponse,
};
use esper_protocol::{Action, EntityKey, MAX_CHALLENGE_DIFFICULTY, MAX_TARPIT_MS, Mitigation};
use serde_json::json;

use super::client::{decode, segment};
use super::table::{Table, relative, rfc3339};
use super::{ActionArg, CtlError, Ctx, MitigationCmd};
use crate::types::{EntityReport, ProxiesResponse};

pub async fn run(ctx: &Ctx, cmd: MitigationCmd) -> Result<(), CtlError> {
    match cmd {
        MitigationCmd::List { limit } => list(ctx, limit).await,
        MitigationCmd::Show { entity } => show(ctx, &entity).await,
        MitigationCmd::Add {
            entity,
            action,
            rate,
            burst,
            delay,
            difficulty,
            ttl,
            reason,
            app,
        } => {
            let action = action_json(action, rate, burst, delay.as_deref(), difficulty)?;
            add(ctx, &entity, action, &ttl, reason, app).await
        }
        MitigationCmd::Revoke { id, entity } => revoke(ctx, id, entity).await,
    }
}

fn entity_key(s: &str) -> Result<EntityKey, CtlError> {
    s.parse()
        .map_err(|e: esper_protocol::EntityParseError| CtlError::Input(e.to_string()))
}

/// The action as the API takes it, with the flags each kind needs.
fn action_json(
    action: ActionArg,
    rate: Option<f64>,
    burst: Option<u32>,
    delay: Option<&str>,
    difficulty: Option<u8>,
) -> Result<serde_json::Value, CtlError> {
    let input = |m: &str| Err(CtlError::Input(m.to_string()));
    if action != ActionArg::Throttle && (rate.is_some() || burst.is_some()) {
        return input("--rate and --burst only apply to --action throttle");
    }
    if action != ActionArg::Tarpit && delay.is_some() {
        return input("--delay only applies to --action tarpit");
    }
    if action != ActionArg::Challenge && difficulty.is_some() {
        return input("--difficulty only applies to --action challenge");
    }
    Ok(match action {
        ActionArg::Block => json!("block"),
        ActionArg::Log => json!("log"),
        ActionArg::Challenge => match difficulty {
            None => json!("challenge"),
            Some(d) if (1..=MAX_CHALLENGE_DIFFICULTY).contains(&d) => {
                json!({"type": "challenge", "difficulty": d})
            }
            Some(d) => {
                return input(&format!(
                    "--difficulty {d} is out of range (1 to {MAX_CHALLENGE_DIFFICULTY})"
                ));
            }
        },
        ActionArg::Throttle => {
            let Some(rate) = rate else {
                return input("--action throttle needs --rate (requests per second, above 0)");
            };
            let burst =
                burst.unwrap_or(rate.ceil().clamp(1.0, f64::from(MAX_THROTTLE_BURST)) as u32);
            let action = Action::Throttle { rate, burst };
            // The server checks it too; refused here, the message names the flags.
            if action.check().is_err() {
                return input(&format!(
                    "--rate {rate} must be above 0 (at most {MAX_THROTTLE_RATE:e}) and --burst \
                     {burst} 1 to {MAX_THROTTLE_BURST}"
                ));
            }
            json!({"type": "throttle", "rate": rate, "burst": burst})
        }
        ActionArg::Tarpit => {
            let Some(delay) = delay else {
                return input("--action tarpit needs --delay (e.g. 2s)");
            };
            let d = humantime::parse_duration(delay.trim()).map_err(|e| {
                CtlError::Input(format!("--delay `{delay}`: {e} (write e.g. 500ms, 2s)"))
            })?;
            let delay_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            if delay_ms == 0 || delay_ms > MAX_TARPIT_MS {
                return input(&format!(
                    "--delay `{delay}` is out of range (1ms to {})",
                    humantime::format_duration(Duration::from_millis(MAX_TARPIT_MS))
                ));
            }
            json!({"type": "tarpit", "delay_ms": delay_ms})
        }
    })
}

fn mitigation_table(ms: &[Mitigation]) -> String {
    let now = Utc::now();
    let mut t = Table::new(&[
        "ID", "ENTITY", "ACTION", "ORIGIN", "SCOPE", "EXPIRES", "REASON",
    ]);
    for m in ms {
        t.row(vec![
            m.id.clone(),
            m.entity.to_string(),
            m.action.to_string(),
            m.origin.to_string(),
            match &m.scope {
                esper_protocol::Scope::Global => "global".to_string(),
                esper_protocol::Scope::App(a) => format!("app:{a}"),
            },
            relative(m.expires_at, now),
            m.reason.summary.clone(),
        ]);
    }
    t.render()
}

async fn list(ctx: &Ctx, limit: usize) -> Result<(), CtlError> {
    let v = ctx
        .client
        .get(&format!("/api/v1/mitigations?limit={limit}"))
        .await?;
    ctx.emit(v, |v| {
        let l: MitigationList = decode(&ctx.client, v)?;
        if l.mitigations.is_empty() {
            return Ok("no active mitigations\n".to_string());
        }
        let mut out = mitigation_table(&l.mitigations);
        if l.total > l.mitigations.len() {
            out.push_str(&format!(
                "({} of {} shown; use --limit)\n",
                l.mitigations.len(),
                l.total
            ));
        }
        Ok(out)
    })
}

/// `counted/threshold in window`, or `-` for decisions without counts (manual ones).
fn measured(d: &esper_protocol::Decision) -> String {
    match (d.counted, d.threshold) {
        (Some(c), Some(t)) => {
            let window = d.window_secs.map_or(String::new(), |w| format!(" in {w}s"));
            format!("{c}/{t}{window}")
        }
        _ => "-".into(),
    }
}

/// One decision in full: what a block page's reference leads to.
async fn show_reference(ctx: &Ctx, reference: &str) -> Result<(), CtlError> {
    if reference.is_empty() {
        return Err(CtlError::Input(
            "give an entity (kind:value, e.g. ip:203.0.113.7) or a decision's reference".into(),
        ));
    }
    let v = ctx
        .client
        .get(&format!(
            "/api/v1/decisions?id={}&limit=1",
            segment(reference)
        ))
        .await?;
    // Not found is an error in every output format, so a script sees a mistyped reference.
    let found: crate::types::DecisionsResponse = decode(
        &ctx.client,
        serde_json::from_str(&v).map_err(|e| CtlError::Decode {
            url: ctx.client.server().to_string(),
            message: e.to_string(),
        })?,
    )?;
    let Some(logged) = found.decisions.into_iter().next() else {
        return Err(CtlError::Api {
            status: 404,
            code: "not_found".into(),
            message: format!(
                "no decision with reference `{reference}` (an entity is written kind:value, e.g. ip:203.0.113.7)"
            ),
        });
    };
    ctx.emit(v, |_| {
        let d = logged.decision;
        let m = &d.mitigation;
        let policy = match (&d.policy_id, d.policy_version) {
            (Some(p), Some(v)) => format!("{p} (version {v})"),
            (Some(p), None) => p.clone(),
            _ => "- (manual)".into(),
        };
        let counted = match (d.counted, d.threshold) {
            (Some(c), Some(t)) => format!(
                "{c} against a threshold of {t}{}",
                d.window_secs
                    .map_or(String::new(), |w| format!(" over a {w}s window"))
            ),
            _ => "-".into(),
        };
        let revoked = match (logged.revoked_at, logged.revoked_by) {
            (Some(at), by) => format!("{} by {}", rfc3339(at), by.unwrap_or_default()),
            _ => "-".into(),
        };
        let mut t = Table::new(&["FIELD", "VALUE"]);
        for (k, v) in [
            ("reference", d.id.clone()),
            ("entity", m.entity.to_string()),
            ("action", m.action.to_string()),
            ("mode", super::ops::mode_name(d.mode).to_string()),
            ("policy", policy),
            ("why", m.reason.summary.clone()),
            ("counted", counted),
            (
                "decided",
                format!("{} by {}", rfc3339(d.decided_at), d.decided_by),
            ),
            ("expires", rfc3339(m.expires_at)),
            ("revoked", revoked),
        ] {
            t.row(vec![k.to_string(), v]);
        }
        Ok(format!(
            "{}\nThe entity's history: esperctl mitigations show {}\n",
            t.render(),
            m.entity
        ))
    })
}

/// `ENTITY` (`kind:value`) or a decision's reference (its id, as block pages print it).
async fn show(ctx: &Ctx, entity: &str) -> Result<(), CtlError> {
    let key = match entity.parse::<EntityKey>() {
        Ok(key) => key,
        Err(esper_protocol::EntityParseError::MissingKind(_)) => {
            return show_reference(ctx, entity.trim()).await;
        }
        Err(e) => return Err(CtlError::Input(e.to_string())),
    };
    let v = ctx
        .client
        .get(&format!(
            "/api/v1/mitigations/entity/{}",
            segment(&key.to_string())
        ))
        .await?;
    ctx.emit(v, |v| {
        let r: EntityReport = decode(&ctx.client, v)?;
        let mut out = format!("{}\n\n", r.entity);
        if r.mitigations.is_empty() {
            out.push_str("no active mitigations\n");
        } else {
            out.push_str(&mitigation_table(&r.mitigations));
        }
        out.push('\n');
        if r.decisions.is_empty() {
            out.push_str("no logged decisions\n");
        } else {
            let mut t = Table::new(&[
                "DECIDED",
                "REFERENCE",
                "POLICY",
                "MODE",
                "ACTION",
                "COUNTED",
                "BY",
                "REVOKED",
            ]);
            for d in r.decisions {
                let dec = d.decision;
                t.row(vec![
                    rfc3339(dec.decided_at),
                    dec.id.clone(),
                    dec.policy_id.clone().unwrap_or_else(|| "-".into()),
                    super::ops::mode_name(dec.mode).into(),
                    dec.mitigation.action.to_string(),
                    measured(&dec),
                    dec.decided_by,
                    d.revoked_at.map(rfc3339).unwrap_or_else(|| "-".into()),
                ]);
            }
            out.push_str(&t.render());
        }
        Ok(out)
    })
}

async fn add(
    ctx: &Ctx,
    entity: &str,
    action: serde_json::Value,
    ttl: &str,
    reason: Option<String>,
    app: Option<String>,
) -> Result<(), CtlError> {
    let key = entity_key(entity)?;
    humantime::parse_duration(ttl.trim())
        .map_err(|e| CtlError::Input(format!("--ttl `{ttl}`: {e} (write e.g. 30m, 1h, 7d)")))?;
    let mut body = json!({"entity": key.to_string(), "action": action, "ttl": ttl});
    if let Some(r) = reason {
        body["reason"] = json!(r);
    }
    if let Some(a) = &app {
        body["scope"] = json!({"app": a});
    }
    let v = ctx.client.post("/api/v1/mitigations", &body).await?;
    if let Some(a) = &app {
        warn_unless_reported(ctx, a).await;
    }
    ctx.emit(v, |v| {
        let m: Mitigation = decode(&ctx.client, v)?;
        Ok(mitigation_table(std::slice::from_ref(&m)))
    })
}

/// An app-scoped mitigation only applies where a proxy serves an app of that name; a
/// misspelt name would stand and do nothing. A proxy may yet come up with the app, so
/// this warns rather than refuses; a fleet that cannot be read says nothing.
async fn warn_unless_reported(ctx: &Ctx, app: &str) {
    let Ok(text) = ctx.client.get("/api/v1/proxies").await else {
        return;
    };
    let Ok(fleet) = serde_json::from_str::<ProxiesResponse>(&text) else {
        return;
    };
    if let Some(w) = unreported_app(&fleet, app) {
        eprintln!("warning: {w}");
    }
}

/// Proxies silent for now count too: the question is whether the name is known at all
/// (a typo), and a proxy down for a restart comes back serving its apps.
fn unreported_app(fleet: &ProxiesResponse, app: &str) -> Option<String> {
    if fleet
        .proxies
        .iter()
        .any(|p| p.beat.apps.iter().any(|a| a == app))
    {
        return None;
    }
    let mut known: Vec<&str> = fleet
        .proxies
        .iter()
        .flat_map(|p| p.beat.apps.iter().map(String::as_str))
        .collect();
    known.sort_unstable();
    known.dedup();
    Some(if known.is_empty() {
        format!("no proxy has reported an app yet, so none is known to serve `{app}`")
    } else {
        format!(
            "no proxy reports an app `{app}` (apps reported: {}); the mitigation applies only where one does",
            known.join(", ")
        )
    })
}

async fn revoke(ctx: &Ctx, id: Option<String>, entity: Option<String>) -> Result<(), CtlError> {
    let body = match (id, entity) {
        (Some(id), None) => json!({"id": id}),
        (None, Some(e)) => json!({"entity": entity_key(&e)?.to_string()}),
        _ => {
            return Err(CtlError::Input(
                "give a mitigation ID or --entity ENTITY (not both)".into(),
            ));
        }
    };
    let v = ctx.client.post("/api/v1/mitigations/revoke", &body).await?;
    ctx.emit(v, |v| {
        let r: RevokeResponse = decode(&ctx.client, v)?;
        Ok(format!(
            "{} mitigation{} revoked\n",
            r.revoked,
            if r.revoked == 1 { "" } else { "s" }
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_no_proxy_reports_is_warned_about() {
        let beat = |apps: &[&str]| {
            json!({
                "proxy_id": "p", "apps": apps, "cache_entries": 0, "requests_total": 0,
                "events_sent_total": 0, "events_dropped_total": 0, "stream_connected": true,
                "started_at": "2026-01-01T00:00:00Z", "last_seen": "2026-01-01T00:00:00Z",
                "alive": true,
            })
        };
        let fleet: ProxiesResponse =
            serde_json::from_value(json!({"proxies": [beat(&["shop", "api"]), beat(&["shop"])]}))
                .expect("fleet");
        assert_eq!(unreported_app(&fleet, "shop"), None);
        let w = unreported_app(&fleet, "shpo").expect("a warning");
        assert!(w.contains("`shpo` (apps reported: api, shop)"), "{w}");
        let empty = ProxiesResponse { proxies: vec![] };
        assert!(unreported_app(&empty, "shop").is_some());
    }

    #[test]
    fn a_tarpit_delay_is_written_in_milliseconds_or_refused() {
        let tarpit = |d: &str| action_json(ActionArg::Tarpit, None, None, Some(d), None);
        assert_eq!(
            tarpit("2s").unwrap(),
            json!({"type": "tarpit", "delay_ms": 2000})
        );
        for bad in ["soon", "600000000years", "10h", "0s"] {
            let Err(CtlError::Input(m)) = tarpit(bad) else {
                panic!("{bad} accepted");
            };
            assert!(m.starts_with(&format!("--delay `{bad}`")), "{m}");
        }
        let Err(CtlError::Input(m)) = tarpit("10h") else {
            unreachable!()
        };
        assert_eq!(m, "--delay `10h` is out of range (1ms to 1m)");
    }
}
