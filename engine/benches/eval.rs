//! Engine benchmarks (`cargo bench -p esper-engine --bench eval`): evaluation
//! throughput on one core with memory state for 1, 10 and 100 policies on a realistic
//! event mix, memory per tracked entity, and the cost of the filter language against
//! the same conditions written in Rust. Figures are recorded in benches/README.md.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use esper_engine::eval::{Evaluator, MemoryState, PolicySet, StateBackend};
use esper_engine::parse_policies;
use esper_engine::policy::PolicySpec;
use esper_protocol::RequestEvent;
use prometheus::Registry;

/// A small deterministic generator (xorshift), so every run sees the same traffic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 0)
        .single()
        .unwrap_or_default()
}

/// Ten minutes of traffic: mostly browsing, some API calls with keys, logins (a third
/// failing), 404s, 2% of requests from an attack tool; 20,000 client addresses, a few of
/// them busy.
fn traffic(n: usize) -> Vec<RequestEvent> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let agents = [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Safari/604.1",
        "python-requests/2.31",
        "curl/8.5.0",
        "sqlmap/1.7.2#stable (https://sqlmap.org)",
    ];
    (0..n)
        .map(|i| {
            let client = if rng.below(10) == 0 {
                rng.below(50)
            } else {
                rng.below(20_000)
            };
            let ip = IpAddr::V4(Ipv4Addr::from(0xC633_0000u32 + client as u32));
            let kind = rng.below(100);
            let (method, path, status) = match kind {
                0..=54 => ("GET", format!("/products/{}", rng.below(2_000)), 200),
                55..=69 => ("GET", "/static/app.css".to_string(), 200),
                70..=79 => ("GET", format!("/api/items/{}", rng.below(100)), 200),
                80..=87 => {
                    let status = if rng.below(3) == 0 { 401 } else { 302 };
                    ("POST", "/login".to_string(), status)
                }
                88..=95 => ("GET", format!("/wp-admin/{}.php", rng.below(500)), 404),
                _ => ("POST", "/comment".to_string(), 200),
            };
            let mut ev = RequestEvent::new(ip, method, &path);
            ev.id = format!("e{i}");
            ev.status = status;
            ev.timestamp =
                start() + chrono::Duration::milliseconds((i as i64 * 600_000) / n as i64);
            ev.host = "shop.example".into();
            ev.app = "shop".into();
            ev.bytes = 500 + rng.below(20_000);
            ev.latency_us = 1_000 + rng.below(50_000);
            ev.user_agent =
                Some(agents[(rng.below(100) as usize * agents.len() / 100).min(4)].to_string());
            ev.headers.insert("accept".into(), "text/html".into());
            if path.starts_with("/api/") {
                ev.headers
                    .insert("x-api-key".into(), format!("k{}", rng.below(200)));
            }
            if path == "/login" {
                ev.headers
                    .insert("x-login-user".into(), format!("user{}", rng.below(5_000)));
            }
            ev
        })
        .collect()
}

/// The shipped library: ten policies.
fn library() -> Vec<PolicySpec> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/policies");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| parse_policies(&t).ok())
        .flatten()
        .collect()
}

/// `n` policies: the library repeated with other ids and thresholds.
fn policies(n: usize) -> Vec<PolicySpec> {
    let lib = library();
    (0..n)
        .map(|i| {
            let mut p = lib[i % lib.len()].clone();
            if i >= lib.len() {
                p.id = format!("{}-{i}", p.id);
                p.threshold *= 1.0 + (i / lib.len()) as f64;
                p.escalation.clear();
            }
            p
        })
        .collect()
}

const BATCH: usize = 500;

/// Events per second of CPU time through evaluate + commit, batches of 500, one thread.
fn throughput(specs: Vec<PolicySpec>, events: &[RequestEvent]) -> (f64, u64, usize) {
    let rt = tokio::runtime::Builder::new_current_thread().build().ok();
    let Some(rt) = rt else { return (0.0, 0, 0) };
    let set = PolicySet::from_specs(1, specs);
    let state = Arc::new(MemoryState::new(Duration::from_secs(3600), 10_000_000));
    let eval = Evaluator::new(state.clone(), "bench", &Registry::new());
    let mut decisions = 0;
    let mut busy = Duration::ZERO;
    rt.block_on(async {
        for chunk in events.chunks(BATCH) {
            // A worker evaluates a batch it has just decoded, so its events are in the
            // cache: copy the batch (untimed) as decoding would.
            let batch = chunk.to_vec();
            let now = batch.last().map_or_else(start, |e| e.timestamp);
            let t = cpu_time();
            if let Ok(out) = eval.evaluate(&set, &batch, now).await {
                decisions += out.decisions.len();
                let _ = eval.commit(&out, now).await;
            }
            busy += cpu_time().saturating_sub(t);
            drop(batch);
        }
    });
    let secs = busy.as_secs_f64();
    (
        events.len() as f64 / secs,
        state.stats().entities,
        decisions,
    )
}

