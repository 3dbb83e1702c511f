//! Logging set-up shared by every binary: `LOG_LEVEL` (an `EnvFilter` directive),
//! `LOG_FORMAT` (`text` or `json`), `LOG_INCLUDE_CALLER`, and the debug switches
//! `ESPER_DEBUG` / `ESPER_DEBUG_SUBSYSTEM`; and, with `--tracing`, OpenTelemetry traces
//! sent over OTLP/gRPC, configured by the standard `OTEL_*` variables.

use std::io::IsTerminal;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithTonicConfig;
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

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

/// The filter of the installed subscriber's log lines, which [`set_level`] replaces.
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Replaces the log filter of the subscriber [`init`] installed (a reload of the
/// configuration); a filter that does not parse is refused and the one in force stays.
pub fn set_level(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| format!("LOG_LEVEL `{level}` is not a valid filter: {e}"))?;
    note_level(&filter);
    match LEVEL.get() {
        Some(handle) => handle.reload(filter).map_err(|e| e.to_string()),
        None => Err("logging was set up elsewhere; its level cannot change".into()),
    }
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as `info` or
/// `esper_engine=debug,info`; `include_caller` adds the source file and line to every
/// line. With `tracing`, spans are also exported over OTLP ([`Tracing`]), as the service
/// `service` unless `OTEL_SERVICE_NAME` names another. Calling it twice is harmless (the
/// second call installs nothing).
pub fn init(
    level: &str,
    format: LogFormat,
    include_caller: bool,
    tracing: Option<&str>,
) -> Result<Option<Tracing>, String> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| format!("LOG_LEVEL `{level}` is not a valid filter: {e}"))?;
    note_level(&filter);
    // Swappable, so a reload can change the level without a restart.
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only on a terminal: a log file or collector would keep the escape codes.
    let colours = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(colours)
        .with_file(include_caller)
        .with_line_number(include_caller)
        .with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let Some(service) = tracing else {
        if tracing_subscriber::registry()
            .with(fmt)
            .with(ClientFaults)
            .try_init()
            .is_ok()
        {
            let _ = LEVEL.set(handle);
        }
        return Ok(None);
    };
    let (provider, runtime) = tracer_provider(service)?;
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("esper"))
        .with_filter(exported_spans());
    if tracing_subscriber::registry()
        .with(fmt)
        .with(spans)
        .with(ClientFaults)
        .try_init()
        .is_err()
    {
        // Another subscriber was installed first: nothing would reach this exporter.
        let _ = provider.shutdown_with_timeout(Duration::from_secs(1));
        runtime.shutdown_background();
        return Ok(None);
    }
    let _ = LEVEL.set(handle);
    esper_protocol::trace_context::set_exporting();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Some(Tracing { provider, runtime }))
}

/// Leaves out Pingora's error lines for what a client did before any request hook runs
/// (a request head cut off by the client, a read of it that timed out) unless logging is
/// at `debug`: an edge proxy meets them all day, and any client could fill the log with
/// them by opening connections, as nginx logs a client's closed connection at `info`.
struct ClientFaults;

/// Whether the log filter in force lets `debug` lines through (for some target).
static SHOW_CLIENT_FAULTS: AtomicBool = AtomicBool::new(false);

fn note_level(filter: &EnvFilter) {
    let debug = filter
        .max_level_hint()
        .is_some_and(|l| l >= LevelFilter::DEBUG);
    SHOW_CLIENT_FAULTS.store(debug, Ordering::Relaxed);
}

impl ClientFaults {
    /// Pingora's line for a client's failure to send a request (`Downstream` errors).
    fn is_client_fault(event: &tracing::Event<'_>) -> bool {
        let meta = event.metadata();
        if *meta.level() != tracing::Level::ERROR {
            return false;
        }
        // Pingora logs through the `log` crate: its events carry the real target in a
        // `log.target` field, under the target `log`.
        #[derive(Default)]
        struct Seen {
            pingora: bool,
            client: bool,
        }
        impl tracing::field::Visit for Seen {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "log.target" {
                    self.pingora = value.starts_with("pingora");
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.client = format!("{value:?}").starts_with("Fail to proxy: Downstream ");
                }
            }
        }
        let mut seen = Seen {
            pingora: meta.target().starts_with("pingora"),
            client: false,
        };
        if meta.target() != "log" && !seen.pingora {
            return false;
        }
        event.record(&mut seen);
        seen.pingora && seen.client
    }
}

