//! The engine worker following a real control plane: policies and lists from
//! `/api/v1/policies/active`, decisions into the decision log, heartbeats into the fleet
//! view.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use esper_control::{DecisionsResponse, WorkersResponse};
use esper_engine::worker::Config;
use esper_protocol::{DecisionMode, RequestEvent};
use reqwest::Method;
use support::*;

const POLICIES: &str = r#"
[[policy]]
id = "login-brute-force"
window = "60s"
threshold = 10
action = "block"
[policy.match]
methods = ["POST"]
paths = ["/login"]
statuses = [401]
ip_not_in_list = "office"

[[policy]]
id = "scrapers"
mode = "shadow"
entity = "ip/24"
window = "60s"
threshold = 5
action = "throttle"
rate = 1
[policy.match]
path_prefixes = ["/login"]
"#;

fn config(control: &str, ingestion: &str, mitigation: &str) -> Config {
    Config {
        worker_id: "worker-ctl".into(),
        concurrency: 2,
        claim_wait: Duration::from_millis(200),
        ingestion_url: ingestion.into(),
        mitigation_url: mitigation.into(),
        control_url: control.into(),
        control_token: Some(CONTROL_TOKEN.into()),
        policy_refresh: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(200),
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_from_the_control_plane_decisions_into_its_log() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control");
    let ctl = control(&dir, &ing.url(), &mit.url()).await;
    let api = ctl.url();

    let resp = control_request(Method::PUT, format!("{api}/api/v1/lists/office"))
        .json(&serde_json::json!({"kind": "ip", "items": ["192.0.2.0/24"]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let resp = control_request(Method::POST, format!("{api}/api/v1/policies"))
        .header("content-type", "application/toml")
        .body(POLICIES)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());

    let worker = worker(config(&api, &ing.url(), &mit.url())).await;
    let ops = worker.url();
    eventually(Duration::from_secs(10), "policies loaded", || async {
        (sample(&metrics(&ops).await, "esper_policies_loaded") == 2.0).then_some(())
    })
    .await;

    // .2 is blocked; the office address is not, however often it fails; both /24s
    // cross the shadow policy's threshold, which only records its decisions.
    let (ingest, mitigations) = clients(&ing.url(), &mit.url());
    let mut events: Vec<RequestEvent> = logins("127.0.0.2", 10);
    events.extend(logins("192.0.2.10", 12));
    ingest.ingest(events).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;
    let active = mitigations.active(None).await.unwrap();
    assert_eq!(active.total, 1, "{active:?}");
    assert_eq!(
        active.mitigations[0].entity,
        "ip:127.0.0.2".parse().unwrap()
    );

    let log: DecisionsResponse =
        eventually(Duration::from_secs(10), "3 logged decisions", || async {
            let log: DecisionsResponse =
                control_request(Method::GET, format!("{api}/api/v1/decisions"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
            (log.decisions.len() == 3).then_some(log)
        })
        .await;
    let mut seen: Vec<(String, String, DecisionMode, Option<i64>)> = log
        .decisions
        .iter()
        .map(|l| {
            let d = &l.decision;
            assert_eq!(d.decided_by, "worker-ctl");
            (
                d.policy_id.clone().unwrap(),
                d.mitigation.entity.to_string(),
                d.mode,
                d.policy_version,
            )
        })
        .collect();
    seen.sort_by(|a, b| a.1.cmp(&b.1));
    let expected = [
        ("scrapers", "cidr:127.0.0.0/24", DecisionMode::Shadow),
        ("scrapers", "cidr:192.0.2.0/24", DecisionMode::Shadow),
        ("login-brute-force", "ip:127.0.0.2", DecisionMode::Enforce),
    ];
    assert_eq!(seen.len(), expected.len());
    for ((policy, entity, mode, version), (p, e, m)) in seen.iter().zip(expected) {
        assert_eq!((policy.as_str(), entity.as_str(), *mode), (p, e, m));
        assert!(version.is_some_and(|v| v >= 1), "{version:?}");
    }
    let text = metrics(&ops).await;
    assert_eq!(
        sample(
            &text,
            r#"esper_would_have_mitigated_total{policy="scrapers"}"#
        ),
        2.0
    );

    // The worker shows up in the fleet view.
    let workers: WorkersResponse = control_request(Method::GET, format!("{api}/api/v1/workers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let me = workers
        .workers
        .iter()
        .find(|w| w.beat.worker_id == "worker-ctl")
        .expect("the worker's heartbeat is recorded");
    assert_eq!(me.beat.state_backend, "memory");
    assert!(me.beat.policies_revision >= 2);

    // Disabling a policy reaches the worker.
    let resp = control_request(
        Method::POST,
        format!("{api}/api/v1/policies/scrapers/disable"),
    )
    .send()
    .await
    .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    eventually(Duration::from_secs(10), "one policy loaded", || async {
        (sample(&metrics(&ops).await, "esper_policies_loaded") == 1.0).then_some(())
    })
    .await;

    worker.stop().await.unwrap();
    ctl.stop().await.unwrap();
    ing.stop().await.unwrap();
    mit.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_follows_a_control_plane_over_tls_with_a_private_ca() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("control-tls");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (crt, key) = (dir.0.join("api.crt"), dir.0.join("api.key"));
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.key_pair.serialize_pem()).unwrap();
    let ctl = control_with(esper_control::Config {
        tls: true,
        tls_cert: Some(crt.clone()),
        tls_key: Some(key),
        ..control_config(&dir, &ing.url(), &mit.url())
    })
    .await;
    let api = format!("https://{}", ctl.addr);
    let ca = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    let resp = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap()
        .post(format!("{api}/api/v1/policies"))
        .bearer_auth(CONTROL_TOKEN)
        .header("content-type", "application/toml")
        .body(LOGIN_POLICY)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());

    let worker = worker(Config {
        ca_cert: Some(crt),
        ..config(&api, &ing.url(), &mit.url())
    })
    .await;
    let ops = worker.url();
    eventually(
        Duration::from_secs(10),
        "policies loaded over TLS",
        || async { (sample(&metrics(&ops).await, "esper_policies_loaded") == 1.0).then_some(()) },
    )
    .await;

    // A CA file that is not there stops the start with an error naming it.
    let missing = dir.0.join("missing.pem");
    let (_trigger, shutdown) = esper_common::Shutdown::new();
    let err = esper_engine::worker::run(
        Config {
            ca_cert: Some(missing),
            ..config(&api, &ing.url(), &mit.url())
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        shutdown,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("ca_cert") && err.contains("missing.pem"),
        "{err}"
    );
}
