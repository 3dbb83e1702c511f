//! The JSON documents of the control-plane API (`/api/v1/*`) that are not broker wire
//! types: what the server answers and `esperctl` reads.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use esper_protocol::control::Seen;
use esper_protocol::ingestion::QueueStatus;
use esper_protocol::{EntityKey, Mitigation, ProxyHeartbeat, WorkerHeartbeat};
use serde::{Deserialize, Serialize};

use crate::store::{LoggedDecision, PolicyVersionRecord, PutOutcome};

/// `GET /api/v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub server: ServerStatus,
    pub ingestion: IngestionStatus,
    pub mitigation: MitigationStatus,
    pub workers: Vec<Seen<WorkerHeartbeat>>,
    pub proxies: Vec<Seen<ProxyHeartbeat>>,
    pub policies: PolicyCounts,
}

/// The control-plane server itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub version: String,
    pub uptime_secs: u64,
    /// The store's kind, e.g. `sqlite`.
    pub store: String,
    /// While `false`, the policy counts, workers and proxies of the report are not known
    /// (zeros and empty lists), and `store_error` says why.
    pub store_reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
}

/// The ingestion broker as the control plane sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestionStatus {
    pub url: String,
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The mitigation broker as the control plane sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MitigationStatus {
    pub url: String,
    pub reachable: bool,
    /// Active mitigations.
    pub active: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Policy counts and the revision workers evaluate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCounts {
    pub total: u64,
    pub enabled: u64,
    pub revision: i64,
}

/// One line of `GET /api/v1/policies`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicySummary {
    pub id: String,
    pub version: i64,
    pub enabled: bool,
    pub mode: String,
    pub action: String,
    pub entity: String,
    pub threshold: f64,
    /// Humantime, e.g. `1m`.
    pub window: String,
    pub scope: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/v1/policies`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyListResponse {
    pub policies: Vec<PolicySummary>,
    pub revision: i64,
}

/// `GET /api/v1/policies/{id}`: the stored spec (JSON) and the same policy as TOML.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyDetail {
    pub id: String,
    pub version: i64,
    pub enabled: bool,
    pub mode: String,
    pub spec: serde_json::Value,
    pub toml: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /api/v1/policies` (and enable, disable, shadow, enforce) answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub applied: Vec<PutOutcome>,
    /// The revision after the change.
    pub revision: i64,
}

/// `POST /api/v1/policies/validate` answer for a valid document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidateResponse {
    pub valid: bool,
    pub policies: usize,
}

/// `GET /api/v1/policies/{id}/versions`, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyHistory {
    pub id: String,
    pub versions: Vec<PolicyVersionRecord>,
}

/// One line of `GET /api/v1/lists`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListSummary {
    pub name: String,
    pub kind: String,
    pub items: usize,
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/v1/lists`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListsResponse {
    pub lists: Vec<ListSummary>,
}

/// `PUT /api/v1/lists/{name}` body.
/// The answer to `PUT /api/v1/lists/{name}`: the stored list and, for the `allowlist`,
/// the ids of the mitigations in force that it now covers and that were revoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PutListResponse {
    #[serde(flatten)]
    pub record: crate::store::ListRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutListRequest {
    /// `ip` or `string`.
    pub kind: String,
    pub items: Vec<String>,
}

/// `DELETE` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: bool,
}

/// `GET /api/v1/mitigations/entity/{entity}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntityReport {
    pub entity: EntityKey,
    /// Active, from the mitigation broker.
    pub mitigations: Vec<Mitigation>,
    /// Recent decisions about the entity, newest first, from the decision log.
    pub decisions: Vec<LoggedDecision>,
}

/// `POST /api/v1/mitigations` body: a manual mitigation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualMitigationRequest {
    /// `ip:203.0.113.7`, `cidr:203.0.113.0/24`, `header:NAME=VALUE`, `cookie:NAME=HASH`.
    pub entity: String,
    /// `"block"` or `"log"`, or a full action (`{"type": "throttle", "rate": 5, "burst": 10}`).
    pub action: serde_json::Value,
    /// How long it stands, e.g. `1h` (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `global` (default) or `{"app": "NAME"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<esper_protocol::Scope>,
}

/// `POST /api/v1/decisions` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordResponse {
    pub received: usize,
    /// New entries (a decision already logged is not counted again).
    pub recorded: usize,
}

/// `GET /api/v1/decisions`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionsResponse {
    pub decisions: Vec<LoggedDecision>,
}

/// `GET /api/v1/workers`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkersResponse {
    pub workers: Vec<Seen<WorkerHeartbeat>>,
}

/// `GET /api/v1/proxies`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxiesResponse {
    pub proxies: Vec<Seen<ProxyHeartbeat>>,
}

/// Heartbeat answer: the policy revision, so a worker knows when to reload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub ok: bool,
    pub policies_revision: i64,
    /// The member is to stop taking work and exit (`esperctl workers drain`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
}

/// `POST /api/v1/workers/{id}/drain` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainResponse {
    pub worker_id: String,
    pub draining: bool,
}

/// `POST /api/v1/analyze` body: one request of an app that is not behind the proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyzeRequest {
    pub client_ip: IpAddr,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    /// Raw cookie values by name; only their hashes leave the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookies: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

/// `POST /api/v1/analyze` answer: the actor's current mitigation, if any.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnalyzeResponse {
    /// `allow`, or the mitigation's action (`block`, `throttle`, `tarpit`, `log`).
    pub action: String,
    pub mitigation: Option<Mitigation>,
    /// False when the ingestion broker refused or could not take the event.
    pub enqueued: bool,
}

/// `POST /api/v1/admin/shutdown` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Let in-flight requests finish (up to `timeout_secs`); false stops at once.
    #[serde(default = "yes")]
    pub graceful: bool,
    /// Drain limit; the server's `shutdown_timeout` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

fn yes() -> bool {
    true
}

/// `POST /api/v1/admin/shutdown` answer (202).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownResponse {
    pub shutting_down: bool,
    pub graceful: bool,
    pub timeout_secs: u64,
}

/// `POST /api/v1/tokens` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub name: String,
    /// `admin`, `read` or `service`.
    pub role: String,
}

/// The answer to `POST /api/v1/tokens`: the only time the token itself is shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub record: crate::store::TokenRecord,
    pub token: String,
}

/// `GET /api/v1/tokens`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokensResponse {
    pub tokens: Vec<crate::store::TokenRecord>,
}
