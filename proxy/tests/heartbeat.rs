//! With a control URL set, the proxy shows up in the real control plane's proxy list
//! through its heartbeats.

mod support;

use std::time::Duration;

use support::{
    CONTROL_TOKEN as TOKEN, client_from, config, control_plane, dead_url, eventually, start_proxy,
    upstream,
};

#[tokio::test]
async fn heartbeats_reach_the_control_plane() {
    let control = control_plane().await;
    let control_url = control.url.clone();

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
    // The control plane's list of proxies.
    let proxies = || async {
        let list: serde_json::Value = admin
            .get(format!("{control_url}/api/v1/proxies"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["proxies"].clone()
    };
    let listed = eventually(Duration::from_secs(3), || async {
        let list = proxies().await;
        list.as_array().is_some_and(|ps| {
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

    // Which of the control plane's challenge keys it signs with, before and after a
    // rotation.
    let key_revision = || async { proxies().await[0]["challenge_key_revision"].as_i64() };
    let first = eventually(Duration::from_secs(3), || async {
        key_revision().await == Some(1)
    })
    .await;
    assert!(first, "the control plane's first key signs");
    let rotated = admin
        .post(format!("{control_url}/api/v1/proxies/challenge-key/rotate"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200);
    let second = eventually(Duration::from_secs(3), || async {
        key_revision().await == Some(2)
    })
    .await;
    assert!(second, "the rotated key signs, as the heartbeat shows");
    assert_eq!(
        proxy.metric("esper_proxy_challenge_key_revision").await,
        2.0
    );

    // And the revision of the control plane's configuration it runs.
    let put = admin
        .put(format!("{control_url}/api/v1/proxies/config"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"config": "allow_paths = [\"/health\"]"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let configured = eventually(Duration::from_secs(3), || async {
        proxies().await[0]["config_revision"] == 1
    })
    .await;
    assert!(
        configured,
        "the heartbeat carries the configuration's revision"
    );

    proxy.stop().await.unwrap();
    control.stop().await;
}
