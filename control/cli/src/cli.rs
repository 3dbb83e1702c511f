//! The `esper` command tree: parses flags, loads each service's configuration with the
//! documented precedence (flags > environment > `--config` file > defaults), sets up
//! logging, runs the service until SIGTERM/SIGINT, and maps errors to one line and a
//! non-zero exit code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use esper_common::config::{self, ConfigError, ProcessEnv, Reloaded, Vars};
use esper_common::telemetry::{self, LogFormat};
use esper_common::{Shutdown, shutdown};
use serde::de::DeserializeOwned;

use crate::{autoscale, dev, ops};

/// Esper: self-hosted bot and abuse mitigation.
#[derive(Debug, Parser)]
#[command(name = "esper", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file: TOML (one file may hold `[server]`, `[ingestion]`,
    /// `[mitigation]`, `[worker]`, `[proxy]` sections) or `.env` style.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `esper_engine=debug,info` (env LOG_LEVEL).
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// `text` or `json` (env LOG_FORMAT).
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Exports OpenTelemetry traces over OTLP/gRPC, configured by the standard OTEL_*
    /// variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER...)
    /// (env ESPER_TRACING).
    #[arg(long, global = true)]
    pub tracing: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole stack in one process on the embedded defaults (loopback only).
    Dev(dev::DevArgs),
    /// The control-plane server.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Engine workers.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// The ingestion and mitigation brokers.
    #[command(subcommand)]
    Broker(BrokerCommand),
    /// The proxy (data plane).
    #[command(subcommand)]
    Proxy(ProxyCommand),
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Runs the control plane.
    Run(esper_control::Args),
    /// Prints a complete, commented configuration template.
    Config,
    /// Applies pending database migrations and exits.
    Migrate(esper_control::Args),
    /// Asks a running server to shut down.
    Stop(ops::StopArgs),
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Runs a worker of the given kind.
    #[command(subcommand)]
    Run(WorkerKind),
    /// Prints a complete, commented configuration template.
    Config,
    /// Lists the workers the control plane hears from.
    Status(ops::ApiArgs),
    /// Keeps between --min and --max local engine workers running, by queue depth.
    Autoscale(autoscale::AutoscaleArgs),
}

#[derive(Debug, Subcommand)]
pub enum WorkerKind {
    /// The policy-engine worker: claims events, evaluates policies, publishes decisions.
    Engine(EngineRun),
}

/// `esper worker run engine`: the worker's options, and profiling.
#[derive(Debug, clap::Args)]
pub struct EngineRun {
    #[command(flatten)]
    pub args: esper_engine::Args,
    /// Samples the worker's CPU use while it runs and writes a pprof profile to FILE
    /// when it stops (`go tool pprof FILE`).
    #[arg(long, value_name = "FILE")]
    pub cpuprofile: Option<PathBuf>,
    /// Samples the worker's allocations while it runs and writes a pprof heap profile to
    /// FILE when it stops (`go tool pprof FILE`: memory in use by call stack, or
    /// allocated with `-sample_index=alloc_space`).
    #[arg(long, value_name = "FILE")]
    pub memprofile: Option<PathBuf>,
    /// Mean bytes allocated between two samples of --memprofile: lower records more
    /// (and costs more).
    #[arg(long, value_name = "BYTES", default_value_t = crate::memprofile::DEFAULT_RATE,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub memprofile_rate: u64,
}

#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Runs a broker.
    #[command(subcommand)]
    Run(BrokerKind),
    /// Prints a complete, commented configuration template for a broker.
    Config {
        /// `ingestion` or `mitigation`.
        #[arg(value_parser = ["ingestion", "mitigation"])]
        kind: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BrokerKind {
    /// The ingestion broker: a bounded, leased queue of request events.
    Ingestion(esper_ingestion::Args),
    /// The mitigation broker: active mitigations and their delta stream.
    Mitigation(esper_mitigation::Args),
}

#[derive(Debug, Subcommand)]
pub enum ProxyCommand {
    /// Runs the proxy.
    Run(Box<esper_proxy::Args>),
    /// Prints a complete, commented configuration template.
    Config,
}

/// Logging options after env and flags.
#[derive(Debug, Clone, PartialEq)]
struct LogOptions {
    level: String,
    format: LogFormat,
    include_caller: bool,
    tracing: bool,
}

/// The `[log]` section of a TOML config file, or `LOG_LEVEL` / `LOG_FORMAT` in a `.env` one.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct LogSettings {
    level: Option<String>,
    format: Option<LogFormat>,
    /// Source file and line on every log line (`LOG_INCLUDE_CALLER`).
    include_caller: Option<bool>,
    /// Debug mode: default level `debug`, and callers shown (`ESPER_DEBUG`).
    debug: Option<bool>,
    /// Comma-separated subsystems logged at debug (`ESPER_DEBUG_SUBSYSTEM`).
    debug_subsystem: Option<String>,
    /// OpenTelemetry traces over OTLP (`ESPER_TRACING`, `--tracing`).
    tracing: Option<bool>,
}

