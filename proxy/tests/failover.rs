//! A proxy that knows two mitigation broker instances over one real Redis: when the one
//! it follows stops, it moves to the other with its cursor, and every change published
//! meanwhile reaches its cache without a snapshot (no full reload).

#![allow(clippy::unwrap_used)]
// `duplicate_mod`: the Redis helper and `support` both load `ports.rs`.
#![allow(clippy::duplicate_mod)]

#[path = "../../brokers/testing/redis_server.rs"]
mod redis_server;
mod support;

use std::time::Duration;

use esper_common::{Shutdown, ShutdownTrigger};
use esper_protocol::mitigation::RevokeRequest;
use esper_protocol::{Action, Mitigation, MitigationClient, Origin, Reason};
use support::{config, eventually, ingestion, start_proxy, status_from, upstream, wait_for_status};

const WITHIN: Duration = Duration::from_secs(5);

/// A mitigation broker instance on the shared Redis store named by `prefix`.
struct Instance {
    url: String,
    client: MitigationClient,
    trigger: ShutdownTrigger,
    broker: esper_mitigation::Broker,
}

impl Instance {
    async fn start(redis_url: &str, prefix: &str) -> Instance {
        let cfg = esper_mitigation::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            redis_url: Some(redis_url.to_string()),
            redis_prefix: prefix.to_string(),
            shutdown_timeout: Duration::from_secs(1),
            ..esper_mitigation::Config::default()
        };
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let broker = esper_mitigation::start(cfg, listener, shutdown)
            .await
            .unwrap();
        let url = format!("http://{}", broker.local_addr());
        Instance {
            client: MitigationClient::new(&url, None),
            url,
            trigger,
            broker,
        }
    }

    async fn stop(self) {
        self.trigger.trigger();
        self.broker.wait().await.unwrap();
    }
}

fn block(ip: &str) -> Mitigation {
    Mitigation::new(
        format!("ip:{ip}").parse().unwrap(),
        Action::Block,
        Duration::from_secs(600),
        Origin::Manual,
        Reason {
            policy_id: None,
            summary: "failover test".into(),
        },
    )
}

#[tokio::test]
async fn a_proxy_switches_broker_instances_and_resumes_its_cursor_without_a_reload() {
    let redis = redis_server::shared();
    let prefix = redis_server::unique_prefix("failover");
    let a = Instance::start(&redis.url(), &prefix).await;
    let b = Instance::start(&redis.url(), &prefix).await;
    let up = upstream().await;
    let events = ingestion().await;
    let list = format!("{}, {}", a.url, b.url);
    let proxy = start_proxy(config(up.addr, &events.url, &list)).await;

    let first = block("127.0.0.2");
    a.client.publish(vec![first.clone()]).await.unwrap();
    assert!(wait_for_status("127.0.0.2", &proxy.url, 403, WITHIN).await);
    assert_eq!(
        proxy.metric("esper_proxy_stream_snapshots_total").await,
        1.0
    );
    assert_eq!(
        proxy.metric("esper_proxy_stream_failovers_total").await,
        0.0
    );

    // A stops; changes go through B at once, before the proxy has noticed.
    a.stop().await;
    b.client.publish(vec![block("127.0.0.3")]).await.unwrap();
    b.client
        .revoke(&RevokeRequest {
            id: Some(first.id.clone()),
            entity: None,
        })
        .await
        .unwrap();
    assert!(
        wait_for_status("127.0.0.3", &proxy.url, 403, WITHIN).await,
        "a change published through B while switching is enforced"
    );
    assert!(
        wait_for_status("127.0.0.2", &proxy.url, 200, WITHIN).await,
        "a revoke published through B is applied"
    );
    assert_eq!(status_from("127.0.0.4", &proxy.url).await, 200);

    // And the stream keeps flowing from B.
    b.client.publish(vec![block("127.0.0.5")]).await.unwrap();
    assert!(wait_for_status("127.0.0.5", &proxy.url, 403, WITHIN).await);
    assert!(proxy.metric("esper_proxy_stream_failovers_total").await >= 1.0);
    assert_eq!(
        proxy.metric("esper_proxy_stream_snapshots_total").await,
        1.0,
        "no full reload after the switch"
    );
    let connected = eventually(WITHIN, || async {
        proxy.metric("esper_proxy_stream_connected").await == 1.0
    })
    .await;
    assert!(connected);
    proxy.stop().await.unwrap();
    b.stop().await;
    events.stop().await;
}
