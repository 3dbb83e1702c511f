//! Every file in `conf/` loads the way `esper <service> --config FILE` loads it, validates,
//! and describes one coherent single-host deployment; every service's template loads and
//! validates; every example policy parses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use esper_common::config::{ConfigError, EnvSource, Vars, load_section, parse_dotenv};
use serde::de::DeserializeOwned;

/// The sections of `esper.toml`, one per service.
const SECTIONS: [&str; 5] = ["server", "ingestion", "mitigation", "worker", "proxy"];
/// Names the `esper` and `esperctl` binaries read themselves (logging, API client).
const BINARY_NAMES: [&str; 8] = [
    "LOG_LEVEL",
    "LOG_FORMAT",
    "LOG_INCLUDE_CALLER",
    "ESPER_DEBUG",
    "ESPER_DEBUG_SUBSYSTEM",
    "ESPER_LOG_LEVEL",
    "ESPER_LOG_FORMAT",
    "ESPER_SERVER",
];

fn conf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conf")
}

/// An environment that holds nothing, so the tests see only what the files say.
fn no_env() -> HashMap<String, String> {
    HashMap::new()
}

/// Loads one service's configuration from `file` as its `esper` command does (the
/// section for TOML, every name for `.env`), then validates it.
fn load<C: DeserializeOwned + Default>(
    file: &Path,
    section: &str,
    apply_env: fn(&mut C, &Vars<'_>) -> Result<(), ConfigError>,
    validate: fn(&C) -> Result<(), ConfigError>,
) -> Result<C, String> {
    let c: C = load_section(Some(file), Some(section), &no_env(), apply_env)
        .map_err(|e| format!("{} [{section}]: {e}", file.display()))?;
    validate(&c).map_err(|e| format!("{} [{section}]: {e}", file.display()))?;
    Ok(c)
}

/// Every service's configuration from one file.
#[derive(Debug)]
struct Deployment {
    server: esper_control::Config,
    ingestion: esper_ingestion::Config,
    mitigation: esper_mitigation::Config,
    worker: esper_engine::Config,
    proxy: esper_proxy::Config,
}

impl Deployment {
    fn load(file: &Path) -> Result<Deployment, String> {
        Ok(Deployment {
            server: load(
                file,
                "server",
                esper_control::Config::apply_env,
                esper_control::Config::validate,
            )?,
            ingestion: load(
                file,
                "ingestion",
                esper_ingestion::Config::apply_env,
                esper_ingestion::Config::validate,
            )?,
            mitigation: load(
                file,
                "mitigation",
                esper_mitigation::Config::apply_env,
                esper_mitigation::Config::validate,
            )?,
            worker: load(
                file,
                "worker",
                esper_engine::Config::apply_env,
                esper_engine::Config::validate,
            )?,
            proxy: load(
                file,
                "proxy",
                esper_proxy::Config::apply_env,
                esper_proxy::Config::validate,
            )?,
        })
    }

    /// The services can find each other on one host: no two listeners share a port,
    /// every URL names a listener that accepts it, and tokens agree.
    fn check_coherent(&self) -> Result<(), String> {
        let listeners = [
            ("server.listen", self.server.listen),
            ("server.health_listen", self.server.health_listen),
            ("server.metrics_listen", self.server.metrics_listen),
            ("ingestion.listen", self.ingestion.listen),
            ("mitigation.listen", self.mitigation.listen),
            ("worker.listen", self.worker.listen),
            ("proxy.listen", self.proxy.listen),
            ("proxy.ops_listen", self.proxy.ops_listen),
        ];
        for (i, (a, addr_a)) in listeners.iter().enumerate() {
            for (b, addr_b) in &listeners[i + 1..] {
                if addr_a.port() == addr_b.port() {
                    return Err(format!("{a} and {b} both use port {}", addr_a.port()));
                }
            }
        }
        let ingestion = self.ingestion.listen;
        let mitigation = self.mitigation.listen;
        let api = self.server.listen;
        let mut urls = vec![
            (
                "server.ingestion_url",
                &self.server.ingestion_url,
                ingestion,
            ),
            (
                "worker.ingestion_url",
                &self.worker.ingestion_url,
                ingestion,
            ),
            ("proxy.ingestion_url", &self.proxy.ingestion_url, ingestion),
            (
                "server.mitigation_url",
                &self.server.mitigation_url,
                mitigation,
            ),
            (
                "worker.mitigation_url",
                &self.worker.mitigation_url,
                mitigation,
            ),
            (
                "proxy.mitigation_url",
                &self.proxy.mitigation_url,
                mitigation,
            ),
            ("worker.control_url", &self.worker.control_url, api),
        ];
        if let Some(u) = &self.proxy.control_url {
            urls.push(("proxy.control_url", u, api));
        }
        for (option, url, listener) in urls {
            reaches(url, listener).map_err(|why| format!("{option} = `{url}`: {why}"))?;
        }
        if self.ingestion.token != self.mitigation.token {
            return Err("the two brokers require different tokens".into());
        }
        if let Some(t) = &self.ingestion.token {
            for (option, sent) in [
                ("server.broker_token", &self.server.broker_token),
                ("worker.broker_token", &self.worker.broker_token),
                ("proxy.broker_token", &self.proxy.broker_token),
            ] {
                if sent.as_ref() != Some(t) {
                    return Err(format!(
                        "the brokers require a token {option} does not send"
                    ));
                }
            }
        }
        if let Some(admin) = &self.server.admin_token {
            for (option, sent) in [
                ("worker.control_token", &self.worker.control_token),
                ("proxy.control_token", &self.proxy.control_token),
            ] {
                if sent.as_ref().is_some_and(|s| s != admin) {
                    return Err(format!("{option} is not the server's admin token"));
                }
            }
        }
        Ok(())
    }
}

/// Does `url` reach a server listening on `listener` from this host?
fn reaches(url: &str, listener: SocketAddr) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    if u.port_or_known_default() != Some(listener.port()) {
        return Err(format!("the listener is on port {}", listener.port()));
    }
    let host = u.host_str().unwrap_or("").trim_matches(['[', ']']);
    let ip = listener.ip();
    let same = ip.is_unspecified()
        || host.parse::<std::net::IpAddr>().is_ok_and(|h| h == ip)
        || (host == "localhost" && ip.is_loopback());
    if same {
        Ok(())
    } else {
        Err(format!("the listener accepts {ip} only"))
    }
}

