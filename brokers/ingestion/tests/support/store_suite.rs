//! The behaviour every `QueueStore` implementation must have, as one reusable suite:
//! `queue_store_suite(store).await` with a fresh, empty store of capacity
//! [`SUITE_CAPACITY`] and [`SUITE_MAX_ATTEMPTS`]. Each case leaves the store empty for the next, and reads the
//! store-wide totals as differences, so the suite also runs on a shared backend.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use esper_ingestion::store::{ClaimSpec, Enqueued, QueueStore, Refusal};
use esper_protocol::ingestion::{ClaimedItem, ItemState, QueueStatus};

use super::{event, events, tag};

/// The capacity the store under test must have.
pub const SUITE_CAPACITY: usize = 10;
/// The claims an item may have in the store under test.
pub const SUITE_MAX_ATTEMPTS: u32 = 2;

/// Runs every case in turn.
pub async fn queue_store_suite(store: Arc<dyn QueueStore>) {
    assert_eq!(store.capacity(), SUITE_CAPACITY as u64);
    store.ping().await.unwrap();
    empty_store(&store).await;
    fifo_claim_and_ack(&store).await;
    acks_count_only_own_leases(&store).await;
    batches_that_do_not_fit_are_refused_whole(&store).await;
    paused_refuses_ingest_but_drains(&store).await;
    expired_leases_are_reclaimed_in_order(&store).await;
    a_lapsed_lease_is_its_consumers_until_handed_out_oldest_first(&store).await;
    long_poll_wakes_on_enqueue(&store).await;
    long_poll_times_out_when_empty(&store).await;
    linger_fills_the_batch(&store).await;
    concurrent_claims_never_share_items(&store).await;
    purge_drops_only_waiting_items(&store).await;
    inspection_lists_items_by_state(&store).await;
    items_claimed_too_often_are_dead_lettered(&store).await;
}

fn spec(consumer: &str, max: usize) -> ClaimSpec {
    ClaimSpec {
        consumer: consumer.to_string(),
        max,
        lease: Duration::from_secs(60),
        wait: Duration::ZERO,
        linger: Duration::ZERO,
    }
}

fn tags(items: &[ClaimedItem]) -> Vec<String> {
    items.iter().map(|i| tag(&i.event)).collect()
}

fn ids(items: &[ClaimedItem]) -> Vec<String> {
    items.iter().map(|i| i.item_id.clone()).collect()
}

async fn status(store: &Arc<dyn QueueStore>) -> QueueStatus {
    store.status().await.unwrap()
}

async fn accepted(store: &Arc<dyn QueueStore>, tags: &[&str]) -> u64 {
    match store
        .enqueue(tags.iter().map(|t| event(t)).collect())
        .await
        .unwrap()
    {
        Enqueued::Accepted { depth } => depth,
        other => panic!("batch {tags:?} refused: {other:?}"),
    }
}

async fn assert_empty(store: &Arc<dyn QueueStore>) {
    let s = status(store).await;
    assert_eq!((s.depth, s.leased), (0, 0), "a case left items behind");
}

async fn empty_store(store: &Arc<dyn QueueStore>) {
    assert!(store.claim(&spec("w1", 5)).await.unwrap().is_empty());
    let s = status(store).await;
    assert_eq!(s.max_size, SUITE_CAPACITY as u64);
    assert!(!s.paused);
    assert_eq!(
        store.enqueue(Vec::new()).await.unwrap(),
        Enqueued::Accepted { depth: 0 }
    );
    assert!(store.item("nope").await.unwrap().is_none());
    assert!(store.items(None, 10).await.unwrap().is_empty());
    assert_eq!(store.ack("w1", &["nope".to_string()]).await.unwrap(), 0);
    assert_empty(store).await;
}

