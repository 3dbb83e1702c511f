//! One test suite for every engine state backend (memory, Redis, PostgreSQL): the same
//! batches give the same outcomes. Redis runs as a real `redis-server` and PostgreSQL as
//! a real cluster, each on a free loopback port.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use esper_engine::eval::state::{
    BatchInput, BatchOutcome, BatchPolicy, Claim, EventHits, Hit, LogAppend, Logged, PolicyKey,
    Revoked, Rules, Rung, StateBackend, StateStats,
};
use esper_engine::eval::window::WindowParams;
use esper_engine::eval::{
    MemoryState, PostgresState, PostgresStateConfig, Reading, RedisState, RedisStateConfig,
    StateClock,
};
use support::postgres as pg;
use support::redis_server;

const TTL: Duration = Duration::from_secs(3600);
const LEASE: Duration = Duration::from_secs(120);

/// The backends under test.
#[allow(non_camel_case_types)]
enum Backend {
    memory,
    redis,
    postgres,
}

impl Backend {
    async fn make(&self, capacity: usize, lease: Duration) -> Arc<dyn StateBackend> {
        match self {
            Backend::memory => Arc::new(MemoryState::new(TTL, capacity)),
            Backend::redis => Arc::new(
                RedisState::connect(RedisStateConfig {
                    url: redis_server::shared().url(),
                    prefix: redis_server::unique_prefix("state"),
                    ttl: TTL,
                    lease,
                    capacity,
                })
                .await
                .unwrap(),
            ),
            Backend::postgres => Arc::new(
                PostgresState::connect(PostgresStateConfig {
                    url: pg::shared().fresh_database().await,
                    pool_size: 4,
                    ttl: TTL,
                    lease,
                    capacity,
                })
                .await
                .unwrap(),
            ),
        }
    }

    async fn state(&self) -> Arc<dyn StateBackend> {
        self.make(1000, LEASE).await
    }
}

/// Runs each named test against each named backend.
macro_rules! suite {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&super::Backend::$backend).await;
                }
            )*
        }
    };
}

suite!(memory: counts_each_event_once_even_within_a_batch,
    workers_count_time_by_the_shared_states_clock,
    commits_fill_the_outbox_one_owner_delivers_it,
    a_full_outbox_drops_the_oldest_and_a_lapsed_lease_passes_on, a_revoked_decision_rearms_its_policy,
    a_forgiven_repeat_offense_dates_the_history_from_the_one_before,
    a_revocation_empties_distinct_windows_too, rollback_undoes_counts_cooldowns_and_marks,
    cleanup_forgets_idle_entities_and_old_ids, a_full_cache_evicts_the_oldest_and_counts,
    retain_drops_other_policies, distinct_values_count_once_per_window, sequences_complete_in_order,
    a_rollback_takes_back_only_its_own_sequence_progress,
    escalation_and_repeat_offenses_grow_the_ttl, late_events_are_ignored_and_counted,
    a_ban_longer_than_the_state_ttl_still_grows,
    a_long_mixed_log_gives_the_memory_backends_outcomes);
suite!(redis: counts_each_event_once_even_within_a_batch,
    workers_count_time_by_the_shared_states_clock,
    commits_fill_the_outbox_one_owner_delivers_it,
    a_full_outbox_drops_the_oldest_and_a_lapsed_lease_passes_on, a_revoked_decision_rearms_its_policy,
    a_forgiven_repeat_offense_dates_the_history_from_the_one_before,
    a_revocation_empties_distinct_windows_too, rollback_undoes_counts_cooldowns_and_marks,
    cleanup_forgets_idle_entities_and_old_ids, a_full_cache_evicts_the_oldest_and_counts,
    retain_drops_other_policies, distinct_values_count_once_per_window, sequences_complete_in_order,
    a_rollback_takes_back_only_its_own_sequence_progress,
    escalation_and_repeat_offenses_grow_the_ttl, late_events_are_ignored_and_counted,
    a_ban_longer_than_the_state_ttl_still_grows,
    a_long_mixed_log_gives_the_memory_backends_outcomes,
    a_batch_past_its_lease_is_undone_and_cannot_commit, an_unreadable_entity_hash_starts_afresh,
    an_undo_log_without_prior_offenses_rolls_back,
    a_lapsed_batch_undone_at_another_commit_stays_undone);
suite!(postgres: counts_each_event_once_even_within_a_batch,
    workers_count_time_by_the_shared_states_clock,
    commits_fill_the_outbox_one_owner_delivers_it,
    a_full_outbox_drops_the_oldest_and_a_lapsed_lease_passes_on, a_revoked_decision_rearms_its_policy,
    a_forgiven_repeat_offense_dates_the_history_from_the_one_before,
    a_revocation_empties_distinct_windows_too, rollback_undoes_counts_cooldowns_and_marks,
    cleanup_forgets_idle_entities_and_old_ids, a_full_cache_evicts_the_oldest_and_counts,
    retain_drops_other_policies, distinct_values_count_once_per_window, sequences_complete_in_order,
    a_rollback_takes_back_only_its_own_sequence_progress,
    escalation_and_repeat_offenses_grow_the_ttl, late_events_are_ignored_and_counted,
    a_ban_longer_than_the_state_ttl_still_grows,
    a_long_mixed_log_gives_the_memory_backends_outcomes,
    a_batch_past_its_lease_is_undone_and_cannot_commit, restarted_state_keeps_counts,
    a_lapsed_batch_undone_at_another_commit_stays_undone,
    a_database_of_the_first_layout_gains_the_outbox,
    a_record_numbered_lower_but_committed_later_is_not_lost,
    an_unreadable_state_row_starts_afresh);

/// "Now" for a test: the current time rounded down to 10s, so that receipts'
/// leases (which shared backends check against the real clock) are in the future and
/// sub-buckets start on a round number.
fn now() -> i64 {
    let ms = chrono::Utc::now().timestamp_millis();
    ms - ms % 10_000
}

fn key(id: &str) -> PolicyKey {
    PolicyKey {
        id: Arc::from(id),
        fingerprint: 1,
    }
}

fn count_policy(id: &str, threshold: f64) -> BatchPolicy {
    BatchPolicy {
        key: key(id),
        params: WindowParams::new(Duration::from_secs(60), threshold, Duration::from_secs(300)),
        rules: Arc::new(Rules {
            scale: 1.0,
            ..Rules::default()
        }),
    }
}

/// A count policy (threshold 3, decisions of 300 s) that escalates to level 1 at 5
/// (600 s), with `rules`' growth.
fn ladder_policy(id: &str, rules: Rules) -> BatchPolicy {
    BatchPolicy {
        rules: Arc::new(Rules {
            scale: 1.0,
            ladder: vec![Rung {
                repeat: 1,
                threshold: 5.0,
                ttl_ms: 600_000,
            }],
            ..rules
        }),
        ..count_policy(id, 3.0)
    }
}

