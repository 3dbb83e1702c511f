//! The control plane's durable decision log as a service outside the control plane
//! sees it: append decisions, mark them revoked, and read back the ones still in force
//! (a mitigation broker with `PERSISTENCE_ENABLED` keeps its durable copy there).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::client::{ClientError, Resend, ServiceClient, encode};
use crate::control::{Decision, DecisionBatch};
use crate::entity::EntityKey;
use crate::mitigation::RevokeResponse;

/// Most decisions one page of [`DecisionLogClient::active_page`] may ask for.
pub const MAX_DECISION_PAGE: usize = 1000;

/// `POST /api/v1/decisions/revoke` body: marks logged decisions revoked, without touching
/// any broker. Exactly one of `id`, `entity` or `all` selects what is marked.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRevoke {
    /// One decision (the mitigation id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Every decision about this exact entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<EntityKey>,
    /// Every decision in force (a cleared mitigation cache).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// When the revocation happened (it may reach the log later); only decisions still
    /// in force at that time are marked, and for `entity` or `all` only those made by
    /// then.
    pub revoked_at: DateTime<Utc>,
    /// Who revoked, e.g. `mitigation-broker`.
    pub revoked_by: String,
}

/// Most revocations one page of `GET /api/v1/decisions/revocations` may hold.
pub const MAX_REVOCATION_PAGE: usize = 5000;

/// A policy's decision revoked while in force, and not yet past its expiry: what workers
/// need to re-arm the policy for the entity (`GET /api/v1/decisions/revocations`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevokedDecision {
    /// The log's revocation number: it grows with each revocation written (decisions
    /// revoked together share it), in the order the writes commit, so a reader that
    /// pages by it misses none, even one that reached the log late.
    pub seq: i64,
    /// The decision (mitigation) id.
    pub id: String,
    pub policy_id: String,
    pub entity: EntityKey,
    pub decided_at: DateTime<Utc>,
    pub revoked_at: DateTime<Utc>,
}

/// Where the next page of revocations starts: after revocation number `seq` (all of it),
/// or after decision `id` within it. Written `<seq>` or `<seq>,<id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationMark {
    pub seq: i64,
    pub id: Option<String>,
}

impl RevocationMark {
    /// The mark just after `r`.
    pub fn after(r: &RevokedDecision) -> RevocationMark {
        RevocationMark {
            seq: r.seq,
            id: Some(r.id.clone()),
        }
    }

    /// The `after` query value.
    pub fn to_query(&self) -> String {
        match &self.id {
            Some(id) => format!("{},{id}", self.seq),
            None => self.seq.to_string(),
        }
    }

    /// Parses an `after` query value.
    pub fn parse(text: &str) -> Option<RevocationMark> {
        let (seq, id) = match text.split_once(',') {
            Some((seq, id)) if !id.is_empty() => (seq, Some(id.to_string())),
            Some(_) => return None,
            None => (text, None),
        };
        Some(RevocationMark {
            seq: seq.parse().ok()?,
            id,
        })
    }
}

impl Serialize for RevocationMark {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_query())
    }
}

impl<'de> Deserialize<'de> for RevocationMark {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RevocationMark, D::Error> {
        let text = String::deserialize(d)?;
        RevocationMark::parse(&text)
            .ok_or_else(|| serde::de::Error::custom("expected `<seq>` or `<seq>,<id>`"))
    }
}

/// `GET /api/v1/decisions/revocations` answer, in the order revoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevokedDecisions {
    pub revocations: Vec<RevokedDecision>,
    /// Pass it back as `after` for what follows. It moves past revocations that no
    /// longer matter too (their decisions expired), so a reader does not scan them
    /// again; a page as long as the `limit` asked for may have more behind it.
    pub next: RevocationMark,
}

/// One entry of `GET /api/v1/decisions`, as far as a client needs it.
#[derive(Clone, Debug, Deserialize)]
struct LoggedEntry {
    decision: Decision,
}

/// `GET /api/v1/decisions` answer.
#[derive(Clone, Debug, Deserialize)]
struct LoggedPage {
    decisions: Vec<LoggedEntry>,
}

/// Where the next page of decisions in force starts: after this decision, in the log's
/// order (newest first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageMark {
    pub decided_at: DateTime<Utc>,
    pub id: String,
}

impl PageMark {
    /// The mark just after `d`.
    pub fn after(d: &Decision) -> PageMark {
        PageMark {
            decided_at: d.decided_at,
            id: d.id.clone(),
        }
    }

