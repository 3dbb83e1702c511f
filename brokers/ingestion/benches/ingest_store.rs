//! Ingest and drain throughput of the ingestion broker over HTTP, with the memory queue
//! and with the Redis Streams queue, side by side in one run. Not a test: run it with
//! `cargo bench -p esper-ingestion --bench ingest_store` (needs `redis-server` on PATH).
//! Figures and the machine they came from are in benches/README.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../testing/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use esper_common::shutdown::Shutdown;
use esper_ingestion::Config;
use esper_protocol::{IngestionClient, RequestEvent};
use tokio::net::TcpListener;

/// Events per ingest request (the proxy's default batch is 500).
const BATCH: usize = 500;
/// Producers posting at once.
const PRODUCERS: usize = 4;
/// Batches each producer posts.
const BATCHES_PER_PRODUCER: usize = 50;
/// Items per claim when draining (a worker's batch).
const CLAIM: usize = 500;

fn batch(producer: usize, n: usize) -> Vec<RequestEvent> {
    (0..BATCH)
        .map(|i| {
            let mut e = RequestEvent::new(
                [198, 51, 100, (i % 250) as u8].into(),
                "GET",
                &format!("/p{producer}/b{n}/e{i}"),
            );
            e.user_agent = Some("bench/1.0".into());
            e
        })
        .collect()
}

struct Figures {
    ingest_per_s: f64,
    drain_per_s: f64,
}

async fn run(config: Config) -> Figures {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let broker = esper_ingestion::start(config, listener, shutdown)
        .await
        .unwrap();
    let client = IngestionClient::new(&format!("http://{}", broker.local_addr()), None);
    let total = PRODUCERS * BATCHES_PER_PRODUCER * BATCH;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..BATCHES_PER_PRODUCER {
                client.ingest(batch(p, n)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ingest = started.elapsed();

    let started = Instant::now();
    let mut drained = 0;
    while drained < total {
        let claimed = client
            .claim("bench", CLAIM, Duration::from_secs(60), Duration::ZERO)
            .await
            .unwrap();
        let ids: Vec<String> = claimed.items.into_iter().map(|i| i.item_id).collect();
        drained += client.ack("bench", ids).await.unwrap().acked;
    }
    let drain = started.elapsed();
    trigger.trigger();
    broker.wait().await.unwrap();
    Figures {
        ingest_per_s: total as f64 / ingest.as_secs_f64(),
        drain_per_s: total as f64 / drain.as_secs_f64(),
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = redis_server::RedisServer::start();
    let base = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_queue_size: 1_000_000,
        batch_timeout: Duration::ZERO,
        ..Config::default()
    };
    let total = PRODUCERS * BATCHES_PER_PRODUCER * BATCH;
    println!(
        "{total} events: {PRODUCERS} producers x {BATCHES_PER_PRODUCER} batches of {BATCH}; \
         drained by one consumer claiming {CLAIM} at a time (claim + ack)"
    );
    println!("| store | ingest events/s | drain events/s |");
    println!("|---|---:|---:|");
    for (name, config) in [
        ("memory", base.clone()),
        (
            "redis",
            Config {
                redis_url: Some(redis.url()),
                redis_prefix: "bench".into(),
                ..base.clone()
            },
        ),
    ] {
        let f = runtime.block_on(run(config));
        println!("| {name} | {:.0} | {:.0} |", f.ingest_per_s, f.drain_per_s);
    }
}
