//! The in-memory state backend: one process's windows, cooldowns and processed event
//! ids behind one lock (so every call is atomic, as a Redis script would be).
//!
//! Bounds: at most `capacity` tracked (policy, entity) pairs; beyond that the least
//! recently touched ones (those without a standing decision first) are evicted and
//! counted. Processed event ids are remembered for `ttl`, and at most `capacity` of them.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, RandomState};
#[cfg(test)]
use std::sync::Arc;
use std::time::Duration;

use esper_protocol::EntityKey;
use parking_lot::Mutex;

use super::marks::{Change, Marks, Prehashed, Seen};
use super::outbox::MemoryOutbox;
use super::state::{
    BatchInput, BatchOutcome, BatchPolicy, Claim, CleanupReport, Crossing, DecisionState, Hit,
    LogAppend, Logged, PolicyKey, Receipt, Revoked, SeqChange, SeqProgress, StateBackend,
    StateError, StateStats, Undo, advance, give_back, take_back,
};
use super::window::{DistinctWindow, Window};

/// One (policy, entity) pair's state.
#[derive(Default)]
pub(crate) struct EntityState {
    window: Window,
    /// Distinct aggregates only.
    distinct: Option<Box<DistinctWindow>>,
    /// Sequences only.
    seq: Option<SeqProgress>,
    /// The standing decision (cooldown in wall-clock epoch ms, with the receipt that
    /// started it, so a rollback only undoes its own) and the offense history.
    decision: DecisionState,
    last_touch: i64,
}

/// What one hit did to its entity.
enum Measured {
    /// The measured value after the hit: check it against the thresholds.
    Value(f64),
    /// Nothing to check (a sequence still in progress).
    Nothing,
    /// The event is older than the window.
    Late,
}

impl EntityState {
    /// Applies a hit's change to the aggregate; undo records go to `undo`.
    fn measure(&mut self, policy: &BatchPolicy, hit: &Hit, undo: &mut Vec<Undo>) -> Measured {
        let p = &policy.params;
        let rules = &policy.rules;
        let bucket = p.bucket_of(hit.at_ms);
        let count = if !rules.sequence.is_empty() {
            let mut change = SeqChange::default();
            let done = advance(
                &mut self.seq,
                &rules.sequence,
                hit.steps,
                bucket,
                p.buckets,
                p.bucket_ms,
                &mut change,
            );
            if !change.added.is_empty() || change.consumed.is_some() {
                undo.push(Undo::SequenceSteps {
                    added: change.added,
                    consumed: change.consumed,
                });
            }
            if !done {
                return Measured::Nothing;
            }
            match self.window.add(bucket, 1.0, p) {
                Some(c) => {
                    undo.push(Undo::Weight {
                        bucket,
                        weight: 1.0,
                    });
                    c
                }
                None => return Measured::Late,
            }
        } else if rules.distinct {
            let d = self.distinct.get_or_insert_with(Box::default);
            match hit.distinct {
                Some(value) => match d.add(value, bucket, p) {
                    Some((c, prev)) => {
                        undo.push(Undo::Distinct { value, prev });
                        c
                    }
                    None => return Measured::Late,
                },
                None => d.count_at(bucket, p),
            }
        } else if hit.weight > 0.0 {
            match self.window.add(bucket, hit.weight, p) {
                Some(c) => {
                    undo.push(Undo::Weight {
                        bucket,
                        weight: hit.weight,
                    });
                    c
                }
                None => return Measured::Late,
            }
        } else {
            self.window.count_at(bucket, p)
        };
        Measured::Value(count * rules.scale)
    }

    /// See [`StateBackend::forgive`]. The standing decision is the revoked one when it
    /// was made at the same instant: both times are the same `now` of one evaluation.
    fn forgive(&mut self, decided_at_ms: i64, now_ms: i64) -> bool {
        let d = &mut self.decision;
        if d.cooldown_until <= now_ms || d.last_offense_ms != decided_at_ms {
            return false;
        }
        d.cooldown_until = now_ms;
        d.level = 0;
        d.offenses = d.offenses.saturating_sub(1);
        // A repeat offender's history runs from the offense before the forgiven one. Not
        // known (state from an older version): the forgiven time stays, which at worst
        // counts a later offense as a repeat for longer.
        if d.offenses > 0 && d.prior_offense_ms != 0 {
            d.last_offense_ms = d.prior_offense_ms;
        }
        d.prior_offense_ms = 0;
        self.window = Window::default();
        // Emptied rather than dropped, as Redis keeps a distinct set: a batch in flight
        // that is rolled back afterwards then undoes its values alike in both.
        if let Some(distinct) = self.distinct.as_mut() {
            **distinct = DistinctWindow::default();
        }
        self.seq = None;
        true
    }

    fn is_idle(&self, now_ms: i64, window_ms: i64, history_ms: i64) -> bool {
        let empty = self.window.is_empty()
            && self.distinct.as_ref().is_none_or(|d| d.is_empty())
            && self.seq.is_none();
        let d = &self.decision;
        (empty || self.last_touch.saturating_add(window_ms) <= now_ms)
            && d.cooldown_until <= now_ms
            && (d.offenses == 0 || history_end(d, history_ms) <= now_ms)
    }
}