fn distinct_policy(id: &str, threshold: f64) -> BatchPolicy {
    BatchPolicy {
        rules: Arc::new(Rules {
            distinct: true,
            scale: 1.0,
            ..Rules::default()
        }),
        ..count_policy(id, threshold)
    }
}

fn hit(policy: usize, entity: &str, at_ms: i64) -> Hit {
    Hit {
        policy,
        entity: entity.parse().unwrap(),
        at_ms,
        weight: 1.0,
        distinct: None,
        steps: 0,
    }
}

/// Events `ids`, each one hit of policy 0 (count, threshold 3) on `entity` at `at_ms`.
fn batch(ids: &[&str], entity: &str, at_ms: i64) -> BatchInput {
    BatchInput {
        policies: vec![count_policy("p", 3.0)],
        events: ids
            .iter()
            .map(|id| EventHits {
                id: id.to_string(),
                hits: vec![hit(0, entity, at_ms)],
            })
            .collect(),
    }
}

async fn apply_commit(s: &dyn StateBackend, b: &BatchInput, now: i64) -> BatchOutcome {
    let out = s.apply(b, now).await.unwrap();
    s.commit(&out.receipt, now).await.unwrap();
    out
}

async fn counts_each_event_once_even_within_a_batch(b: &Backend) {
    let s = b.state().await;
    let now = now();
    let out = apply_commit(&*s, &batch(&["a", "b", "a"], "ip:10.0.0.1", now), now).await;
    assert_eq!(out.duplicate, vec![false, false, true]);
    assert_eq!(
        out.busy,
        vec![false; 3],
        "a repeat within the batch is not busy"
    );
    let out = apply_commit(&*s, &batch(&["b", "c"], "ip:10.0.0.1", now), now).await;
    assert_eq!(out.duplicate, vec![true, false]);
    assert_eq!(out.busy, vec![false, false]);
    assert_eq!(out.crossings.len(), 1, "a, c and b make 3");
    assert_eq!(out.crossings[0].counted, 3.0);
    assert_eq!((out.crossings[0].event, out.crossings[0].hit), (1, 0));
    // Events without hits are not remembered: they have nothing to repeat.
    let empty = BatchInput {
        policies: vec![count_policy("p", 3.0)],
        events: vec![EventHits {
            id: "z".into(),
            hits: vec![],
        }],
    };
    assert_eq!(apply_commit(&*s, &empty, now).await.duplicate, vec![false]);
    assert_eq!(apply_commit(&*s, &empty, now).await.duplicate, vec![false]);
}

async fn rollback_undoes_counts_cooldowns_and_marks(b: &Backend) {
    let s = b.state().await;
    let now = now();
    let bt = batch(&["a", "b", "c"], "ip:10.0.0.1", now);
    let first = s.apply(&bt, now).await.unwrap();
    assert_eq!(first.crossings.len(), 1);
    // While in flight, a redelivery of the same events is skipped and reported busy.
    let during = s.apply(&bt, now).await.unwrap();
    assert_eq!(during.duplicate, vec![true, true, true]);
    assert_eq!(during.busy, vec![true, true, true]);
    s.rollback(&during.receipt).await.unwrap();
    s.rollback(&first.receipt).await.unwrap();
    // After the rollback the same events count again, once, and fire again: the
    // cooldown the first batch started is gone too.
    let again = s.apply(&bt, now).await.unwrap();
    assert_eq!(again.duplicate, vec![false, false, false]);
    assert_eq!(again.crossings.len(), 1);
    assert_eq!(again.crossings[0].counted, 3.0);
    s.commit(&again.receipt, now).await.unwrap();
    let later = apply_commit(&*s, &batch(&["d"], "ip:10.0.0.1", now), now).await;
    assert!(later.crossings.is_empty(), "the decision stands: {later:?}");
}

async fn cleanup_forgets_idle_entities_and_old_ids(b: &Backend) {
    let s = b.state().await;
    let now = now();
    apply_commit(&*s, &batch(&["a"], "ip:10.0.0.1", now), now).await;
    assert_eq!(s.stats().entities, 1);
    let r = s.cleanup(now + 59_000).await.unwrap();
    assert_eq!((r.entities, r.event_ids), (0, 0));
    let r = s.cleanup(now + 60_000).await.unwrap();
    assert_eq!((r.entities, r.event_ids), (1, 0));
    let r = s.cleanup(now + 3_600_000).await.unwrap();
    assert_eq!((r.entities, r.event_ids), (0, 1));
    assert_eq!(s.stats(), StateStats::default());
    // A forgotten id counts again.
    let out = apply_commit(&*s, &batch(&["a"], "ip:10.0.0.1", now), now + 3_600_000).await;
    assert_eq!(out.duplicate, vec![false]);
    // An entity with a standing decision stays until the decision expires, and its
    // offense history (for repeat offenders) for the state TTL after that.
    let out = apply_commit(&*s, &batch(&["x", "y", "z"], "ip:10.0.0.2", now), now).await;
    assert_eq!(out.crossings.len(), 1);
    assert_eq!(s.cleanup(now + 120_000).await.unwrap().entities, 0);
    assert_eq!(s.cleanup(now + 300_000).await.unwrap().entities, 0);
    assert_eq!(s.cleanup(now + 3_600_000).await.unwrap().entities, 0);
    let r = s.cleanup(now + 3_660_000).await.unwrap();
    assert_eq!(r.entities, 1, "ip:10.0.0.1, touched at +1h, is idle now");
    assert_eq!(s.cleanup(now + 3_899_999).await.unwrap().entities, 0);
    let r = s.cleanup(now + 3_900_000).await.unwrap();
    assert_eq!(
        r.entities, 1,
        "ip:10.0.0.2's history ends 1h after its decision"
    );
    assert_eq!(s.stats().entities, 0);
}

async fn a_full_cache_evicts_the_oldest_and_counts(b: &Backend) {
    let s = b.make(100, LEASE).await;
    let now = now();
    for i in 0..150 {
        let bt = batch(&[&format!("e{i}")], &format!("ip:10.0.0.{i}"), now);
        apply_commit(&*s, &bt, now + i).await;
    }
    let stats = s.stats();
    assert!(stats.entities <= 100, "{stats:?}");
    assert!(stats.evictions_total >= 50, "{stats:?}");
    assert_eq!(stats.event_ids, 100);
    assert_eq!(stats.event_id_evictions_total, 50);
    // The newest entity survived (two more events reach the threshold of 3); the
    // oldest did not (two more are only 2).
    let newest = apply_commit(&*s, &batch(&["n1", "n2"], "ip:10.0.0.149", now), now + 200).await;
    assert_eq!(newest.crossings.len(), 1);
    let oldest = apply_commit(&*s, &batch(&["o1", "o2"], "ip:10.0.0.0", now), now + 200).await;
    assert!(oldest.crossings.is_empty());
}