/// Every file under `dir`, recursively, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn env_files() -> Vec<PathBuf> {
    let files: Vec<PathBuf> = files(&conf_dir())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "env"))
        .collect();
    assert!(
        files.len() >= 2,
        "conf/dev.env and conf/prod.env: {files:?}"
    );
    files
}

/// `conf/policies/*.toml` (their replay fixtures in `fixtures/` are checked by
/// `engine/tests/policies.rs`).
fn policy_files() -> Vec<PathBuf> {
    files(&conf_dir().join("policies"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect()
}

#[test]
fn every_file_in_conf_is_covered_by_these_tests() {
    let dir = conf_dir().canonicalize().unwrap();
    for path in files(&dir) {
        let rel = path
            .strip_prefix(&dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let covered = rel == "esper.toml"
            || (path.extension().is_some_and(|e| e == "env") && !rel.contains('/'))
            || (rel.starts_with("policies/") && rel.ends_with(".toml"))
            // Replayed through their policies by engine/tests/policies.rs.
            || (rel.starts_with("policies/fixtures/") && rel.ends_with(".jsonl"));
        assert!(covered, "no test validates conf/{rel}");
    }
}

#[test]
fn esper_toml_has_one_valid_section_per_service() {
    let file = conf_dir().join("esper.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    // A misspelt section would be ignored by the loader: only the five may appear.
    let tables: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix('['))
        .filter_map(|l| l.split_once(']').map(|(name, _)| name))
        .map(|name| name.split('.').next().unwrap_or("").trim().to_string())
        .collect();
    let expected: BTreeSet<String> = SECTIONS.iter().map(|s| s.to_string()).collect();
    assert_eq!(tables, expected);

    let d = Deployment::load(&file).unwrap_or_else(|e| panic!("{e}"));
    d.check_coherent()
        .unwrap_or_else(|e| panic!("esper.toml: {e}"));
    // It is a production example, not the defaults again.
    assert!(
        d.server
            .database_url
            .starts_with("sqlite:///var/lib/esper/")
    );
    assert!(d.ingestion.listen.ip().is_loopback());
    assert!(d.mitigation.listen.ip().is_loopback());
    assert!(!d.proxy.upstream.is_empty());
}

#[test]
fn every_env_file_configures_every_service() {
    for file in env_files() {
        let d = Deployment::load(&file).unwrap_or_else(|e| panic!("{e}"));
        d.check_coherent()
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

/// An environment that remembers which names were asked for.
struct Recording {
    vars: HashMap<String, String>,
    asked: RefCell<BTreeSet<String>>,
}

impl EnvSource for Recording {
    fn get(&self, name: &str) -> Option<String> {
        self.asked.borrow_mut().insert(name.to_string());
        self.vars.get(name).cloned()
    }
}

#[test]
fn every_name_in_an_env_file_is_read_by_something() {
    for file in env_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let rec = Recording {
            vars: parse_dotenv(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display())),
            asked: RefCell::new(BTreeSet::new()),
        };
        let vars = Vars::new(&rec);
        esper_control::Config::default().apply_env(&vars).unwrap();
        esper_ingestion::Config::default().apply_env(&vars).unwrap();
        esper_mitigation::Config::default()
            .apply_env(&vars)
            .unwrap();
        esper_engine::Config::default().apply_env(&vars).unwrap();
        esper_proxy::Config::default().apply_env(&vars).unwrap();
        let asked = rec.asked.borrow();
        // A name nobody asks for is a typo, or shadowed by another name that is also set.
        let unread: Vec<&String> = rec
            .vars
            .keys()
            .filter(|k| !asked.contains(*k) && !BINARY_NAMES.contains(&k.as_str()))
            .collect();
        assert!(
            unread.is_empty(),
            "{}: nothing reads {unread:?}",
            file.display()
        );
    }
}

#[test]
fn what_prod_env_shows_commented_out_is_accepted_or_refused_as_it_says() {
    let file = conf_dir().join("prod.env");
    let text = std::fs::read_to_string(&file).unwrap();
    let commented = |name: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("# "))
            .find(|l| l.starts_with(&format!("{name}=")))
            .unwrap_or_else(|| panic!("prod.env shows no `# {name}=...` line"))
            .to_string()
    };
    let dir = std::env::temp_dir().join(format!("esper-conf-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    // Redis for both brokers and the engine state, PostgreSQL for the control plane,
    // and the mitigation broker's durable copy are production settings: they load
    // (connecting is left to start-up).
    for name in [
        "REDIS_URL",
        "DATABASE_URL",
        "ESPER_STATE_BACKEND",
        "PERSISTENCE_ENABLED",
    ] {
        let enabled = dir.join(format!("{name}.env"));
        std::fs::write(&enabled, format!("{text}\n{}\n", commented(name))).unwrap();
        if let Err(err) = Deployment::load(&enabled) {
            panic!("{name}: {err}");
        }
    }
    // Cluster mode needs Redis: refused alone, accepted with it.
    let cluster = dir.join("cluster.env");
    std::fs::write(&cluster, format!("{text}\n{}\n", commented("CLUSTER_MODE"))).unwrap();
    let err = Deployment::load(&cluster).unwrap_err();
    assert!(
        err.contains("cluster_mode") && err.contains("redis_url"),
        "{err}"
    );
    let both = format!(
        "{text}\n{}\n{}\n",
        commented("CLUSTER_MODE"),
        commented("REDIS_URL")
    );
    std::fs::write(&cluster, both).unwrap();
    if let Err(err) = Deployment::load(&cluster) {
        panic!("CLUSTER_MODE with REDIS_URL: {err}");
    }
    // BROKER_PORT alone in a shared file puts both brokers on one port.
    let shared = dir.join("shared.env");
    let without_listen: String = text
        .lines()
        .filter(|l| {
            !l.starts_with("ESPER_INGESTION_LISTEN=") && !l.starts_with("ESPER_MITIGATION_LISTEN=")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &shared,
        format!("{without_listen}{}\n", commented("BROKER_PORT")),
    )
    .unwrap();
    let err = Deployment::load(&shared)
        .unwrap()
        .check_coherent()
        .unwrap_err();
    assert!(
        err.contains("ingestion.listen and mitigation.listen"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_example_policy_parses_and_ids_are_unique() {
    let files = policy_files();
    assert!(!files.is_empty());
    let mut ids = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let policies = esper_engine::policy::parse_policies(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!policies.is_empty(), "{}: no [[policy]]", file.display());
        for p in policies {
            assert!(ids.insert(p.id.clone()), "policy id {} appears twice", p.id);
        }
    }
}

/// Loads a template the way an operator uses it: `esper X config > file`, then
/// `esper X run --config file`.
fn template<C: DeserializeOwned + serde::Serialize + Default + PartialEq + std::fmt::Debug>(
    dir: &Path,
    section: &str,
    text: &str,
    apply_env: fn(&mut C, &Vars<'_>) -> Result<(), ConfigError>,
) -> C {
    // Every option with a default is shown (set, or commented out with an example).
    let defaults = serde_json::to_value(C::default()).unwrap();
    for (option, value) in defaults.as_object().unwrap() {
        let shown = text.lines().any(|l| {
            l.trim_start_matches("# ")
                .starts_with(&format!("{option} ="))
        });
        assert!(
            shown || value.is_null(),
            "{section}: the template does not show `{option}`"
        );
    }
    let file = dir.join(format!("{section}.toml"));
    std::fs::write(&file, text).unwrap();
    let c: C = load_section(Some(&file), Some(section), &no_env(), apply_env)
        .unwrap_or_else(|e| panic!("{section} template: {e}"));
    assert_eq!(
        c,
        C::default(),
        "{section}: the template shows the defaults"
    );
    c
}

#[test]
fn every_service_template_loads_and_validates() {
    let dir = std::env::temp_dir().join(format!("esper-tmpl-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    template(
        &dir,
        "server",
        esper_control::Config::template(),
        esper_control::Config::apply_env,
    )
    .validate()
    .unwrap();
    template(
        &dir,
        "ingestion",
        esper_ingestion::Config::template(),
        esper_ingestion::Config::apply_env,
    )
    .validate()
    .unwrap();
    template(
        &dir,
        "mitigation",
        esper_mitigation::Config::template(),
        esper_mitigation::Config::apply_env,
    )
    .validate()
    .unwrap();
    template(
        &dir,
        "worker",
        esper_engine::Config::template(),
        esper_engine::Config::apply_env,
    )
    .validate()
    .unwrap();
    // The proxy has one required option, the app it protects; the template says so.
    let mut proxy = template(
        &dir,
        "proxy",
        esper_proxy::Config::template(),
        esper_proxy::Config::apply_env,
    );
    let err = proxy.validate().unwrap_err().to_string();
    assert!(err.starts_with("invalid upstream = ``: required"), "{err}");
    proxy.upstream = "127.0.0.1:3000".into();
    proxy.validate().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A reader that stops reading (`esper proxy config | head -1`) ends the output quietly:
/// no panic, and the command's own exit status.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::process::{Command, Stdio};
    for args in [["proxy", "config"], ["server", "config"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_esper"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the child has started, so its first write meets no reader.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `esper dev` takes its apps from a config file's `[[proxy.apps]]`, where `--upstream`
/// (the one app of a sidecar) has no place: refused before anything starts.
#[test]
fn esper_dev_refuses_an_upstream_beside_apps_from_the_file() {
    let dir = std::env::temp_dir().join(format!("esper-dev-apps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("apps.toml");
    std::fs::write(
        &file,
        "[[proxy.apps]]\nname = \"shop\"\nupstreams = [\"127.0.0.1:3000\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_esper"))
        .args(["dev", "--upstream", "127.0.0.1:3001", "--config"])
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "esper: --upstream is not used with [[proxy.apps]] in the config file: each app names its upstreams"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