/// The `[log]` settings of `config` (or of its `.env` lines), the environment winning.
fn log_settings(config: Option<&Path>) -> Result<LogSettings, ConfigError> {
    config::load_section(
        config,
        Some("log"),
        &ProcessEnv,
        |s: &mut LogSettings, vars| {
            vars.string_opt(&["LOG_LEVEL", "ESPER_LOG_LEVEL"], &mut s.level);
            vars.bool_opt(&["LOG_INCLUDE_CALLER"], &mut s.include_caller)?;
            vars.bool_opt(&["ESPER_DEBUG"], &mut s.debug)?;
            vars.string_opt(&["ESPER_DEBUG_SUBSYSTEM"], &mut s.debug_subsystem);
            vars.bool_opt(&["ESPER_TRACING"], &mut s.tracing)?;
            vars.parse_opt(&["LOG_FORMAT", "ESPER_LOG_FORMAT"], &mut s.format)
        },
    )
}

/// The log filter: `flag` (`--log-level`) or the settings' level, with the debug
/// switches.
fn log_level(file: &LogSettings, flag: Option<&str>) -> Result<String, ConfigError> {
    let subsystems = file.debug_subsystem.as_deref().unwrap_or("");
    telemetry::filter(
        flag.or(file.level.as_deref()),
        file.debug.unwrap_or(false),
        subsystems,
    )
    .map_err(|e| ConfigError::invalid("ESPER_DEBUG_SUBSYSTEM", subsystems, e))
}

/// Where a reload reads the log level again: the `--config` file given at start, under
/// the `--log-level` flag (the environment stays as it was at start); and the level in
/// force.
struct LogSource {
    config: Option<PathBuf>,
    flag: Option<String>,
    level: std::sync::Mutex<String>,
}

static LOG_SOURCE: std::sync::OnceLock<LogSource> = std::sync::OnceLock::new();

/// Reads the log level again and applies it when it changed; `Ok(true)` when it did.
/// A level that does not parse is refused and the one in force stays.
fn reload_log_level() -> Result<bool, String> {
    let Some(source) = LOG_SOURCE.get() else {
        return Ok(false);
    };
    let level = log_settings(source.config.as_deref())
        .and_then(|file| log_level(&file, source.flag.as_deref()))
        .map_err(|e| e.to_string())?;
    let mut current = source
        .level
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *current == level {
        return Ok(false);
    }
    telemetry::set_level(&level)?;
    *current = level;
    Ok(true)
}

fn log_options(cli: &Cli) -> Result<LogOptions, ConfigError> {
    let file = log_settings(cli.config.as_deref())?;
    let debug = file.debug.unwrap_or(false);
    let level = log_level(&file, cli.log_level.as_deref())?;
    let include_caller = file.include_caller.unwrap_or(debug);
    let mut format = file.format.unwrap_or_default();
    if let Some(f) = &cli.log_format {
        format = f
            .parse()
            .map_err(|e: String| ConfigError::invalid("--log-format", f, e))?;
    }
    Ok(LogOptions {
        level,
        format,
        include_caller,
        tracing: cli.tracing || file.tracing.unwrap_or(false),
    })
}

/// The service name traces carry when `OTEL_SERVICE_NAME` is not set.
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Dev(_) => "esper-dev",
        Command::Server(_) => "esper-server",
        Command::Worker(_) => "esper-worker",
        Command::Broker(BrokerCommand::Run(BrokerKind::Ingestion(_))) => "esper-ingestion",
        Command::Broker(BrokerCommand::Run(BrokerKind::Mitigation(_))) => "esper-mitigation",
        Command::Broker(_) => "esper-broker",
        Command::Proxy(_) => "esper-proxy",
    }
}

