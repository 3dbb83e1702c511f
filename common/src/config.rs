//! Configuration layering shared by every service.
//!
//! Precedence, highest first: command-line flags > environment variables > config file
//! (`--config FILE`, TOML, or `.env` with the same names as the environment) > defaults.
//! A service's `Config` is a serde struct with defaults (the TOML form); its
//! `apply_env(&mut self, &Vars)` reads the environment names; flags are applied by the
//! binary last; `validate()` runs once at the end. Every error names the option and the
//! bad value in one line.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid {option} = `{value}`: {reason}")]
    Invalid {
        option: String,
        value: String,
        reason: String,
    },
    /// An option this build accepts but cannot honour (the value is not repeated: it may
    /// hold a password, as a Redis URL can).
    #[error("{option} is set but {reason}")]
    Unsupported { option: String, reason: String },
}

impl ConfigError {
    /// An option that is set although this build cannot honour it.
    pub fn unsupported(option: &str, reason: impl ToString) -> ConfigError {
        ConfigError::Unsupported {
            option: option.to_string(),
            reason: reason.to_string(),
        }
    }

    /// An invalid value for `option`.
    pub fn invalid(option: &str, value: impl ToString, reason: impl ToString) -> ConfigError {
        ConfigError::Invalid {
            option: option.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The instance settings both brokers take from the seed's HA deployment
/// (`CLUSTER_MODE`, `NODE_ID`): `cluster_mode` says instances are meant to share one
/// Redis, so one without `redis_url` is a mistake (it would keep a store of its own
/// behind the balancer); `node_id` names the instance in logs and health details.
pub fn check_instance(
    cluster_mode: bool,
    redis_url: Option<&str>,
    node_id: Option<&str>,
) -> Result<(), ConfigError> {
    if cluster_mode && redis_url.is_none() {
        return Err(ConfigError::invalid(
            "cluster_mode",
            true,
            "needs redis_url: instances share their store only through Redis",
        ));
    }
    if let Some(id) = node_id {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(ConfigError::invalid(
                "node_id",
                id,
                "must be 1 to 64 characters of letters, digits, `-`, `_` or `.`",
            ));
        }
    }
    Ok(())
}

/// Where environment-style settings come from: the process, a `.env` file, a test map.
pub trait EnvSource {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// What a reload (SIGHUP) applied of a configuration read again.
#[derive(Debug, Default, PartialEq)]
pub struct Reloaded {
    /// The settings now in effect (names only: some are secrets).
    pub applied: Vec<&'static str>,
    /// Settings kept as they were, each with the reason.
    pub kept: Vec<(&'static str, String)>,
}

impl Reloaded {
    /// Notes `setting` as applied when `changed`.
    pub fn applied_if(&mut self, changed: bool, setting: &'static str) {
        if changed {
            self.applied.push(setting);
        }
    }
}

/// A bearer token as configured: it goes into an `Authorization` header as it is, so
/// it cannot be empty or hold whitespace or control characters.
pub fn check_token(option: &str, token: Option<&str>) -> Result<(), ConfigError> {
    match token {
        Some(t) if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            Err(ConfigError::invalid(
                option,
                "(hidden)",
                "must be non-empty, without spaces or control characters",
            ))
        }
        _ => Ok(()),
    }
}

/// A broker's `token` and the `previous_token` it accepts beside it during a rotation.
pub fn check_broker_tokens(token: Option<&str>, previous: Option<&str>) -> Result<(), ConfigError> {
    check_token("token", token)?;
    check_token("previous_token", previous)?;
    let why = match (token, previous) {
        (Some(t), Some(p)) if t == p => {
            "is the same as `token`: set it to the token being replaced, or remove it"
        }
        (None, Some(_)) => {
            "is accepted beside `token` during a rotation: set `token` (ESPER_BROKER_TOKEN) too"
        }
        _ => return Ok(()),
    };
    Err(ConfigError::invalid("previous_token", "(hidden)", why))
}

/// Typed reads of environment-style settings. Each read takes the names to try in order
/// (the `ESPER_*` name first, then the seed's name such as `BROKER_PORT`) and leaves the
/// target untouched when none is set. Empty values count as unset.
pub struct Vars<'a> {
    source: &'a dyn EnvSource,
}

impl<'a> Vars<'a> {
    pub fn new(source: &'a dyn EnvSource) -> Vars<'a> {
        Vars { source }
    }

    /// The first of `names` that is set, with its value.
    pub fn lookup(&self, names: &[&str]) -> Option<(String, String)> {
        names.iter().find_map(|n| {
            self.source
                .get(n)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (n.to_string(), v.trim().to_string()))
        })
    }

    /// Any `FromStr` value.
    pub fn parse<T>(&self, names: &[&str], target: &mut T) -> Result<(), ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        if let Some((name, value)) = self.lookup(names) {
            *target = value
                .parse()
                .map_err(|e: T::Err| ConfigError::invalid(&name, &value, e))?;
        }
        Ok(())
    }

    /// A value that may be set or not (`Option<T>` targets).
    pub fn parse_opt<T>(&self, names: &[&str], target: &mut Option<T>) -> Result<(), ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        if let Some((name, value)) = self.lookup(names) {
            *target = Some(
                value
                    .parse()
                    .map_err(|e: T::Err| ConfigError::invalid(&name, &value, e))?,
            );
        }
        Ok(())
    }

