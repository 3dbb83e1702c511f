//! `esper worker autoscale`: a local supervisor that keeps between `--min` and `--max`
//! engine workers running as child processes of this binary, sized by the ingestion
//! queue depth the control plane reports, and restarts the ones that die.
//!
//! Scaling up is immediate; scaling down waits until the queue has asked for fewer
//! workers for `--scale-down-delay`, so a queue that empties between bursts does not stop
//! workers that are needed again a minute later.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use esper_common::Shutdown;
use esper_common::config::{ConfigError, parse_duration_secs};
use esper_control::ctl::ControlClient;
use tokio::process::{Child, Command};

use crate::cli;
use crate::ops::ApiArgs;

/// How often children are checked and the loop looks at its clock.
const TICK: Duration = Duration::from_millis(500);
/// First delay before restarting a worker that died; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A worker that ran this long before dying starts its backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Most workers one supervisor runs.
const MAX_WORKERS: usize = 256;
/// The other parts' default ports (DESIGN.md), which worker ops ports step over.
pub(crate) const RESERVED_PORTS: [u16; 8] = [8000, 8080, 8081, 8082, 8083, 8443, 9090, 9095];
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Flags of `esper worker autoscale`.
#[derive(Debug, Clone, clap::Args)]
pub struct AutoscaleArgs {
    /// Fewest workers kept running (0 lets the pool shrink to none on an empty queue).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub min: usize,
    /// Most workers run.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub max: usize,
    /// Queued events one worker is expected to keep up with: the pool runs
    /// ceil(depth / this) workers, within --min and --max.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub target_queue_depth: u64,
    /// How often the queue depth is read (e.g. 10s; bare numbers are seconds).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration_secs)]
    pub interval: Duration,
    /// How long the queue must have asked for fewer workers before any is stopped
    /// (0 stops them at once).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration_secs)]
    pub scale_down_delay: Duration,
    /// How long a stopping worker may drain before it is killed.
    #[arg(long, default_value = "45s", value_name = "DURATION", value_parser = parse_duration_secs)]
    pub stop_timeout: Duration,
    /// Worker N runs as `--worker-id PREFIX-N`; use a distinct prefix per host.
    #[arg(long, default_value = "autoscale", value_name = "PREFIX")]
    pub worker_id_prefix: String,
    /// Worker N serves health and metrics on the Nth free port from PORT on 127.0.0.1,
    /// skipping the other parts' default ports (so a fifth worker does not take the
    /// proxy's ops port 9095).
    #[arg(long, default_value_t = 9091, value_name = "PORT")]
    pub base_port: u16,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Arguments for every `esper worker run engine`, after `--`
    /// (e.g. `-- --concurrency 8 --batch-size 200`).
    #[arg(last = true, value_name = "WORKER ARGS")]
    pub worker_args: Vec<String>,
}

impl AutoscaleArgs {
    /// Checks the flags that cannot be checked one by one.
    fn check(&self) -> Result<(), ConfigError> {
        if self.max == 0 || self.max > MAX_WORKERS {
            return Err(ConfigError::invalid(
                "--max",
                self.max,
                format!("must be between 1 and {MAX_WORKERS}"),
            ));
        }
        if self.min > self.max {
            return Err(ConfigError::invalid(
                "--min",
                self.min,
                format!("must not exceed --max ({})", self.max),
            ));
        }
        if self.target_queue_depth == 0 {
            return Err(ConfigError::invalid(
                "--target-queue-depth",
                0,
                "must be at least 1",
            ));
        }
        if self.interval < MIN_INTERVAL {
            return Err(ConfigError::invalid(
                "--interval",
                format!("{:?}", self.interval),
                "must be at least 100ms",
            ));
        }
        if self.base_port == 0 || self.worker_port(self.max).is_none() {
            return Err(ConfigError::invalid(
                "--base-port",
                self.base_port,
                format!("{} worker ports from here do not fit", self.max),
            ));
        }
        Ok(())
    }

