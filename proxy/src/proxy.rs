//! The one `ProxyHttp` implementation: each phase delegates to a small filter
//! (request id, enforcement, reporting) and reads only in-memory state.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use esper_protocol::EnforcedAction;
use http::{HeaderName, HeaderValue, header};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, OrErr, Result};

use crate::apps::App;
use crate::cache::MitigationId;
use crate::cache::RequestKeys;
use crate::challenge::{self, CHALLENGE_PATH, COOKIE_NAME, Challenger, Clearance};
use crate::clientip;
use crate::config::{AccessLog, RealIpHeader};
use crate::enforce::{Enforcer, Verdict};
use crate::live::{Forward, LiveState};
use crate::metrics::Metrics;
use crate::report::{Observed, Reporter};
use crate::respond::{
    LocalAnswer, Templates, Var, acceptable_request_id, new_id_header, prefers_json, reference_vars,
};
use crate::tls::TlsFacts;

/// Upstreams one request tries at most: the first and three more when connecting fails
/// (HAProxy's `retries 3`), so a name with many addresses, all unreachable, cannot hold
/// a request for a connect timeout per address.
const MAX_UPSTREAM_TRIES: usize = 4;
const X_REQUEST_ID: &str = "x-request-id";
/// The same names for lookups: a `&str` is parsed into a name on every lookup.
static X_REQUEST_ID_NAME: HeaderName = HeaderName::from_static(X_REQUEST_ID);
static X_FORWARDED_FOR_NAME: HeaderName = HeaderName::from_static(X_FORWARDED_FOR);
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_REAL_IP_NAME: HeaderName = HeaderName::from_static(X_REAL_IP);
static X_FORWARDED_PROTO_NAME: HeaderName = HeaderName::from_static(X_FORWARDED_PROTO);
const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_REAL_IP: &str = "x-real-ip";
const HTTPS: &str = "https";
const HTTP: &str = "http";
/// Largest challenge form accepted.
const MAX_CHALLENGE_BODY: usize = 4096;

/// Counts requests between their start and the end of their logging phase, so shutdown
/// can wait for exactly those.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Requests in flight now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }
}

/// Held by a request's context; dropping it ends the request.
pub struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    timestamp: DateTime<Utc>,
    client_ip: Option<IpAddr>,
    /// The connection's peer is a trusted proxy (its forwarding headers are kept).
    peer_trusted: bool,
    /// ... and names the client in `Forwarded`, which is therefore passed on; otherwise
    /// a `Forwarded` header is the client's own and is removed.
    keep_forwarded: bool,
    /// ... and names the client in `X-Forwarded-For`, whose chain is therefore kept;
    /// otherwise that header is the client's own and is replaced or removed.
    keep_xff: bool,
    /// The scheme the client used, as a trusted proxy in front told it (`None`: this
    /// hop's own scheme is the client's).
    told_scheme: Option<&'static str>,
    /// The client's usable `X-Request-ID` or a fresh id (empty until the request filter
    /// ran). A header value, so the upstream request, the response and local answers
    /// share its one buffer.
    request_id: HeaderValue,
    /// The client sent a usable `X-Request-ID`, which is passed on unchanged.
    client_request_id: bool,
    /// The headers to add, as configured when the request began.
    forward: Forward,
    action: EnforcedAction,
    /// The mitigation that answered the request (block, throttle, challenge).
    reference: Option<MitigationId>,
    /// Which requests get an access-log line, as configured when the request began.
    access_log: AccessLog,
    /// The app the request is for (none: no app serves its host).
    app: Option<Arc<App>>,
    /// Upstream connection attempts so far.
    tries: usize,
    /// The upstream whose connection failed last, avoided on the retry.
    failed: Option<SocketAddr>,
    /// The request named no host (HTTP/1.0 without `Host`): the upstream request,
    /// which Pingora sends as HTTP/1.1, gets the app's own.
    hostless: bool,
    _in_flight: InFlightGuard,
}

impl RequestCtx {
    /// The request id as text (both sources are checked ASCII, so this never falls back).
    fn request_id_text(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }
}

/// The proxy application Pingora runs.
pub struct EsperProxy {
    live: LiveState,
    challenger: Arc<Challenger>,
    enforcer: Enforcer,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    in_flight: InFlight,
}

impl EsperProxy {
    /// Assembles the filters.
    pub fn new(
        live: LiveState,
        challenger: Arc<Challenger>,
        enforcer: Enforcer,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        in_flight: InFlight,
    ) -> EsperProxy {
        EsperProxy {
            live,
            challenger,
            enforcer,
            reporter,
            metrics,
            in_flight,
        }
    }