/// Until when an entity's offenses are remembered: the state TTL past its last
/// decision's end (at least as late as any offense could still count as a repeat; a
/// forgiven decision ends when it is revoked, after the offense before it ended).
fn history_end(d: &DecisionState, history_ms: i64) -> i64 {
    d.cooldown_until
        .max(d.last_offense_ms)
        .saturating_add(history_ms)
}

/// A policy's entities by a keyed 64-bit fingerprint of their key (foldhash with a
/// per-process random seed): an 8-byte key is compared without touching another cache
/// line and never copied, which matters more than anything else on this path. Two
/// entities sharing a fingerprint (about one chance in 10^9 with a million tracked)
/// would share a window.
type EntityMap = HashMap<u64, EntityState, BuildHasherDefault<Prehashed>>;

struct PolicyState {
    window_ms: i64,
    entities: EntityMap,
}

#[derive(Default)]
struct Inner {
    policies: HashMap<PolicyKey, PolicyState>,
    entities: usize,
    /// Event ids by a keyed 64-bit fingerprint (SipHash with a per-process key): no
    /// copy of the id is kept. Two ids sharing a fingerprint (about one chance in 10^5
    /// over ten million remembered ids) would count the later one as a duplicate.
    /// The undo logs of batches in flight are kept here too, so that a receipt carries
    /// only the ids and decisions (no per-hit copies).
    marks: Marks,
    next_receipt: u64,
    evictions: u64,
    /// The decision log's outbox, beside the marks its records are committed with.
    outbox: MemoryOutbox,
}

/// The embedded state backend.
pub struct MemoryState {
    inner: Mutex<Inner>,
    ttl_ms: i64,
    capacity: usize,
    ids: RandomState,
    entity_seed: foldhash::quality::RandomState,
}

impl MemoryState {
    /// Remembers processed event ids for `ttl`; tracks at most `capacity` entities and
    /// at most `capacity` event ids.
    pub fn new(ttl: Duration, capacity: usize) -> MemoryState {
        MemoryState {
            inner: Mutex::new(Inner::default()),
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            capacity: capacity.max(1),
            ids: RandomState::new(),
            entity_seed: foldhash::quality::RandomState::default(),
        }
    }

    fn fingerprint(&self, id: &str) -> u64 {
        self.ids.hash_one(id)
    }

    fn entity_fingerprint(&self, entity: &EntityKey) -> u64 {
        self.entity_seed.hash_one(entity)
    }

