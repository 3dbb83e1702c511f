//! Request-event serialisation (`cargo bench -p esper-protocol --bench event_ser`): ns per
//! event to write an ingest body (`{"events":[...]}`, what `IngestionClient::ingest_slice`
//! sends) for batches of realistic events: the derived serialisation the wire format was
//! defined by, `RequestEvent`'s `Serialize` through serde_json, and `ingest_body` (what
//! the client sends). `once SET FORM N` (SET `wrk` or `browser`, FORM `derived`,
//! `serialize` or `ingest_body`) serialises N events once, for an instruction count
//! under callgrind. Figures in benches/README.md.

#[path = "../tests/support/derived_event.rs"]
mod derived_event;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use chrono::{TimeDelta, Utc};
use derived_event::{DerivedEvent, derived_body};
use esper_protocol::{EnforcedAction, RequestEvent, TlsInfo};
use serde::Serialize;

/// The proxy's default batch size.
const BATCH: usize = 500;

/// Events like the proxy reports under `wrk` (only `Host` sent), or from browsers (an
/// agent, reported headers, a hashed cookie, TLS), from 5,000 addresses, 5% IPv6.
fn events(set: &str, n: usize) -> Vec<RequestEvent> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut below = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let start = Utc::now();
    (0..n)
        .map(|i| {
            let client = below(5_000) as u32;
            let ip = if below(20) == 0 {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, client as u16, 0, 0, 0, 1))
            } else {
                IpAddr::V4(Ipv4Addr::from(0xC633_0000u32 + client))
            };
            let mut ev = RequestEvent::new(ip, "GET", "/index.html");
            // Clock readings have nanosecond precision, so 9 fractional digits.
            ev.timestamp = start + TimeDelta::nanoseconds(i as i64 * 37_013 + 1);
            ev.app = "shop".to_string();
            ev.proxy_id = "proxy-7f3a".to_string();
            ev.host = "127.0.0.1:18084".to_string();
            ev.status = 200;
            ev.latency_us = 150 + below(2_000);
            ev.bytes = 601;
            if set == "browser" {
                ev.path = format!("/products/{}?ref=home", below(2_000));
                ev.host = "shop.example.com".to_string();
                ev.user_agent = Some(
                    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
                        .to_string(),
                );
                let mut headers = BTreeMap::new();
                headers.insert("accept-language".to_string(), "en-GB,en;q=0.5".to_string());
                headers.insert(
                    "referer".to_string(),
                    "https://shop.example.com/".to_string(),
                );
                headers.insert("x-forwarded-for".to_string(), ip.to_string());
                ev.headers = headers;
                ev.cookies
                    .insert("session".to_string(), format!("{:016x}", below(u64::MAX)));
                ev.tls = Some(TlsInfo {
                    version: "TLSv1.3".to_string(),
                    fingerprint: None,
                });
                if below(50) == 0 {
                    ev.action = EnforcedAction::Block;
                    ev.status = 403;
                }
            }
            ev
        })
        .collect()
}

/// The body through `RequestEvent`'s `Serialize` and serde_json.
#[inline(never)]
fn serde_body(events: &[RequestEvent]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        events: &'a [RequestEvent],
    }
    serde_json::to_vec(&Body { events }).unwrap_or_default()
}

/// The body as `IngestionClient::ingest_slice` writes it.
#[inline(never)]
fn writer_body(events: &[RequestEvent]) -> Vec<u8> {
    esper_protocol::ingest_body(events)
}

/// The body as the derived serialisation writes it.
#[inline(never)]
fn derived(events: &[DerivedEvent]) -> Vec<u8> {
    derived_body(events)
}

/// Best of `rounds` passes over all events in batches, in ns per event, and the body
/// bytes per event. Wall time: the thread's CPU time is counted in scheduler ticks here,
/// too coarse for a pass; the best pass is the one the rest of the machine disturbed
/// least.
fn time<T>(events: &[T], rounds: usize, f: impl Fn(&[T]) -> Vec<u8>) -> (f64, usize) {
    let mut best = f64::INFINITY;
    let mut bytes = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        bytes = 0;
        for batch in events.chunks(BATCH) {
            bytes += black_box(f(black_box(batch))).len();
        }
        let spent = started.elapsed();
        best = best.min(spent.as_nanos() as f64 / events.len() as f64);
    }
    (best, bytes / events.len().max(1))
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.first().map(String::as_str) == Some("once") {
        let set = args.get(1).map_or("wrk", String::as_str);
        let form = args.get(2).map_or("ingest_body", String::as_str);
        let n = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(20_000);
        let evs = events(set, n);
        let mut total = 0;
        if form == "derived" {
            let evs: Vec<DerivedEvent> = evs.iter().map(DerivedEvent::from).collect();
            for batch in evs.chunks(BATCH) {
                total += derived(batch).len();
            }
        } else if form == "serialize" {
            for batch in evs.chunks(BATCH) {
                total += serde_body(batch).len();
            }
        } else {
            for batch in evs.chunks(BATCH) {
                total += writer_body(batch).len();
            }
        }
        println!("{set} {form}: {n} events, {total} bytes");
        return;
    }
    let n = args.first().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    println!("{n} events in batches of {BATCH}, best of 10 passes, ns per event (wall time)");
    println!("| events | form | ns/event | bytes/event |");
    println!("|---|---|---:|---:|");
    for set in ["wrk", "browser"] {
        let evs = events(set, n);
        let der: Vec<DerivedEvent> = evs.iter().map(DerivedEvent::from).collect();
        let want = derived_body(&der);
        let same = serde_body(&evs) == want && writer_body(&evs) == want;
        let (ns, bytes) = time(&der, 10, derived);
        println!("| {set} | derived | {ns:.0} | {bytes} |");
        let (ns, bytes) = time(&evs, 10, serde_body);
        println!("| {set} | Serialize | {ns:.0} | {bytes} |");
        let (ns, bytes) = time(&evs, 10, writer_body);
        println!("| {set} | ingest_body | {ns:.0} | {bytes} |");
        if !same {
            eprintln!("{set}: a serialisation differs from the derived one");
            std::process::exit(1);
        }
    }
}
