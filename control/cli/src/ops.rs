//! The seed's operator verbs on `esper` itself: `esper server stop` and `esper worker
//! status`. They speak to the control plane through `esperctl`'s API client, tables and
//! output formats, so both tools answer alike.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use esper_common::config::parse_duration_secs;
use esper_control::ctl::table::uptime;
use esper_control::ctl::{ControlClient, CtlError, Ctx, DEFAULT_SERVER, OutputFormat};
use serde::Serialize;

/// Time a stopped server gets, beyond its drain, to close its listeners.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often `server stop` checks whether the server still answers.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// A probe that gets no answer within this long is inconclusive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A cheap authenticated route: any HTTP answer, even 401, means "still serving".
const PROBE_PATH: &str = "/api/v1/workers";

/// How to reach the control-plane API (the same flags and variables as `esperctl`).
#[derive(Clone, clap::Args)]
pub struct ApiArgs {
    /// Control-plane API URL.
    #[arg(long, env = "ESPER_SERVER", default_value = DEFAULT_SERVER, value_name = "URL")]
    pub server: String,
    /// API bearer token.
    #[arg(
        long,
        env = "ESPER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Also trust this PEM CA certificate (a control plane with a private CA).
    #[arg(long, env = "ESPER_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

// By hand, so that printing the parsed command line never shows the token.
impl std::fmt::Debug for ApiArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiArgs")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "(hidden)"))
            .field("ca_cert", &self.ca_cert)
            .field("output", &self.output)
            .finish()
    }
}

impl ApiArgs {
    /// A client of the configured server.
    pub fn client(&self) -> Result<ControlClient, CtlError> {
        esper_control::ctl::client(&self.server, self.token.clone(), self.ca_cert.as_deref())
    }

    /// Is `--output json` asked for?
    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }
}

/// Flags of `esper server stop`.
#[derive(Debug, Clone, clap::Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Let in-flight requests finish (up to --timeout) before the server exits; without
    /// it the server stops at once.
    #[arg(long)]
    pub graceful: bool,
    /// With --graceful, how long in-flight requests may run (e.g. 30s; bare numbers are
    /// seconds).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration_secs)]
    pub timeout: Duration,
}

/// What `esper server stop` saw (the `--output json` form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StopOutcome {
    pub server: String,
    pub graceful: bool,
    /// The drain the server granted in-flight requests.
    pub timeout_secs: u64,
    /// Did the server stop answering before the deadline?
    pub stopped: bool,
    /// From the server's acceptance to the first probe it did not answer (or the deadline).
    pub waited_ms: u64,
}