    /// The `before` query value: `<RFC 3339 time>,<id>`.
    pub fn to_query(&self) -> String {
        format!(
            "{},{}",
            self.decided_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            self.id
        )
    }

    /// Parses a `before` query value.
    pub fn parse(text: &str) -> Option<PageMark> {
        let (at, id) = text.split_once(',')?;
        let decided_at = DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc);
        (!id.is_empty()).then(|| PageMark {
            decided_at,
            id: id.to_string(),
        })
    }
}

/// Client of the control plane's decision log (API port 8080 by default).
#[derive(Clone, Debug)]
pub struct DecisionLogClient {
    base: ServiceClient,
}

impl DecisionLogClient {
    /// A client of the control plane at `url` with its API token.
    pub fn new(url: &str, token: Option<String>) -> DecisionLogClient {
        DecisionLogClient {
            base: ServiceClient::new(url, token, Duration::from_secs(10)),
        }
    }

    /// The control plane's URL in force, as given (a reload may replace it).
    pub fn url(&self) -> String {
        self.base.endpoints.given()
    }

    /// The control plane instances this client and its clones call; [`crate::Endpoints::set`]
    /// replaces them for all.
    pub fn endpoints(&self) -> &crate::Endpoints {
        &self.base.endpoints
    }

    /// This client, calling the instances of `endpoints` (shared with its other
    /// holders) instead.
    pub fn with_endpoints(mut self, endpoints: crate::Endpoints) -> Self {
        self.base.endpoints = endpoints;
        self
    }

    /// The token this client and its clones send; [`crate::Token::set`] replaces it for all.
    pub fn token(&self) -> &crate::Token {
        &self.base.token
    }

    /// This client, sending `token` (shared with its other holders) instead.
    pub fn with_token(mut self, token: crate::Token) -> Self {
        self.base.token = token;
        self
    }

    /// `POST /api/v1/decisions`: appends, ignoring ids already logged.
    pub async fn record(&self, decisions: Vec<Decision>) -> Result<(), ClientError> {
        self.base
            .post::<_, serde::de::IgnoredAny>(
                "/api/v1/decisions",
                &DecisionBatch { decisions },
                Resend::Unanswered,
            )
            .await
            .map(|_| ())
    }

    /// `POST /api/v1/decisions/revoke`: returns how many logged decisions were marked.
    pub async fn revoke(&self, req: &DecisionRevoke) -> Result<usize, ClientError> {
        self.base
            .post::<_, RevokeResponse>("/api/v1/decisions/revoke", req, Resend::Never)
            .await
            .map(|r| r.revoked)
    }

    /// One page (newest first) of the enforced decisions neither revoked nor expired,
    /// starting after `before`; a page shorter than `limit` is the last.
    pub async fn active_page(
        &self,
        before: Option<&PageMark>,
        limit: usize,
    ) -> Result<Vec<Decision>, ClientError> {
        let mut path = format!(
            "/api/v1/decisions?active=true&limit={}",
            limit.clamp(1, MAX_DECISION_PAGE)
        );
        if let Some(mark) = before {
            path.push_str("&before=");
            path.push_str(&encode(&mark.to_query()));
        }
        let page: LoggedPage = self.base.get(&path).await?;
        Ok(page.decisions.into_iter().map(|e| e.decision).collect())
    }
}

/// What became of a run of decisions sent by [`record_in_halves`].
#[derive(Debug, Default)]
pub struct Recorded {
    /// Decisions the log took.
    pub logged: usize,
    /// Decisions it refused, one by one, and why (the last refusal).
    pub refused: usize,
    pub refusal: Option<ClientError>,
    /// The error that stopped the sending: the log is away, or refused the sender
    /// itself (see [`ClientError::is_setup_refusal`]). The whole run is to be sent again;
    /// the log takes what it has already as the same decisions.
    pub stopped: Option<ClientError>,
}

