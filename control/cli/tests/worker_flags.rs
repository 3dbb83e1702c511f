//! The engine worker's tuning flags from the operator documentation
//! (`--concurrency 32 --io-threads 16 --connection-pool-size 100`) start a worker sized
//! as asked, and a bad value is one clear line and a non-zero exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::{Proc, TempDir, free_addr, write_login_policy};

fn worker_args(listen: &str, policies: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "worker",
        "run",
        "engine",
        "--ingestion-url",
        "http://127.0.0.1:9",
        "--mitigation-url",
        "http://127.0.0.1:9",
        "--control-url",
        "",
        "--listen",
        listen,
        "--policies",
        &policies.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn metric(url: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn io_threads_size_the_workers_runtime() {
    let dir = TempDir::new("worker-flags");
    let policies = write_login_policy(dir.path(), "60s");
    let listen = free_addr().to_string();
    let mut worker = Proc::esper(
        "worker",
        &worker_args(
            &listen,
            &policies,
            &[
                "--concurrency",
                "32",
                "--io-threads",
                "3",
                "--connection-pool-size",
                "100",
            ],
        ),
        &[],
    );
    let url = format!("http://{listen}/metrics");
    let deadline = Instant::now() + Duration::from_secs(20);
    let threads = loop {
        if let Some(n) = metric(&url, "esper_worker_io_threads").await {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no metrics from the worker:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(threads, 3.0);
    assert_eq!(worker.terminate(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn a_bad_tuning_value_is_one_clear_line() {
    for (flag, value, option) in [
        ("--io-threads", "5000", "io_threads"),
        ("--connection-pool-size", "0", "connection_pool_size"),
    ] {
        let dir = TempDir::new("worker-flags");
        let policies = write_login_policy(dir.path(), "60s");
        let listen = free_addr().to_string();
        let mut worker = Proc::esper(
            "worker",
            &worker_args(&listen, &policies, &[flag, value]),
            &[],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let code = loop {
            if let Some(code) = worker.try_exit() {
                break code;
            }
            assert!(Instant::now() < deadline, "the worker kept running");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(code, Some(1));
        let log = worker.log();
        assert!(
            log.lines()
                .any(|l| l.starts_with("esper: ") && l.contains(option)),
            "{log}"
        );
    }
}
