//! The engine worker's tuning flags from the operator documentation
//! (`--concurrency 32 --io-threads 16 --connection-pool-size 100`) start a worker sized
//! as asked, and a bad value is one clear line and a non-zero exit; `--cpuprofile FILE`
//! and `--memprofile FILE` write pprof profiles when the worker stops.

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

/// A worker started with `extra` flags (no brokers behind it), in a fresh directory
/// with the example policy; the directory, its ops address and the process.
fn start_worker(extra: &[&str]) -> (TempDir, String, Proc) {
    let dir = TempDir::new("worker-flags");
    let policies = write_login_policy(dir.path(), "60s");
    let listen = free_addr().to_string();
    let worker = Proc::esper("worker", &worker_args(&listen, &policies, extra), &[]);
    (dir, listen, worker)
}

/// The exit code of a worker expected to stop on its own within 10 s.
async fn exit_code(worker: &mut Proc) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(code) = worker.try_exit() {
            return code;
        }
        assert!(Instant::now() < deadline, "the worker kept running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The worker's `esper_worker_io_threads`, once its ops listener answers (within 20 s).
async fn io_threads(worker: &Proc, listen: &str) -> f64 {
    let url = format!("http://{listen}/metrics");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(n) = metric(&url, "esper_worker_io_threads").await {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no metrics from the worker:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metric(url: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn io_threads_size_the_workers_runtime() {
    let (_dir, listen, mut worker) = start_worker(&[
        "--concurrency",
        "32",
        "--io-threads",
        "3",
        "--connection-pool-size",
        "100",
    ]);
    assert_eq!(io_threads(&worker, &listen).await, 3.0);
    assert_eq!(worker.terminate(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn a_bad_tuning_value_is_one_clear_line() {
    for (flag, value, option) in [
        ("--io-threads", "5000", "io_threads"),
        ("--connection-pool-size", "0", "connection_pool_size"),
    ] {
        let (_dir, _listen, mut worker) = start_worker(&[flag, value]);
        assert_eq!(exit_code(&mut worker).await, Some(1));
        let log = worker.log();
        assert!(
            log.lines()
                .any(|l| l.starts_with("esper: ") && l.contains(option)),
            "{log}"
        );
    }
}

/// Runs a worker with `flags` until it serves, then stops it: it must exit cleanly.
async fn run_and_stop(policies: &std::path::Path, flags: &[&str]) {
    let listen = free_addr().to_string();
    let mut worker = Proc::esper("worker", &worker_args(&listen, policies, flags), &[]);
    io_threads(&worker, &listen).await;
    assert_eq!(worker.terminate(Duration::from_secs(10)), Some(0));
}

/// A worker given `flags` stops before it runs with exit code `code`, its log saying
/// `says`.
async fn refused(policies: &std::path::Path, flags: &[&str], code: i32, says: &str) {
    let listen = free_addr().to_string();
    let mut worker = Proc::esper("worker", &worker_args(&listen, policies, flags), &[]);
    assert_eq!(exit_code(&mut worker).await, Some(code));
    assert!(worker.log().contains(says), "{}", worker.log());
}

fn read_profile(file: &std::path::Path) -> pprof::protos::Profile {
    use pprof::protos::Message;
    let body = std::fs::read(file).unwrap();
    pprof::protos::Profile::decode(body.as_slice()).unwrap()
}

fn sample_types(profile: &pprof::protos::Profile) -> Vec<&str> {
    profile
        .sample_type
        .iter()
        .map(|t| profile.string_table[t.ty as usize].as_str())
        .collect()
}

#[tokio::test]
async fn cpuprofile_writes_a_pprof_profile_when_the_worker_stops() {
    let dir = TempDir::new("worker-cpuprofile");
    let policies = write_login_policy(dir.path(), "60s");
    let file = dir.path().join("cpu.prof");
    run_and_stop(&policies, &["--cpuprofile", &file.display().to_string()]).await;
    let profile = read_profile(&file);
    assert!(sample_types(&profile).contains(&"cpu"));
    // A path that cannot be written is refused before the worker starts.
    let flags = ["--cpuprofile", "/nonexistent-dir/cpu.prof"];
    refused(&policies, &flags, 1, "cannot write the CPU profile").await;
}

#[tokio::test]
async fn memprofile_writes_a_pprof_heap_profile_when_the_worker_stops() {
    let dir = TempDir::new("worker-memprofile");
    let policies = write_login_policy(dir.path(), "60s");
    let file = dir.path().join("mem.prof");
    // Finer than the default rate, so a worker that only starts is sure to be sampled.
    let flags = [
        "--memprofile",
        &file.display().to_string(),
        "--memprofile-rate",
        "4096",
    ];
    run_and_stop(&policies, &flags).await;
    let profile = read_profile(&file);
    let text = |i: i64| profile.string_table[i as usize].as_str();
    assert_eq!(
        sample_types(&profile),
        [
            "alloc_objects",
            "alloc_space",
            "inuse_objects",
            "inuse_space"
        ]
    );
    assert_eq!(text(profile.default_sample_type), "inuse_space");
    assert_eq!(profile.period, 4096);
    // A worker starting allocates megabytes: sampled, with named callers, and none of
    // the stacks starts inside the recording itself.
    let allocated: i64 = profile.sample.iter().map(|s| s.value[1]).sum();
    assert!(allocated > 0, "{} samples", profile.sample.len());
    let function = |location: u64| {
        let loc = &profile.location[location as usize - 1];
        loc.line
            .iter()
            .map(|l| text(profile.function[l.function_id as usize - 1].name))
            .collect::<Vec<_>>()
    };
    let names: Vec<&str> = profile
        .sample
        .iter()
        .flat_map(|s| s.location_id.iter().flat_map(|id| function(*id)))
        .collect();
    assert!(names.iter().any(|n| n.contains("esper")), "{names:?}");
    for sample in &profile.sample {
        let leaf = sample
            .location_id
            .first()
            .map_or(Vec::new(), |id| function(*id));
        let owner = leaf.last().copied().unwrap_or_default();
        assert!(!owner.contains("memprofile::"), "{leaf:?}");
    }
    // A path that cannot be written is refused before the worker starts.
    let flags = ["--memprofile", "/nonexistent-dir/mem.prof"];
    refused(&policies, &flags, 1, "cannot write the heap profile").await;
}

#[tokio::test]
async fn cpu_and_heap_profiles_are_written_together() {
    let dir = TempDir::new("worker-profiles");
    let policies = write_login_policy(dir.path(), "60s");
    let (cpu, heap) = (dir.path().join("cpu.prof"), dir.path().join("mem.prof"));
    let (cpu_path, heap_path) = (cpu.display().to_string(), heap.display().to_string());
    let flags = [
        "--cpuprofile",
        &cpu_path,
        "--memprofile",
        &heap_path,
        "--memprofile-rate",
        "4096",
    ];
    run_and_stop(&policies, &flags).await;
    assert!(sample_types(&read_profile(&cpu)).contains(&"cpu"));
    assert!(sample_types(&read_profile(&heap)).contains(&"inuse_space"));
    // A rate of 0 is one clear line.
    let flags = ["--memprofile", &heap_path, "--memprofile-rate", "0"];
    refused(&policies, &flags, 2, "--memprofile-rate").await;
}