/// Loads `C` from the `--config` file's `section`, the environment, then `flags`, and
/// validates it.
pub fn load<C>(
    file: Option<&Path>,
    section: &str,
    apply_env: impl Fn(&mut C, &Vars<'_>) -> Result<(), ConfigError>,
    apply_flags: impl FnOnce(&mut C),
    validate: impl Fn(&C) -> Result<(), ConfigError>,
) -> Result<C, ConfigError>
where
    C: DeserializeOwned + Default,
{
    let mut cfg: C = config::load_section(file, Some(section), &ProcessEnv, apply_env)?;
    apply_flags(&mut cfg);
    validate(&cfg)?;
    Ok(cfg)
}

/// Parses the process's command line. A usage error is one line on stderr, what is
/// wrong and the usage of the command it concerns, with exit code 2; help and version
/// print as clap prints them.
pub fn parse_args<P: Parser>() -> P {
    P::try_parse().unwrap_or_else(|e| {
        let argv: Vec<String> = std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        match usage_error(&e, &P::command(), &argv) {
            Some(line) => {
                eprintln!("{}: {line}", P::command().get_name());
                std::process::exit(2)
            }
            None => e.exit(),
        }
    })
}

/// `e`, from parsing `argv` as `cmd`, as one line, or `None` for help and version, which
/// are not errors.
pub fn usage_error(e: &clap::Error, cmd: &clap::Command, argv: &[String]) -> Option<String> {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return None;
    }
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut line = lines
        .next()
        .map(|l| l.trim_start_matches("error: ").to_string())
        .unwrap_or_else(|| "invalid command line".into());
    let mut usage = None;
    for l in lines {
        if let Some(tip) = l.strip_prefix("tip: ") {
            line.push_str("; ");
            line.push_str(tip);
        } else if let Some(u) = l.strip_prefix("Usage: ") {
            usage = Some(u);
        } else if usage.is_none() && !l.starts_with("For more information") {
            // What the first line announces: the arguments missing, one a line.
            if !line.ends_with(':') {
                line.push(',');
            }
            line.push(' ');
            line.push_str(l);
        }
    }
    match usage {
        Some(u) => line.push_str(&format!(
            " (usage: {})",
            without(u, &from_environment(cmd, argv))
        )),
        None => line.push_str(" (see --help)"),
    }
    Some(line)
}

/// The options of `cmd` (any subcommand) whose value `argv` left to the environment:
/// clap's usage names them as if they were required (`--token <TOKEN>` with
/// `ESPER_TOKEN` set).
fn from_environment(cmd: &clap::Command, argv: &[String]) -> Vec<String> {
    let typed = |arg: &clap::Arg| {
        argv.iter().any(|a| {
            let long = arg.get_long().is_some_and(|l| {
                a.strip_prefix("--")
                    .and_then(|r| r.strip_prefix(l))
                    .is_some_and(|r| r.is_empty() || r.starts_with('='))
            });
            let short = arg.get_short().is_some_and(|c| {
                a.len() > 1 && a.starts_with('-') && !a.starts_with("--") && a[1..].starts_with(c)
            });
            long || short
        })
    };
    let mut out = Vec::new();
    let mut stack = vec![cmd];
    while let Some(c) = stack.pop() {
        for arg in c.get_arguments() {
            let set = arg
                .get_env()
                .and_then(std::env::var_os)
                .is_some_and(|v| !v.is_empty());
            if let Some(long) = arg.get_long()
                && set
                && !typed(arg)
            {
                out.push(format!("--{long}"));
            }
        }
        stack.extend(c.get_subcommands());
    }
    out
}

/// `usage` without the options named in `drop` (and their value placeholders).
fn without(usage: &str, drop: &[String]) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut words = usage.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if drop.iter().any(|d| d == w) {
            if words.peek().is_some_and(|v| v.starts_with('<')) {
                words.next();
            }
            continue;
        }
        out.push(w);
    }
    out.join(" ")
}

