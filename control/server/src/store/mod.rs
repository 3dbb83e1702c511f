//! The control store: policies and their history, named lists, the revision counter,
//! the decision log and API tokens, behind one trait. Its statements are written once
//! (`sql`) and run on two databases, SQLite (embedded) and PostgreSQL (several
//! instances), which differ only in how they open, migrate, take turns writing and
//! announce a new revision; both pass the same [`suite`].

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use esper_protocol::{
    Decision, DecisionMode, EntityKey, PageMark, ProxyConfigDoc, RevocationMark, RevokedDecisions,
};
use serde::{Deserialize, Serialize};

mod postgres;
mod sql;
mod sqlite;
pub mod suite;

pub use postgres::{PostgresStore, REVISION_CHANNEL};
pub use sqlite::SqliteStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened.
    #[error("cannot open the control store at {url}: {reason}")]
    Open { url: String, reason: String },
    /// Applying the schema migrations failed.
    #[error("cannot migrate the control store: {0}")]
    Migrate(String),
    /// A query failed.
    #[error("control store query failed: {0}")]
    Query(String),
    /// A row could not be read back (bad JSON or timestamp).
    #[error("control store holds an unreadable row: {0}")]
    Corrupt(String),
    /// A write made from what was read changed since the read (nothing was written).
    #[error("{0}")]
    Stale(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        StoreError::Query(e.to_string())
    }
}

/// What a stored API token may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Every route, token management included.
    Admin,
    /// Every read (no secrets: not the proxies' challenge key or configuration, not the
    /// tokens), and policy validation: dashboards, audits, on-call people who should not
    /// change anything.
    Read,
    /// What Esper's own services and integrated apps call: proxy config, heartbeats,
    /// active policies, the decision log, analyze. A token kept on every edge host.
    Service,
}

impl TokenRole {
    pub const ALL: [TokenRole; 3] = [TokenRole::Admin, TokenRole::Read, TokenRole::Service];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Admin => "admin",
            TokenRole::Read => "read",
            TokenRole::Service => "service",
        }
    }
}

impl std::fmt::Display for TokenRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TokenRole {
    type Err = String;