    fn apply_now(&self, batch: &BatchInput, now_ms: i64) -> BatchOutcome {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        inner.next_receipt += 1;
        let receipt_id = inner.next_receipt;
        // Each policy's state is taken out of the map once per batch rather than looked
        // up per hit (policy keys are unique within a batch).
        let mut states: Vec<PolicyState> = batch
            .policies
            .iter()
            .map(|bp| {
                inner
                    .policies
                    .remove(&bp.key)
                    .unwrap_or_else(|| PolicyState {
                        window_ms: bp.params.window_ms(),
                        entities: EntityMap::default(),
                    })
            })
            .collect();
        let mut undo = Vec::new();
        inner.marks.begin(receipt_id);
        let mut log = inner.marks.new_log(receipt_id);
        log.policies
            .extend(batch.policies.iter().map(|p| p.key.clone()));
        let mut out = BatchOutcome {
            duplicate: vec![false; batch.events.len()],
            busy: vec![false; batch.events.len()],
            receipt: Receipt {
                id: receipt_id,
                event_ids: Vec::with_capacity(batch.events.len()),
                cooldowns: Vec::new(),
            },
            ..BatchOutcome::default()
        };
        for (ei, event) in batch.events.iter().enumerate() {
            // An event that matched nothing has no effect to repeat: not remembered.
            if event.hits.is_empty() {
                continue;
            }
            let key = self.fingerprint(&event.id);
            match inner.marks.check(key, receipt_id) {
                Seen::New => {}
                Seen::Done => {
                    out.duplicate[ei] = true;
                    continue;
                }
                Seen::Busy => {
                    out.duplicate[ei] = true;
                    out.busy[ei] = true;
                    continue;
                }
            }
            out.receipt.event_ids.push(key);
            for (hi, hit) in event.hits.iter().enumerate() {
                let (Some(policy), Some(state)) =
                    (batch.policies.get(hit.policy), states.get_mut(hit.policy))
                else {
                    continue;
                };
                let p = &policy.params;
                let counts = hit.weight > 0.0 || hit.distinct.is_some() || hit.steps != 0;
                let fp = self.entity_fingerprint(&hit.entity);
                let entity = if counts {
                    state.entities.entry(fp).or_insert_with(|| {
                        inner.entities += 1;
                        EntityState {
                            last_touch: now_ms,
                            ..EntityState::default()
                        }
                    })
                } else {
                    // A hit that counts nothing only checks an entity already tracked.
                    match state.entities.get_mut(&fp) {
                        Some(e) => e,
                        None => continue,
                    }
                };
                undo.clear();
                let measured = match entity.measure(policy, hit, &mut undo) {
                    Measured::Value(v) => Some(v),
                    Measured::Nothing => None,
                    Measured::Late => {
                        out.late += 1;
                        None
                    }
                };
                if counts {
                    entity.last_touch = now_ms;
                }
                let policy_index = u32::try_from(hit.policy).unwrap_or(u32::MAX);
                log.changes.extend(undo.drain(..).map(|u| Change {
                    policy: policy_index,
                    entity: fp,
                    undo: u,
                }));
                let Some(measured) = measured else { continue };
                let rules = &policy.rules;
                let d = &mut entity.decision;
                let decided = if d.cooldown_until <= now_ms {
                    p.reached(measured).then(|| {
                        // A repeat when it comes within the state TTL of the end of
                        // the last decision (as long as that decision was): counted from
                        // the offense, a ban longer than the TTL would make every next
                        // offense a first one, and ttl growth would start over.
                        let last_ttl = rules.ttl_ms(d.level, d.offenses, p.cooldown_ms);
                        let repeat = d.offenses > 0
                            && now_ms.saturating_sub(d.last_offense_ms)
                                <= last_ttl.saturating_add(self.ttl_ms);
                        let offense = if repeat {
                            d.offenses.saturating_add(1)
                        } else {
                            1
                        };
                        (rules.level_for(measured, offense), offense)
                    })
                } else if !rules.ladder.is_empty() {
                    let level = rules.level_for(measured, d.offenses);
                    (level > d.level).then_some((level, d.offenses))
                } else {
                    None
                };
                if let Some((level, offense)) = decided {
                    let prev = *d;
                    let ttl_ms = rules.ttl_ms(level, offense, p.cooldown_ms);
                    // An escalation under a standing decision is the same offense: the
                    // one before it stays the prior.
                    let escalation = prev.cooldown_until > now_ms;
                    *d = DecisionState {
                        cooldown_until: now_ms.saturating_add(ttl_ms),
                        cooldown_by: receipt_id,
                        level,
                        offenses: offense,
                        last_offense_ms: now_ms,
                        prior_offense_ms: if escalation {
                            prev.prior_offense_ms
                        } else {
                            prev.last_offense_ms
                        },
                    };
                    out.receipt
                        .cooldowns
                        .push((policy.key.clone(), hit.entity.clone(), prev));
                    out.crossings.push(Crossing {
                        event: ei,
                        hit: hi,
                        counted: measured,
                        level,
                        offense,
                        ttl_ms,
                    });
                }
            }
        }
        for (policy, state) in batch.policies.iter().zip(states) {
            if !state.entities.is_empty() {
                inner.policies.insert(policy.key.clone(), state);
            }
        }
        inner.marks.keep_log(log);
        if inner.entities > self.capacity {
            evict(inner, self.capacity, now_ms);
        }
        out
    }
}

/// Drops the least recently touched entities (those without a standing decision
/// first) until 1% below `capacity`, so evictions come in occasional sweeps.
fn evict(inner: &mut Inner, capacity: usize, now_ms: i64) {
    let target = capacity - capacity / 100;
    let excess = inner.entities.saturating_sub(target);
    if excess == 0 {
        return;
    }
    let mut ages: Vec<(bool, i64)> = inner
        .policies
        .values()
        .flat_map(|p| p.entities.values())
        .map(|e| (e.decision.cooldown_until > now_ms, e.last_touch))
        .collect();
    let excess = excess.min(ages.len());
    if excess == 0 {
        return;
    }
    let (_, cutoff, _) = ages.select_nth_unstable(excess - 1);
    let cutoff = *cutoff;
    let mut removed = 0;
    for p in inner.policies.values_mut() {
        p.entities.retain(|_, e| {
            let age = (e.decision.cooldown_until > now_ms, e.last_touch);
            if removed < excess && age <= cutoff {
                removed += 1;
                false
            } else {
                true
            }
        });
    }
    inner.policies.retain(|_, p| !p.entities.is_empty());
    inner.entities -= removed;
    inner.evictions += removed as u64;
}

#[async_trait::async_trait]
impl StateBackend for MemoryState {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn apply(&self, batch: &BatchInput, now_ms: i64) -> Result<BatchOutcome, StateError> {
        Ok(self.apply_now(batch, now_ms))
    }

    async fn commit_with(
        &self,
        receipt: &Receipt,
        log: LogAppend<'_>,
        now_ms: i64,
    ) -> Result<Logged, StateError> {
        let mut inner = self.inner.lock();
        let expiry = now_ms.saturating_add(self.ttl_ms);
        inner
            .marks
            .commit(receipt.id, &receipt.event_ids, expiry, self.capacity);
        Ok(inner.outbox.append(log))
    }

