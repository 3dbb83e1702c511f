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
use std::time::Duration;

use esper_protocol::EntityKey;
pub use esper_protocol::outbox::Claim;

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
    pub rules: Arc<Rules>,
}

/// One rung of an escalation ladder, as the state applies it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rung {
    /// Applies from this offense number on (1: always).
    pub repeat: u32,
    /// Applies when the measured value reaches this (0: always).
    pub threshold: f64,
    /// How long a decision at this rung stands before growth, milliseconds.
    pub ttl_ms: i64,
}

/// What a policy does beyond a weighted count against one threshold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    /// Hits carry value fingerprints and the aggregate is a distinct count.
    pub distinct: bool,
    /// The measured value is the window's count times this (1 / window seconds for
    /// rates).
    pub scale: f64,
    /// Sequence: the `min` of each step; empty for other policies.
    pub sequence: Vec<u32>,
    /// Escalation rungs above the policy's own action (level 0).
    pub ladder: Vec<Rung>,
    /// ttl growth per repeat offense (1: none) and its cap, milliseconds.
    pub growth: f64,
    pub ttl_max_ms: i64,
}

impl Rules {
    /// The escalation level for a measured value and an offense number.
    pub fn level_for(&self, measured: f64, offense: u32) -> usize {
        self.ladder
            .iter()
            .rposition(|r| {
                offense >= r.repeat
                    && (r.threshold <= 0.0 || super::window::reached(measured, r.threshold))
            })
            .map_or(0, |i| i + 1)
    }

    /// The cooldown (= mitigation ttl) of a decision at `level` for offense `offense`.
    pub fn ttl_ms(&self, level: usize, offense: u32, base_ms: i64) -> i64 {
        let base = level
            .checked_sub(1)
            .and_then(|i| self.ladder.get(i))
            .map_or(base_ms, |r| r.ttl_ms);
        if self.growth <= 1.0 {
            return base;
        }
        let factor = self
            .growth
            .powi(i32::try_from(offense.saturating_sub(1)).unwrap_or(i32::MAX));
        let grown = base as f64 * factor;
        let cap = self.ttl_max_ms.max(base);
        if grown.is_finite() && grown < cap as f64 {
            grown as i64
        } else {
            cap
        }
    }
}

/// One matching (policy, entity) pair of an event.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    /// Index into [`BatchInput::policies`].
    pub policy: usize,
    pub entity: EntityKey,
    /// Event time, epoch milliseconds (already clamped to "now" for clock skew).
    pub at_ms: i64,
    /// What the hit adds to a count or sum window; 0 when `count_if` does not hold.
    pub weight: f64,
    /// Distinct aggregates: the fingerprint of the counted value (`None`: not counted).
    pub distinct: Option<u64>,
    /// Sequences: bit `i` is set when the event meets step `i`'s condition.
    pub steps: u32,
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
    /// The measured value in the window after this hit.
    pub counted: f64,
    /// The escalation level decided (0: the policy's own action).
    pub level: usize,
    /// The offense number for this entity (1: first).
    pub offense: u32,
    /// How long the decision stands, milliseconds.
    pub ttl_ms: i64,
}

/// How to take back one change.
#[derive(Clone, Debug, PartialEq)]
pub enum Undo {
    /// Subtract a weight from a sub-bucket.
    Weight { bucket: i64, weight: f64 },
    /// Restore a distinct value's previous sub-bucket (`None`: it was not there).
    Distinct { value: u64, prev: Option<i64> },
    /// Restore a sequence's progress (only in undo logs of versions before
    /// [`Undo::SequenceSteps`]).
    Sequence { prev: Option<SeqProgress> },
    /// Take back what an event added to a sequence: one partial sequence per
    /// (step, start sub-bucket) in `added`; and when it completed the sequence (which
    /// then started over), give back the progress that completion consumed. Other
    /// batches' progress made meanwhile, in any order, stands.
    SequenceSteps {
        added: Vec<(u8, i64)>,
        consumed: Option<Vec<Vec<(i64, u32)>>>,
    },
}