/// Time this thread has spent on a CPU (from the scheduler's statistics), so that
/// other work on a shared machine does not count; wall time where that is unreadable.
fn cpu_time() -> Duration {
    static FALLBACK: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or_else(
            || FALLBACK.get_or_init(Instant::now).elapsed(),
            Duration::from_nanos,
        )
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resident memory per tracked (policy, entity) pair for one policy, measured by
/// tracking `n` distinct addresses (each seen `per_entity` times).
fn memory_per_entity(policy: &str, n: u32, per_entity: u32) -> f64 {
    let Some(rt) = tokio::runtime::Builder::new_current_thread().build().ok() else {
        return 0.0;
    };
    let Ok(specs) = parse_policies(policy) else {
        return 0.0;
    };
    let set = PolicySet::from_specs(1, specs);
    // Event ids expire after 1ms and are cleaned after each batch, so that what stays
    // resident is the entities' state (the ids' memory is reused by the next batch).
    let state = Arc::new(MemoryState::new(Duration::from_millis(1), 10_000_000));
    let eval = Evaluator::new(state.clone(), "bench", &Registry::new());
    let start_ms = start().timestamp_millis();
    let before = rss_bytes();
    rt.block_on(async {
        let mut batch = Vec::with_capacity(BATCH);
        for i in 0..n {
            for k in 0..per_entity {
                let ip = IpAddr::V4(Ipv4Addr::from(0x0A00_0000u32 + i));
                let mut ev = RequestEvent::new(ip, "GET", &format!("/p/{k}"));
                ev.id = format!("{i}-{k}");
                ev.status = 404;
                ev.timestamp = start() + chrono::Duration::milliseconds(i64::from(k) * 1000);
                batch.push(ev);
            }
            if batch.len() >= BATCH {
                if let Ok(out) = eval.evaluate(&set, &batch, start()).await {
                    let _ = eval.commit(&out, start()).await;
                }
                let _ = state.cleanup(start_ms + 2).await;
                batch.clear();
            }
        }
    });
    let entities = state.stats().entities.max(1);
    let after = rss_bytes();
    black_box(&state);
    after.saturating_sub(before) as f64 / entities as f64
}

/// Nanoseconds per event of a matcher over the events.
fn ns_per_event(
    events: &[RequestEvent],
    rounds: usize,
    f: impl Fn(&RequestEvent) -> bool,
) -> (f64, usize) {
    let mut hits = 0;
    let t = Instant::now();
    for _ in 0..rounds {
        for ev in events {
            if f(black_box(ev)) {
                hits += 1;
            }
        }
    }
    (
        t.elapsed().as_nanos() as f64 / (rounds * events.len()) as f64,
        hits / rounds,
    )
}

fn language_cost(events: &[RequestEvent]) {
    let expr = r#"
[[policy]]
id = "expr"
window = "1m"
threshold = 10
action = "block"
filter = '''
method == "POST" && path == "/login" && status in [401, 403]
  && !(client_ip in ["10.0.0.0/8", "192.168.0.0/16"])
  && !user_agent.lowerAscii().contains("monitor")
'''
"#;
    let table = r#"
[[policy]]
id = "table"
window = "1m"
threshold = 10
action = "block"
[policy.match]
methods = ["POST"]
paths = ["/login"]
statuses = [401, 403]
"#;
    let compile = |t: &str| PolicySet::from_specs(1, parse_policies(t).unwrap_or_default());
    let (e, m) = (compile(expr), compile(table));
    let (Some(e), Some(m)) = (e.policies().first(), m.policies().first()) else {
        return;
    };
    let private: [ipnet::Ipv4Net; 2] = [
        "10.0.0.0/8".parse().unwrap_or_default(),
        "192.168.0.0/16".parse().unwrap_or_default(),
    ];
    let rust = |ev: &RequestEvent| {
        let path = ev.path.split('?').next().unwrap_or("");
        let ip = ev.client_ip.to_canonical();
        ev.method == "POST"
            && path == "/login"
            && (ev.status == 401 || ev.status == 403)
            && !match ip {
                IpAddr::V4(v4) => private.iter().any(|n| n.contains(&v4)),
                IpAddr::V6(_) => false,
            }
            && !ev.user_agent.as_deref().is_some_and(|ua| {
                ua.as_bytes()
                    .windows(7)
                    .any(|w| w.eq_ignore_ascii_case(b"monitor"))
            })
    };
    // A few thousand events, in the cache as a batch being evaluated is.
    let events = &events[..events.len().min(4_000)];
    let rounds = 500;
    let (ns_expr, h1) = ns_per_event(events, rounds, |ev| e.matches(ev));
    let (ns_table, h2) = ns_per_event(events, rounds, |ev| m.matches(ev));
    let (ns_rust, h3) = ns_per_event(events, rounds, rust);
    assert_eq!(h1, h3, "the expression and the Rust code disagree");
    println!(
        "language cost (matching only, ns/event; {h1} of {} match):",
        events.len()
    );
    println!("  filter expression     {ns_expr:>6.1}");
    println!("  [policy.match] table  {ns_table:>6.1}   ({h2} match: no IP/agent exclusions)");
    println!("  hand-written Rust     {ns_rust:>6.1}");
}

/// The policies whose memory per entity is measured, each in a fresh process (freed
/// memory stays resident, so one process cannot measure several).
fn memory_case(name: &str) -> Option<(String, u32, u32)> {
    let count = "[[policy]]\nid = \"c\"\nwindow = \"1m\"\nthreshold = 1e9\naction = \"log\"\n";
    Some(match name {
        "count-1" => (count.to_string(), 200_000, 1),
        "count-10" => (count.to_string(), 100_000, 10),
        "distinct-10" => (
            format!("{count}aggregate = \"distinct(path)\"\n").replace("1e9", "4000"),
            100_000,
            10,
        ),
        "sequence" => (
            "[[policy]]\nid = \"s\"\nwithin = \"10m\"\nthreshold = 1\naction = \"log\"\nsequence = [{ when = 'status == 404', min = 100 }, { when = 'status == 200' }]\n".to_string(),
            200_000,
            1,
        ),
        _ => return None,
    })
}

fn per_policy(events: &[RequestEvent]) {
    println!("each library policy alone:");
    for spec in library() {
        let id = spec.id.clone();
        let (rate, _, _) = throughput(vec![spec], events);
        println!("  {id:<22} {rate:>10.0} events/s");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("memory") {
        let case = args.next().unwrap_or_default();
        if let Some((policy, n, per)) = memory_case(&case) {
            println!("{:.0}", memory_per_entity(&policy, n, per));
        }
        return;
    }
    let n = first.and_then(|s| s.parse().ok()).unwrap_or(400_000);
    let events = traffic(n);
    // An optional second argument runs only that many policies, or only the library
    // policy of that id (for profiling).
    if let Some(only) = args.next() {
        let specs = match only.parse() {
            Ok(count) => policies(count),
            Err(_) => library().into_iter().filter(|p| p.id == only).collect(),
        };
        let (rate, entities, decisions) = throughput(specs, &events);
        println!(
            "{only}: {rate:>10.0} events/s on one core ({entities} tracked pairs, {decisions} decisions)"
        );
        return;
    }
    println!(
        "{} events, {} library policies",
        events.len(),
        library().len()
    );
    for count in [1, 10, 100] {
        let (rate, entities, decisions) = throughput(policies(count), &events);
        println!(
            "{count:>3} policies: {:>10.0} events/s on one core ({entities} tracked pairs, {decisions} decisions)",
            rate
        );
    }
    per_policy(&events);
    language_cost(&events);
    println!("memory per tracked (policy, entity) pair (resident, including the maps):");
    for (case, what) in [
        ("count-1", "count, 1 event"),
        ("count-10", "count, 10 events in 10s"),
        ("distinct-10", "distinct, 10 values"),
        ("sequence", "sequence in progress"),
    ] {
        let bytes = std::env::current_exe()
            .ok()
            .and_then(|exe| {
                std::process::Command::new(exe)
                    .args(["memory", case])
                    .output()
                    .ok()
            })
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        println!("  {what:<24} {bytes:>6} bytes");
    }
}
