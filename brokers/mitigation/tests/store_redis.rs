//! The mitigation-store suite against Redis, and the Redis-only promises: brokers over
//! one Redis share mitigations and the delta stream (a follower resumes on another
//! instance with its cursor), and a broker rides out a Redis restart.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use esper_mitigation::{
    Claim, Config, Journal, LogAppend, Logged, MitigationStore, RedisMitigations, RestorePage,
    Write,
};
use esper_protocol::{Change, ClientError, DeltaPage, EntityKey, Mitigation, MitigationClient};
use support::redis_server::{RedisServer, shared, unique_prefix};
use support::store_suite::{SUITE_RETENTION, mitigation_store_suite};
use support::{TestBroker, block, config, expect_error};

fn redis_config(url: &str, prefix: &str) -> Config {
    Config {
        redis_url: Some(url.to_string()),
        redis_prefix: prefix.to_string(),
        ..config()
    }
}

#[tokio::test]
async fn redis_store_passes_the_store_suite() {
    let prefix = unique_prefix("suite");
    let store = RedisMitigations::open(&shared().url(), &prefix, SUITE_RETENTION)
        .await
        .unwrap();
    mitigation_store_suite(Arc::new(store)).await;
}

#[tokio::test]
async fn a_stored_mitigation_this_broker_cannot_read_is_skipped() {
    let prefix = unique_prefix("unreadable");
    let url = shared().url();
    let b = TestBroker::start(redis_config(&url, &prefix)).await;
    b.client
        .publish(vec![block("a", "ip:192.0.2.1"), block("b", "ip:192.0.2.2")])
        .await
        .unwrap();
    // "b" as another version of the broker might have written it.
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{{{prefix}}}:mit:by_id"))
        .arg("b")
        .arg(r#"{"id":"b","a_field_from_elsewhere":1}"#)
        .query_async(&mut raw)
        .await
        .unwrap();
    let active = b.client.active(None).await.unwrap();
    let ids: Vec<&str> = active.mitigations.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["a"]);
    let snapshot = b.client.stream(None, Duration::ZERO).await.unwrap();
    assert!(snapshot.snapshot);
    assert_eq!(snapshot.changes.len(), 1, "{:?}", snapshot.changes);
    let key: EntityKey = "ip:192.0.2.2".parse().unwrap();
    assert!(b.client.entity(&key).await.unwrap().mitigations.is_empty());
    b.stop().await;
}