async fn retain_drops_other_policies(b: &Backend) {
    let s = b.state().await;
    let now = now();
    apply_commit(&*s, &batch(&["a", "b"], "ip:10.0.0.1", now), now).await;
    s.retain(&[key("p")]).await.unwrap();
    assert_eq!(s.stats().entities, 1);
    s.retain(&[key("q")]).await.unwrap();
    assert_eq!(s.stats().entities, 0);
    // Counting starts over.
    let out = apply_commit(&*s, &batch(&["c", "d"], "ip:10.0.0.1", now), now).await;
    assert!(out.crossings.is_empty());
}

fn distinct_hit(entity: &str, at_ms: i64, value: Option<u64>) -> Hit {
    Hit {
        weight: 0.0,
        distinct: value,
        ..hit(0, entity, at_ms)
    }
}

async fn a_revoked_decision_rearms_its_policy(b: &Backend) {
    let s = b.state().await;
    let now = now();
    let ip = "ip:10.0.0.1";
    let out = apply_commit(&*s, &batch(&["a", "b", "c"], ip, now), now).await;
    assert_eq!(out.crossings.len(), 1);
    assert_eq!(out.crossings[0].offense, 1);
    // Under the standing decision more events decide nothing.
    let out = apply_commit(&*s, &batch(&["d"], ip, now), now).await;
    assert!(out.crossings.is_empty());
    let revoked = |entity: &str, policy: &str, at: i64| Revoked {
        policy: key(policy),
        entity: entity.parse().unwrap(),
        decided_at_ms: at,
    };
    // The revocation of a decision older than the standing one, or of another pair,
    // changes nothing.
    let others = [
        revoked(ip, "p", now - 1),
        revoked("ip:10.0.0.9", "p", now),
        revoked(ip, "q", now),
    ];
    assert_eq!(s.forgive(&others, now + 1).await.unwrap(), 0);
    assert_eq!(
        s.forgive(&[revoked(ip, "p", now)], now + 1).await.unwrap(),
        1
    );
    // Applied again, as another worker sharing the state would: nothing more.
    assert_eq!(
        s.forgive(&[revoked(ip, "p", now)], now + 2).await.unwrap(),
        0
    );
    // The window starts afresh: two events do not cross, the third does, as a first
    // offense again (the revoked decision's offense was taken back).
    let t = now + 1000;
    let out = apply_commit(&*s, &batch(&["e", "f"], ip, t), t).await;
    assert!(out.crossings.is_empty(), "{out:?}");
    let out = apply_commit(&*s, &batch(&["g"], ip, t), t).await;
    assert_eq!(out.crossings.len(), 1);
    assert_eq!(out.crossings[0].counted, 3.0);
    assert_eq!(out.crossings[0].offense, 1);
    // The old revocation does not forgive the new decision; nor does any once the
    // decision has run out (ttl 300 s).
    assert_eq!(s.forgive(&[revoked(ip, "p", now)], t + 1).await.unwrap(), 0);
    assert_eq!(
        s.forgive(&[revoked(ip, "p", t)], t + 300_000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.forgive(&[revoked(ip, "p", t)], t + 1).await.unwrap(), 1);
}

fn revoked(entity: &str, at: i64) -> Revoked {
    Revoked {
        policy: key("p"),
        entity: entity.parse().unwrap(),
        decided_at_ms: at,
    }
}

/// The offense each of `ids` batches at `at` makes (policy threshold 3, one crossing).
async fn offense(s: &dyn StateBackend, ids: &[&str], entity: &str, at: i64) -> u32 {
    let out = apply_commit(s, &batch(ids, entity, at), at).await;
    assert_eq!(out.crossings.len(), 1, "{out:?}");
    out.crossings[0].offense
}

async fn a_forgiven_repeat_offense_dates_the_history_from_the_one_before(b: &Backend) {
    // Offense histories last TTL (an hour); a decision 300 s.
    let s = b.state().await;
    let ip = "ip:10.0.0.4";
    let first = now();
    assert_eq!(offense(&*s, &["a", "b", "c"], ip, first).await, 1);
    let second = first + 400_000;
    assert_eq!(offense(&*s, &["d", "e", "f"], ip, second).await, 2);
    assert_eq!(
        s.forgive(&[revoked(ip, second)], second + 1).await.unwrap(),
        1
    );
    // The first offense still counts: the next crossing within its hour repeats it.
    let third = second + 1000;
    assert_eq!(offense(&*s, &["g", "h", "i"], ip, third).await, 2);
    assert_eq!(
        s.forgive(&[revoked(ip, third)], third + 1).await.unwrap(),
        1
    );
    // More than an hour after the first offense's decision ended, though within an hour
    // of the forgiven ones, a crossing is a first offense again.
    let fourth = first + 300_000 + 3_600_000 + 1000;
    assert_eq!(offense(&*s, &["j", "k", "l"], ip, fourth).await, 1);
    // An escalation is the same offense: forgiving it forgives the offense, and the
    // history runs from the one before.
    let s = b.state().await;
    let ladder = ladder_policy("p", Rules::default());
    let run = |ids: &[&str], at: i64| BatchInput {
        policies: vec![ladder.clone()],
        events: ids
            .iter()
            .map(|id| EventHits {
                id: id.to_string(),
                hits: vec![hit(0, ip, at)],
            })
            .collect(),
    };
    apply_commit(&*s, &run(&["a", "b", "c"], first), first).await;
    let out = apply_commit(&*s, &run(&["d", "e", "f"], second), second).await;
    assert_eq!(out.crossings[0].offense, 2);
    let escalated = second + 1000;
    let out = apply_commit(&*s, &run(&["g", "h"], escalated), escalated).await;
    let seen: Vec<_> = out.crossings.iter().map(|c| (c.level, c.offense)).collect();
    assert_eq!(seen, vec![(1, 2)]);
    assert_eq!(
        s.forgive(&[revoked(ip, escalated)], escalated + 1)
            .await
            .unwrap(),
        1
    );
    let out = apply_commit(&*s, &run(&["j", "k", "l"], fourth), fourth).await;
    let seen: Vec<_> = out.crossings.iter().map(|c| (c.level, c.offense)).collect();
    assert_eq!(seen, vec![(0, 1)]);
}

async fn a_revocation_empties_distinct_windows_too(b: &Backend) {
    let s = b.state().await;
    let now = now();
    let policies = vec![distinct_policy("paths", 2.0)];
    let bt = |ids: &[(&str, u64)], at: i64| BatchInput {
        policies: policies.clone(),
        events: ids
            .iter()
            .map(|(id, v)| EventHits {
                id: id.to_string(),
                hits: vec![distinct_hit("ip:10.0.0.9", at, Some(*v))],
            })
            .collect(),
    };
    let out = apply_commit(&*s, &bt(&[("1", 1), ("2", 2)], now), now).await;
    assert_eq!(out.crossings.len(), 1);
    let revoked = Revoked {
        policy: key("paths"),
        entity: "ip:10.0.0.9".parse().unwrap(),
        decided_at_ms: now,
    };
    assert_eq!(s.forgive(&[revoked], now + 1).await.unwrap(), 1);
    // Values seen before the revocation count anew: 1 and 2 again make two.
    let t = now + 1000;
    let out = apply_commit(&*s, &bt(&[("3", 1)], t), t).await;
    assert!(out.crossings.is_empty(), "{out:?}");
    let out = apply_commit(&*s, &bt(&[("4", 2)], t), t).await;
    assert_eq!(out.crossings.len(), 1);
    assert_eq!(out.crossings[0].counted, 2.0);
}

async fn distinct_values_count_once_per_window(b: &Backend) {
    let s = b.state().await;
    let now = now();
    let policies = vec![distinct_policy("paths", 3.0)];
    let ev = |id: &str, at: i64, v: Option<u64>| EventHits {
        id: id.into(),
        hits: vec![distinct_hit("ip:10.0.0.9", at, v)],
    };
    let bt = BatchInput {
        policies: policies.clone(),
        events: vec![
            ev("1", now, Some(u64::MAX)),
            ev("2", now + 1000, Some(7)),
            ev("3", now + 2000, Some(7)),
            ev("4", now + 3000, None),
        ],
    };
    let out = apply_commit(&*s, &bt, now + 5000).await;
    assert!(out.crossings.is_empty(), "{out:?}");
    // A third value a minute after the first: the first has left the window.
    let bt = BatchInput {
        policies: policies.clone(),
        events: vec![ev("5", now + 60_000, Some(9))],
    };
    assert!(
        apply_commit(&*s, &bt, now + 60_000)
            .await
            .crossings
            .is_empty()
    );
    let bt = BatchInput {
        policies,
        events: vec![ev("6", now + 61_000, Some(u64::MAX - 1))],
    };
    let out = apply_commit(&*s, &bt, now + 61_000).await;
    assert_eq!(out.crossings.len(), 1);
    assert_eq!(out.crossings[0].counted, 3.0);
}

fn sequence_batch(events: &[(&str, u32)], at_ms: i64) -> BatchInput {
    sequence_batch_for("ip:10.0.0.5", events, at_ms)
}

fn sequence_batch_for(entity: &str, events: &[(&str, u32)], at_ms: i64) -> BatchInput {
    BatchInput {
        policies: vec![BatchPolicy {
            rules: Arc::new(Rules {
                sequence: vec![2, 1],
                scale: 1.0,
                ..Rules::default()
            }),
            ..count_policy("seq", 1.0)
        }],
        events: events
            .iter()
            .map(|(id, steps)| EventHits {
                id: id.to_string(),
                hits: vec![Hit {
                    weight: 0.0,
                    steps: *steps,
                    ..hit(0, entity, at_ms)
                }],
            })
            .collect(),
    }
}

async fn sequences_complete_in_order(b: &Backend) {
    let s = b.state().await;
    let now = now();
    // Step 1 needs two matches before step 2 counts.
    let out = apply_commit(&*s, &sequence_batch(&[("1", 1), ("2", 2)], now), now).await;
    assert!(out.crossings.is_empty());
    apply_commit(&*s, &sequence_batch(&[("3", 1)], now), now).await;
    let bt = sequence_batch(&[("4", 2)], now + 1000);
    let out = s.apply(&bt, now + 1000).await.unwrap();
    assert_eq!(out.crossings.len(), 1);
    assert_eq!(out.crossings[0].counted, 1.0);
    // A rollback restores the progress, so the redelivered event completes it again.
    s.rollback(&out.receipt).await.unwrap();
    let out = apply_commit(&*s, &bt, now + 1000).await;
    assert_eq!(out.crossings.len(), 1);
}

/// Batches on one entity's sequence that fail while others go on: each takes back only
/// what its own events did, in whatever order they fail, so nothing is lost and nothing
/// counts twice once their events come again.
async fn a_rollback_takes_back_only_its_own_sequence_progress(b: &Backend) {
    let s = b.state().await;
    let now = now();
    let seq = |events: &[(&str, u32)]| sequence_batch(events, now);
    // A adds a match of step 1, B (another worker) one more and commits, A fails.
    let a = s.apply(&seq(&[("1", 1)]), now).await.unwrap();
    apply_commit(&*s, &seq(&[("2", 1)]), now).await;
    s.rollback(&a.receipt).await.unwrap();
    let out = apply_commit(&*s, &seq(&[("3", 2)]), now).await;
    assert!(out.crossings.is_empty(), "B's match alone: {out:?}");
    // A's event comes again: now both count, once each.
    apply_commit(&*s, &seq(&[("1", 1)]), now).await;
    let out = apply_commit(&*s, &seq(&[("4", 2)]), now).await;
    assert_eq!(out.crossings.len(), 1, "{out:?}");

    // Two batches fail, the older first or the newer first: nothing of theirs stays.
    for (entity, first, second) in [("ip:10.0.0.6", 0, 1), ("ip:10.0.0.7", 1, 0)] {
        let seq = |events: &[(&str, u32)]| sequence_batch_for(entity, events, now);
        let (c_id, d_id) = (format!("c{first}"), format!("d{first}"));
        let c = s.apply(&seq(&[(&c_id, 1)]), now).await.unwrap();
        let d = s.apply(&seq(&[(&d_id, 1)]), now).await.unwrap();
        let receipts = [&c.receipt, &d.receipt];
        s.rollback(receipts[first]).await.unwrap();
        s.rollback(receipts[second]).await.unwrap();
        let out = apply_commit(&*s, &seq(&[(&format!("e{first}"), 2)]), now).await;
        assert!(out.crossings.is_empty(), "{entity}: {out:?}");
        // Their events come again, and count once each.
        let out = apply_commit(&*s, &seq(&[(&c_id, 1), (&d_id, 1)]), now).await;
        assert!(out.crossings.is_empty());
        let out = apply_commit(&*s, &seq(&[(&format!("f{first}"), 2)]), now).await;
        assert_eq!(out.crossings.len(), 1, "{entity}: {out:?}");
    }

    // A completion that fails after another batch went on gives back what it consumed.
    let seq = |events: &[(&str, u32)]| sequence_batch_for("ip:10.0.0.8", events, now);
    apply_commit(&*s, &seq(&[("g1", 1), ("g2", 1)]), now).await;
    let g = s.apply(&seq(&[("g3", 2)]), now).await.unwrap();
    assert_eq!(g.crossings.len(), 1);
    apply_commit(&*s, &seq(&[("h", 1)]), now).await;
    s.rollback(&g.receipt).await.unwrap();
    let out = apply_commit(&*s, &seq(&[("g3", 2)]), now).await;
    assert_eq!(out.crossings.len(), 1, "completed again: {out:?}");
}

async fn escalation_and_repeat_offenses_grow_the_ttl(b: &Backend) {
    let s = b.state().await;
    let now = now();
    let policy = ladder_policy(
        "esc",
        Rules {
            growth: 2.0,
            ttl_max_ms: 1_000_000,
            ..Rules::default()
        },
    );
    let run = |ids: Vec<String>, at: i64| BatchInput {
        policies: vec![policy.clone()],
        events: ids
            .into_iter()
            .map(|id| EventHits {
                id,
                hits: vec![hit(0, "ip:10.0.0.7", at)],
            })
            .collect(),
    };
    let ids = |from: usize, n: usize| (from..from + n).map(|i| format!("e{i}")).collect();
    let out = apply_commit(&*s, &run(ids(0, 5), now), now).await;
    let seen: Vec<_> = out
        .crossings
        .iter()
        .map(|c| (c.counted, c.level, c.offense, c.ttl_ms))
        .collect();
    assert_eq!(seen, vec![(3.0, 0, 1, 300_000), (5.0, 1, 1, 600_000)]);
    // After the decision expires, the next crossing is a repeat offense: ttl doubled,
    // then capped.
    let later = now + 700_000;
    let out = apply_commit(&*s, &run(ids(10, 3), later), later).await;
    let seen: Vec<_> = out
        .crossings
        .iter()
        .map(|c| (c.counted, c.level, c.offense, c.ttl_ms))
        .collect();
    assert_eq!(seen, vec![(3.0, 0, 2, 600_000)]);
    let later = later + 700_000;
    let out = apply_commit(&*s, &run(ids(20, 5), later), later).await;
    let seen: Vec<_> = out
        .crossings
        .iter()
        .map(|c| (c.counted, c.level, c.offense, c.ttl_ms))
        .collect();
    assert_eq!(seen, vec![(3.0, 0, 3, 1_000_000), (5.0, 1, 3, 1_000_000)]);
}

async fn a_ban_longer_than_the_state_ttl_still_grows(b: &Backend) {
    // Decisions of 2 h, growing twofold up to 10 h, beside a state TTL of 1 h.
    let s = b.state().await;
    let policy = BatchPolicy {
        params: WindowParams::new(Duration::from_secs(60), 3.0, Duration::from_secs(7200)),
        rules: Arc::new(Rules {
            scale: 1.0,
            growth: 2.0,
            ttl_max_ms: 36_000_000,
            ..Rules::default()
        }),
        ..count_policy("long", 3.0)
    };
    let run = |from: usize, at: i64| BatchInput {
        policies: vec![policy.clone()],
        events: (from..from + 3)
            .map(|i| EventHits {
                id: format!("e{i}"),
                hits: vec![hit(0, "ip:10.0.0.9", at)],
            })
            .collect(),
    };
    let seen = |out: BatchOutcome| -> Vec<(u32, i64)> {
        out.crossings
            .iter()
            .map(|c| (c.offense, c.ttl_ms))
            .collect()
    };
    let first = now();
    let out = apply_commit(&*s, &run(0, first), first).await;
    assert_eq!(seen(out), [(1, 7_200_000)]);
    // Half an hour after the ban ended (2.5 h after the offense): a repeat, and a
    // cleanup meanwhile keeps the history.
    let second = first + 9_000_000;
    s.cleanup(second - 1).await.unwrap();
    let out = apply_commit(&*s, &run(10, second), second).await;
    assert_eq!(seen(out), [(2, 14_400_000)]);
    // More than the state TTL after that ban ended: a first offense again.
    let third = second + 14_400_000 + 3_600_000 + 1000;
    s.cleanup(third - 1).await.unwrap();
    let out = apply_commit(&*s, &run(20, third), third).await;
    assert_eq!(seen(out), [(1, 7_200_000)]);
}

async fn late_events_are_ignored_and_counted(b: &Backend) {
    let s = b.state().await;
    let now = now();
    apply_commit(&*s, &batch(&["a"], "ip:10.0.0.3", now), now).await;
    let out = apply_commit(&*s, &batch(&["b"], "ip:10.0.0.3", now - 61_000), now).await;
    assert_eq!(out.late, 1);
    let out = apply_commit(&*s, &batch(&["c", "d"], "ip:10.0.0.3", now), now).await;
    assert_eq!(out.crossings[0].counted, 3.0, "a, c and d");
}

fn two_minutes_behind() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::minutes(2)
}