    /// Writes a local answer (403, 429, 421...) in the format the client prefers;
    /// `reference` is the mitigation behind it, printed for the operator's lookup.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        templates: &Templates,
        answer: LocalAnswer,
        reference: Option<&str>,
    ) -> Result<()> {
        let json = wants_json(session);
        let mut html = String::new();
        let vars = reference.map(|id| reference_vars(id, &mut html));
        let (content_type, body) = templates.render(
            &answer,
            ctx.request_id_text(),
            json,
            vars.as_ref().map_or(&[][..], |v| &v[..]),
        );
        self.write_answer(session, ctx, &answer, content_type, body, None)
            .await
    }

    async fn write_answer(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        answer: &LocalAnswer,
        content_type: &str,
        body: Bytes,
        cookie: Option<String>,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(answer.status, Some(7))?;
        resp.insert_header(header::CONTENT_TYPE, content_type)?;
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        resp.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
        if let Some(secs) = answer.retry_after {
            resp.insert_header(header::RETRY_AFTER, secs.to_string())?;
        }
        if let Some(cookie) = cookie {
            resp.insert_header(header::SET_COOKIE, cookie)?;
        }
        // A HEAD is answered the header alone, its length the GET's. Pingora leaves the
        // body out over HTTP/1.1 itself, but over HTTP/2 a body on a HEAD's answer
        // breaks the stream.
        if session.req_header().method == http::Method::HEAD {
            return session.write_response_header(Box::new(resp), true).await;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    /// The challenge interstitial (HTML) or its JSON form, with a fresh puzzle.
    #[allow(clippy::too_many_arguments)]
    async fn challenge(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        templates: &Templates,
        ip: IpAddr,
        difficulty: u8,
        answer: LocalAnswer,
        return_to: &str,
        reference: Option<&str>,
    ) -> Result<()> {
        let ua = user_agent(session);
        let puzzle = self.challenger.issue(ip, &ua, difficulty, unix_now());
        let json = wants_json(session);
        let difficulty = puzzle.difficulty.to_string();
        let delay = puzzle.fallback_wait.as_secs();
        let return_to = challenge::safe_return(return_to);
        let fallback_url = format!(
            "{CHALLENGE_PATH}?fallback={}&return={}",
            challenge::percent_encode(&puzzle.fallback),
            challenge::percent_encode(return_to)
        );
        let head = format!(
            "\n<noscript><meta http-equiv=\"refresh\" content=\"{delay};url={}\"></noscript>",
            escape_attr(&fallback_url)
        );
        let markup = challenge_markup(&puzzle.token, &difficulty, return_to, &fallback_url, delay);
        let mut reference_html = String::new();
        let reference = reference.map(|id| reference_vars(id, &mut reference_html));
        let mut vars = vec![
            ("token", Var::Text(&puzzle.token)),
            ("difficulty", Var::Text(&difficulty)),
            ("submit", Var::Text(CHALLENGE_PATH)),
            ("challenge_head", Var::Raw(&head)),
            ("challenge", Var::Raw(&markup)),
        ];
        vars.extend(reference.into_iter().flatten());
        let (content_type, body) = templates.render(&answer, ctx.request_id_text(), json, &vars);
        self.write_answer(session, ctx, &answer, content_type, body, None)
            .await
    }

    /// `/.esper/challenge`: a posted solution, or a fallback link after its wait. Success
    /// sets the clearance cookie and sends the client back where it was going.
    async fn challenge_endpoint(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        templates: &Templates,
        ip: IpAddr,
    ) -> Result<()> {
        let ua = user_agent(session);
        let now = unix_now();
        let mut token = String::new();
        let mut nonce = String::new();
        let mut fallback = String::new();
        let mut return_to = String::from("/");
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        let mut fields: Vec<(String, String)> = challenge::form_pairs(&query).collect();
        if session.req_header().method == http::Method::POST {
            match read_body(session, MAX_CHALLENGE_BODY).await? {
                Some(body) => fields.extend(challenge::form_pairs(&String::from_utf8_lossy(&body))),
                // No browser posts that much: refused like any bad solution, with a new
                // puzzle, rather than failing the request.
                None => {
                    tracing::debug!(client = %ip, "challenge form too large");
                    fields.clear();
                }
            }
        }
        for (k, v) in fields {
            match k.as_str() {
                "token" => token = v,
                "nonce" => nonce = v,
                "fallback" => fallback = v,
                "return" => return_to = v,
                _ => {}
            }
        }
        let return_to = challenge::safe_return(&return_to).to_string();
        let result = if !fallback.is_empty() {
            self.challenger.redeem_fallback(&fallback, ip, &ua, now)
        } else {
            self.challenger
                .redeem_solution(&token, &nonce, ip, &ua, now)
        };
        match result {
            Ok(clearance) => {
                let cookie = set_cookie(&clearance, client_https(session, ctx.told_scheme));
                if wants_json(session) {
                    let body = serde_json::json!({
                        "cleared": true,
                        "cookie": COOKIE_NAME,
                        "expires_in": clearance.max_age.as_secs(),
                        "request_id": ctx.request_id_text(),
                    });
                    let answer = LocalAnswer {
                        status: 200,
                        ..LocalAnswer::challenge()
                    };
                    let body = Bytes::from(body.to_string());
                    self.write_answer(
                        session,
                        ctx,
                        &answer,
                        "application/json",
                        body,
                        Some(cookie),
                    )
                    .await
                } else {
                    let mut resp = ResponseHeader::build(303, Some(5))?;
                    resp.insert_header(header::LOCATION, return_to.as_str())?;
                    resp.insert_header(header::SET_COOKIE, cookie)?;
                    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
                    resp.insert_header(header::CONTENT_LENGTH, "0")?;
                    resp.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
                    session.write_response_header(Box::new(resp), true).await?;
                    Ok(())
                }
            }
            Err(refusal) => {
                tracing::debug!(client = %ip, %refusal, "challenge refused");
                // The client is answered a puzzle again: challenged, as its metrics,
                // event and access-log line say.
                ctx.action = EnforcedAction::Challenge;
                // A new puzzle, as hard as the refused one when its signature shows what
                // that was: a difficulty the client wrote itself is never taken.
                let refused = if fallback.is_empty() {
                    &token
                } else {
                    &fallback
                };
                let difficulty = self
                    .challenger
                    .token_difficulty(refused, ip, &ua)
                    .unwrap_or(challenge::DEFAULT_DIFFICULTY);
                self.challenge(
                    session,
                    ctx,
                    templates,
                    ip,
                    difficulty,
                    LocalAnswer::challenge_failed(),
                    &return_to,
                    None,
                )
                .await
            }
        }
    }

    /// The difficulty up to which the client's clearance cookie clears challenges, if it
    /// holds a valid one.
    fn clearance(&self, session: &Session, ip: IpAddr) -> Option<u8> {
        let headers = &session.req_header().headers;
        let cookie = challenge::find_cookie(headers)?;
        let ua = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        self.challenger.clearance(cookie, ip, ua, unix_now())
    }
}

/// The Host header, or the URI's authority (HTTP/2), port included either way, "" when
/// neither.
fn request_host(req: &pingora::http::RequestHeader) -> &str {
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
}

/// Holds a tarpitted request for `delay`. A client that leaves meanwhile ends it: the app
/// is not sent a request its client gave up on (a bot's many abandoned requests would
/// each still reach it). Only a request without a body is watched, since watching reads
/// the connection, and a body's bytes are the app's.
async fn hold(session: &mut Session, delay: std::time::Duration) -> Result<()> {
    let until = tokio::time::Instant::now() + delay;
    if session.is_body_empty() {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return Ok(()),
            // A client leaving is the client's doing: kept out of the error log.
            gone = session.read_body_or_idle(true) => gone.map(|_| ()).map_err(|mut e| {
                e.as_down();
                e
            })?,
        }
    }
    tokio::time::sleep_until(until).await;
    Ok(())
}

