//! The behaviour every `MitigationStore` implementation must have, as one reusable
//! suite: `mitigation_store_suite(store).await` with a fresh store that keeps
//! [`SUITE_RETENTION`] changes. Each case starts with a clear, so cases are independent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use esper_mitigation::store::MitigationStore;
use esper_protocol::{Action, Change, DeltaPage, EntityKey, Mitigation};

use super::{block, mitigation};

/// The change retention the store under test must have.
pub const SUITE_RETENTION: usize = 8;

/// Runs every case in turn.
pub async fn mitigation_store_suite(store: Arc<dyn MitigationStore>) {
    store.ping().await.unwrap();
    empty_store_snapshots_nothing(&store).await;
    publish_upserts_by_id(&store).await;
    changes_are_incremental_and_paged(&store).await;
    identical_republish_appends_nothing(&store).await;
    bad_cursors_get_snapshots(&store).await;
    cursors_older_than_the_log_get_snapshots(&store).await;
    clear_starts_a_new_generation(&store).await;
    revoke_by_id_and_by_entity(&store).await;
    entity_lookup_covers_networks(&store).await;
    expired_mitigations_vanish(&store).await;
    active_filters_and_limits(&store).await;
    subscribers_see_every_change(&store).await;
    snapshots_arrive_in_pages(&store).await;
    changes_between_pages_are_in_the_deltas(&store).await;
    a_stale_snapshot_starts_over(&store).await;
}

fn key(s: &str) -> EntityKey {
    s.parse().unwrap()
}

fn ids(ms: &[Mitigation]) -> Vec<String> {
    let mut v: Vec<String> = ms.iter().map(|m| m.id.clone()).collect();
    v.sort();
    v
}

/// Each change as `+id` (upsert) or `-id` (remove).
fn ops(page: &DeltaPage) -> Vec<String> {
    page.changes
        .iter()
        .map(|c| match c {
            Change::Upsert { mitigation } => format!("+{}", mitigation.id),
            Change::Remove { id } => format!("-{id}"),
        })
        .collect()
}

async fn fresh(store: &Arc<dyn MitigationStore>) -> String {
    store.clear().await.unwrap();
    let page = store.changes(None, 100).await.unwrap();
    assert!(page.snapshot);
    page.cursor
}

async fn changes(store: &Arc<dyn MitigationStore>, cursor: &str) -> DeltaPage {
    store.changes(Some(cursor), 100).await.unwrap()
}

async fn empty_store_snapshots_nothing(store: &Arc<dyn MitigationStore>) {
    let cursor = fresh(store).await;
    let active = store.active(None, 100).await.unwrap();
    assert_eq!(active.total, 0);
    let first = store.changes(None, 100).await.unwrap();
    assert!(first.snapshot && first.changes.is_empty());
    let next = changes(store, &cursor).await;
    assert!(!next.snapshot && next.changes.is_empty());
    assert_eq!(next.cursor, cursor);
    assert!(store.counts().await.unwrap().values().all(|n| *n == 0));
}

async fn publish_upserts_by_id(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let a = block("a", "ip:192.0.2.1");
    let b = mitigation(
        "b",
        "cidr:198.51.100.0/24",
        Action::Throttle {
            rate: 5.0,
            burst: 10,
        },
        Duration::from_secs(3600),
    );
    let published = store.publish(vec![a.clone(), b]).await.unwrap();
    assert_eq!(published.accepted, 2);
    assert_eq!(store.active(None, 100).await.unwrap().total, 2);

    let a2 = Mitigation {
        action: Action::Log,
        ..a.clone()
    };
    assert_eq!(store.publish(vec![a2.clone()]).await.unwrap().accepted, 1);
    assert_eq!(store.active(None, 100).await.unwrap().total, 2);
    assert_eq!(store.for_entity(&a.entity).await.unwrap(), vec![a2.clone()]);
    let counts = store.counts().await.unwrap();
    assert_eq!(
        (counts.get("log"), counts.get("throttle")),
        (Some(&1), Some(&1))
    );
    assert_eq!(counts.get("block").copied().unwrap_or(0), 0);

    // Moving a mitigation to another entity leaves nothing behind on the old one.
    let a3 = Mitigation {
        entity: key("ip:192.0.2.9"),
        ..a2
    };
    store.publish(vec![a3.clone()]).await.unwrap();
    assert!(store.for_entity(&a.entity).await.unwrap().is_empty());
    assert_eq!(store.for_entity(&a3.entity).await.unwrap(), vec![a3]);
}