    /// The ops port of worker `n` (from 1): the nth port from `--base-port` that is not
    /// another part's default port.
    fn worker_port(&self, n: usize) -> Option<u16> {
        (self.base_port..=u16::MAX)
            .filter(|p| !RESERVED_PORTS.contains(p))
            .nth(n.checked_sub(1)?)
    }

    /// The command line of worker `n` after the program name.
    fn worker_argv(&self, config: Option<&Path>, n: usize) -> Vec<OsString> {
        let port = self.worker_port(n).unwrap_or(self.base_port);
        let mut argv: Vec<OsString> = vec![
            "worker".into(),
            "run".into(),
            "engine".into(),
            "--worker-id".into(),
            format!("{}-{n}", self.worker_id_prefix).into(),
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
        ];
        if let Some(c) = config {
            argv.push("--config".into());
            argv.push(c.as_os_str().to_owned());
        }
        argv.extend(self.worker_args.iter().map(OsString::from));
        argv
    }
}

/// Workers wanted for `depth` queued events: ceil(depth / per_worker), within
/// [min, max].
pub fn desired_workers(depth: u64, per_worker: u64, min: usize, max: usize) -> usize {
    let want = depth.div_ceil(per_worker.max(1));
    usize::try_from(want)
        .unwrap_or(usize::MAX)
        .max(min)
        .min(max)
}

/// The delay before the `failures`-th consecutive restart: 1s, 2s, 4s, ... up to 60s.
pub fn restart_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX)
}

/// One reading's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// What this reading alone asks for.
    pub desired: usize,
    /// The pool size to run now.
    pub target: usize,
}

/// Turns queue readings into pool sizes: up at once, down only to the most any reading
/// asked for during the last `delay`, and only once readings cover that whole delay.
#[derive(Debug, Clone)]
pub struct Planner {
    min: usize,
    max: usize,
    per_worker: u64,
    delay: Duration,
    /// Readings in time order; the first is the last one taken at or before `now - delay`
    /// (its verdict was in force when the window began).
    recent: VecDeque<(Instant, usize)>,
}

impl Planner {
    pub fn new(min: usize, max: usize, per_worker: u64, delay: Duration) -> Planner {
        Planner {
            min,
            max,
            per_worker,
            delay,
            recent: VecDeque::new(),
        }
    }

    /// The plan for `depth` queued events at `now`, with `running` workers.
    pub fn plan(&mut self, now: Instant, depth: u64, running: usize) -> Plan {
        let desired = desired_workers(depth, self.per_worker, self.min, self.max);
        self.recent.push_back((now, desired));
        while self.recent.len() >= 2
            && self
                .recent
                .get(1)
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= self.delay)
        {
            self.recent.pop_front();
        }
        let target = if desired >= running {
            desired
        } else {
            let covered = self
                .recent
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= self.delay);
            let ceiling = self.recent.iter().map(|(_, d)| *d).max().unwrap_or(desired);
            if covered {
                running.min(ceiling)
            } else {
                running
            }
        };
        Plan { desired, target }
    }
}

/// How worker `n` (1-based) is started.
#[derive(Clone)]
struct Launcher {
    program: PathBuf,
    prefix: String,
    argv: Arc<dyn Fn(usize) -> Vec<OsString> + Send + Sync>,
}

impl Launcher {
    fn name(&self, n: usize) -> String {
        format!("{}-{n}", self.prefix)
    }

    /// Starts worker `n`; a worker that cannot start waits for its restart like one
    /// that died.
    fn spawn(&self, n: usize, failures: u32) -> Worker {
        let now = Instant::now();
        let mut cmd = Command::new(&self.program);
        cmd.args((self.argv)(n))
            .stdin(Stdio::null())
            // Never leave a worker behind if this supervisor unwinds.
            .kill_on_drop(true);
        match cmd.spawn() {
            Ok(child) => {
                tracing::info!(worker = %self.name(n), pid = child.id(), "worker started");
                Worker {
                    n,
                    child: Some(child),
                    started: now,
                    failures,
                    restart_at: now,
                }
            }
            Err(e) => {
                let failures = failures.saturating_add(1);
                let wait = restart_backoff(failures);
                tracing::error!(
                    worker = %self.name(n),
                    program = %self.program.display(),
                    error = %e,
                    retry_in = ?wait,
                    "cannot start worker"
                );
                Worker {
                    n,
                    child: None,
                    started: now,
                    failures,
                    restart_at: now + wait,
                }
            }
        }
    }
}