async fn workers_count_time_by_the_shared_states_clock(b: &Backend) {
    let s = b.state().await;
    let clock = StateClock::with_host_clock(two_minutes_behind);
    let reading = clock.sync(&*s).await.unwrap();
    let lag = chrono::Utc::now() - clock.now();
    let shared = !matches!(b, Backend::memory);
    if shared {
        // Generous: the reading is taken to the middle of a loopback round trip.
        let Reading::Offset(offset) = reading else {
            panic!("{reading:?}")
        };
        assert!((offset - 120_000).abs() < 2_000, "{offset}");
        assert!(lag.num_milliseconds().abs() < 2_000, "{lag}");
    } else {
        assert_eq!(
            reading,
            Reading::Local,
            "a state of one process has no clock"
        );
        assert!(lag > chrono::Duration::seconds(110), "{lag}");
    }
    // A worker on time counts an event; then the one whose host is behind evaluates
    // another event of the same entity, stamped by a proxy on time (events stamped
    // after a worker's now count as now, so it lands at the worker's now).
    let entity = "ip:10.0.0.9";
    let on_time = chrono::Utc::now().timestamp_millis();
    apply_commit(&*s, &batch(&["a"], entity, on_time), on_time).await;
    let at = clock.now().timestamp_millis();
    let out = apply_commit(&*s, &batch(&["b"], entity, on_time.min(at)), at).await;
    // By its own clock, the event is two minutes older than the first one: outside the
    // 60 s window, late. Over shared state it counts, by the state's clock.
    assert_eq!(out.late, usize::from(!shared));
}

