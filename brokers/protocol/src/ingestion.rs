//! Ingestion broker messages: batch ingest, claim with a lease, ack, queue status.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::RequestEvent;

/// `POST /api/events` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestRequest {
    pub events: Vec<RequestEvent>,
}

/// `POST /api/events` answer (202).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestResponse {
    pub accepted: usize,
    /// Items waiting (not leased) after this batch.
    pub depth: u64,
}

/// `POST /api/queue/claim` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The claiming worker's id.
    pub consumer: String,
    /// At most this many items.
    pub max: usize,
    /// How long the claimed items stay leased before another consumer may reclaim them.
    pub lease_ms: u64,
    /// Long-poll: wait up to this long for work when the queue is empty.
    #[serde(default)]
    pub wait_ms: u64,
}

/// One leased item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimedItem {
    pub item_id: String,
    /// How many times the item has been claimed, this time included.
    pub attempts: u32,
    pub event: RequestEvent,
}

/// `POST /api/queue/claim` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub items: Vec<ClaimedItem>,
}

/// `POST /api/queue/ack` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    pub consumer: String,
    pub item_ids: Vec<String>,
}

/// `POST /api/queue/ack` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckResponse {
    pub acked: usize,
}

/// One consumer as the broker sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    pub consumer: String,
    pub leased: u64,
    pub last_seen: DateTime<Utc>,
}

/// `GET /api/queue/status` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// Items waiting to be claimed.
    pub depth: u64,
    /// Items claimed and not yet acked.
    pub leased: u64,
    pub max_size: u64,
    pub paused: bool,
    pub ingested_total: u64,
    pub acked_total: u64,
    /// Leases that expired and went back to the queue.
    pub reclaimed_total: u64,
    /// Events refused because the queue was full or paused.
    pub rejected_total: u64,
    /// Items in the dead-letter list: their lease expired after `max_attempts` claims.
    #[serde(default)]
    pub dead_letter: u64,
    /// Items moved to the dead-letter list since the store was created.
    #[serde(default)]
    pub dead_lettered_total: u64,
    pub consumers: Vec<ConsumerStatus>,
}

/// The state of one queued item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    Pending,
    Leased,
    /// Claimed `max_attempts` times without an ack; kept for inspection, never handed out.
    DeadLetter,
}

/// `GET /api/queue/items` and `/api/queue/items/{id}` entries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemInfo {
    pub item_id: String,
    pub state: ItemState,
    pub attempts: u32,
    pub enqueued_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub event: RequestEvent,
}

/// `GET /api/queue/items` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemList {
    pub items: Vec<ItemInfo>,
}

/// `POST /api/queue/purge` answer: how many waiting items were dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeResponse {
    pub purged: u64,
}
