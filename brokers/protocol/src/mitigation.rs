//! Mitigations (decisions in force against an entity) and the delta stream that carries
//! them from the mitigation broker to proxies.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::entity::EntityKey;

/// What to do with a request from a mitigated entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Answer 403.
    Block,
    /// Allow `rate` requests per second with bursts of `burst`; answer 429 beyond that.
    Throttle { rate: f64, burst: u32 },
    /// Hold the request for `delay_ms` before forwarding it.
    Tarpit { delay_ms: u64 },
    /// Answer with a proof-of-work interstitial: the client must find a nonce whose
    /// SHA-256 has `difficulty` leading zero bits, then gets a signed clearance cookie
    /// that lets its requests through until it expires. Clients that pass cost the
    /// app nothing more; clients that cannot run the puzzle are effectively blocked.
    Challenge { difficulty: u8 },
    /// Forward, but record that the mitigation matched.
    Log,
}

/// The years a time given to a broker or the control plane may fall in. The decision
/// log keeps times as RFC 3339 text and compares them as text, which holds for years of
/// four digits only; a time outside them (chrono reads `-0001-...` and `+10000-...`)
/// would be stored in a form the log cannot read back.
pub const TIME_YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;

/// Refuses a time outside [`TIME_YEARS`], naming the field.
pub fn check_time(field: &str, t: &DateTime<Utc>) -> Result<(), String> {
    use chrono::Datelike;
    if TIME_YEARS.contains(&t.year()) {
        return Ok(());
    }
    Err(format!(
        "{field} {} is out of range (years {} to {})",
        t.to_rfc3339(),
        TIME_YEARS.start(),
        TIME_YEARS.end()
    ))
}

/// How far ahead of the receiving clock a decision or mitigation may be dated: a
/// publisher's clock a little ahead is not a reason to lose what it decided.
pub const MAX_CLOCK_AHEAD: std::time::Duration = std::time::Duration::from_secs(3600);

/// Refuses `t` (the `field` of a record) dated more than [`MAX_CLOCK_AHEAD`] after `now`.
pub fn not_ahead(field: &str, t: &DateTime<Utc>, now: DateTime<Utc>) -> Result<(), String> {
    let latest = now + chrono::Duration::from_std(MAX_CLOCK_AHEAD).unwrap_or_default();
    if *t > latest {
        return Err(format!(
            "{field} {} is more than {}h ahead of this server's clock",
            t.to_rfc3339(),
            MAX_CLOCK_AHEAD.as_secs() / 3600
        ));
    }
    Ok(())
}

/// Highest challenge difficulty (leading zero bits): beyond it a browser needs minutes.
pub const MAX_CHALLENGE_DIFFICULTY: u8 = 24;
/// Longest tarpit delay a mitigation may ask for (proxies may cap it lower).
pub const MAX_TARPIT_MS: u64 = 60_000;
/// Highest throttle rate, requests per second.
pub const MAX_THROTTLE_RATE: f64 = 1e12;
/// Largest throttle burst.
pub const MAX_THROTTLE_BURST: u32 = 1_000_000;

impl Action {
    /// Why the action cannot be enforced as given: every publisher (the engine, the
    /// control plane, the broker's API) refuses the same parameters.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Action::Throttle { rate, burst }
                if !(rate > 0.0
                    && rate <= MAX_THROTTLE_RATE
                    && (1..=MAX_THROTTLE_BURST).contains(&burst)) =>
            {
                Err(format!(
                    "throttle rate {rate} must be above 0 (at most {MAX_THROTTLE_RATE:e}) and \
                     burst {burst} 1 to {MAX_THROTTLE_BURST}"
                ))
            }
            Action::Tarpit { delay_ms } if delay_ms == 0 || delay_ms > MAX_TARPIT_MS => Err(
                format!("tarpit delay_ms {delay_ms} is out of range (1 to {MAX_TARPIT_MS})"),
            ),
            Action::Challenge { difficulty }
                if difficulty == 0 || difficulty > MAX_CHALLENGE_DIFFICULTY =>
            {
                Err(format!(
                    "challenge difficulty {difficulty} is out of range \
                     (1 to {MAX_CHALLENGE_DIFFICULTY})"
                ))
            }
            _ => Ok(()),
        }
    }

    /// How severe the action is, for choosing among several mitigations of one request.
    ///
    /// A challenge ranks above a tarpit and below a block: it stops every request until
    /// the client proves work (a tarpit only delays), yet a real browser gets through.
    pub fn severity(&self) -> u8 {
        match self {
            Action::Block => 5,
            Action::Challenge { .. } => 4,
            Action::Tarpit { .. } => 3,
            Action::Throttle { .. } => 2,
            Action::Log => 1,
        }
    }

    /// The short name (`block`, `throttle`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Throttle { .. } => "throttle",
            Action::Tarpit { .. } => "tarpit",
            Action::Challenge { .. } => "challenge",
            Action::Log => "log",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Block => f.write_str("block"),
            Action::Throttle { rate, burst } => write!(f, "throttle({rate}/s, burst {burst})"),
            Action::Tarpit { delay_ms } => write!(f, "tarpit({delay_ms}ms)"),
            Action::Challenge { difficulty } => write!(f, "challenge({difficulty} bits)"),
            Action::Log => f.write_str("log"),
        }
    }
}

