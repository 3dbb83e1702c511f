//! The conformance suite every [`ControlStore`] implementation must pass. It panics on
//! the first failed expectation, as a test does; call it from a `#[tokio::test]` with a
//! freshly migrated, empty store.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use esper_protocol::{
    Action, Decision, DecisionMode, EntityKey, Mitigation, Origin, PageMark, Reason,
};
use serde_json::json;

use super::{
    BROKER_COPY, ControlStore, DecisionQuery, DrainAsk, Heard, MemberBeat, PolicyWrite,
    RevokeTarget, StoreError, TokenRemoval, TokenRole,
};

fn write(id: &str, spec: serde_json::Value, change: &str) -> PolicyWrite {
    PolicyWrite {
        expected_version: None,
        id: id.to_string(),
        enabled: spec["enabled"].as_bool().unwrap_or(true),
        mode: spec["mode"].as_str().unwrap_or("enforce").to_string(),
        spec,
        change: change.to_string(),
        changed_by: "suite".to_string(),
    }
}

fn decision(id: &str, entity: &str, mode: DecisionMode, secs_ago: i64) -> Decision {
    let entity: EntityKey = entity.parse().expect("suite entity keys are valid");
    let mut m = Mitigation::new(
        entity,
        Action::Block,
        Duration::from_secs(3600),
        Origin::Policy,
        Reason {
            policy_id: Some("login-burst".into()),
            summary: "suite".into(),
        },
    );
    m.id = id.to_string();
    Decision {
        id: id.to_string(),
        mitigation: m,
        mode,
        policy_id: Some("login-burst".into()),
        policy_version: Some(1),
        counted: Some(12.0),
        threshold: Some(10.0),
        window_secs: Some(60),
        decided_by: "worker-1".into(),
        decided_at: Utc::now() - chrono::Duration::seconds(secs_ago),
    }
}

/// Runs every expectation against `store`.
pub async fn run(store: Arc<dyn ControlStore>) {
    migrations_are_idempotent(&*store).await;
    policies_version_only_on_change(&*store).await;
    lists_bump_the_revision(&*store).await;
    writes_over_a_revision_are_refused_once_it_moved(&*store).await;
    decision_log_is_idempotent_and_filtered(&*store).await;
    decisions_in_force_page_and_broker_copies_upgrade(&*store).await;
    policy_revocations_page_in_the_order_revoked(&*store).await;
    a_late_revocation_leaves_decisions_made_since_alone(&*store).await;
    tokens_are_found_by_hash(&*store).await;
    proxy_config_revisions_grow_on_change(&*store).await;
    secrets_are_made_once(&*store).await;
    secrets_rotate_keeping_or_dropping_the_one_before(&*store).await;
    a_republished_broker_copy_replaces_the_one_before(&*store).await;
    decisions_expired_past_the_retention_are_pruned(&*store).await;
    a_drain_stands_for_the_run_asked_until_it_says_it_stops(&*store).await;
    members_are_listed_counted_and_forgotten(&*store).await;
    a_heartbeat_older_than_the_one_recorded_is_left_out(&*store).await;
}

async fn migrations_are_idempotent(store: &dyn ControlStore) {
    store.migrate().await.expect("migrate");
    assert!(store.migrate().await.expect("migrate again").is_empty());
    store.ping().await.expect("ping");
}

