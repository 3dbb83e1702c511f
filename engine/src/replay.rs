//! Offline replay: recorded events (JSON lines) through policies with in-memory state,
//! giving the decisions they would have made, when and why. Nothing is published.
//!
//! Events are evaluated in the order of their timestamps (a recording's own order for
//! equal times), each at its own timestamp, so windows, cooldowns and ttls run in the
//! recording's time and a replay always gives the same decisions. Recordings of several
//! proxies can be concatenated, and one event stamped far ahead (a client's clock, a
//! hand edit) moves only itself to the end.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use esper_protocol::{Action, DecisionMode, EntityKey, RequestEvent};
use prometheus::Registry;
use serde::Serialize;

use crate::eval::{Evaluator, MemoryState, PolicySet};
use crate::policy::{ActivePolicies, PolicySpec};

/// Entities and event ids the replay state may hold.
const REPLAY_CAPACITY: usize = 1_000_000;
/// How long the replay remembers offenses (for repeat offenders) and event ids: as a
/// worker does by default, so a replay grows ttls as the live engine would.
const REPLAY_STATE_TTL: Duration = crate::worker::DEFAULT_STATE_TTL;

/// One decision of a replay.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayDecision {
    /// Event time of the event that triggered it.
    pub time: DateTime<Utc>,
    /// The triggering event's id.
    pub event_id: String,
    pub policy: String,
    pub entity: EntityKey,
    pub mode: DecisionMode,
    pub action: Action,
    pub ttl_secs: u64,
    /// The measured value and the threshold it reached, over `window_secs`.
    pub counted: f64,
    pub threshold: f64,
    pub window_secs: u64,
    /// The policy's condition, as written.
    pub condition: String,
    pub summary: String,
}

/// The result of a replay.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReplayReport {
    pub events: usize,
    pub decisions: Vec<ReplayDecision>,
    /// Problems found compiling the policies (missing lists, ...).
    pub warnings: Vec<String>,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("events line {line}: {message}")]
    Event { line: usize, message: String },
    #[error("{0}")]
    State(#[from] crate::eval::StateError),
}

/// Reads JSON-lines events (the proxy's recording format). Blank lines and lines
/// starting with `#` are skipped; an event without an `id` gets `line-N`.
pub fn read_events(text: &str) -> Result<Vec<RequestEvent>, ReplayError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let err = |message: String| ReplayError::Event {
            line: line_no,
            message,
        };
        let mut v: serde_json::Value = serde_json::from_str(t).map_err(|e| err(e.to_string()))?;
        // serde's own message for a time without its zone is "premature end of input".
        let timestamp = v
            .get("timestamp")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        if let Some(obj) = v.as_object_mut() {
            obj.entry("id")
                .or_insert_with(|| serde_json::Value::String(format!("line-{line_no}")));
        }
        let event: RequestEvent = serde_json::from_value(v).map_err(|e| match &timestamp {
            Some(at) if DateTime::parse_from_rfc3339(at).is_err() => err(format!(
                "timestamp {at:?} is not an RFC 3339 time with its zone \
                 (2026-01-01T12:00:00Z or 2026-01-01T13:00:00+01:00)"
            )),
            _ => err(e.to_string()),
        })?;
        event.check().map_err(err)?;
        out.push(event);
    }
    Ok(out)
}