/// A small deterministic generator (xorshift), so the log is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Four policies of every kind: weighted counts, a distinct count, a sequence and an
/// escalation ladder with growing ttls.
fn mixed_policies() -> Vec<BatchPolicy> {
    let rules = |r: Rules| Arc::new(Rules { scale: 1.0, ..r });
    vec![
        BatchPolicy {
            params: WindowParams::new(Duration::from_secs(10), 6.5, Duration::from_secs(20)),
            ..count_policy("weighted", 0.0)
        },
        BatchPolicy {
            params: WindowParams::new(Duration::from_secs(30), 4.0, Duration::from_secs(15)),
            rules: rules(Rules {
                distinct: true,
                ..Rules::default()
            }),
            ..count_policy("distinct", 0.0)
        },
        BatchPolicy {
            params: WindowParams::new(Duration::from_secs(20), 2.0, Duration::from_secs(10)),
            rules: rules(Rules {
                sequence: vec![2, 1, 1],
                ..Rules::default()
            }),
            ..count_policy("sequence", 0.0)
        },
        BatchPolicy {
            params: WindowParams::new(Duration::from_secs(5), 3.0, Duration::from_secs(4)),
            rules: rules(Rules {
                ladder: vec![
                    Rung {
                        repeat: 1,
                        threshold: 6.0,
                        ttl_ms: 8_000,
                    },
                    Rung {
                        repeat: 3,
                        threshold: 0.0,
                        ttl_ms: 12_000,
                    },
                ],
                growth: 1.5,
                ttl_max_ms: 30_000,
                ..Rules::default()
            }),
            ..count_policy("ladder", 0.0)
        },
    ]
}

