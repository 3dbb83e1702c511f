//! Best-effort heartbeats to the control plane, so the proxy shows up in
//! `esperctl status`: `POST {control_url}/api/v1/proxies/heartbeat` every interval.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use esper_common::Shutdown;
use esper_protocol::{Endpoints, ProxyHeartbeat, Resend, ServiceClient, Token};

use crate::cache::MitigationCache;
use crate::metrics::Metrics;
use crate::status::Status;

/// Timeout of one heartbeat request.
const TIMEOUT: Duration = Duration::from_secs(5);
const PATH: &str = "/api/v1/proxies/heartbeat";

/// What the heartbeat reports about this proxy.
pub struct Reporter {
    pub proxy_id: String,
    /// The names of the apps served (they may change on a reload).
    pub apps: crate::live::LiveState,
    pub started_at: DateTime<Utc>,
    pub cache: Arc<MitigationCache>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
}

impl Reporter {
    fn beat(&self) -> ProxyHeartbeat {
        ProxyHeartbeat {
            proxy_id: self.proxy_id.clone(),
            apps: self
                .apps
                .load()
                .router
                .apps()
                .iter()
                .map(|a| a.name.clone())
                .collect(),
            cache_entries: self.cache.len() as u64,
            requests_total: self.metrics.requests_total(),
            events_sent_total: self.metrics.events_sent.get(),
            events_dropped_total: self.metrics.dropped_total(),
            stream_connected: self.status.stream_connected(),
            started_at: self.started_at,
            config_revision: self.metrics.remote_config_revision.get(),
            challenge_key_revision: self.metrics.challenge_key_revision.get(),
        }
    }
}

/// Sends a heartbeat every `interval` until shutdown; failures are logged, never fatal.
pub async fn run(
    control: Endpoints,
    token: Token,
    interval: Duration,
    reporter: Reporter,
    shutdown: Shutdown,
) {
    let http = match reqwest::Client::builder()
        .timeout(TIMEOUT)
        .connect_timeout(crate::remote::CONNECT_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the heartbeat client; no heartbeats");
            return;
        }
    };
    let client = ServiceClient::with_http(http, control, token);
    let mut healthy = true;
    loop {
        let req = client
            .req(reqwest::Method::POST, PATH)
            .json(&reporter.beat());
        let result = tokio::select! {
            r = client.call(req, Resend::Unanswered) => r,
            _ = shutdown.wait() => break,
        };
        // Named after the call: a reload or a failover may move the control plane.
        let endpoint = format!("{}{PATH}", client.endpoints().load().current_url());
        let failure = match result {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(format!("control plane answered {}", resp.status())),
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None if !healthy => {
                tracing::info!(url = %endpoint, "heartbeats accepted again");
                healthy = true;
            }
            None => {}
            Some(e) if healthy => {
                tracing::warn!(url = %endpoint, error = %e, "heartbeat failed");
                healthy = false;
            }
            Some(e) => tracing::debug!(error = %e, "heartbeat still failing"),
        }
        if shutdown.sleep(interval).await {
            break;
        }
    }
}
