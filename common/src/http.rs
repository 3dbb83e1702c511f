//! HTTP plumbing for every axum service: one error type that answers JSON, a JSON
//! extractor whose rejections are JSON too, bearer-token auth compared in constant time,
//! request ids, body limits, binding with a clear error, and serving with a bounded drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Router, extract::DefaultBodyLimit};
use esper_protocol::ApiErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::shutdown::Shutdown;

/// Every error an Esper HTTP service answers with. Internal errors are logged once here
/// and hidden from clients.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{}", too_large_message(*.limit))]
    PayloadTooLarge { limit: Option<usize> },
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("{message}")]
    BadGateway { code: &'static str, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 with a code and a message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// A 500 whose detail goes to the log only.
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(e.to_string())
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code),
            ApiError::BadGateway { code, .. } => (StatusCode::BAD_GATEWAY, code),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

fn too_large_message(limit: Option<usize>) -> String {
    match limit {
        Some(n) => format!("request body is larger than the limit of {n} bytes"),
        None => "request body is larger than the limit".to_string(),
    }
}

/// The body limit [`standard_layers`] gives a router, for the 413 that names it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A request body held to the service's limit: over it, the JSON 413 that names the
/// limit; a body that cannot be read, a JSON 400.
pub struct Body(pub bytes::Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
        bytes::Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit }
                } else {
                    ApiError::bad_request("invalid_body", e.body_text())
                }
            })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error; see the service log".to_string()
            }
            other => other.to_string(),
        };
        let body = ApiErrorBody {
            error: code.to_string(),
            message,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let ApiError::Unauthorized = self {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::Unavailable {
            retry_after: Some(secs),
            ..
        } = self
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// `axum::Json`, but a bad body answers with our JSON error: 400 for bad syntax, unknown
/// fields or wrong types (with serde's message, which names the field), 413 over the
/// size limit, 415 without a JSON content type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !declared_json(req.headers()) {
            return Err(not_json());
        }
        let Body(bytes) = Body::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        decode(&bytes)
            .map(Json)
            .map_err(IntoResponse::into_response)
    }
}

/// Is the body declared JSON (`application/json`, or `application/*+json`)?
fn declared_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            // Media types are case-insensitive (RFC 9110 8.3.1).
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
}

/// A body read as `T`, with axum's messages (which name the field at fault). serde
/// takes a JSON array for a struct, its fields in order, so `[]` would be a request
/// with every field defaulted; an object type is given as an object or refused.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let array = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    // A body that is no JSON at all (`[` cut short) is reported as such, below.
    let json = || serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok();
    if array && wants_object::<T>() && json() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "expected an object, found an array",
        ));
    }
    axum::Json::<T>::from_bytes(bytes)
        .map(|axum::Json(v)| v)
        .map_err(json_rejection)
}

/// Does `T` read itself as a struct? Asked of a deserializer that only notes which
/// kind of value `T` asks for first.
fn wants_object<'de, T: serde::Deserialize<'de>>() -> bool {
    matches!(T::deserialize(KindProbe), Err(Kind::Struct))
}

struct KindProbe;

#[derive(Debug)]
enum Kind {
    Struct,
    Other,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for Kind {}

impl serde::de::Error for Kind {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Kind::Other
    }
}

impl<'de> serde::Deserializer<'de> for KindProbe {
    type Error = Kind;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Kind> {
        Err(Kind::Other)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Kind> {
        Err(Kind::Struct)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            ApiError::bad_request("invalid_body", body_text(&e.body_text()))
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::bad_request("invalid_json", body_text(&e.body_text()))
        }
        other => ApiError::bad_request("invalid_body", other.body_text()),
    }
}

/// 415 for a body that is not declared JSON.
fn not_json() -> Response {
    let body = ApiErrorBody {
        error: "unsupported_media_type".into(),
        message: "expected `Content-Type: application/json`".into(),
    };
    (StatusCode::UNSUPPORTED_MEDIA_TYPE, axum::Json(body)).into_response()
}

/// A JSON body that may be left out: an empty body is `T::default()`. A body given is
/// held to what [`Json`] asks (its content type, the body limit), with the same errors.
pub struct OptionalJson<T>(pub T);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = declared_json(req.headers());
        let Body(bytes) = Body::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        if !is_json {
            return Err(not_json());
        }
        decode(&bytes)
            .map(OptionalJson)
            .map_err(IntoResponse::into_response)
    }
}