/// A deterministic log of batches over the mixed policies: time moves on (with late and
/// future events), ids repeat, some batches are rolled back, cleanups run now and then.
fn mixed_log(seed: u64, batches: usize) -> Vec<(BatchInput, i64, bool)> {
    let mut rng = Rng(seed);
    let policies = mixed_policies();
    let start = now();
    let mut t = start;
    let mut out = Vec::new();
    for bi in 0..batches {
        t += rng.below(1500) as i64;
        let n = 1 + rng.below(40) as usize;
        let events = (0..n)
            .map(|i| {
                let id = if rng.below(10) == 0 && bi > 0 {
                    format!("ev-{}-{}", rng.below(bi as u64), rng.below(40))
                } else {
                    format!("ev-{bi}-{i}")
                };
                let at = t - rng.below(12_000) as i64;
                let entity = format!("ip:10.1.0.{}", rng.below(6));
                let chosen: Vec<usize> =
                    (0..policies.len()).filter(|_| rng.below(3) != 0).collect();
                let hits = chosen
                    .into_iter()
                    .map(|p| Hit {
                        policy: p,
                        entity: entity.parse().unwrap(),
                        at_ms: at,
                        weight: match p {
                            0 => [0.0, 0.5, 1.0, 1.25, 0.1][rng.below(5) as usize],
                            3 => 1.0,
                            _ => 0.0,
                        },
                        distinct: (p == 1 && rng.below(5) != 0)
                            .then(|| rng.next() % 9 + (u64::MAX - 9)),
                        steps: if p == 2 {
                            1u32 << rng.below(3) | u32::from(rng.below(4) == 0)
                        } else {
                            0
                        },
                    })
                    .collect();
                EventHits { id, hits }
            })
            .collect();
        let commit = rng.below(6) != 0;
        out.push((
            BatchInput {
                policies: policies.clone(),
                events,
            },
            t,
            commit,
        ));
    }
    out
}

async fn a_long_mixed_log_gives_the_memory_backends_outcomes(b: &Backend) {
    let reference = Backend::memory.state().await;
    let s = b.state().await;
    let mut crossings = 0;
    for (i, (bt, t, commit)) in mixed_log(0x5eed_1234_abcd_0001, 300)
        .into_iter()
        .enumerate()
    {
        let want = reference.apply(&bt, t).await.unwrap();
        let got = s.apply(&bt, t).await.unwrap();
        assert_eq!(got.duplicate, want.duplicate, "batch {i}");
        assert_eq!(got.busy, want.busy, "batch {i}");
        assert_eq!(got.late, want.late, "batch {i}");
        assert_eq!(got.crossings, want.crossings, "batch {i}");
        crossings += want.crossings.len();
        if commit {
            reference.commit(&want.receipt, t).await.unwrap();
            s.commit(&got.receipt, t).await.unwrap();
        } else {
            reference.rollback(&want.receipt).await.unwrap();
            s.rollback(&got.receipt).await.unwrap();
        }
        if i % 50 == 49 {
            let (a, b) = (
                reference.cleanup(t).await.unwrap(),
                s.cleanup(t).await.unwrap(),
            );
            assert_eq!(a.entities, b.entities, "cleanup after batch {i}");
        }
    }
    assert!(crossings > 50, "the log exercises decisions: {crossings}");
}

async fn a_batch_past_its_lease_is_undone_and_cannot_commit(b: &Backend) {
    let s = b.make(1000, Duration::from_secs(1)).await;
    let now = now();
    let bt = batch(&["a", "b", "c"], "ip:10.0.0.1", now);
    let dead = s.apply(&bt, now).await.unwrap();
    assert_eq!(dead.crossings.len(), 1);
    // Within the lease the events are busy; after it, the batch is undone and they
    // count (once) for whoever gets them next.
    let busy = s.apply(&bt, now + 500).await.unwrap();
    assert_eq!(busy.busy, vec![true; 3]);
    s.rollback(&busy.receipt).await.unwrap();
    let next = apply_commit(&*s, &bt, now + 1001).await;
    assert_eq!(next.duplicate, vec![false; 3]);
    assert_eq!(next.crossings.len(), 1);
    assert_eq!(next.crossings[0].counted, 3.0);
    // Its decisions' records are not logged either: the batch is decided again.
    let records = vec!["{}".to_string()];
    let log = LogAppend {
        entries: &records,
        capacity: 10,
    };
    assert!(s.commit_with(&dead.receipt, log, now + 1002).await.is_err());
    assert_eq!(
        s.claim_log("w", LEASE, 10).await.unwrap(),
        Claim::Mine {
            pending: 0,
            entries: vec![]
        }
    );
    let again = apply_commit(&*s, &bt, now + 1003).await;
    assert_eq!(again.duplicate, vec![true; 3]);
}

