//! The control store conformance suite against SQLite (file and memory); the same suite
//! runs against PostgreSQL in `postgres.rs`, beside that store's own promises.

#![allow(clippy::unwrap_used)]

mod support;

use esper_control::store::{ControlStore, SqliteStore, suite};

#[tokio::test]
async fn sqlite_file_store_passes_the_suite() {
    let dir = support::TempDir::new();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("nested/esper.db").display()
    );
    let store = SqliteStore::connect(&url, 4).await.unwrap();
    suite::run(std::sync::Arc::new(store)).await;
}

#[tokio::test]
async fn sqlite_memory_store_passes_the_suite() {
    let store = SqliteStore::connect("sqlite::memory:", 4).await.unwrap();
    suite::run(std::sync::Arc::new(store)).await;
}

#[tokio::test]
async fn migrations_are_recorded_and_survive_a_reopen() {
    let dir = support::TempDir::new();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("esper.db").display()
    );
    let store = SqliteStore::connect(&url, 2).await.unwrap();
    assert!(!store.pending_migrations().await.unwrap().is_empty());
    let applied = store.migrate().await.unwrap();
    assert!(!applied.is_empty());
    store.close().await;
    let store = SqliteStore::connect(&url, 2).await.unwrap();
    assert!(store.pending_migrations().await.unwrap().is_empty());
    assert!(store.migrate().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unopenable_path_is_one_clear_error() {
    let dir = support::TempDir::new();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let url = format!("sqlite://{}?mode=rwc", file.join("esper.db").display());
    let err = SqliteStore::connect(&url, 1)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("cannot open the control store at sqlite://"),
        "{err}"
    );
    assert!(err.contains("cannot create directory"), "{err}");
}

fn policy_decision(id: &str, entity: &str) -> esper_protocol::Decision {
    let at = chrono::Utc::now() - chrono::Duration::seconds(5);
    serde_json::from_value(serde_json::json!({
        "id": id,
        "mitigation": {
            "id": id, "entity": entity, "action": {"type": "block"},
            "reason": {"policy_id": "login-burst", "summary": "12 >= 10 in 60s"},
            "origin": "policy", "created_at": at, "expires_at": at + chrono::Duration::minutes(10)
        },
        "mode": "enforce", "policy_id": "login-burst", "policy_version": 1,
        "counted": 12.0, "threshold": 10.0, "window_secs": 60,
        "decided_by": "worker-1", "decided_at": at
    }))
    .unwrap()
}

/// A row this version cannot read (dated before times were checked, or written by a
/// newer version over the same database) is skipped: the log and the workers' feed of
/// revocations go on past it.
#[tokio::test]
async fn an_unreadable_logged_decision_is_skipped_not_every_read_failed() {
    use esper_control::store::{DecisionQuery, RevokeTarget};
    let dir = support::TempDir::new();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("esper.db").display()
    );
    let store = SqliteStore::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    // "bad" is the newer, so it heads the log's newest-first pages.
    let good = policy_decision("good", "ip:192.0.2.2");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let decisions = [good, policy_decision("bad", "ip:192.0.2.1")];
    assert_eq!(store.record_decisions(&decisions).await.unwrap(), 2);
    let now = chrono::Utc::now();
    for id in ["bad", "good"] {
        let target = RevokeTarget::Id(id.into());
        assert_eq!(store.mark_revoked(&target, "ops", now).await.unwrap(), 1);
    }
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("UPDATE decisions SET revoked_at = '-0001-01-01T00:00:00.000000Z', body = '{' WHERE id = 'bad'")
        .execute(&pool)
        .await
        .unwrap();
    let feed = store.revocations(None, now, 10).await.unwrap();
    let ids: Vec<&str> = feed.revocations.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["good"]);
    let logged = store
        .query_decisions(&DecisionQuery {
            limit: 10,
            ..DecisionQuery::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = logged.iter().map(|d| d.decision.id.as_str()).collect();
    assert_eq!(ids, ["good"]);
    // A page of one is filled from past the unreadable row, not returned short (a
    // reader takes a short page for the last).
    let page = store
        .query_decisions(&DecisionQuery {
            limit: 1,
            ..DecisionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].decision.id, "good");
}