fn body_text(s: &str) -> String {
    // axum prefixes serde's message with a generic sentence; keep the useful part.
    let s = s
        .strip_prefix("Failed to deserialize the JSON body into the target type: ")
        .or_else(|| s.strip_prefix("Failed to parse the request body as JSON: "))
        .unwrap_or(s);
    crate::plain::plain_serde(s)
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Compares a presented bearer token with the expected one in constant time.
pub fn token_matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
    else {
        return false;
    };
    let presented = presented.trim().as_bytes();
    let expected = expected.as_bytes();
    // Length is not secret; content is compared without early exit.
    presented.len() == expected.len() && bool::from(presented.ct_eq(expected))
}

/// The bearer tokens a service accepts: its token and, while a rotation is under way,
/// the one it replaces. Shared by the layers that check them; a reload replaces them
/// and the next request is checked against the new ones. None at all: the service is
/// open.
#[derive(Clone, Default)]
pub struct Accepted(Arc<arc_swap::ArcSwap<Vec<String>>>);

impl Accepted {
    pub fn new(token: Option<&str>, previous: Option<&str>) -> Accepted {
        let accepted = Accepted::default();
        accepted.set(token, previous);
        accepted
    }

    /// Replaces the accepted tokens (empty ones count as none); `true` when they changed.
    pub fn set(&self, token: Option<&str>, previous: Option<&str>) -> bool {
        let mut next: Vec<String> = [token, previous]
            .into_iter()
            .flatten()
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect();
        next.dedup();
        let before = self.0.swap(Arc::new(next.clone()));
        *before != next
    }

    /// [`Accepted::set`] from a reloaded configuration (a broker's `token` and
    /// `previous_token`), noting both settings applied when they changed. Taking the
    /// token away is refused: a reload would open the API to everyone who reaches it
    /// without the warning a start gives; a restart does it.
    pub fn reload(
        &self,
        token: Option<&str>,
        previous: Option<&str>,
        done: &mut crate::config::Reloaded,
    ) {
        if token.is_none_or(str::is_empty) && !self.is_open() {
            let why = "taking the token away would open the API to every client that \
                       reaches it; restart to do that";
            done.kept.push(("token", why.into()));
            done.kept.push(("previous_token", why.into()));
            return;
        }
        if self.set(token, previous) {
            done.applied.extend(["token", "previous_token"]);
        }
    }

    /// No token: every request passes.
    pub fn is_open(&self) -> bool {
        self.0.load().is_empty()
    }

    fn admits(&self, headers: &HeaderMap) -> bool {
        let tokens = self.0.load();
        // Every token is compared, so the time taken does not tell which matched.
        tokens.is_empty()
            || tokens
                .iter()
                .fold(false, |hit, t| token_matches(headers, t) | hit)
    }
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Accepted({} tokens)", self.0.load().len())
    }
}

/// Middleware: every request must carry `Authorization: Bearer <token>` with one of the
/// accepted tokens; with none accepted every request passes.
pub async fn require_bearer(
    State(accepted): State<Accepted>,
    req: Request,
    next: Next,
) -> Response {
    if accepted.admits(req.headers()) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// Wraps `router` with `require_bearer` for `accepted`.
pub fn with_bearer<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    accepted: Accepted,
) -> Router<S> {
    router.layer(axum::middleware::from_fn_with_state(
        accepted,
        require_bearer,
    ))
}

/// Wraps destructive admin routes of a service whose token is optional (the brokers'
/// `cache/clear`, `queue/purge`): while it has no token they answer loopback clients
/// only, since anyone who could reach an open broker could otherwise wipe it. With a
/// token, `with_bearer` guards them like every other route. `setting` names the token's
/// environment variable in the refusal.
pub fn loopback_unless_token<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    accepted: Accepted,
    setting: &'static str,
) -> Router<S> {
    router.layer(axum::middleware::from_fn_with_state(
        (accepted, setting),
        refuse_remote,
    ))
}

async fn refuse_remote(
    State((accepted, setting)): State<(Accepted, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    if !accepted.is_open() {
        return next.run(req).await;
    }
    // Without a peer address (a router served without connect info) the client is
    // unknown, so it is refused as a remote one would be.
    let local = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().to_canonical().is_loopback());
    if local {
        return next.run(req).await;
    }
    ApiError::Forbidden {
        code: "token_required",
        message: format!(
            "{} {} answers clients on other hosts only when the service has a token; \
             set {setting}",
            req.method(),
            req.uri().path()
        ),
    }
    .into_response()
}

