//! The control store on PostgreSQL: the conformance suite, migrations under an advisory
//! lock when instances start together, `--no-migrations` and `migrate`, revision
//! announcements between instances, and two control planes over one database (their
//! policies and their fleet).

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use esper_control::store::{ControlStore, PolicyWrite, PostgresStore, suite};
use esper_control::{Config, Listeners};
use serde_json::json;
use support::postgres::shared;
use support::{Brokers, POLICIES, Stack, TempDir, eventually, worker_beat};

async fn migrated(url: &str) -> PostgresStore {
    let store = PostgresStore::connect(url, 4).await.unwrap();
    store.migrate().await.unwrap();
    store
}

#[tokio::test]
async fn postgres_store_passes_the_suite() {
    let url = shared().fresh_database().await;
    suite::run(Arc::new(migrated(&url).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_migrate_once() {
    let url = shared().fresh_database().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let store = PostgresStore::connect(&url, 1).await.unwrap();
            let applied = store.migrate().await.unwrap();
            store.close().await;
            applied
        }));
    }
    let mut applied = Vec::new();
    for t in tasks {
        applied.push(t.await.unwrap());
    }
    assert_eq!(
        applied.iter().filter(|a| !a.is_empty()).count(),
        1,
        "exactly one instance applies the migrations: {applied:?}"
    );
    let store = PostgresStore::connect(&url, 1).await.unwrap();
    assert!(store.pending_migrations().await.unwrap().is_empty());
    assert_eq!(store.revision().await.unwrap(), 0);
}

#[tokio::test]
async fn no_migrations_refuses_a_stale_schema_until_migrate_runs() {
    let url = shared().fresh_database().await;
    let cfg = Config {
        database_url: url.clone(),
        migrate: false,
        ..Config::default()
    };
    let (_trigger, shutdown) = esper_common::Shutdown::new();
    let started =
        esper_control::start(cfg.clone(), Listeners::loopback().await.unwrap(), shutdown).await;
    let Err(err) = started else {
        panic!("a server with --no-migrations must refuse an unmigrated database");
    };
    let err = err.to_string();
    assert!(err.contains("20260101000001 init"), "{err}");
    let applied = esper_control::migrate(&cfg).await.unwrap();
    assert_eq!(
        applied,
        [
            "20260101000001 init",
            "20260101000002 proxy config",
            "20260101000003 secrets",
            "20260101000004 secret rotation",
            "20260101000005 revocations",
            "20260101000006 decision retention",
            "20260101000007 token roles",
            "20260101000008 token last use",
            "20260101000009 members",
            "20260101000010 member stopping"
        ]
    );
    assert!(esper_control::migrate(&cfg).await.unwrap().is_empty());
}

/// A fresh database, reached through a relay the test can make refuse: the relay and
/// the URL through it.
async fn relayed_database() -> (support::relay::Relay, String) {
    let url = shared().fresh_database().await;
    let db_port = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap();
    let target = format!("127.0.0.1:{db_port}").parse().unwrap();
    let relay = support::relay::Relay::start(target).await;
    let through = url.replace(&format!("127.0.0.1:{db_port}"), &relay.addr.to_string());
    (relay, through)
}