async fn changes_are_incremental_and_paged(store: &Arc<dyn MitigationStore>) {
    let c0 = fresh(store).await;
    store
        .publish(vec![block("a", "ip:192.0.2.1")])
        .await
        .unwrap();
    let p1 = changes(store, &c0).await;
    assert!(!p1.snapshot);
    assert_eq!(ops(&p1), ["+a"]);
    let after_b = store
        .publish(vec![block("b", "ip:192.0.2.2")])
        .await
        .unwrap();
    assert_eq!(store.revoke_id("a").await.unwrap(), 1);
    let p2 = changes(store, &p1.cursor).await;
    assert_eq!(ops(&p2), ["+b", "-a"]);
    assert_eq!(ops(&changes(store, &after_b.cursor).await), ["-a"]);

    // One change per page, in order, ending on the head with an empty page.
    let mut cursor = c0;
    let mut seen = Vec::new();
    loop {
        let page = store.changes(Some(&cursor), 1).await.unwrap();
        assert!(!page.snapshot);
        if page.changes.is_empty() {
            assert_eq!(page.cursor, cursor);
            break;
        }
        seen.extend(ops(&page));
        cursor = page.cursor;
    }
    assert_eq!(seen, ["+a", "+b", "-a"]);
    assert_eq!(cursor, p2.cursor);
}

async fn identical_republish_appends_nothing(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let a = block("a", "ip:192.0.2.1");
    store.publish(vec![a.clone()]).await.unwrap();
    let cursor = store.changes(None, 100).await.unwrap().cursor;
    assert_eq!(store.publish(vec![a]).await.unwrap().accepted, 1);
    assert!(changes(store, &cursor).await.changes.is_empty());
}

async fn bad_cursors_get_snapshots(store: &Arc<dyn MitigationStore>) {
    let c0 = fresh(store).await;
    store
        .publish(vec![block("a", "ip:192.0.2.1"), block("b", "ip:192.0.2.2")])
        .await
        .unwrap();
    let head = changes(store, &c0).await.cursor;
    let generation = head.split_once('-').map(|(g, _)| g).unwrap_or("");
    let future = format!("{generation}-999999");
    for bad in [
        "",
        "garbage",
        "0000000000000000-1",
        future.as_str(),
        "a-b-c",
    ] {
        let page = store.changes(Some(bad), 100).await.unwrap();
        assert!(page.snapshot, "cursor `{bad}`");
        assert_eq!(ids(&upserts(&page)), ["a", "b"]);
        assert_eq!(
            page.cursor, head,
            "a snapshot answers with the current cursor"
        );
    }
}

fn upserts(page: &DeltaPage) -> Vec<Mitigation> {
    page.changes
        .iter()
        .map(|c| match c {
            Change::Upsert { mitigation } => mitigation.clone(),
            Change::Remove { id } => panic!("a snapshot holds upserts only, found -{id}"),
        })
        .collect()
}

async fn cursors_older_than_the_log_get_snapshots(store: &Arc<dyn MitigationStore>) {
    let c0 = fresh(store).await;
    let mut cursors = Vec::new();
    for i in 0..SUITE_RETENTION + 2 {
        let m = block(&format!("m{i}"), &format!("ip:10.0.0.{i}"));
        cursors.push(store.publish(vec![m]).await.unwrap().cursor);
    }
    let old = changes(store, &c0).await;
    assert!(old.snapshot);
    assert_eq!(upserts(&old).len(), SUITE_RETENTION + 2);
    let recent = changes(store, &cursors[SUITE_RETENTION - 1]).await;
    assert!(!recent.snapshot);
    assert_eq!(
        ops(&recent),
        [
            format!("+m{}", SUITE_RETENTION),
            format!("+m{}", SUITE_RETENTION + 1)
        ]
    );
}