async fn policies_version_only_on_change(store: &dyn ControlStore) {
    let r0 = store.revision().await.expect("revision");
    let a = json!({"id": "a", "threshold": 10, "enabled": true, "mode": "enforce"});
    let b = json!({"id": "b", "threshold": 5, "enabled": false, "mode": "shadow"});
    let out = store
        .put_policies(
            vec![write("a", a.clone(), "apply"), write("b", b, "apply")],
            None,
        )
        .await
        .expect("put");
    assert!(out.iter().all(|o| o.changed && o.version == 1), "{out:?}");
    let r1 = store.revision().await.expect("revision");
    assert_eq!(r1, r0 + 1, "one bump per write");

    let out = store
        .put_policies(vec![write("a", a.clone(), "apply")], None)
        .await
        .expect("put same");
    assert_eq!((out[0].version, out[0].changed), (1, false));
    assert_eq!(store.revision().await.expect("revision"), r1);

    let a2 = json!({"id": "a", "threshold": 20, "enabled": true, "mode": "enforce"});
    let out = store
        .put_policies(vec![write("a", a2.clone(), "apply")], None)
        .await
        .expect("put changed");
    assert_eq!((out[0].version, out[0].changed), (2, true));
    let got = store.get_policy("a").await.expect("get").expect("exists");
    assert_eq!((got.version, got.spec), (2, a2.clone()));

    // A write made from a read (a toggle) goes in only over the version it read.
    let off = json!({"id": "a", "threshold": 20, "enabled": false, "mode": "enforce"});
    let stale = PolicyWrite {
        expected_version: Some(1),
        ..write("a", off.clone(), "disable")
    };
    assert!(matches!(
        store.put_policies(vec![stale], None).await,
        Err(StoreError::Stale(_))
    ));
    assert_eq!(
        store
            .get_policy("a")
            .await
            .expect("get")
            .expect("exists")
            .version,
        2
    );
    let current = PolicyWrite {
        expected_version: Some(2),
        ..write("a", off, "disable")
    };
    let out = store
        .put_policies(vec![current], None)
        .await
        .expect("over 2");
    assert_eq!((out[0].version, out[0].changed), (3, true));
    let out = store
        .put_policies(vec![write("a", a2, "enable")], None)
        .await
        .expect("enable");
    assert_eq!(out[0].version, 4);

    let snap = store.active_snapshot().await.expect("snapshot");
    let ids: Vec<_> = snap.policies.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["a"], "only enabled policies are active");

    assert!(store.delete_policy("a", "suite").await.expect("delete"));
    assert!(
        !store
            .delete_policy("a", "suite")
            .await
            .expect("delete again")
    );
    assert!(store.get_policy("a").await.expect("get").is_none());
    let history = store.policy_versions("a").await.expect("versions");
    let changes: Vec<_> = history
        .iter()
        .map(|v| (v.version, v.change.as_str()))
        .collect();
    assert_eq!(
        changes,
        [
            (1, "apply"),
            (2, "apply"),
            (3, "disable"),
            (4, "enable"),
            (5, "delete")
        ]
    );
    assert_eq!(history[0].spec, a);

    let out = store
        .put_policies(vec![write("a", a, "apply")], None)
        .await
        .expect("re-apply");
    assert_eq!(out[0].version, 6, "versions keep counting after a delete");
    let all: Vec<_> = store
        .list_policies()
        .await
        .expect("list")
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(all, ["a", "b"]);
}

async fn writes_over_a_revision_are_refused_once_it_moved(store: &dyn ControlStore) {
    let r0 = store.stored_revision().await.expect("revision");
    assert_eq!(store.revision().await.expect("revision"), r0);
    store
        .put_list("guarded", "ip", vec!["10.0.0.1".into()], Some(r0))
        .await
        .expect("over the current revision");
    let r1 = store.stored_revision().await.expect("revision");
    assert_eq!(r1, r0 + 1);
    // Each write checked at r0 is refused whole now that the revision is r1.
    let stale = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Stale(_)));
    assert!(stale(
        store
            .put_list("guarded", "string", vec!["x".into()], Some(r0))
            .await
            .map(|_| ())
    ));
    assert!(stale(
        store.delete_list("guarded", Some(r0)).await.map(|_| ())
    ));
    assert!(stale(
        store
            .put_policies(vec![write("g", json!({"v": 1}), "apply")], Some(r0))
            .await
            .map(|_| ())
    ));
    let kept = store.get_list("guarded").await.expect("get").expect("kept");
    assert_eq!((kept.kind.as_str(), kept.items.len()), ("ip", 1));
    assert_eq!(store.get_policy("g").await.expect("get"), None);
    assert_eq!(store.stored_revision().await.expect("revision"), r1);
    assert!(
        store
            .delete_list("guarded", Some(r1))
            .await
            .expect("delete")
    );
}

async fn lists_bump_the_revision(store: &dyn ControlStore) {
    let r0 = store.revision().await.expect("revision");
    let items = vec!["10.0.0.0/8".to_string(), "192.0.2.1".to_string()];
    let l = store
        .put_list("office", "ip", items.clone(), None)
        .await
        .expect("put list");
    assert_eq!(l.items, items);
    assert_eq!(store.revision().await.expect("revision"), r0 + 1);
    store
        .put_list("office", "ip", items.clone(), None)
        .await
        .expect("same list");
    assert_eq!(store.revision().await.expect("revision"), r0 + 1);
    let got = store
        .get_list("office")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got, l);
    assert_eq!(store.list_lists().await.expect("lists").len(), 1);
    assert!(store.delete_list("office", None).await.expect("delete"));
    assert!(
        !store
            .delete_list("office", None)
            .await
            .expect("delete again")
    );
    assert_eq!(store.revision().await.expect("revision"), r0 + 2);
}