/// A lapsed batch is undone by whichever call comes next, here another worker's commit:
/// its counts and its decision's cooldown must not outlive the undo.
async fn a_lapsed_batch_undone_at_another_commit_stays_undone(b: &Backend) {
    let s = b.make(1000, Duration::from_secs(1)).await;
    let now = now();
    let bt = batch(&["a", "b", "c"], "ip:10.0.0.1", now);
    let dead = s.apply(&bt, now).await.unwrap();
    assert_eq!(dead.crossings.len(), 1);
    let other = s
        .apply(&batch(&["x"], "ip:10.0.0.2", now), now + 500)
        .await
        .unwrap();
    // The other worker's commit comes after the first batch's lease ran out.
    s.commit(&other.receipt, now + 1001).await.unwrap();
    let next = apply_commit(&*s, &bt, now + 1002).await;
    assert_eq!(next.duplicate, vec![false; 3]);
    assert_eq!(
        next.crossings.len(),
        1,
        "the lapsed decision's cooldown is gone"
    );
    assert_eq!(next.crossings[0].counted, 3.0, "each event counted once");
}

/// Two connections, a test's default lease and capacity, on the database at `url`.
fn pg_config(url: &str) -> PostgresStateConfig {
    PostgresStateConfig {
        url: url.to_string(),
        pool_size: 2,
        ttl: TTL,
        lease: LEASE,
        capacity: 1000,
    }
}

/// Durable state: a new connection to the same database finds the windows, decisions
/// and processed ids of the old one.
async fn restarted_state_keeps_counts(_: &Backend) {
    let url = pg::shared().fresh_database().await;
    let config = pg_config(&url);
    let now = now();
    let first = PostgresState::connect(config.clone()).await.unwrap();
    apply_commit(&first, &batch(&["a", "b"], "ip:10.0.0.1", now), now).await;
    drop(first);
    let second = PostgresState::connect(config).await.unwrap();
    assert_eq!(second.stats().entities, 1);
    assert_eq!(second.stats().event_ids, 2);
    let out = apply_commit(&second, &batch(&["b", "c"], "ip:10.0.0.1", now), now).await;
    assert_eq!(out.duplicate, vec![true, false]);
    assert_eq!(out.crossings.len(), 1, "a, b and c make 3");
    // The outbox too: records committed before a restart are there after it.
    let records = vec!["{\"n\":1}".to_string()];
    let out = second
        .apply(&batch(&["d"], "ip:10.0.0.1", now), now)
        .await
        .unwrap();
    second
        .commit_with(&out.receipt, log(&records, 10), now)
        .await
        .unwrap();
    drop(second);
    let third = PostgresState::connect(pg_config(&url)).await.unwrap();
    assert_eq!(
        texts(&third.claim_log("w", LEASE, 10).await.unwrap()),
        records
    );
}

fn log(entries: &[String], capacity: usize) -> LogAppend<'_> {
    LogAppend { entries, capacity }
}

/// The records of a claim this owner holds.
fn texts(claim: &Claim) -> Vec<String> {
    match claim {
        Claim::Mine { entries, .. } => entries.iter().map(|(_, e)| e.clone()).collect(),
        Claim::Held { by, .. } => panic!("the outbox is held by {by}"),
    }
}

/// The numbers of a claim's records.
fn numbers(claim: &Claim) -> Vec<u64> {
    match claim {
        Claim::Mine { entries, .. } => entries.iter().map(|(n, _)| *n).collect(),
        Claim::Held { by, .. } => panic!("the outbox is held by {by}"),
    }
}

/// Commits a batch of one new event with `records`.
async fn commit_records(
    s: &dyn StateBackend,
    event: &str,
    records: &[String],
    cap: usize,
) -> Logged {
    let now = now();
    let out = s
        .apply(&batch(&[event], "ip:10.0.0.9", now), now)
        .await
        .unwrap();
    s.commit_with(&out.receipt, log(records, cap), now)
        .await
        .unwrap()
}

fn records(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| format!("{{\"n\":\"{n}\"}}")).collect()
}

async fn commits_fill_the_outbox_one_owner_delivers_it(b: &Backend) {
    let s = b.state().await;
    let lease = Duration::from_secs(30);
    let first = records(&["a", "b"]);
    assert_eq!(
        commit_records(&*s, "e1", &first, 10).await,
        Logged {
            dropped: 0,
            pending: 2
        }
    );
    // A commit without records leaves the outbox alone.
    apply_commit(&*s, &batch(&["e2"], "ip:10.0.0.9", now()), now()).await;
    let claim = s.claim_log("w1", lease, 10).await.unwrap();
    assert_eq!(texts(&claim), first);
    let n = numbers(&claim);
    assert!(n[0] < n[1], "numbered in order: {n:?}");
    // One owner at a time; another's acknowledgement removes nothing.
    assert_eq!(
        s.claim_log("w2", lease, 10).await.unwrap(),
        Claim::Held {
            by: "w1".into(),
            pending: 2
        }
    );
    assert_eq!(s.ack_log("w2", &n, lease).await.unwrap(), (false, 2));
    // The holder removes what it delivered, and nothing committed since.
    commit_records(&*s, "e3", &records(&["c"]), 10).await;
    assert_eq!(s.ack_log("w1", &n, lease).await.unwrap(), (true, 1));
    // A claim reads at most `limit`, oldest first.
    commit_records(&*s, "e4", &records(&["d"]), 10).await;
    assert_eq!(
        texts(&s.claim_log("w1", lease, 1).await.unwrap()),
        records(&["c"])
    );
    // Only the holder gives the lease up; then the next owner takes over at once.
    s.release_log("w2").await.unwrap();
    assert!(matches!(
        s.claim_log("w2", lease, 10).await.unwrap(),
        Claim::Held { .. }
    ));
    s.release_log("w1").await.unwrap();
    assert_eq!(
        texts(&s.claim_log("w2", lease, 10).await.unwrap()),
        records(&["c", "d"])
    );
}

async fn a_full_outbox_drops_the_oldest_and_a_lapsed_lease_passes_on(b: &Backend) {
    let s = b.state().await;
    assert_eq!(
        commit_records(&*s, "e1", &records(&["a", "b", "c"]), 2).await,
        Logged {
            dropped: 1,
            pending: 2
        }
    );
    let short = Duration::from_millis(300);
    let claim = s.claim_log("w1", short, 10).await.unwrap();
    assert_eq!(texts(&claim), records(&["b", "c"]));
    let n = numbers(&claim);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let taken = s.claim_log("w2", short, 10).await.unwrap();
    assert_eq!(numbers(&taken), n, "the next owner reads the same records");
    // The old holder's late acknowledgement removes nothing.
    assert_eq!(s.ack_log("w1", &n, short).await.unwrap(), (false, 2));
    assert_eq!(s.ack_log("w2", &n[..1], short).await.unwrap(), (true, 1));
}