    /// A string.
    pub fn string(&self, names: &[&str], target: &mut String) {
        if let Some((_, value)) = self.lookup(names) {
            *target = value;
        }
    }

    /// An optional string (a secret, a URL that may be absent).
    pub fn string_opt(&self, names: &[&str], target: &mut Option<String>) {
        if let Some((_, value)) = self.lookup(names) {
            *target = Some(value);
        }
    }

    /// A secret (a token): for each of `names` in turn, its value or else the file named
    /// by `NAME_FILE`, read whole with surrounding whitespace trimmed (the way container
    /// secrets and credential files are handed over). So a specific name's file wins
    /// over a generic alias's value. A file is read at every load, so a reload takes a
    /// token rotated in its file although the environment is fixed at start.
    pub fn secret(&self, names: &[&str], target: &mut Option<String>) -> Result<(), ConfigError> {
        for name in names {
            if let Some((_, value)) = self.lookup(&[name]) {
                *target = Some(value);
                return Ok(());
            }
            let file = format!("{name}_FILE");
            if let Some((_, path)) = self.lookup(&[&file]) {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::invalid(&file, &path, format!("cannot read it: {e}"))
                })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(ConfigError::invalid(&file, &path, "the file is empty"));
                }
                *target = Some(token.to_string());
                return Ok(());
            }
        }
        Ok(())
    }

    /// A boolean: true/false, 1/0, yes/no, on/off.
    pub fn bool(&self, names: &[&str], target: &mut bool) -> Result<(), ConfigError> {
        if let Some((name, value)) = self.lookup(names) {
            *target = parse_bool(&value)
                .ok_or_else(|| ConfigError::invalid(&name, &value, "expected true or false"))?;
        }
        Ok(())
    }

    /// A boolean that may be set or not.
    pub fn bool_opt(&self, names: &[&str], target: &mut Option<bool>) -> Result<(), ConfigError> {
        if let Some((name, value)) = self.lookup(names) {
            *target =
                Some(parse_bool(&value).ok_or_else(|| {
                    ConfigError::invalid(&name, &value, "expected true or false")
                })?);
        }
        Ok(())
    }

    /// A duration: a humantime string (`250ms`, `30s`, `10m`) or a bare number in `unit`
    /// (so `BATCH_TIMEOUT_MS=100` and `CACHE_TTL_SECONDS=900` keep their seed meaning).
    pub fn duration(
        &self,
        names: &[&str],
        unit: Duration,
        target: &mut Duration,
    ) -> Result<(), ConfigError> {
        if let Some((name, value)) = self.lookup(names) {
            *target = parse_duration(&value, unit)
                .map_err(|reason| ConfigError::invalid(&name, &value, reason))?;
        }
        Ok(())
    }
}

