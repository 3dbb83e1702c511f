//! `--tracing`: spans reach a real OTLP/gRPC collector (the generated OpenTelemetry
//! trace service, served by tonic on a loopback port), configured by the standard
//! `OTEL_*` variables; a caller's `traceparent` is continued; one trace follows a batch
//! of events from the proxy into the ingestion broker and from the engine back to it;
//! spans buffered at SIGTERM are sent before exit, and health probes make none; a
//! collector that is down is one warning and does not hold up exit; a collector address
//! that is not a URL, or a sampler the SDK does not know, is one clear line at start
//! (`ESPER_TRACING` switches tracing on as the flag does).

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
        self.serve(None).await
    }

    /// The same over TLS with `identity` (certificate and key, PEM).
    async fn start_tls(&self, identity: tonic::transport::Identity) -> String {
        self.serve(Some(identity)).await
    }

    async fn serve(&self, identity: Option<tonic::transport::Identity>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        let mut server = tonic::transport::Server::builder();
        let scheme = match identity {
            Some(identity) => {
                let tls = tonic::transport::ServerTlsConfig::new().identity(identity);
                server = server.tls_config(tls).unwrap();
                "https"
            }
            None => "http",
        };
        tokio::spawn(async move {
            server
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
        });
        format!("{scheme}://{addr}")
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

fn server_args(api: &str, health: &str, dir: &TempDir) -> Vec<String> {
    [
        "server",
        "run",
        "--tracing",
        "--listen",
        api,
        "--health-listen",
        health,
        "--metrics-listen",
        &free_addr().to_string(),
        "--database-url",
        &format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("esper.db").display()
        ),
    ]
    .map(String::from)
    .to_vec()
}