/// Logs a warning when a service whose token is optional starts without one on an
/// address other hosts can reach.
pub fn warn_if_open(service: &str, addr: SocketAddr, token: Option<&str>, setting: &str) {
    if token.is_none_or(str::is_empty) && !addr.ip().to_canonical().is_loopback() {
        tracing::warn!(
            %addr,
            "{service} has no token ({setting}): anyone who reaches it can use its API; \
             its destructive admin routes answer loopback clients only"
        );
    }
}

/// The layers every service's router gets: request ids (`X-Request-ID`, generated when
/// absent, echoed on the answer), a span per request, a body-size limit, and a JSON 404
/// and 405.
pub fn standard_layers(router: Router, body_limit: usize) -> Router {
    router
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::Extension(BodyLimit(body_limit)))
        .layer(axum::middleware::from_fn(carry_request_id))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(record_status)
                .on_failure(record_failure),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::map_request(drop_unusable_request_id))
}

/// Removes a caller's `X-Request-ID` that is too long or not plain text, so the layer
/// inside makes a fresh one: it is echoed and logged.
async fn drop_unusable_request_id(mut req: Request) -> Request {
    let unusable = req
        .headers()
        .get_all("x-request-id")
        .iter()
        .any(|v| esper_protocol::trace_context::acceptable_request_id(v.as_bytes()).is_none());
    if unusable || req.headers().get_all("x-request-id").iter().count() > 1 {
        req.headers_mut().remove("x-request-id");
    }
    req
}

/// Makes the request's id (set by the layer outside) the one the broker calls made while
/// handling it carry.
async fn carry_request_id(req: Request, next: axum::middleware::Next) -> Response {
    match req.headers().get("x-request-id").cloned() {
        Some(id) => esper_protocol::trace_context::with_request_id(id, next.run(req)).await,
        None => next.run(req).await,
    }
}

/// Server errors are logged, except 503: a full or paused queue, a service not ready
/// yet. Those are answers the caller is told to retry, counted by the services' metrics;
/// logged as errors they would flood the log exactly when an operator paused a queue.
fn record_failure(class: ServerErrorsFailureClass, latency: Duration, _span: &tracing::Span) {
    match class {
        ServerErrorsFailureClass::StatusCode(code) if code == StatusCode::SERVICE_UNAVAILABLE => {
            tracing::debug!(
                status = code.as_u16(),
                ?latency,
                "answered 503: retry later"
            );
        }
        class => tracing::error!(%class, ?latency, "request failed"),
    }
}

/// The calls the parts make on a timer or as long polls (claims, the mitigation stream,
/// heartbeats, config and policy refreshes): traced, they would bury the traces of
/// actual work.
const POLLED: [(axum::http::Method, &str); 6] = [
    (axum::http::Method::POST, "/api/queue/claim"),
    (axum::http::Method::GET, "/api/mitigations/stream"),
    (axum::http::Method::POST, "/api/v1/workers/heartbeat"),
    (axum::http::Method::POST, "/api/v1/proxies/heartbeat"),
    (axum::http::Method::GET, "/api/v1/proxies/config"),
    (axum::http::Method::GET, "/api/v1/policies/active"),
];

/// `GET /api/v1/policies/{id}`: a server span's name is the method and the route
/// template, never the raw path, so names stay few whatever the ids.
struct SpanName<'a>(&'a axum::http::Method, Option<&'a str>);

impl std::fmt::Display for SpanName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Some(route) => write!(f, "{} {route}", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

/// The request's span. With traces exported: at `info`, with OpenTelemetry's HTTP server
/// attributes, continuing the caller's trace when it sent a `traceparent`. Otherwise, and
/// for health probes and metric scrapes, the plain `debug` span log lines carry at
/// `LOG_LEVEL=debug`, which costs nothing at `info`.
fn request_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(axum::extract::MatchedPath::as_str);
    if !esper_protocol::trace_context::exporting() || untraced(req, route) {
        return tracing::debug_span!(
            "request",
            method = %req.method(),
            uri = %req.uri(),
            version = ?req.version(),
        );
    }
    let method = req.method();
    let span = tracing::info_span!(
        "request",
        otel.name = %SpanName(method, route),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = route,
        url.path = req.uri().path(),
        request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()),
        http.response.status_code = tracing::field::Empty,
    );
    esper_protocol::trace_context::continue_from(&span, req.headers());
    span
}

/// Probes, scrapes and the parts' background polling would each be a trace of their own,
/// every few seconds, with nothing in them.
fn untraced(req: &Request, route: Option<&str>) -> bool {
    matches!(
        req.uri().path(),
        "/healthz" | "/readyz" | "/healthz/detailed" | "/metrics"
    ) || route.is_some_and(|r| POLLED.iter().any(|(m, p)| req.method() == m && r == *p))
}