async fn clear_starts_a_new_generation(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let published = store
        .publish(vec![block("a", "ip:192.0.2.1"), block("b", "ip:192.0.2.2")])
        .await
        .unwrap();
    assert_eq!(store.clear().await.unwrap(), 2);
    assert_eq!(store.active(None, 100).await.unwrap().total, 0);
    let page = changes(store, &published.cursor).await;
    assert!(page.snapshot && page.changes.is_empty());
    assert_ne!(page.cursor, published.cursor);
    store
        .publish(vec![block("x", "ip:192.0.2.3")])
        .await
        .unwrap();
    let next = changes(store, &page.cursor).await;
    assert!(!next.snapshot);
    assert_eq!(ops(&next), ["+x"]);
}

async fn revoke_by_id_and_by_entity(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let published = store
        .publish(vec![
            block("a1", "ip:192.0.2.1"),
            mitigation(
                "a2",
                "ip:192.0.2.1",
                Action::Tarpit { delay_ms: 500 },
                Duration::from_secs(60),
            ),
            block("b", "ip:192.0.2.2"),
        ])
        .await
        .unwrap();
    assert_eq!(store.revoke_id("unknown").await.unwrap(), 0);
    assert_eq!(store.revoke_entity(&key("ip:192.0.2.1")).await.unwrap(), 2);
    assert!(
        store
            .for_entity(&key("ip:192.0.2.1"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.revoke_entity(&key("ip:192.0.2.1")).await.unwrap(), 0);
    let mut removed = ops(&changes(store, &published.cursor).await);
    removed.sort();
    // An id the store does not hold is passed on all the same: a follower may hold it
    // from before the store was emptied.
    assert_eq!(removed, ["-a1", "-a2", "-unknown"]);
    assert_eq!(store.revoke_id("b").await.unwrap(), 1);
    assert_eq!(store.revoke_id("b").await.unwrap(), 0);
    assert_eq!(store.active(None, 100).await.unwrap().total, 0);
}

async fn entity_lookup_covers_networks(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    store
        .publish(vec![
            block("ip", "ip:203.0.113.5"),
            block("net24", "cidr:203.0.113.0/24"),
            block("net16", "cidr:203.0.0.0/16"),
            block("hdr", "header:x-api-key=abc"),
            block("ip6", "ip:2001:db8::1"),
            block("net6", "cidr:2001:db8::/32"),
        ])
        .await
        .unwrap();
    let found = |k: &'static str| {
        let store = store.clone();
        async move { ids(&store.for_entity(&key(k)).await.unwrap()) }
    };
    assert_eq!(found("ip:203.0.113.5").await, ["ip", "net16", "net24"]);
    assert_eq!(found("ip:203.0.113.6").await, ["net16", "net24"]);
    assert_eq!(found("ip:203.0.200.1").await, ["net16"]);
    assert_eq!(found("cidr:203.0.113.0/24").await, ["net24"]);
    assert_eq!(found("header:X-Api-Key=abc").await, ["hdr"]);
    assert!(found("header:x-api-key=other").await.is_empty());
    assert_eq!(found("ip:2001:db8::1").await, ["ip6", "net6"]);
    assert!(found("ip:192.0.2.1").await.is_empty());
}

async fn expired_mitigations_vanish(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let short = mitigation(
        "short",
        "ip:192.0.2.1",
        Action::Block,
        Duration::from_millis(150),
    );
    let long = block("long", "ip:192.0.2.2");
    let published = store
        .publish(vec![short.clone(), long.clone()])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        ids(&store.active(None, 100).await.unwrap().mitigations),
        ["long"]
    );
    assert!(store.for_entity(&short.entity).await.unwrap().is_empty());
    let snapshot = store.changes(None, 100).await.unwrap();
    assert_eq!(ids(&upserts(&snapshot)), ["long"]);
    assert_eq!(store.counts().await.unwrap().get("block"), Some(&1));
    assert_eq!(store.sweep().await.unwrap(), 1);
    assert_eq!(store.sweep().await.unwrap(), 0);
    // Expiry appends nothing: followers expire entries themselves.
    assert!(changes(store, &published.cursor).await.changes.is_empty());

    // An already expired mitigation is nothing new, but ends a stored one of its id.
    let mut stale = block("stale", "ip:192.0.2.3");
    stale.expires_at = Utc::now() - chrono::Duration::seconds(1);
    assert_eq!(store.publish(vec![stale]).await.unwrap().accepted, 0);
    assert!(changes(store, &published.cursor).await.changes.is_empty());
    let mut ended = long;
    ended.expires_at = Utc::now() - chrono::Duration::seconds(1);
    assert_eq!(store.publish(vec![ended]).await.unwrap().accepted, 1);
    assert_eq!(ops(&changes(store, &published.cursor).await), ["-long"]);
    assert_eq!(store.active(None, 100).await.unwrap().total, 0);
}