/// An answer without a length goes to an HTTP/1.0 client as its body followed by the
/// connection's close (RFC 9112 §6.1, §6.3): such a client reads no chunked coding,
/// which Pingora gives every answer without a length so as to keep HTTP/1.1
/// connections open.
fn for_http10(session: &mut Session, response: &mut ResponseHeader) {
    let chunked = response
        .headers
        .get(header::TRANSFER_ENCODING)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"chunked"));
    if chunked && !response.headers.contains_key(header::CONTENT_LENGTH) {
        response.remove_header(&header::TRANSFER_ENCODING);
        session.set_keepalive(None);
    }
}

/// HTTP/2 clients may send their cookies as several `cookie` fields; an HTTP/1.1
/// upstream takes one `Cookie` header, the fields joined by "; " (RFC 9113 §8.2.3).
/// Left as several headers, servers that join repeated headers with "," read one
/// cookie whose value holds all the others.
fn join_cookies(request: &mut RequestHeader) -> Result<()> {
    let mut fields = request.headers.get_all(header::COOKIE).iter();
    if fields.next().is_none() || fields.next().is_none() {
        return Ok(());
    }
    let mut joined = Vec::new();
    for field in request.headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(field.as_bytes());
    }
    let joined = HeaderValue::from_bytes(&joined).or_err(
        pingora::ErrorType::InvalidHTTPHeader,
        "joining the request's cookie fields",
    )?;
    request.insert_header(header::COOKIE, joined)
}

/// Why a request that Pingora parsed is still no request to forward (RFC 9112 §3.2,
/// §3.2.1), as nginx refuses it: an HTTP/1.1 request needs a Host, a Host must be a
/// host and port, and a target must be a path (or `*` for `OPTIONS`).
fn malformed(req: &pingora::http::RequestHeader, host: &str) -> Option<&'static str> {
    if host.is_empty() {
        // HTTP/1.0 clients may send none; the default app takes them.
        if req.version >= http::Version::HTTP_11 && req.headers.get(header::HOST).is_none() {
            return Some("The request has no Host header.");
        }
    } else if !host.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b':'
                    | b'['
                    | b']'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
    }) {
        return Some("The request's Host header is not a host name.");
    }
    // Pingora keeps a target that is not a path as it came (for the wire), and roots
    // `uri` at `/`: the raw target says which it was.
    let target = req.raw_path();
    let absolute = |scheme: &[u8]| {
        target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme)
    };
    let fits = match target.first() {
        Some(b'/') => true,
        Some(b'*') => target == b"*" && req.method == http::Method::OPTIONS,
        _ => absolute(b"http://") || absolute(b"https://"),
    };
    if !fits {
        return Some("The request's target is not a path.");
    }
    None
}