async fn fifo_claim_and_ack(store: &Arc<dyn QueueStore>) {
    let before = status(store).await;
    assert_eq!(accepted(store, &["a", "b", "c"]).await, 3);
    assert_eq!(accepted(store, &["d"]).await, 4);
    let first = store.claim(&spec("w1", 2)).await.unwrap();
    assert_eq!(tags(&first), ["a", "b"]);
    assert!(first.iter().all(|i| i.attempts == 1));
    let second = store.claim(&spec("w2", 10)).await.unwrap();
    assert_eq!(tags(&second), ["c", "d"]);

    let s = status(store).await;
    assert_eq!((s.depth, s.leased), (0, 4));
    for name in ["w1", "w2"] {
        let c = s.consumers.iter().find(|c| c.consumer == name).unwrap();
        assert_eq!(c.leased, 2, "{name}");
    }
    assert_eq!(store.ack("w1", &ids(&first)).await.unwrap(), 2);
    assert_eq!(store.ack("w2", &ids(&second)).await.unwrap(), 2);
    let s = status(store).await;
    assert_eq!(s.ingested_total - before.ingested_total, 4);
    assert_eq!(s.acked_total - before.acked_total, 4);
    assert!(s.consumers.iter().all(|c| c.leased == 0));
    assert_empty(store).await;
}

async fn acks_count_only_own_leases(store: &Arc<dyn QueueStore>) {
    accepted(store, &["a"]).await;
    let items = store.claim(&spec("w1", 1)).await.unwrap();
    let id = items[0].item_id.clone();
    assert_eq!(store.ack("w2", std::slice::from_ref(&id)).await.unwrap(), 0);
    let again = vec![id.clone(), "unknown".to_string(), id];
    assert_eq!(store.ack("w1", &again).await.unwrap(), 1);
    assert_empty(store).await;
}

async fn batches_that_do_not_fit_are_refused_whole(store: &Arc<dyn QueueStore>) {
    let before = status(store).await;
    let cap = SUITE_CAPACITY;
    store.enqueue(events("x", cap - 1)).await.unwrap();
    assert_eq!(
        store.enqueue(events("y", 2)).await.unwrap(),
        Enqueued::Refused {
            reason: Refusal::Full,
            held: (cap - 1) as u64,
            capacity: cap as u64
        }
    );
    assert_eq!(status(store).await.depth, (cap - 1) as u64);
    accepted(store, &["last"]).await;
    // Leased items still take room.
    let leased = store.claim(&spec("w1", 3)).await.unwrap();
    assert!(matches!(
        store.enqueue(events("z", 1)).await.unwrap(),
        Enqueued::Refused {
            reason: Refusal::Full,
            ..
        }
    ));
    assert!(matches!(
        store.enqueue(events("huge", cap + 1)).await.unwrap(),
        Enqueued::Refused {
            reason: Refusal::TooLarge,
            ..
        }
    ));
    let s = status(store).await;
    assert_eq!(
        s.rejected_total - before.rejected_total,
        (2 + 1 + cap + 1) as u64
    );
    assert_eq!(s.ingested_total - before.ingested_total, cap as u64);
    assert_eq!(store.ack("w1", &ids(&leased)).await.unwrap(), 3);
    assert_eq!(store.purge().await.unwrap(), (cap - 3) as u64);
    assert_empty(store).await;
}

async fn paused_refuses_ingest_but_drains(store: &Arc<dyn QueueStore>) {
    let before = status(store).await;
    accepted(store, &["a"]).await;
    store.set_paused(true).await.unwrap();
    assert!(status(store).await.paused);
    assert!(matches!(
        store.enqueue(vec![event("b")]).await.unwrap(),
        Enqueued::Refused {
            reason: Refusal::Paused,
            ..
        }
    ));
    assert!(matches!(
        store.enqueue(Vec::new()).await.unwrap(),
        Enqueued::Accepted { .. }
    ));
    let items = store.claim(&spec("w1", 5)).await.unwrap();
    assert_eq!(tags(&items), ["a"]);
    assert_eq!(store.ack("w1", &ids(&items)).await.unwrap(), 1);
    store.set_paused(false).await.unwrap();
    assert!(!status(store).await.paused);
    accepted(store, &["c"]).await;
    let items = store.claim(&spec("w1", 5)).await.unwrap();
    assert_eq!(tags(&items), ["c"]);
    store.ack("w1", &ids(&items)).await.unwrap();
    assert_eq!(
        status(store).await.rejected_total - before.rejected_total,
        1
    );
    assert_empty(store).await;
}

