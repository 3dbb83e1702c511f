//! Logging set-up shared by every binary: `LOG_LEVEL` (an `EnvFilter` directive),
//! `LOG_FORMAT` (`text` or `json`), `LOG_INCLUDE_CALLER`, and the debug switches
//! `ESPER_DEBUG` / `ESPER_DEBUG_SUBSYSTEM`.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "pretty" | "plain" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}` is not a log format (text or json)")),
        }
    }
}

/// The parts `ESPER_DEBUG_SUBSYSTEM` can name, and the log targets each one covers.
pub const SUBSYSTEMS: [(&str, &str); 12] = [
    ("evaluation", "esper_engine::eval"),
    ("policy", "esper_engine::policy"),
    ("worker", "esper_engine::worker"),
    ("engine", "esper_engine"),
    ("ingestion", "esper_ingestion"),
    ("mitigation", "esper_mitigation"),
    ("control", "esper_control"),
    ("store", "esper_control::store"),
    ("proxy", "esper_proxy"),
    ("cache", "esper_proxy::cache"),
    ("challenge", "esper_proxy::challenge"),
    ("follower", "esper_proxy::follower"),
];

/// The log filter for `level` (`None`: not configured), the debug switch and the
/// comma-separated subsystems to log at debug: debug mode lowers the default level to
/// `debug`, and each named subsystem logs at `debug` whatever the default.
pub fn filter(level: Option<&str>, debug: bool, subsystems: &str) -> Result<String, String> {
    let mut directives = vec![match level {
        Some(l) => l.to_string(),
        None if debug => "debug".to_string(),
        None => "info".to_string(),
    }];
    for name in subsystems
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        let target = SUBSYSTEMS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let known: Vec<_> = SUBSYSTEMS.iter().map(|(n, _)| *n).collect();
                format!("`{name}` is not a subsystem (one of: {})", known.join(", "))
            })?;
        directives.push(format!("{target}=debug"));
    }
    Ok(directives.join(","))
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as `info` or
/// `esper_engine=debug,info`; `include_caller` adds the source file and line to every
/// line. Calling it twice is harmless (the second call is ignored).
pub fn init(level: &str, format: LogFormat, include_caller: bool) -> Result<(), String> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| format!("LOG_LEVEL `{level}` is not a valid filter: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_file(include_caller)
        .with_line_number(include_caller)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_mode_and_subsystems_make_the_filter() {
        assert_eq!(filter(None, false, "").unwrap(), "info");
        assert_eq!(filter(None, true, "").unwrap(), "debug");
        // An explicit level wins over the debug switch (LOG_LEVEL=trace stays trace).
        assert_eq!(filter(Some("trace"), true, "").unwrap(), "trace");
        assert_eq!(
            filter(Some("warn"), false, "evaluation, Proxy").unwrap(),
            "warn,esper_engine::eval=debug,esper_proxy=debug"
        );
        let err = filter(None, false, "evaluation,nope").unwrap_err();
        assert!(err.contains("`nope` is not a subsystem"), "{err}");
        for (_, target) in SUBSYSTEMS {
            EnvFilter::try_new(format!("{target}=debug")).unwrap();
        }
    }
}