/// One pool member: running, or waiting to be restarted.
struct Worker {
    n: usize,
    child: Option<Child>,
    started: Instant,
    /// Consecutive early deaths.
    failures: u32,
    /// When a worker without a child is started again.
    restart_at: Instant,
}

/// The child processes.
struct Pool {
    launcher: Launcher,
    stop_timeout: Duration,
    workers: Vec<Worker>,
}

impl Pool {
    fn new(launcher: Launcher, stop_timeout: Duration) -> Pool {
        Pool {
            launcher,
            stop_timeout,
            workers: Vec::new(),
        }
    }

    /// Members, running or waiting for a restart.
    fn len(&self) -> usize {
        self.workers.len()
    }

    /// Starts or stops workers until `target` are members. New ones take the lowest free
    /// number; the ones waiting for a restart leave first, then the newest.
    async fn resize(&mut self, target: usize) {
        while self.workers.len() < target {
            let n = (1..)
                .find(|n| !self.workers.iter().any(|w| w.n == *n))
                .unwrap_or(usize::MAX);
            let w = self.launcher.spawn(n, 0);
            self.workers.push(w);
        }
        let mut leaving = Vec::new();
        while self.workers.len() > target {
            let pick = self
                .workers
                .iter()
                .position(|w| w.child.is_none())
                .or_else(|| (0..self.workers.len()).max_by_key(|&i| self.workers[i].started));
            let Some(i) = pick else { break };
            leaving.push(self.workers.remove(i));
        }
        self.stop(leaving).await;
    }

    /// Notices workers that exited on their own and schedules their restart.
    fn reap(&mut self, now: Instant) {
        for w in &mut self.workers {
            let Some(child) = &mut w.child else { continue };
            let status = match child.try_wait() {
                Ok(None) => continue,
                Ok(Some(s)) => s.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            let ran = now.saturating_duration_since(w.started);
            if ran >= STABLE_AFTER {
                w.failures = 0;
            }
            w.failures = w.failures.saturating_add(1);
            let wait = restart_backoff(w.failures);
            tracing::warn!(
                worker = %self.launcher.name(w.n),
                %status,
                ran = ?ran,
                restart_in = ?wait,
                "worker exited; restarting"
            );
            w.child = None;
            w.restart_at = now + wait;
        }
    }

    /// Starts again the workers whose backoff has passed.
    fn restart_due(&mut self, now: Instant) {
        for w in &mut self.workers {
            if w.child.is_none() && w.restart_at <= now {
                *w = self.launcher.spawn(w.n, w.failures);
            }
        }
    }

    /// Stops every worker.
    async fn stop_all(&mut self) {
        let all = std::mem::take(&mut self.workers);
        self.stop(all).await;
    }

    /// SIGTERM to each, then waits for all of them together, killing the ones still
    /// running after the stop timeout.
    async fn stop(&self, leaving: Vec<Worker>) {
        let timeout = self.stop_timeout;
        let stops = leaving.into_iter().filter_map(|w| {
            let name = self.launcher.name(w.n);
            w.child.map(|child| stop_child(name, child, timeout))
        });
        futures_util::future::join_all(stops).await;
    }
}

async fn stop_child(name: String, mut child: Child, timeout: Duration) {
    terminate(&name, &mut child).await;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => tracing::info!(worker = %name, %status, "worker stopped"),
        Ok(Err(e)) => tracing::warn!(worker = %name, error = %e, "cannot wait for worker"),
        Err(_) => {
            tracing::warn!(worker = %name, timeout = ?timeout, "worker still running after the stop timeout; killing it");
            if let Err(e) = child.kill().await {
                tracing::warn!(worker = %name, error = %e, "cannot kill worker");
            }
        }
    }
}