/// Where a mitigation applies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every app behind every proxy.
    #[default]
    Global,
    /// Only requests for this app.
    App(String),
}

/// Longest app name, as proxies take them.
pub const MAX_APP_NAME_LEN: usize = 128;

impl Scope {
    /// Refuses an app no proxy could name (empty, too long, control characters): a
    /// mitigation scoped to it would never apply. Every publisher checks it alike.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Scope::App(app)
                if app.trim().is_empty()
                    || app.len() > MAX_APP_NAME_LEN
                    || app.chars().any(char::is_control) =>
            {
                Err(format!(
                    "scope app `{}` must be 1 to {MAX_APP_NAME_LEN} printable characters",
                    app.escape_debug()
                ))
            }
            _ => Ok(()),
        }
    }

    /// Does a mitigation with this scope apply to a request for `app`?
    pub fn applies_to(&self, app: &str) -> bool {
        match self {
            Scope::Global => true,
            Scope::App(a) => a == app,
        }
    }
}

/// Who made the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Policy,
    Manual,
    List,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Policy => "policy",
            Origin::Manual => "manual",
            Origin::List => "list",
        })
    }
}

/// Why the decision was made.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// The policy that fired, for origin `policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
    /// A one-line human summary, e.g. `12 weighted events >= 10 in 60s`.
    pub summary: String,
}

/// A decision in force against an entity until `expires_at`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mitigation {
    pub id: String,
    pub entity: EntityKey,
    pub action: Action,
    #[serde(default)]
    pub scope: Scope,
    pub reason: Reason,
    pub origin: Origin,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl Mitigation {
    /// A new mitigation with a fresh id, in force from now for `ttl`.
    pub fn new(
        entity: EntityKey,
        action: Action,
        ttl: Duration,
        origin: Origin,
        reason: Reason,
    ) -> Mitigation {
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        Mitigation {
            id: uuid::Uuid::new_v4().to_string(),
            entity,
            action,
            scope: Scope::Global,
            reason,
            origin,
            created_at: now,
            expires_at: now
                .checked_add_signed(ttl)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// Why its times cannot be stored (see [`TIME_YEARS`]).
    pub fn check_times(&self) -> Result<(), String> {
        check_time("created_at", &self.created_at)?;
        check_time("expires_at", &self.expires_at)
    }

    /// Refuses a creation dated more than [`MAX_CLOCK_AHEAD`] after `now`: the decision
    /// log refuses such a decision (it would head its newest-first listing for ever),
    /// so a broker that took it would enforce what its durable copy lost.
    pub fn check_not_ahead(&self, now: DateTime<Utc>) -> Result<(), String> {
        not_ahead("created_at", &self.created_at, now)
    }

    /// Is it still in force at `now`?
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.expires_at > now
    }
}

/// One change in the delta stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// A mitigation was published (or replaced, same id).
    Upsert { mitigation: Mitigation },
    /// A mitigation was revoked before its expiry.
    Remove { id: String },
}