/// A database a worker of schema version 1 set up (before the outbox) is brought up to
/// date by the next worker that connects, while it keeps its state.
async fn a_database_of_the_first_layout_gains_the_outbox(_: &Backend) {
    let url = pg::shared().fresh_database().await;
    let config = pg_config(&url);
    let now = now();
    let first = PostgresState::connect(config.clone()).await.unwrap();
    apply_commit(&first, &batch(&["a"], "ip:10.0.0.1", now), now).await;
    drop(first);
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    for stmt in [
        "DROP TABLE esper_state_outbox, esper_state_outbox_lease",
        "UPDATE esper_state_meta SET value = 1 WHERE name = 'schema_version'",
    ] {
        sqlx::query(stmt).execute(&db).await.unwrap();
    }
    let second = PostgresState::connect(config.clone()).await.unwrap();
    assert_eq!(second.stats().event_ids, 1);
    let version: i64 =
        sqlx::query_scalar("SELECT value FROM esper_state_meta WHERE name = 'schema_version'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(version, esper_engine::eval::postgres::SCHEMA_VERSION);
    commit_records(&second, "b", &records(&["x"]), 10).await;
    assert_eq!(
        texts(&second.claim_log("w", LEASE, 10).await.unwrap()),
        records(&["x"])
    );
    // A database a newer build set up is refused, not altered.
    sqlx::query("UPDATE esper_state_meta SET value = 99 WHERE name = 'schema_version'")
        .execute(&db)
        .await
        .unwrap();
    let refused = PostgresState::connect(pg_config(&url)).await;
    let Err(e) = refused else {
        panic!("a newer schema is refused")
    };
    assert!(e.to_string().contains("schema version 99"), "{e}");
}

/// PostgreSQL draws a record's number when its commit inserts it, not when the commit
/// ends: a record numbered below those delivered can appear after the claim that read
/// them. The acknowledgement must leave it for the next claim.
async fn a_record_numbered_lower_but_committed_later_is_not_lost(_: &Backend) {
    let url = pg::shared().fresh_database().await;
    let s = PostgresState::connect(pg_config(&url)).await.unwrap();
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let mut slow = db.begin().await.unwrap();
    sqlx::query("INSERT INTO esper_state_outbox (entry) VALUES ('{\"n\":\"slow\"}')")
        .execute(&mut *slow)
        .await
        .unwrap();
    commit_records(&s, "e1", &records(&["quick"]), 10).await;
    let claim = s.claim_log("w", LEASE, 10).await.unwrap();
    assert_eq!(texts(&claim), records(&["quick"]));
    slow.commit().await.unwrap();
    assert_eq!(
        s.ack_log("w", &numbers(&claim), LEASE).await.unwrap(),
        (true, 1)
    );
    assert_eq!(
        texts(&s.claim_log("w", LEASE, 10).await.unwrap()),
        records(&["slow"])
    );
}

/// A state row that cannot be read (a bad byte on disk, a hand edit) does not fail every
/// batch that touches its entity: the entity starts afresh.
async fn an_unreadable_state_row_starts_afresh(_: &Backend) {
    let url = pg::shared().fresh_database().await;
    let s = PostgresState::connect(pg_config(&url)).await.unwrap();
    let now = now();
    apply_commit(&s, &batch(&["a", "b"], "ip:10.0.0.1", now), now).await;
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let n = sqlx::query("UPDATE esper_state_entity SET state = '\\x00ff'::bytea")
        .execute(&db)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 1);
    counts_start_afresh(&s, now).await;
    assert_eq!(s.refresh_stats().await.unwrap().entities, 1);
}

/// A Redis state under a prefix of its own, the prefix, and a connection to edit its
/// keys by hand.
async fn redis_state_by_hand(
    name: &str,
) -> (RedisState, String, ::redis::aio::MultiplexedConnection) {
    let prefix = redis_server::unique_prefix(name);
    let s = RedisState::connect(RedisStateConfig {
        url: redis_server::shared().url(),
        prefix: prefix.clone(),
        ttl: TTL,
        lease: LEASE,
        capacity: 1000,
    })
    .await
    .unwrap();
    let redis = ::redis::Client::open(redis_server::shared().url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    (s, prefix, redis)
}

/// The same for a Redis entity hash whose window and sequence cannot be read.
async fn an_unreadable_entity_hash_starts_afresh(_: &Backend) {
    let (s, prefix, mut redis) = redis_state_by_hand("garbled").await;
    let now = now();
    apply_commit(&s, &batch(&["a", "b"], "ip:10.0.0.1", now), now).await;
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}:e:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: () = ::redis::cmd("HSET")
        .arg(&keys[0])
        .arg("w")
        .arg("x=1;2=y;")
        .arg("ss")
        .arg("?")
        .query_async(&mut redis)
        .await
        .unwrap();
    counts_start_afresh(&s, now).await;
}

/// A batch applied by a version that kept no prior offense, and rolled back by this one.
async fn an_undo_log_without_prior_offenses_rolls_back(_: &Backend) {
    let (s, prefix, mut redis) = redis_state_by_hand("older").await;
    let ip = "ip:10.0.0.5";
    let first = now();
    assert_eq!(offense(&s, &["a", "b", "c"], ip, first).await, 1);
    let second = first + 400_000;
    let bt = batch(&["d", "e", "f"], ip, second);
    let out = s.apply(&bt, second).await.unwrap();
    assert_eq!(out.crossings[0].offense, 2);
    let key = format!("{prefix}:u:{}", out.receipt.id);
    let raw: String = ::redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut log: serde_json::Value = serde_json::from_str(&raw).unwrap();
    for cd in log["cd"].as_array_mut().unwrap() {
        let cd = cd.as_array_mut().unwrap();
        assert_eq!(cd.len(), 8, "{cd:?}");
        cd.truncate(7);
    }
    let _: () = ::redis::cmd("SET")
        .arg(&key)
        .arg(log.to_string())
        .arg("KEEPTTL")
        .query_async(&mut redis)
        .await
        .unwrap();
    s.rollback(&out.receipt).await.unwrap();
    // The first offense's decision and history are back: the batch decides again alike.
    let again = apply_commit(&s, &bt, second).await;
    assert_eq!(again.crossings.len(), 1, "{again:?}");
    assert_eq!(again.crossings[0].offense, 2);
}

/// After ip:10.0.0.1's counts of "a" and "b" were made unreadable: they are gone, and
/// counting goes on from nothing.
async fn counts_start_afresh(s: &dyn StateBackend, now: i64) {
    // Read, "a" and "b" would make this batch cross the threshold of 3.
    let out = apply_commit(s, &batch(&["c", "d"], "ip:10.0.0.1", now), now).await;
    assert!(out.crossings.is_empty(), "{out:?}");
    let out = apply_commit(s, &batch(&["e"], "ip:10.0.0.1", now), now).await;
    assert_eq!(out.crossings.len(), 1, "c, d and e make 3");
}