#[tokio::test]
async fn a_database_gone_while_serving_is_reported_with_its_cause() {
    let (relay, through) = relayed_database().await;
    let store = migrated(&through).await;
    store.ping().await.unwrap();
    // The pool only knows it waited for a connection in vain; the reason is the one a
    // connection of its own meets.
    // The database's port closes, as a server that stopped: the pooled connections'
    // own ends come first, one a call, then new ones are refused.
    relay.set(support::relay::Mode::Refuse);
    drop(relay);
    let (mut err, mut started) = (String::new(), std::time::Instant::now());
    for _ in 0..10 {
        started = std::time::Instant::now();
        err = store.ping().await.unwrap_err().to_string();
        if !err.contains("Connection reset") {
            break;
        }
    }
    assert!(err.contains("cannot connect to the database: "), "{err}");
    assert!(err.contains("refused"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within readiness's bound"
    );
}

#[tokio::test]
async fn status_says_why_the_database_cannot_be_read() {
    let (relay, through) = relayed_database().await;
    let (i, m) = Brokers::down().await;
    let dir = TempDir::new();
    let cfg = Config {
        database_url: through,
        ..support::config(&dir, &i, &m)
    };
    let s = Stack::with_config(dir, cfg, None).await;
    let (status, body) = s.apply_toml(POLICIES).await;
    assert_eq!(status, 200, "{body}");
    let (_, st) = s.get("/api/v1/status").await;
    assert_eq!(st["server"]["store_reachable"], true, "{st}");
    assert!(st["server"].get("store_error").is_none(), "{st}");
    assert_eq!(st["policies"]["total"], 2);

    relay.set(support::relay::Mode::Refuse);
    drop(relay);
    // The pool's own connections end first, one a call.
    let mut st = serde_json::Value::Null;
    for _ in 0..50 {
        (_, st) = s.get("/api/v1/status").await;
        if st["server"]["store_reachable"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(st["server"]["store_reachable"], false, "{st}");
    let why = st["server"]["store_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("cannot connect to the database") && why.contains("refused"),
        "{st}"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_is_one_clear_error_without_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://esper:s3cret@127.0.0.1:{port}/esper");
    let err = PostgresStore::connect(&url, 1)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "cannot open the control store at postgres://esper:***@127.0.0.1:{port}/esper"
        )),
        "{err}"
    );
    assert!(!err.contains("s3cret"));
}

#[tokio::test]
async fn a_write_through_one_instance_moves_the_revision_of_every_instance() {
    let url = shared().fresh_database().await;
    let a = migrated(&url).await;
    let b = PostgresStore::connect(&url, 2).await.unwrap();
    assert_eq!(b.revision().await.unwrap(), 0);
    // From here on b answers from what it heard, not from the table: the loop below
    // only ends if the announcement of a's write reached it.
    eventually("b listens for revision changes", || async { b.listening() }).await;
    for round in 1..=3 {
        a.put_policies(
            vec![PolicyWrite {
                expected_version: None,
                id: "p".into(),
                enabled: true,
                mode: "enforce".into(),
                spec: json!({ "round": round }),
                change: "apply".into(),
                changed_by: "test".into(),
            }],
            None,
        )
        .await
        .unwrap();
        assert_eq!(a.revision().await.unwrap(), round);
        let started = std::time::Instant::now();
        while b.revision().await.unwrap() != round {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "instance b still at {} after a write through a",
                b.revision().await.unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    b.put_list("office", "ip", vec!["10.0.0.0/8".into()], None)
        .await
        .unwrap();
    eventually("a sees b's list change", || async {
        a.revision().await.unwrap() == 4
    })
    .await;
}

#[tokio::test]
async fn a_revision_written_without_an_announcement_is_caught_up_with() {
    let url = shared().fresh_database().await;
    let a = migrated(&url).await;
    let b = PostgresStore::connect(&url, 2).await.unwrap();
    eventually("b listens for revision changes", || async { b.listening() }).await;
    assert_eq!(b.revision().await.unwrap(), 0);
    // As if the announcement were lost on a listening connection that died silently.
    let raw = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("UPDATE counters SET value = 7 WHERE name = 'revision'")
        .execute(&raw)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while b.revision().await.unwrap() != 7 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "b still at {} without an announcement",
            b.revision().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    raw.close().await;
    drop(a);
}

#[tokio::test]
async fn two_control_planes_over_one_database_serve_each_others_writes() {
    let url = shared().fresh_database().await;
    let brokers = Brokers::start().await;
    let config = |dir: &TempDir| Config {
        database_url: url.clone(),
        ..support::config(dir, &brokers.ingestion_url, &brokers.mitigation_url)
    };
    let (dir_a, dir_b) = (TempDir::new(), TempDir::new());
    let (cfg_a, cfg_b) = (config(&dir_a), config(&dir_b));
    // Started together: both migrate, under the lock, without tripping over each other.
    let (a, b) = tokio::join!(
        Stack::with_config(dir_a, cfg_a, None),
        Stack::with_config(dir_b, cfg_b, None)
    );

    let (status, body) = a.apply_toml(POLICIES).await;
    assert_eq!(status, 200, "{body}");
    let (status, active) = b.get("/api/v1/policies/active").await;
    assert_eq!(status, 200);
    assert_eq!(active["policies"].as_array().unwrap().len(), 2);
    let rev = active["revision"].as_i64().unwrap();
    assert!(rev >= 1);

    let (status, _) = b
        .put(
            "/api/v1/lists/office",
            json!({"kind": "ip", "items": ["10.0.0.0/8"]}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, active) = a.get("/api/v1/policies/active").await;
    assert_eq!(active["lists"][0]["name"], "office");
    assert!(active["revision"].as_i64().unwrap() > rev);

    let (status, _) = a
        .post("/api/v1/policies/login-burst/disable", json!({}))
        .await;
    assert_eq!(status, 200);
    let (_, active) = b.get("/api/v1/policies/active").await;
    assert_eq!(active["policies"].as_array().unwrap().len(), 1);
    let (_, hist) = b.get("/api/v1/policies/login-burst/versions").await;
    assert_eq!(hist["versions"].as_array().unwrap().len(), 2);

    // The fleet is the store's: a worker that beats to a is listed by b, and a drain
    // asked through b reaches it through a, at every beat until it says it stops.
    let beat = worker_beat("w1");
    let (status, ack) = a.post("/api/v1/workers/heartbeat", beat.clone()).await;
    // `drain` is left out when false.
    let told = |ack: &serde_json::Value| ack["drain"].as_bool().unwrap_or(false);
    assert_eq!((status, told(&ack)), (200, false), "{ack}");
    let (_, listed) = b.get("/api/v1/workers").await;
    assert_eq!(listed["workers"][0]["worker_id"], "w1", "{listed}");
    assert_eq!(listed["workers"][0]["alive"], true);
    let (status, body) = b.post("/api/v1/workers/w1/drain", json!({})).await;
    assert_eq!(status, 202, "{body}");
    let (_, listed) = a.get("/api/v1/workers").await;
    assert_eq!(listed["workers"][0]["drain_asked"], true, "{listed}");
    for _ in 0..2 {
        let (status, ack) = a.post("/api/v1/workers/heartbeat", beat.clone()).await;
        assert_eq!((status, told(&ack)), (200, true), "{ack}");
    }
    let mut stopping = beat.clone();
    stopping["state"] = json!("draining");
    let (status, ack) = b.post("/api/v1/workers/heartbeat", stopping).await;
    assert_eq!((status, told(&ack)), (200, false), "{ack}");
    let (status, ack) = a.post("/api/v1/workers/heartbeat", beat).await;
    assert_eq!((status, told(&ack)), (200, false), "told and heard: {ack}");
    a.stop().await;
    b.stop().await;
    drop(brokers);
}