/// Entry point of the `esper` binary.
pub fn main() -> ExitCode {
    // This binary carries the proxy: its control plane refuses what no proxy would apply.
    esper_control::check_proxy_documents_with(esper_proxy::check_document);
    let cli: Cli = parse_args();
    let log = match log_options(&cli) {
        Ok(l) => l,
        Err(e) => return fail(&e.into()),
    };
    let traced = log.tracing.then(|| service_name(&cli.command));
    let tracing = match telemetry::init(&log.level, log.format, log.include_caller, traced) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("esper: {e}");
            return ExitCode::from(2);
        }
    };
    let _ = LOG_SOURCE.set(LogSource {
        config: cli.config.clone(),
        flag: cli.log_level.clone(),
        level: std::sync::Mutex::new(log.level.clone()),
    });
    // The engine worker's runtime is sized by its `io_threads`; everything else gets
    // one thread per core.
    let threads = match &cli.command {
        Command::Worker(WorkerCommand::Run(WorkerKind::Engine(run))) => {
            match worker_config(&run.args, cli.config.as_deref()) {
                Ok(cfg) => cfg.io_threads,
                Err(e) => return fail(&e),
            }
        }
        _ => 0,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads as usize);
    }
    let runtime = match builder.enable_all().thread_name("esper").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("esper: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // Background tasks that ignore shutdown must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(2));
    // Last, so the spans of tasks stopped just above are exported too.
    if let Some(tracing) = tracing {
        tracing.shutdown();
    }
    match result {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("esper: {}", one_line(e));
    ExitCode::FAILURE
}

/// The chain of causes on one line, outermost first. A cause that an outer error
/// already printed as part of its own message is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

/// Runs `f` with a shutdown handle fired by SIGTERM/SIGINT.
async fn with_signals<F, Fut>(f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let (trigger, handle) = Shutdown::new();
    tokio::spawn(async move {
        shutdown::wait_for_signal().await;
        trigger.trigger();
        // Keep the trigger alive (dropping it also fires, which is fine here).
        std::future::pending::<()>().await;
    });
    f(handle).await?;
    Ok(ExitCode::SUCCESS)
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = cli.config.as_deref();
    match cli.command {
        Command::Dev(args) => with_signals(|s| dev::run(args, file, s)).await,
        Command::Server(cmd) => server(cmd, file).await,
        Command::Worker(cmd) => worker(cmd, file).await,
        Command::Broker(cmd) => broker(cmd, file).await,
        Command::Proxy(cmd) => proxy(cmd, file).await,
    }
}

fn worker_config(
    args: &esper_engine::Args,
    file: Option<&Path>,
) -> anyhow::Result<esper_engine::Config> {
    Ok(load(
        file,
        "worker",
        esper_engine::Config::apply_env,
        |c| args.apply(c),
        esper_engine::Config::validate,
    )?)
}

fn server_config(
    args: &esper_control::Args,
    file: Option<&Path>,
) -> anyhow::Result<esper_control::Config> {
    Ok(load(
        file,
        "server",
        esper_control::Config::apply_env,
        |c| args.apply(c),
        esper_control::Config::validate,
    )?)
}

async fn server(cmd: ServerCommand, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    match cmd {
        ServerCommand::Config => {
            esper_common::stdout::write(esper_control::Config::template())?;
            Ok(ExitCode::SUCCESS)
        }
        ServerCommand::Migrate(args) => {
            let cfg = server_config(&args, file)?;
            let applied = esper_control::migrate(&cfg).await?;
            if applied.is_empty() {
                esper_common::stdout::line("database is up to date")?;
            }
            for m in applied {
                esper_common::stdout::line(&format!("applied {m}"))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ServerCommand::Run(args) => {
            let cfg = server_config(&args, file)?;
            let path = file.map(Path::to_path_buf);
            let reloader = apply_once_started(
                &cfg,
                move || server_config(&args, path.as_deref()),
                &[
                    "ESPER_ADMIN_TOKEN",
                    "ESPER_BROKER_TOKEN",
                    "ADMIN_TOKEN",
                    "ESPER_INGESTION_URL",
                    "ESPER_MITIGATION_URL",
                    "LOG_LEVEL",
                    "ESPER_LOG_LEVEL",
                ],
                |r: esper_control::Reloader, cfg| Box::pin(async move { r.apply(&cfg).await }),
            );
            with_signals(|shutdown| async move {
                let listeners = esper_control::Listeners::bind(&cfg).await?;
                let started = esper_control::start(cfg, listeners, shutdown).await?;
                let _ = reloader.set(started.reloader.clone());
                if let Some(token) = &started.generated_token {
                    println!("admin API token (shown once, store it): {token}");
                }
                started.wait().await?;
                Ok(())
            })
            .await
        }
        ServerCommand::Stop(args) => ops::stop(args).await,
    }
}

/// Most ports tried past a taken default worker ops port.
const WORKER_PORT_TRIES: u16 = 64;

/// Binds a worker's ops listener. Workers started side by side with one configuration
/// (a shell loop, supervisor's `numprocs`, `esper-worker@N` units) each need a port: on
/// the default port (9091, whatever the address: the shipped files set 127.0.0.1:9091),
/// a taken port moves on to the next free one, stepping over the other parts' default
/// ports. Another port is used as given, or the start fails.
async fn bind_worker_ops(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let default_port = listen.port() == esper_engine::Config::default().listen.port();
    bind_moving_on(listen, default_port).await
}

/// Binds `listen`, or with `move_on`, the first free port after it when it is taken.
async fn bind_moving_on(
    listen: SocketAddr,
    move_on: bool,
) -> anyhow::Result<tokio::net::TcpListener> {
    let what = "worker ops listener";
    let first = esper_common::http::bind(what, listen).await;
    let taken = matches!(&first, Err(e) if e.in_use());
    if !taken || !move_on {
        return Ok(first?);
    }
    let next = (listen.port().saturating_add(1)..=u16::MAX)
        .filter(|p| !crate::autoscale::RESERVED_PORTS.contains(p))
        .take(usize::from(WORKER_PORT_TRIES));
    for port in next {
        let addr = SocketAddr::new(listen.ip(), port);
        match esper_common::http::bind(what, addr).await {
            Ok(l) => {
                tracing::info!(
                    taken = %listen,
                    listen = %addr,
                    "the default ops port is taken (another worker on this host?); using the next free one"
                );
                return Ok(l);
            }
            Err(e) if e.in_use() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(first?)
}

async fn worker(cmd: WorkerCommand, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkerCommand::Config => {
            esper_common::stdout::write(esper_engine::Config::template())?;
            Ok(ExitCode::SUCCESS)
        }
        WorkerCommand::Status(args) => ops::worker_status(args).await,
        WorkerCommand::Autoscale(args) => {
            with_signals(|s| autoscale::run(args, file.map(Path::to_path_buf), s)).await
        }
        WorkerCommand::Run(WorkerKind::Engine(run)) => {
            let cfg = worker_config(&run.args, file)?;
            let (args, path) = (run.args.clone(), file.map(Path::to_path_buf));
            let connections = esper_engine::Connections::new(&cfg);
            let taken = connections.clone();
            apply_on_hangup(
                &cfg,
                move || worker_config(&args, path.as_deref()),
                WORKER_FIXED,
                move |cfg| {
                    let done = taken.apply(&cfg);
                    Box::pin(async move { done })
                },
            );
            let profile = run
                .cpuprofile
                .as_deref()
                .map(crate::profile::CpuProfile::start)
                .transpose()?;
            let heap = run
                .memprofile
                .as_deref()
                .map(|path| crate::memprofile::MemProfile::start(path, run.memprofile_rate))
                .transpose()?;
            let result = with_signals(|shutdown| async move {
                let ops = bind_worker_ops(cfg.listen).await?;
                esper_engine::run_with(cfg, ops, shutdown, connections).await?;
                Ok(())
            })
            .await;
            // Written however the worker ended: a failure is what one profiles. Heap
            // sampling stops first, so the CPU profile's report is not recorded in it.
            if let Some(heap) = &heap {
                heap.stop();
            }
            let written = [
                ("CPU", profile.map(crate::profile::CpuProfile::write)),
                ("heap", heap.map(crate::memprofile::MemProfile::write)),
            ];
            let mut result = result;
            for (kind, outcome) in written {
                if let Some(Err(e)) = outcome {
                    match result {
                        Ok(_) => result = Err(e),
                        Err(_) => tracing::error!(error = %e, "the {kind} profile was not written"),
                    }
                }
            }
            result
        }
    }
}

async fn broker(cmd: BrokerCommand, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    match cmd {
        BrokerCommand::Config { kind } => {
            if kind == "ingestion" {
                esper_common::stdout::write(esper_ingestion::Config::template())?;
            } else {
                esper_common::stdout::write(esper_mitigation::Config::template())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        BrokerCommand::Run(BrokerKind::Ingestion(args)) => {
            let read = move |file: Option<&Path>| {
                load(
                    file,
                    "ingestion",
                    esper_ingestion::Config::apply_env,
                    |c| args.apply(c),
                    esper_ingestion::Config::validate,
                )
            };
            let cfg = read(file)?;
            let path = file.map(Path::to_path_buf);
            let reloader = apply_once_started(
                &cfg,
                move || Ok(read(path.as_deref())?),
                INGESTION_FIXED,
                |r: esper_ingestion::Reloader, cfg| Box::pin(async move { r.apply(&cfg) }),
            );
            with_signals(|shutdown| async move {
                let l = esper_common::http::bind("ingestion broker", cfg.listen).await?;
                let broker = esper_ingestion::start(cfg, l, shutdown).await?;
                let _ = reloader.set(broker.reloader());
                broker.wait().await?;
                Ok(())
            })
            .await
        }
        BrokerCommand::Run(BrokerKind::Mitigation(args)) => {
            let read = move |file: Option<&Path>| {
                load(
                    file,
                    "mitigation",
                    esper_mitigation::Config::apply_env,
                    |c| args.apply(c),
                    esper_mitigation::Config::validate,
                )
            };
            let cfg = read(file)?;
            let path = file.map(Path::to_path_buf);
            let reloader = apply_once_started(
                &cfg,
                move || Ok(read(path.as_deref())?),
                MITIGATION_FIXED,
                |r: esper_mitigation::Reloader, cfg| Box::pin(async move { r.apply(&cfg) }),
            );
            with_signals(|shutdown| async move {
                let l = esper_common::http::bind("mitigation broker", cfg.listen).await?;
                let broker = esper_mitigation::start(cfg, l, shutdown).await?;
                let _ = reloader.set(broker.reloader());
                broker.wait().await?;
                Ok(())
            })
            .await
        }
    }
}

async fn proxy(cmd: ProxyCommand, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    match cmd {
        ProxyCommand::Config => {
            esper_common::stdout::write(esper_proxy::Config::template())?;
            Ok(ExitCode::SUCCESS)
        }
        ProxyCommand::Run(args) => {
            let cfg = load(
                file,
                "proxy",
                esper_proxy::Config::apply_env,
                |c| args.apply(c),
                esper_proxy::Config::validate,
            )?;
            let file = file.map(Path::to_path_buf);
            with_signals(|shutdown| async move {
                let handle = esper_proxy::start(cfg, esper_proxy::Listeners::default(), shutdown)
                    .await
                    .context("proxy")?;
                let reloads = tokio::spawn(reload_on_sighup(handle.reloader(), args, file));
                let result = handle.wait().await;
                reloads.abort();
                result?;
                Ok(())
            })
            .await
        }
    }
}

/// The environment variables of the settings (tokens, service URLs, the log level) each
/// service can take on a reload: one set in the process's environment is fixed at start (it wins
/// over the file read again).
const INGESTION_FIXED: &[&str] = &[
    "ESPER_BROKER_TOKEN",
    "ADMIN_TOKEN",
    "ESPER_BROKER_PREVIOUS_TOKEN",
    "LOG_LEVEL",
    "ESPER_LOG_LEVEL",
];
const MITIGATION_FIXED: &[&str] = &[
    "ESPER_BROKER_TOKEN",
    "ADMIN_TOKEN",
    "ESPER_BROKER_PREVIOUS_TOKEN",
    "ESPER_CONTROL_TOKEN",
    "ESPER_TOKEN",
    "ESPER_CONTROL_URL",
    "LOG_LEVEL",
    "ESPER_LOG_LEVEL",
];
const WORKER_FIXED: &[&str] = &[
    "ESPER_BROKER_TOKEN",
    "ADMIN_TOKEN",
    "ESPER_CONTROL_TOKEN",
    "ESPER_TOKEN",
    "ESPER_INGESTION_URL",
    "ESPER_MITIGATION_URL",
    "ESPER_CONTROL_URL",
    "LOG_LEVEL",
    "ESPER_LOG_LEVEL",
];

const PROXY_FIXED: &[&str] = &[
    "ESPER_BROKER_TOKEN",
    "ADMIN_TOKEN",
    "ESPER_TOKEN",
    "ESPER_INGESTION_URL",
    "ESPER_MITIGATION_URL",
    "ESPER_CONTROL_URL",
    "LOG_LEVEL",
    "ESPER_LOG_LEVEL",
];

/// Names, on a reload, the variables of `fixed_env` set in the process's environment
/// (and a `--log-level` flag): a change to those settings in the file does nothing.
fn report_fixed(fixed_env: &[&str]) {
    let mut fixed: Vec<&str> = fixed_env
        .iter()
        .copied()
        .filter(|n| std::env::var(n).is_ok_and(|v| !v.trim().is_empty()))
        .collect();
    if LOG_SOURCE.get().is_some_and(|s| s.flag.is_some()) {
        fixed.push("--log-level");
    }
    if !fixed.is_empty() {
        tracing::info!(
            variables = %fixed.join(", "),
            "SIGHUP: these settings are set in the environment or on the command line, \
             which are fixed at start and win over the --config file; to change one with a \
             reload, set it in the file instead (a token may also name a file holding it, \
             NAME_FILE)"
        );
    }
}

type Applying = std::pin::Pin<Box<dyn std::future::Future<Output = Reloaded> + Send>>;

/// [`apply_on_hangup`] through the reloader the returned slot is given once the service
/// runs; a SIGHUP before that only reports.
fn apply_once_started<C, R>(
    running: &C,
    read: impl Fn() -> anyhow::Result<C> + Send + 'static,
    fixed_env: &'static [&'static str],
    apply: impl Fn(R, C) -> Applying + Send + Sync + 'static,
) -> std::sync::Arc<std::sync::OnceLock<R>>
where
    C: serde::Serialize + Send + 'static,
    R: Clone + Send + Sync + 'static,
{
    let slot = std::sync::Arc::new(std::sync::OnceLock::<R>::new());
    let held = slot.clone();
    apply_on_hangup(running, read, fixed_env, move |cfg| match held.get() {
        Some(r) => apply(r.clone(), cfg),
        None => Box::pin(async {
            Reloaded {
                applied: Vec::new(),
                kept: vec![(
                    "reload",
                    "the service is still starting; send SIGHUP again".into(),
                )],
            }
        }),
    });
    slot
}

/// On each SIGHUP (what the systemd units' `reload` sends), reads the configuration
/// again (file, environment, the flags given at start), lets `apply` take what the
/// running service can change at once, and logs what it applied, what it kept (and
/// why), and which other settings differ and take effect on a restart, instead of
/// ending as the signal's default would have the process do. A configuration that no
/// longer loads is logged as such. `fixed_env`: the variables of settings `apply` takes
/// which, set in the process's environment, stay as they were at start.
fn apply_on_hangup<C, A>(
    running: &C,
    read: impl Fn() -> anyhow::Result<C> + Send + 'static,
    fixed_env: &'static [&'static str],
    apply: A,
) where
    C: serde::Serialize + Send + 'static,
    A: Fn(C) -> Applying + Send + 'static,
{
    use tokio::signal::unix::{SignalKind, signal};
    // Installed before the service starts, so no SIGHUP finds the default action.
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            return;
        }
    };
    let mut running = serde_json::to_value(running).unwrap_or_default();
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let cfg = match read() {
                Ok(cfg) => cfg,
                Err(e) => {
                    tracing::error!(
                        error = %format!("{e:#}"),
                        "SIGHUP: the configuration does not load; a restart would fail"
                    );
                    continue;
                }
            };
            let now = serde_json::to_value(&cfg).unwrap_or_default();
            let changed = changed_settings(&running, &now);
            let Reloaded {
                mut applied,
                mut kept,
            } = apply(cfg).await;
            match reload_log_level() {
                Ok(true) => applied.push("log_level"),
                Ok(false) => {}
                Err(e) => kept.push(("log_level", e)),
            }
            if !applied.is_empty() {
                tracing::info!(applied = %applied.join(", "), "SIGHUP: settings applied");
            }
            for (setting, why) in &kept {
                tracing::warn!(setting, reason = %why, "SIGHUP: setting kept as it was");
            }
            report_fixed(fixed_env);
            if let (Some(running), Some(now)) = (running.as_object_mut(), now.as_object()) {
                for setting in &applied {
                    match now.get(*setting) {
                        Some(v) => running.insert((*setting).to_string(), v.clone()),
                        None => running.remove(*setting),
                    };
                }
            }
            let later: Vec<&String> = changed
                .iter()
                .filter(|c| !applied.contains(&c.as_str()) && !kept.iter().any(|(k, _)| k == c))
                .collect();
            if !later.is_empty() {
                tracing::warn!(
                    changed = %later.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                    "SIGHUP: changed settings take effect on a restart"
                );
            } else if applied.is_empty() && kept.is_empty() {
                tracing::info!("SIGHUP: the configuration is unchanged");
            }
        }
    });
}