/// Sends a run of decisions through `record` (one `POST /api/v1/decisions` a call). A
/// run the log refuses (too large for its body limit, or holding a decision it will
/// not take) is sent again in halves, down to single decisions, so that one bad
/// decision, or a limit lower than the run, costs only what the log cannot take.
pub async fn record_in_halves<F, Fut>(decisions: &[Decision], mut record: F) -> Recorded
where
    F: FnMut(Vec<Decision>) -> Fut,
    Fut: Future<Output = Result<(), ClientError>>,
{
    let mut out = Recorded::default();
    // Halves still to send, the next last, so that they go in order.
    let mut parts = vec![decisions];
    while let Some(part) = parts.pop() {
        if part.is_empty() {
            continue;
        }
        match record(part.to_vec()).await {
            Ok(()) => out.logged += part.len(),
            Err(e) if e.is_transient() || e.is_setup_refusal() => {
                out.stopped = Some(e);
                return out;
            }
            Err(_) if part.len() > 1 => {
                let (first, second) = part.split_at(part.len() / 2);
                parts.push(second);
                parts.push(first);
            }
            Err(e) => {
                out.refused += 1;
                out.refusal = Some(e);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn decision(id: &str) -> Decision {
        let mitigation = crate::Mitigation::new(
            "ip:192.0.2.1".parse().unwrap(),
            crate::Action::Block,
            Duration::from_secs(60),
            crate::Origin::Manual,
            crate::Reason {
                policy_id: None,
                summary: "test".into(),
            },
        );
        Decision {
            id: id.into(),
            decided_at: mitigation.created_at,
            mitigation,
            mode: crate::control::DecisionMode::Enforce,
            policy_id: None,
            policy_version: None,
            counted: None,
            threshold: None,
            window_secs: None,
            decided_by: "test".into(),
        }
    }

    fn api(status: u16) -> ClientError {
        ClientError::Api {
            status,
            code: "x".into(),
            message: "x".into(),
        }
    }

    #[tokio::test]
    async fn a_refused_run_is_sent_in_halves_down_to_what_the_log_refuses() {
        let run: Vec<Decision> = (0..10).map(|i| decision(&format!("d{i}"))).collect();
        // At most 3 decisions a request, and never d6.
        let logged = RefCell::new(Vec::new());
        let calls = RefCell::new(0);
        let out = record_in_halves(&run, async |part: Vec<Decision>| {
            *calls.borrow_mut() += 1;
            if part.len() > 3 {
                return Err(api(413));
            }
            if part.iter().any(|d| d.id == "d6") {
                return Err(api(422));
            }
            logged
                .borrow_mut()
                .extend(part.iter().map(|d| d.id.clone()));
            Ok(())
        })
        .await;
        let expected: Vec<String> = (0..10)
            .filter(|i| *i != 6)
            .map(|i| format!("d{i}"))
            .collect();
        assert_eq!(
            *logged.borrow(),
            expected,
            "in order, all but the refused one"
        );
        assert_eq!((out.logged, out.refused), (9, 1));
        assert!(matches!(
            out.refusal,
            Some(ClientError::Api { status: 422, .. })
        ));
        assert!(out.stopped.is_none());
        assert!(*calls.borrow() < 20, "{} calls", calls.borrow());

        // The log away, or the sender refused: stop at once, for the whole run again.
        for status in [503, 401] {
            let out = record_in_halves(&run, async |_| Err(api(status))).await;
            assert_eq!((out.logged, out.refused), (0, 0));
            assert!(out.stopped.is_some());
        }
    }

    #[test]
    fn page_marks_round_trip_and_ids_may_hold_commas() {
        let mark = PageMark {
            decided_at: "2026-01-02T03:04:05.123456Z".parse().unwrap(),
            id: "a,b".into(),
        };
        assert_eq!(PageMark::parse(&mark.to_query()), Some(mark));
        assert_eq!(PageMark::parse("yesterday,x"), None);
        assert_eq!(PageMark::parse("2026-01-02T03:04:05Z,"), None);
        for mark in [
            RevocationMark {
                seq: 42,
                id: Some("a,b".into()),
            },
            RevocationMark { seq: 7, id: None },
        ] {
            assert_eq!(RevocationMark::parse(&mark.to_query()), Some(mark.clone()));
            let json = serde_json::to_string(&mark).unwrap();
            assert_eq!(serde_json::from_str::<RevocationMark>(&json).unwrap(), mark);
        }
        assert_eq!(RevocationMark::parse("x,y"), None);
        assert_eq!(RevocationMark::parse("1,"), None);
        assert!(serde_json::from_str::<RevocationMark>("\"soon\"").is_err());
    }

    #[test]
    fn a_revocation_names_its_target_only() {
        let r = DecisionRevoke {
            all: true,
            revoked_at: "2026-01-02T03:04:05Z".parse().unwrap(),
            revoked_by: "mitigation-broker".into(),
            ..DecisionRevoke::default()
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["all"], true);
        assert!(json.get("id").is_none());
        let back: DecisionRevoke = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }
}