fn record_status(res: &Response, latency: Duration, span: &tracing::Span) {
    let status = res.status().as_u16();
    span.record("http.response.status_code", status);
    if res.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    tracing::debug!(
        status,
        latency_ms = latency.as_millis() as u64,
        "finished processing request"
    );
}

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {what} to {addr}: {reason}")]
pub struct BindError {
    pub what: String,
    pub addr: SocketAddr,
    pub reason: String,
}

impl BindError {
    /// Another socket holds the address.
    pub fn in_use(&self) -> bool {
        self.reason == ADDR_IN_USE
    }
}

const ADDR_IN_USE: &str = "address already in use";

/// Binds a listener, with an error that names the listener and the address.
pub async fn bind(what: &str, addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| BindError {
            what: what.to_string(),
            addr,
            reason: match e.kind() {
                std::io::ErrorKind::AddrInUse => ADDR_IN_USE.to_string(),
                std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                _ => e.to_string(),
            },
        })
}

/// How long a client may take to send a request's header, and how long a keep-alive
/// connection may sit idle between requests. Without it a client sending half a header
/// holds its connection for ever (slowloris). Longer than the clients' own pool idle
/// timeout (reqwest's is 90 s), so they drop an idle connection before the server
/// closes it under a request they are sending.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a request's body may take to arrive once its header has.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `router` until shutdown, then drains in-flight requests for at most `drain`.
/// `listener` is a TCP listener or a [`crate::tls::TlsListener`]. Every request carries
/// the client's `ConnectInfo<SocketAddr>`. Clients get [`HEADER_READ_TIMEOUT`] to send
/// each request's header and [`BODY_READ_TIMEOUT`] for its body; a long poll, which
/// reads nothing while it waits, is not affected.
pub async fn serve<L>(
    listener: L,
    router: Router,
    shutdown: Shutdown,
    drain: Duration,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    serve_with(listener, router, shutdown, drain, ReadTimeouts::default()).await
}

/// How long clients may take to send requests; see [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct ReadTimeouts {
    pub header: Duration,
    pub body: Duration,
}

impl Default for ReadTimeouts {
    fn default() -> Self {
        ReadTimeouts {
            header: HEADER_READ_TIMEOUT,
            body: BODY_READ_TIMEOUT,
        }
    }
}

/// [`serve`] with other read timeouts.
pub async fn serve_with<L>(
    mut listener: L,
    router: Router,
    shutdown: Shutdown,
    drain: Duration,
    timeouts: ReadTimeouts,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let router = router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        timeouts.body,
    ));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (io, peer) = tokio::select! {
            conn = listener.accept() => conn,
            _ = shutdown.wait() => break,
        };
        let service =
            router
                .clone()
                .map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    req
                });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    // No new connections; in-flight requests finish, idle connections close.
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "in-flight requests still running after the drain timeout; closing");
        }
    }
    Ok(())
}

/// `axum::extract::Query`, but a bad query string answers with our JSON 400
/// (`invalid_query`, with serde's message naming the parameter).
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| {
                let text = e.body_text();
                let text = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                ApiError::bad_request("invalid_query", text)
            })
    }
}

/// `axum::extract::Path`, but a bad path parameter (say, invalid percent-encoding)
/// answers with our JSON 400 (`invalid_path`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
    }
}

