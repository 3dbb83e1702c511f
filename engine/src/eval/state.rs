//! The engine's hot state behind one trait: per (policy, entity) windows and cooldowns,
//! and the set of event ids already processed.
//!
//! A batch goes through the state in two steps so that processing is at-least-once and
//! still idempotent:
//!
//! 1. [`StateBackend::apply`] atomically skips events already processed or in flight
//!    (reporting the latter as busy, so their items are left unacknowledged),
//!    marks the others in flight, adds their hits to the windows, reports each threshold
//!    crossing and starts its cooldown. It returns a [`Receipt`] of what it changed.
//! 2. Once the batch's effects are published, [`StateBackend::commit`] turns the
//!    in-flight marks into "processed" (remembered for the state TTL). If publishing
//!    fails, [`StateBackend::rollback`] takes the counts, cooldowns and marks back, so
//!    that the redelivered events are counted once and their decisions are made again.
//!
//! Marking events as processed before their effects are published would lose the
//! decision for good when publishing fails; counting them without a rollback would
//! count them twice. A shared backend (Redis) implements `apply`, `commit` and
//! `rollback` as one atomic script each, with in-flight marks that expire with the lease.

use std::sync::Arc;

use esper_protocol::EntityKey;

use super::window::WindowParams;

/// One policy's state: its id and a fingerprint of its spec and version, so a changed
/// policy starts from fresh windows and an unchanged one keeps them across reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub id: Arc<str>,
    pub fingerprint: u64,
}

/// One policy taking part in a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchPolicy {
    pub key: PolicyKey,
    pub params: WindowParams,
}

/// One matching (policy, entity) pair of an event.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    /// Index into [`BatchInput::policies`].
    pub policy: usize,
    pub entity: EntityKey,
    /// Event time, epoch milliseconds (already clamped to "now" for clock skew).
    pub at_ms: i64,
    pub weight: f64,
}

/// One event of a batch: its id (for dedup) and its hits, in policy order.
#[derive(Clone, Debug, PartialEq)]
pub struct EventHits {
    pub id: String,
    pub hits: Vec<Hit>,
}

/// What [`StateBackend::apply`] works on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchInput {
    pub policies: Vec<BatchPolicy>,
    pub events: Vec<EventHits>,
}

/// A hit that brought its entity's count to the threshold with no decision standing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Crossing {
    /// Index into [`BatchInput::events`].
    pub event: usize,
    /// Index into that event's hits.
    pub hit: usize,
    /// The count in the window after this hit.
    pub counted: f64,
}

/// One weight added to a window, kept so that a rollback can take it back.
#[derive(Clone, Debug, PartialEq)]
pub struct Increment {
    pub policy: PolicyKey,
    pub entity: EntityKey,
    pub bucket: i64,
    pub weight: f64,
}

/// What one `apply` changed, to be committed or rolled back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Receipt {
    pub id: u64,
    /// The events marked in flight.
    pub event_ids: Vec<String>,
    pub increments: Vec<Increment>,
    /// Cooldowns started by this batch.
    pub cooldowns: Vec<(PolicyKey, EntityKey)>,
}

/// The answer of [`StateBackend::apply`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchOutcome {
    /// Per event: true when it was skipped as already processed or in flight.
    pub duplicate: Vec<bool>,
    /// Per event: true when it is in flight in another batch right now (also a
    /// duplicate). Its item must not be acknowledged: if that other batch is rolled back,
    /// the redelivered item is what brings the event back.
    pub busy: Vec<bool>,
    /// Hits ignored because their event is older than the entity's window.
    pub late: usize,
    pub crossings: Vec<Crossing>,
    pub receipt: Receipt,
}

/// What a cleanup pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub entities: usize,
    pub event_ids: usize,
}

/// Figures for metrics and health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateStats {
    /// Tracked (policy, entity) pairs.
    pub entities: u64,
    /// Remembered event ids (processed and in flight).
    pub event_ids: u64,
    /// Entities dropped because the cache was full.
    pub evictions_total: u64,
    /// Event ids forgotten early because the set was full.
    pub event_id_evictions_total: u64,
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state backend unavailable: {0}")]
    Unavailable(String),
}

/// The engine's hot state. Every call is atomic with respect to the others.
#[async_trait::async_trait]
pub trait StateBackend: Send + Sync + 'static {
    /// `memory`, `redis`, ...
    fn name(&self) -> &'static str;

    /// Applies a batch at wall-clock time `now_ms` (cooldowns run in wall time).
    async fn apply(&self, batch: &BatchInput, now_ms: i64) -> Result<BatchOutcome, StateError>;

    /// The batch's effects are published: its events count as processed.
    async fn commit(&self, receipt: &Receipt, now_ms: i64) -> Result<(), StateError>;

    /// The batch's effects could not be published: undo what `apply` did.
    async fn rollback(&self, receipt: &Receipt) -> Result<(), StateError>;

    /// Drops the state of every policy not in `keep` (removed or changed policies).
    async fn retain(&self, keep: &[PolicyKey]) -> Result<(), StateError>;

    /// Removes idle entities and expired event ids.
    async fn cleanup(&self, now_ms: i64) -> Result<CleanupReport, StateError>;

    fn stats(&self) -> StateStats;
}
