//! Fills a mitigation broker for the loaded-cache benchmark: COUNT address blocks and
//! RANGES network blocks (none covering the benchmark's client, 127.0.0.1), then keeps
//! publishing RATE new mitigations per second, so the proxy applies deltas while it is
//! measured. Prints `loaded` once the initial set is in.
//!
//! Usage: `load-mitigations BROKER_URL COUNT RANGES RATE`.

use std::net::Ipv4Addr;
use std::time::Duration;

use esper_protocol::{Action, EntityKey, Mitigation, MitigationClient, Origin, Reason};

const BATCH: usize = 20_000;
const TTL: Duration = Duration::from_secs(3600);

fn block(key: EntityKey) -> Mitigation {
    Mitigation::new(key, Action::Block, TTL, Origin::Manual, Reason::default())
}

/// The `i`-th address of 10.0.0.0/8 onwards (never 127.0.0.0/8).
fn addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i))
}

async fn publish(client: &MitigationClient, batch: Vec<Mitigation>) {
    if let Err(e) = client.publish(batch).await {
        eprintln!("publish failed: {e}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| args.get(i).and_then(|v| v.parse::<u32>().ok());
    let (Some(url), Some(count), Some(ranges), Some(rate)) = (args.get(1), num(2), num(3), num(4))
    else {
        eprintln!("usage: load-mitigations BROKER_URL COUNT RANGES RATE");
        std::process::exit(2);
    };
    let client = MitigationClient::new(url, None);
    let mut batch = Vec::with_capacity(BATCH);
    for i in 0..count {
        batch.push(block(EntityKey::Ip(addr(i).into())));
        if batch.len() == BATCH {
            publish(&client, std::mem::take(&mut batch)).await;
        }
    }
    // /24 networks from 100.0.0.0 on (100.64.0.0/10 and above included: no loopback).
    for i in 0..ranges {
        let net = Ipv4Addr::from(0x6400_0000u32.wrapping_add(i << 8));
        let Ok(net) = format!("{net}/24").parse() else {
            continue;
        };
        batch.push(block(EntityKey::Cidr(net)));
        if batch.len() == BATCH {
            publish(&client, std::mem::take(&mut batch)).await;
        }
    }
    publish(&client, batch).await;
    println!("loaded");
    let mut next = count;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let n = (rate / 10).max(1);
        let fresh = (next..next + n)
            .map(|i| block(EntityKey::Ip(addr(i).into())))
            .collect();
        next += n;
        publish(&client, fresh).await;
    }
}
