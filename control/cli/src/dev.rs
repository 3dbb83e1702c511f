//! `esper dev`: the whole stack in one process on the embedded defaults: in-memory
//! brokers, memory engine state, a SQLite control store under `--data-dir`, loopback
//! listeners, and the demo app (or `--upstream`) behind the proxy. Each part is the same
//! `start`/`run` function its own command uses, so what runs here is what runs in
//! production, composed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use esper_common::http::bind;
use esper_common::{Shutdown, ShutdownTrigger};
use tokio::task::JoinSet;

use crate::cli::load;

/// The example policies `esper dev` applies to an empty store.
pub const EXAMPLE_POLICIES: &[(&str, &str)] = &[
    (
        "login-brute-force.toml",
        include_str!("../../../conf/policies/login-brute-force.toml"),
    ),
    (
        "scraping.toml",
        include_str!("../../../conf/policies/scraping.toml"),
    ),
    (
        "not-found-scanning.toml",
        include_str!("../../../conf/policies/not-found-scanning.toml"),
    ),
];

/// Flags of `esper dev`. Every listener is on loopback by default.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Protect this app (HOST:PORT) instead of the built-in demo shop.
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// Where the SQLite control store and the dev admin token are kept.
    #[arg(long, value_name = "DIR", default_value = "./.esper")]
    pub data_dir: PathBuf,
    /// Policy file (or directory of `*.toml`) applied at start; repeatable. Without it,
    /// the example policies are applied when the store has none.
    #[arg(long = "policies", value_name = "PATH")]
    pub policies: Vec<PathBuf>,
    /// Fraction of requests the proxy reports to the engine (0..1].
    #[arg(long, value_name = "RATE")]
    pub sample_rate: Option<f64>,
    /// Proxy traffic listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    pub proxy_listen: SocketAddr,
    /// Proxy ops listener (health, metrics).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9095")]
    pub proxy_ops_listen: SocketAddr,
    /// Control-plane API listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub api_listen: SocketAddr,
    /// Control-plane health listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
    pub health_listen: SocketAddr,
    /// Control-plane metrics listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,
    /// Ingestion broker listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8082")]
    pub ingestion_listen: SocketAddr,
    /// Mitigation broker listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8083")]
    pub mitigation_listen: SocketAddr,
    /// Engine worker ops listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9091")]
    pub worker_ops_listen: SocketAddr,
    /// Demo app listener (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub demo_listen: SocketAddr,
}

/// A random hex token.
fn random_token() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("esp_{a}{b}")
}