    async fn claim_log(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Claim, StateError> {
        Ok(self.inner.lock().outbox.claim(owner, lease, limit))
    }

    async fn ack_log(
        &self,
        owner: &str,
        delivered: &[u64],
        lease: Duration,
    ) -> Result<(bool, usize), StateError> {
        Ok(self.inner.lock().outbox.ack(owner, delivered, lease))
    }

    async fn release_log(&self, owner: &str) -> Result<(), StateError> {
        self.inner.lock().outbox.release(owner);
        Ok(())
    }

    async fn rollback(&self, receipt: &Receipt) -> Result<(), StateError> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        if let Some(log) = inner.marks.rollback(receipt.id, &receipt.event_ids) {
            for change in log.changes.iter().rev() {
                let Some(policy) = log.policies.get(change.policy as usize) else {
                    continue;
                };
                let Some(e) = inner
                    .policies
                    .get_mut(policy)
                    .and_then(|p| p.entities.get_mut(&change.entity))
                else {
                    continue;
                };
                match &change.undo {
                    Undo::Weight { bucket, weight } => e.window.remove(*bucket, *weight),
                    Undo::Distinct { value, prev } => {
                        if let Some(d) = e.distinct.as_mut() {
                            d.undo(*value, *prev);
                        }
                    }
                    Undo::Sequence { prev } => e.seq = prev.clone(),
                    Undo::SequenceSteps { added, consumed } => {
                        take_back(&mut e.seq, added);
                        if let Some(consumed) = consumed {
                            give_back(&mut e.seq, consumed);
                        }
                    }
                }
            }
            inner.marks.done_with(log);
        }
        for (policy, entity, prev) in receipt.cooldowns.iter().rev() {
            let fp = self.entity_fingerprint(entity);
            if let Some(e) = inner
                .policies
                .get_mut(policy)
                .and_then(|p| p.entities.get_mut(&fp))
                && e.decision.cooldown_by == receipt.id
            {
                e.decision = *prev;
            }
        }
        Ok(())
    }

    async fn forgive(&self, revoked: &[Revoked], now_ms: i64) -> Result<usize, StateError> {
        let mut inner = self.inner.lock();
        let mut forgiven = 0;
        for r in revoked {
            let fp = self.entity_fingerprint(&r.entity);
            if let Some(e) = inner
                .policies
                .get_mut(&r.policy)
                .and_then(|p| p.entities.get_mut(&fp))
                && e.forgive(r.decided_at_ms, now_ms)
            {
                forgiven += 1;
            }
        }
        Ok(forgiven)
    }

    async fn retain(&self, keep: &[PolicyKey]) -> Result<(), StateError> {
        let mut inner = self.inner.lock();
        inner.policies.retain(|k, _| keep.contains(k));
        inner.entities = inner.policies.values().map(|p| p.entities.len()).sum();
        Ok(())
    }

    async fn cleanup(&self, now_ms: i64) -> Result<CleanupReport, StateError> {
        let mut inner = self.inner.lock();
        let mut report = CleanupReport::default();
        let history_ms = self.ttl_ms;
        for p in inner.policies.values_mut() {
            let before = p.entities.len();
            let window_ms = p.window_ms;
            p.entities
                .retain(|_, e| !e.is_idle(now_ms, window_ms, history_ms));
            report.entities += before - p.entities.len();
        }
        inner.policies.retain(|_, p| !p.entities.is_empty());
        inner.entities -= report.entities;
        report.event_ids = inner.marks.expire(now_ms);
        Ok(report)
    }

