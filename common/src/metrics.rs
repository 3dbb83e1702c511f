//! Prometheus plumbing: rendering a registry, the `/metrics` route, and per-route
//! request counts and latency for any axum router.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// The registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

fn respond(registry: &Registry) -> Response {
    let mut resp = render(registry).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// `GET /metrics` for `registry`.
pub fn route(registry: Registry) -> Router {
    Router::new().route("/metrics", get(move || async move { respond(&registry) }))
}

/// Registers a collector, ignoring a duplicate registration (a service started twice
/// in one process during tests).
pub fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: &C) {
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::debug!(error = %e, "metric already registered");
    }
}

/// Request counts and latency per route: `esper_requests_total{method,route,status}` and
/// `esper_request_duration_seconds{method,route}`. The route label is the matched route
/// template (`/api/queue/items/{item_id}`), never the raw path, so label values stay few;
/// requests that match no route count as `unmatched`.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    /// Creates the two metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<HttpMetrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new("esper_requests_total", "HTTP requests answered"),
            &["method", "route", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "esper_request_duration_seconds",
                "Time to answer an HTTP request (long-polls included)",
            ),
            &["method", "route"],
        )?;
        register(registry, &requests);
        register(registry, &duration);
        Ok(HttpMetrics { requests, duration })
    }

    /// Wraps `router` so every request it answers is counted and timed.
    pub fn layer(&self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), track))
    }
}

/// The method as a label: any method token is valid HTTP, so one a client made up
/// would otherwise add series (a counter and a histogram each) for as long as the
/// process runs, one per name, without a token.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::PATCH, "PATCH"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    KNOWN
        .iter()
        .find(|(m, _)| m == method)
        .map_or("other", |(_, label)| label)
}

async fn track(State(m): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    m.requests
        .with_label_values(&[method, route.as_str(), status.as_str()])
        .inc();
    m.duration
        .with_label_values(&[method, route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn made_up_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for name in ["XYZ123", "get", "PROPFIND"] {
            let m = Method::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(method_label(&m), "other", "{name}");
        }
    }
}