/// A dev token: the one configured when set (`ESPER_ADMIN_TOKEN`, `ESPER_BROKER_TOKEN`),
/// else the one kept in `data_dir/name` (created on first start), so it stays the same
/// across restarts and can be read from there.
fn dev_token(data_dir: &Path, name: &str, configured: Option<String>) -> anyhow::Result<String> {
    if let Some(t) = configured.filter(|t| !t.is_empty()) {
        return Ok(t);
    }
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        _ => {}
    }
    let token = random_token();
    std::fs::write(&path, format!("{token}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(token)
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// The policy documents to apply: the given files and directories, in name order.
fn policy_documents(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    let mut docs = Vec::new();
    for p in paths {
        let mut files = Vec::new();
        if p.is_dir() {
            for entry in
                std::fs::read_dir(p).with_context(|| format!("cannot read {}", p.display()))?
            {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "toml") {
                    files.push(path);
                }
            }
            files.sort();
        } else {
            files.push(p.clone());
        }
        for f in files {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read policy file {}", f.display()))?;
            docs.push((f.display().to_string(), text));
        }
    }
    Ok(docs)
}

/// Applies policy documents through the control-plane API (the path `esperctl` uses).
async fn apply_policies(
    api: &str,
    token: &str,
    docs: &[(String, String)],
    only_if_empty: bool,
) -> anyhow::Result<Vec<String>> {
    let http = reqwest::Client::new();
    if only_if_empty {
        let list: serde_json::Value = http
            .get(format!("{api}/api/v1/policies"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let has_any = list
            .get("policies")
            .and_then(|p| p.as_array())
            .map(|a| !a.is_empty())
            .unwrap_or_else(|| list.as_array().is_some_and(|a| !a.is_empty()));
        if has_any {
            return Ok(Vec::new());
        }
    }
    let mut applied = Vec::new();
    for (name, text) in docs {
        let resp = http
            .post(format!("{api}/api/v1/policies"))
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/toml")
            .body(text.clone())
            .send()
            .await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if !status.is_success() {
            let msg = body
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("rejected");
            bail!("{name}: {msg}");
        }
        if let Some(list) = body.get("applied").and_then(|a| a.as_array()) {
            applied.extend(
                list.iter()
                    .filter_map(|p| p.get("id").and_then(|i| i.as_str()).map(String::from)),
            );
        }
    }
    Ok(applied)
}

/// Runs the whole stack until `shutdown`.
pub async fn run(args: DevArgs, file: Option<&Path>, outer: Shutdown) -> anyhow::Result<()> {
    // The stack has its own shutdown, begun by the process's signal or by any part that
    // stops on its own (`esper server stop`, a crash), so the others still drain cleanly.
    let mut parts = Parts::new();
    ignore_hangups();
    let outer_wait = outer.clone();
    let stop_on_signal = tokio::spawn(async move { outer_wait.wait().await });
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .unwrap_or_else(|_| args.data_dir.clone());

    // Read every part's configuration first (file sections and environment), so a bad
    // value fails before anything listens; then pin what `dev` owns: addresses,
    // brokers, tokens and the embedded stores.
    let mut ingestion: esper_ingestion::Config = load(
        file,
        "ingestion",
        esper_ingestion::Config::apply_env,
        |_| {},
        |_| Ok(()),
    )?;
    let mut mitigation: esper_mitigation::Config = load(
        file,
        "mitigation",
        esper_mitigation::Config::apply_env,
        |_| {},
        |_| Ok(()),
    )?;
    let mut server: esper_control::Config = load(
        file,
        "server",
        esper_control::Config::apply_env,
        |_| {},
        |_| Ok(()),
    )?;
    let mut worker: esper_engine::Config = load(
        file,
        "worker",
        esper_engine::Config::apply_env,
        |_| {},
        |_| Ok(()),
    )?;
    let mut proxy: esper_proxy::Config = load(
        file,
        "proxy",
        esper_proxy::Config::apply_env,
        |_| {},
        |_| Ok(()),
    )?;
    // Apps from the config file name their own upstreams; the demo shop stands in for
    // the one app of a proxy without them.
    let with_apps = !proxy.apps.is_empty();
    if with_apps && args.upstream.is_some() {
        bail!(
            "--upstream is not used with [[proxy.apps]] in the config file: each app names its upstreams"
        );
    }

    let broker_token = dev_token(
        &data_dir,
        "broker-token",
        ingestion.token.clone().or_else(|| mitigation.token.clone()),
    )?;
    let admin_token = dev_token(&data_dir, "admin-token", server.admin_token.clone())?;

    // Bind everything up front: a port in use is one clear error before anything starts.
    let ingestion_l = bind("ingestion broker", args.ingestion_listen).await?;
    let mitigation_l = bind("mitigation broker", args.mitigation_listen).await?;
    let control_l = esper_control::Listeners {
        api: bind("control-plane API", args.api_listen).await?,
        health: bind("control-plane health", args.health_listen).await?,
        metrics: bind("control-plane metrics", args.metrics_listen).await?,
    };
    let worker_l = bind("engine worker ops", args.worker_ops_listen).await?;
    let proxy_ops_l = bind("proxy ops", args.proxy_ops_listen).await?;
    let proxy_l = std::net::TcpListener::bind(args.proxy_listen).map_err(|e| {
        anyhow::anyhow!(
            "cannot bind proxy traffic listener to {}: {}",
            args.proxy_listen,
            if e.kind() == std::io::ErrorKind::AddrInUse {
                "address already in use".to_string()
            } else {
                e.to_string()
            }
        )
    })?;
    let ingestion_url = url(ingestion_l.local_addr()?);
    let mitigation_url = url(mitigation_l.local_addr()?);
    let api_url = url(control_l.api.local_addr()?);

    ingestion.listen = ingestion_l.local_addr()?;
    ingestion.token = Some(broker_token.clone());
    // The embedded stack is one instance of each part, in memory, whatever a shared
    // environment says about Redis and clusters.
    ingestion.redis_url = None;
    ingestion.cluster_mode = false;
    mitigation.listen = mitigation_l.local_addr()?;
    mitigation.token = Some(broker_token.clone());
    mitigation.redis_url = None;
    mitigation.cluster_mode = false;
    // The durable copy goes to this stack's own control plane, whose decision log is
    // kept in the data directory: a restart brings back what is still in force, as the
    // policies and lists come back.
    mitigation.persistence_enabled = true;
    mitigation.control_url = api_url.clone();
    mitigation.control_token = Some(admin_token.clone());
    server.listen = control_l.api.local_addr()?;
    server.health_listen = control_l.health.local_addr()?;
    server.metrics_listen = control_l.metrics.local_addr()?;
    server.database_url = format!("sqlite://{}?mode=rwc", data_dir.join("esper.db").display());
    server.ingestion_url = ingestion_url.clone();
    server.mitigation_url = mitigation_url.clone();
    server.broker_token = Some(broker_token.clone());
    server.admin_token = Some(admin_token.clone());

    let ib = esper_ingestion::start(ingestion, ingestion_l, parts.shutdown(Stage::Brokers))
        .await
        .context("ingestion broker")?;
    parts.spawn("ingestion broker", Stage::Brokers, async move {
        Ok(ib.wait().await?)
    });
    let mb = esper_mitigation::start(mitigation, mitigation_l, parts.shutdown(Stage::Brokers))
        .await
        .context("mitigation broker")?;
    parts.spawn("mitigation broker", Stage::Brokers, async move {
        Ok(mb.wait().await?)
    });
    // Its mirror follows the mitigation broker, so it stops following with the edge.
    // `esper server stop` (the API's shutdown) stops the whole stack, from the edge in.
    let (asked_trigger, asked) = Shutdown::new();
    let control = esper_control::start_staged(
        server.clone(),
        control_l,
        parts.shutdown(Stage::Control),
        parts.shutdown(Stage::Edge),
        Some(asked_trigger),
    )
    .await
    .context("control plane")?;
    let (health_addr, metrics_addr) = (control.health_addr, control.metrics_addr);
    parts.spawn("control plane", Stage::Control, async move {
        Ok(control.wait().await?)
    });

    let (explicit, docs) = if args.policies.is_empty() {
        let docs = EXAMPLE_POLICIES
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        (false, docs)
    } else {
        (true, policy_documents(&args.policies)?)
    };
    let applied = apply_policies(&api_url, &admin_token, &docs, !explicit)
        .await
        .context("applying policies")?;

    let upstream = match &args.upstream {
        _ if with_apps => String::new(),
        Some(u) => u.clone(),
        None => {
            let demo_l = bind("demo app", args.demo_listen).await?;
            let addr = demo_l.local_addr()?;
            let s = parts.shutdown(Stage::Edge);
            parts.spawn("demo app", Stage::Edge, async move {
                Ok(crate::demo::serve(demo_l, s).await?)
            });
            addr.to_string()
        }
    };

    worker.listen = worker_l.local_addr()?;
    worker.ingestion_url = ingestion_url.clone();
    worker.mitigation_url = mitigation_url.clone();
    worker.control_url = api_url.clone();
    worker.control_token = Some(admin_token.clone());
    worker.broker_token = Some(broker_token.clone());
    worker.state_backend = esper_engine::worker::StateBackendKind::Memory;
    if worker.worker_id.is_empty() {
        worker.worker_id = "dev-worker".to_string();
    }
    worker.validate()?;
    let worker_ops = worker.listen;
    let s = parts.shutdown(Stage::Edge);
    parts.spawn(
        "engine worker",
        Stage::Edge,
        supervise_worker(worker, worker_l, s),
    );

    proxy.listen = proxy_l.local_addr()?;
    proxy.ops_listen = proxy_ops_l.local_addr()?;
    if !with_apps {
        proxy.upstream = upstream.clone();
    }
    proxy.ingestion_url = ingestion_url.clone();
    proxy.mitigation_url = mitigation_url.clone();
    proxy.control_url = Some(api_url.clone());
    proxy.control_token = Some(admin_token.clone());
    proxy.broker_token = Some(broker_token.clone());
    if let Some(rate) = args.sample_rate {
        proxy.sample_rate = rate;
    }
    if proxy.proxy_id.is_empty() {
        proxy.proxy_id = "dev-proxy".to_string();
    }
    proxy.validate()?;
    let handle = esper_proxy::start(
        proxy.clone(),
        esper_proxy::Listeners {
            traffic: Some(proxy_l),
            ops: Some(proxy_ops_l),
            tls: None,
        },
        parts.shutdown(Stage::Edge),
    )
    .await
    .context("proxy")?;
    let proxy_addr = handle.traffic_addr();
    let proxy_ops = handle.ops_addr();
    parts.spawn(
        "proxy",
        Stage::Edge,
        async move { Ok(handle.wait().await?) },
    );

    let target = if with_apps {
        let names: Vec<&str> = proxy.apps.iter().map(|a| a.name.as_str()).collect();
        format!("apps {}", names.join(", "))
    } else if args.upstream.is_some() {
        upstream.clone()
    } else {
        format!("{upstream} (demo shop)")
    };
    println!("Esper dev stack is up. Ctrl-C stops it.");
    println!("  proxy              http://{proxy_addr}  ->  {target}");
    println!("  proxy ops          http://{proxy_ops}  (/readyz, /metrics)");
    println!(
        "  control plane API  {api_url}  (health http://{health_addr}, metrics http://{metrics_addr})"
    );
    println!("  ingestion broker   {ingestion_url}");
    println!("  mitigation broker  {mitigation_url}");
    println!("  engine worker      http://{worker_ops}  (/readyz, /metrics)");
    println!("  control store      {}", server.database_url);
    println!("  admin API token    {admin_token}");
    println!("  broker API token   {broker_token}  (the brokers' /api/*)");
    println!(
        "  try:               export ESPER_TOKEN={admin_token} ESPER_SERVER={api_url}; esperctl status"
    );
    if !applied.is_empty() {
        println!("  policies applied   {}", applied.join(", "));
    }

    let mut first_error: Option<anyhow::Error> = None;
    let mut signalled = Some(stop_on_signal);
    loop {
        let joined = tokio::select! {
            joined = parts.join_next() => joined,
            _ = async { if let Some(s) = signalled.as_mut() { let _ = s.await; } }, if signalled.is_some() => {
                signalled = None;
                parts.stop();
                continue;
            }
            () = asked.wait(), if !parts.stopping() => {
                tracing::warn!("shutdown asked through the control plane's API; stopping the dev stack");
                parts.stop();
                continue;
            }
        };
        let Some((name, result)) = joined else { break };
        if let Err(e) = result {
            tracing::error!(error = %e, "{name} failed");
            first_error.get_or_insert(e.context(name));
        }
        if !parts.stopping() {
            tracing::warn!("{name} stopped; stopping the rest of the dev stack");
            parts.stop();
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            println!("Esper dev stack stopped.");
            Ok(())
        }
    }
}

/// A SIGHUP (a closed terminal, a habit from the services) would end the process by
/// default; the stack has nothing to read again: it takes its settings from its flags,
/// and policies, lists and proxy settings change through the control plane.
fn ignore_hangups() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            return;
        }
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!(
                "SIGHUP: esper dev reads its settings only at start; policies and lists \
                 change through esperctl"
            );
        }
    });
}