/// Parses `true/false/1/0/yes/no/on/off`.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// A humantime duration, or a bare number counted in `unit`.
pub fn parse_duration(value: &str, unit: Duration) -> Result<Duration, String> {
    let value = value.trim();
    if let Ok(n) = value.parse::<u64>() {
        return unit
            .checked_mul(u32::try_from(n).map_err(|_| "number too large".to_string())?)
            .ok_or_else(|| "duration too large".to_string());
    }
    humantime::parse_duration(value).map_err(|e| format!("{e} (write e.g. 250ms, 30s, 10m)"))
}

/// A duration value for clap flags: humantime, or bare seconds.
pub fn parse_duration_secs(value: &str) -> Result<Duration, String> {
    parse_duration(value, Duration::from_secs(1))
}

/// A duration value for clap flags: humantime, or bare milliseconds.
pub fn parse_duration_ms(value: &str) -> Result<Duration, String> {
    parse_duration(value, Duration::from_millis(1))
}

/// Parses a `.env` file: `KEY=VALUE` lines, `export ` prefixes, `#` comments, optional
/// single or double quotes around values.
pub fn parse_dotenv(text: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected KEY=VALUE, found `{line}`", i + 1))?;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("line {}: `{key}` is not a variable name", i + 1));
        }
        let mut value = value.trim();
        if value.len() >= 2
            && ((value.starts_with('"') && value.ends_with('"'))
                || (value.starts_with('\'') && value.ends_with('\'')))
        {
            value = &value[1..value.len() - 1];
        } else if let Some(pos) = value.find(" #") {
            value = value[..pos].trim_end();
        }
        out.insert(key.to_string(), value.to_string());
    }
    Ok(out)
}

/// Builds a config from defaults, the optional file and the environment. The caller
/// then applies its flags and calls `validate()`.
///
/// A file ending in `.env` is read as environment-style settings (below the real
/// environment); any other file is TOML in the shape of `C`.
pub fn load<C, F>(file: Option<&Path>, env: &dyn EnvSource, apply_env: F) -> Result<C, ConfigError>
where
    C: DeserializeOwned + Default,
    F: Fn(&mut C, &Vars<'_>) -> Result<(), ConfigError>,
{
    load_section(file, None, env, apply_env)
}

/// The top-level tables of a file that holds several parts' settings.
pub const SECTIONS: [&str; 6] = [
    "log",
    "server",
    "ingestion",
    "mitigation",
    "worker",
    "proxy",
];

/// A file with sections holds nothing else at its top level: `[sever]` or a setting
/// above the first section would otherwise be ignored without a word.
fn check_sections(table: &toml::Table) -> Result<(), String> {
    if !table.keys().any(|k| SECTIONS.contains(&k.as_str())) {
        return Ok(());
    }
    match table.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
        Some(other) => Err(format!(
            "`{other}` is not a section: a file with sections holds only [{}]",
            SECTIONS.join("], [")
        )),
        None => Ok(()),
    }
}