async fn decision_log_is_idempotent_and_filtered(store: &dyn ControlStore) {
    let batch = vec![
        decision("d1", "ip:192.0.2.1", DecisionMode::Enforce, 30),
        decision("d2", "ip:192.0.2.1", DecisionMode::Shadow, 20),
        decision("d3", "ip:192.0.2.9", DecisionMode::Enforce, 10),
    ];
    assert_eq!(store.record_decisions(&batch).await.expect("record"), 3);
    assert_eq!(store.record_decisions(&batch).await.expect("again"), 0);

    let all = store
        .query_decisions(&DecisionQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("query");
    let ids: Vec<_> = all.iter().map(|d| d.decision.id.as_str()).collect();
    assert_eq!(ids, ["d3", "d2", "d1"], "newest first");
    assert_eq!(all[2].decision, batch[0], "stored as sent");

    let q = DecisionQuery {
        entity: Some("ip:192.0.2.1".parse().expect("key")),
        mode: Some(DecisionMode::Enforce),
        policy: Some("login-burst".into()),
        limit: 10,
        ..Default::default()
    };
    let got = store.query_decisions(&q).await.expect("filtered");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].decision.id, "d1");
    let one = store
        .query_decisions(&DecisionQuery {
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("limit");
    assert_eq!(one.len(), 1);

    let entity: EntityKey = "ip:192.0.2.1".parse().expect("key");
    let n = store
        .mark_revoked(&RevokeTarget::Entity(entity), "suite", Utc::now())
        .await
        .expect("revoke");
    assert_eq!(n, 1, "shadow decisions were never in force");
    let n = store
        .mark_revoked(&RevokeTarget::Id("d1".into()), "suite", Utc::now())
        .await
        .expect("revoke again");
    assert_eq!(n, 0, "already revoked");
    let got = store.query_decisions(&q).await.expect("filtered");
    assert_eq!(got[0].revoked_by.as_deref(), Some("suite"));
    assert!(got[0].revoked_at.is_some());
}

async fn decisions_in_force_page_and_broker_copies_upgrade(store: &dyn ControlStore) {
    let in_force = |q: Option<PageMark>| DecisionQuery {
        active: true,
        before: q,
        limit: 2,
        ..Default::default()
    };
    // Earlier expectations leave every decision revoked, shadowed or about other
    // entities; start from what is in force now.
    let before: Vec<String> = store
        .query_decisions(&DecisionQuery {
            active: true,
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("in force")
        .into_iter()
        .map(|d| d.decision.id)
        .collect();
    let mut expired = decision("p-expired", "ip:198.51.100.1", DecisionMode::Enforce, 5);
    expired.mitigation.expires_at = Utc::now() - chrono::Duration::seconds(1);
    let mut copy = decision("p2", "ip:198.51.100.2", DecisionMode::Enforce, 3);
    copy.decided_by = BROKER_COPY.into();
    copy.counted = None;
    let batch = vec![
        decision("p1", "ip:198.51.100.1", DecisionMode::Enforce, 4),
        copy,
        decision("p3", "ip:198.51.100.3", DecisionMode::Enforce, 2),
        decision("p-shadow", "ip:198.51.100.4", DecisionMode::Shadow, 1),
        expired,
    ];
    assert_eq!(store.record_decisions(&batch).await.expect("record"), 5);

    let mut seen = Vec::new();
    let mut mark = None;
    loop {
        let page = store.query_decisions(&in_force(mark)).await.expect("page");
        seen.extend(page.iter().map(|d| d.decision.id.clone()));
        if page.len() < 2 {
            break;
        }
        mark = page.last().map(|d| PageMark::after(&d.decision));
    }
    seen.retain(|id| !before.contains(id));
    assert_eq!(seen, ["p3", "p2", "p1"], "in force, newest first, paged");

    // The worker's own record replaces the broker's copy, never the other way round.
    let worker = decision("p2", "ip:198.51.100.2", DecisionMode::Enforce, 3);
    assert_eq!(store.record_decisions(&[worker]).await.expect("upgrade"), 1);
    let mut late_copy = decision("p3", "ip:198.51.100.3", DecisionMode::Enforce, 2);
    late_copy.decided_by = BROKER_COPY.into();
    assert_eq!(store.record_decisions(&[late_copy]).await.expect("copy"), 0);
    let p2 = store
        .query_decisions(&DecisionQuery {
            entity: Some("ip:198.51.100.2".parse().expect("key")),
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("p2");
    assert_eq!(p2[0].decision.decided_by, "worker-1");
    assert_eq!(p2[0].decision.counted, Some(12.0));

    let n = store
        .mark_revoked(&RevokeTarget::All, "suite", Utc::now())
        .await
        .expect("revoke all");
    assert_eq!(n as usize, 3 + before.len());
    let left = store.query_decisions(&in_force(None)).await.expect("none");
    assert!(left.is_empty(), "{left:?}");
}

async fn policy_revocations_page_in_the_order_revoked(store: &dyn ControlStore) {
    let mut manual = decision("r3", "ip:203.0.113.3", DecisionMode::Enforce, 5);
    manual.policy_id = None;
    manual.mitigation.origin = Origin::Manual;
    manual.mitigation.reason.policy_id = None;
    let mut brief = decision("r6", "ip:203.0.113.6", DecisionMode::Enforce, 5);
    brief.mitigation.expires_at = Utc::now() + chrono::Duration::seconds(60);
    let batch = vec![
        decision("r1", "ip:203.0.113.1", DecisionMode::Enforce, 5),
        decision("r2", "ip:203.0.113.2", DecisionMode::Enforce, 5),
        manual,
        decision("r5", "ip:203.0.113.4", DecisionMode::Enforce, 5),
        decision("r4", "ip:203.0.113.4", DecisionMode::Enforce, 5),
        brief,
    ];
    assert_eq!(store.record_decisions(&batch).await.expect("record"), 6);
    // The log keeps microseconds.
    let t = Utc::now().trunc_subsecs(6);
    let sec = |n| t + chrono::Duration::seconds(n);
    for (target, at) in [
        (RevokeTarget::Id("r1".into()), sec(1)),
        (RevokeTarget::Id("r2".into()), t),
        (RevokeTarget::Id("r3".into()), t),
        (
            RevokeTarget::Entity("ip:203.0.113.4".parse().expect("key")),
            sec(2),
        ),
        (RevokeTarget::Id("r6".into()), sec(2)),
    ] {
        store
            .mark_revoked(&target, "suite", at)
            .await
            .expect("revoke");
    }
    let page_through = |now| async move {
        let (mut seen, mut mark) = (Vec::new(), None);
        loop {
            let page = store
                .revocations(mark.as_ref(), now, 2)
                .await
                .expect("revocations");
            let more = page.revocations.len() == 2;
            seen.extend(page.revocations);
            mark = Some(page.next);
            if !more {
                break;
            }
        }
        seen.retain(|r| r.id.starts_with('r'));
        (seen, mark)
    };
    let (seen, _) = page_through(sec(3)).await;
    let ids: Vec<&str> = seen.iter().map(|r| r.id.as_str()).collect();
    // r2's revocation carries an earlier time than r1's but was written after it (a
    // broker delivering late): it comes after, where a reader that has seen r1 finds it.
    assert_eq!(
        ids,
        ["r1", "r2", "r4", "r5", "r6"],
        "policy decisions only, in the order written, ties by id, paged"
    );
    assert_eq!(seen[0].policy_id, "login-burst");
    assert_eq!(seen[0].entity.to_string(), "ip:203.0.113.1");
    assert_eq!(seen[0].revoked_at, sec(1));
    assert_eq!(seen[0].decided_at, batch[0].decided_at.trunc_subsecs(6));
    assert!(seen[0].seq < seen[1].seq && seen[1].seq < seen[2].seq);
    assert_eq!(seen[2].seq, seen[3].seq, "revoked together");
    // Once a decision is past its expiry its revocation no longer matters.
    let (later, end) = page_through(sec(120)).await;
    let later: Vec<&str> = later.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(later, ["r1", "r2", "r4", "r5"]);
    // The last mark is past every revocation read or skipped, r6 included.
    let end = end.expect("a mark");
    assert_eq!(end.id, None);
    let rest = store
        .revocations(Some(&end), sec(3), 2)
        .await
        .expect("after the end");
    assert!(rest.revocations.is_empty(), "{rest:?}");
    assert_eq!(rest.next, end, "nothing new: the mark stays");
}

async fn a_late_revocation_leaves_decisions_made_since_alone(store: &dyn ControlStore) {
    let entity = "ip:203.0.113.50";
    let batch = vec![
        decision("late-old", entity, DecisionMode::Enforce, 30),
        decision("late-new", entity, DecisionMode::Enforce, 5),
        decision("late-other", "ip:203.0.113.51", DecisionMode::Enforce, 5),
    ];
    assert_eq!(store.record_decisions(&batch).await.expect("record"), 3);
    // Revocations dated between the two decisions, arriving after both.
    let at = Utc::now() - chrono::Duration::seconds(20);
    let by_entity = RevokeTarget::Entity(entity.parse().expect("key"));
    let n = store
        .mark_revoked(&by_entity, "suite", at)
        .await
        .expect("revoke entity");
    assert_eq!(n, 1, "only the decision made by then");
    let n = store
        .mark_revoked(&RevokeTarget::All, "suite", at)
        .await
        .expect("revoke all");
    assert_eq!(n, 0, "both other decisions were made later");
    // An id names its decision whatever the times say.
    let n = store
        .mark_revoked(&RevokeTarget::Id("late-new".into()), "suite", at)
        .await
        .expect("revoke id");
    assert_eq!(n, 1);
    let revoked = |id: &'static str| async move {
        store
            .query_decisions(&DecisionQuery {
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("query")
            .into_iter()
            .find(|d| d.decision.id == id)
            .expect("logged")
            .revoked_at
            .is_some()
    };
    assert!(revoked("late-old").await && revoked("late-new").await);
    assert!(!revoked("late-other").await);
}

async fn tokens_are_found_by_hash(store: &dyn ControlStore) {
    assert_eq!(store.admin_token_count().await.expect("count"), 0);
    assert!(
        store
            .add_token("ops", TokenRole::Admin, "abc123", "initial")
            .await
            .expect("add")
            .is_some()
    );
    // Names are unique: a second `ops` (another instance's first start) is not stored.
    assert!(
        store
            .add_token("ops", TokenRole::Read, "other", "x")
            .await
            .expect("add")
            .is_none()
    );
    assert!(
        store
            .add_token("edge", TokenRole::Service, "def456", "ops")
            .await
            .expect("add")
            .is_some()
    );
    assert_eq!(store.admin_token_count().await.expect("count"), 1);
    assert_eq!(
        store.find_token("abc123").await.expect("find"),
        Some(("ops".to_string(), TokenRole::Admin))
    );
    assert_eq!(
        store.find_token("def456").await.expect("find"),
        Some(("edge".to_string(), TokenRole::Service))
    );
    assert_eq!(store.find_token("nope").await.expect("find"), None);
    let listed = store.list_tokens().await.expect("list");
    let names: Vec<(&str, TokenRole, &str)> = listed
        .iter()
        .map(|t| (t.name.as_str(), t.role, t.created_by.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("edge", TokenRole::Service, "ops"),
            ("ops", TokenRole::Admin, "initial")
        ]
    );

    assert!(listed.iter().all(|t| t.last_used_at.is_none()));
    let at = Utc::now().trunc_subsecs(6);
    store.token_used("edge", at).await.expect("used");
    // An earlier use reported late does not replace a later one.
    store
        .token_used("edge", at - chrono::Duration::seconds(30))
        .await
        .expect("used");
    let used = store.list_tokens().await.expect("list");
    assert_eq!(
        used.iter().map(|t| t.last_used_at).collect::<Vec<_>>(),
        [Some(at), None]
    );
    store
        .token_used("ghost", at)
        .await
        .expect("an unknown token changes nothing");

    // The last admin token stays while the caller asks for one to be kept.
    assert_eq!(
        store.delete_token("ops", true).await.expect("delete"),
        TokenRemoval::LastAdmin
    );
    assert_eq!(
        store.find_token("abc123").await.expect("find").map(|t| t.0),
        Some("ops".to_string()),
        "a refused delete deletes nothing"
    );
    assert_eq!(
        store.delete_token("ghost", true).await.expect("delete"),
        TokenRemoval::NotFound
    );
    assert_eq!(
        store.delete_token("edge", true).await.expect("delete"),
        TokenRemoval::Deleted
    );
    assert_eq!(store.find_token("def456").await.expect("find"), None);
    // With a configured admin token beside the store, the stored ones may all go.
    assert_eq!(
        store.delete_token("ops", false).await.expect("delete"),
        TokenRemoval::Deleted
    );
    assert!(store.list_tokens().await.expect("list").is_empty());
}

async fn proxy_config_revisions_grow_on_change(store: &dyn ControlStore) {
    assert_eq!(store.proxy_config().await.expect("read proxy config"), None);
    let first = store
        .put_proxy_config("allow_paths = [\"/health\"]", "admin")
        .await
        .expect("store proxy config");
    assert_eq!(first.revision, 1);
    assert_eq!(first.updated_by, "admin");
    let same = store
        .put_proxy_config("allow_paths = [\"/health\"]", "other")
        .await
        .expect("store proxy config");
    assert_eq!(same, first, "unchanged text keeps its revision");
    let second = store
        .put_proxy_config("threads = 2", "ops")
        .await
        .expect("store proxy config");
    assert_eq!(second.revision, 2);
    assert_eq!(second.config, "threads = 2");
    assert_eq!(
        store.proxy_config().await.expect("read proxy config"),
        Some(second)
    );
}

async fn secrets_are_made_once(store: &dyn ControlStore) {
    let first = store
        .secret("challenge", "one")
        .await
        .expect("store a secret");
    assert_eq!(first.value, "one");
    assert_eq!(
        (first.previous, first.revision, first.rotated_at),
        (None, 1, None)
    );
    let again = store
        .secret("challenge", "two")
        .await
        .expect("read a secret");
    assert_eq!(again.value, "one", "the first value stays");
    let other = store
        .secret("other", "three")
        .await
        .expect("store a secret");
    assert_eq!(other.value, "three", "each name has its own");
}

async fn secrets_rotate_keeping_or_dropping_the_one_before(store: &dyn ControlStore) {
    store.secret("key", "one").await.expect("store a secret");
    let before = Utc::now();
    let second = store
        .rotate_secret("key", "two", true)
        .await
        .expect("rotate a secret");
    assert_eq!(second.value, "two");
    assert_eq!(second.previous.as_deref(), Some("one"));
    assert_eq!(second.revision, 2);
    assert!(
        second
            .rotated_at
            .is_some_and(|t| t >= before - chrono::Duration::seconds(1))
    );
    assert_eq!(
        store.secret("key", "unused").await.expect("read a secret"),
        second,
        "a rotated secret is what every later read answers"
    );
    let third = store
        .rotate_secret("key", "three", true)
        .await
        .expect("rotate again");
    assert_eq!(
        (
            third.value.as_str(),
            third.previous.as_deref(),
            third.revision
        ),
        ("three", Some("two"), 3),
        "only the value just replaced is kept"
    );
    let fourth = store
        .rotate_secret("key", "four", false)
        .await
        .expect("rotate dropping the one before");
    assert_eq!(
        (fourth.value.as_str(), fourth.previous, fourth.revision),
        ("four", None, 4)
    );
    let made = store
        .rotate_secret("never-made", "first", true)
        .await
        .expect("rotate a secret never made");
    assert_eq!(
        (made.value.as_str(), made.previous, made.revision),
        ("first", None, 1),
        "rotating a secret that does not exist yet makes it"
    );
}

async fn a_republished_broker_copy_replaces_the_one_before(store: &dyn ControlStore) {
    let broker_copy = |id: &str, entity: &str| {
        let mut d = decision(id, entity, DecisionMode::Enforce, 2);
        d.decided_by = BROKER_COPY.into();
        d.counted = None;
        d
    };
    let logged = |id: &'static str| async move {
        let found = store
            .query_decisions(&DecisionQuery {
                id: Some(id.into()),
                limit: 2,
                ..Default::default()
            })
            .await
            .expect("by id");
        assert_eq!(found.len(), 1, "{id}: {found:?}");
        found.into_iter().next().map(|d| d.decision)
    };

    let first = broker_copy("q1", "ip:192.0.2.41");
    assert_eq!(
        store
            .record_decisions(std::slice::from_ref(&first))
            .await
            .expect("q1"),
        1
    );
    // The same copy delivered again (the outbox delivers at least once) changes nothing.
    assert_eq!(
        store
            .record_decisions(std::slice::from_ref(&first))
            .await
            .expect("again"),
        0
    );

    // Republished under its id as a throttle that ends sooner: the log follows, so a
    // restore from it brings back what the broker held last.
    let mut second = first.clone();
    second.mitigation.action = Action::Throttle {
        rate: 0.5,
        burst: 10,
    };
    second.mitigation.expires_at = first.mitigation.expires_at - chrono::Duration::minutes(30);
    // An outbox batch holding both versions, delivered twice, ends on the later one.
    let batch = [first.clone(), second.clone()];
    assert_eq!(store.record_decisions(&batch).await.expect("batch"), 1);
    assert_eq!(
        store.record_decisions(&batch).await.expect("batch again"),
        2
    );
    let now = logged("q1").await.expect("q1 logged");
    assert_eq!(now.mitigation.action, second.mitigation.action);
    assert_eq!(
        now.mitigation.expires_at.trunc_subsecs(3),
        second.mitigation.expires_at.trunc_subsecs(3)
    );
    let in_force = store
        .query_decisions(&DecisionQuery {
            entity: Some("ip:192.0.2.41".parse().expect("key")),
            active: true,
            limit: 5,
            ..Default::default()
        })
        .await
        .expect("in force");
    assert_eq!(in_force.len(), 1);
    assert_eq!(
        in_force[0].decision.mitigation.action,
        second.mitigation.action
    );

    // A worker's record stands against any broker copy: they differ only by the
    // broker's expiry cap, which a restore applies again.
    let worker = decision("q2", "ip:192.0.2.42", DecisionMode::Enforce, 2);
    assert_eq!(
        store
            .record_decisions(std::slice::from_ref(&worker))
            .await
            .expect("q2"),
        1
    );
    let mut capped = broker_copy("q2", "ip:192.0.2.42");
    capped.mitigation.expires_at = Utc::now() + chrono::Duration::minutes(5);
    assert_eq!(store.record_decisions(&[capped]).await.expect("cap"), 0);
    let kept = logged("q2").await.expect("q2 logged");
    assert_eq!(kept.decided_by, worker.decided_by);
    assert_eq!(kept.counted, worker.counted);
}

async fn decisions_expired_past_the_retention_are_pruned(store: &dyn ControlStore) {
    let now = Utc::now();
    let mut old = decision(
        "pr-old",
        "ip:198.51.100.77",
        DecisionMode::Enforce,
        60 * 86_400,
    );
    old.mitigation.expires_at = now - chrono::Duration::days(40);
    let mut lately = decision(
        "pr-lately",
        "ip:198.51.100.77",
        DecisionMode::Enforce,
        2 * 86_400,
    );
    lately.mitigation.expires_at = now - chrono::Duration::days(1);
    let live = decision("pr-live", "ip:198.51.100.77", DecisionMode::Enforce, 10);
    store
        .record_decisions(&[old, lately, live])
        .await
        .expect("record");
    let pruned = store
        .prune_decisions(now - chrono::Duration::days(30))
        .await
        .expect("prune");
    assert!(pruned >= 1, "{pruned}");
    let left = store
        .query_decisions(&DecisionQuery {
            entity: Some("ip:198.51.100.77".parse().expect("key")),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("query");
    let ids: Vec<_> = left.iter().map(|d| d.decision.id.as_str()).collect();
    assert_eq!(
        ids,
        ["pr-live", "pr-lately"],
        "newest first, the old one gone"
    );
    assert_eq!(
        store
            .prune_decisions(now - chrono::Duration::days(30))
            .await
            .expect("again"),
        0
    );
}

/// A heartbeat of member `id` of `kind`, of the run started at `run` seconds, heard `at`
/// (members heard from in the 15 s before are alive).
fn beat<'a>(
    kind: &'a str,
    id: &'a str,
    run: i64,
    stopping: bool,
    at: chrono::DateTime<Utc>,
) -> MemberBeat<'a> {
    MemberBeat {
        kind,
        id,
        beat: if stopping {
            r#"{"state":"draining"}"#
        } else {
            r#"{"state":"running"}"#
        },
        run: chrono::DateTime::from_timestamp(run, 0).expect("suite runs are valid times"),
        stopping,
        at,
        alive_since: at - chrono::Duration::seconds(15),
    }
}

const DRAIN: Heard = Heard::Recorded { drain: true };
const NO_DRAIN: Heard = Heard::Recorded { drain: false };

async fn a_drain_stands_for_the_run_asked_until_it_says_it_stops(store: &dyn ControlStore) {
    let now = Utc::now();
    let (known, alive) = (
        now - chrono::Duration::hours(1),
        now - chrono::Duration::seconds(15),
    );
    let ask = async |kind, id| store.ask_drain(kind, id, known, alive).await.expect("ask");
    let worker = async |id, run, stopping| {
        store
            .member_beat(&beat("worker", id, run, stopping, Utc::now()))
            .await
            .expect("beat")
    };
    assert_eq!(ask("worker", "w1").await, DrainAsk::Unknown);
    assert_eq!(worker("w1", 1, false).await, NO_DRAIN);
    assert_eq!(ask("proxy", "w1").await, DrainAsk::Unknown, "kinds apart");
    assert_eq!(ask("worker", "w1").await, DrainAsk::Asked);
    let listed = store.members("worker", known).await.expect("members");
    assert!(
        listed[0].drain_asked,
        "listed as asked until told and heard"
    );
    assert_eq!(worker("w2", 1, false).await, NO_DRAIN, "only the one asked");
    assert_eq!(worker("w1", 1, false).await, DRAIN);
    assert_eq!(
        worker("w1", 1, false).await,
        DRAIN,
        "told until it says it stops"
    );
    assert_eq!(worker("w1", 1, true).await, NO_DRAIN);
    let listed = store.members("worker", known).await.expect("members");
    assert!(!listed[0].drain_asked, "asked once, heard once");

    assert_eq!(ask("worker", "w1").await, DrainAsk::Asked);
    assert_eq!(
        worker("w1", 2, false).await,
        NO_DRAIN,
        "a restarted member is another run"
    );
    assert_eq!(
        worker("w1", 2, false).await,
        NO_DRAIN,
        "the request went with its run"
    );

    let heard = now - chrono::Duration::seconds(20);
    store
        .member_beat(&beat("worker", "w3", 1, false, heard))
        .await
        .expect("beat");
    assert_eq!(ask("worker", "w3").await, DrainAsk::Silent);
}

async fn a_heartbeat_older_than_the_one_recorded_is_left_out(store: &dyn ControlStore) {
    let now = Utc::now().trunc_subsecs(6);
    let at = |secs| now + chrono::Duration::seconds(secs);
    // A kind of its own, so that the listing holds this test's member alone.
    let kind = "ordering";
    let worker = async |id, run, stopping, heard| {
        store
            .member_beat(&beat(kind, id, run, stopping, heard))
            .await
            .expect("beat")
    };
    let last = async || {
        let listed = store.members(kind, at(-3600)).await.expect("members");
        let [m] = <[_; 1]>::try_from(listed).expect("one member");
        (m.beat, m.seen_at)
    };
    assert_eq!(worker("o1", 20, false, at(0)).await, NO_DRAIN);
    assert_eq!(
        worker("o1", 10, false, at(1)).await,
        Heard::EarlierRun,
        "an earlier run, while the later one is alive"
    );
    assert_eq!(last().await.1, at(0));
    assert_eq!(worker("o1", 20, false, at(2)).await, NO_DRAIN);
    assert_eq!(worker("o1", 20, true, at(3)).await, NO_DRAIN);
    assert_eq!(
        worker("o1", 20, false, at(4)).await,
        Heard::AfterStopping,
        "a beat of the run that arrived after it said it stops"
    );
    assert_eq!(last().await, (r#"{"state":"draining"}"#.to_string(), at(3)));
    assert_eq!(
        worker("o1", 30, false, at(5)).await,
        NO_DRAIN,
        "the next run"
    );
    assert_eq!(last().await, (r#"{"state":"running"}"#.to_string(), at(5)));
    assert_eq!(
        worker("o1", 20, false, at(60)).await,
        NO_DRAIN,
        "an earlier run once the one recorded went silent (a clock set back)"
    );
    assert_eq!(last().await.1, at(60));
}

async fn members_are_listed_counted_and_forgotten(store: &dyn ControlStore) {
    let now = Utc::now().trunc_subsecs(6);
    let ago = |secs| now - chrono::Duration::seconds(secs);
    for (id, at) in [("p2", now), ("p1", ago(30)), ("gone", ago(7200))] {
        store
            .member_beat(&beat("proxy", id, 1, false, at))
            .await
            .expect("beat");
    }
    let listed = store.members("proxy", ago(3600)).await.expect("members");
    let seen: Vec<_> = listed.iter().map(|m| m.seen_at).collect();
    assert_eq!(seen, [ago(30), now], "by id, the hour's only");
    assert_eq!(listed[0].beat, r#"{"state":"running"}"#);
    assert!(!listed[0].drain_asked);
    assert_eq!(
        store.members_seen("proxy", ago(15)).await.expect("count"),
        1
    );
    // The three workers of the drain test before this one.
    assert_eq!(
        store
            .members_seen("worker", ago(3600))
            .await
            .expect("count"),
        3
    );

    // The hour's silent go; past one per kind, those silent longest go.
    let pruned = store.prune_members(ago(3600), 1).await.expect("prune");
    assert_eq!(pruned, 1 + 1 + 2);
    let left = store.members("proxy", ago(86_400)).await.expect("members");
    assert_eq!(left.iter().map(|m| m.seen_at).collect::<Vec<_>>(), [now]);
    assert_eq!(
        store
            .members_seen("worker", ago(86_400))
            .await
            .expect("count"),
        1
    );
    assert_eq!(store.prune_members(ago(3600), 1).await.expect("prune"), 0);
}