/// Sends SIGTERM (the worker's graceful drain) through `kill(1)`, as this workspace
/// forbids unsafe code; falls back to killing the child when that is impossible.
async fn terminate(name: &str, child: &mut Child) {
    // None: already reaped, nothing to signal. Until reaped, the pid cannot be reused.
    let Some(pid) = child.id() else { return };
    let sent = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    match sent {
        Ok(s) if s.success() => {}
        other => {
            tracing::warn!(worker = %name, pid, result = ?other, "cannot send SIGTERM; killing the worker");
            let _ = child.start_kill();
        }
    }
}

/// The supervisor's state between ticks.
struct Autoscaler {
    client: ControlClient,
    planner: Planner,
    pool: Pool,
    interval: Duration,
    per_worker: u64,
    next_read: Instant,
    reading_failed: bool,
}

impl Autoscaler {
    fn new(args: &AutoscaleArgs, client: ControlClient, launcher: Launcher) -> Autoscaler {
        Autoscaler {
            client,
            planner: Planner::new(
                args.min,
                args.max,
                args.target_queue_depth,
                args.scale_down_delay,
            ),
            pool: Pool::new(launcher, args.stop_timeout),
            interval: args.interval,
            per_worker: args.target_queue_depth,
            next_read: Instant::now(),
            reading_failed: false,
        }
    }

    /// Reaps, reads the queue when the interval is up, resizes, restarts.
    async fn tick(&mut self, shutdown: &Shutdown) {
        let now = Instant::now();
        self.pool.reap(now);
        if now >= self.next_read {
            self.next_read = now + self.interval;
            self.read_and_scale(shutdown).await;
        }
        if !shutdown.is_triggered() {
            self.pool.restart_due(Instant::now());
        }
    }

    async fn read_and_scale(&mut self, shutdown: &Shutdown) {
        let status = tokio::select! {
            s = self.client.queue_status() => s,
            _ = shutdown.wait() => return,
        };
        let running = self.pool.len();
        let q = match status {
            Ok(q) => q,
            Err(e) => {
                if !self.reading_failed {
                    tracing::warn!(error = %e, workers = running, "cannot read the queue depth; keeping the pool as it is");
                }
                self.reading_failed = true;
                return;
            }
        };
        if std::mem::take(&mut self.reading_failed) {
            tracing::info!(depth = q.depth, "queue depth readable again");
        }
        let plan = self.planner.plan(Instant::now(), q.depth, running);
        if plan.target != running {
            tracing::info!(
                from = running,
                to = plan.target,
                depth = q.depth,
                per_worker = self.per_worker,
                "scaling {}",
                if plan.target > running { "up" } else { "down" }
            );
            self.pool.resize(plan.target).await;
        } else if plan.desired < running {
            tracing::debug!(
                workers = running,
                desired = plan.desired,
                depth = q.depth,
                "keeping workers until the scale-down delay has passed"
            );
        } else {
            tracing::debug!(workers = running, depth = q.depth, "pool size is right");
        }
    }
}

/// Parses worker `n`'s command line as the child will, and loads its configuration, so
/// a bad flag or setting is one error now rather than a restart loop later.
fn preflight(args: &AutoscaleArgs, config: Option<&Path>) -> anyhow::Result<()> {
    for n in [1, args.max] {
        let argv: Vec<OsString> = std::iter::once(OsString::from("esper"))
            .chain(args.worker_argv(config, n))
            .collect();
        let parsed = <cli::Cli as clap::Parser>::try_parse_from(&argv).map_err(|e| {
            let shown: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into()).collect();
            let cmd = <cli::Cli as clap::CommandFactory>::command();
            let why = cli::usage_error(&e, &cmd, &shown).unwrap_or_else(|| e.to_string());
            anyhow!("the worker command line does not parse: {why}")
        })?;
        let cli::Command::Worker(cli::WorkerCommand::Run(cli::WorkerKind::Engine(engine))) =
            parsed.command
        else {
            return Err(anyhow!(
                "the worker command line is not `worker run engine`"
            ));
        };
        cli::load(
            parsed.config.as_deref(),
            "worker",
            esper_engine::Config::apply_env,
            |c| engine.args.apply(c),
            esper_engine::Config::validate,
        )
        .context("worker configuration")?;
    }
    Ok(())
}

