//! `--tracing`: spans reach a real OTLP/gRPC collector (the generated OpenTelemetry
//! trace service, served by tonic on a loopback port), configured by the standard
//! `OTEL_*` variables; a caller's `traceparent` is continued; one trace follows a batch
//! of events from the proxy into the ingestion broker and from the engine back to it;
//! a collector address that is not a URL is one clear line at start (`ESPER_TRACING`
//! switches tracing on as the flag does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use support::{Proc, TOKEN, TempDir, eventually, free_addr, wait_ready, write_login_policy};

/// One span as the collector received it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

/// OTLP's `SPAN_KIND_SERVER`.
const SERVER: i32 = 2;

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(attrs: &[KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Received {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: text(&span.attributes),
                });
            }
        }
        self.spans.lock().unwrap().extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    /// Serves the OTLP trace service on a free loopback port; returns its endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
        });
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (up to 20 s) for a span matching `f`.
    async fn wait_for(&self, what: &str, f: impl Fn(&Received) -> bool) -> Received {
        eventually(Duration::from_secs(20), what, || {
            let found = self.spans().into_iter().find(|s| f(s));
            async move { found }
        })
        .await
    }
}

fn otel_env(endpoint: &str, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
        // Batches leave every 100 ms rather than every 5 s, to keep the test short.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ("ESPER_ADMIN_TOKEN", TOKEN.to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_spans_reach_the_collector_and_continue_the_callers_trace() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let dir = TempDir::new("tracing-server");
    let (api, health) = (free_addr(), free_addr());
    let args: Vec<String> = [
        "server",
        "run",
        "--tracing",
        "--listen",
        &api.to_string(),
        "--health-listen",
        &health.to_string(),
        "--metrics-listen",
        &free_addr().to_string(),
        "--database-url",
        &format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("esper.db").display()
        ),
    ]
    .map(String::from)
    .to_vec();
    // The seed's settings, with a ratio of 0: only traces a caller sampled are kept.
    let mut server = Proc::esper(
        "server",
        &args,
        &otel_env(
            &endpoint,
            &[
                ("OTEL_SERVICE_NAME", "esper-server"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0"),
            ],
        ),
    );
    wait_ready(&format!("http://{health}/healthz"), Duration::from_secs(30)).await;

    let http = reqwest::Client::new();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let listed = http
        .get(format!("http://{api}/api/v1/policies"))
        .bearer_auth(TOKEN)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    // The same call without a sampled caller is not kept (ratio 0).
    let unsampled = http
        .get(format!("http://{api}/api/v1/policies"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(unsampled.status(), 200);

    let span = collector
        .wait_for("the server span of the traced call", |s| {
            s.trace_id == trace_id
        })
        .await;
    assert_eq!(span.name, "GET /api/v1/policies", "{span:?}");
    assert_eq!(span.kind, SERVER, "{span:?}");
    assert_eq!(span.parent_span_id, caller_span, "{span:?}");
    assert_eq!(span.service, "esper-server", "{span:?}");
    assert_eq!(
        span.attributes
            .get("http.request.method")
            .map(String::as_str),
        Some("GET")
    );
    assert_eq!(
        span.attributes.get("http.route").map(String::as_str),
        Some("/api/v1/policies")
    );
    assert_eq!(
        span.attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("200"),
        "{span:?}"
    );
    assert!(span.attributes.contains_key("request_id"), "{span:?}");

    // Spans still buffered at SIGTERM are sent before the process exits.
    let late_trace = "0af7651916cd43dd8448eb211c80319c";
    let missing = http
        .get(format!("http://{api}/api/v1/nope"))
        .bearer_auth(TOKEN)
        .header(
            "traceparent",
            format!("00-{late_trace}-b7ad6b7169203331-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        server.terminate(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    let late = collector
        .wait_for("the span of the call made just before SIGTERM", |s| {
            s.trace_id == late_trace
        })
        .await;
    // No route matched: the name is the method alone, never the raw path.
    assert_eq!(late.name, "GET", "{late:?}");
    assert_eq!(
        late.attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("404")
    );
    let others: Vec<_> = collector
        .spans()
        .into_iter()
        .filter(|s| s.trace_id != trace_id && s.trace_id != late_trace)
        .collect();
    assert!(
        others.is_empty(),
        "unsampled traces were exported: {others:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_events_from_the_proxy_through_the_brokers() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let dir = TempDir::new("tracing-dev");
    let policy = write_login_policy(dir.path(), "60s");
    let (proxy, proxy_ops) = (free_addr(), free_addr());
    let mut args: Vec<String> = vec!["dev".into(), "--tracing".into()];
    for (flag, value) in [
        ("--data-dir", dir.path().join("data").display().to_string()),
        ("--policies", policy.display().to_string()),
        ("--proxy-listen", proxy.to_string()),
        ("--proxy-ops-listen", proxy_ops.to_string()),
        ("--api-listen", free_addr().to_string()),
        ("--health-listen", free_addr().to_string()),
        ("--metrics-listen", free_addr().to_string()),
        ("--ingestion-listen", free_addr().to_string()),
        ("--mitigation-listen", free_addr().to_string()),
        ("--worker-ops-listen", free_addr().to_string()),
    ] {
        args.push(flag.into());
        args.push(value);
    }
    let _dev = Proc::esper("esper dev", &args, &otel_env(&endpoint, &[]));
    wait_ready(
        &format!("http://{proxy_ops}/readyz"),
        Duration::from_secs(60),
    )
    .await;

    let http = reqwest::Client::new();
    for _ in 0..5 {
        let _ = http
            .get(format!("http://{proxy}/login"))
            .send()
            .await
            .unwrap();
    }

    // The proxy's shipment of those events, and the broker's answer to it, in one trace.
    let ship = collector
        .wait_for("the proxy shipping events", |s| {
            s.name == "proxy.ship_events"
        })
        .await;
    assert_eq!(ship.service, "esper-dev", "{ship:?}");
    let ingest = collector
        .wait_for("the ingestion broker taking them", |s| {
            s.name == "POST /api/events" && s.parent_span_id == ship.span_id
        })
        .await;
    assert_eq!(ingest.trace_id, ship.trace_id);
    assert_eq!(ingest.kind, SERVER);
    assert_eq!(
        ingest
            .attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("202"),
        "{ingest:?}"
    );

    // The engine's batch, and its acknowledgement to the broker, in another.
    let batch = collector
        .wait_for("the engine evaluating a batch", |s| {
            s.name == "engine.batch"
        })
        .await;
    let ack = collector
        .wait_for("the batch's acknowledgement", |s| {
            s.name == "POST /api/queue/ack" && s.parent_span_id == batch.span_id
        })
        .await;
    assert_eq!(ack.trace_id, batch.trace_id);
}

#[tokio::test]
async fn a_collector_address_that_is_not_a_url_is_one_clear_line() {
    let dir = TempDir::new("tracing-bad");
    // Switched on from the environment this time.
    let args: Vec<String> = [
        "server",
        "run",
        "--listen",
        &free_addr().to_string(),
        "--health-listen",
        &free_addr().to_string(),
        "--metrics-listen",
        &free_addr().to_string(),
        "--database-url",
        &format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("esper.db").display()
        ),
    ]
    .map(String::from)
    .to_vec();
    let mut server = Proc::esper(
        "server",
        &args,
        &otel_env("not a url", &[("ESPER_TRACING", "true")]),
    );
    let code = eventually(Duration::from_secs(20), "the server to exit", || {
        let code = server.try_exit();
        async move { code }
    })
    .await;
    assert_eq!(code, Some(2), "{}", server.log());
    let log = server.log();
    let lines: Vec<_> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].starts_with("esper: ") && lines[0].contains("OTLP"),
        "{log}"
    );
}