async fn expired_leases_are_reclaimed_in_order(store: &Arc<dyn QueueStore>) {
    let before = status(store).await;
    accepted(store, &["a", "b"]).await;
    let short = ClaimSpec {
        lease: Duration::from_millis(100),
        ..spec("w1", 1)
    };
    let first = store.claim(&short).await.unwrap();
    assert_eq!(tags(&first), ["a"]);
    let info = store.item(&first[0].item_id).await.unwrap().unwrap();
    assert_eq!(info.state, ItemState::Leased);
    assert_eq!(info.consumer.as_deref(), Some("w1"));
    tokio::time::sleep(Duration::from_millis(250)).await;

    // The reclaimed item keeps its place ahead of newer ones.
    let second = store.claim(&spec("w2", 5)).await.unwrap();
    assert_eq!(tags(&second), ["a", "b"]);
    assert_eq!(second[0].attempts, 2);
    assert_eq!(second[1].attempts, 1);
    assert_eq!(second[0].item_id, first[0].item_id);
    assert_eq!(store.ack("w1", &ids(&first)).await.unwrap(), 0);
    assert_eq!(store.ack("w2", &ids(&second)).await.unwrap(), 2);
    assert_eq!(
        status(store).await.reclaimed_total - before.reclaimed_total,
        1
    );

    // Until a claim takes it back, an expired lease is still its consumer's.
    accepted(store, &["c"]).await;
    let late = store.claim(&short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.ack("w1", &ids(&late)).await.unwrap(), 1);
    assert_empty(store).await;
}

async fn a_lapsed_lease_is_its_consumers_until_handed_out_oldest_first(
    store: &Arc<dyn QueueStore>,
) {
    let before = status(store).await;
    accepted(store, &["a", "b", "c"]).await;
    let leased_for = |ms: u64| ClaimSpec {
        lease: Duration::from_millis(ms),
        ..spec("w1", 1)
    };
    let a = store.claim(&leased_for(200)).await.unwrap();
    let b = store.claim(&leased_for(20)).await.unwrap();
    assert_eq!((tags(&a), tags(&b)), (vec!["a".into()], vec!["b".into()]));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Both ran out, b's first; a is older, so it is handed out first.
    let next = store.claim(&spec("w2", 1)).await.unwrap();
    assert_eq!(tags(&next), ["a"]);
    assert_eq!(next[0].attempts, 2);
    // b was not taken back by that claim: it is still w1's, shown leased, and left by
    // a purge, which drops only c.
    let s = status(store).await;
    assert_eq!((s.depth, s.leased), (1, 2));
    let lapsed = store.item(&b[0].item_id).await.unwrap().unwrap();
    assert_eq!(
        (lapsed.state, lapsed.consumer.as_deref()),
        (ItemState::Leased, Some("w1"))
    );
    assert_eq!(store.purge().await.unwrap(), 1);
    assert_eq!(
        store.ack("w1", &ids(&a)).await.unwrap(),
        0,
        "handed out again"
    );
    assert_eq!(
        store.ack("w1", &ids(&b)).await.unwrap(),
        1,
        "a late ack counts"
    );
    assert_eq!(store.ack("w2", &ids(&next)).await.unwrap(), 1);
    assert_eq!(
        status(store).await.reclaimed_total - before.reclaimed_total,
        1
    );
    assert_empty(store).await;
}