/// Like [`load`], but a TOML file may hold every service's settings in one document
/// (`conf/esper.toml`): when it has a top-level table named `section` (`server`,
/// `ingestion`, `mitigation`, `worker`, `proxy`), only that table is read.
pub fn load_section<C, F>(
    file: Option<&Path>,
    section: Option<&str>,
    env: &dyn EnvSource,
    apply_env: F,
) -> Result<C, ConfigError>
where
    C: DeserializeOwned + Default,
    F: Fn(&mut C, &Vars<'_>) -> Result<(), ConfigError>,
{
    let mut config = C::default();
    if let Some(path) = file {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let is_env = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".env") || n == ".env");
        if is_env {
            let map = parse_dotenv(&text).map_err(|message| ConfigError::Parse {
                path: shown.clone(),
                message,
            })?;
            apply_env(&mut config, &Vars::new(&map))?;
        } else {
            let parse_err = |e: toml::de::Error| ConfigError::Parse {
                path: shown.clone(),
                message: crate::plain::plain_serde(e.to_string().trim()).replace('\n', " "),
            };
            let table: toml::Table = toml::from_str(&text).map_err(parse_err)?;
            check_sections(&table).map_err(|message| ConfigError::Parse {
                path: shown.clone(),
                message,
            })?;
            // A file with sections gives each part its own, and a part it has no section
            // for its defaults: `esper dev --config` with only `[worker]` starts every
            // other part as it would without a file.
            let sectioned = table.keys().any(|k| SECTIONS.contains(&k.as_str()));
            let value = match section.map(|s| table.get(s)) {
                Some(Some(own)) => own.clone(),
                Some(None) if sectioned => toml::Value::Table(toml::Table::new()),
                _ => toml::Value::Table(table),
            };
            config = value
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: shown.clone(),
                    message: match section {
                        Some(s) => format!(
                            "[{s}]: {}",
                            crate::plain::plain_serde(e.to_string().trim()).replace('\n', " ")
                        ),
                        None => crate::plain::plain_serde(e.to_string().trim()).replace('\n', " "),
                    },
                })?;
        }
    }
    apply_env(&mut config, &Vars::new(env))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        port: u16,
        name: String,
        #[serde(with = "humantime_serde_like")]
        timeout: Duration,
    }

    mod humantime_serde_like {
        use std::time::Duration;
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            let s: String = serde::Deserialize::deserialize(d)?;
            humantime::parse_duration(&s).map_err(serde::de::Error::custom)
        }
    }

    fn apply(c: &mut Demo, v: &Vars<'_>) -> Result<(), ConfigError> {
        v.parse(&["ESPER_PORT", "BROKER_PORT"], &mut c.port)?;
        v.string(&["ESPER_NAME"], &mut c.name);
        v.duration(
            &["BATCH_TIMEOUT_MS"],
            Duration::from_millis(1),
            &mut c.timeout,
        )
    }

    #[test]
    fn env_beats_file_and_file_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("esper-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml_path = dir.join("c.toml");
        std::fs::write(&toml_path, "port = 1\nname = \"file\"\ntimeout = \"2s\"\n").unwrap();
        let env: HashMap<String, String> = [("BROKER_PORT".to_string(), "9".to_string())].into();
        let c: Demo = load(Some(&toml_path), &env, apply).unwrap();
        assert_eq!(
            c,
            Demo {
                port: 9,
                name: "file".into(),
                timeout: Duration::from_secs(2)
            }
        );

        let env_path = dir.join("dev.env");
        std::fs::write(
            &env_path,
            "# c\nexport ESPER_NAME=\"dot env\"\nBATCH_TIMEOUT_MS=100\nBROKER_PORT=5\n",
        )
        .unwrap();
        let c: Demo = load(Some(&env_path), &env, apply).unwrap();
        assert_eq!(
            c,
            Demo {
                port: 9,
                name: "dot env".into(),
                timeout: Duration::from_millis(100)
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_secret_comes_from_its_variable_or_else_its_file_read_at_each_load() {
        let dir = std::env::temp_dir().join(format!("esper-cfg-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let path = file.display().to_string();
        let read = |env: &HashMap<String, String>| {
            let mut t = None;
            Vars::new(env)
                .secret(&["ESPER_BROKER_TOKEN", "ADMIN_TOKEN"], &mut t)
                .map(|()| t)
        };
        let env: HashMap<String, String> = [("ADMIN_TOKEN_FILE".to_string(), path.clone())].into();
        assert_eq!(read(&env).unwrap().as_deref(), Some("from-file"));
        std::fs::write(&file, "rotated").unwrap();
        assert_eq!(read(&env).unwrap().as_deref(), Some("rotated"));
        let both: HashMap<String, String> = [
            ("ADMIN_TOKEN_FILE".to_string(), path.clone()),
            ("ADMIN_TOKEN".to_string(), "plain".to_string()),
        ]
        .into();
        assert_eq!(
            read(&both).unwrap().as_deref(),
            Some("plain"),
            "a value wins over a file"
        );
        let specific: HashMap<String, String> = [
            ("ESPER_BROKER_TOKEN_FILE".to_string(), path.clone()),
            ("ADMIN_TOKEN".to_string(), "generic".to_string()),
        ]
        .into();
        assert_eq!(
            read(&specific).unwrap().as_deref(),
            Some("rotated"),
            "the specific name's file wins over the alias"
        );
        std::fs::write(&file, " \n").unwrap();
        let e = read(&env).unwrap_err().to_string();
        assert!(e.contains("ADMIN_TOKEN_FILE") && e.contains("empty"), "{e}");
        std::fs::remove_file(&file).unwrap();
        let e = read(&env).unwrap_err().to_string();
        assert!(
            e.contains("ADMIN_TOKEN_FILE") && e.contains("cannot read"),
            "{e}"
        );
        assert_eq!(read(&HashMap::new()).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_previous_broker_token_needs_a_different_token_beside_it() {
        assert!(check_broker_tokens(Some("new"), Some("old")).is_ok());
        assert!(check_broker_tokens(None, None).is_ok());
        for (token, previous, why) in [
            (Some("same"), Some("same"), "the same"),
            (None, Some("old"), "set `token`"),
            (Some("new"), Some("two words"), "without spaces"),
        ] {
            let e = check_broker_tokens(token, previous)
                .unwrap_err()
                .to_string();
            assert!(e.contains("previous_token") && e.contains(why), "{e}");
            assert!(!e.contains("two words"), "never the secret: {e}");
        }
    }

    #[test]
    fn a_shared_file_is_read_by_section() {
        let dir = std::env::temp_dir().join(format!("esper-cfg-s-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("esper.toml");
        std::fs::write(&path, "[other]\nport = 7\n[demo]\nport = 3\nname = \"x\"\n").unwrap();
        let env: HashMap<String, String> = HashMap::new();
        let c: Demo = load_section(Some(&path), Some("demo"), &env, apply).unwrap();
        assert_eq!((c.port, c.name.as_str()), (3, "x"));
        std::fs::write(&path, "[demo]\nport = \"three\"\n").unwrap();
        let err = load_section::<Demo, _>(Some(&path), Some("demo"), &env, apply).unwrap_err();
        assert!(err.to_string().contains("[demo]"), "{err}");
        assert!(err.to_string().contains("expected a whole number"), "{err}");

        // Beside the parts' sections, a misspelt one or a stray setting is an error.
        for text in [
            "[server]\nport = 3\n[sever]\nport = 4\n",
            "port = 4\n[server]\nport = 3\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let err = load_section::<Demo, _>(Some(&path), Some("server"), &env, apply)
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not a section"), "{err}");
        }
        // A part the file has no section for takes its defaults.
        std::fs::write(&path, "[worker]\nport = 3\n").unwrap();
        let none: Demo = load_section(Some(&path), Some("server"), &env, apply).unwrap();
        assert_eq!(none, Demo::default());
        std::fs::write(&path, "port = 5\n").unwrap();
        let flat: Demo = load_section(Some(&path), Some("server"), &env, apply).unwrap();
        assert_eq!(
            flat.port, 5,
            "a file without sections is one part's settings"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_option_and_value() {
        let env: HashMap<String, String> = [("BROKER_PORT".to_string(), "80x".to_string())].into();
        let err = load::<Demo, _>(None, &env, apply).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid BROKER_PORT = `80x`: invalid digit found in string"
        );
        let env: HashMap<String, String> =
            [("BATCH_TIMEOUT_MS".to_string(), "soon".to_string())].into();
        let err = load::<Demo, _>(None, &env, apply).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid BATCH_TIMEOUT_MS = `soon`"),
            "{err}"
        );
        assert!(parse_dotenv("NOPE").unwrap_err().contains("line 1"));
    }

    #[test]
    fn durations_accept_units_or_bare_numbers() {
        assert_eq!(
            parse_duration("900", Duration::from_secs(1)),
            Ok(Duration::from_secs(900))
        );
        assert_eq!(
            parse_duration("250ms", Duration::from_secs(1)),
            Ok(Duration::from_millis(250))
        );
        assert!(parse_duration("-1", Duration::from_secs(1)).is_err());
    }
}
