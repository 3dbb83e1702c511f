//! `esperctl`, the admin client of the control-plane API: status, policies, mitigations,
//! the queue, workers, proxies, lists, the decision log and API tokens. Tables for people,
//! `--output json` for scripts (the API's JSON as sent). Errors are one line on stderr;
//! the exit code is 2 for usage and input errors and 1 for server errors.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

pub mod client;
mod lists;
mod mitigations;
pub mod ops;
mod policies;
pub mod table;
mod tokens;

pub use client::{Body, ControlClient, CtlError, DEFAULT_SERVER};

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The API's JSON, for scripts.
    Json,
}

/// `esperctl` command line.
#[derive(Parser, Debug)]
#[command(
    name = "esperctl",
    version,
    about = "Admin client of the Esper control plane",
    propagate_version = true
)]
pub struct CtlArgs {
    /// Control-plane API URL.
    #[arg(long, global = true, env = "ESPER_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// API bearer token.
    #[arg(long, global = true, env = "ESPER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Also trust this PEM CA certificate (a control plane with a private CA).
    #[arg(long, global = true, env = "ESPER_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The command groups.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// The whole stack at a glance: server, brokers, workers, proxies, policies.
    Status,
    /// Policies: list, show, apply, validate, enable, disable, shadow, enforce, delete.
    #[command(subcommand, visible_alias = "policy")]
    Policies(PolicyCmd),
    /// Mitigations in force: list, show an entity, add a manual one, revoke.
    #[command(subcommand, visible_alias = "mitigation")]
    Mitigations(MitigationCmd),
    /// The ingestion queue: status, pause, resume.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Engine workers, as heard through their heartbeats.
    #[command(subcommand, visible_alias = "worker")]
    Workers(WorkerCmd),
    /// Proxies, as heard through their heartbeats; their shared challenge key.
    #[command(subcommand, visible_alias = "proxy")]
    Proxies(ProxyCmd),
    /// Named IP and string lists that policies refer to.
    #[command(subcommand, visible_alias = "list")]
    Lists(ListCmd),
    /// The durable decision log.
    #[command(subcommand, visible_alias = "decision")]
    Decisions(DecisionCmd),
    /// API tokens and their roles: list, create, revoke.
    #[command(subcommand, visible_alias = "token")]
    Tokens(TokenCmd),
}