async fn long_poll_wakes_on_enqueue(store: &Arc<dyn QueueStore>) {
    let producer = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        producer.enqueue(vec![event("late")]).await.unwrap();
    });
    let started = Instant::now();
    let waiting = ClaimSpec {
        wait: Duration::from_secs(5),
        ..spec("w1", 5)
    };
    let items = store.claim(&waiting).await.unwrap();
    let took = started.elapsed();
    assert_eq!(tags(&items), ["late"]);
    assert!(took < Duration::from_secs(1), "woke after {took:?}");
    store.ack("w1", &ids(&items)).await.unwrap();
    assert_empty(store).await;
}

async fn long_poll_times_out_when_empty(store: &Arc<dyn QueueStore>) {
    let started = Instant::now();
    let waiting = ClaimSpec {
        wait: Duration::from_millis(200),
        ..spec("w1", 5)
    };
    assert!(store.claim(&waiting).await.unwrap().is_empty());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

async fn linger_fills_the_batch(store: &Arc<dyn QueueStore>) {
    accepted(store, &["a"]).await;
    let producer = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        producer
            .enqueue(vec![event("b"), event("c")])
            .await
            .unwrap();
    });
    let lingering = ClaimSpec {
        wait: Duration::from_secs(5),
        linger: Duration::from_secs(3),
        ..spec("w1", 3)
    };
    let started = Instant::now();
    let items = store.claim(&lingering).await.unwrap();
    assert_eq!(tags(&items), ["a", "b", "c"]);
    assert!(started.elapsed() < Duration::from_secs(1));
    store.ack("w1", &ids(&items)).await.unwrap();

    // A batch that never fills is answered when the linger runs out.
    accepted(store, &["d"]).await;
    let started = Instant::now();
    let items = store
        .claim(&ClaimSpec {
            linger: Duration::from_millis(150),
            ..lingering
        })
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(tags(&items), ["d"]);
    assert!(
        took >= Duration::from_millis(140) && took < Duration::from_secs(2),
        "{took:?}"
    );
    store.ack("w1", &ids(&items)).await.unwrap();
    assert_empty(store).await;
}

async fn concurrent_claims_never_share_items(store: &Arc<dyn QueueStore>) {
    store.enqueue(events("c", SUITE_CAPACITY)).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let consumer = format!("w{w}");
            let mut mine = Vec::new();
            loop {
                let items = store.claim(&spec(&consumer, 2)).await.unwrap();
                if items.is_empty() {
                    break;
                }
                mine.extend(ids(&items));
                tokio::task::yield_now().await;
            }
            assert_eq!(store.ack(&consumer, &mine).await.unwrap(), mine.len());
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), SUITE_CAPACITY);
    assert_eq!(unique.len(), SUITE_CAPACITY);
    assert_empty(store).await;
}

async fn purge_drops_only_waiting_items(store: &Arc<dyn QueueStore>) {
    accepted(store, &["a", "b", "c"]).await;
    let leased = store.claim(&spec("w1", 1)).await.unwrap();
    let waiting = store.items(Some(ItemState::Pending), 10).await.unwrap();
    assert_eq!(store.purge().await.unwrap(), 2);
    let s = status(store).await;
    assert_eq!((s.depth, s.leased), (0, 1));
    assert!(store.item(&waiting[0].item_id).await.unwrap().is_none());
    assert!(store.item(&leased[0].item_id).await.unwrap().is_some());
    assert_eq!(store.ack("w1", &ids(&leased)).await.unwrap(), 1);
    assert_empty(store).await;
}

