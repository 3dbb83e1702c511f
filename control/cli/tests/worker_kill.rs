//! No event is lost when a worker dies: `esper worker run engine` (the real binary,
//! Redis state) is killed with SIGKILL while its batch is applied to the state and its
//! publish is stuck; after the lease a second worker gets the items back, the dead
//! batch's counts are undone, and the decisions carry exactly the counts of one pass.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use esper_common::shutdown::Shutdown;
use esper_protocol::{IngestionClient, MitigationClient, RequestEvent};
use support::redis_server;
use support::relay::{Mode, Relay};
use support::*;
use tokio::net::TcpListener;

const POLICY: &str = r#"
[[policy]]
id = "login-brute-force"
entity = "ip"
window = "5m"
threshold = 10
action = "block"
ttl = "10m"
[policy.match]
methods = ["POST"]
paths = ["/login"]
statuses = [401]
[[policy.escalation]]
threshold = 20
action = "block"
ttl = "30m"
"#;

/// Real brokers in this process, each on its own loopback port, until `shutdown`: the
/// ingestion broker's URL and the mitigation broker's address.
async fn brokers(shutdown: &Shutdown) -> (String, SocketAddr) {
    let ing_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ing_url = format!("http://{}", ing_l.local_addr().unwrap());
    let ing_cfg = esper_ingestion::Config {
        listen: ing_l.local_addr().unwrap(),
        batch_timeout: Duration::ZERO,
        ..esper_ingestion::Config::default()
    };
    tokio::spawn(esper_ingestion::run(ing_cfg, ing_l, shutdown.clone()));
    let mit_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mit_addr = mit_l.local_addr().unwrap();
    let mit_cfg = esper_mitigation::Config {
        listen: mit_addr,
        ..esper_mitigation::Config::default()
    };
    tokio::spawn(esper_mitigation::run(mit_cfg, mit_l, shutdown.clone()));
    (ing_url, mit_addr)
}

/// Kills `worker` with SIGKILL and waits (at most 5 s) until it is gone.
async fn kill(worker: &mut Proc) {
    std::process::Command::new("kill")
        .args(["-KILL", &worker.child_id().to_string()])
        .status()
        .unwrap();
    for _ in 0..100 {
        if worker.try_exit().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} is still there after SIGKILL", worker.name);
}

fn failed_logins(ip: &str, n: usize, tag: &str) -> Vec<RequestEvent> {
    (0..n)
        .map(|i| {
            let mut e = RequestEvent::new(ip.parse().unwrap(), "POST", "/login");
            e.status = 401;
            e.id = format!("{tag}-{ip}-{i}");
            e
        })
        .collect()
}

