//! HTTP clients of the two brokers, shared by the proxy, the engine, the control plane
//! and the CLI. One `reqwest::Client` (with its connection pool) per client value.

use std::time::Duration;

use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::endpoints::Endpoints;
use crate::entity::EntityKey;
use crate::error::{ApiErrorBody, refusal};
use crate::event::RequestEvent;
use crate::event_json::ingest_body;
use crate::ingestion::{
    AckRequest, AckResponse, ClaimRequest, ClaimResponse, IngestResponse, ItemInfo, ItemList,
    PurgeResponse, QueueStatus,
};
use crate::mitigation::{
    DeltaPage, Mitigation, MitigationList, PublishRequest, PublishResponse, RevokeRequest,
    RevokeResponse,
};
use crate::token::Token;

/// Why a broker call failed.
/// `; retry after 5s`, as the broker's `Retry-After` asked, or nothing.
fn retry_hint(after: &Option<Duration>) -> String {
    // Retry-After counts whole seconds.
    after.map_or(String::new(), |d| format!("; retry after {}s", d.as_secs()))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached, or the connection broke.
    #[error("cannot reach {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The broker is full, paused or without its store; try again after `retry_after`.
    /// Its message says which (a store's own error, such as Redis out of memory).
    #[error(
        "the broker cannot take this now: {message} ({code}){}",
        retry_hint(retry_after)
    )]
    Backpressure {
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The broker answered with an error.
    #[error("{status}: {message} ({code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The answer was not the JSON we expected.
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
}

impl ClientError {
    /// True when the call may succeed later without any change on our side.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } | ClientError::Backpressure { .. } => true,
            ClientError::Api { status, .. } => *status >= 500,
            ClientError::Decode { .. } => false,
        }
    }

    /// Refused for the caller's own setup (its token, its URL), not for what it sent:
    /// an outbox keeps what it could not deliver for when that is fixed, or for another
    /// instance that is set up right.
    pub fn is_setup_refusal(&self) -> bool {
        matches!(
            self,
            ClientError::Api {
                status: 401 | 403 | 404,
                ..
            }
        )
    }
}

/// Whether a call whose request went out but got no answer (its connection closed or
/// was reset first) may be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resend {
    /// Send it again: to the next instance, or once more to the only one (not on the
    /// connection that failed, which is not pooled again). For calls whose repeat
    /// changes nothing the caller relies on: reads, acknowledgements, writes keyed by id
    /// (events are deduplicated on theirs, mitigations and decisions replaced by theirs).
    Unanswered,
    /// Never: the answer reports what the call did (how many a revoke or a purge
    /// removed), and a repeat after a first that was done would report nothing.
    Never,
}

/// A client of one service, the base of every broker client: its instances, an
/// optional bearer token, a pool.
///
/// The URL may list several instances of one service, comma-separated (as the proxy's
/// `ESPER_MITIGATION_URL` does, in a file every service reads). Calls go to one; one
/// that cannot connect (so nothing was sent) goes on to the next at once, and later
/// calls go to the instance after the last that failed. A call sent on a connection that then closed
/// without an answer (the instance died, or closed that idle connection as the call
/// went out), or answered with a 5xx that says the instance cannot serve (its store
/// unreachable, a gateway's 502 or 504), goes on too, when [`Resend`] allows. A call
/// that times out is not sent again, but later calls go to the next instance: one that
/// accepts calls and never answers is left, not waited on by every call.
#[derive(Clone, Debug)]
pub struct ServiceClient {
    pub(crate) endpoints: Endpoints,
    pub(crate) token: Token,
    http: reqwest::Client,
}

impl ServiceClient {
    pub(crate) fn new(url: &str, token: Option<String>, timeout: Duration) -> ServiceClient {
        ServiceClient::with_pool(url, token, timeout, None)
    }