/// How far an entity has come through a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeqProgress {
    /// Per step, the partial sequences that have matched it as far as they count: runs
    /// of (start sub-bucket, how many), oldest start first, at most the step's `min` in
    /// all. The oldest start of a step holding its `min` is the latest start of a
    /// sequence that has completed the step.
    Steps(Vec<Vec<(i64, u32)>>),
    /// As versions before sliding sequences kept it (one partial sequence: its step,
    /// matches of that step, and the event time it started); read as `Steps` at the
    /// entity's next event.
    Legacy {
        step: u8,
        matched: u32,
        started_ms: i64,
    },
}

impl SeqProgress {
    /// The older form's (step, matched, started) when the progress is still in it.
    pub fn legacy(&self) -> Option<(u8, u32, i64)> {
        match self {
            SeqProgress::Legacy {
                step,
                matched,
                started_ms,
            } => Some((*step, *matched, *started_ms)),
            SeqProgress::Steps(_) => None,
        }
    }
}

/// What one event did to a sequence, to take it back ([`Undo::SequenceSteps`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqChange {
    /// The partial sequences it added, as (step, start sub-bucket).
    pub added: Vec<(u8, i64)>,
    /// When it completed the sequence: the progress that completion consumed.
    pub consumed: Option<Vec<Vec<(i64, u32)>>>,
}

/// The latest start of a partial sequence that has `min` matches of a step: the
/// `min`-th latest start it holds.
fn completed(runs: &[(i64, u32)], min: u32) -> Option<i64> {
    let mut seen = 0u64;
    for (start, n) in runs.iter().rev() {
        seen += u64::from(*n);
        if seen >= u64::from(min.max(1)) {
            return Some(*start);
        }
    }
    None
}

/// Takes back one partial sequence per (step, start) of `added`, as
/// [`Undo::SequenceSteps`] does.
pub fn take_back(progress: &mut Option<SeqProgress>, added: &[(u8, i64)]) {
    let Some(SeqProgress::Steps(steps)) = progress else {
        return;
    };
    for (step, start) in added {
        let Some(runs) = steps.get_mut(usize::from(*step)) else {
            continue;
        };
        if let Ok(i) = runs.binary_search_by_key(start, |(b, _)| *b) {
            runs[i].1 -= 1;
            if runs[i].1 == 0 {
                runs.remove(i);
            }
        }
    }
    if steps.iter().all(Vec::is_empty) {
        *progress = None;
    }
}

/// Gives back progress a completion consumed, beside what is there now (the next event
/// keeps the latest `min` of each step).
pub fn give_back(progress: &mut Option<SeqProgress>, consumed: &[Vec<(i64, u32)>]) {
    let mut steps = match progress.take() {
        Some(SeqProgress::Steps(s)) => s,
        // Taken back as it was read: the completion was made from steps.
        _ => Vec::new(),
    };
    if steps.len() < consumed.len() {
        steps.resize(consumed.len(), Vec::new());
    }
    for (runs, back) in steps.iter_mut().zip(consumed) {
        for (start, n) in back {
            match runs.binary_search_by_key(start, |(b, _)| *b) {
                Ok(i) => runs[i].1 = runs[i].1.saturating_add(*n),
                Err(i) => runs.insert(i, (*start, *n)),
            }
        }
    }
    *progress = (!steps.iter().all(Vec::is_empty)).then_some(SeqProgress::Steps(steps));
}

/// Adds a partial sequence started at `start` to a step, keeping the `min` latest.
fn add_start(runs: &mut Vec<(i64, u32)>, start: i64, min: u32) {
    match runs.binary_search_by_key(&start, |(b, _)| *b) {
        Ok(i) => runs[i].1 = runs[i].1.saturating_add(1),
        Err(i) => runs.insert(i, (start, 1)),
    }
    let total: u64 = runs.iter().map(|(_, n)| u64::from(*n)).sum();
    let mut excess = total.saturating_sub(u64::from(min.max(1)));
    while excess > 0 {
        let Some(first) = runs.first_mut() else { break };
        if u64::from(first.1) <= excess {
            excess -= u64::from(first.1);
            runs.remove(0);
        } else {
            first.1 -= u32::try_from(excess).unwrap_or(u32::MAX);
            excess = 0;
        }
    }
}