/// Runs the engine worker as a service manager would: one drained by the control plane
/// (`esperctl workers drain`) finishes its batches and exits, and a fresh one takes its
/// place on the same address, so the stack goes on deciding. A worker that fails stops
/// the stack.
async fn supervise_worker(
    config: esper_engine::Config,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let mut listener = Some(listener);
    loop {
        let ops = match listener.take() {
            Some(l) => l,
            None => bind("engine worker ops", addr).await?,
        };
        esper_engine::run(config.clone(), ops, shutdown.clone()).await?;
        if shutdown.is_triggered() {
            return Ok(());
        }
        tracing::info!(worker_id = %config.worker_id, "engine worker drained; starting a fresh one");
    }
}

/// When a part of the stack stops: each stage only once the one before it has finished,
/// so what a part hands on as it stops (the proxy's last events and heartbeat, the
/// worker's last decisions, the mitigation broker's durable copy) finds its receiver
/// still there, as it would in a deployment that stops its services in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The proxy, the demo app and the engine worker.
    Edge = 0,
    Brokers = 1,
    Control = 2,
}

const STAGES: usize = 3;

/// The stack's running parts, by stage.
struct Parts {
    triggers: [ShutdownTrigger; STAGES],
    handles: [Shutdown; STAGES],
    running: [usize; STAGES],
    /// The stage told to stop last, once stopping has begun.
    stopping: Option<usize>,
    names: HashMap<tokio::task::Id, (&'static str, Stage)>,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Parts {
    fn new() -> Self {
        let [(t0, h0), (t1, h1), (t2, h2)] = [Shutdown::new(), Shutdown::new(), Shutdown::new()];
        Parts {
            triggers: [t0, t1, t2],
            handles: [h0, h1, h2],
            running: [0; STAGES],
            stopping: None,
            names: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    /// The signal the parts of `stage` stop on.
    fn shutdown(&self, stage: Stage) -> Shutdown {
        self.handles[stage as usize].clone()
    }

    fn spawn<F>(&mut self, name: &'static str, stage: Stage, part: F)
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let id = self.tasks.spawn(part).id();
        self.names.insert(id, (name, stage));
        self.running[stage as usize] += 1;
    }

    fn stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// Begins stopping the stack, from its edge in.
    fn stop(&mut self) {
        if self.stopping.is_none() {
            self.stopping = Some(0);
            self.triggers[0].trigger();
            self.advance();
        }
    }

    fn advance(&mut self) {
        while let Some(s) = self.stopping
            && self.running[s] == 0
            && s + 1 < STAGES
        {
            self.stopping = Some(s + 1);
            self.triggers[s + 1].trigger();
        }
    }

    /// The next part to finish, by name, with its result; `None` when none is left.
    async fn join_next(&mut self) -> Option<(&'static str, anyhow::Result<()>)> {
        let joined = self.tasks.join_next_with_id().await?;
        let (id, result) = match joined {
            Ok((id, result)) => (id, result),
            Err(e) => (e.id(), Err(anyhow::anyhow!("crashed: {e}"))),
        };
        let (name, stage) = self.names.remove(&id).unwrap_or(("a part", Stage::Edge));
        self.running[stage as usize] = self.running[stage as usize].saturating_sub(1);
        self.advance();
        Some((name, result))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_policies_are_valid() {
        for (name, text) in super::EXAMPLE_POLICIES {
            if let Err(e) = esper_engine::policy::parse_policies(text) {
                panic!("{name}: {e}");
            }
        }
    }
}