    /// `max_idle`: idle connections kept to the broker (unbounded when `None`).
    pub(crate) fn with_pool(
        url: &str,
        token: Option<String>,
        timeout: Duration,
        max_idle: Option<usize>,
    ) -> ServiceClient {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(n) = max_idle {
            builder = builder.pool_max_idle_per_host(n);
        }
        let http = builder.build().unwrap_or_else(|_| reqwest::Client::new());
        ServiceClient::with_http(http, Endpoints::new(url), Token::new(token))
    }

    /// A client of `endpoints` sending `token` (both shared with the caller, who may
    /// replace them) through `http`, built with the caller's timeouts and trust.
    pub fn with_http(http: reqwest::Client, endpoints: Endpoints, token: Token) -> ServiceClient {
        ServiceClient {
            endpoints,
            token,
            http,
        }
    }

    /// The instances this client calls.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// A request for `path` on the instance in force, with the token and trace context.
    pub fn req(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let base = self.endpoints.load();
        let rb = crate::trace_context::traced(
            self.http
                .request(method, format!("{}{path}", base.current_url())),
        );
        self.token.authorize(rb)
    }

    /// Sends `rb`, built by [`ServiceClient::req`], and decodes the answer.
    pub async fn send<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
        resend: Resend,
    ) -> Result<T, ClientError> {
        let (given, resp) = self.execute(rb, resend).await?;
        decode(&given, resp).await
    }

    /// Sends `rb`, built by [`ServiceClient::req`], and returns the answer as it came,
    /// for the caller to read (one whose statuses [`decode`] does not know).
    pub async fn call(&self, rb: RequestBuilder, resend: Resend) -> Result<Response, ClientError> {
        self.execute(rb, resend).await.map(|(_, resp)| resp)
    }

    /// Sends `rb`, built by [`ServiceClient::req`], and on a failed connection the same
    /// request to each other instance in turn. Also returns the setting it was sent
    /// under, for messages.
    ///
    /// With several instances, one that fails a call is left for the next, for later
    /// calls: a connection that cannot be opened or dies unanswered, a timeout, or an
    /// answer saying the instance cannot serve (see [`cannot_serve`]). The call itself
    /// goes on to the next instance when nothing was sent, or when [`Resend`] allows;
    /// never after a timeout, which the instance may still be working on.
    async fn execute(
        &self,
        rb: RequestBuilder,
        resend: Resend,
    ) -> Result<(String, Response), ClientError> {
        // One snapshot for the whole call: a reload may replace the list meanwhile.
        let list = self.endpoints.load();
        let urls = list.urls();
        let several = urls.len() > 1;
        let transport = |source| ClientError::Transport {
            url: list.given().to_string(),
            source,
        };
        let answered = |resp| Ok((list.given().to_string(), resp));
        let (client, request) = rb.build_split();
        let mut request = request.map_err(transport)?;
        let built_on = |u: &String| moved(request.url(), u, u).as_ref() == Some(request.url());
        // The instance it was built for (another call may have moved on since).
        let first = match urls.iter().position(built_on) {
            Some(at) => at,
            None => {
                // Built for the setting a reload replaced since: sent to this one's.
                let at = list.current();
                if let Some(url) = list
                    .replaced()
                    .iter()
                    .find(|u| built_on(u))
                    .and_then(|old| moved(request.url(), old, &urls[at]))
                {
                    *request.url_mut() = url;
                }
                at
            }
        };
        // Each instance once; the only one twice (not on the failed connection, which
        // is not pooled again).
        let tries = urls.len().max(2);
        let mut last = None;
        let mut refused = None;
        for step in 0..tries {
            let at = (first + step) % urls.len();
            let Some(mut next) = request.try_clone() else {
                break;
            };
            if at != first {
                let Some(url) = moved(request.url(), &urls[first], &urls[at]) else {
                    continue;
                };
                *next.url_mut() = url;
            }
            match client.execute(next).await {
                Ok(resp) if several => match cannot_serve(resp).await {
                    Ok((false, resp)) => return answered(resp),
                    Ok((true, resp)) => {
                        list.leave(at);
                        if resend == Resend::Never {
                            return answered(resp);
                        }
                        refused = Some(resp);
                    }
                    // Its answer broke off or timed out: failing, and maybe still working.
                    Err(e) => {
                        list.leave(at);
                        if resend == Resend::Never || e.is_timeout() {
                            return Err(transport(e));
                        }
                        last = Some(e);
                    }
                },
                Ok(resp) => return answered(resp),
                // Nothing was sent: another instance may take it.
                Err(e) if e.is_connect() && several => {
                    list.leave(at);
                    last = Some(e);
                }
                Err(e) if resend == Resend::Unanswered && unanswered(&e) => {
                    if several {
                        list.leave(at);
                    }
                    last = Some(e);
                }
                Err(e) => {
                    if several && (e.is_timeout() || unanswered(&e)) {
                        list.leave(at);
                    }
                    return Err(transport(e));
                }
            }
        }
        // Every instance failed: an answer says more than a failed connection.
        if let Some(resp) = refused {
            return answered(resp);
        }
        let resp = match last {
            Some(e) => return Err(transport(e)),
            // A body that cannot be cloned (a stream): sent once, as built.
            None => client.execute(request).await.map_err(transport)?,
        };
        answered(resp)
    }

    /// `GET path`, sent again when unanswered.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.req(reqwest::Method::GET, path), Resend::Unanswered)
            .await
    }

    /// `POST path` with `body` as JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        resend: Resend,
    ) -> Result<T, ClientError> {
        self.send(self.req(reqwest::Method::POST, path).json(body), resend)
            .await
    }
}