/// A legacy progress as steps: the steps before its own completed, its own holding
/// what it matched, all started where it started.
fn legacy_steps(step: u8, matched: u32, started: i64, mins: &[u32]) -> Vec<Vec<(i64, u32)>> {
    mins.iter()
        .enumerate()
        .map(|(i, min)| match i.cmp(&usize::from(step)) {
            std::cmp::Ordering::Less => vec![(started, *min)],
            std::cmp::Ordering::Equal => vec![(started, matched.min(*min))],
            std::cmp::Ordering::Greater => Vec::new(),
        })
        .collect()
}

/// Advances a sequence with an event meeting the steps in `mask`, in sub-bucket
/// `bucket` of a window of `buckets` sub-buckets (`within`). Returns true when the
/// sequence completes (it then starts over). What the event did goes to `change`.
///
/// Every partial sequence is followed, not just the first: a sequence completes when
/// some events, in the order they came, matched each step its `min` times, the first
/// of them no more than `within` before the last (counted in sub-buckets, as windows
/// are: early, never late). Events that meet no step a partial sequence can use are
/// ignored (other requests may come in between); one event counts for one step of a
/// partial sequence.
pub fn advance(
    progress: &mut Option<SeqProgress>,
    mins: &[u32],
    mask: u32,
    bucket: i64,
    buckets: i64,
    bucket_ms: i64,
    change: &mut SeqChange,
) -> bool {
    let Some(last) = mins.len().checked_sub(1) else {
        return false;
    };
    let mut steps = match progress.take() {
        None => vec![Vec::new(); mins.len()],
        Some(SeqProgress::Steps(s)) => s,
        Some(SeqProgress::Legacy {
            step,
            matched,
            started_ms,
        }) => legacy_steps(step, matched, started_ms.div_euclid(bucket_ms.max(1)), mins),
    };
    // A policy edited to another number of steps has another key; this is defensive.
    steps.resize(mins.len(), Vec::new());
    let head = steps
        .iter()
        .filter_map(|runs| runs.last().map(|(b, _)| *b))
        .fold(bucket, i64::max);
    let oldest = head.saturating_sub(buckets) + 1;
    for runs in &mut steps {
        let expired = runs.partition_point(|(b, _)| *b < oldest);
        runs.drain(..expired);
    }
    // Later steps first, so that one event does not count for two steps of one partial
    // sequence.
    for i in (0..=last).rev() {
        if mask & (1 << i) == 0 {
            continue;
        }
        let start = match i.checked_sub(1) {
            None => (bucket >= oldest).then_some(bucket),
            Some(before) => completed(&steps[before], mins[before]),
        };
        if let Some(start) = start {
            add_start(&mut steps[i], start, mins[i]);
            change
                .added
                .push((u8::try_from(i).unwrap_or(u8::MAX), start));
        }
    }
    let done = completed(&steps[last], mins[last]).is_some();
    if done {
        // What this event added is taken back by `added`; the rest was there before.
        let mut before = Some(SeqProgress::Steps(steps));
        take_back(&mut before, &change.added);
        change.consumed = match before {
            Some(SeqProgress::Steps(s)) => Some(s),
            _ => Some(Vec::new()),
        };
        *progress = None;
    } else {
        *progress = (!steps.iter().all(Vec::is_empty)).then_some(SeqProgress::Steps(steps));
    }
    done
}

/// An entity's decision state before a batch changed it, to restore on rollback.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecisionState {
    pub cooldown_until: i64,
    pub cooldown_by: u64,
    pub level: usize,
    pub offenses: u32,
    pub last_offense_ms: i64,
    /// When the offense before the last was made: forgiving the last offense dates the
    /// entity's history from it again. 0 when there was none, or when the state was
    /// written by a version that did not keep it.
    pub prior_offense_ms: i64,
}