#[tokio::test]
async fn two_brokers_over_one_redis_see_each_others_writes() {
    let prefix = unique_prefix("two");
    let url = shared().url();
    let a = TestBroker::start(redis_config(&url, &prefix)).await;
    let b = TestBroker::start(redis_config(&url, &prefix)).await;

    a.client
        .publish(vec![block("a", "ip:192.0.2.1")])
        .await
        .unwrap();
    b.client
        .publish(vec![block("b", "cidr:192.0.2.0/24")])
        .await
        .unwrap();
    for broker in [&a, &b] {
        assert_eq!(broker.client.active(None).await.unwrap().total, 2);
        let key: EntityKey = "ip:192.0.2.1".parse().unwrap();
        let found = broker.client.entity(&key).await.unwrap();
        let mut ids: Vec<&str> = found.mitigations.iter().map(|m| m.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
    }
    let revoked = b
        .client
        .revoke(&esper_protocol::mitigation::RevokeRequest {
            id: Some("a".into()),
            entity: None,
        })
        .await
        .unwrap();
    assert_eq!(revoked.revoked, 1);
    assert_eq!(a.client.active(None).await.unwrap().total, 1);

    // A follower long-polling one broker wakes for a write through the other.
    let head = a.client.stream(None, Duration::ZERO).await.unwrap().cursor;
    let waiter = {
        let client = a.client.clone();
        let head = head.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let page = client
                .stream(Some(&head), Duration::from_secs(10))
                .await
                .unwrap();
            (page, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.client
        .publish(vec![block("c", "ip:192.0.2.3")])
        .await
        .unwrap();
    let (page, took) = waiter.await.unwrap();
    assert!(!page.snapshot);
    assert_eq!(ids_of(&page), ["+c"]);
    assert!(took < Duration::from_secs(2), "{took:?}");

    // A clear through one starts a new generation for both.
    b.client.clear().await.unwrap();
    let page = a
        .client
        .stream(Some(&page.cursor), Duration::ZERO)
        .await
        .unwrap();
    assert!(page.snapshot && page.changes.is_empty());
    a.stop().await;
    b.stop().await;
}

fn ids_of(page: &DeltaPage) -> Vec<String> {
    page.changes
        .iter()
        .map(|c| match c {
            Change::Upsert { mitigation } => format!("+{}", mitigation.id),
            Change::Remove { id } => format!("-{id}"),
        })
        .collect()
}

/// A follower as a proxy runs one: a cache of active mitigations kept from the delta
/// stream, counting the snapshots it had to load.
struct Follower {
    cursor: Option<String>,
    cache: BTreeMap<String, Mitigation>,
    snapshots: usize,
}

impl Follower {
    async fn poll(&mut self, client: &MitigationClient) {
        let page = client
            .stream(self.cursor.as_deref(), Duration::ZERO)
            .await
            .unwrap();
        if page.snapshot {
            self.snapshots += 1;
            self.cache.clear();
        }
        for change in page.changes {
            match change {
                Change::Upsert { mitigation } => {
                    self.cache.insert(mitigation.id.clone(), mitigation);
                }
                Change::Remove { id } => {
                    self.cache.remove(&id);
                }
            }
        }
        self.cursor = Some(page.cursor);
    }
}

#[tokio::test]
async fn a_follower_switched_to_another_broker_resumes_without_a_reload_or_a_gap() {
    let prefix = unique_prefix("switch");
    let url = shared().url();
    let a = TestBroker::start(redis_config(&url, &prefix)).await;
    let b = TestBroker::start(redis_config(&url, &prefix)).await;
    let mut follower = Follower {
        cursor: None,
        cache: BTreeMap::new(),
        snapshots: 0,
    };
    a.client
        .publish(vec![block("m0", "ip:10.0.0.0")])
        .await
        .unwrap();
    follower.poll(&a.client).await;
    assert_eq!(follower.snapshots, 1);

    // Writes land through both brokers while the follower is on `a`, then more while it
    // moves to `b`; it must see every one, in order, with no second snapshot.
    for i in 1..20 {
        let through = if i % 2 == 0 { &a } else { &b };
        through
            .client
            .publish(vec![block(&format!("m{i}"), &format!("ip:10.0.0.{i}"))])
            .await
            .unwrap();
        if i == 10 {
            follower.poll(&a.client).await;
        }
    }
    b.client
        .revoke(&esper_protocol::mitigation::RevokeRequest {
            id: Some("m3".into()),
            entity: None,
        })
        .await
        .unwrap();
    follower.poll(&b.client).await;
    follower.poll(&b.client).await;
    assert_eq!(follower.snapshots, 1, "switching brokers forced a reload");
    let expected: Vec<String> = (0..20)
        .filter(|i| *i != 3)
        .map(|i| format!("m{i}"))
        .collect();
    let mut seen: Vec<String> = follower.cache.keys().cloned().collect();
    seen.sort_by_key(|id| id[1..].parse::<u32>().unwrap());
    assert_eq!(seen, expected);
    // Both brokers hand out the same cursor for the same position.
    let at_a = a
        .client
        .stream(follower.cursor.as_deref(), Duration::ZERO)
        .await
        .unwrap();
    assert!(!at_a.snapshot && at_a.changes.is_empty());
    assert_eq!(Some(at_a.cursor), follower.cursor);
    a.stop().await;
    b.stop().await;
}

async fn wait_until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {limit:?}");
}

#[tokio::test]
async fn a_broker_answers_503_while_redis_is_down_and_recovers_on_its_own() {
    let mut server = RedisServer::start();
    let b = TestBroker::start(redis_config(&server.url(), "restart")).await;
    b.client
        .publish(vec![block("before", "ip:192.0.2.1")])
        .await
        .unwrap();
    let cursor = b.client.stream(None, Duration::ZERO).await.unwrap().cursor;

    // Load throughout: a publisher and a follower that only ever see answers or 503s.
    let load = {
        let client = b.client.clone();
        tokio::spawn(async move {
            let (mut ok, mut unavailable) = (0u32, 0u32);
            let mut cursor: Option<String> = None;
            for i in 0..40 {
                let published = client
                    .publish(vec![block(&format!("load{i}"), &format!("ip:10.1.0.{i}"))])
                    .await;
                let followed = client.stream(cursor.as_deref(), Duration::ZERO).await;
                for outcome in [
                    published.map(|_| ()),
                    followed.map(|p| cursor = Some(p.cursor)),
                ] {
                    match outcome {
                        Ok(()) => ok += 1,
                        Err(ClientError::Backpressure { code, .. }) => {
                            assert_eq!(code, "store_unavailable");
                            unavailable += 1;
                        }
                        Err(e) => panic!("unexpected error while Redis restarts: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            (ok, unavailable)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop();
    wait_until(
        "readyz 503 while Redis is down",
        Duration::from_secs(5),
        async || !b.client.ready().await,
    )
    .await;
    let resp = b.get("/api/mitigations/active").await;
    expect_error(resp, 503, "store_unavailable").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    server.restart();
    wait_until(
        "readyz 200 after Redis is back",
        Duration::from_secs(10),
        async || b.client.ready().await,
    )
    .await;
    let (ok, unavailable) = load.await.unwrap();
    assert!(ok > 0 && unavailable > 0, "ok {ok}, 503 {unavailable}");
    b.client
        .publish(vec![block("after", "ip:192.0.2.3")])
        .await
        .unwrap();
    // The restarted Redis kept nothing (no persistence): the old cursor is stale, so
    // its holder gets a snapshot of what was published since.
    let page = b
        .client
        .stream(Some(&cursor), Duration::ZERO)
        .await
        .unwrap();
    assert!(page.snapshot);
    assert!(ids_of(&page).contains(&"+after".to_string()));
    assert!(!ids_of(&page).contains(&"+before".to_string()));
    b.stop().await;
}

#[tokio::test]
async fn mitigations_stored_before_the_id_index_are_paged_too() {
    let prefix = unique_prefix("ids");
    let url = shared().url();
    let store = RedisMitigations::open(&url, &prefix, SUITE_RETENTION)
        .await
        .unwrap();
    let all: Vec<Mitigation> = (0..5)
        .map(|i| block(&format!("m{i}"), &format!("ip:192.0.2.{i}")))
        .collect();
    store.publish(all.clone()).await.unwrap();
    // As a store written by a version without the index would hold them.
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{{{prefix}}}:mit:ids"))
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut page = store.changes(None, 2).await.unwrap();
    let mut got = Vec::new();
    loop {
        got.extend(page.changes.iter().map(|c| match c {
            Change::Upsert { mitigation } => mitigation.clone(),
            Change::Remove { id } => panic!("a snapshot holds upserts only, found -{id}"),
        }));
        let Some(more) = page.more.take() else { break };
        page = store.snapshot_page(&page.cursor, &more, 2).await.unwrap();
    }
    assert_eq!(got, all);
}

/// A Redis store under a prefix of its own, its outbox, the prefix, and a plain
/// connection to the same Redis.
async fn own_journal(
    name: &str,
) -> (
    Arc<RedisMitigations>,
    Arc<dyn Journal>,
    String,
    redis::aio::MultiplexedConnection,
) {
    let prefix = unique_prefix(name);
    let url = shared().url();
    let store = Arc::new(
        RedisMitigations::open(&url, &prefix, SUITE_RETENTION)
            .await
            .unwrap(),
    );
    let journal = store.clone().journal().expect("Redis keeps the outbox");
    let client = redis::Client::open(url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    (store, journal, prefix, conn)
}

fn log(entries: &[&str], capacity: usize, drop_oldest: bool) -> LogAppend {
    LogAppend {
        entries: entries.iter().map(|e| e.to_string()).collect(),
        capacity,
        drop_oldest,
    }
}

async fn claimed(journal: &dyn Journal, owner: &str, lease: Duration) -> Claim {
    journal.claim(owner, lease, 100).await.unwrap()
}

/// Owner "x" claims the outbox and reads `entries`, with `pending` in all.
async fn x_reads(journal: &dyn Journal, pending: usize, entries: &[(u64, &str)]) {
    let entries = entries.iter().map(|(n, e)| (*n, e.to_string())).collect();
    assert_eq!(
        claimed(journal, "x", Duration::from_secs(60)).await,
        Claim::Mine { pending, entries }
    );
}

#[tokio::test]
async fn the_outbox_in_redis_is_written_with_its_write_and_delivered_under_one_lease() {
    let (store, journal, _, _) = own_journal("journal").await;
    let long = Duration::from_secs(60);

    // A write and its entries land together.
    let m = block("m1", "ip:192.0.2.1");
    let done = journal
        .write(
            Write::Publish(std::slice::from_ref(&m)),
            &log(&["a", "b"], 3, false),
        )
        .await
        .unwrap();
    let Logged::Done {
        changed: 1,
        cursor: Some(_),
        dropped: 0,
        pending: 2,
    } = done
    else {
        panic!("unexpected outcome {done:?}");
    };
    // A write the outbox cannot take (`reject`) changes nothing at all.
    let full = journal
        .write(Write::RevokeId("m1"), &log(&["c", "d"], 3, false))
        .await
        .unwrap();
    assert_eq!(full, Logged::Full);
    assert_eq!(store.active(None, 10).await.unwrap().total, 1);
    // Writes without entries (a restore) leave the outbox alone.
    store
        .publish(vec![block("m2", "ip:192.0.2.2")])
        .await
        .unwrap();

    // One owner at a time reads the oldest entries, numbered.
    x_reads(&*journal, 2, &[(1, "a"), (2, "b")]).await;
    assert_eq!(
        claimed(&*journal, "y", long).await,
        Claim::Held {
            by: "x".into(),
            pending: 2
        }
    );
    assert_eq!(journal.ack("x", &[1], long).await.unwrap(), (true, 1));

    // `drop_oldest` makes room by dropping the oldest; an ack counts by number, so one
    // for entries dropped meanwhile removes nothing newer.
    let done = journal
        .write(Write::RevokeId("m1"), &log(&["c", "d", "e"], 2, true))
        .await
        .unwrap();
    assert!(
        matches!(
            done,
            Logged::Done {
                changed: 1,
                dropped: 2,
                pending: 2,
                ..
            }
        ),
        "{done:?}"
    );
    assert_eq!(journal.ack("x", &[1, 2], long).await.unwrap(), (true, 2));
    x_reads(&*journal, 2, &[(4, "d"), (5, "e")]).await;

    // Only the holder can give the lease up; then another owner takes over at once.
    journal.release("y").await.unwrap();
    assert!(matches!(
        claimed(&*journal, "y", long).await,
        Claim::Held { .. }
    ));
    journal.release("x").await.unwrap();
    assert!(matches!(
        claimed(&*journal, "y", Duration::from_millis(100)).await,
        Claim::Mine { .. }
    ));
    // A lease that runs out passes to the next owner; the old holder learns it on its
    // ack, which removes nothing (the new holder delivers those entries again).
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(matches!(
        claimed(&*journal, "x", long).await,
        Claim::Mine { .. }
    ));
    assert_eq!(journal.ack("y", &[4], long).await.unwrap(), (false, 2));
    assert_eq!(journal.ack("x", &[4], long).await.unwrap(), (true, 1));

    // A clear is journaled like any write.
    let done = journal
        .write(Write::Clear, &log(&["f"], 10, false))
        .await
        .unwrap();
    assert!(
        matches!(
            done,
            Logged::Done {
                changed: 1,
                pending: 2,
                ..
            }
        ),
        "{done:?}"
    );
    assert_eq!(store.active(None, 10).await.unwrap().total, 0);
    x_reads(&*journal, 2, &[(5, "e"), (6, "f")]).await;
}

#[tokio::test]
async fn an_ack_after_redis_lost_its_data_removes_nothing_written_since() {
    let (_store, journal, prefix, mut conn) = own_journal("journal-lost").await;
    let long = Duration::from_secs(60);
    let entries = ["a", "b", "c", "d", "e"];
    journal
        .write(Write::Clear, &log(&entries, 100, false))
        .await
        .unwrap();
    assert!(matches!(
        claimed(&*journal, "x", long).await,
        Claim::Mine { .. }
    ));
    // Redis loses the outbox, its numbering and the lease (a restart without
    // persistence, a failover to a replica behind) while "x" delivers.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}}}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    journal
        .write(Write::Clear, &log(&["f", "g"], 100, false))
        .await
        .unwrap();
    // The late ack for "a".."e" must not take the new, undelivered entries.
    assert_eq!(
        journal.ack("x", &[1, 2, 3, 4, 5], long).await.unwrap(),
        (false, 2)
    );
    x_reads(&*journal, 2, &[(1, "f"), (2, "g")]).await;
}

#[tokio::test]
async fn an_ack_after_the_numbering_started_over_removes_only_what_was_read() {
    let (_store, journal, prefix, mut conn) = own_journal("journal-renumbered").await;
    let long = Duration::from_secs(60);
    journal
        .write(Write::Clear, &log(&["a", "b", "c"], 100, false))
        .await
        .unwrap();
    x_reads(&*journal, 3, &[(1, "a"), (2, "b"), (3, "c")]).await;
    // The counter is lost (deleted by hand, evicted), the list kept: the next entries
    // are numbered 1 and 2 again, below what "x" read.
    let _: () = redis::cmd("DEL")
        .arg(format!("{{{prefix}}}:mit:outbox_seq"))
        .query_async(&mut conn)
        .await
        .unwrap();
    journal
        .write(Write::Clear, &log(&["d", "e"], 100, false))
        .await
        .unwrap();
    assert_eq!(journal.ack("x", &[1, 2, 3], long).await.unwrap(), (true, 2));
    x_reads(&*journal, 2, &[(1, "d"), (2, "e")]).await;
}

#[tokio::test]
async fn outbox_numbers_stay_whole_past_the_float_digits_of_lua() {
    let (_store, journal, prefix, mut conn) = own_journal("journal-big").await;
    let _: () = redis::cmd("SET")
        .arg(format!("{{{prefix}}}:mit:outbox_seq"))
        .arg(100_000_000_000_000_u64)
        .query_async(&mut conn)
        .await
        .unwrap();
    journal
        .write(Write::Clear, &log(&["a"], 10, false))
        .await
        .unwrap();
    let long = Duration::from_secs(60);
    x_reads(&*journal, 1, &[(100_000_000_000_001, "a")]).await;
    assert_eq!(
        journal
            .ack("x", &[100_000_000_000_001], long)
            .await
            .unwrap(),
        (true, 0)
    );
}

/// Ids of what `store` holds in force, sorted.
async fn held(store: &dyn MitigationStore) -> Vec<String> {
    let mut ids: Vec<String> = store
        .active(None, 100)
        .await
        .unwrap()
        .mitigations
        .into_iter()
        .map(|m| m.id)
        .collect();
    ids.sort();
    ids
}

/// The keys the restores' marks and notes leave in Redis under `prefix`.
/// The restore's marks and notes (not whether one is due, which has no expiry).
async fn restore_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}}}:mit:[rt][eo]*"))
        .query_async(conn)
        .await
        .unwrap();
    keys.retain(|k| !k.ends_with(":restore_due"));
    keys.sort();
    keys
}

#[tokio::test]
async fn a_restore_left_half_way_is_due_until_finished_or_cleared() {
    let (_store, journal, prefix, _conn) = own_journal("restore-due").await;
    let other = RedisMitigations::open(&shared().url(), &prefix, SUITE_RETENTION)
        .await
        .unwrap();
    let other_journal = Arc::new(other).journal().unwrap();
    let long = Duration::from_secs(60);
    assert!(!journal.restore_orphaned().await.unwrap(), "none begun");
    journal.begin_restore("a", long).await.unwrap();
    assert!(
        !other_journal.restore_orphaned().await.unwrap(),
        "its restorer's mark stands"
    );
    // Stopped half-way: due, and no one is at it.
    journal.end_restore("a", false).await.unwrap();
    assert!(other_journal.restore_orphaned().await.unwrap());
    // Taken over and finished.
    other_journal.begin_restore("b", long).await.unwrap();
    assert!(!journal.restore_orphaned().await.unwrap());
    other_journal.end_restore("b", true).await.unwrap();
    assert!(!journal.restore_orphaned().await.unwrap(), "finished");
    // A restorer that died: due once its mark ran out.
    journal
        .begin_restore("a", Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(journal.restore_orphaned().await.unwrap());
    // A clear takes away what a restore would bring back, and the need for it.
    let store = RedisMitigations::open(&shared().url(), &prefix, SUITE_RETENTION)
        .await
        .unwrap();
    store.clear().await.unwrap();
    assert!(!journal.restore_orphaned().await.unwrap(), "cleared");
}

#[tokio::test]
async fn a_restore_page_leaves_out_what_any_instance_touched_since_its_mark() {
    let (restorer, journal, prefix, mut conn) = own_journal("restore").await;
    let other = RedisMitigations::open(&shared().url(), &prefix, SUITE_RETENTION)
        .await
        .unwrap();
    let long = Duration::from_secs(60);
    // Before any mark, writes note nothing.
    other.revoke_id("gone-before").await.unwrap();
    assert!(restore_keys(&mut conn, &prefix).await.is_empty());
    // The mark tells which outbox entries were written before it.
    journal
        .write(Write::RevokeId("x"), &log(&["e1", "e2"], 10, false))
        .await
        .unwrap();
    assert_eq!(journal.begin_restore("a", long).await.unwrap(), 2);
    assert_eq!(journal.outbox_head().await.unwrap(), Some(1));
    // Through the other instance: one id revoked, one republished newer, one entity
    // revoked, all before the restorer's page (read from the log earlier) comes.
    other.revoke_id("revoked").await.unwrap();
    let newer = Mitigation {
        action: esper_protocol::Action::Log,
        ..block("changed", "ip:192.0.2.2")
    };
    other.publish(vec![newer.clone()]).await.unwrap();
    other
        .revoke_entity(&"ip:192.0.2.3".parse().unwrap())
        .await
        .unwrap();
    let page = [
        block("revoked", "ip:192.0.2.1"),
        block("changed", "ip:192.0.2.2"),
        block("by-entity", "ip:192.0.2.3"),
        block("kept", "ip:192.0.2.4"),
    ];
    assert_eq!(
        journal.restore_page("a", long, &page).await.unwrap(),
        RestorePage::Published(1)
    );
    assert_eq!(held(&*restorer).await, ["changed", "kept"]);
    let stored = other.for_entity(&newer.entity).await.unwrap();
    assert_eq!(stored, [newer], "the newer write stands");
    // Marks and notes expire with the last mark, should its restorer die.
    for key in restore_keys(&mut conn, &prefix).await {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 50_000 && ttl <= 60_000, "{key}: {ttl}");
    }

    // A second restorer's end leaves the first one's notes; the last end takes them.
    journal.begin_restore("b", long).await.unwrap();
    journal.end_restore("b", true).await.unwrap();
    assert_eq!(
        journal.restore_page("a", long, &page[..1]).await.unwrap(),
        RestorePage::Published(0)
    );
    journal.end_restore("a", true).await.unwrap();
    assert!(restore_keys(&mut conn, &prefix).await.is_empty());
    other.revoke_id("kept").await.unwrap();
    assert!(
        restore_keys(&mut conn, &prefix).await.is_empty(),
        "no mark, no notes"
    );
}

#[tokio::test]
async fn a_restore_gives_up_after_a_clear_and_begins_again_when_its_mark_ran_out() {
    let (_restorer, journal, prefix, _conn) = own_journal("restore-clear").await;
    let other = RedisMitigations::open(&shared().url(), &prefix, SUITE_RETENTION)
        .await
        .unwrap();
    let long = Duration::from_secs(60);
    let page = [block("m", "ip:192.0.2.1")];
    journal.begin_restore("a", long).await.unwrap();
    other.clear().await.unwrap();
    assert_eq!(
        journal.restore_page("a", long, &page).await.unwrap(),
        RestorePage::Cleared
    );
    assert!(held(&other).await.is_empty());
    journal.end_restore("a", true).await.unwrap();

    // A mark that ran out: a write since may have gone unnoted.
    journal
        .begin_restore("a", Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    other.revoke_id("m").await.unwrap();
    assert_eq!(
        journal.restore_page("a", long, &page).await.unwrap(),
        RestorePage::Lapsed
    );
    assert!(held(&other).await.is_empty());
    // Begun again, with the notes of the lapsed mark gone with it.
    journal.begin_restore("a", long).await.unwrap();
    assert_eq!(
        journal.restore_page("a", long, &page).await.unwrap(),
        RestorePage::Published(1)
    );
    assert_eq!(held(&other).await, ["m"]);
}

#[tokio::test]
async fn a_redis_out_of_memory_is_not_ready_though_it_answers_ping() {
    let server = RedisServer::start();
    let b = TestBroker::start(redis_config(&server.url(), "oom")).await;
    assert!(b.client.ready().await);
    server.out_of_memory(true);
    assert!(!b.client.ready().await, "every write fails: not ready");
    // A refused write says why, in the store's words.
    let refused = b
        .client
        .publish(vec![block("oom", "ip:192.0.2.99")])
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("OOM"), "{refused}");
    server.out_of_memory(false);
    assert!(b.client.ready().await, "ready again once writes succeed");
}