/// The request went out on a connection that closed or was reset before any answer,
/// and not for a timeout: the instance died, or closed the idle connection as the
/// request was written. Whether it acted on the request is unknown.
fn unanswered(e: &reqwest::Error) -> bool {
    if e.is_timeout() || e.is_connect() || !e.is_request() {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            );
        }
        source = cause.source();
    }
    false
}

/// Whether `resp` says the instance that gave it cannot serve now, where another may:
/// any 5xx, a proxy's in front of it included, except the 503s a healthy instance gives
/// for state all instances share ([`refusal::shared`]), and a 501, which every instance
/// would give alike. A 503's body is read to tell, and the answer handed back whole; the
/// error is that body's, when it could not be read.
async fn cannot_serve(resp: Response) -> Result<(bool, Response), reqwest::Error> {
    let status = resp.status();
    if !status.is_server_error() || status == StatusCode::NOT_IMPLEMENTED {
        return Ok((false, resp));
    }
    if status != StatusCode::SERVICE_UNAVAILABLE {
        return Ok((true, resp));
    }
    let version = resp.version();
    let headers = resp.headers().clone();
    let body = resp.bytes().await?;
    let shared =
        serde_json::from_slice::<ApiErrorBody>(&body).is_ok_and(|b| refusal::shared(&b.error));
    let mut whole = http::Response::new(body);
    *whole.status_mut() = status;
    *whole.version_mut() = version;
    *whole.headers_mut() = headers;
    Ok((!shared, Response::from(whole)))
}

/// `url`, built on base `from`, rebuilt on base `to` (which may have another path).
fn moved(url: &reqwest::Url, from: &str, to: &str) -> Option<reqwest::Url> {
    let from = reqwest::Url::parse(from).ok()?;
    let mut to = reqwest::Url::parse(to).ok()?;
    let rest = url
        .path()
        .strip_prefix(from.path().trim_end_matches('/'))
        .unwrap_or(url.path());
    let path = format!("{}{rest}", to.path().trim_end_matches('/'));
    to.set_path(&path);
    to.set_query(url.query());
    Some(to)
}