/// The top-level settings whose values differ (names only: some are secrets).
fn changed_settings(running: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let (Some(running), Some(now)) = (running.as_object(), now.as_object()) else {
        return Vec::new();
    };
    let mut changed: Vec<String> = running
        .keys()
        .chain(now.keys())
        .filter(|k| running.get(*k) != now.get(*k))
        .cloned()
        .collect();
    changed.sort();
    changed.dedup();
    changed
}

/// Reads the configuration again (file, environment, the flags given at start) on each
/// SIGHUP and applies it to the running proxy; a bad configuration is logged and the
/// proxy keeps the one it has.
async fn reload_on_sighup(
    reloader: esper_proxy::Reloader,
    args: Box<esper_proxy::Args>,
    file: Option<PathBuf>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloads are off");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the proxy configuration");
        let loaded = load(
            file.as_deref(),
            "proxy",
            esper_proxy::Config::apply_env,
            |c| args.apply(c),
            esper_proxy::Config::validate,
        );
        let result = match loaded {
            Ok(cfg) => reloader.reload(cfg).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(reason) = result {
            tracing::error!(%reason, "configuration not reloaded; the previous one stays");
            continue;
        }
        match reload_log_level() {
            Ok(true) => tracing::info!("SIGHUP: the log level changed"),
            Ok(false) => {}
            Err(reason) => tracing::warn!(%reason, "SIGHUP: the log level stays as it was"),
        }
        report_fixed(PROXY_FIXED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[tokio::test]
    async fn a_taken_default_ops_port_moves_on_and_a_set_one_does_not() {
        let held = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = held.local_addr().unwrap();
        let moved = bind_moving_on(taken, true).await.unwrap();
        let port = moved.local_addr().unwrap().port();
        assert!(port > taken.port(), "{port}");
        assert!(!crate::autoscale::RESERVED_PORTS.contains(&port));
        let err = bind_moving_on(taken, false).await.unwrap_err().to_string();
        assert!(err.contains("address already in use"), "{err}");
    }

    #[test]
    fn usage_errors_are_one_line_and_help_is_not_an_error() {
        let line = |argv: &[&str]| {
            let e = Cli::try_parse_from(argv).expect_err("a usage error");
            let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
            usage_error(&e, &Cli::command(), &argv)
        };
        assert_eq!(
            line(&["esper", "proxy", "run", "--listen"]).as_deref(),
            Some(
                "a value is required for '--listen <ADDR>' but none was supplied \
                 (see --help)"
            )
        );
        let unknown = line(&["esper", "server", "--bogus"]).expect("an error");
        assert!(!unknown.contains('\n'), "{unknown}");
        assert!(
            unknown.starts_with("unexpected argument '--bogus' found")
                && unknown.contains("(usage: esper server"),
            "{unknown}"
        );
        let argv = ["esperctl", "policies", "show"].map(String::from);
        let missing =
            esper_control::ctl::CtlArgs::try_parse_from(&argv).expect_err("an id is required");
        assert_eq!(
            usage_error(&missing, &esper_control::ctl::CtlArgs::command(), &argv).as_deref(),
            Some(
                "the following required arguments were not provided: <ID> \
                 (usage: esperctl policies show <ID>)"
            )
        );
        // An option read from the environment is not shown as if it were required; one
        // typed, or missing, is.
        assert_eq!(
            without(
                "esperctl mitigations add --token <TOKEN> <ENTITY>",
                &["--token".into()]
            ),
            "esperctl mitigations add <ENTITY>"
        );
        let cmd = clap::Command::new("t")
            .arg(clap::Arg::new("p").long("path").short('p').env("PATH"))
            .arg(clap::Arg::new("q").long("quiet"));
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(from_environment(&cmd, &argv(&["t"])), vec!["--path"]);
        for typed in [&["t", "--path", "x"][..], &["t", "--path=x"], &["t", "-px"]] {
            assert!(from_environment(&cmd, &argv(typed)).is_empty(), "{typed:?}");
        }
        let argv = ["esperctl", "policies", "apply"].map(String::from);
        let missing =
            esper_control::ctl::CtlArgs::try_parse_from(&argv).expect_err("a file is required");
        let apply = usage_error(&missing, &esper_control::ctl::CtlArgs::command(), &argv)
            .expect("an error");
        assert!(
            apply.ends_with("(usage: esperctl policies apply --file <FILE>)"),
            "{apply}"
        );
        assert_eq!(line(&["esper", "--help"]), None);
        assert_eq!(line(&["esper", "--version"]), None);
    }

    #[test]
    fn a_cause_printed_by_its_outer_error_is_not_repeated() {
        let missing = esper_common::config::ConfigError::Read {
            path: "/etc/esper.toml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(
            one_line(&anyhow::Error::new(missing)),
            "cannot read config file /etc/esper.toml: entity not found"
        );
        let wrapped = anyhow::anyhow!("disk on fire").context("cannot start the worker");
        assert_eq!(one_line(&wrapped), "cannot start the worker: disk on fire");
    }

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seed_commands_parse() {
        for argv in [
            "esper server run --config ./configs/dev.env",
            "esper server run --port 8443",
            "esper server stop --graceful --timeout 30s",
            "esper worker run engine --concurrency 16 --batch-size 100",
            "esper worker run engine --worker-id worker-1 --state-backend memory --state-ttl 3600 --state-cleanup-interval 300",
            "esper worker run engine --evaluation-timeout 100ms",
            "esper worker status",
            "esper worker autoscale --min 2 --max 10 --target-queue-depth 1000",
            "esper broker run ingestion",
            "esper broker run mitigation",
            "esper proxy run --upstream 127.0.0.1:3000",
            "esper dev --upstream 127.0.0.1:3000",
            "esper server run --tracing",
            "esper worker run engine --cpuprofile cpu.prof",
            "esper worker run engine --memprofile mem.prof",
        ] {
            let args: Vec<&str> = argv.split_whitespace().collect();
            if let Err(e) = Cli::try_parse_from(&args) {
                panic!("`{argv}` does not parse: {e}");
            }
        }
    }

    #[test]
    fn tracing_is_switched_on_by_the_flag_or_the_config_file() {
        let dir = std::env::temp_dir().join(format!("esper-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let on = dir.join("on.toml");
        std::fs::write(&on, "[log]\ntracing = true\n").unwrap();
        let off = dir.join("off.toml");
        std::fs::write(&off, "[log]\nlevel = \"warn\"\n").unwrap();
        let tracing = |argv: &[&str]| {
            log_options(&Cli::try_parse_from(argv).unwrap())
                .unwrap()
                .tracing
        };
        let (on, off) = (on.display().to_string(), off.display().to_string());
        assert!(tracing(&["esper", "--config", &on, "server", "run"]));
        assert!(tracing(&[
            "esper",
            "--config",
            &off,
            "server",
            "run",
            "--tracing"
        ]));
        assert!(!tracing(&["esper", "--config", &off, "server", "run"]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