/// Runs the supervisor until `shutdown`, then stops every worker (bounded by
/// `--stop-timeout`).
pub async fn run(
    args: AutoscaleArgs,
    config_file: Option<PathBuf>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    args.check()?;
    preflight(&args, config_file.as_deref())?;
    let program = std::env::current_exe().context("cannot find the path of this program")?;
    let client = args.api.client()?;
    let argv = {
        let args = args.clone();
        move |n| args.worker_argv(config_file.as_deref(), n)
    };
    let launcher = Launcher {
        program,
        prefix: args.worker_id_prefix.clone(),
        argv: Arc::new(argv),
    };
    tracing::info!(
        min = args.min,
        max = args.max,
        target_queue_depth = args.target_queue_depth,
        interval = ?args.interval,
        server = %client.server(),
        "autoscaling local engine workers"
    );
    let mut scaler = Autoscaler::new(&args, client, launcher);
    scaler.pool.resize(args.min).await;
    loop {
        scaler.tick(&shutdown).await;
        if shutdown.sleep(TICK).await {
            break;
        }
    }
    tracing::info!(workers = scaler.pool.len(), "stopping every worker");
    scaler.pool.stop_all().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use esper_protocol::RequestEvent;

    use super::*;
    use crate::ops::tests::{Stack, TOKEN};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AutoscaleArgs,
    }

    fn parse(argv: &[&str]) -> AutoscaleArgs {
        let mut full = vec!["autoscale"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).unwrap().args
    }

    #[test]
    fn desired_is_depth_over_target_rounded_up_and_clamped() {
        assert_eq!(desired_workers(0, 1000, 1, 4), 1);
        assert_eq!(desired_workers(0, 1000, 0, 4), 0);
        assert_eq!(desired_workers(1, 1000, 0, 4), 1);
        assert_eq!(desired_workers(1000, 1000, 1, 4), 1);
        assert_eq!(desired_workers(1001, 1000, 1, 4), 2);
        assert_eq!(desired_workers(3999, 1000, 1, 4), 4);
        assert_eq!(desired_workers(1_000_000, 1000, 2, 10), 10);
        assert_eq!(desired_workers(u64::MAX, 1, 1, 10), 10);
        assert_eq!(desired_workers(5, 0, 1, 10), 5, "a zero target counts as 1");
        assert_eq!(desired_workers(0, 1000, 3, 2), 2, "never above max");
    }

    #[test]
    fn restarts_back_off_exponentially_to_a_cap() {
        let secs: Vec<u64> = (1..=8).map(|f| restart_backoff(f).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(restart_backoff(0), BACKOFF_FIRST);
        assert_eq!(restart_backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn the_pool_grows_at_once_and_shrinks_after_the_delay() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = Planner::new(1, 10, 1000, Duration::from_secs(60));
        assert_eq!(
            p.plan(at(0), 5000, 1),
            Plan {
                desired: 5,
                target: 5
            }
        );
        // The queue drains: keep five until a full minute has asked for fewer.
        assert_eq!(p.plan(at(10), 0, 5).target, 5);
        assert_eq!(p.plan(at(40), 1500, 5).target, 5);
        assert_eq!(
            p.plan(at(61), 0, 5).target,
            5,
            "at 1s, 5 were still asked for"
        );
        // From 10s to 70s the most asked for was 2 (at 40s).
        assert_eq!(
            p.plan(at(70), 0, 5),
            Plan {
                desired: 1,
                target: 2
            }
        );
        assert_eq!(
            p.plan(at(101), 0, 2).target,
            2,
            "the 40s reading held until 61s"
        );
        assert_eq!(p.plan(at(121), 0, 2).target, 1);
        // A burst scales up at once, whatever the history.
        assert_eq!(p.plan(at(122), 9000, 1).target, 9);

        let mut p = Planner::new(2, 10, 100, Duration::ZERO);
        assert_eq!(p.plan(at(0), 1000, 2).target, 10);
        assert_eq!(p.plan(at(1), 0, 10).target, 2, "no delay: down at once");
        assert_eq!(p.plan(at(2), 250, 2).target, 3);

        // Readings that stopped (control plane away) do not count as a quiet window.
        let mut p = Planner::new(1, 10, 1000, Duration::from_secs(60));
        assert_eq!(p.plan(at(0), 4000, 1).target, 4);
        assert_eq!(p.plan(at(600), 0, 4).target, 4);
        assert_eq!(p.plan(at(630), 0, 4).target, 4);
        assert_eq!(p.plan(at(660), 0, 4).target, 1);
    }

    #[test]
    fn flags_parse_and_are_checked() {
        let a = parse(&[
            "--min",
            "2",
            "--max",
            "10",
            "--target-queue-depth",
            "1000",
            "--",
            "--concurrency",
            "8",
        ]);
        assert_eq!((a.min, a.max, a.target_queue_depth), (2, 10, 1000));
        assert_eq!(a.interval, Duration::from_secs(10));
        assert_eq!(a.worker_args, ["--concurrency", "8"]);
        a.check().unwrap();
        let argv = a.worker_argv(Some(Path::new("conf/esper.toml")), 3);
        assert_eq!(
            argv,
            [
                "worker",
                "run",
                "engine",
                "--worker-id",
                "autoscale-3",
                "--listen",
                "127.0.0.1:9093",
                "--config",
                "conf/esper.toml",
                "--concurrency",
                "8"
            ]
            .map(OsString::from)
        );
        let ports: Vec<_> = (1..=6).filter_map(|n| a.worker_port(n)).collect();
        assert_eq!(
            ports,
            [9091, 9092, 9093, 9094, 9096, 9097],
            "9095 is the proxy's"
        );
        for (argv, message) in [
            (vec!["--min", "5", "--max", "4"], "invalid --min = `5`"),
            (vec!["--max", "0"], "invalid --max = `0`"),
            (vec!["--target-queue-depth", "0"], "--target-queue-depth"),
            (vec!["--interval", "10ms"], "invalid --interval"),
            (vec!["--base-port", "65535", "--max", "2"], "--base-port"),
        ] {
            let err = parse(&argv).check().unwrap_err().to_string();
            assert!(err.contains(message), "{argv:?}: {err}");
        }
    }

    #[test]
    fn bad_worker_arguments_fail_before_anything_starts() {
        preflight(&parse(&["--", "--concurrency", "8"]), None).unwrap();
        let err = preflight(&parse(&["--", "--worker-id", "mine"]), None).unwrap_err();
        assert!(
            err.to_string().contains("cannot be used multiple times"),
            "{err}"
        );
        let err = preflight(&parse(&["--", "--concurrency", "0"]), None).unwrap_err();
        assert!(format!("{err:#}").contains("concurrency"), "{err:#}");
        let err = preflight(&parse(&["--worker-id-prefix", "no spaces"]), None).unwrap_err();
        assert!(format!("{err:#}").contains("worker_id"), "{err:#}");
    }

    /// Children that run `sh -c SCRIPT` instead of a worker.
    fn shell(script: &str) -> Launcher {
        let script = OsString::from(script);
        Launcher {
            program: "sh".into(),
            prefix: "test".into(),
            argv: Arc::new(move |_| vec!["-c".into(), script.clone()]),
        }
    }

    fn alive(pid: u32) -> bool {
        std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn pids(pool: &Pool) -> Vec<(usize, u32)> {
        pool.workers
            .iter()
            .filter_map(|w| w.child.as_ref().and_then(|c| c.id()).map(|p| (w.n, p)))
            .collect()
    }

    #[tokio::test]
    async fn the_pool_starts_stops_newest_first_and_restarts_the_dead() {
        let mut pool = Pool::new(shell("exec sleep 30"), Duration::from_secs(5));
        pool.resize(3).await;
        let started = pids(&pool);
        assert_eq!(started.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(started.iter().all(|p| alive(p.1)));

        pool.resize(1).await;
        assert_eq!(pids(&pool), [started[0]], "the newest two left");
        assert!(!alive(started[1].1) && !alive(started[2].1));

        // A worker that dies is restarted after its backoff.
        let first = started[0].1;
        std::process::Command::new("kill")
            .args(["-KILL", &first.to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.workers[0].child.is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            pool.reap(Instant::now());
        }
        assert_eq!(pool.len(), 1, "a dead worker is still a member");
        assert!(pids(&pool).is_empty());
        pool.restart_due(Instant::now());
        assert!(pids(&pool).is_empty(), "not before the backoff");
        pool.restart_due(Instant::now() + BACKOFF_FIRST);
        let restarted = pids(&pool);
        assert_eq!(restarted.len(), 1);
        assert_ne!(restarted[0].1, first);

        // A member waiting for its restart leaves before a running one.
        pool.resize(2).await;
        let two = pids(&pool);
        pool.workers[0].child = None;
        pool.resize(1).await;
        assert_eq!(pids(&pool), [two[1]]);
        pool.stop_all().await;
        assert_eq!(pool.len(), 0);
        assert!(!alive(two[1].1));
    }

    #[tokio::test]
    async fn a_worker_that_ignores_sigterm_is_killed_after_the_timeout() {
        let marker = std::env::temp_dir().join(format!("esper-trap-{}", uuid::Uuid::new_v4()));
        let script = format!("trap '' TERM; : > '{}'; exec sleep 30", marker.display());
        let mut pool = Pool::new(shell(&script), Duration::from_millis(300));
        pool.resize(1).await;
        let pid = pids(&pool)[0].1;
        // SIGTERM before the trap is set would end the shell at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !marker.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_file(&marker);
        let t = Instant::now();
        pool.stop_all().await;
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!alive(pid));
    }

    #[tokio::test]
    async fn queue_depth_read_through_the_control_plane_sizes_the_pool() {
        let stack = Stack::start().await;
        let args = parse(&[
            "--server",
            &stack.api,
            "--token",
            TOKEN,
            "--min",
            "1",
            "--max",
            "3",
            "--target-queue-depth",
            "10",
            "--interval",
            "100ms",
            "--scale-down-delay",
            "0",
        ]);
        let client = args.api.client().unwrap();
        let mut scaler = Autoscaler::new(&args, client, shell("exec sleep 30"));
        let (trigger, shutdown) = Shutdown::new();
        scaler.pool.resize(args.min).await;

        let ingestion = esper_protocol::IngestionClient::new(&stack.ingestion, None);
        let events = (0..25)
            .map(|i| RequestEvent::new([10, 0, 0, i].into(), "GET", "/"))
            .collect();
        ingestion.ingest(events).await.unwrap();
        scaler.tick(&shutdown).await;
        assert_eq!(scaler.pool.len(), 3, "25 queued, 10 per worker");

        // Claimed events leave the queue: back to the minimum.
        ingestion
            .claim("test", 25, Duration::from_secs(60), Duration::ZERO)
            .await
            .unwrap();
        scaler.next_read = Instant::now();
        scaler.tick(&shutdown).await;
        assert_eq!(scaler.pool.len(), 1);

        // Without a control plane the pool keeps its size.
        let mut away = Autoscaler::new(
            &parse(&["--min", "2", "--max", "3", "--target-queue-depth", "1"]),
            ControlClient::new("http://127.0.0.1:9", None).unwrap(),
            shell("exec sleep 30"),
        );
        away.pool.resize(2).await;
        away.tick(&shutdown).await;
        assert_eq!(away.pool.len(), 2);
        assert!(away.reading_failed);

        trigger.trigger();
        scaler.pool.stop_all().await;
        away.pool.stop_all().await;
    }
}
