//! The one `ProxyHttp` implementation: each phase delegates to a small filter
//! (request id, enforcement, reporting) and reads only in-memory state.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use esper_protocol::EnforcedAction;
use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, Result};

use crate::enforce::{Enforcer, Verdict};
use crate::metrics::Metrics;
use crate::report::{Observed, Reporter};
use crate::respond::{LocalAnswer, acceptable_request_id, new_id, prefers_json};

const X_REQUEST_ID: &str = "x-request-id";
const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";

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
    request_id: String,
    /// The client sent a usable `X-Request-ID`, which is passed on unchanged.
    client_request_id: bool,
    action: EnforcedAction,
    _in_flight: InFlightGuard,
}

/// Where requests go: one upstream for now, resolved at start-up.
#[derive(Clone)]
pub struct Upstream {
    peer: HttpPeer,
}

impl Upstream {
    /// The upstream at `addr`; with `tls`, verified against `host`.
    pub fn new(
        addr: SocketAddr,
        tls: bool,
        host: &str,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Upstream {
        let mut peer = HttpPeer::new(addr, tls, host.to_string());
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.idle_timeout = Some(idle_timeout);
        Upstream { peer }
    }
}

/// The proxy application Pingora runs.
pub struct EsperProxy {
    enforcer: Enforcer,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    upstream: Upstream,
    in_flight: InFlight,
}

impl EsperProxy {
    /// Assembles the filters.
    pub fn new(
        enforcer: Enforcer,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        upstream: Upstream,
        in_flight: InFlight,
    ) -> EsperProxy {
        EsperProxy {
            enforcer,
            reporter,
            metrics,
            upstream,
            in_flight,
        }
    }

    /// Writes a local answer (403 or 429) in the format the client prefers.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        answer: LocalAnswer,
    ) -> Result<()> {
        let accept = session
            .req_header()
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let (content_type, body) = answer.render(&ctx.request_id, prefers_json(accept));
        let mut resp = ResponseHeader::build(answer.status, Some(6))?;
        resp.insert_header(header::CONTENT_TYPE, content_type)?;
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        resp.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
        if let Some(secs) = answer.retry_after {
            resp.insert_header(header::RETRY_AFTER, secs.to_string())?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
}

#[async_trait]
impl ProxyHttp for EsperProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            timestamp: Utc::now(),
            client_ip: None,
            request_id: String::new(),
            client_request_id: false,
            action: EnforcedAction::Allow,
            _in_flight: self.in_flight.enter(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let given = session
            .req_header()
            .headers
            .get(X_REQUEST_ID)
            .and_then(|v| acceptable_request_id(v.as_bytes()));
        match given {
            Some(id) => {
                ctx.request_id = id.to_string();
                ctx.client_request_id = true;
            }
            None => ctx.request_id = new_id(),
        }
        let Some(ip) = client_ip(session) else {
            return Ok(false);
        };
        ctx.client_ip = Some(ip);
        match self
            .enforcer
            .decide(ip, &session.req_header().headers, ctx.timestamp)
        {
            Verdict::Forward(action) => {
                ctx.action = action;
                Ok(false)
            }
            Verdict::Block(m) => {
                tracing::debug!(client = %ip, mitigation = %m.id, entity = %m.entity, "blocked");
                ctx.action = EnforcedAction::Block;
                self.answer(session, ctx, LocalAnswer::blocked()).await?;
                Ok(true)
            }
            Verdict::Throttled { retry_after } => {
                ctx.action = EnforcedAction::Throttle;
                self.answer(session, ctx, LocalAnswer::rate_limited(retry_after))
                    .await?;
                Ok(true)
            }
            Verdict::Tarpit { delay, permit } => {
                ctx.action = EnforcedAction::Tarpit;
                tokio::time::sleep(delay).await;
                drop(permit);
                Ok(false)
            }
            Verdict::TarpitFull => {
                ctx.action = EnforcedAction::Tarpit;
                self.answer(session, ctx, LocalAnswer::busy()).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.upstream.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !ctx.client_request_id {
            upstream_request.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
        }
        if let Some(ip) = ctx.client_ip {
            // Appended as nginx's `$proxy_add_x_forwarded_for` does: earlier hops are the
            // client's claim, the last one is what this proxy saw.
            let forwarded = match upstream_request
                .headers
                .get(X_FORWARDED_FOR)
                .and_then(|v| v.to_str().ok())
            {
                Some(earlier) => format!("{earlier}, {ip}"),
                None => ip.to_string(),
            };
            upstream_request.insert_header(X_FORWARDED_FOR, forwarded)?;
            upstream_request.insert_header(X_FORWARDED_PROTO, "http")?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !ctx.request_id.is_empty() && !upstream_response.headers.contains_key(X_REQUEST_ID) {
            upstream_response.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let latency = ctx.started.elapsed();
        self.metrics.request(ctx.action);
        self.metrics.request_duration.observe(latency.as_secs_f64());
        let Some(client_ip) = ctx.client_ip else {
            return;
        };
        let req = session.req_header();
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.host())
            .unwrap_or("");
        self.reporter.report(Observed {
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
        });
    }
}
