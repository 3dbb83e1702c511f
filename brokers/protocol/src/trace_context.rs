//! W3C trace context on the HTTP calls between Esper's parts, so one trace follows a
//! batch from the proxy through the brokers and the engine to the control plane.
//!
//! Both directions go through OpenTelemetry's global propagator. Until a binary turns
//! tracing on (`--tracing`) that propagator is a no-op: nothing is read or written.

use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Longest caller-supplied `X-Request-ID` kept; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Keeps a caller-supplied request id when it is short and plain; `None` means make one.
/// An id is echoed on the answer and written into logs: one of any length or bytes
/// would let a caller fill them, or forge log lines.
pub fn acceptable_request_id(value: &[u8]) -> Option<&str> {
    if value.is_empty() || value.len() > MAX_REQUEST_ID_LEN {
        return None;
    }
    if !value
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:+=/".contains(b))
    {
        return None;
    }
    std::str::from_utf8(value).ok()
}

/// Records that spans are exported from now on (set once, by the telemetry set-up).
pub fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Are spans exported? Services make their richer, `info`-level spans only then.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes the current span's trace context (`traceparent`, `tracestate`) into `headers`.
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Inject(headers)));
}

/// Adds the current span's trace context, and the id of the request being handled, to
/// an outgoing request.
pub fn traced(rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    let mut headers = HeaderMap::new();
    inject(&mut headers);
    if let Some(id) = request_id() {
        headers.insert(http::header::HeaderName::from_static("x-request-id"), id);
    }
    if headers.is_empty() {
        rb
    } else {
        rb.headers(headers)
    }
}

/// The trace context a caller sent in `headers` (an empty context when there is none
/// or it cannot be read).
pub fn extract(headers: &HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(headers)))
}

/// Makes `span` a child of the trace the caller sent in `headers`, if any.
pub fn continue_from(span: &tracing::Span, headers: &HeaderMap) {
    let parent = extract(headers);
    // Fails only when no OpenTelemetry layer is installed, that is with tracing off.
    let _ = span.set_parent(parent);
}

tokio::task_local! {
    static REQUEST_ID: http::HeaderValue;
}

/// Runs `fut` as the handling of the request `id` (`X-Request-ID`): the broker calls it
/// makes carry the same id, so one id follows an operator's call from service to service.
pub async fn with_request_id<F: std::future::Future>(id: http::HeaderValue, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// The id of the request being handled, if any.
pub fn request_id() -> Option<http::HeaderValue> {
    REQUEST_ID.try_with(Clone::clone).ok()
}
