//! Messages between the runtime services and the control plane: decisions for the
//! durable log, and the heartbeats through which workers and proxies show up in
//! `esperctl status`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::mitigation::Mitigation;

/// Whether a decision was enforced or only recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionMode {
    #[default]
    Enforce,
    /// Recorded and counted, never published to proxies.
    Shadow,
}

/// One entry of the durable decision log: the mitigation and why it was decided.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// The mitigation's id (also the decision's).
    pub id: String,
    pub mitigation: Mitigation,
    pub mode: DecisionMode,
    /// The policy and its version, for origin `policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<i64>,
    /// The aggregate value that crossed the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_secs: Option<u64>,
    /// The worker, or `control` for manual decisions.
    pub decided_by: String,
    pub decided_at: DateTime<Utc>,
}

/// `POST /api/v1/decisions` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionBatch {
    pub decisions: Vec<Decision>,
}

/// `POST /api/v1/workers/heartbeat` body, every few seconds from each engine worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerHeartbeat {
    pub worker_id: String,
    pub concurrency: u32,
    pub batch_size: u32,
    pub state_backend: String,
    /// Revision of the policies the worker evaluates.
    pub policies_revision: i64,
    pub events_total: u64,
    pub decisions_total: u64,
    /// Fraction of the last interval spent evaluating, 0..1.
    pub utilization: f64,
    /// `draining` once shutdown has begun.
    pub state: String,
    pub started_at: DateTime<Utc>,
}

/// `POST /api/v1/proxies/heartbeat` body, every few seconds from each proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyHeartbeat {
    pub proxy_id: String,
    pub apps: Vec<String>,
    /// Active mitigations in the proxy's cache.
    pub cache_entries: u64,
    pub requests_total: u64,
    pub events_sent_total: u64,
    pub events_dropped_total: u64,
    /// Is the proxy following the mitigation broker's delta stream right now?
    pub stream_connected: bool,
    pub started_at: DateTime<Utc>,
}

/// The proxy configuration the control plane holds: TOML in the proxy's config format
/// (the keys of its `[proxy]` section), laid over each proxy's own configuration.
/// `GET /api/v1/proxies/config` answers it; `PUT` replaces it with a [`PutProxyConfig`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxyConfigDoc {
    /// Grows by one with every change; proxies long-poll with `after=REVISION`.
    pub revision: i64,
    pub config: String,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

/// `GET /api/v1/proxies/challenge-key`: the key every proxy of the deployment signs
/// challenges and clearance cookies with when it has no `challenge_secret` of its own,
/// generated once by the control plane, so a cookie earned through one proxy is
/// honoured by every other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeKey {
    /// Used as a `challenge_secret` would be (its UTF-8 bytes are the HMAC key).
    pub key: String,
}

/// `PUT /api/v1/proxies/config` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutProxyConfig {
    /// TOML text: the proxy options to set (`[[apps]]`, `allow_ips`, ...).
    pub config: String,
}

/// A heartbeat as the control plane reports it, with when it was last heard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Seen<T> {
    #[serde(flatten)]
    pub beat: T,
    pub last_seen: DateTime<Utc>,
    /// False when nothing was heard for three intervals.
    pub alive: bool,
}