/// What one `apply` changed, to be committed or rolled back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Receipt {
    pub id: u64,
    /// The events marked in flight, as the backend's keys for them (the memory backend
    /// uses keyed fingerprints of the ids).
    pub event_ids: Vec<u64>,
    /// Decisions made by this batch, with the state they replaced.
    pub cooldowns: Vec<(PolicyKey, EntityKey, DecisionState)>,
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

/// A revoked decision of a policy, for [`StateBackend::forgive`].
#[derive(Clone, Debug, PartialEq)]
pub struct Revoked {
    pub policy: PolicyKey,
    pub entity: EntityKey,
    /// When the revoked decision was made (its `decided_at`), epoch ms.
    pub decided_at_ms: i64,
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

/// Records for the control plane's decision log that a commit appends to the state's
/// outbox in the same atomic step: a worker that dies once its batch is committed loses
/// none of them, and one that dies before leaves the batch to be decided again.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogAppend<'a> {
    /// Each record's text (a decision as JSON).
    pub entries: &'a [String],
    /// Most records the outbox holds: the oldest beyond are dropped.
    pub capacity: usize,
}

/// What a commit did to the outbox (all zero when it appended nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Logged {
    /// Oldest records dropped for room.
    pub dropped: usize,
    /// Records in the outbox after the commit.
    pub pending: usize,
}

/// Why the state could not be read or written.
/// The store's clock, epoch milliseconds, read between `sent` and `received` (timed
/// around the query alone, not the wait for a connection).
#[derive(Clone, Copy, Debug)]
pub struct StoreTime {
    pub ms: i64,
    pub sent: std::time::Instant,
    pub received: std::time::Instant,
}

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

    /// A reading of the store's own clock, when workers on other hosts may share this
    /// state: they then all count time by it (windows, cooldowns, leases), whatever
    /// their own clocks say. `None` for a state held by this process alone.
    async fn clock(&self) -> Result<Option<StoreTime>, StateError> {
        Ok(None)
    }

    /// Applies a batch at wall-clock time `now_ms` (cooldowns run in wall time).
    async fn apply(&self, batch: &BatchInput, now_ms: i64) -> Result<BatchOutcome, StateError>;

    /// The batch's effects are published: its events count as processed, and `log`'s
    /// records join the outbox, both or neither.
    async fn commit_with(
        &self,
        receipt: &Receipt,
        log: LogAppend<'_>,
        now_ms: i64,
    ) -> Result<Logged, StateError>;

    /// [`StateBackend::commit_with`] with no records.
    async fn commit(&self, receipt: &Receipt, now_ms: i64) -> Result<(), StateError> {
        self.commit_with(receipt, LogAppend::default(), now_ms)
            .await
            .map(|_| ())
    }

    /// The batch's effects could not be published: undo what `apply` did.
    async fn rollback(&self, receipt: &Receipt) -> Result<(), StateError>;

    /// Decisions were revoked: for each whose decision still stands at `now_ms` (the one
    /// made at its `decided_at_ms`), ends the cooldown, empties the window and takes
    /// back the offense, so the policy decides again once the entity crosses the
    /// threshold anew. A revocation already forgiven, or overtaken by a later decision
    /// of the policy, changes nothing, so workers sharing a state may all apply it.
    /// Returns how many were forgiven.
    async fn forgive(&self, revoked: &[Revoked], now_ms: i64) -> Result<usize, StateError>;

    /// Drops the state of every policy not in `keep` (removed or changed policies).
    async fn retain(&self, keep: &[PolicyKey]) -> Result<(), StateError>;

    /// Removes idle entities and expired event ids.
    async fn cleanup(&self, now_ms: i64) -> Result<CleanupReport, StateError>;

    fn stats(&self) -> StateStats;

    /// Takes or renews the outbox's delivery lease for `owner` and reads its oldest
    /// `limit` records, numbered; or names the holder when it is another owner (workers
    /// sharing a state share its outbox, delivered by one at a time, in order).
    async fn claim_log(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Claim, StateError>;

    /// Removes the records numbered `delivered` (as claimed), if `owner` still holds the
    /// lease (renewed for `lease`). Returns whether it did, and the records left. By
    /// number rather than "up to": a PostgreSQL record numbered below them may have been
    /// committed since the claim, unread.
    async fn ack_log(
        &self,
        owner: &str,
        delivered: &[u64],
        lease: Duration,
    ) -> Result<(bool, usize), StateError>;

    /// Gives up the lease, if `owner` holds it, so another owner delivers at once.
    async fn release_log(&self, owner: &str) -> Result<(), StateError>;
}