/// `GET /api/v1/policies` on the server at `api`, which must answer 200.
async fn list_policies(api: &str) {
    let listed = reqwest::Client::new()
        .get(format!("http://{api}/api/v1/policies"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
}

/// Waits (up to 20 s) for a process expected to stop on its own; its exit code.
async fn exit_code(p: &mut Proc) -> Option<i32> {
    eventually(Duration::from_secs(20), "the process to exit", || {
        let code = p.try_exit();
        async move { code }
    })
    .await
}

/// The process's output lines, blank ones left out.
fn lines(p: &Proc) -> Vec<String> {
    p.log()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_spans_reach_the_collector_and_continue_the_callers_trace() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let dir = TempDir::new("tracing-server");
    let (api, health) = (free_addr().to_string(), free_addr().to_string());
    // The seed's settings, with a ratio of 0: only traces a caller sampled are kept.
    let mut server = Proc::esper(
        "server",
        &server_args(&api, &health, &dir),
        &otel_env(
            &endpoint,
            &[
                ("OTEL_SERVICE_NAME", "edge-control-plane"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0"),
            ],
        ),
    );
    wait_ready(&format!("http://{health}/healthz"), Duration::from_secs(30)).await;

    let http = reqwest::Client::new();
    let call = |path: &str, traceparent: Option<String>| {
        let mut rb = http.get(format!("http://{api}{path}")).bearer_auth(TOKEN);
        if let Some(tp) = traceparent {
            rb = rb.header("traceparent", tp);
        }
        rb.send()
    };
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traced = call(
        "/api/v1/policies",
        Some(format!("00-{trace_id}-{caller_span}-01")),
    );
    assert_eq!(traced.await.unwrap().status(), 200);
    // The same call without a sampled caller is not kept (ratio 0).
    assert_eq!(call("/api/v1/policies", None).await.unwrap().status(), 200);
    // A path no route matches.
    let unrouted_trace = "0af7651916cd43dd8448eb211c80319c";
    let unrouted = call(
        "/api/v1/nope",
        Some(format!("00-{unrouted_trace}-b7ad6b7169203331-01")),
    );
    assert_eq!(unrouted.await.unwrap().status(), 404);

    let span = collector
        .wait_for("the server span of the traced call", |s| {
            s.trace_id == trace_id
        })
        .await;
    assert_eq!(span.name, "GET /api/v1/policies", "{span:?}");
    assert_eq!(span.kind, SERVER, "{span:?}");
    assert_eq!(span.parent_span_id, caller_span, "{span:?}");
    assert_eq!(span.service, "edge-control-plane", "{span:?}");
    let attr = |s: &Received, k: &str| s.attributes.get(k).cloned();
    assert_eq!(attr(&span, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        attr(&span, "http.route").as_deref(),
        Some("/api/v1/policies")
    );
    assert_eq!(
        attr(&span, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(span.attributes.contains_key("request_id"), "{span:?}");

    // No route matched: the name is the method alone, never the raw path.
    let span = collector
        .wait_for("the span of the call to no route", |s| {
            s.trace_id == unrouted_trace
        })
        .await;
    assert_eq!(span.name, "GET", "{span:?}");
    assert_eq!(
        attr(&span, "http.response.status_code").as_deref(),
        Some("404")
    );

    assert_eq!(
        server.terminate(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    let others: Vec<_> = collector
        .spans()
        .into_iter()
        .filter(|s| s.trace_id != trace_id && s.trace_id != unrouted_trace)
        .collect();
    assert!(
        others.is_empty(),
        "unsampled traces were exported: {others:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_buffered_at_sigterm_are_sent_before_exit() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let dir = TempDir::new("tracing-exit");
    let (api, health) = (free_addr().to_string(), free_addr().to_string());
    let mut env = otel_env(&endpoint, &[]);
    // Batches would leave only after ten minutes: what arrives was sent at exit.
    env.retain(|(k, _)| *k != "OTEL_BSP_SCHEDULE_DELAY");
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "600000".to_string()));
    let mut server = Proc::esper("server", &server_args(&api, &health, &dir), &env);
    wait_ready(&format!("http://{health}/healthz"), Duration::from_secs(30)).await;
    list_policies(&api).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.spans().is_empty(), "{:?}", collector.spans());
    assert_eq!(
        server.terminate(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    let span = collector
        .wait_for("the span sent at exit", |s| {
            s.name == "GET /api/v1/policies"
        })
        .await;
    // Without OTEL_SERVICE_NAME, the command's name.
    assert_eq!(span.service, "esper-server", "{span:?}");
    // Health probes (the wait above polled /healthz) make no traces.
    let probes: Vec<_> = collector
        .spans()
        .into_iter()
        .filter(|s| {
            s.attributes
                .get("url.path")
                .is_none_or(|p| p.starts_with("/healthz"))
        })
        .collect();
    assert!(probes.is_empty(), "{probes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_is_one_warning_and_does_not_hold_up_exit() {
    let dir = TempDir::new("tracing-down");
    let (api, health) = (free_addr().to_string(), free_addr().to_string());
    // A port nothing listens on.
    let endpoint = format!("http://{}", free_addr());
    let mut server = Proc::esper(
        "server",
        &server_args(&api, &health, &dir),
        &otel_env(&endpoint, &[]),
    );
    wait_ready(&format!("http://{health}/healthz"), Duration::from_secs(30)).await;
    for _ in 0..3 {
        list_policies(&api).await;
        // Past a batch's 100 ms: each call is a failed export of its own.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let stopping = std::time::Instant::now();
    assert_eq!(
        server.terminate(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
    let log = server.log();
    assert_eq!(log.matches("cannot export traces").count(), 1, "{log}");
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

    // Spans named `name`, as (span id, trace id).
    let spans_named = |name: &str| -> Vec<(String, String)> {
        collector
            .spans()
            .into_iter()
            .filter(|s| s.name == name)
            .map(|s| (s.span_id, s.trace_id))
            .collect()
    };
    // A shipment of those events by the proxy, and the broker's answer to it, in one
    // trace (any shipment: one may have been retried).
    let ingest = collector
        .wait_for("the ingestion broker taking a shipment", |s| {
            s.name == "POST /api/events"
                && spans_named("proxy.ship_events")
                    .contains(&(s.parent_span_id.clone(), s.trace_id.clone()))
        })
        .await;
    assert_eq!(ingest.kind, SERVER);
    assert_eq!(
        ingest
            .attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("202"),
        "{ingest:?}"
    );
    let ship = collector
        .spans()
        .into_iter()
        .find(|s| s.span_id == ingest.parent_span_id)
        .unwrap();
    // Without OTEL_SERVICE_NAME, the command's name.
    assert_eq!(ship.service, "esper-dev", "{ship:?}");

    // An engine batch, and its acknowledgement to the broker, in another.
    collector
        .wait_for("a batch's acknowledgement", |s| {
            s.name == "POST /api/queue/ack"
                && spans_named("engine.batch")
                    .contains(&(s.parent_span_id.clone(), s.trace_id.clone()))
        })
        .await;
    // The parts poll each other all along (claims, the mitigation stream, heartbeats,
    // refreshes): none of that is traced.
    let polled: Vec<_> = collector
        .spans()
        .into_iter()
        .filter(|s| {
            [
                "/api/queue/claim",
                "/api/mitigations/stream",
                "heartbeat",
                "/active",
            ]
            .iter()
            .any(|p| s.name.contains(p))
        })
        .collect();
    assert!(polled.is_empty(), "{polled:?}");
}

#[tokio::test]
async fn bad_tracing_settings_are_one_clear_line() {
    let dir = TempDir::new("tracing-bad");
    // Switched on from the environment this time.
    let mut args = server_args(&free_addr().to_string(), &free_addr().to_string(), &dir);
    args.retain(|a| a != "--tracing");
    let no_file = dir.path().join("no-such-ca.pem").display().to_string();
    let local = "http://127.0.0.1:4317";
    // (endpoint, variables, what the one line says)
    type Case<'a> = (&'a str, Vec<(&'static str, &'a str)>, &'a str);
    let cases: [Case<'_>; 7] = [
        ("not a url", vec![], "OTLP"),
        ("notaurl", vec![], "is not an http:// or https:// URL"),
        (
            "ftp://127.0.0.1:4317",
            vec![],
            "is not an http:// or https:// URL",
        ),
        (
            "https://127.0.0.1:4317",
            vec![("OTEL_EXPORTER_OTLP_CERTIFICATE", no_file.as_str())],
            "cannot read OTEL_EXPORTER_OTLP_CERTIFICATE",
        ),
        (
            local,
            vec![
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidration"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ],
            "is not a sampler",
        ),
        (
            local,
            vec![
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "ten percent"),
            ],
            "is not a ratio",
        ),
        (
            local,
            vec![
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
            ],
            "is not a ratio",
        ),
    ];
    for (endpoint, vars, expected) in cases {
        let mut extra = vec![("ESPER_TRACING", "true")];
        extra.extend(vars);
        let mut server = Proc::esper("server", &args, &otel_env(endpoint, &extra));
        assert_eq!(exit_code(&mut server).await, Some(2), "{}", server.log());
        let lines = lines(&server);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("esper: ") && lines[0].contains(expected),
            "{lines:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_collector_is_trusted_through_otel_exporter_otlp_certificate() {
    let dir = TempDir::new("tracing-tls");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let ca = dir.path().join("collector-ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let collector = Collector::default();
    let endpoint = collector
        .start_tls(tonic::transport::Identity::from_pem(
            cert.cert.pem(),
            cert.key_pair.serialize_pem(),
        ))
        .await;
    assert!(endpoint.starts_with("https://"), "{endpoint}");

    // Without the collector's CA: the handshake fails, one warning, no spans.
    let (api, health) = (free_addr().to_string(), free_addr().to_string());
    let mut untrusting = Proc::esper(
        "server",
        &server_args(&api, &health, &dir),
        &otel_env(&endpoint, &[]),
    );
    wait_ready(&format!("http://{health}/healthz"), Duration::from_secs(30)).await;
    list_policies(&api).await;
    let log = eventually(Duration::from_secs(20), "the failed export", || {
        let log = untrusting.log();
        async move { log.contains("cannot export traces").then_some(log) }
    })
    .await;
    assert_eq!(
        untrusting.terminate(Duration::from_secs(20)),
        Some(0),
        "{log}"
    );
    assert!(collector.spans().is_empty(), "{:?}", collector.spans());

    // With it, over TLS.
    let (api, health) = (free_addr().to_string(), free_addr().to_string());
    let ca = ca.display().to_string();
    let _trusting = Proc::esper(
        "server",
        &server_args(&api, &health, &dir),
        &otel_env(&endpoint, &[("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca)]),
    );
    wait_ready(&format!("http://{health}/healthz"), Duration::from_secs(30)).await;
    list_policies(&api).await;
    collector
        .wait_for("the span sent over TLS", |s| {
            s.name == "GET /api/v1/policies"
        })
        .await;
}