// A layer of its own rather than a per-layer filter: its `event_enabled` keeps the line
// from every layer.
impl<S: tracing::Subscriber> Layer<S> for ClientFaults {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        SHOW_CLIENT_FAULTS.load(Ordering::Relaxed) || !Self::is_client_fault(event)
    }
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

const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// Refuses a sampler the SDK would not know (it would fall back to sampling every trace
/// and say so only in its own logs), and a ratio that is not one.
fn check_sampler() -> Result<(), String> {
    let Ok(sampler) = std::env::var("OTEL_TRACES_SAMPLER") else {
        return Ok(());
    };
    if !SAMPLERS.contains(&sampler.as_str()) {
        return Err(format!(
            "OTEL_TRACES_SAMPLER `{sampler}` is not a sampler (one of: {})",
            SAMPLERS.join(", ")
        ));
    }
    if sampler.ends_with("traceidratio")
        && let Ok(arg) = std::env::var("OTEL_TRACES_SAMPLER_ARG")
        && !arg
            .trim()
            .parse::<f64>()
            .is_ok_and(|r| (0.0..=1.0).contains(&r))
    {
        return Err(format!(
            "OTEL_TRACES_SAMPLER_ARG `{arg}` is not a ratio between 0 and 1"
        ));
    }
    Ok(())
}

/// Refuses a collector address the exporter would take and then never reach (`notaurl`
/// reads as a relative reference; `ftp://` is a URL, but not one gRPC speaks).
fn check_endpoint() -> Result<(), String> {
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        let Ok(value) = std::env::var(name) else {
            continue;
        };
        if value.trim().is_empty() {
            continue;
        }
        let usable = value.parse::<http::Uri>().is_ok_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
        });
        if !usable {
            return Err(format!(
                "{name} `{value}` is not an http:// or https:// URL of the OTLP collector"
            ));
        }
        // The SDK reads the traces' own variable first.
        return Ok(());
    }
    Ok(())
}

/// The OTLP/gRPC exporter, on a runtime of its own (so spans that end while the
/// service's runtime shuts down are still exported), and the provider batching spans
/// into it. The SDK reads the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (default
/// `http://localhost:4317`), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
/// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (default: every trace), `OTEL_BSP_*`.
fn tracer_provider(service: &str) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), String> {
    check_sampler()?;
    check_endpoint()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("esper-otlp")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the trace exporter's runtime: {e}"))?;
    let exporter = {
        let _on = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_tls_config(collector_tls()?)
            .build()
            .map_err(|e| format!("cannot set up the OTLP trace exporter: {e}"))?
    };
    // The detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; only when
    // neither names the service does it get the command's name.
    let detected = Resource::builder().build();
    let unnamed = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_none_or(|v| v.as_str().starts_with("unknown_service"));
    let resource = if unnamed {
        Resource::builder()
            .with_service_name(service.to_string())
            .build()
    } else {
        detected
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Reporting {
            inner: exporter,
            failing: AtomicBool::new(false),
        })
        .with_resource(resource)
        .build();
    Ok((provider, runtime))
}

/// How an `https://` collector is trusted: the public roots, and the CA in the PEM file
/// `OTEL_EXPORTER_OTLP_CERTIFICATE` names, if any (a plain `http://` endpoint ignores it).
fn collector_tls() -> Result<ClientTlsConfig, String> {
    let tls = ClientTlsConfig::new().with_enabled_roots();
    let Ok(path) = std::env::var("OTEL_EXPORTER_OTLP_CERTIFICATE") else {
        return Ok(tls);
    };
    let pem = std::fs::read(&path)
        .map_err(|e| format!("cannot read OTEL_EXPORTER_OTLP_CERTIFICATE `{path}`: {e}"))?;
    Ok(tls.ca_certificate(Certificate::from_pem(pem)))
}

/// The exporter, saying once that the collector cannot be reached and once that it can
/// again, instead of one error per batch for as long as it is down.
#[derive(Debug)]
struct Reporting<E> {
    inner: E,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for Reporting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!(error = %e, "cannot export traces; spans are dropped until the collector answers");
            }
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!("exporting traces again");
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// How long exit waits for the last spans to reach the collector.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(5);

/// Traces being exported. Call [`Tracing::shutdown`] once the service has stopped.
pub struct Tracing {
    provider: SdkTracerProvider,
    runtime: tokio::runtime::Runtime,
}

impl Tracing {
    /// Exports the spans still buffered, waiting at most 5 s for the collector, and
    /// stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_AT_EXIT) {
            eprintln!("esper: traces not all exported at exit: {e}");
        }
        self.runtime.shutdown_timeout(Duration::from_secs(1));
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