/// Turns a response into `T` or the matching [`ClientError`].
pub async fn decode<T: DeserializeOwned>(url: &str, resp: Response) -> Result<T, ClientError> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = resp
        .bytes()
        .await
        .map_err(|source| ClientError::Transport {
            url: url.to_string(),
            source,
        })?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url: url.to_string(),
            message: e.to_string(),
        });
    }
    let body: Option<ApiErrorBody> = serde_json::from_slice(&bytes).ok();
    let (code, message) = match body {
        Some(b) => (b.error, b.message),
        None => (
            status.canonical_reason().unwrap_or("error").to_string(),
            String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        ),
    };
    if (status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS)
        && retry_after.is_some()
    {
        return Err(ClientError::Backpressure {
            code,
            message,
            retry_after,
        });
    }
    Err(ClientError::Api {
        status: status.as_u16(),
        code,
        message,
    })
}

/// Client of the ingestion broker (`BROKER_PORT` 8082 by default).
#[derive(Clone, Debug)]
pub struct IngestionClient {
    base: ServiceClient,
}

impl IngestionClient {
    /// `url` like `http://127.0.0.1:8082`; `token` is the broker's bearer token, if any.
    pub fn new(url: &str, token: Option<String>) -> IngestionClient {
        IngestionClient::with_pool_size(url, token, None)
    }

    /// Like [`new`](Self::new), keeping at most `max_idle` idle connections to the
    /// broker (unbounded when `None`).
    pub fn with_pool_size(
        url: &str,
        token: Option<String>,
        max_idle: Option<usize>,
    ) -> IngestionClient {
        IngestionClient {
            base: ServiceClient::with_pool(url, token, Duration::from_secs(10), max_idle),
        }
    }

    /// The broker's URL in force, as given (a reload may replace it).
    pub fn url(&self) -> String {
        self.base.endpoints.given()
    }

    /// The broker instances this client and its clones call; [`Endpoints::set`]
    /// replaces them for all.
    pub fn endpoints(&self) -> &Endpoints {
        &self.base.endpoints
    }

    /// This client, calling the instances of `endpoints` (shared with its other
    /// holders) instead.
    pub fn with_endpoints(mut self, endpoints: Endpoints) -> Self {
        self.base.endpoints = endpoints;
        self
    }

    /// The token this client and its clones send; [`Token::set`] replaces it for all.
    pub fn token(&self) -> &Token {
        &self.base.token
    }

    /// This client, sending `token` (shared with its other holders) instead.
    pub fn with_token(mut self, token: Token) -> Self {
        self.base.token = token;
        self
    }

    /// Enqueues a batch; `Backpressure` when the queue is full or paused.
    pub async fn ingest(&self, events: Vec<RequestEvent>) -> Result<IngestResponse, ClientError> {
        self.ingest_slice(&events).await
    }

    /// Like [`IngestionClient::ingest`], from a borrowed batch, so a caller can retry the
    /// same batch without cloning it first. The body is [`ingest_body`]'s: the JSON of an
    /// [`IngestRequest`](crate::ingestion::IngestRequest), written directly.
    pub async fn ingest_slice(
        &self,
        events: &[RequestEvent],
    ) -> Result<IngestResponse, ClientError> {
        self.ingest_body(ingest_body(events)).await
    }

    /// Sends a batch already written as the JSON of an
    /// [`IngestRequest`](crate::ingestion::IngestRequest) (see
    /// [`EventView::write_json`](crate::EventView::write_json) and
    /// [`INGEST_BODY_START`](crate::INGEST_BODY_START)); a retry passes a clone of the
    /// same bytes, which copies nothing.
    pub async fn ingest_body(
        &self,
        body: impl Into<reqwest::Body>,
    ) -> Result<IngestResponse, ClientError> {
        let rb = self
            .base
            .req(reqwest::Method::POST, "/api/events")
            .header(
                reqwest::header::CONTENT_TYPE,
                reqwest::header::HeaderValue::from_static("application/json"),
            )
            .body(body);
        // Workers drop an event they have seen (by its id).
        self.base.send(rb, Resend::Unanswered).await
    }

