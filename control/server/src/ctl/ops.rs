//! `esperctl status`, `queue ...`, `workers list`, `proxies list`, `decisions list`.

use chrono::Utc;
use esper_protocol::ingestion::QueueStatus;
use esper_protocol::{DecisionMode, RotateChallengeKey, RotatedChallengeKey};

use super::client::{decode, segment};
use super::table::{Table, relative, rfc3339, uptime};
use super::{CtlError, Ctx, DecisionCmd, QueueCmd};
use crate::types::{DecisionsResponse, ProxiesResponse, StatusReport, WorkersResponse};

/// `enforce` or `shadow`.
pub fn mode_name(m: DecisionMode) -> &'static str {
    match m {
        DecisionMode::Enforce => "enforce",
        DecisionMode::Shadow => "shadow",
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn workers_table(w: &[esper_protocol::control::Seen<esper_protocol::WorkerHeartbeat>]) -> String {
    let now = Utc::now();
    let mut t = Table::new(&[
        "WORKER",
        "STATE",
        "ALIVE",
        "UTIL",
        "CONCURRENCY",
        "EVENTS",
        "DECISIONS",
        "REVISION",
        "LAST SEEN",
    ]);
    for s in w {
        let b = &s.beat;
        t.row(vec![
            b.worker_id.clone(),
            // Asked, and not yet heard by the worker (its own state says when it is).
            if s.drain_asked {
                "drain asked".to_string()
            } else {
                b.state.clone()
            },
            yes_no(s.alive),
            format!("{:.0}%", b.utilization * 100.0),
            b.concurrency.to_string(),
            b.events_total.to_string(),
            b.decisions_total.to_string(),
            b.policies_revision.to_string(),
            relative(s.last_seen, now),
        ]);
    }
    t.render()
}

fn proxies_table(p: &[esper_protocol::control::Seen<esper_protocol::ProxyHeartbeat>]) -> String {
    let now = Utc::now();
    let mut t = Table::new(&[
        "PROXY",
        "ALIVE",
        "APPS",
        "CACHE",
        "REQUESTS",
        "SENT",
        "DROPPED",
        "STREAM",
        "CONFIG",
        "KEY",
        "LAST SEEN",
    ]);
    // Revisions of what the control plane handed out; "-" for none of its own.
    let revision = |r: i64| if r > 0 { r.to_string() } else { "-".into() };
    for s in p {
        let b = &s.beat;
        t.row(vec![
            b.proxy_id.clone(),
            yes_no(s.alive),
            b.apps.join(","),
            b.cache_entries.to_string(),
            b.requests_total.to_string(),
            b.events_sent_total.to_string(),
            b.events_dropped_total.to_string(),
            if b.stream_connected {
                "connected"
            } else {
                "disconnected"
            }
            .into(),
            revision(b.config_revision),
            revision(b.challenge_key_revision),
            relative(s.last_seen, now),
        ]);
    }
    t.render()
}

fn queue_line(q: &QueueStatus) -> String {
    format!(
        "depth {} of {}, leased {}, paused {}, ingested {}, acked {}, reclaimed {}, rejected {}",
        q.depth,
        q.max_size,
        q.leased,
        yes_no(q.paused),
        q.ingested_total,
        q.acked_total,
        q.reclaimed_total,
        q.rejected_total
    )
}

pub async fn status(ctx: &Ctx) -> Result<(), CtlError> {
    let v = ctx.client.get("/api/v1/status").await?;
    ctx.emit(v, |v| {
        let s: StatusReport = decode(&ctx.client, v)?;
        Ok(status_text(&s))
    })
}

/// `esperctl status`'s tables.
fn status_text(s: &StatusReport) -> String {
    let reach = |ok: bool| if ok { "reachable" } else { "UNREACHABLE" };
    let mut t = Table::new(&["COMPONENT", "STATE", "DETAIL"]);
    t.row(vec![
        "server".into(),
        if s.server.store_reachable {
            "ok"
        } else {
            "STORE UNREACHABLE"
        }
        .into(),
        match &s.server.store_error {
            None => format!(
                "esper {}, up {}, store {}",
                s.server.version,
                uptime(s.server.uptime_secs),
                s.server.store
            ),
            Some(e) => format!(
                "esper {}, up {}, store {}: {e}",
                s.server.version,
                uptime(s.server.uptime_secs),
                s.server.store
            ),
        },
    ]);
    t.row(vec![
        "ingestion".into(),
        reach(s.ingestion.reachable).into(),
        match (&s.ingestion.queue, &s.ingestion.error) {
            (Some(q), _) => format!("{} ({})", s.ingestion.url, queue_line(q)),
            (None, Some(e)) => format!("{}: {e}", s.ingestion.url),
            (None, None) => s.ingestion.url.clone(),
        },
    ]);
    t.row(vec![
        "mitigation".into(),
        reach(s.mitigation.reachable).into(),
        match &s.mitigation.error {
            None => format!("{} ({} active)", s.mitigation.url, s.mitigation.active),
            Some(e) => format!("{}: {e}", s.mitigation.url),
        },
    ]);
    if !s.server.store_reachable {
        // What the store holds is not known: zeros would read as none.
        for part in ["policies", "workers", "proxies"] {
            t.row(vec![
                part.into(),
                "UNKNOWN".into(),
                "the control store cannot be read".into(),
            ]);
        }
        return t.render();
    }
    t.row(vec![
        "policies".into(),
        "ok".into(),
        format!(
            "{} total, {} enabled, revision {}",
            s.policies.total, s.policies.enabled, s.policies.revision
        ),
    ]);
    let alive_w = s.workers.iter().filter(|w| w.alive).count();
    t.row(vec![
        "workers".into(),
        if alive_w > 0 { "ok" } else { "NONE ALIVE" }.into(),
        format!("{alive_w} alive of {}", s.workers.len()),
    ]);
    let alive_p = s.proxies.iter().filter(|p| p.alive).count();
    t.row(vec![
        "proxies".into(),
        "ok".into(),
        format!("{alive_p} alive of {}", s.proxies.len()),
    ]);
    let mut out = t.render();
    if !s.workers.is_empty() {
        out.push('\n');
        out.push_str(&workers_table(&s.workers));
    }
    if !s.proxies.is_empty() {
        out.push('\n');
        out.push_str(&proxies_table(&s.proxies));
    }
    out
}

pub async fn queue(ctx: &Ctx, cmd: QueueCmd) -> Result<(), CtlError> {
    let v = match cmd {
        QueueCmd::Status => ctx.client.get("/api/v1/queue/status").await?,
        QueueCmd::Pause => {
            ctx.client
                .post("/api/v1/queue/pause", &serde_json::json!({}))
                .await?
        }
        QueueCmd::Resume => {
            ctx.client
                .post("/api/v1/queue/resume", &serde_json::json!({}))
                .await?
        }
    };
    ctx.emit(v, |v| {
        let q: QueueStatus = decode(&ctx.client, v)?;
        let mut out = format!("{}\n", queue_line(&q));
        if !q.consumers.is_empty() {
            let now = Utc::now();
            let mut t = Table::new(&["CONSUMER", "LEASED", "LAST SEEN"]);
            for c in &q.consumers {
                t.row(vec![
                    c.consumer.clone(),
                    c.leased.to_string(),
                    relative(c.last_seen, now),
                ]);
            }
            out.push('\n');
            out.push_str(&t.render());
        }
        Ok(out)
    })
}

pub async fn rotate_challenge_key(ctx: &Ctx, drop_previous: bool) -> Result<(), CtlError> {
    let v = ctx
        .client
        .post(
            "/api/v1/proxies/challenge-key/rotate",
            &RotateChallengeKey {
                keep_previous: !drop_previous,
            },
        )
        .await?;
    ctx.emit(v, |v| {
        let r: RotatedChallengeKey = decode(&ctx.client, v)?;
        if r.revision == 1 {
            // No proxy had asked for a key yet: this one is the first.
            return Ok("challenge key made (revision 1); proxies sign with it as they hear of it\n".into());
        }
        let cookies = if r.previous_honoured {
            "cookies signed with the key before stay valid until they expire"
        } else {
            "cookies signed with any key before are refused"
        };
        Ok(format!(
            "challenge key rotated (revision {}); proxies sign with it as they hear of it; {cookies}\n",
            r.revision
        ))
    })
}

pub async fn workers(ctx: &Ctx) -> Result<(), CtlError> {
    let v = ctx.client.get("/api/v1/workers").await?;
    ctx.emit(v, |v| {
        let r: WorkersResponse = decode(&ctx.client, v)?;
        if r.workers.is_empty() {
            return Ok("no workers have reported\n".into());
        }
        Ok(workers_table(&r.workers))
    })
}

pub async fn drain_worker(ctx: &Ctx, id: &str) -> Result<(), CtlError> {
    let path = format!("/api/v1/workers/{}/drain", segment(id));
    let v = ctx.client.post(&path, &serde_json::json!({})).await?;
    ctx.emit(v, |_| {
        Ok(format!(
            "worker {id} is told to drain with its next heartbeat; it finishes the batches in hand and exits\n"
        ))
    })
}

pub async fn proxies(ctx: &Ctx) -> Result<(), CtlError> {
    let v = ctx.client.get("/api/v1/proxies").await?;
    ctx.emit(v, |v| {
        let r: ProxiesResponse = decode(&ctx.client, v)?;
        if r.proxies.is_empty() {
            return Ok("no proxies have reported\n".into());
        }
        Ok(proxies_table(&r.proxies))
    })
}

pub async fn decisions(ctx: &Ctx, cmd: DecisionCmd) -> Result<(), CtlError> {
    let DecisionCmd::List {
        entity,
        policy,
        mode,
        limit,
    } = cmd;
    let mut query = format!("limit={limit}");
    if let Some(e) = entity {
        let key: esper_protocol::EntityKey = e
            .parse()
            .map_err(|e: esper_protocol::EntityParseError| CtlError::Input(e.to_string()))?;
        query.push_str(&format!("&entity={}", segment(&key.to_string())));
    }
    if let Some(p) = policy {
        query.push_str(&format!("&policy={}", segment(&p)));
    }
    if let Some(m) = mode {
        if m != "enforce" && m != "shadow" {
            return Err(CtlError::Input(format!(
                "--mode `{m}` is not enforce or shadow"
            )));
        }
        query.push_str(&format!("&mode={m}"));
    }
    let v = ctx
        .client
        .get(&format!("/api/v1/decisions?{query}"))
        .await?;
    ctx.emit(v, |v| {
        let r: DecisionsResponse = decode(&ctx.client, v)?;
        if r.decisions.is_empty() {
            return Ok("no decisions\n".into());
        }
        let mut t = Table::new(&[
            "DECIDED", "ENTITY", "POLICY", "MODE", "ACTION", "BY", "REVOKED",
        ]);
        for d in r.decisions {
            let dec = d.decision;
            t.row(vec![
                rfc3339(dec.decided_at),
                dec.mitigation.entity.to_string(),
                dec.policy_id.unwrap_or_else(|| "-".into()),
                mode_name(dec.mode).into(),
                dec.mitigation.action.to_string(),
                dec.decided_by,
                d.revoked_at.map(rfc3339).unwrap_or_else(|| "-".into()),
            ]);
        }
        Ok(t.render())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(store_reachable: bool) -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "server": {"version": "1", "uptime_secs": 5, "store": "postgres",
                       "store_reachable": store_reachable,
                       "store_error": (!store_reachable).then_some("connection refused")},
            "ingestion": {"url": "http://i", "reachable": true},
            "mitigation": {"url": "http://m", "reachable": true, "active": 3},
            "workers": [], "proxies": [],
            "policies": {"total": 0, "enabled": 0, "revision": 0}
        }))
        .unwrap()
    }

    #[test]
    fn a_store_that_cannot_be_read_shows_unknown_rather_than_zeros() {
        let text = status_text(&report(false));
        assert!(text.contains("STORE UNREACHABLE"), "{text}");
        assert!(
            text.contains("store postgres: connection refused"),
            "{text}"
        );
        for part in ["policies", "workers", "proxies"] {
            let line = text.lines().find(|l| l.starts_with(part)).unwrap();
            assert!(line.contains("UNKNOWN"), "{text}");
        }
        assert!(!text.contains("0 total"), "{text}");
        assert!(!text.contains("NONE ALIVE"), "{text}");
        let text = status_text(&report(true));
        assert!(text.contains("0 total, 0 enabled, revision 0"), "{text}");
    }
}