#[cfg(test)]
mod sequence_tests {
    use super::*;

    /// One event in a window of 30 sub-buckets of 1 s.
    fn step(progress: &mut Option<SeqProgress>, mins: &[u32], mask: u32, bucket: i64) -> bool {
        advance(
            progress,
            mins,
            mask,
            bucket,
            30,
            1000,
            &mut SeqChange::default(),
        )
    }

    /// Feeds (sub-bucket, mask) events to a sequence of `mins` over a window of 30
    /// sub-buckets; returns the events that completed it.
    fn run(mins: &[u32], events: &[(i64, u32)]) -> Vec<usize> {
        let mut progress = None;
        events
            .iter()
            .enumerate()
            .filter(|(_, (bucket, mask))| step(&mut progress, mins, *mask, *bucket))
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn a_sequence_completes_in_order_within_its_window() {
        assert_eq!(run(&[2, 1], &[(0, 1), (1, 2), (2, 1), (3, 2)]), [3]);
        assert_eq!(run(&[2, 1], &[(0, 2), (1, 1), (2, 1)]), Vec::<usize>::new());
        // Requests in between that meet no usable step are ignored.
        assert_eq!(run(&[1, 1], &[(0, 1), (1, 0), (2, 1), (3, 2)]), [3]);
        // Out of the window: the start is 30 sub-buckets before the last.
        assert!(run(&[1, 1], &[(0, 1), (30, 2)]).is_empty());
        assert_eq!(run(&[1, 1], &[(0, 1), (29, 2)]), [1]);
    }

    #[test]
    fn one_event_counts_for_one_step() {
        assert!(run(&[1, 1], &[(0, 3)]).is_empty());
        assert_eq!(run(&[1, 1], &[(0, 3), (1, 3)]), [1]);
    }

    #[test]
    fn the_latest_start_is_kept_as_older_ones_run_out() {
        // 3 of step 0 then step 1: failures at 0, 20, 25, 28 and the success at 31
        // complete with the last three failures.
        assert_eq!(
            run(&[3, 1], &[(0, 1), (20, 1), (25, 1), (28, 1), (31, 2)]),
            [4]
        );
        // Completion starts over: what counted for it does not count again.
        assert_eq!(
            run(&[1, 1], &[(0, 1), (1, 2), (2, 2), (3, 1), (4, 2)]),
            [1, 4]
        );
    }

    #[test]
    fn steps_hold_at_most_their_min_in_runs() {
        let mut progress = None;
        for b in 0..100 {
            step(&mut progress, &[5, 1], 1, b / 10);
        }
        let Some(SeqProgress::Steps(steps)) = progress else {
            panic!("in progress")
        };
        assert_eq!(steps[0], [(9, 5)], "the latest five, by start");
    }

    #[test]
    fn a_legacy_progress_reads_as_steps() {
        let mut progress = Some(SeqProgress::Legacy {
            step: 1,
            matched: 1,
            started_ms: 5_500,
        });
        // [2, 2, 1]: step 0 done and one of step 1 at 5.5 s; one more step 1, then 2.
        assert!(!step(&mut progress, &[2, 2, 1], 2, 6));
        assert!(step(&mut progress, &[2, 2, 1], 4, 7));
        let mut late = Some(SeqProgress::Legacy {
            step: 1,
            matched: 2,
            started_ms: 0,
        });
        assert!(!step(&mut late, &[2, 2, 1], 4, 40), "ran out");
    }
}