    fn stats(&self) -> StateStats {
        let inner = self.inner.lock();
        StateStats {
            entities: inner.entities as u64,
            event_ids: inner.marks.len() as u64,
            evictions_total: inner.evictions,
            event_id_evictions_total: inner.marks.evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::state::{EventHits, Rules};
    use crate::eval::window::WindowParams;

    fn key(id: &str) -> PolicyKey {
        PolicyKey {
            id: Arc::from(id),
            fingerprint: 1,
        }
    }

    fn batch(ids: &[&str], entity: &str, at_ms: i64) -> BatchInput {
        BatchInput {
            policies: vec![BatchPolicy {
                key: key("p"),
                params: WindowParams::new(Duration::from_secs(60), 3.0, Duration::from_secs(300)),
                rules: Arc::new(Rules {
                    scale: 1.0,
                    ..Rules::default()
                }),
            }],
            events: ids
                .iter()
                .map(|id| EventHits {
                    id: id.to_string(),
                    hits: vec![Hit {
                        policy: 0,
                        entity: entity.parse().unwrap(),
                        at_ms,
                        weight: 1.0,
                        distinct: None,
                        steps: 0,
                    }],
                })
                .collect(),
        }
    }

    const NOW: i64 = 1_700_000_000_000;

    #[tokio::test]
    async fn the_same_event_counts_once_even_within_a_batch() {
        let s = MemoryState::new(Duration::from_secs(3600), 1000);
        let out = s
            .apply(&batch(&["a", "b", "a"], "ip:10.0.0.1", NOW), NOW)
            .await
            .unwrap();
        assert_eq!(out.duplicate, vec![false, false, true]);
        assert_eq!(
            out.busy,
            vec![false; 3],
            "a repeat within the batch is not busy"
        );
        s.commit(&out.receipt, NOW).await.unwrap();
        let out = s
            .apply(&batch(&["b", "c"], "ip:10.0.0.1", NOW), NOW)
            .await
            .unwrap();
        assert_eq!(out.duplicate, vec![true, false]);
        assert_eq!(out.busy, vec![false, false]);
        assert_eq!(out.crossings.len(), 1, "a, c and b make 3");
        assert_eq!(out.crossings[0].counted, 3.0);
    }

    #[tokio::test]
    async fn rollback_undoes_counts_cooldowns_and_marks() {
        let s = MemoryState::new(Duration::from_secs(3600), 1000);
        let b = batch(&["a", "b", "c"], "ip:10.0.0.1", NOW);
        let first = s.apply(&b, NOW).await.unwrap();
        assert_eq!(first.crossings.len(), 1);
        // While in flight, a redelivery of the same events is skipped.
        let during = s.apply(&b, NOW).await.unwrap();
        assert_eq!(during.duplicate, vec![true, true, true]);
        assert_eq!(during.busy, vec![true, true, true]);
        s.rollback(&during.receipt).await.unwrap();
        s.rollback(&first.receipt).await.unwrap();
        // After the rollback the same events count again, once, and fire again.
        let again = s.apply(&b, NOW).await.unwrap();
        assert_eq!(again.duplicate, vec![false, false, false]);
        assert_eq!(again.crossings.len(), 1);
        assert_eq!(again.crossings[0].counted, 3.0);
    }

    #[tokio::test]
    async fn cleanup_forgets_idle_entities_and_old_ids() {
        let s = MemoryState::new(Duration::from_secs(3600), 1000);
        let out = s
            .apply(&batch(&["a"], "ip:10.0.0.1", NOW), NOW)
            .await
            .unwrap();
        s.commit(&out.receipt, NOW).await.unwrap();
        assert_eq!(s.stats().entities, 1);
        assert_eq!(
            s.cleanup(NOW + 59_000).await.unwrap(),
            CleanupReport::default()
        );
        let r = s.cleanup(NOW + 60_000).await.unwrap();
        assert_eq!((r.entities, r.event_ids), (1, 0));
        let r = s.cleanup(NOW + 3_600_000).await.unwrap();
        assert_eq!((r.entities, r.event_ids), (0, 1));
        assert_eq!(s.stats(), StateStats::default());
        // An entity with a standing decision stays until the decision expires.
        let out = s
            .apply(&batch(&["x", "y", "z"], "ip:10.0.0.2", NOW), NOW)
            .await
            .unwrap();
        assert_eq!(out.crossings.len(), 1);
        assert_eq!(s.cleanup(NOW + 120_000).await.unwrap().entities, 0);
        // Its offense history (for repeat offenders) stays for the state TTL after the
        // decision ends.
        assert_eq!(s.cleanup(NOW + 300_000).await.unwrap().entities, 0);
        assert_eq!(s.cleanup(NOW + 3_899_999).await.unwrap().entities, 0);
        assert_eq!(s.cleanup(NOW + 3_900_000).await.unwrap().entities, 1);
    }

    #[tokio::test]
    async fn full_cache_evicts_the_oldest_and_counts() {
        let s = MemoryState::new(Duration::from_secs(3600), 100);
        for i in 0..150 {
            let b = batch(&[&format!("e{i}")], &format!("ip:10.0.0.{i}"), NOW);
            let out = s.apply(&b, NOW + i).await.unwrap();
            s.commit(&out.receipt, NOW + i).await.unwrap();
        }
        let stats = s.stats();
        assert!(stats.entities <= 100, "{stats:?}");
        assert!(stats.evictions_total >= 50, "{stats:?}");
        assert_eq!(stats.event_ids, 100);
        assert_eq!(stats.event_id_evictions_total, 50);
        // The newest entity survived.
        let inner = s.inner.lock();
        let p = inner.policies.get(&key("p")).unwrap();
        let newest = s.entity_fingerprint(&"ip:10.0.0.149".parse().unwrap());
        assert!(p.entities.contains_key(&newest));
    }

    #[tokio::test]
    async fn retain_drops_other_policies() {
        let s = MemoryState::new(Duration::from_secs(3600), 1000);
        s.apply(&batch(&["a"], "ip:10.0.0.1", NOW), NOW)
            .await
            .unwrap();
        s.retain(&[key("p")]).await.unwrap();
        assert_eq!(s.stats().entities, 1);
        s.retain(&[key("q")]).await.unwrap();
        assert_eq!(s.stats().entities, 0);
    }
}

/// Scratch states for a shared store (PostgreSQL) that keeps each (policy, entity)
/// state serialized: a step loads the entities it touches into a [`Scratch`], runs this
/// module's algorithm on it, and writes them back, so every backend decides alike.
///
/// The memory backend knows entities only by fingerprint and keeps undo logs in its
/// marks; a scratch state also keeps the key of every entity it holds, so that it can
/// name them to the store, and reads and restores undo logs as (policy, entity, undo)
/// records. None of this touches the memory backend's own path.
pub(crate) mod scratch {
    use std::collections::HashMap;

    use esper_protocol::EntityKey;
    use parking_lot::Mutex;
    use serde::{Deserialize, Serialize};

    use super::{EntityMap, EntityState, MemoryState, PolicyState};
    use crate::eval::marks::Change;
    use crate::eval::state::{
        BatchInput, BatchOutcome, DecisionState, PolicyKey, Receipt, Revoked, SeqProgress,
        StateBackend, StateError, Undo,
    };
    use crate::eval::window::{DistinctWindow, Window};

    /// The serialized form of one entity's state.
    #[derive(Serialize, Deserialize)]
    struct Stored {
        w: Window,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        d: Option<Box<DistinctWindow>>,
        /// A sequence's progress as versions before sliding sequences kept it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        s: Option<(u8, u32, i64)>,
        /// A sequence's progress: per step, runs of (start sub-bucket, count).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        r: Option<Vec<Vec<(i64, u32)>>>,
        /// cooldown until, cooldown by, level, offenses, last offense.
        c: (i64, u64, usize, u32, i64),
        /// The prior offense, apart from `c` so that rows read the same either way
        /// between versions that keep it and versions that do not.
        #[serde(default, skip_serializing_if = "is_zero")]
        p: i64,
        t: i64,
    }

    fn is_zero(v: &i64) -> bool {
        *v == 0
    }

    /// One entity's state to write back.
    pub(crate) struct Saved {
        pub policy: PolicyKey,
        pub entity: EntityKey,
        pub window_ms: i64,
        pub state: Vec<u8>,
        /// When the entity becomes idle (cleanup removes it from then on).
        pub expires_at: i64,
        pub cooldown_until: i64,
        pub last_touch: i64,
    }

    /// One change of a batch to take back, by name.
    pub(crate) type UndoRecord = (PolicyKey, EntityKey, Undo);

    /// A memory state over the entities one step of a shared store touches.
    pub(crate) struct Scratch {
        state: MemoryState,
        /// Entity fingerprint -> key, for every entity the state may hold.
        names: Mutex<HashMap<u64, EntityKey>>,
    }

    impl Scratch {
        /// An empty scratch state whose next receipt has id `receipt_id`; it never
        /// evicts (the store bounds itself).
        pub(crate) fn new(ttl_ms: i64, receipt_id: u64) -> Scratch {
            let state = MemoryState {
                ttl_ms,
                ..MemoryState::new(std::time::Duration::ZERO, usize::MAX)
            };
            state.inner.lock().next_receipt = receipt_id.saturating_sub(1);
            Scratch {
                state,
                names: Mutex::new(HashMap::new()),
            }
        }

        fn name(&self, entity: &EntityKey) -> u64 {
            let fp = self.state.entity_fingerprint(entity);
            self.names
                .lock()
                .entry(fp)
                .or_insert_with(|| entity.clone());
            fp
        }

        /// Loads one stored entity.
        pub(crate) fn load_entity(
            &self,
            policy: &PolicyKey,
            window_ms: i64,
            entity: EntityKey,
            bytes: &[u8],
        ) -> Result<(), serde_json::Error> {
            let st: Stored = serde_json::from_slice(bytes)?;
            let (cooldown_until, cooldown_by, level, offenses, last_offense_ms) = st.c;
            let state = EntityState {
                window: st.w,
                distinct: st.d,
                seq: match (st.r, st.s) {
                    (Some(steps), _) => Some(SeqProgress::Steps(steps)),
                    (None, Some((step, matched, started_ms))) => Some(SeqProgress::Legacy {
                        step,
                        matched,
                        started_ms,
                    }),
                    (None, None) => None,
                },
                decision: DecisionState {
                    cooldown_until,
                    cooldown_by,
                    level,
                    offenses,
                    last_offense_ms,
                    prior_offense_ms: st.p,
                },
                last_touch: st.t,
            };
            let fp = self.name(&entity);
            let mut inner = self.state.inner.lock();
            let previous = inner
                .policies
                .entry(policy.clone())
                .or_insert_with(|| PolicyState {
                    window_ms,
                    entities: EntityMap::default(),
                })
                .entities
                .insert(fp, state);
            if previous.is_none() {
                inner.entities += 1;
            }
            Ok(())
        }

        /// Records an event id the store already knows: processed, or in flight in
        /// another batch (`busy`).
        pub(crate) fn mark_seen(&self, id: &str, busy: bool) {
            let key = self.state.fingerprint(id);
            self.state.inner.lock().marks.mark_known(key, busy);
        }

        /// Applies a batch to the loaded entities.
        pub(crate) fn apply(&self, batch: &BatchInput, now_ms: i64) -> BatchOutcome {
            for event in &batch.events {
                for hit in &event.hits {
                    self.name(&hit.entity);
                }
            }
            self.state.apply_now(batch, now_ms)
        }

        /// Forgives revoked decisions of the loaded entities.
        pub(crate) async fn forgive(
            &self,
            revoked: &[Revoked],
            now_ms: i64,
        ) -> Result<usize, StateError> {
            self.state.forgive(revoked, now_ms).await
        }

        /// The changes the batch `receipt` made, in the order made, by name.
        pub(crate) fn undo_log(&self, receipt: u64) -> Result<Vec<UndoRecord>, StateError> {
            let inner = self.state.inner.lock();
            let Some(log) = inner.marks.log(receipt) else {
                return Ok(Vec::new());
            };
            let names = self.names.lock();
            log.changes
                .iter()
                .map(|c| {
                    let policy = log.policies.get(c.policy as usize);
                    match (policy, names.get(&c.entity)) {
                        (Some(p), Some(e)) => Ok((p.clone(), e.clone(), c.undo.clone())),
                        _ => Err(unnamed()),
                    }
                })
                .collect()
        }

        /// Takes back a batch from its stored undo log and the decisions in `receipt`.
        pub(crate) async fn rollback(
            &self,
            receipt: &Receipt,
            log: Vec<UndoRecord>,
        ) -> Result<(), StateError> {
            let changes: Vec<(PolicyKey, u64, Undo)> = log
                .into_iter()
                .map(|(p, e, u)| (p, self.name(&e), u))
                .collect();
            {
                let mut inner = self.state.inner.lock();
                let mut undo = inner.marks.new_log(receipt.id);
                for (policy, entity, u) in changes {
                    let index = match undo.policies.iter().position(|k| *k == policy) {
                        Some(i) => i,
                        None => {
                            undo.policies.push(policy);
                            undo.policies.len() - 1
                        }
                    };
                    undo.changes.push(Change {
                        policy: u32::try_from(index).unwrap_or(u32::MAX),
                        entity,
                        undo: u,
                    });
                }
                inner.marks.keep_log(undo);
            }
            self.state.rollback(receipt).await
        }

        /// Every entity the scratch state holds now, serialized.
        pub(crate) fn saved(&self) -> Result<Vec<Saved>, StateError> {
            let inner = self.state.inner.lock();
            let names = self.names.lock();
            let mut out = Vec::with_capacity(inner.entities);
            for (policy, p) in &inner.policies {
                for (fp, e) in &p.entities {
                    let entity = names.get(fp).ok_or_else(unnamed)?;
                    let d = &e.decision;
                    let stored = Stored {
                        w: e.window.clone(),
                        d: e.distinct.clone(),
                        s: e.seq.as_ref().and_then(SeqProgress::legacy),
                        r: match &e.seq {
                            Some(SeqProgress::Steps(steps)) => Some(steps.clone()),
                            _ => None,
                        },
                        c: (
                            d.cooldown_until,
                            d.cooldown_by,
                            d.level,
                            d.offenses,
                            d.last_offense_ms,
                        ),
                        p: d.prior_offense_ms,
                        t: e.last_touch,
                    };
                    let state = serde_json::to_vec(&stored).map_err(|e| {
                        StateError::Unavailable(format!("cannot serialize entity state: {e}"))
                    })?;
                    out.push(Saved {
                        policy: policy.clone(),
                        entity: entity.clone(),
                        window_ms: p.window_ms,
                        state,
                        expires_at: e.idle_from(p.window_ms, self.state.ttl_ms),
                        cooldown_until: d.cooldown_until,
                        last_touch: e.last_touch,
                    });
                }
            }
            Ok(out)
        }
    }

    /// Every entity a scratch state holds came from a stored row or a hit, both named;
    /// this is a bug, reported rather than written back under a wrong name.
    fn unnamed() -> StateError {
        StateError::Unavailable("scratch state holds an entity it cannot name".into())
    }

    impl EntityState {
        /// The first time at which [`EntityState::is_idle`] holds (it holds from then on
        /// while the entity is not touched).
        fn idle_from(&self, window_ms: i64, history_ms: i64) -> i64 {
            let empty = self.window.is_empty()
                && self.distinct.as_ref().is_none_or(|d| d.is_empty())
                && self.seq.is_none();
            let d = &self.decision;
            let touch = if empty {
                i64::MIN
            } else {
                self.last_touch.saturating_add(window_ms)
            };
            let history = if d.offenses == 0 {
                i64::MIN
            } else {
                super::history_end(d, history_ms)
            };
            touch.max(d.cooldown_until).max(history)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::eval::state::{BatchPolicy, EventHits, Hit, Rules};
        use std::sync::Arc;

        fn batch() -> BatchInput {
            let policy = BatchPolicy {
                key: PolicyKey {
                    id: Arc::from("p"),
                    fingerprint: 1,
                },
                params: crate::eval::window::WindowParams::new(
                    std::time::Duration::from_secs(60),
                    2.0,
                    std::time::Duration::from_secs(300),
                ),
                rules: Arc::new(Rules {
                    scale: 1.0,
                    ..Rules::default()
                }),
            };
            let hit = |entity: &str, weight| Hit {
                policy: 0,
                entity: entity.parse().unwrap(),
                at_ms: 1_000_000,
                weight,
                distinct: None,
                steps: 0,
            };
            BatchInput {
                policies: vec![policy],
                events: vec![
                    EventHits {
                        id: "a".into(),
                        hits: vec![hit("ip:10.0.0.1", 1.5)],
                    },
                    EventHits {
                        id: "b".into(),
                        hits: vec![hit("ip:10.0.0.1", 0.7), hit("ip:10.0.0.2", 1.0)],
                    },
                    EventHits {
                        id: "c".into(),
                        hits: vec![hit("ip:10.0.0.3", 0.0)],
                    },
                ],
            }
        }

        #[tokio::test]
        async fn a_stored_state_and_undo_log_take_a_batch_back() {
            let first = Scratch::new(3_600_000, 7);
            first.mark_seen("c", false);
            let out = first.apply(&batch(), 1_000_000);
            assert_eq!(out.receipt.id, 7);
            assert_eq!(out.duplicate, vec![false, false, true]);
            assert_eq!(out.crossings.len(), 1);
            let log = first.undo_log(7).unwrap();
            let named: Vec<String> = log.iter().map(|(_, e, _)| e.to_string()).collect();
            assert_eq!(named, ["ip:10.0.0.1", "ip:10.0.0.1", "ip:10.0.0.2"]);
            let saved = first.saved().unwrap();
            assert_eq!(saved.len(), 2, "a hit that counts nothing tracks nothing");

            // Another step loads the stored rows and takes the batch back from its log.
            let second = Scratch::new(3_600_000, 7);
            for s in &saved {
                second
                    .load_entity(&s.policy, s.window_ms, s.entity.clone(), &s.state)
                    .unwrap();
            }
            let receipt = Receipt {
                id: 7,
                cooldowns: out.receipt.cooldowns.clone(),
                ..Receipt::default()
            };
            second.rollback(&receipt, log).await.unwrap();
            assert!(
                second.undo_log(7).unwrap().is_empty(),
                "the log was used up"
            );
            let again = second.apply(&batch(), 1_000_000);
            assert_eq!(
                again.crossings, out.crossings,
                "the batch counts again alike"
            );
        }

        #[test]
        fn rows_read_alike_with_and_without_the_prior_offense_and_sequence_steps() {
            // The layout of the versions before the prior offense was kept.
            #[derive(Serialize, Deserialize)]
            struct Before {
                w: Window,
                c: (i64, u64, usize, u32, i64),
                t: i64,
            }
            let now = Stored {
                w: Window::default(),
                d: None,
                s: Some((1, 2, 3_500)),
                r: Some(vec![vec![(10, 2)], vec![(10, 1)]]),
                c: (5_000, 1, 0, 2, 4_000),
                p: 3_000,
                t: 4_000,
            };
            let before: Before =
                serde_json::from_slice(&serde_json::to_vec(&now).unwrap()).unwrap();
            assert_eq!((before.c, before.t), (now.c, now.t));
            let read: Stored =
                serde_json::from_slice(&serde_json::to_vec(&before).unwrap()).unwrap();
            assert_eq!((read.c, read.p, read.t), (now.c, 0, now.t));
            let none = Stored { p: 0, ..read };
            let text = String::from_utf8(serde_json::to_vec(&none).unwrap()).unwrap();
            assert!(!text.contains("\"p\""), "{text}");
            let kept: Stored = serde_json::from_slice(&serde_json::to_vec(&now).unwrap()).unwrap();
            assert_eq!((kept.s, kept.r), (now.s, now.r));
        }

        #[test]
        fn busy_ids_are_reported_busy() {
            let s = Scratch::new(3_600_000, 3);
            s.mark_seen("a", true);
            let out = s.apply(&batch(), 1_000_000);
            assert_eq!(out.duplicate, vec![true, false, false]);
            assert_eq!(out.busy, vec![true, false, false]);
        }

        #[test]
        fn idle_from_agrees_with_is_idle() {
            let mut e = EntityState {
                last_touch: 1_000,
                ..EntityState::default()
            };
            let p = crate::eval::window::WindowParams::new(
                std::time::Duration::from_secs(60),
                1.0,
                std::time::Duration::from_secs(1),
            );
            e.window.add(0, 1.0, &p);
            e.decision.offenses = 1;
            e.decision.last_offense_ms = 5_000;
            e.decision.cooldown_until = 9_000;
            for (window_ms, history_ms) in [(60_000, 3_600_000), (1_000, 100), (10, 20_000)] {
                let from = e.idle_from(window_ms, history_ms);
                assert!(e.is_idle(from, window_ms, history_ms));
                assert!(!e.is_idle(from - 1, window_ms, history_ms));
            }
        }
    }
}
