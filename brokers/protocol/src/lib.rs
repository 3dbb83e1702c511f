//! Esper's broker wire protocol: the JSON documents that cross service boundaries
//! (request events, mitigations, queue and delta-stream messages) and the HTTP clients
//! of both brokers. This crate knows no service: services depend on it, never the reverse.

pub mod client;
pub mod control;
pub mod decision_log;
pub mod endpoints;
pub mod entity;
pub mod error;
pub mod event;
mod event_json;
pub mod ingestion;
pub mod mitigation;
pub mod outbox;
pub mod token;
pub mod trace_context;

pub use client::{ClientError, IngestionClient, MitigationClient, Resend, ServiceClient, trust_ca};
pub use control::{
    ChallengeKey, Decision, DecisionBatch, DecisionMode, ProxyConfigDoc, ProxyHeartbeat,
    PutProxyConfig, ReportedFields, RotateChallengeKey, RotatedChallengeKey, WorkerHeartbeat,
};
pub use decision_log::{
    DecisionLogClient, DecisionRevoke, PageMark, Recorded, RevocationMark, RevokedDecision,
    RevokedDecisions, record_in_halves,
};
pub use endpoints::{Endpoints, Instances};
pub use entity::{
    EntityKey, EntityParseError, normalize_path, parse_net, path_template, write_path_template,
};
pub use error::ApiErrorBody;
pub use event::{
    CookieHash, EnforcedAction, RequestEvent, TlsInfo, cookie_hash, hash_cookie_value,
};
pub use event_json::{
    EventView, INGEST_BODY_END, INGEST_BODY_START, IpText, format_ip, ingest_body,
};
pub use mitigation::{
    Action, Change, DeltaPage, MAX_CHALLENGE_DIFFICULTY, MAX_TARPIT_MS, Mitigation, Origin, Reason,
    Scope,
};
pub use token::Token;