/// A JSON 405 for `Router::method_not_allowed_fallback`, so a wrong method gets the same
/// error body as every other mistake.
pub async fn method_not_allowed() -> Response {
    let body = ApiErrorBody {
        error: "method_not_allowed".into(),
        message: "this endpoint does not accept that HTTP method".into(),
    };
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_compare_exactly() {
        let mut h = HeaderMap::new();
        assert!(!token_matches(&h, "secret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        assert!(token_matches(&h, "secret"));
        assert!(!token_matches(&h, "secret2"));
        assert!(!token_matches(&h, "secreT"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic secret"),
        );
        assert!(!token_matches(&h, "secret"));
    }

    #[test]
    fn a_rotation_accepts_both_tokens_until_the_old_one_is_dropped() {
        let bearer = |t: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(t));
            h
        };
        let accepted = Accepted::new(Some("old"), None);
        assert!(accepted.admits(&bearer("Bearer old")));
        assert!(!accepted.admits(&bearer("Bearer new")));
        assert!(accepted.set(Some("new"), Some("old")));
        assert!(accepted.admits(&bearer("Bearer old")));
        assert!(accepted.admits(&bearer("Bearer new")));
        assert!(!accepted.admits(&HeaderMap::new()));
        assert!(!accepted.set(Some("new"), Some("old")), "no change");
        assert!(accepted.set(Some("new"), Some("")));
        assert!(!accepted.admits(&bearer("Bearer old")));
        assert!(accepted.set(None, None));
        assert!(accepted.is_open() && accepted.admits(&HeaderMap::new()));

        // A reload may set a token on an open service, not take it away.
        let mut done = crate::config::Reloaded::default();
        accepted.reload(Some("new"), None, &mut done);
        assert_eq!(done.applied, ["token", "previous_token"]);
        let mut done = crate::config::Reloaded::default();
        accepted.reload(None, None, &mut done);
        assert!(done.applied.is_empty() && done.kept.len() == 2, "{done:?}");
        assert!(accepted.admits(&bearer("Bearer new")) && !accepted.is_open());
    }

    /// Serves the guarded route on loopback, with or without the peer's address, and
    /// answers the status a loopback client gets.
    async fn loopback_status(with_peer: bool) -> reqwest::StatusCode {
        let router = loopback_unless_token(
            Router::new().route("/clear", axum::routing::post(|| async { "cleared" })),
            Accepted::default(),
            "TOKEN",
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = if with_peer {
            tokio::spawn(async move {
                axum::serve(
                    listener,
                    router.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .await
            })
        } else {
            tokio::spawn(async move { axum::serve(listener, router).await })
        };
        let status = reqwest::Client::new()
            .post(format!("http://{addr}/clear"))
            .send()
            .await
            .expect("request")
            .status();
        server.abort();
        status
    }

    #[tokio::test]
    async fn slow_clients_are_cut_off_and_long_polls_are_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let router = Router::new()
            .route(
                "/poll",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    "answered"
                }),
            )
            .route(
                "/upload",
                axum::routing::post(|body: bytes::Bytes| async move { body.len().to_string() }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (trigger, shutdown) = crate::shutdown::Shutdown::new();
        let timeouts = ReadTimeouts {
            header: Duration::from_millis(300),
            body: Duration::from_millis(300),
        };
        let server = tokio::spawn(serve_with(
            listener,
            router,
            shutdown,
            Duration::from_secs(1),
            timeouts,
        ));
        let started = std::time::Instant::now();

        // Half a header: the connection is closed once the header timeout passes.
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /poll HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a half-sent header held the connection");

        // A body that never arrives: an answer, not a held connection.
        let mut stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stalled
            .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
            .await
            .expect("write");
        let mut answer = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), stalled.read_exact(&mut answer))
            .await
            .expect("an answer to a stalled body")
            .expect("read");
        assert!(
            answer.starts_with(b"HTTP/1.1 4"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        assert!(started.elapsed() < Duration::from_secs(5));

        // A long poll reads nothing while it waits, past both timeouts.
        let body = reqwest::get(format!("http://{addr}/poll"))
            .await
            .expect("poll")
            .text()
            .await
            .expect("text");
        assert_eq!(body, "answered");
        trigger.trigger();
        server.await.expect("join").expect("served");
    }

    #[test]
    fn an_object_is_given_as_an_object() {
        #[derive(serde::Deserialize, Debug, Default)]
        struct Req {
            #[serde(default)]
            a: u32,
        }
        assert!(wants_object::<Req>());
        assert!(!wants_object::<Vec<Req>>());
        assert!(!wants_object::<serde_json::Value>());
        assert_eq!(decode::<Req>(b"{\"a\": 2}").expect("an object").a, 2);
        // serde alone would take `[]` as `Req { a: 0 }`.
        for array in [&b"[]"[..], b" \n[2]"] {
            let refused = decode::<Req>(array).expect_err("an array for an object");
            assert_eq!(refused.to_string(), "expected an object, found an array");
        }
        assert_eq!(decode::<Vec<u32>>(b"[1]").expect("a list").len(), 1);
        // A body that is no JSON at all says so, array or not.
        let broken = decode::<Req>(b"[").expect_err("not JSON");
        assert!(
            matches!(&broken, ApiError::BadRequest { code, .. } if *code == "invalid_json"),
            "{broken:?}"
        );
    }

    #[tokio::test]
    async fn an_open_admin_route_answers_a_known_loopback_peer_only() {
        assert_eq!(loopback_status(true).await, reqwest::StatusCode::OK);
        // A server that does not record peers cannot tell local from remote.
        assert_eq!(loopback_status(false).await, reqwest::StatusCode::FORBIDDEN);
    }
}