/// An answer of `GET /api/mitigations/stream?cursor=...`.
///
/// When `snapshot` is true `changes` (all upserts) is the complete active set, or a page
/// of it: that happens on the first call, when the cursor is too old or from another
/// store generation (after `cache/clear`, say). A snapshot arrives in pages of at most
/// the broker's page size; a client MUST follow `more` until it is absent (a client
/// that ignores it sees only the first page, which is the whole set only when it fits
/// one page). Every page of one snapshot carries the same `cursor`: the change-stream
/// position taken before its first page was read. Once the last page is in, the client
/// replaces what it holds with the pages' union and asks for the changes after that
/// cursor; replaying them (idempotent upserts and removes) makes the set exact even when
/// mitigations changed while the pages were fetched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaPage {
    /// Opaque; pass it back to get the changes after this page.
    pub cursor: String,
    pub snapshot: bool,
    pub changes: Vec<Change>,
    /// On a snapshot page, present when the snapshot continues: pass it back as
    /// `snapshot_after`, with this page's `cursor`, for the next page. An answer to such
    /// a request that carries another cursor is the first page of a new snapshot (the
    /// old one could not be continued: its cursor went stale); start over with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub more: Option<String>,
    /// On the first page of a snapshot, how many mitigations were active when it began:
    /// a hint for sizing what the pages are assembled into (the pages' union can differ
    /// when mitigations change meanwhile). Absent elsewhere, and from older brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// On a snapshot page, the broker is restoring what is in force from the decision
    /// log (its store was empty at start, or lost its data): the snapshot may lack
    /// mitigations still in force, which come as changes once restored. A follower adds
    /// it to what it holds rather than replacing that. Absent when false, and from older
    /// brokers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restoring: bool,
}

/// `POST /api/mitigations` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub mitigations: Vec<Mitigation>,
}

/// `POST /api/mitigations` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResponse {
    pub accepted: usize,
    pub cursor: String,
}

/// `GET /api/mitigations/active` and `/entity/{entity}` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MitigationList {
    pub mitigations: Vec<Mitigation>,
    /// Total active (may exceed `mitigations.len()` when a limit applied).
    pub total: usize,
}

/// `POST /api/mitigations/revoke` body: by id, or every mitigation of an entity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<EntityKey>,
}

/// `POST /api/mitigations/revoke` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeResponse {
    pub revoked: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_pages_without_more_read_and_write_as_before() {
        let old = r#"{"cursor":"g-1","snapshot":true,"changes":[]}"#;
        let page: DeltaPage = serde_json::from_str(old).unwrap();
        assert_eq!(page.more, None);
        assert_eq!(serde_json::to_string(&page).unwrap(), old);
        assert_eq!(page.total, None);
        let paged = DeltaPage {
            more: Some("id-9".into()),
            total: Some(25_000),
            ..page
        };
        let text = serde_json::to_string(&paged).unwrap();
        assert!(text.ends_with(r#","more":"id-9","total":25000}"#), "{text}");
        assert_eq!(serde_json::from_str::<DeltaPage>(&text).unwrap(), paged);
        let restoring = DeltaPage {
            restoring: true,
            ..paged
        };
        let text = serde_json::to_string(&restoring).unwrap();
        assert!(text.ends_with(r#","restoring":true}"#), "{text}");
        assert_eq!(serde_json::from_str::<DeltaPage>(&text).unwrap(), restoring);
    }

    #[test]
    fn action_json_is_tagged() {
        let a = Action::Throttle {
            rate: 5.0,
            burst: 10,
        };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"{"type":"throttle","rate":5.0,"burst":10}"#);
        assert_eq!(
            serde_json::from_str::<Action>(r#"{"type":"block"}"#).unwrap(),
            Action::Block
        );
        assert_eq!(
            serde_json::to_string(&Scope::App("shop".into())).unwrap(),
            r#"{"app":"shop"}"#
        );
        assert_eq!(
            serde_json::to_string(&Scope::Global).unwrap(),
            r#""global""#
        );
    }

    #[test]
    fn challenge_is_tagged_and_ranks_between_tarpit_and_block() {
        let a: Action = serde_json::from_str(r#"{"type":"challenge","difficulty":12}"#).unwrap();
        assert_eq!(a, Action::Challenge { difficulty: 12 });
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"type":"challenge","difficulty":12}"#
        );
        assert_eq!(a.name(), "challenge");
        assert!(a.severity() > Action::Tarpit { delay_ms: 1 }.severity());
        assert!(a.severity() < Action::Block.severity());
    }

    #[test]
    fn huge_ttl_saturates() {
        let m = Mitigation::new(
            "ip:127.0.0.1".parse().unwrap(),
            Action::Block,
            Duration::from_secs(u64::MAX),
            Origin::Manual,
            Reason::default(),
        );
        assert!(m.is_active(Utc::now()));
    }
}