/// The error is the downstream connection ending under the request.
/// The status of the answer to a request that could not be proxied, as Pingora's own
/// `fail_to_proxy` chooses it, except that an upstream timing out is a 504; 0 when the
/// client is gone and no answer can be sent.
fn failure_status(e: &Error) -> u16 {
    use pingora::ErrorSource;
    match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        etype => match e.esource() {
            ErrorSource::Upstream => match etype {
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    504
                }
                _ => 502,
            },
            ErrorSource::Downstream => match etype {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// A failure on the client's side of the proxy: the client left, or sent what is not
/// HTTP.
fn clients_doing(error: &Error) -> bool {
    matches!(error.esource(), pingora::ErrorSource::Downstream)
}

/// What this hop knows of the connection, for the forwarding headers.
#[derive(Clone, Copy)]
struct Hop {
    peer: Option<IpAddr>,
    /// The client's scheme (when `X-Forwarded-Proto` is added).
    scheme: &'static str,
}

/// Adds the configured forwarding headers to an upstream request, and removes a client's
/// own copies of them.
fn add_forwarding(request: &mut impl Headers, ctx: &RequestCtx, hop: Hop) -> Result<()> {
    let forward = ctx.forward;
    if !ctx.client_request_id {
        if forward.request_id && !ctx.request_id.is_empty() {
            request.set(&X_REQUEST_ID_NAME, ctx.request_id.clone())?;
        } else {
            // Not one this proxy would pass on (too long, or odd characters).
            request.drop_header(&X_REQUEST_ID_NAME);
        }
    }
    let (Some(ip), Some(peer)) = (ctx.client_ip, hop.peer) else {
        return Ok(());
    };
    let trusted = ctx.peer_trusted;
    // Formatted once when the client is the peer (always, unless a trusted proxy
    // named another client) and both headers carry it.
    let client = forward.real_ip.then(|| ip_header(ip));
    let peer_value = || match &client {
        Some(v) if ip == peer => v.clone(),
        _ => ip_header(peer),
    };
    if forward.forwarded_for {
        // From a trusted proxy that names the client in this header, the chain so far
        // is kept and the peer appended (as nginx's `$proxy_add_x_forwarded_for`);
        // otherwise whatever the client wrote is dropped and only what this proxy
        // knows remains: the client a trusted `Forwarded` named, then the peer.
        let earlier = ctx
            .keep_xff
            .then(|| one_list(request.map().get_all(&X_FORWARDED_FOR_NAME)))
            .flatten();
        let forwarded = match earlier {
            Some(earlier) => {
                HeaderValue::try_from(format!("{earlier}, {peer}")).unwrap_or_else(|_| peer_value())
            }
            None if ip != peer => {
                HeaderValue::try_from(format!("{ip}, {peer}")).unwrap_or_else(|_| peer_value())
            }
            None => peer_value(),
        };
        request.set(&X_FORWARDED_FOR_NAME, forwarded)?;
    } else {
        drop_untrusted(request, &X_FORWARDED_FOR_NAME, ctx.keep_xff);
    }
    if let Some(client) = client {
        request.set(&X_REAL_IP_NAME, client)?;
    } else {
        drop_untrusted(request, &X_REAL_IP_NAME, trusted);
    }
    drop_untrusted(request, &FORWARDED, ctx.keep_forwarded);
    if forward.proto {
        let kept = ctx.keep_xff
            && request
                .map()
                .get(&X_FORWARDED_PROTO_NAME)
                .is_some_and(|v| v.as_bytes() == hop.scheme.as_bytes());
        if !kept {
            request.set(
                &X_FORWARDED_PROTO_NAME,
                HeaderValue::from_static(hop.scheme),
            )?;
        }
    } else {
        // Only a proxy that names the client in `X-Forwarded-For` speaks for it here;
        // one speaking `Forwarded` passes this header on as the client wrote it.
        drop_untrusted(request, &X_FORWARDED_PROTO_NAME, ctx.keep_xff);
    }
    Ok(())
}

/// Every line of a list header as one list (RFC 9110, 5.3), if all of them are text.
fn one_list(lines: http::header::GetAll<'_, HeaderValue>) -> Option<Cow<'_, str>> {
    let mut lines = lines.iter();
    let mut list = Cow::Borrowed(lines.next()?.to_str().ok()?);
    for line in lines {
        let list = list.to_mut();
        list.push_str(", ");
        list.push_str(line.to_str().ok()?);
    }
    Some(list)
}

/// Removes a forwarding header a client wrote, unless its peer is a trusted proxy.
fn drop_untrusted(request: &mut impl Headers, name: &HeaderName, trusted: bool) {
    if !trusted {
        request.drop_header(name);
    }
}

/// The headers of a request or an answer, edited either through Pingora, which keeps
/// how each name was written in a second map (`preserve_header_case`), or as the header
/// map alone, which the request or answer is then rebuilt around.
trait Headers {
    fn map(&self) -> &http::HeaderMap;
    /// Replaces every value of `name` with `value`.
    fn set(&mut self, name: &'static HeaderName, value: HeaderValue) -> Result<()>;
    fn drop_header(&mut self, name: &HeaderName);
}

impl Headers for RequestHeader {
    fn map(&self) -> &http::HeaderMap {
        &self.headers
    }

    fn set(&mut self, name: &'static HeaderName, value: HeaderValue) -> Result<()> {
        // As a `&'static str`, the name goes into the case map without a copy.
        self.insert_header(name.as_str(), value)
    }

    fn drop_header(&mut self, name: &HeaderName) {
        // Looked up first: removing an absent header still probes both maps.
        if self.headers.contains_key(name) {
            self.remove_header(name);
        }
    }
}

impl Headers for http::HeaderMap {
    fn map(&self) -> &http::HeaderMap {
        self
    }

    fn set(&mut self, name: &'static HeaderName, value: HeaderValue) -> Result<()> {
        self.try_insert(name.clone(), value)
            .map(drop)
            .or_err(ErrorType::InvalidHTTPHeader, "too many headers")
    }

    fn drop_header(&mut self, name: &HeaderName) {
        self.remove(name);
    }
}

/// The request's target is written from its URI (origin form, as nearly every request
/// to a reverse proxy is), so a request rebuilt from its parts writes the same target.
/// An absolute-form or non-UTF-8 target is kept as received only by Pingora's own
/// request, which is then edited as it is.
fn origin_form(request: &RequestHeader) -> bool {
    request
        .uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str().as_bytes() == request.raw_path())
}

/// Takes `request`'s method, target, version and headers, leaving a placeholder to be
/// replaced; Pingora's record of how each header name was written is dropped.
fn take_request(request: &mut RequestHeader) -> http::request::Parts {
    let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
    std::mem::replace(request, placeholder).into()
}

/// An address as a header value, formatted on the stack.
fn ip_header(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_bytes(esper_protocol::format_ip(&ip).as_bytes())
        .unwrap_or(HeaderValue::from_static(""))
}

fn wants_json(session: &Session) -> bool {
    prefers_json(
        session
            .req_header()
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    )
}

fn user_agent(session: &Session) -> String {
    session
        .req_header()
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Whether the client speaks HTTPS: to this proxy, or to a trusted proxy in front that
/// says so.
fn client_https(session: &Session, told: Option<&str>) -> bool {
    told.map_or_else(|| is_tls(session), |scheme| scheme == HTTPS)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn set_cookie(c: &Clearance, secure: bool) -> String {
    format!(
        "{COOKIE_NAME}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
        c.value,
        c.max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

fn escape_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The puzzle form and the script that solves it with WebCrypto and submits it. Without
/// JavaScript, the page's meta refresh follows the fallback link after its wait; with
/// JavaScript but no WebCrypto (plain HTTP off localhost), the script does the same.
fn challenge_markup(
    token: &str,
    difficulty: &str,
    return_to: &str,
    fallback_url: &str,
    delay_secs: u64,
) -> String {
    format!(
        r#"<form id="esper-challenge" method="POST" action="{CHALLENGE_PATH}">
<input type="hidden" name="token" value="{token}">
<input type="hidden" name="nonce" value="">
<input type="hidden" name="return" value="{ret}">
</form>
<noscript><p>JavaScript is off: this page continues by itself in {delay_secs} seconds.</p></noscript>
<script>
(async function () {{
  var form = document.getElementById("esper-challenge");
  var token = form.elements.token.value, bits = {difficulty};
  if (!(window.crypto && window.crypto.subtle && window.TextEncoder)) {{
    setTimeout(function () {{ location.replace("{fallback_js}"); }}, {delay_ms});
    return;
  }}
  var enc = new TextEncoder();
  function zeroBits(buf) {{
    var bytes = new Uint8Array(buf), n = 0;
    for (var i = 0; i < bytes.length; i++) {{
      if (bytes[i] === 0) {{ n += 8; continue; }}
      return n + Math.clz32(bytes[i]) - 24;
    }}
    return n;
  }}
  for (var nonce = 0; ; nonce++) {{
    var digest = await crypto.subtle.digest("SHA-256", enc.encode(token + ":" + nonce));
    if (zeroBits(digest) >= bits) {{
      form.elements.nonce.value = String(nonce);
      form.submit();
      return;
    }}
  }}
}})();
</script>"#,
        token = escape_attr(token),
        ret = escape_attr(return_to),
        fallback_js = fallback_url.replace('\\', "").replace('"', "%22"),
        delay_ms = delay_secs * 1000,
    )
}

/// Reads a request body of at most `limit` bytes: `None` when there is more.
async fn read_body(session: &mut Session, limit: usize) -> Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The connection's peer: the TCP peer, or the client a PROXY header named.
fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
}

#[async_trait]
impl ProxyHttp for EsperProxy {
    type CTX = RequestCtx;

    /// No downstream modules. Pingora's default adds a response compression module,
    /// switched off, that still runs on every request (about 700 instructions); this
    /// proxy passes responses through as the app wrote them.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            timestamp: Utc::now(),
            client_ip: None,
            peer_trusted: false,
            keep_forwarded: false,
            keep_xff: false,
            told_scheme: None,
            request_id: HeaderValue::from_static(""),
            client_request_id: false,
            forward: Forward::default(),
            action: EnforcedAction::Allow,
            reference: None,
            access_log: AccessLog::Off,
            app: None,
            tries: 0,
            failed: None,
            hostless: false,
            _in_flight: self.in_flight.enter(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Requests a client pipelines are answered in turn (RFC 9112 §9.3.2), as nginx
        // answers them, rather than the second dropped with the connection. Carried to
        // the connection's next requests once set.
        if !session.pipelining_enabled() {
            session.set_pipelining_enabled(true);
        }
        let given = session
            .req_header()
            .headers
            .get(&X_REQUEST_ID_NAME)
            .filter(|v| acceptable_request_id(v.as_bytes()).is_some());
        match given {
            Some(id) => {
                ctx.request_id = id.clone();
                ctx.client_request_id = true;
            }
            None => ctx.request_id = new_id_header(),
        }
        let live = self.live.load_full();
        ctx.forward = live.forward;
        ctx.access_log = live.access_log;
        let Some(peer) = peer_ip(session) else {
            return Ok(false);
        };
        let req = session.req_header();
        ctx.peer_trusted = live.trusted.contains(peer);
        ctx.keep_forwarded = ctx.peer_trusted && live.real_ip_header == RealIpHeader::Forwarded;
        ctx.keep_xff = ctx.peer_trusted && live.real_ip_header == RealIpHeader::XForwardedFor;
        let ip = clientip::resolve(peer, &req.headers, &live.trusted, live.real_ip_header);
        ctx.client_ip = Some(ip);
        if ctx.peer_trusted {
            ctx.told_scheme =
                clientip::told_scheme(peer, &req.headers, &live.trusted, live.real_ip_header);
        }
        let path = req.uri.path();
        let host = request_host(req);
        if let Some(why) = malformed(req, host) {
            self.answer(
                session,
                ctx,
                &live.templates,
                LocalAnswer::bad_request(why),
                None,
            )
            .await?;
            return Ok(true);
        }
        ctx.hostless = host.is_empty();
        // Routed as the upstream will resolve the path: `/api/../admin` is `/admin`'s.
        let routed = esper_protocol::normalize_path(path);
        let routed = live.router.route(host, &routed).cloned();
        if path == CHALLENGE_PATH {
            // Puzzles are answered here on every host, whatever path prefixes its apps
            // route: a host served only under `/api` must not turn a challenge into a
            // block.
            let templates = routed.as_ref().map_or(&live.templates, |a| &a.templates);
            ctx.app = routed.clone();
            self.challenge_endpoint(session, ctx, templates, ip).await?;
            return Ok(true);
        }
        let Some(app) = routed else {
            self.answer(
                session,
                ctx,
                &live.templates,
                LocalAnswer::unknown_host(live.unknown_host_status),
                None,
            )
            .await?;
            return Ok(true);
        };
        ctx.app = Some(app.clone());
        let templates = &app.templates;
        if live.allow_ips.contains(ip) || live.allow_paths.contains(path) {
            return Ok(false);
        }
        let ja4 = session
            .digest()
            .and_then(|d| d.ssl_digest.as_deref())
            .and_then(crate::tls::ja4_of);
        let keys = RequestKeys {
            app: &app.name,
            ip,
            headers: &req.headers,
            path: req.uri.path(),
            ja4,
        };
        let mut verdict = self.enforcer.decide_request(&keys, ctx.timestamp);
        if let Verdict::Challenge { difficulty, .. } = verdict
            && let Some(earned) = self.clearance(session, ip)
            && earned >= difficulty
        {
            verdict = self.enforcer.decide_cleared(&keys, ctx.timestamp, earned);
        }
        match verdict {
            Verdict::Forward(action) => {
                ctx.action = action;
                Ok(false)
            }
            Verdict::Logged(m) => {
                ctx.action = EnforcedAction::Log;
                ctx.reference = Some(m.id);
                Ok(false)
            }
            Verdict::Block(m) => {
                tracing::debug!(client = %ip, mitigation = %m.id, "blocked");
                ctx.action = EnforcedAction::Block;
                let reference = m.id.text();
                ctx.reference = Some(m.id);
                self.answer(
                    session,
                    ctx,
                    templates,
                    LocalAnswer::blocked(),
                    Some(&reference),
                )
                .await?;
                Ok(true)
            }
            Verdict::Throttled {
                retry_after,
                mitigation,
            } => {
                ctx.action = EnforcedAction::Throttle;
                let reference = mitigation.id.text();
                ctx.reference = Some(mitigation.id);
                self.answer(
                    session,
                    ctx,
                    templates,
                    LocalAnswer::rate_limited(retry_after),
                    Some(&reference),
                )
                .await?;
                Ok(true)
            }
            Verdict::Tarpit {
                delay,
                permit,
                mitigation,
            } => {
                ctx.action = EnforcedAction::Tarpit;
                ctx.reference = Some(mitigation.id);
                let held = hold(session, delay).await;
                drop(permit);
                held?;
                Ok(false)
            }
            Verdict::TarpitFull(mitigation) => {
                ctx.action = EnforcedAction::Tarpit;
                let reference = mitigation.id.text();
                ctx.reference = Some(mitigation.id);
                self.answer(
                    session,
                    ctx,
                    templates,
                    LocalAnswer::busy(),
                    Some(&reference),
                )
                .await?;
                Ok(true)
            }
            Verdict::Challenge {
                difficulty,
                mitigation,
            } => {
                ctx.action = EnforcedAction::Challenge;
                let return_to = session
                    .req_header()
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                let reference = mitigation.id.text();
                ctx.reference = Some(mitigation.id);
                self.challenge(
                    session,
                    ctx,
                    templates,
                    ip,
                    difficulty,
                    LocalAnswer::challenge(),
                    &return_to,
                    Some(&reference),
                )
                .await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // A retry may come long after the request started (connect timeouts): its
        // window of the pool is the one it goes out in.
        let at = if ctx.tries == 0 {
            ctx.started
        } else {
            Instant::now()
        };
        let peer = ctx.app.as_ref().and_then(|app| app.peer(ctx.failed, at));
        let Some(peer) = peer else {
            return Error::e_explain(pingora::ErrorType::ConnectNoRoute, "no upstream available");
        };
        ctx.tries += 1;
        Ok(Box::new(peer))
    }

    /// A client hanging up before its answer, or sending what is not HTTP (a broken
    /// chunked body, a bad header), is the client's doing, not a failure of the proxy:
    /// Pingora would log it as an error, so any client could fill the log, and a load
    /// balancer closing its idle keep-alives would write a line per connection. They
    /// are counted by status in the request metrics all the same.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        let quiet = clients_doing(error);
        if quiet {
            tracing::debug!(%error, "a client's connection or request failed");
        }
        quiet
    }

    /// Pingora's own error answers are bare: no body, no request id. Ours are the
    /// page or JSON every other answer of the proxy is, from the app's templates.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = failure_status(e);
        // A response already under way (the upstream broke off its body) cannot be
        // replaced; the connection is closed on it.
        if code > 0 && session.response_written().is_none() {
            // The connection is not reused after a failure (the request's body may be
            // half read): say so, or a client would send its next request into it.
            session.set_keepalive(None);
            if ctx.request_id.is_empty() {
                ctx.request_id = new_id_header();
            }
            let live = self.live.load_full();
            let app = ctx.app.clone();
            let templates = app.as_ref().map_or(&live.templates, |a| &a.templates);
            let answer = LocalAnswer::failure(code);
            if let Err(err) = self.answer(session, ctx, templates, answer, None).await {
                tracing::debug!(error = %err, "cannot send the error answer");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        use pingora::upstreams::peer::Peer;
        // Nothing was sent yet: another upstream of the app may take the request.
        ctx.failed = peer.address().as_inet().copied();
        if let Some(app) = &ctx.app {
            self.metrics
                .upstream_connect_errors
                .with_label_values(&[app.name.as_str()])
                .inc();
        }
        if ctx
            .app
            .as_ref()
            .is_some_and(|a| ctx.tries < a.upstreams().min(MAX_UPSTREAM_TRIES))
        {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let hop = Hop {
            peer: peer_ip(session),
            // Behind a trusted balancer that terminates TLS, the client's scheme is the
            // balancer's to tell: replacing its `https` with this hop's `http` would send
            // the app into redirect loops and insecure cookies.
            // Read only when `X-Forwarded-Proto` is added.
            scheme: match ctx.told_scheme {
                Some(told) => told,
                None if ctx.forward.proto && is_tls(session) => HTTPS,
                None => HTTP,
            },
        };
        if ctx.hostless
            && let Some(app) = &ctx.app
        {
            upstream_request.insert_header(header::HOST, app.host.clone())?;
        }
        if session.is_http2() {
            join_cookies(upstream_request)?;
        }
        let added = ctx.forward.added();
        if ctx.forward.preserve_case || added == 0 || !origin_form(upstream_request) {
            return add_forwarding(upstream_request, ctx, hop);
        }
        let end_stream = upstream_request.send_end_stream();
        let mut parts = take_request(upstream_request);
        // Room for what is added, made once: the request is a clone holding exactly
        // its own headers, so each insertion would grow the map again.
        let _ = parts.headers.try_reserve(added);
        let outcome = add_forwarding(&mut parts.headers, ctx, hop);
        *upstream_request = RequestHeader::from(parts);
        if let Some(end_stream) = end_stream {
            upstream_request.set_send_end_stream(end_stream);
        }
        outcome
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if session.req_header().version < http::Version::HTTP_11 {
            for_http10(session, upstream_response);
        }
        if !ctx.forward.request_id
            || ctx.request_id.is_empty()
            || upstream_response.headers.contains_key(&X_REQUEST_ID_NAME)
        {
            return Ok(());
        }
        if ctx.forward.preserve_case {
            return upstream_response.insert_header(X_REQUEST_ID, ctx.request_id.clone());
        }
        let status = upstream_response.status;
        let reason = upstream_response
            .get_reason_phrase()
            .filter(|r| Some(*r) != status.canonical_reason())
            .map(str::to_string);
        let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
        let mut parts =
            http::response::Parts::from(std::mem::replace(upstream_response, placeholder));
        let outcome = parts
            .headers
            .set(&X_REQUEST_ID_NAME, ctx.request_id.clone());
        *upstream_response = ResponseHeader::from(parts);
        if reason.is_some() {
            upstream_response.set_reason_phrase(reason.as_deref())?;
        }
        outcome
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let latency = ctx.started.elapsed();
        self.metrics.request(ctx.action);
        self.metrics.request_duration.observe(latency.as_secs_f64());
        if ctx.access_log.logs(ctx.action) {
            access_line(session, ctx, latency);
        }
        let Some(client_ip) = ctx.client_ip else {
            return;
        };
        let Some(app) = ctx.app.as_ref() else {
            return;
        };
        if !self.reporter.sampled(app.sample_rate) {
            return;
        }
        let tls = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .map(|d| TlsFacts::event_info(d));
        let req = session.req_header();
        let host = request_host(req);
        self.reporter.report(Observed {
            app: &app.name,
            sample_rate: app.sample_rate,
            tls,
            timestamp: ctx.timestamp,
            client_ip,
            method: req.method.as_str(),
            host,
            path: req.uri.path(),
            headers: &req.headers,
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            latency,
            bytes: u64::try_from(session.body_bytes_sent()).unwrap_or(u64::MAX),
            action: ctx.action,
            own_id: (!ctx.client_request_id && !ctx.request_id.is_empty())
                .then(|| ctx.request_id_text()),
        });
    }
}

/// One access-log line: what nginx's would say, and what Esper did and why.
fn access_line(session: &Session, ctx: &RequestCtx, latency: std::time::Duration) {
    let req = session.req_header();
    let client = ctx.client_ip.map(|ip| ip.to_string()).unwrap_or_default();
    let reference = ctx.reference.as_ref().map(MitigationId::text);
    tracing::info!(
        target: "esper_proxy::access",
        client = %client,
        method = %req.method,
        host = request_host(req),
        // The target as nginx's `$request_uri` has it, over HTTP/2 as well.
        uri = req.uri.path_and_query().map_or("/", |p| p.as_str()),
        status = session.response_written().map_or(0, |r| r.status.as_u16()),
        ms = (latency.as_secs_f64() * 1e6).round() / 1e3,
        bytes = session.body_bytes_sent(),
        app = ctx.app.as_ref().map_or("", |a| a.name.as_str()),
        action = ctx.action.as_str(),
        mitigation = reference.as_deref().unwrap_or(""),
        request_id = ctx.request_id_text(),
        user_agent = req
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_clients_do_stays_out_of_the_error_log() {
        use pingora::ErrorType;
        for t in [
            ErrorType::ConnectionClosed,
            ErrorType::ReadError,
            ErrorType::WriteError,
            ErrorType::InvalidHTTPHeader,
        ] {
            assert!(clients_doing(&Error::new_down(t.clone())), "{t:?}");
            assert!(!clients_doing(&Error::new_up(t.clone())), "{t:?}");
        }
        assert!(!clients_doing(&Error::new_in(ErrorType::ConnectNoRoute)));
    }

    #[test]
    fn failures_answer_as_an_edge_proxy_does() {
        use pingora::ErrorType;
        let up = |t| failure_status(&Error::new_up(t));
        assert_eq!(up(ErrorType::ConnectRefused), 502);
        assert_eq!(up(ErrorType::ConnectTimedout), 504);
        assert_eq!(up(ErrorType::ReadTimedout), 504);
        assert_eq!(
            failure_status(&Error::new_down(ErrorType::InvalidHTTPHeader)),
            400
        );
        assert_eq!(
            failure_status(&Error::new_down(ErrorType::ConnectionClosed)),
            0
        );
        assert_eq!(
            failure_status(&Error::new_in(ErrorType::InternalError)),
            500
        );
        assert_eq!(
            failure_status(&Error::new_up(ErrorType::HTTPStatus(413))),
            413
        );
    }

    #[test]
    fn addresses_as_header_values_read_as_displayed() {
        for text in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "192.0.2.1",
            "1.20.3.45",
            "::1",
            "2001:db8::1",
            "::ffff:192.0.2.1",
            "2001:db8:1234:5678:9abc:def0:1234:5678",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(ip_header(ip).to_str().unwrap(), ip.to_string(), "{text}");
        }
    }
}