async fn active_filters_and_limits(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let base = Utc::now();
    let mut batch = Vec::new();
    for (i, entity) in [
        "ip:192.0.2.1",
        "ip:192.0.2.2",
        "ip:192.0.2.3",
        "cidr:10.0.0.0/8",
    ]
    .iter()
    .enumerate()
    {
        let mut m = block(&format!("m{i}"), entity);
        m.created_at = base + chrono::Duration::seconds(i as i64);
        batch.push(m);
    }
    store.publish(batch).await.unwrap();
    let page = store.active(None, 2).await.unwrap();
    assert_eq!(page.total, 4);
    let newest: Vec<&str> = page.mitigations.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(newest, ["m3", "m2"]);
    let ips = store.active(Some("ip"), 10).await.unwrap();
    assert_eq!((ips.total, ips.mitigations.len()), (3, 3));
    assert_eq!(store.active(Some("header"), 10).await.unwrap().total, 0);
}

async fn subscribers_see_every_change(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let mut rx = store.subscribe();
    rx.borrow_and_update();
    let a = block("a", "ip:192.0.2.1");
    store.publish(vec![a.clone()]).await.unwrap();
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    store.publish(vec![a]).await.unwrap();
    assert!(
        !rx.has_changed().unwrap(),
        "an identical re-publish is no change"
    );
    store.revoke_id("a").await.unwrap();
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    store.clear().await.unwrap();
    assert!(rx.has_changed().unwrap());
}

/// The ids of every page of the snapshot `first` starts, in order, checking that each
/// page carries the first one's cursor.
async fn page_through(
    store: &Arc<dyn MitigationStore>,
    first: DeltaPage,
    limit: usize,
) -> Vec<Mitigation> {
    assert!(first.snapshot);
    let mut got = upserts(&first);
    let mut page = first;
    while let Some(more) = page.more.clone() {
        let next = store
            .snapshot_page(&page.cursor, &more, limit)
            .await
            .unwrap();
        assert!(next.snapshot);
        assert_eq!(
            next.cursor, page.cursor,
            "every page carries the snapshot's cursor"
        );
        assert!(next.changes.len() <= limit);
        assert_eq!(next.total, None, "only a snapshot's first page counts it");
        got.extend(upserts(&next));
        page = next;
    }
    got
}

async fn snapshots_arrive_in_pages(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let all: Vec<Mitigation> = (0..25)
        .map(|i| block(&format!("p{i:02}"), &format!("ip:192.0.2.{i}")))
        .collect();
    store.publish(all.clone()).await.unwrap();
    let first = store.changes(None, 10).await.unwrap();
    assert_eq!(first.changes.len(), 10);
    assert_eq!(first.more.as_deref(), Some("p09"));
    assert_eq!(
        first.total,
        Some(25),
        "the first page counts the whole snapshot"
    );
    let got = page_through(store, first, 10).await;
    let got_ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
    let want: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
    assert_eq!(got_ids, want, "each entry exactly once, by id");
    assert_eq!(got, all);

    // A set that fits one page has no continuation; nor has an exactly full last page.
    let whole = store.changes(None, 25).await.unwrap();
    assert_eq!((whole.changes.len(), whole.more), (25, None));
    assert_eq!(whole.total, Some(25));
    let deltas = store.changes(Some(&whole.cursor), 10).await.unwrap();
    assert_eq!((deltas.snapshot, deltas.total), (false, None));
    assert_eq!(
        page_through(store, store.changes(None, 5).await.unwrap(), 5).await,
        all
    );
}

