//! Logging set-up shared by every binary: `LOG_LEVEL` (an `EnvFilter` directive),
//! `LOG_FORMAT` (`text` or `json`), `LOG_INCLUDE_CALLER`, and the debug switches
//! `ESPER_DEBUG` / `ESPER_DEBUG_SUBSYSTEM`; and, with `--tracing`, OpenTelemetry traces
//! sent over OTLP/gRPC, configured by the standard `OTEL_*` variables.

use std::str::FromStr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

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
/// line. With `tracing`, spans are also exported over OTLP ([`Tracing`]), as the service
/// `service` unless `OTEL_SERVICE_NAME` names another; that needs a Tokio runtime to be
/// current, for the exporter's connection. Calling it twice is harmless (the second
/// call installs nothing).
pub fn init(
    level: &str,
    format: LogFormat,
    include_caller: bool,
    tracing: Option<&str>,
) -> Result<Option<Tracing>, String> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| format!("LOG_LEVEL `{level}` is not a valid filter: {e}"))?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_file(include_caller)
        .with_line_number(include_caller)
        .with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let Some(service) = tracing else {
        let _ = tracing_subscriber::registry().with(fmt).try_init();
        return Ok(None);
    };
    let provider = tracer_provider(service)?;
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("esper"))
        .with_filter(exported_spans());
    if tracing_subscriber::registry()
        .with(fmt)
        .with(spans)
        .try_init()
        .is_err()
    {
        // Another subscriber was installed first: nothing would reach this exporter.
        let _ = provider.shutdown();
        return Ok(None);
    }
    esper_protocol::trace_context::set_exporting();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Some(Tracing { provider }))
}

/// Which spans become OpenTelemetry spans: Esper's own at `info` and above, whatever
/// the log level. The HTTP/2 and gRPC crates are left out: the exporter itself runs on
/// them, and tracing its own sends would feed it spans without end.
fn exported_spans() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

/// The OTLP/gRPC exporter and the provider batching spans into it. The SDK reads the
/// standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (default `http://localhost:4317`),
/// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG` (default: every trace), `OTEL_BSP_*` for batching.
fn tracer_provider(service: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("cannot set up the OTLP trace exporter: {e}"))?;
    let mut resource = Resource::builder();
    // When set, the builder's detectors have already taken it.
    if !std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.trim().is_empty()) {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Traces being exported. [`Tracing::shutdown`] sends what is still buffered; the
/// runtime that was current at [`init`] must still be running then.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports the spans still buffered (bounded by `OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s by
    /// default) and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("esper: traces not all exported at exit: {e}");
        }
    }
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