async fn inspection_lists_items_by_state(store: &Arc<dyn QueueStore>) {
    accepted(store, &["a", "b", "c"]).await;
    let leased = store.claim(&spec("w1", 1)).await.unwrap();
    let all = store.items(None, 10).await.unwrap();
    let seen: Vec<(String, ItemState)> = all.iter().map(|i| (tag(&i.event), i.state)).collect();
    assert_eq!(
        seen,
        [
            ("a".to_string(), ItemState::Leased),
            ("b".to_string(), ItemState::Pending),
            ("c".to_string(), ItemState::Pending)
        ]
    );
    assert_eq!(all[0].consumer.as_deref(), Some("w1"));
    assert!(all[0].lease_expires_at.is_some());
    assert_eq!(all[0].attempts, 1);
    assert_eq!((all[1].attempts, all[1].consumer.as_deref()), (0, None));

    let pending = store.items(Some(ItemState::Pending), 10).await.unwrap();
    assert_eq!(pending.len(), 2);
    let only_leased = store.items(Some(ItemState::Leased), 10).await.unwrap();
    assert_eq!(only_leased.len(), 1);
    assert_eq!(only_leased[0].item_id, leased[0].item_id);
    assert_eq!(store.items(None, 2).await.unwrap().len(), 2);
    let b = store.item(&all[1].item_id).await.unwrap().unwrap();
    assert_eq!(tag(&b.event), "b");
    assert_eq!(b.state, ItemState::Pending);

    store.ack("w1", &ids(&leased)).await.unwrap();
    store.purge().await.unwrap();
    assert_empty(store).await;
}

async fn items_claimed_too_often_are_dead_lettered(store: &Arc<dyn QueueStore>) {
    let before = status(store).await;
    accepted(store, &["poison", "fine"]).await;
    let short = ClaimSpec {
        lease: Duration::from_millis(50),
        ..spec("w1", 1)
    };
    let mut last = Vec::new();
    for attempt in 1..=SUITE_MAX_ATTEMPTS {
        last = store.claim(&short).await.unwrap();
        assert_eq!(tags(&last), ["poison"]);
        assert_eq!(last[0].attempts, attempt);
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    // The next claim buries it instead of handing it out again.
    let next = store.claim(&spec("w2", 5)).await.unwrap();
    assert_eq!(tags(&next), ["fine"]);
    assert_eq!(store.ack("w1", &ids(&last)).await.unwrap(), 0);
    assert_eq!(store.ack("w2", &ids(&next)).await.unwrap(), 1);

    let s = status(store).await;
    assert_eq!((s.depth, s.leased, s.dead_letter), (0, 0, 1));
    assert_eq!(s.dead_lettered_total - before.dead_lettered_total, 1);
    let dead = store.items(Some(ItemState::DeadLetter), 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(tag(&dead[0].event), "poison");
    assert_eq!(dead[0].item_id, last[0].item_id);
    assert_eq!(dead[0].attempts, SUITE_MAX_ATTEMPTS);
    assert_eq!(dead[0].consumer.as_deref(), Some("w1"));
    let one = store.item(&last[0].item_id).await.unwrap().unwrap();
    assert_eq!(one.state, ItemState::DeadLetter);
    assert_eq!(store.items(None, 10).await.unwrap().len(), 1);
    assert!(
        store
            .items(Some(ItemState::Pending), 10)
            .await
            .unwrap()
            .is_empty()
    );

    assert_eq!(store.purge().await.unwrap(), 1);
    assert_eq!(status(store).await.dead_letter, 0);
    assert!(store.item(&last[0].item_id).await.unwrap().is_none());
    assert_empty(store).await;
}

/// More leases lapse at once than a Redis claim's first look at them (1,000): a claim as
/// large takes them all back, oldest first, before any new item. Needs a store of
/// capacity 1,300 or more.
pub async fn many_lapsed_leases_go_out_before_new_items(store: Arc<dyn QueueStore>) {
    store.enqueue(events("old-", 1_200)).await.unwrap();
    let first = store
        .claim(&ClaimSpec {
            lease: Duration::from_millis(10),
            ..spec("w1", 1_200)
        })
        .await
        .unwrap();
    assert_eq!(first.len(), 1_200);
    store.enqueue(events("new-", 100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let again = store.claim(&spec("w2", 1_200)).await.unwrap();
    assert_eq!(ids(&again), ids(&first));
    assert!(again.iter().all(|i| i.attempts == 2));
    assert_eq!(store.ack("w2", &ids(&again)).await.unwrap(), 1_200);
    store.purge().await.unwrap();
}