/// Replays `events`, in order, through the enabled policies of `active`.
pub async fn replay(
    active: &ActivePolicies,
    events: &[RequestEvent],
) -> Result<ReplayReport, ReplayError> {
    let set = PolicySet::compile(active);
    let state = Arc::new(MemoryState::new(REPLAY_STATE_TTL, REPLAY_CAPACITY));
    let evaluator = Evaluator::new(state, "replay", &Registry::new());
    let mut report = ReplayReport {
        warnings: set.warnings().to_vec(),
        ..ReplayReport::default()
    };
    report
        .warnings
        .extend(active.policies.iter().filter(|p| !p.enabled).map(|p| {
            format!(
                "policy \"{}\" is disabled (enabled = false): not replayed",
                p.id
            )
        }));
    let mut ordered: Vec<&RequestEvent> = events.iter().collect();
    ordered.sort_by_key(|e| e.timestamp);
    for event in ordered {
        let now = event.timestamp;
        let out = evaluator
            .evaluate(&set, std::slice::from_ref(event), now)
            .await?;
        evaluator.commit(&out, now).await?;
        report.events += 1;
        for d in out.decisions {
            let spec = set
                .policies()
                .iter()
                .find(|p| Some(p.spec.id.as_str()) == d.policy_id.as_deref())
                .map(|p| p.spec.clone());
            let ttl = (d.mitigation.expires_at - d.mitigation.created_at)
                .num_seconds()
                .max(0);
            report.decisions.push(ReplayDecision {
                time: event.timestamp,
                event_id: event.id.clone(),
                policy: d.policy_id.clone().unwrap_or_default(),
                entity: d.mitigation.entity.clone(),
                mode: d.mode,
                action: d.mitigation.action.clone(),
                ttl_secs: ttl as u64,
                counted: d.counted.unwrap_or_default(),
                threshold: d.threshold.unwrap_or_default(),
                window_secs: d.window_secs.unwrap_or_default(),
                condition: spec
                    .as_deref()
                    .map(PolicySpec::condition)
                    .unwrap_or_default(),
                summary: d.mitigation.reason.summary.clone(),
            });
        }
    }
    Ok(report)
}