async fn changes_between_pages_are_in_the_deltas(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let all: Vec<Mitigation> = (0..20)
        .map(|i| block(&format!("q{i:02}"), &format!("ip:198.51.100.{i}")))
        .collect();
    store.publish(all).await.unwrap();
    let first = store.changes(None, 5).await.unwrap();
    let cursor = first.cursor.clone();
    assert_eq!(first.more.as_deref(), Some("q04"));
    let mut assembled: BTreeMap<String, Mitigation> = upserts(&first)
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();

    // Between pages: removals behind and ahead of the boundary, an addition behind it
    // (never on a page) and one ahead, a change ahead.
    store.revoke_id("q02").await.unwrap();
    store.revoke_id("q10").await.unwrap();
    let behind = block("q03a", "ip:198.51.100.200");
    let ahead = block("q99", "ip:198.51.100.201");
    let changed = Mitigation {
        action: Action::Log,
        ..block("q12", "ip:198.51.100.12")
    };
    store
        .publish(vec![behind, ahead, changed.clone()])
        .await
        .unwrap();

    let rest = store
        .snapshot_page(&cursor, first.more.as_deref().unwrap(), 5)
        .await
        .unwrap();
    let rest = page_through(store, rest, 5).await;
    let rest_ids: Vec<&str> = rest.iter().map(|m| m.id.as_str()).collect();
    let mut unchanged: Vec<String> = (5..20)
        .filter(|i| *i != 10)
        .map(|i| format!("q{i:02}"))
        .collect();
    unchanged.push("q99".into());
    assert_eq!(
        rest_ids, unchanged,
        "each id after the boundary exactly once"
    );
    assert_eq!(rest.iter().find(|m| m.id == "q12"), Some(&changed));
    assembled.extend(rest.into_iter().map(|m| (m.id.clone(), m)));

    // Replaying the deltas after the snapshot's cursor makes the set exact.
    let mut at = cursor;
    loop {
        let page = store.changes(Some(&at), 2).await.unwrap();
        assert!(!page.snapshot, "the snapshot's cursor is still served");
        if page.changes.is_empty() {
            break;
        }
        for change in page.changes {
            match change {
                Change::Upsert { mitigation } => {
                    assembled.insert(mitigation.id.clone(), mitigation);
                }
                Change::Remove { id } => {
                    assembled.remove(&id);
                }
            }
        }
        at = page.cursor;
    }
    let mut active = store.active(None, 100).await.unwrap().mitigations;
    active.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(assembled.into_values().collect::<Vec<_>>(), active);
}

async fn a_stale_snapshot_starts_over(store: &Arc<dyn MitigationStore>) {
    fresh(store).await;
    let all: Vec<Mitigation> = (0..6)
        .map(|i| block(&format!("s{i}"), &format!("ip:203.0.113.{i}")))
        .collect();
    store.publish(all).await.unwrap();
    let first = store.changes(None, 2).await.unwrap();
    let more = first.more.clone().unwrap();

    // More changes than the log keeps: the snapshot's cursor can no longer be followed
    // by deltas, so its next page is the first page of a new snapshot.
    for i in 0..SUITE_RETENTION + 2 {
        let m = block(&format!("t{i}"), &format!("ip:203.0.113.{}", 100 + i));
        store.publish(vec![m]).await.unwrap();
    }
    let restarted = store.snapshot_page(&first.cursor, &more, 2).await.unwrap();
    assert!(restarted.snapshot);
    assert_ne!(restarted.cursor, first.cursor);
    assert_eq!(ids(&upserts(&restarted)), ["s0", "s1"]);
    assert_eq!(
        restarted.total,
        Some(6 + SUITE_RETENTION as u64 + 2),
        "a snapshot started over is counted again"
    );
    let whole = page_through(store, restarted, 2).await;
    assert_eq!(whole.len(), 6 + SUITE_RETENTION + 2);

    // So is the next page of a snapshot from before a clear.
    let before = store.changes(None, 2).await.unwrap();
    store.clear().await.unwrap();
    store
        .publish(vec![block("u", "ip:203.0.113.250")])
        .await
        .unwrap();
    let after = store
        .snapshot_page(&before.cursor, &before.more.unwrap(), 2)
        .await
        .unwrap();
    assert!(after.snapshot);
    assert_ne!(after.cursor, before.cursor);
    assert_eq!(
        (ids(&upserts(&after)), after.more),
        (vec!["u".to_string()], None)
    );
}
