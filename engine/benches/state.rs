//! Engine state backends side by side (`cargo bench -p esper-engine --bench state`):
//! events/s through evaluate + commit for one worker loop, with the memory state, the
//! Redis state (a `redis-server` started on a free loopback port) and the PostgreSQL
//! state (a throwaway cluster from `initdb`, also on a free loopback port), on the same
//! traffic and the shipped policy library, in one run. Every backend must make the
//! same decisions as memory; the program exits non-zero when one does not. Figures in
//! benches/README.md.

// Both helpers load `ports.rs` (a few copies of one function).
#![allow(clippy::duplicate_mod)]

#[path = "../../brokers/testing/redis_server.rs"]
mod redis_server;

#[path = "../../control/server/tests/support/postgres.rs"]
mod postgres;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use esper_engine::eval::{
    Evaluator, MemoryState, PolicySet, PostgresState, PostgresStateConfig, RedisState,
    RedisStateConfig, StateBackend,
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

/// What a run decided: (policy, entity, counted value), sorted.
type Decisions = Vec<(String, String, String)>;

/// Events per second through evaluate + commit in batches of `batch`, one loop, and
/// the decisions made; `None` when a step failed.
async fn throughput(
    state: Arc<dyn StateBackend>,
    set: &PolicySet,
    events: &[RequestEvent],
    batch: usize,
) -> Option<(f64, Decisions)> {
    let eval = Evaluator::new(state, "bench", &Registry::new());
    let mut decisions = Vec::new();
    let t = Instant::now();
    for chunk in events.chunks(batch) {
        let now: DateTime<Utc> = chunk.last().map_or_else(Utc::now, |e| e.timestamp);
        let out = match eval.evaluate(set, chunk, now).await {
            Ok(out) => out,
            Err(e) => {
                eprintln!("evaluate failed: {e}");
                return None;
            }
        };
        if let Err(e) = eval.commit(&out, now).await {
            eprintln!("commit failed: {e}");
            return None;
        }
        decisions.extend(out.decisions.iter().map(|d| {
            (
                d.policy_id.clone().unwrap_or_default(),
                d.mitigation.entity.to_string(),
                d.counted.map_or_else(String::new, |c| c.to_string()),
            )
        }));
    }
    let rate = events.len() as f64 / t.elapsed().as_secs_f64();
    decisions.sort();
    Some((rate, decisions))
}

/// A backend for one measured run; `None` (after saying why) when it cannot start.
async fn backend(
    name: &str,
    batch: usize,
    redis: &redis_server::RedisServer,
    pg: &postgres::PgServer,
) -> Option<Arc<dyn StateBackend>> {
    let ttl = Duration::from_secs(3600);
    let lease = Duration::from_secs(30);
    let capacity = 10_000_000;
    let state: Result<Arc<dyn StateBackend>, _> = match name {
        "memory" => Ok(Arc::new(MemoryState::new(ttl, capacity))),
        "redis" => RedisState::connect(RedisStateConfig {
            url: redis.url(),
            prefix: format!("bench{batch}"),
            ttl,
            lease,
            capacity,
        })
        .await
        .map(|s| Arc::new(s) as Arc<dyn StateBackend>),
        _ => PostgresState::connect(PostgresStateConfig {
            url: pg.fresh_database().await,
            pool_size: 4,
            ttl,
            lease,
            capacity,
        })
        .await
        .map(|s| Arc::new(s) as Arc<dyn StateBackend>),
    };
    state.map_err(|e| eprintln!("{name}: {e}")).ok()
}

fn main() -> std::process::ExitCode {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50_000);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return std::process::ExitCode::FAILURE;
    };
    let redis = redis_server::RedisServer::start();
    let pg = postgres::shared();
    let set = library();
    let events = traffic(n);
    println!("{n} events, {} policies, one loop (one core)", set.len());
    println!("| backend | batch | events/s | x slower than memory | decisions |");
    println!("|---|---:|---:|---:|---:|");
    let ok = rt.block_on(async {
        let mut ok = true;
        for batch in [100, 500] {
            let mut memory: Option<(f64, Decisions)> = None;
            for name in ["memory", "redis", "postgres"] {
                let Some(state) = backend(name, batch, &redis, pg).await else {
                    ok = false;
                    continue;
                };
                let Some((rate, decisions)) = throughput(state, &set, &events, batch).await else {
                    ok = false;
                    continue;
                };
                let slower = memory.as_ref().map_or(1.0, |(m, _)| m / rate);
                println!(
                    "| {name} | {batch} | {rate:.0} | {slower:.1} | {} |",
                    decisions.len()
                );
                match &memory {
                    None => memory = Some((rate, decisions)),
                    Some((_, want)) if *want != decisions => {
                        eprintln!("{name} (batch {batch}) decides differently from memory");
                        ok = false;
                    }
                    Some(_) => {}
                }
            }
        }
        ok
    });
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