/// `esperctl policies ...`
#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Every policy with its version and state.
    List,
    /// One policy as TOML (ready to edit and apply).
    Show {
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Validates a policy file locally, then applies every policy in it.
    Apply {
        /// A TOML file of [[policy]] tables (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Validates a policy file locally (works offline).
    Validate {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Replays recorded events (JSON lines) through a policy file offline and prints
    /// the decisions it would have made; nothing is published.
    Test {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Events as JSON lines, one request event a line (`-` for stdin).
        #[arg(long = "events")]
        events: PathBuf,
    },
    /// Starts evaluating a policy.
    Enable {
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Stops evaluating a policy (it stays stored).
    Disable {
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Records what a policy decides without enforcing it.
    Shadow {
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Enforces what a policy decides.
    Enforce {
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Deletes a policy (its history stays).
    Delete {
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Every version of a policy.
    History {
        #[arg(value_parser = non_empty)]
        id: String,
    },
}

/// Actions of a manual mitigation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ActionArg {
    Block,
    Throttle,
    Tarpit,
    Challenge,
    Log,
}

/// `esperctl mitigations ...`
#[derive(Subcommand, Debug)]
pub enum MitigationCmd {
    /// Active mitigations.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// An entity's active mitigations and its recent decisions, or one decision in full
    /// by its reference (as printed on block, challenge and rate-limit pages).
    Show {
        /// `ip:203.0.113.7`, `cidr:203.0.113.0/24`, `header:NAME=VALUE`, `cookie:NAME=HASH`
        /// (the first 16 hex digits of the value's SHA-256), ..., or a reference
        #[arg(value_name = "ENTITY|REFERENCE", value_parser = non_empty)]
        entity: String,
    },
    /// Publishes a manual mitigation.
    Add {
        #[arg(value_parser = non_empty)]
        entity: String,
        #[arg(long, value_enum, default_value_t = ActionArg::Block)]
        action: ActionArg,
        /// Throttle: requests per second still allowed.
        #[arg(long)]
        rate: Option<f64>,
        /// Throttle: burst allowance (default: rate rounded up).
        #[arg(long)]
        burst: Option<u32>,
        /// Tarpit: how long each request is held (e.g. 2s).
        #[arg(long)]
        delay: Option<String>,
        /// Challenge: proof-of-work difficulty in bits (1 to 24; default 16).
        #[arg(long)]
        difficulty: Option<u8>,
        /// How long it stands (e.g. 30m, 1h, 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long)]
        reason: Option<String>,
        /// Restrict it to one app, by the name proxies give it (`[[proxy.apps]] name`);
        /// warns when no proxy reports that app (default: every app).
        #[arg(long)]
        app: Option<String>,
    },
    /// Revokes a mitigation by id, or every mitigation of an entity.
    Revoke {
        #[arg(value_parser = non_empty)]
        id: Option<String>,
        #[arg(long, value_parser = non_empty)]
        entity: Option<String>,
    },
}

/// `esperctl queue ...`
#[derive(Subcommand, Debug)]
pub enum QueueCmd {
    /// Depth, leases, consumers.
    Status,
    /// Refuses new events until resumed: a proxy retries a refused batch for a few
    /// seconds, then drops it and counts it as dropped.
    Pause,
    /// Accepts events again.
    Resume,
}

/// `esperctl workers ...`
#[derive(Subcommand, Debug)]
pub enum WorkerCmd {
    /// Every worker heard from in the last hour.
    List,
    /// Tells a worker, through its next heartbeat, to stop claiming work, finish the
    /// batches in hand and exit.
    Drain {
        /// The worker's id (`esperctl workers list`).
        #[arg(value_parser = non_empty)]
        id: String,
    },
}

/// `esperctl proxies ...`
#[derive(Subcommand, Debug)]
pub enum ProxyCmd {
    /// Every proxy heard from in the last hour.
    List,
    /// Replaces the challenge key the proxies share (those without a `challenge_secret`
    /// of their own). Each proxy signs with the new key as soon as it hears of it;
    /// clearance cookies signed with the key replaced stay valid until they expire,
    /// unless `--drop-previous`.
    RotateChallengeKey {
        /// Refuse every cookie signed with the key replaced (after a leak): every cleared
        /// client solves a challenge again.
        #[arg(long)]
        drop_previous: bool,
    },
}

/// `esperctl lists ...`
#[derive(Subcommand, Debug)]
pub enum ListCmd {
    /// Every list with its size.
    List,
    /// One list's items.
    Show {
        #[arg(value_parser = non_empty)]
        name: String,
    },
    /// Creates or replaces a list.
    Set {
        #[arg(value_parser = non_empty)]
        name: String,
        /// `ip` (addresses and CIDR networks) or `string`. Without it, a list that exists
        /// keeps its kind, and a new one is an `ip` list.
        #[arg(long)]
        kind: Option<String>,
        /// The items: addresses and networks, or strings.
        #[arg(value_name = "ITEM", conflicts_with = "file")]
        listed: Vec<String>,
        /// One item per line (`-` for stdin). Blank lines and lines starting with `#`
        /// are skipped; in an `ip` list, `#` after an item starts a comment too (in a
        /// `string` list it is part of the item).
        #[arg(short = 'f', long = "file", conflicts_with = "items")]
        file: Option<PathBuf>,
        /// An item (repeat for several; the same as listing it after NAME).
        #[arg(long = "item", value_name = "ITEM")]
        items: Vec<String>,
        /// Stores the list with no items. Without it, a set that would leave the list
        /// empty (no items given, or a file with none) is refused.
        #[arg(long, conflicts_with_all = ["listed", "items", "file"])]
        empty: bool,
    },
    /// Deletes a list no policy refers to.
    Delete {
        #[arg(value_parser = non_empty)]
        name: String,
    },
}

/// A token's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Every call, tokens included.
    Admin,
    /// Every read but secrets, and policy validation.
    Read,
    /// What proxies, workers, brokers and apps using analyze call.
    Service,
}

impl RoleArg {
    fn as_str(self) -> &'static str {
        match self {
            RoleArg::Admin => "admin",
            RoleArg::Read => "read",
            RoleArg::Service => "service",
        }
    }
}

/// `esperctl tokens ...`
#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Every stored token's name, role and creator (never the token).
    List,
    /// Creates a token and prints it, once.
    Create {
        /// Letters, digits, `.`, `_`, `-`; what the token's calls are recorded under.
        #[arg(value_parser = non_empty)]
        name: String,
        /// What it may call.
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// Revokes a token: its next request is refused.
    Revoke {
        #[arg(value_parser = non_empty)]
        name: String,
    },
}

/// `esperctl decisions ...`
#[derive(Subcommand, Debug)]
pub enum DecisionCmd {
    /// Recent decisions, newest first.
    List {
        #[arg(long)]
        entity: Option<String>,
        #[arg(long)]
        policy: Option<String>,
        /// enforce or shadow.
        #[arg(long)]
        mode: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// What every command needs: the client and the output format.
pub struct Ctx {
    pub client: ControlClient,
    pub json: bool,
}

impl Ctx {
    /// Prints the answer as the server sent it (`--output json`), or the table `human`
    /// renders from it.
    fn emit(
        &self,
        text: String,
        human: impl FnOnce(serde_json::Value) -> Result<String, CtlError>,
    ) -> Result<(), CtlError> {
        let shown = if self.json {
            format!("{}\n", text.trim_end())
        } else {
            let v = serde_json::from_str(&text).map_err(|e| CtlError::Decode {
                url: self.client.server().to_string(),
                message: e.to_string(),
            })?;
            human(v)?
        };
        esper_common::stdout::write(&shown).map_err(|e| CtlError::Output(e.to_string()))
    }
}

/// Runs one `esperctl` invocation and returns the process exit code.
pub async fn esperctl_main(args: CtlArgs) -> ExitCode {
    match dispatch(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("esperctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// A client of `server`, trusting `ca_cert` besides the usual roots when given. Without
/// a token given (`--token`, `ESPER_TOKEN`), the file `ESPER_TOKEN_FILE` names holds it,
/// as for the services.
pub fn client(
    server: &str,
    mut token: Option<String>,
    ca_cert: Option<&std::path::Path>,
) -> Result<ControlClient, CtlError> {
    if token.is_none() {
        esper_common::config::Vars::new(&esper_common::config::ProcessEnv)
            .secret(&["ESPER_TOKEN"], &mut token)
            .map_err(|e| CtlError::Input(e.to_string()))?;
    }
    let client = ControlClient::new(server, token)?;
    match ca_cert {
        Some(path) => client.with_ca_cert(path),
        None => Ok(client),
    }
}

async fn dispatch(args: CtlArgs) -> Result<(), CtlError> {
    let ctx = Ctx {
        client: client(&args.server, args.token, args.ca_cert.as_deref())?,
        json: args.output == OutputFormat::Json,
    };
    match args.command {
        Command::Status => ops::status(&ctx).await,
        Command::Policies(c) => policies::run(&ctx, c).await,
        Command::Mitigations(c) => mitigations::run(&ctx, c).await,
        Command::Queue(c) => ops::queue(&ctx, c).await,
        Command::Workers(WorkerCmd::List) => ops::workers(&ctx).await,
        Command::Workers(WorkerCmd::Drain { id }) => ops::drain_worker(&ctx, &id).await,
        Command::Proxies(ProxyCmd::List) => ops::proxies(&ctx).await,
        Command::Proxies(ProxyCmd::RotateChallengeKey { drop_previous }) => {
            ops::rotate_challenge_key(&ctx, drop_previous).await
        }
        Command::Lists(c) => lists::run(&ctx, c).await,
        Command::Decisions(c) => ops::decisions(&ctx, c).await,
        Command::Tokens(c) => tokens::run(&ctx, c).await,
    }
}

/// Reads a file named on the command line (`-` is stdin); errors are input errors.
/// An id, name or key given on the command line: an empty one names nothing, and would
/// reach the server as another path or no filter at all.
fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.to_string())
}

fn read_input(path: &std::path::Path) -> Result<String, CtlError> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| CtlError::Input(format!("cannot read stdin: {e}")))?;
        return Ok(s);
    }
    std::fs::read_to_string(path)
        .map_err(|e| CtlError::Input(format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        CtlArgs::command().debug_assert();
        let a = CtlArgs::try_parse_from([
            "esperctl",
            "mitigations",
            "add",
            "ip:192.0.2.1",
            "--action",
            "throttle",
            "--rate",
            "5",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(a.output, OutputFormat::Json);
        assert!(matches!(
            a.command,
            Command::Mitigations(MitigationCmd::Add {
                action: ActionArg::Throttle,
                ..
            })
        ));
    }
}
