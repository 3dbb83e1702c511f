//! Configuration from the control plane: long-polls `GET /api/v1/proxies/config` for a
//! newer revision, lays its TOML over the proxy's own configuration (file, environment
//! and flags, as last read at start or on SIGHUP; the control plane's keys win) and
//! applies the result through the same reload path as SIGHUP, so no connection is
//! dropped. A SIGHUP keeps the latest document laid over the configuration it reads. A configuration that does not
//! parse or validate is refused with an error line, and the one in force stays.

use std::sync::Arc;
use std::time::Duration;

use esper_common::Shutdown;
use esper_protocol::{ChallengeKey, ProxyConfigDoc};
use reqwest::StatusCode;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::{ProxyError, Reloader};

/// Slack over the long-poll wait before the request itself times out.
const REQUEST_SLACK: Duration = Duration::from_secs(10);
/// First pause after a failed poll; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// `base` with the top-level keys of the TOML document `overlay` replacing its own.
pub fn overlay(base: &Config, overlay: &str) -> Result<Config, String> {
    let mut merged = toml::Table::try_from(base).map_err(|e| e.to_string())?;
    let remote: toml::Table = overlay
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    for (key, value) in remote {
        merged.insert(key, value);
    }
    let config: Config = merged
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// What the follower needs.
pub struct Follow {
    pub control_url: String,
    pub token: Option<String>,
    pub reloader: Reloader,
    pub metrics: Arc<Metrics>,
    /// Long-poll wait per request.
    pub wait: Duration,
}

/// Follows the control plane's proxy configuration until `shutdown`.
pub async fn follow(f: Follow, shutdown: Shutdown) {
    let client = reqwest::Client::new();
    let url = format!(
        "{}/api/v1/proxies/config",
        f.control_url.trim_end_matches('/')
    );
    let mut after = 0i64;
    let mut backoff = FIRST_BACKOFF;
    let mut failing = false;
    // The latest document, while it could not be built for a reason that may pass (an
    // upstream that does not resolve yet, a templates directory not yet in place): it is
    // tried again after each wait that brings no newer one.
    let mut retry: Option<ProxyConfigDoc> = None;
    loop {
        let mut req = client
            .get(&url)
            .query(&[("after", after), ("wait", f.wait.as_secs() as i64)])
            .timeout(f.wait + REQUEST_SLACK);
        if let Some(t) = &f.token {
            req = req.bearer_auth(t);
        }
        let polled = tokio::select! {
            _ = shutdown.wait() => return,
            r = poll(req) => r,
        };
        match polled {
            Ok(Some(doc)) => {
                after = doc.revision;
                retry = apply(&f, &doc).await.then_some(doc);
            }
            Ok(None) => {
                if let Some(doc) = retry.take() {
                    retry = apply(&f, &doc).await.then_some(doc);
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(url, error = %e, "cannot read the proxy configuration from the control plane; retrying");
                }
                failing = true;
                if shutdown.sleep(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        if failing {
            tracing::info!(url, "control plane reachable again");
        }
        failing = false;
        backoff = FIRST_BACKOFF;
    }
}

/// One long-poll: a newer document, or none within the wait.
async fn poll(req: reqwest::RequestBuilder) -> Result<Option<ProxyConfigDoc>, String> {
    let resp = req.send().await.map_err(|e| e.to_string())?;
    match resp.status() {
        StatusCode::OK => resp.json().await.map(Some).map_err(|e| e.to_string()),
        StatusCode::NO_CONTENT => Ok(None),
        s => Err(format!("answered {s}")),
    }
}

/// Applies `doc`; `true` when it failed for a reason that may pass, so it is worth
/// trying again. A document that does not parse or validate never will be.
async fn apply(f: &Follow, doc: &ProxyConfigDoc) -> bool {
    let outcome = f.reloader.reload_remote(&doc.config).await;
    match outcome {
        Ok(()) => {
            f.metrics.remote_config_applied.inc();
            f.metrics.remote_config_revision.set(doc.revision);
            tracing::info!(revision = doc.revision, by = %doc.updated_by, "configuration from the control plane applied");
            false
        }
        Err(e) => {
            f.metrics.remote_config_refused.inc();
            let again = !matches!(e, ProxyError::Remote(_));
            tracing::error!(revision = doc.revision, by = %doc.updated_by, error = %e, retried = again, "configuration from the control plane refused; the current one stays");
            again
        }
    }
}

/// Asks the control plane for the deployment's challenge key until it answers, and signs
/// with it (unless the configuration sets its own `challenge_secret`). Until then the
/// proxy signs with its start-up key, whose cookies it keeps honouring after the switch.
pub async fn challenge_key(
    control_url: String,
    token: Option<String>,
    reloader: Reloader,
    shutdown: Shutdown,
) {
    let client = reqwest::Client::new();
    let url = format!(
        "{}/api/v1/proxies/challenge-key",
        control_url.trim_end_matches('/')
    );
    let mut backoff = FIRST_BACKOFF;
    let mut warned = false;
    loop {
        let mut req = client.get(&url).timeout(REQUEST_SLACK);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let answer = tokio::select! {
            _ = shutdown.wait() => return,
            r = fetch_key(req) => r,
        };
        match answer {
            Ok(key) => {
                if reloader.use_deployment_key(&key.key).await {
                    tracing::info!(url, "signing challenges with the control plane's key");
                }
                return;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(url, error = %e, "cannot read the challenge key from the control plane; retrying (clearance cookies are honoured by this process only until then)");
                    warned = true;
                }
                if shutdown.sleep(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn fetch_key(req: reqwest::RequestBuilder) -> Result<ChallengeKey, String> {
    let resp = req.send().await.map_err(|e| e.to_string())?;
    match resp.status() {
        StatusCode::OK => resp.json().await.map_err(|e| e.to_string()),
        s => Err(format!("answered {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_keys_replace_the_local_ones() {
        let base = Config {
            upstream: "127.0.0.1:9000".into(),
            proxy_id: "local".into(),
            ..Config::default()
        };
        let merged = overlay(
            &base,
            "upstream = \"127.0.0.1:9001\"\nallow_paths = [\"/health\"]",
        )
        .unwrap();
        assert_eq!(merged.upstream, "127.0.0.1:9001");
        assert_eq!(merged.allow_paths, ["/health"]);
        assert_eq!(merged.proxy_id, "local", "keys not in the document stay");
        assert!(overlay(&base, "no_such_option = 1").is_err());
        assert!(overlay(&base, "sample_rate = 7.0").is_err());
        assert!(overlay(&base, "not toml").is_err());
    }
}
