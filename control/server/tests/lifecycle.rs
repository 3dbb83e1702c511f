//! Starting and stopping the control plane: migrations on a reused file, the generated
//! first token, `--no-migrations`, configuration errors and the shutdown endpoint.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use esper_common::Shutdown;
use esper_control::{Config, Error, Listeners};
use serde_json::json;
use support::{Brokers, Stack, TOKEN, TempDir, call, config};

#[tokio::test]
async fn a_second_start_on_the_same_file_keeps_everything() {
    // The store outlives both servers; each stack gets a scratch dir of its own.
    let dir = TempDir::new();
    let (i, m) = Brokers::down().await;
    let cfg = config(&dir, &i, &m);
    let first = Stack::with_config(TempDir::new(), cfg.clone(), None).await;
    let (status, _) = first.apply_toml(support::POLICIES).await;
    assert_eq!(status, 200);
    first.stop().await;
    let second = Stack::with_config(TempDir::new(), cfg.clone(), None).await;
    let (_, list) = second.get("/api/v1/policies").await;
    assert_eq!(list["policies"].as_array().unwrap().len(), 2, "{list}");
    second.stop().await;
    assert!(
        esper_control::migrate(&cfg).await.unwrap().is_empty(),
        "nothing left to migrate"
    );
}

#[tokio::test]
async fn the_first_start_generates_a_token_once() {
    let dir = TempDir::new();
    let (i, m) = Brokers::down().await;
    let mut cfg = config(&dir, &i, &m);
    cfg.admin_token = None;
    let (trigger, shutdown) = Shutdown::new();
    let started = esper_control::start(cfg.clone(), Listeners::loopback().await.unwrap(), shutdown)
        .await
        .unwrap();
    let token = started
        .generated_token
        .clone()
        .expect("a token on first start");
    let url = format!("http://{}/api/v1/status", started.api_addr);
    let http = reqwest::Client::new();
    let (status, _) = call(http.get(&url).bearer_auth(&token)).await;
    assert_eq!(status, 200);
    let (status, _) = call(http.get(&url).bearer_auth(TOKEN)).await;
    assert_eq!(status, 401, "no admin token configured");
    let (_, hist) = call(
        http.post(format!("http://{}/api/v1/policies", started.api_addr))
            .bearer_auth(&token)
            .header("content-type", "application/toml")
            .body(support::POLICIES),
    )
    .await;
    assert_eq!(hist["applied"][0]["version"], 1);
    let (_, v) = call(
        http.get(format!(
            "http://{}/api/v1/policies/login-burst/versions",
            started.api_addr
        ))
        .bearer_auth(&token),
    )
    .await;
    assert_eq!(
        v["versions"][0]["changed_by"], "initial",
        "stored tokens are known by name"
    );

    // With no admin token configured, the last stored admin token cannot be revoked:
    // nobody could manage the control plane after it.
    let tokens = format!("http://{}/api/v1/tokens", started.api_addr);
    let (status, body) = call(http.delete(format!("{tokens}/initial")).bearer_auth(&token)).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("last admin token")
    );
    let (status, created) = call(
        http.post(&tokens)
            .bearer_auth(&token)
            .json(&serde_json::json!({"name": "ops", "role": "admin"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["created_by"], "initial");
    let ops = created["token"].as_str().unwrap().to_string();
    let (status, _) = call(http.delete(format!("{tokens}/initial")).bearer_auth(&ops)).await;
    assert_eq!(status, 200, "another admin token is left");
    let (status, _) = call(http.get(&url).bearer_auth(&token)).await;
    assert_eq!(status, 401, "revoked");
    trigger.trigger();
    started.wait().await.unwrap();

    let (trigger, shutdown) = Shutdown::new();
    let again = esper_control::start(cfg, Listeners::loopback().await.unwrap(), shutdown)
        .await
        .unwrap();
    assert_eq!(again.generated_token, None, "a stored admin token exists");
    let (status, _) = call(
        http.get(format!("http://{}/api/v1/status", again.api_addr))
            .bearer_auth(&ops),
    )
    .await;
    assert_eq!(status, 200);
    trigger.trigger();
    again.wait().await.unwrap();
}

#[tokio::test]
async fn no_migrations_refuses_an_unmigrated_store() {
    let dir = TempDir::new();
    let (i, m) = Brokers::down().await;
    let mut cfg = config(&dir, &i, &m);
    cfg.migrate = false;
    let (_trigger, shutdown) = Shutdown::new();
    let err = esper_control::start(
        cfg.clone(),
        Listeners::loopback().await.unwrap(),
        shutdown.clone(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::PendingMigrations(_)), "{err}");
    assert!(
        err.to_string().contains("run `esper server migrate`"),
        "{err}"
    );
    let applied = esper_control::migrate(&cfg).await.unwrap();
    assert_eq!(applied.len(), 10, "{applied:?}");
    let started = esper_control::start(cfg, Listeners::loopback().await.unwrap(), shutdown).await;
    assert!(started.is_ok(), "migrated now");
}

#[tokio::test]
async fn invalid_config_is_one_clear_error() {
    let cfg = Config {
        database_url: "mysql://esper:pw@db/esper".into(),
        ..Config::default()
    };
    let (_trigger, shutdown) = Shutdown::new();
    let err = esper_control::start(cfg.clone(), Listeners::loopback().await.unwrap(), shutdown)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid database_url = `mysql://esper:***@db/esper`: expected a sqlite:// or postgres:// URL, e.g. sqlite://./.esper/esper.db?mode=rwc"
    );
    assert!(esper_control::migrate(&cfg).await.is_err());
}

#[tokio::test]
async fn the_shutdown_endpoint_stops_the_server() {
    let s = Stack::without_brokers().await;
    let (status, body) = s
        .post(
            "/api/v1/admin/shutdown",
            json!({"graceful": true, "timeout_secs": 5}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        body,
        json!({"shutting_down": true, "graceful": true, "timeout_secs": 5})
    );
    let mut s = s;
    let started = s.started.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), started.wait())
        .await
        .expect("the server stops by itself")
        .unwrap();
    let err = s.http.get(format!("{}/api/v1/status", s.api)).send().await;
    assert!(err.is_err(), "nothing listens any more");
}