/// A worker over the Redis state; `source` is where its policies come from
/// (`["--policies", FILE, "--control-url", ""]` or `["--control-url", URL]`).
fn worker_args(
    id: &str,
    ingestion: &str,
    mitigation: &str,
    source: &[&str],
    redis: &str,
) -> Vec<String> {
    [
        "worker",
        "run",
        "engine",
        "--worker-id",
        id,
        "--concurrency",
        "1",
        "--batch-size",
        "100",
        "--lease",
        "2s",
        "--state-backend",
        "redis",
        "--state-redis-url",
        redis,
        "--ingestion-url",
        ingestion,
        "--mitigation-url",
        mitigation,
        "--evaluation-timeout",
        "1s",
    ]
    .iter()
    .chain(source)
    .map(|s| s.to_string())
    .chain(["--listen".to_string(), free_addr().to_string()])
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_no_event_and_counts_none_twice() {
    let redis = redis_server::shared();
    let prefix = redis_server::unique_prefix("kill").replace('-', "_");
    let env = [("ESPER_STATE_KEY_PREFIX", prefix)];

    let (_trigger, shutdown) = Shutdown::new();
    let (ing_url, mit_addr) = brokers(&shutdown).await;
    let relay = Relay::start(mit_addr).await;
    relay.set(Mode::Stall);
    let relay_url = relay.url();

    let dir = TempDir::new("kill");
    let policies = dir.path().join("policies.toml");
    std::fs::write(&policies, POLICY).unwrap();
    let policies = policies.to_string_lossy().to_string();
    let from_file = ["--policies", &policies, "--control-url", ""];

    // 25 failed logins from .2 (over both rungs), 9 from .3 (under the threshold).
    let ingest = IngestionClient::new(&ing_url, None);
    let mut events = failed_logins("10.0.0.2", 25, "a");
    events.extend(failed_logins("10.0.0.3", 9, "b"));
    ingest.ingest(events).await.unwrap();

    // The first worker publishes through the stalled relay: its batch is applied to
    // the Redis state, its publish hangs, and it is killed right then.
    let mut first = Proc::esper(
        "worker-a",
        &worker_args("worker-a", &ing_url, &relay_url, &from_file, &redis.url()),
        &env.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>(),
    );
    eventually(
        Duration::from_secs(20),
        "a publish stuck in the relay",
        || async { relay.stalled_request_seen().then_some(()) },
    )
    .await;
    let status = ingest.status().await.unwrap();
    assert_eq!((status.leased, status.acked_total), (34, 0), "{status:?}");
    kill(&mut first).await;
    assert!(
        first.log().contains("engine worker started"),
        "{}",
        first.log()
    );

    // A second worker, straight to the broker, gets the items back after the lease.
    let ops = free_addr();
    let mut args = worker_args(
        "worker-b",
        &ing_url,
        &format!("http://{mit_addr}"),
        &from_file,
        &redis.url(),
    );
    args.pop();
    args.push(ops.to_string());
    let _second = Proc::esper(
        "worker-b",
        &args,
        &env.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>(),
    );
    eventually(
        Duration::from_secs(20),
        "every item acknowledged",
        || async {
            let s = ingest.status().await.ok()?;
            (s.depth == 0 && s.leased == 0 && s.acked_total == 34).then_some(())
        },
    )
    .await;

    // Exactly the decisions of one pass over the 25 events: at 10 and at 20, not at
    // 35 and 45 (counted twice), and none missing (lost with the dead worker).
    let active = MitigationClient::new(&format!("http://{mit_addr}"), None)
        .active(None)
        .await
        .unwrap();
    let mut decided: Vec<(String, String)> = active
        .mitigations
        .iter()
        .map(|m| {
            let counted = m.reason.summary.split(' ').next().unwrap_or("").to_string();
            (m.entity.to_string(), counted)
        })
        .collect();
    decided.sort();
    assert_eq!(
        decided,
        vec![
            ("ip:10.0.0.2".to_string(), "10".to_string()),
            ("ip:10.0.0.2".to_string(), "20".to_string())
        ],
        "{active:?}"
    );
    let metrics = reqwest::get(format!("http://{ops}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(sample("esper_events_evaluated_total"), 34.0, "{metrics}");
    assert_eq!(sample("esper_duplicate_events_total"), 0.0, "{metrics}");
}

const CONTROL_TOKEN: &str = "kill-test-token-0123456789";

/// A control plane in this process on loopback ports, its store the SQLite file in
/// `dir`: its API's URL, and the trigger and task that stop it.
async fn control_plane(
    dir: &TempDir,
    ingestion: &str,
    mitigation: &str,
) -> (
    String,
    esper_common::shutdown::ShutdownTrigger,
    tokio::task::JoinHandle<Result<(), esper_control::Error>>,
) {
    let config = esper_control::Config {
        database_url: format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("esper.db").display()
        ),
        ingestion_url: ingestion.to_string(),
        mitigation_url: mitigation.to_string(),
        admin_token: Some(CONTROL_TOKEN.to_string()),
        shutdown_timeout: Duration::from_secs(2),
        ..esper_control::Config::default()
    };
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let (metrics, health, api) = (
        listeners.pop().unwrap(),
        listeners.pop().unwrap(),
        listeners.pop().unwrap(),
    );
    let (trigger, shutdown) = Shutdown::new();
    let started = esper_control::start(
        config,
        esper_control::Listeners {
            api,
            health,
            metrics,
        },
        shutdown,
    )
    .await
    .unwrap();
    let url = format!("http://{}", started.api_addr);
    (url, trigger, tokio::spawn(started.wait()))
}

async fn ops_sample(ops: SocketAddr, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{ops}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// The binary's worker, over Redis state, with its control plane away: the decision it
/// makes is committed with its batch into Redis, so a SIGKILL loses its record, and a
/// worker started later over the same Redis delivers it to the control plane's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_the_control_plane_is_away_loses_no_decision_record() {
    let redis = redis_server::shared();
    let prefix = redis_server::unique_prefix("killlog").replace('-', "_");
    let env = [
        ("ESPER_STATE_KEY_PREFIX", prefix),
        ("ESPER_CONTROL_TOKEN", CONTROL_TOKEN.to_string()),
    ];
    let (_trigger, shutdown) = Shutdown::new();
    let (ing_url, mit_addr) = brokers(&shutdown).await;
    let mit_url = format!("http://{mit_addr}");
    let dir = TempDir::new("killlog");

    let (ctl, stop_ctl, ctl_task) = control_plane(&dir, &ing_url, &mit_url).await;
    let resp = reqwest::Client::new()
        .post(format!("{ctl}/api/v1/policies"))
        .bearer_auth(CONTROL_TOKEN)
        .header("content-type", "application/toml")
        .body(POLICY)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let mut args = worker_args(
        "worker-a",
        &ing_url,
        &mit_url,
        &["--control-url", &ctl],
        &redis.url(),
    );
    let ops: SocketAddr = args.last().unwrap().parse().unwrap();
    let mut first = Proc::esper("worker-a", &args, &env);
    eventually(Duration::from_secs(20), "policies loaded", || async {
        (ops_sample(ops, "esper_policies_loaded").await? == 1.0).then_some(())
    })
    .await;
    stop_ctl.trigger();
    ctl_task.await.unwrap().unwrap();

    IngestionClient::new(&ing_url, None)
        .ingest(failed_logins("10.0.0.2", 10, "c"))
        .await
        .unwrap();
    let mitigations = MitigationClient::new(&mit_url, None);
    eventually(Duration::from_secs(20), "the block published", || async {
        (mitigations.active(None).await.ok()?.total == 1).then_some(())
    })
    .await;
    eventually(Duration::from_secs(20), "its record committed", || async {
        (ops_sample(ops, "esper_decisions_pending").await? == 1.0).then_some(())
    })
    .await;
    kill(&mut first).await;

    // Back on the same store; a second worker over the same Redis delivers the record
    // (within the lease, should the dead worker have held it).
    let (ctl, stop_ctl, ctl_task) = control_plane(&dir, &ing_url, &mit_url).await;
    args = worker_args(
        "worker-b",
        &ing_url,
        &mit_url,
        &["--control-url", &ctl],
        &redis.url(),
    );
    let mut second = Proc::esper("worker-b", &args, &env);
    let http = reqwest::Client::new();
    let logged: serde_json::Value =
        eventually(Duration::from_secs(45), "the record in the log", || async {
            let log: serde_json::Value = http
                .get(format!("{ctl}/api/v1/decisions"))
                .bearer_auth(CONTROL_TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (log["decisions"].as_array()?.len() == 1).then_some(log)
        })
        .await;
    let decision = &logged["decisions"][0]["decision"];
    assert_eq!(decision["decided_by"], "worker-a", "{logged}");
    assert_eq!(decision["mitigation"]["entity"], "ip:10.0.0.2", "{logged}");
    assert_eq!(decision["policy_id"], "login-brute-force", "{logged}");
    second.terminate(Duration::from_secs(10));
    stop_ctl.trigger();
    ctl_task.await.unwrap().unwrap();
}
