//! Engine state backends side by side (`cargo bench -p esper-engine --bench state`):
//! events/s through evaluate + commit for one worker loop, with the memory state and
//! with the Redis state (a `redis-server` started on a free loopback port), on the same
//! traffic and the shipped policy library, in one run. Figures in benches/README.md.

#[path = "../../brokers/testing/redis_server.rs"]
mod redis_server;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use esper_engine::eval::{
    Evaluator, MemoryState, PolicySet, RedisState, RedisStateConfig, StateBackend,
};
use esper_engine::parse_policies;
use esper_protocol::RequestEvent;
use prometheus::Registry;

/// Ten minutes of mixed traffic from 5,000 addresses (a few busy), ending now.
fn traffic(n: usize) -> Vec<RequestEvent> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut below = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let end = Utc::now();
    (0..n)
        .map(|i| {
            let client = if below(10) == 0 {
                below(50)
            } else {
                below(5_000)
            };
            let ip = IpAddr::V4(Ipv4Addr::from(0xC633_0000u32 + client as u32));
            let (method, path, status) = match below(100) {
                0..=59 => ("GET", format!("/products/{}", below(2_000)), 200),
                60..=74 => ("GET", format!("/api/items/{}", below(100)), 200),
                75..=84 => (
                    "POST",
                    "/login".to_string(),
                    if below(3) == 0 { 401 } else { 302 },
                ),
                85..=94 => ("GET", format!("/wp-admin/{}.php", below(500)), 404),
                _ => ("POST", "/comment".to_string(), 200),
            };
            let mut ev = RequestEvent::new(ip, method, &path);
            ev.id = format!("e{i}");
            ev.status = status;
            ev.timestamp =
                end - chrono::Duration::milliseconds(((n - i) as i64 * 600_000) / n as i64);
            ev.host = "shop.example".into();
            ev.user_agent = Some("Mozilla/5.0".into());
            if path.starts_with("/api/") {
                ev.headers
                    .insert("x-api-key".into(), format!("k{}", below(200)));
            }
            if path == "/login" {
                ev.headers
                    .insert("x-login-user".into(), format!("user{}", below(5_000)));
            }
            ev
        })
        .collect()
}

/// The shipped policy library (conf/policies/*.toml).
fn library() -> PolicySet {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/policies");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let specs = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| parse_policies(&t).ok())
        .flatten()
        .collect();
    PolicySet::from_specs(1, specs)
}

/// Events per second through evaluate + commit in batches of `batch`, one loop.
async fn throughput(
    state: Arc<dyn StateBackend>,
    set: &PolicySet,
    events: &[RequestEvent],
    batch: usize,
) -> (f64, usize) {
    let eval = Evaluator::new(state, "bench", &Registry::new());
    let mut decisions = 0;
    let t = Instant::now();
    for chunk in events.chunks(batch) {
        let now: DateTime<Utc> = chunk.last().map_or_else(Utc::now, |e| e.timestamp);
        match eval.evaluate(set, chunk, now).await {
            Ok(out) => {
                decisions += out.decisions.len();
                if let Err(e) = eval.commit(&out, now).await {
                    eprintln!("commit failed: {e}");
                }
            }
            Err(e) => eprintln!("evaluate failed: {e}"),
        }
    }
    (events.len() as f64 / t.elapsed().as_secs_f64(), decisions)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50_000);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let server = redis_server::RedisServer::start();
    let set = library();
    let events = traffic(n);
    println!("{n} events, {} policies, one loop (one core)", set.len());
    println!("| backend | batch | events/s | decisions |");
    println!("|---|---:|---:|---:|");
    rt.block_on(async {
        for batch in [100, 500] {
            let memory: Arc<dyn StateBackend> =
                Arc::new(MemoryState::new(Duration::from_secs(3600), 10_000_000));
            let redis: Arc<dyn StateBackend> = match RedisState::connect(RedisStateConfig {
                url: server.url(),
                prefix: format!("bench{batch}"),
                ttl: Duration::from_secs(3600),
                lease: Duration::from_secs(30),
                capacity: 10_000_000,
            })
            .await
            {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    eprintln!("{e}");
                    return;
                }
            };
            for (name, state) in [("memory", memory), ("redis", redis)] {
                let (rate, decisions) = throughput(state, &set, &events, batch).await;
                println!("| {name} | {batch} | {rate:.0} | {decisions} |");
            }
        }
    });
}