    fn from_str(s: &str) -> Result<TokenRole, String> {
        TokenRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}`: expected admin, read or service"))
    }
}

/// A stored token as listed: never its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: TokenRole,
    pub created_at: DateTime<Utc>,
    /// The token name of whoever created it (empty for tokens made before this was kept).
    pub created_by: String,
    /// When the token was last accepted (recorded at most once a minute); `None` when
    /// not since this was kept.
    #[serde(default)]
    pub last_used_at: Option<DateTime<Utc>>,
}

/// What [`ControlStore::delete_token`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRemoval {
    Deleted,
    NotFound,
    /// Nothing was deleted: it is the last admin token.
    LastAdmin,
}

/// A policy as stored: its current version and spec. The spec is kept as JSON so the
/// store does not depend on the policy language's types.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub id: String,
    pub version: i64,
    pub enabled: bool,
    /// `enforce` or `shadow`.
    pub mode: String,
    pub spec: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One entry of a policy's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyVersionRecord {
    pub id: String,
    pub version: i64,
    /// What made this version: `apply`, `enable`, `disable`, `shadow`, `enforce`, `delete`.
    pub change: String,
    pub spec: serde_json::Value,
    /// The token name of whoever made the change.
    pub changed_by: String,
    pub created_at: DateTime<Utc>,
}

/// A policy to write.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyWrite {
    pub id: String,
    pub enabled: bool,
    pub mode: String,
    pub spec: serde_json::Value,
    pub change: String,
    pub changed_by: String,
    /// Written only while the stored version is still this one (a write made from a
    /// read, such as a toggle); otherwise the whole call fails with
    /// [`StoreError::Stale`].
    pub expected_version: Option<i64>,
}

/// The result of writing one policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOutcome {
    pub id: String,
    pub version: i64,
    /// False when the spec equalled the current one (no new version).
    pub changed: bool,
}

/// A named list of IPs/networks or strings that policies refer to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListRecord {
    pub name: String,
    /// `ip` or `string`.
    pub kind: String,
    pub items: Vec<String>,
    pub updated_at: DateTime<Utc>,
}

/// What the workers evaluate, read in one consistent snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct ActiveSnapshot {
    pub revision: i64,
    /// Enabled policies only.
    pub policies: Vec<PolicyRecord>,
    pub lists: Vec<ListRecord>,
}

/// A decision as the log holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoggedDecision {
    pub decision: Decision,
    pub recorded_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

/// Filters of the decision log, newest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecisionQuery {
    /// One decision by its id (= the mitigation's id, the reference on block pages).
    pub id: Option<String>,
    pub entity: Option<EntityKey>,
    pub policy: Option<String>,
    pub mode: Option<DecisionMode>,
    /// Only decisions still in force: enforced, not revoked, not expired.
    pub active: bool,
    /// Only decisions after this one in the log's order (the next page).
    pub before: Option<PageMark>,
    pub limit: usize,
}

/// `decided_by` of the copies a mitigation broker with persistence logs. A broker's copy
/// knows only the mitigation; the worker's own record of the same decision (counts,
/// threshold, policy version) replaces it when it arrives later.
pub const BROKER_COPY: &str = "mitigation-broker";

/// Which logged decisions a revocation marks.
#[derive(Clone, Debug, PartialEq)]
pub enum RevokeTarget {
    Id(String),
    Entity(EntityKey),
    /// Every decision in force (a cleared mitigation cache).
    All,
}

/// The control plane's durable state. Every method is one transaction.
#[async_trait]
pub trait ControlStore: Send + Sync {
    /// A short name for status output, e.g. `sqlite`.
    fn kind(&self) -> &'static str;

    /// Applies pending schema migrations; returns the descriptions of those applied now.
    async fn migrate(&self) -> Result<Vec<String>, StoreError>;

    /// Migrations not yet applied (a server started with `--no-migrations` refuses to run
    /// while any are pending).
    async fn pending_migrations(&self) -> Result<Vec<String>, StoreError>;

    /// Is the store reachable?
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes the connections (after the servers drained).
    async fn close(&self);

    /// Every policy, by id.
    async fn list_policies(&self) -> Result<Vec<PolicyRecord>, StoreError>;

    async fn get_policy(&self, id: &str) -> Result<Option<PolicyRecord>, StoreError>;

    /// Writes policies all or nothing. A policy whose spec equals the stored one keeps
    /// its version; any change makes a new version, kept in the history, and bumps the
    /// revision once. With `expected_revision`, nothing is written
    /// ([`StoreError::Stale`]) unless the revision is still that one: what the caller
    /// checked the writes against (the lists they name) has not changed since.
    async fn put_policies(
        &self,
        writes: Vec<PolicyWrite>,
        expected_revision: Option<i64>,
    ) -> Result<Vec<PutOutcome>, StoreError>;

    /// Deletes a policy (its history stays); `false` when there was none.
    async fn delete_policy(&self, id: &str, by: &str) -> Result<bool, StoreError>;

    /// A policy's history, oldest first (also after it was deleted).
    async fn policy_versions(&self, id: &str) -> Result<Vec<PolicyVersionRecord>, StoreError>;

    async fn list_lists(&self) -> Result<Vec<ListRecord>, StoreError>;

    async fn get_list(&self, name: &str) -> Result<Option<ListRecord>, StoreError>;

    /// Creates or replaces a list; bumps the revision when anything changed.
    /// `expected_revision` as for [`ControlStore::put_policies`] (the policies that read
    /// the list).
    async fn put_list(
        &self,
        name: &str,
        kind: &str,
        items: Vec<String>,
        expected_revision: Option<i64>,
    ) -> Result<ListRecord, StoreError>;

    /// `false` when there was no such list. `expected_revision` as for
    /// [`ControlStore::put_policies`] (no policy names the list).
    async fn delete_list(
        &self,
        name: &str,
        expected_revision: Option<i64>,
    ) -> Result<bool, StoreError>;

    /// The counter bumped on every policy or list change.
    async fn revision(&self) -> Result<i64, StoreError>;

    /// The counter as stored now, never a copy kept from announcements: what a write
    /// with an `expected_revision` is compared with.
    async fn stored_revision(&self) -> Result<i64, StoreError>;

    /// Enabled policies, all lists and the revision, consistently.
    async fn active_snapshot(&self) -> Result<ActiveSnapshot, StoreError>;

    /// Appends decisions, ignoring ids already logged, except that a broker's copy
    /// ([`BROKER_COPY`]) is replaced by any other record of the same id, and by a later
    /// broker copy that differs (a mitigation republished under its id with another
    /// action or expiry: the log keeps what the broker holds); returns how many were new
    /// or replaced. A worker's record is never replaced: the broker's copy of the same
    /// publish may differ only by the broker's expiry cap, which a restore applies again.
    async fn record_decisions(&self, decisions: &[Decision]) -> Result<usize, StoreError>;

    async fn query_decisions(&self, q: &DecisionQuery) -> Result<Vec<LoggedDecision>, StoreError>;

    /// Deletes decisions that expired before `expired_before`; returns how many.
    async fn prune_decisions(&self, expired_before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Policy decisions revoked while in force and not yet expired at `now`, in the
    /// order revoked, after `after`, at most `limit`, with the mark to read on from.
    async fn revocations(
        &self,
        after: Option<&RevocationMark>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<RevokedDecisions, StoreError>;

    /// Marks logged decisions in force at `at` as revoked (by entity or all: only those
    /// decided by `at`); returns how many were marked.
    async fn mark_revoked(
        &self,
        target: &RevokeTarget,
        by: &str,
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// How many stored tokens have the admin role.
    async fn admin_token_count(&self) -> Result<u64, StoreError>;

    /// Stores a token's SHA-256 hash (hex) under `name` with `role`, unless a token of
    /// that name is stored already; when this one was stored, the time recorded as its
    /// creation (as listed later).
    async fn add_token(
        &self,
        name: &str,
        role: TokenRole,
        hash: &str,
        by: &str,
    ) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// The name and role of the token with this hash, if any.
    async fn find_token(&self, hash: &str) -> Result<Option<(String, TokenRole)>, StoreError>;

    /// Every stored token (never its hash), by name.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Records that token `name` was accepted at `at` (an earlier time never replaces a
    /// later one).
    async fn token_used(&self, name: &str, at: DateTime<Utc>) -> Result<(), StoreError>;

    /// Deletes token `name`. With `keep_an_admin`, refuses ([`TokenRemoval::LastAdmin`])
    /// to delete the last admin token, in the same transaction as the delete, so two
    /// instances deleting the last two at once cannot both succeed.
    async fn delete_token(
        &self,
        name: &str,
        keep_an_admin: bool,
    ) -> Result<TokenRemoval, StoreError>;

    /// The proxy configuration, if one was stored.
    async fn proxy_config(&self) -> Result<Option<ProxyConfigDoc>, StoreError>;

    /// Stores `config` as the proxy configuration; its revision grows by one when the
    /// text changed, and stays when it is the same.
    async fn put_proxy_config(&self, config: &str, by: &str) -> Result<ProxyConfigDoc, StoreError>;

    /// The deployment-wide secret named `name`, storing `fresh` first when there is
    /// none: every control-plane instance on one store answers the same value.
    async fn secret(&self, name: &str, fresh: &str) -> Result<Secret, StoreError>;

    /// Replaces the secret named `name` with `fresh` (stores it when there is none) and
    /// grows its revision. The value replaced is kept as `previous` when
    /// `keep_previous`, else forgotten along with the one kept before it.
    async fn rotate_secret(
        &self,
        name: &str,
        fresh: &str,
        keep_previous: bool,
    ) -> Result<Secret, StoreError>;

    /// Records a member's heartbeat, unless it is older than the one recorded (see
    /// [`Heard`]). A drain asked of a run stands until a heartbeat of that run says it
    /// is stopping; a heartbeat of a later run (the member restarted) drops it.
    async fn member_beat(&self, beat: &MemberBeat<'_>) -> Result<Heard, StoreError>;

    /// The members of `kind` heard from since `since`, by id.
    async fn members(
        &self,
        kind: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<MemberRecord>, StoreError>;

    /// How many members of `kind` were heard from since `since`.
    async fn members_seen(&self, kind: &str, since: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Asks the run of member `id` last heard from to drain, if it was heard from since
    /// `alive_since` (a silent one would not be told); `Unknown` when it was not heard
    /// from since `known_since`.
    async fn ask_drain(
        &self,
        kind: &str,
        id: &str,
        known_since: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> Result<DrainAsk, StoreError>;

    /// Forgets the members not heard from since `before`, and of each kind all but the
    /// `keep` heard from last; returns how many.
    async fn prune_members(&self, before: DateTime<Utc>, keep: usize) -> Result<u64, StoreError>;
}

/// A heartbeat, as [`ControlStore::member_beat`] records it.
#[derive(Clone, Copy, Debug)]
pub struct MemberBeat<'a> {
    /// `worker` or `proxy`.
    pub kind: &'a str,
    pub id: &'a str,
    /// The heartbeat as JSON, as listed back.
    pub beat: &'a str,
    /// When the member's run started.
    pub run: DateTime<Utc>,
    /// The heartbeat says the member is stopping.
    pub stopping: bool,
    /// When it arrived.
    pub at: DateTime<Utc>,
    /// A member heard from since then is alive: only its own later heartbeats replace
    /// the one recorded.
    pub alive_since: DateTime<Utc>,
}

/// What became of a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heard {
    /// Recorded; `drain` while a drain asked of its run stands.
    Recorded { drain: bool },
    /// Left out: the member's recorded heartbeat is of a later run that is still alive
    /// (two processes share the id, or this one was delayed past a restart).
    EarlierRun,
    /// Left out: a heartbeat of a run already stopping that arrived after it said so.
    AfterStopping,
}

/// A member as last heard from.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberRecord {
    /// Its last heartbeat, as JSON.
    pub beat: String,
    pub seen_at: DateTime<Utc>,
    /// A drain asked of its run stands.
    pub drain_asked: bool,
}

/// What came of asking a member to drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainAsk {
    /// Its next heartbeat is told.
    Asked,
    /// Never heard from, or forgotten.
    Unknown,
    /// Not heard from lately: no heartbeat would carry the request.
    Silent,
}

/// A deployment-wide secret, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secret {
    pub value: String,
    /// The value it replaced, while that is still honoured.
    pub previous: Option<String>,
    /// 1 when made, one more with each rotation.
    pub revision: i64,
    pub rotated_at: Option<DateTime<Utc>>,
}

/// Is `url` a PostgreSQL URL (`postgres://` or `postgresql://`)?
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Opens the store named by `url`: `postgres://` / `postgresql://` or `sqlite:`.
pub async fn open(url: &str, max_connections: u32) -> Result<Arc<dyn ControlStore>, StoreError> {
    if is_postgres_url(url) {
        return Ok(Arc::new(
            PostgresStore::connect(url, max_connections).await?,
        ));
    }
    Ok(Arc::new(SqliteStore::connect(url, max_connections).await?))
}

/// `url` with any password replaced by `***`, for errors and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split_once(':').map_or(user_info, |(u, _)| u);
            let shown = if user_info.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{scheme}://{shown}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// Timestamps as stored: RFC 3339, UTC, microseconds, fixed width, so text order is time
/// order in every database.
pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn parse_ts(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("timestamp `{s}`: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_in_urls() {
        assert_eq!(
            redact_url("postgres://esper:s3cret@db:5432/esper?sslmode=require"),
            "postgres://esper:***@db:5432/esper?sslmode=require"
        );
        assert_eq!(
            redact_url("postgresql://esper@db/esper"),
            "postgresql://esper@db/esper"
        );
        assert_eq!(
            redact_url("sqlite://./.esper/esper.db?mode=rwc"),
            "sqlite://./.esper/esper.db?mode=rwc"
        );
        assert_eq!(redact_url("sqlite::memory:"), "sqlite::memory:");
    }

    #[test]
    fn stored_timestamps_sort_as_text() {
        let a = DateTime::parse_from_rfc3339("2026-01-01T00:00:09Z")
            .unwrap()
            .with_timezone(&Utc);
        let b = a + chrono::Duration::milliseconds(1500);
        assert!(ts(a) < ts(b));
        assert_eq!(ts(a).len(), ts(b).len());
        assert_eq!(parse_ts(&ts(b)).unwrap(), b);
        assert!(parse_ts("yesterday").is_err());
    }
}
