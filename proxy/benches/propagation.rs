//! Decision-to-proxy propagation: the time from a publish call returning at the
//! mitigation broker to each proxy following its delta stream enforcing the decision,
//! with 1 and 4 esper-proxy instances, the broker's memory store beside its Redis store
//! in the same run. Not a test: run it with
//! `cargo bench -p esper-proxy --bench propagation` (needs `redis-server` on PATH).
//! Figures and the machine they came from are in benches/README.md.
//!
//! Each trial bans a fresh client address; a poller per proxy sends `GET /` from that
//! address every 0.5 ms and stops at the first 403. What is measured is publish-return
//! to first 403 per proxy (0 when a proxy enforced before the publisher had read the
//! broker's answer), so it includes up to one poll interval and the loopback HTTP
//! round trip of the poll.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../brokers/testing/redis_server.rs"]
mod redis_server;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use esper_common::{Shutdown, ShutdownTrigger};
use esper_protocol::{Action, Mitigation, MitigationClient, Origin, Reason};
use esper_proxy::{Config, Listeners, ProxyHandle};

/// Bans per configuration.
const TRIALS: usize = 50;
/// Proxy counts compared.
const PROXIES: [usize; 2] = [1, 4];
/// Between two polls of one proxy.
const POLL: Duration = Duration::from_micros(500);
/// A trial that takes longer than this is a failure of the run.
const GIVE_UP: Duration = Duration::from_secs(10);

/// An upstream that answers 200 to everything.
async fn upstream(shutdown: Shutdown) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move {
        axum::serve(l, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
            .ok();
    });
    addr
}

async fn proxy(
    upstream: std::net::SocketAddr,
    ingestion: &str,
    mitigation: &str,
    shutdown: Shutdown,
) -> (ProxyHandle, String) {
    let config = Config {
        upstream: upstream.to_string(),
        ingestion_url: ingestion.to_string(),
        mitigation_url: mitigation.to_string(),
        proxy_id: "bench".into(),
        threads: 1,
        ..Config::default()
    };
    let listeners = Listeners {
        traffic: Some(std::net::TcpListener::bind("127.0.0.1:0").unwrap()),
        tls: None,
        ops: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
    };
    let handle = esper_proxy::start(config, listeners, shutdown)
        .await
        .unwrap();
    let url = format!("http://{}/", handle.traffic_addr());
    (handle, url)
}

fn client_from(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Polls `url` from `ip` until it answers 403; returns when.
async fn first_block(ip: IpAddr, url: String) -> Instant {
    let client = client_from(ip);
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(&url).send().await
            && r.status().as_u16() == 403
        {
            return Instant::now();
        }
        assert!(
            started.elapsed() < GIVE_UP,
            "no proxy enforcement after {GIVE_UP:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn ban(ip: IpAddr) -> Mitigation {
    Mitigation::new(
        format!("ip:{ip}").parse().unwrap(),
        Action::Block,
        Duration::from_secs(600),
        Origin::Manual,
        Reason {
            policy_id: None,
            summary: "propagation bench".into(),
        },
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// One configuration: a broker over `store`, `n` proxies; every proxy's delay per trial.
async fn run(store: esper_mitigation::Config, n: usize, first_ip: u32) -> Vec<Duration> {
    let (trigger, shutdown): (ShutdownTrigger, Shutdown) = Shutdown::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker = esper_mitigation::start(store, listener, shutdown.clone())
        .await
        .unwrap();
    let mitigation_url = format!("http://{}", broker.local_addr());
    let ingestion = esper_ingestion::start(
        esper_ingestion::Config::default(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let ingestion_url = format!("http://{}", ingestion.local_addr());
    let up = upstream(shutdown.clone()).await;
    let mut proxies = Vec::new();
    for _ in 0..n {
        proxies.push(proxy(up, &ingestion_url, &mitigation_url, shutdown.clone()).await);
    }
    // Every proxy has followed the stream (its first snapshot) before the first trial.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publisher = MitigationClient::new(&mitigation_url, None);

    let mut delays = Vec::new();
    for t in 0..TRIALS {
        let ip = IpAddr::V4(Ipv4Addr::from(first_ip + t as u32));
        let pollers: Vec<_> = proxies
            .iter()
            .map(|(_, url)| tokio::spawn(first_block(ip, url.clone())))
            .collect();
        publisher.publish(vec![ban(ip)]).await.unwrap();
        let returned = Instant::now();
        // A proxy may enforce before the publisher has read the broker's answer: 0.
        for p in pollers {
            delays.push(p.await.unwrap().saturating_duration_since(returned));
        }
    }
    trigger.trigger();
    for (handle, _) in proxies {
        handle.wait().await.ok();
    }
    broker.wait().await.ok();
    ingestion.wait().await.ok();
    delays
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = redis_server::RedisServer::start();
    let base = esper_mitigation::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..esper_mitigation::Config::default()
    };
    println!(
        "{TRIALS} bans per row; a poller per proxy every {POLL:?}; publish returned -> first 403"
    );
    println!("| store | proxies | samples | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    // 127.1.0.0 onwards: loopback addresses no other row uses.
    let mut first_ip = u32::from(Ipv4Addr::new(127, 1, 0, 1));
    for n in PROXIES {
        for (name, store) in [
            ("memory", base.clone()),
            (
                "redis",
                esper_mitigation::Config {
                    redis_url: Some(redis.url()),
                    redis_prefix: format!("bench-{n}"),
                    ..base.clone()
                },
            ),
        ] {
            let mut d = runtime.block_on(run(store, n, first_ip));
            first_ip += TRIALS as u32;
            d.sort();
            println!(
                "| {name} | {n} | {} | {} | {} | {} | {} |",
                d.len(),
                ms(percentile(&d, 0.5)),
                ms(percentile(&d, 0.9)),
                ms(percentile(&d, 0.99)),
                ms(*d.last().unwrap()),
            );
        }
    }
}