    /// Leases up to `max` items for `lease`; waits up to `wait` when the queue is empty.
    pub async fn claim(
        &self,
        consumer: &str,
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<ClaimResponse, ClientError> {
        let body = ClaimRequest {
            consumer: consumer.to_string(),
            max,
            lease_ms: lease.as_millis() as u64,
            wait_ms: wait.as_millis() as u64,
        };
        // The long-poll must not be cut short by the client's own timeout.
        let rb = self
            .base
            .req(reqwest::Method::POST, "/api/queue/claim")
            .timeout(wait + Duration::from_secs(10))
            .json(&body);
        // A claim answered but lost leaves its items leased until the lease ends; they
        // come back then, as a crashed worker's do.
        self.base.send(rb, Resend::Unanswered).await
    }

    pub async fn ack(
        &self,
        consumer: &str,
        item_ids: Vec<String>,
    ) -> Result<AckResponse, ClientError> {
        let body = AckRequest {
            consumer: consumer.to_string(),
            item_ids,
        };
        self.base
            .post("/api/queue/ack", &body, Resend::Unanswered)
            .await
    }

    pub async fn status(&self) -> Result<QueueStatus, ClientError> {
        self.base.get("/api/queue/status").await
    }

    pub async fn pause(&self) -> Result<QueueStatus, ClientError> {
        self.base
            .post(
                "/api/queue/pause",
                &serde_json::json!({}),
                Resend::Unanswered,
            )
            .await
    }

    pub async fn resume(&self) -> Result<QueueStatus, ClientError> {
        self.base
            .post(
                "/api/queue/resume",
                &serde_json::json!({}),
                Resend::Unanswered,
            )
            .await
    }

    pub async fn items(&self, limit: usize) -> Result<ItemList, ClientError> {
        self.base
            .get(&format!("/api/queue/items?limit={limit}"))
            .await
    }

    pub async fn item(&self, item_id: &str) -> Result<ItemInfo, ClientError> {
        self.base
            .get(&format!("/api/queue/items/{}", encode(item_id)))
            .await
    }

    /// Drops every waiting (not leased) item: housekeeping after an incident.
    pub async fn purge(&self) -> Result<PurgeResponse, ClientError> {
        self.base
            .post("/api/queue/purge", &serde_json::json!({}), Resend::Never)
            .await
    }

    /// `true` when `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        probe(&self.base, "/readyz").await
    }
}

/// Client of the mitigation broker (8083 by default).
#[derive(Clone, Debug)]
pub struct MitigationClient {
    base: ServiceClient,
}

impl MitigationClient {
    pub fn new(url: &str, token: Option<String>) -> MitigationClient {
        MitigationClient::with_pool_size(url, token, None)
    }

    /// Like [`new`](Self::new), keeping at most `max_idle` idle connections to the
    /// broker (unbounded when `None`).
    pub fn with_pool_size(
        url: &str,
        token: Option<String>,
        max_idle: Option<usize>,
    ) -> MitigationClient {
        MitigationClient {
            base: ServiceClient::with_pool(url, token, Duration::from_secs(10), max_idle),
        }
    }

    /// The broker's URL in force, as given (a reload may replace it).
    pub fn url(&self) -> String {
        self.base.endpoints.given()
    }

    /// The broker instances this client and its clones call; [`Endpoints::set`]
    /// replaces them for all.
    pub fn endpoints(&self) -> &Endpoints {
        &self.base.endpoints
    }

    /// This client, calling the instances of `endpoints` (shared with its other
    /// holders) instead.
    pub fn with_endpoints(mut self, endpoints: Endpoints) -> Self {
        self.base.endpoints = endpoints;
        self
    }

    /// The token this client and its clones send; [`Token::set`] replaces it for all.
    pub fn token(&self) -> &Token {
        &self.base.token
    }

    /// This client, sending `token` (shared with its other holders) instead.
    pub fn with_token(mut self, token: Token) -> Self {
        self.base.token = token;
        self
    }

