//! `--memory-limit`: above it the worker claims nothing new and says so; below it again
//! it resumes. Alone in its test binary, so no other test moves this process's memory.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use esper_engine::worker::{ByteSize, Config, resident_bytes};
use support::*;

async fn detailed(ops: &str) -> String {
    reqwest::get(format!("{ops}/healthz/detailed"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_pauses_above_the_memory_limit_and_resumes_below() {
    let ing = ingestion().await;
    let mit = mitigation().await;
    let dir = TempDir::new("memory-limit");
    let policies = dir.write("policies.toml", LOGIN_POLICY);
    let headroom = 48 << 20;
    let limit = resident_bytes().unwrap() + headroom;
    let worker = worker(Config {
        memory_limit: Some(ByteSize(limit)),
        ..worker_config(&ing.url(), &mit.url(), policies)
    })
    .await;
    let ops = worker.url();
    let (ingest, _) = clients(&ing.url(), &mit.url());

    ingest.ingest(logins("127.0.0.2", 3)).await.unwrap();
    drained(&ingest, Duration::from_secs(10)).await;

    // Ballast well above the headroom (touched, so it is resident) takes the process
    // over the limit: new events wait in the queue.
    let mut ballast = vec![0u8; 2 * headroom as usize];
    for page in ballast.chunks_mut(4096) {
        page[0] = 1;
    }
    eventually(Duration::from_secs(5), "claiming paused", || async {
        (sample(&metrics(&ops).await, "esper_worker_claims_paused") == 1.0).then_some(())
    })
    .await;
    assert!(detailed(&ops).await.contains("claiming paused"));
    // A claim already waiting when the limit was crossed may still return items; no
    // new one begins (claims wait at most 200 ms here).
    tokio::time::sleep(Duration::from_millis(600)).await;
    ingest.ingest(logins("127.0.0.3", 4)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = ingest.status().await.unwrap();
    assert_eq!((status.depth, status.leased), (4, 0), "{status:?}");
    // Paused intake is load shedding, not a fault: the worker stays ready.
    let ready = reqwest::get(format!("{ops}/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);

    // Freed (a large block goes back to the system), the queue drains again.
    drop(std::hint::black_box(ballast));
    drained(&ingest, Duration::from_secs(10)).await;
    assert_eq!(
        sample(&metrics(&ops).await, "esper_worker_claims_paused"),
        0.0
    );
}