/// `esper server stop`: asks the control plane to shut down (`POST
/// /api/v1/admin/shutdown`), then waits until it stops answering, at most its drain plus
/// a few seconds. Prints one line of progress and one of result; exit 1 when the server
/// still answers at the deadline.
pub async fn stop(args: StopArgs) -> anyhow::Result<ExitCode> {
    let json = args.api.json();
    let progress = |server: &str, timeout_secs: u64| {
        if json {
            return;
        }
        if args.graceful {
            println!(
                "stopping the control plane at {server}: in-flight requests get up to {}",
                uptime(timeout_secs)
            );
        } else {
            println!("stopping the control plane at {server} now");
        }
        // The result line may be seconds away; show this one before waiting.
        let _ = std::io::stdout().flush();
    };
    let outcome = match stop_server(&args, progress).await {
        Ok(o) => o,
        Err(e) => return Ok(failed(&e)),
    };
    if json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else if outcome.stopped {
        println!(
            "stopped after {:.1}s",
            Duration::from_millis(outcome.waited_ms).as_secs_f64()
        );
    } else {
        println!(
            "still answering after {:.0}s; see the server's log",
            Duration::from_millis(outcome.waited_ms).as_secs_f64()
        );
    }
    Ok(if outcome.stopped {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Requests the shutdown and waits for it; `accepted` is called with the server URL and
/// the drain the server granted, once it has accepted.
pub async fn stop_server(
    args: &StopArgs,
    accepted: impl FnOnce(&str, u64),
) -> Result<StopOutcome, CtlError> {
    let client = args.api.client()?;
    // The API counts whole seconds; round up so `--timeout 500ms` still drains.
    let timeout =
        Duration::from_secs(args.timeout.as_secs() + u64::from(args.timeout.subsec_nanos() > 0));
    let answer = client
        .shutdown(args.graceful, args.graceful.then_some(timeout))
        .await?;
    let started = Instant::now();
    accepted(client.server(), answer.timeout_secs);
    // The server's answer, so no sum is trusted not to overflow.
    let deadline = started
        .checked_add(Duration::from_secs(answer.timeout_secs).saturating_add(STOP_GRACE))
        .unwrap_or(started + Duration::from_secs(365 * 24 * 3600));
    let stopped = wait_until_silent(&args.api, deadline).await;
    Ok(StopOutcome {
        server: client.server().to_string(),
        graceful: answer.graceful,
        timeout_secs: answer.timeout_secs,
        stopped,
        waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Polls the API until a request cannot reach it; false if it still answers at `deadline`.
async fn wait_until_silent(api: &ApiArgs, deadline: Instant) -> bool {
    loop {
        // A fresh client each time: a pooled keep-alive connection could outlive the
        // listener and make a stopped server look alive.
        let probe = async {
            let client = api.client()?;
            client.get(PROBE_PATH).await.map(|_| ())
        };
        // Any answer, even an error, and a probe that hangs both mean "not gone yet".
        if let Ok(Err(CtlError::Unreachable { .. })) =
            tokio::time::timeout(PROBE_TIMEOUT, probe).await
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// `esper worker status`: the workers the control plane hears from, as `esperctl workers
/// list` shows them.
pub async fn worker_status(args: ApiArgs) -> anyhow::Result<ExitCode> {
    let result = async {
        let ctx = Ctx {
            client: args.client()?,
            json: args.json(),
        };
        esper_control::ctl::ops::workers(&ctx).await
    }
    .await;
    Ok(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(&e),
    })
}

/// One line on stderr and `esperctl`'s exit code: 2 for input errors, 1 for the rest.
fn failed(e: &CtlError) -> ExitCode {
    eprintln!("esper: {e}");
    ExitCode::from(e.exit_code())
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser;
    use esper_common::{Shutdown, ShutdownTrigger};
    use esper_control::{Config, Listeners, Started};
    use tokio::net::TcpListener;

    use super::*;

    pub(crate) const TOKEN: &str = "ops-test-token-0123456789";

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        stop: StopArgs,
    }

    fn stop_args(argv: &[&str]) -> StopArgs {
        let mut full = vec!["stop"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).unwrap().stop
    }

    /// Brokers and a control plane in this process, on loopback ephemeral ports.
    pub(crate) struct Stack {
        pub api: String,
        pub ingestion: String,
        started: Option<Started>,
        dir: std::path::PathBuf,
        _trigger: ShutdownTrigger,
    }

    impl Stack {
        pub async fn start() -> Stack {
            let (trigger, shutdown) = Shutdown::new();
            let loopback = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
            let ingestion = esper_ingestion::start(
                esper_ingestion::Config::default(),
                loopback().await,
                shutdown.clone(),
            )
            .await
            .unwrap();
            let mitigation = esper_mitigation::start(
                esper_mitigation::Config::default(),
                loopback().await,
                shutdown.clone(),
            )
            .await
            .unwrap();
            let dir = std::env::temp_dir().join(format!("esper-ops-{}", uuid::Uuid::new_v4()));
            let config = Config {
                database_url: format!("sqlite://{}?mode=rwc", dir.join("esper.db").display()),
                ingestion_url: format!("http://{}", ingestion.local_addr()),
                mitigation_url: format!("http://{}", mitigation.local_addr()),
                admin_token: Some(TOKEN.into()),
                ..Config::default()
            };
            let started =
                esper_control::start(config, Listeners::loopback().await.unwrap(), shutdown)
                    .await
                    .unwrap();
            Stack {
                api: format!("http://{}", started.api_addr),
                ingestion: format!("http://{}", ingestion.local_addr()),
                started: Some(started),
                dir,
                _trigger: trigger,
            }
        }
    }

    impl Drop for Stack {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn the_seed_command_line_parses() {
        let a = stop_args(&["--graceful", "--timeout", "30s", "--server", "http://h:1"]);
        assert!(a.graceful);
        assert_eq!(a.timeout, Duration::from_secs(30));
        let a = stop_args(&["--timeout", "45", "--token", "secret-token"]);
        assert!(!a.graceful);
        assert_eq!(a.timeout, Duration::from_secs(45));
        assert!(!format!("{a:?}").contains("secret-token"), "{a:?}");
        let Err(e) = Cli::try_parse_from(["stop", "--timeout", "soon"]) else {
            panic!("a bad duration parses");
        };
        assert!(e.to_string().contains("soon"), "{e}");
    }

    #[tokio::test]
    async fn graceful_stop_waits_until_the_server_is_gone() {
        let mut stack = Stack::start().await;
        let args = stop_args(&[
            "--server",
            &stack.api,
            "--token",
            TOKEN,
            "--graceful",
            "--timeout",
            "3s",
        ]);
        let mut seen = None;
        let outcome = stop_server(&args, |server, secs| {
            seen = Some((server.to_string(), secs))
        })
        .await
        .unwrap();
        assert_eq!(seen, Some((stack.api.clone(), 3)));
        assert!(outcome.stopped, "{outcome:?}");
        assert!(outcome.graceful);
        assert_eq!(outcome.timeout_secs, 3);
        // Nothing was in flight, so the server stops well before its drain limit.
        assert!(outcome.waited_ms < 3_000, "{outcome:?}");
        let started = stack.started.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), started.wait())
            .await
            .expect("the server task ends")
            .unwrap();
    }

    #[tokio::test]
    async fn immediate_stop_and_refusals() {
        let stack = Stack::start().await;
        let wrong = stop_args(&["--server", &stack.api, "--token", "not-the-token"]);
        let err = stop_server(&wrong, |_, _| {}).await.unwrap_err();
        assert!(matches!(err, CtlError::Unauthorized { .. }), "{err}");
        assert_eq!(err.exit_code(), 1);

        let args = stop_args(&["--server", &stack.api, "--token", TOKEN]);
        let outcome = stop_server(&args, |_, _| {}).await.unwrap();
        assert!(outcome.stopped && !outcome.graceful, "{outcome:?}");
        assert_eq!(outcome.timeout_secs, 0);

        // Nothing left to stop: one clear error.
        let err = stop_server(&args, |_, _| {}).await.unwrap_err();
        assert!(matches!(err, CtlError::Unreachable { .. }), "{err}");
        let bad = stop_args(&["--server", "127.0.0.1:8080"]);
        let err = stop_server(&bad, |_, _| {}).await.unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
    }

    #[tokio::test]
    async fn worker_status_reads_the_fleet() {
        let stack = Stack::start().await;
        let ok = ApiArgs {
            server: stack.api.clone(),
            token: Some(TOKEN.into()),
            ca_cert: None,
            output: OutputFormat::Json,
        };
        assert_eq!(worker_status(ok).await.unwrap(), ExitCode::SUCCESS);
        let refused = ApiArgs {
            server: stack.api.clone(),
            token: None,
            ca_cert: None,
            output: OutputFormat::Table,
        };
        assert_eq!(worker_status(refused).await.unwrap(), ExitCode::FAILURE);
    }
}
