//! With a control URL set, the proxy shows up in the real control plane's proxy list
//! through its heartbeats.

mod support;

use std::time::Duration;

use esper_common::Shutdown;
use support::{client_from, config, dead_url, eventually, start_proxy, upstream};

const TOKEN: &str = "test-admin-token";

#[tokio::test]
async fn heartbeats_reach_the_control_plane() {
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listeners = esper_control::Listeners {
        api: bind().await.unwrap(),
        health: bind().await.unwrap(),
        metrics: bind().await.unwrap(),
    };
    let control_config = esper_control::Config {
        database_url: "sqlite::memory:".into(),
        admin_token: Some(TOKEN.into()),
        ingestion_url: dead_url(),
        mitigation_url: dead_url(),
        ..esper_control::Config::default()
    };
    let (control_trigger, control_shutdown) = Shutdown::new();
    let control = esper_control::start(control_config, listeners, control_shutdown)
        .await
        .unwrap();
    let control_url = format!("http://{}", control.api_addr);

    let up = upstream().await;
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.app = "shop".into();
    cfg.control_url = Some(control_url.clone());
    cfg.control_token = Some(TOKEN.into());
    cfg.heartbeat_interval = Duration::from_millis(100);
    let proxy = start_proxy(cfg).await;
    let resp = client_from("127.0.0.1")
        .get(format!("{}/", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let admin = reqwest::Client::new();
    let listed = eventually(Duration::from_secs(3), || async {
        let list: serde_json::Value = admin
            .get(format!("{control_url}/api/v1/proxies"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["proxies"].as_array().is_some_and(|ps| {
            ps.iter().any(|p| {
                p["proxy_id"] == "proxy-test"
                    && p["apps"] == serde_json::json!(["shop"])
                    && p["requests_total"] == 1
                    && p["stream_connected"] == false
            })
        })
    })
    .await;
    assert!(listed, "the proxy appears in /api/v1/proxies");

    proxy.stop().await.unwrap();
    control_trigger.trigger();
    control.wait().await.unwrap();
}