    pub async fn publish(
        &self,
        mitigations: Vec<Mitigation>,
    ) -> Result<PublishResponse, ClientError> {
        self.base
            .post(
                "/api/mitigations",
                &PublishRequest { mitigations },
                Resend::Unanswered,
            )
            .await
    }

    pub async fn active(&self, limit: Option<usize>) -> Result<MitigationList, ClientError> {
        let path = match limit {
            Some(l) => format!("/api/mitigations/active?limit={l}"),
            None => "/api/mitigations/active".to_string(),
        };
        self.base.get(&path).await
    }

    pub async fn entity(&self, entity: &EntityKey) -> Result<MitigationList, ClientError> {
        self.base
            .get(&format!(
                "/api/mitigations/entity/{}",
                encode(&entity.to_string())
            ))
            .await
    }

    pub async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeResponse, ClientError> {
        self.base
            .post("/api/mitigations/revoke", req, Resend::Never)
            .await
    }

    pub async fn clear(&self) -> Result<RevokeResponse, ClientError> {
        self.base
            .post("/api/cache/clear", &serde_json::json!({}), Resend::Never)
            .await
    }

    /// Long-polls the delta stream: changes after `cursor` (all active ones, as a
    /// snapshot, when `cursor` is `None` or too old), waiting up to `wait` for one.
    /// A snapshot page with `more` continues with [`snapshot_next`](Self::snapshot_next).
    pub async fn stream(
        &self,
        cursor: Option<&str>,
        wait: Duration,
    ) -> Result<DeltaPage, ClientError> {
        let mut path = format!("/api/mitigations/stream?wait_ms={}", wait.as_millis());
        if let Some(c) = cursor {
            path.push_str("&cursor=");
            path.push_str(&encode(c));
        }
        let rb = self
            .base
            .req(reqwest::Method::GET, &path)
            .timeout(wait + Duration::from_secs(10));
        self.base.send(rb, Resend::Unanswered).await
    }

    /// The next page of the snapshot whose pages carry `cursor`: `more` is the previous
    /// page's [`DeltaPage::more`]. An answer with another cursor starts a new snapshot.
    pub async fn snapshot_next(&self, cursor: &str, more: &str) -> Result<DeltaPage, ClientError> {
        let path = format!(
            "/api/mitigations/stream?cursor={}&snapshot_after={}",
            encode(cursor),
            encode(more)
        );
        self.base.get(&path).await
    }

    pub async fn ready(&self) -> bool {
        probe(&self.base, "/readyz").await
    }
}

async fn probe(base: &ServiceClient, path: &str) -> bool {
    match base
        .execute(
            base.req(reqwest::Method::GET, path)
                .timeout(Duration::from_secs(2)),
            Resend::Unanswered,
        )
        .await
    {
        Ok((_, r)) => r.status().is_success(),
        Err(_) => false,
    }
}

/// Adds the CA certificates of PEM file `ca` to the roots `builder` trusts (a service
/// whose certificate comes from a private CA); the error names the file.
pub fn trust_ca(
    builder: reqwest::ClientBuilder,
    ca: &std::path::Path,
) -> Result<reqwest::ClientBuilder, String> {
    let bad = |e: &dyn std::fmt::Display| format!("`{}`: {e}", ca.display());
    let pem = std::fs::read(ca).map_err(|e| bad(&e))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"holds no PEM certificate"));
    }
    Ok(certs
        .into_iter()
        .fold(builder, |b, c| b.add_root_certificate(c)))
}

/// Percent-encodes a path segment (entity keys contain `:`, `/` and `=`).
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_entity_keys_as_one_segment() {
        assert_eq!(super::encode("cidr:10.0.0.0/24"), "cidr%3A10.0.0.0%2F24");
        assert_eq!(super::encode("ip:2001:db8::1"), "ip%3A2001%3Adb8%3A%3A1");
    }
}