/// [`replay`] for policies from a file (no lists, no versions).
pub async fn replay_specs(
    specs: Vec<PolicySpec>,
    events: &[RequestEvent],
) -> Result<ReplayReport, ReplayError> {
    let named_lists = specs.iter().any(|s| s.list_refs().next().is_some());
    let active = ActivePolicies {
        policies: specs,
        ..ActivePolicies::default()
    };
    let mut report = replay(&active, events).await?;
    if named_lists {
        // Said first: the warnings after it name each list as missing.
        report.warnings.insert(
            0,
            "named lists are not read by an offline replay: each list these policies name \
             is empty here"
                .to_string(),
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policies;

    const POLICY: &str = r#"
[[policy]]
id = "login"
window = "1m"
threshold = 3
action = "block"
ttl = "2m"
filter = 'path == "/login"'
count_if = 'status == 401'
"#;

    fn line(secs: u32, ip: &str, status: u16) -> String {
        format!(
            r#"{{"timestamp":"2026-01-01T12:00:{secs:02}Z","client_ip":"{ip}","method":"POST","path":"/login","status":{status}}}"#
        )
    }

    #[tokio::test]
    async fn replays_in_event_time_and_says_why() {
        let text = [
            "# a recording".to_string(),
            line(0, "10.0.0.1", 401),
            line(1, "10.0.0.1", 200),
            line(2, "10.0.0.1", 401),
            String::new(),
            line(3, "10.0.0.1", 401),
            line(4, "10.0.0.1", 401),
        ]
        .join("\n");
        let events = read_events(&text).unwrap();
        assert_eq!(events[0].id, "line-2");
        let r = replay_specs(parse_policies(POLICY).unwrap(), &events)
            .await
            .unwrap();
        assert_eq!(r.events, 5);
        assert_eq!(r.decisions.len(), 1, "the decision stands: no second one");
        let d = &r.decisions[0];
        assert_eq!(d.time.to_rfc3339(), "2026-01-01T12:00:03+00:00");
        assert_eq!(d.event_id, "line-6");
        assert_eq!(
            (d.counted, d.threshold, d.window_secs, d.ttl_secs),
            (3.0, 3.0, 60, 120)
        );
        assert_eq!(d.entity.to_string(), "ip:10.0.0.1");
        assert_eq!(d.condition, "path == \"/login\"; counting status == 401");
        // The same replay gives the same decisions.
        let again = replay_specs(parse_policies(POLICY).unwrap(), &events)
            .await
            .unwrap();
        assert_eq!(again.decisions.len(), 1);
        assert_eq!(again.decisions[0].time, d.time);
    }

    #[tokio::test]
    async fn a_policy_can_leave_out_what_the_proxies_answered_themselves() {
        // Two requests reached the app, then the client was blocked and kept trying.
        let text: Vec<String> = (0..6)
            .map(|s| {
                let l = line(s, "10.0.0.1", if s < 2 { 401 } else { 403 });
                if s < 2 {
                    l
                } else {
                    l.replace("}", r#","action":"block"}"#)
                }
            })
            .collect();
        let events = read_events(&text.join("\n")).unwrap();
        let every = POLICY.replace("count_if = 'status == 401'", "");
        let reached = POLICY.replace(
            "count_if = 'status == 401'",
            r#"count_if = 'action in ["allow", "log", "tarpit"]'"#,
        );
        let decided = |policy: String| {
            let events = &events;
            async move {
                replay_specs(parse_policies(&policy).unwrap(), events)
                    .await
                    .unwrap()
                    .decisions
                    .len()
            }
        };
        assert_eq!(decided(every).await, 1, "the blocked retries count");
        assert_eq!(
            decided(reached).await,
            0,
            "only what reached the app counts"
        );
    }

    #[tokio::test]
    async fn a_replay_says_it_reads_no_lists() {
        let events = read_events(&line(0, "10.0.0.1", 401)).unwrap();
        let r = replay_specs(parse_policies(POLICY).unwrap(), &events)
            .await
            .unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let listed = format!("{POLICY}[policy.match]\nip_not_in_list = \"office\"\n");
        let specs = parse_policies(&listed).unwrap();
        assert_eq!(specs[0].list_refs().collect::<Vec<_>>(), ["office"]);
        let r = replay_specs(specs, &events).await.unwrap();
        assert!(
            r.warnings[0].starts_with("named lists are not read by an offline replay"),
            "{:?}",
            r.warnings
        );
        assert!(r.warnings[1].contains("\"office\""), "{:?}", r.warnings);
    }

    #[tokio::test]
    async fn events_are_replayed_in_time_order_whatever_the_file_order() {
        let first: Vec<String> = (0..3).map(|s| line(s, "10.0.0.1", 401)).collect();
        let second: Vec<String> = (10..13).map(|s| line(s, "10.0.0.2", 401)).collect();
        let expected = [
            ("2026-01-01T12:00:02+00:00", "ip:10.0.0.1"),
            ("2026-01-01T12:00:12+00:00", "ip:10.0.0.2"),
        ];
        // Two proxies' recordings concatenated, the later one first; and one event
        // stamped a year ahead among them.
        let ahead = line(0, "10.0.0.3", 401).replace("2026-", "2027-");
        let mut text = second.clone();
        text.push(ahead);
        text.extend(first);
        let events = read_events(&text.join("\n")).unwrap();
        let r = replay_specs(parse_policies(POLICY).unwrap(), &events)
            .await
            .unwrap();
        let got: Vec<(String, String)> = r
            .decisions
            .iter()
            .map(|d| (d.time.to_rfc3339(), d.entity.to_string()))
            .collect();
        let want: Vec<(String, String)> = expected
            .iter()
            .map(|(t, e)| (t.to_string(), e.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_disabled_policy_is_named_as_not_replayed() {
        let off = POLICY.replace("ttl = \"2m\"", "ttl = \"2m\"\nenabled = false");
        let events = read_events(&line(0, "10.0.0.1", 401)).unwrap();
        let r = replay_specs(parse_policies(&off).unwrap(), &events)
            .await
            .unwrap();
        assert_eq!(
            r.warnings,
            ["policy \"login\" is disabled (enabled = false): not replayed"]
        );
    }

    #[test]
    fn bad_lines_are_named() {
        let err = read_events(r#"{"timestamp":"2026-01-01T12:00:00"}"#).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "events line 1: timestamp \"2026-01-01T12:00:00\" is not an RFC 3339 time"
            ),
            "{err}"
        );
        let err = read_events("\n{\"nope\": 1}\n").unwrap_err();
        assert!(err.to_string().starts_with("events line 2: "), "{err}");
        let err = read_events("{").unwrap_err();
        assert!(err.to_string().starts_with("events line 1: "), "{err}");
        let weighed = format!("{}\n", line(1, "192.0.2.1", 401)).replace('}', ",\"weight\":-5}");
        let err = read_events(&weighed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "events line 1: weight must be above 0 (1 / the sample rate), not -5"
        );
    }
}
