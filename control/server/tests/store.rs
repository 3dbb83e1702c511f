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
