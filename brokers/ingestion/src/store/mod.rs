//! The queue store behind the ingestion broker's HTTP API. One trait, so the in-memory
//! queue and a Redis Streams queue (a consumer group, XAUTOCLAIM for expired leases) can
//! serve the same endpoints; the HTTP layer only ever holds an `Arc<dyn QueueStore>`.

mod memory;
mod redis;

use std::time::Duration;

use esper_protocol::RequestEvent;
use esper_protocol::ingestion::{ClaimedItem, ItemInfo, ItemState, QueueStatus};

pub use memory::MemoryQueue;
pub use redis::RedisQueue;

/// The store could not do its job (a backend down, a timeout). The HTTP layer answers
/// 503 `store_unavailable` and logs the detail.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("queue store unavailable: {0}")]
    Unavailable(String),
}

/// What a claim asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimSpec {
    /// The claiming worker.
    pub consumer: String,
    /// At most this many items.
    pub max: usize,
    /// How long the items stay leased to `consumer` without an ack.
    pub lease: Duration,
    /// Long-poll: how long to wait when nothing is claimable (zero: answer at once).
    pub wait: Duration,
    /// Once some items are claimable but fewer than `max`, how long to wait for more;
    /// never beyond `wait`.
    pub linger: Duration,
}

/// Why a batch was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Ingest is paused (`POST /api/queue/pause`).
    Paused,
    /// The batch does not fit in the room left.
    Full,
    /// The batch is larger than the whole queue; it can never fit.
    TooLarge,
}

impl Refusal {
    /// The metric label and the reason in logs.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Paused => "paused",
            Refusal::Full => "full",
            Refusal::TooLarge => "too_large",
        }
    }
}

/// The outcome of an enqueue: the whole batch is in, or none of it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Every event is queued; `depth` is the number of waiting items afterwards.
    Accepted { depth: u64 },
    /// Nothing was queued; the events were counted in `rejected_total`.
    Refused {
        reason: Refusal,
        /// Items held (waiting and leased) when the batch was refused.
        held: u64,
        capacity: u64,
    },
}

/// A bounded, leased work queue of request events: FIFO, at-least-once.
///
/// Leases: a claimed item belongs to its consumer until acked or until its lease expires.
/// An expired lease stays the consumer's (a late ack still counts, status and inspection
/// show it leased, purge leaves it) until a claim hands the item out again. Claims hand
/// out lapsed leases before waiting items, oldest first (the item's place in the queue,
/// not the order the leases ran out in; on Redis, among the first `max(max, 1000)` to run
/// out), count them in `reclaimed_total` and give them `attempts + 1`. An item whose lease expires after its `max_attempts`-th claim goes to
/// the dead-letter list at the next claim instead (counted in `dead_lettered_total`),
/// where inspection shows it and purge drops it.
#[async_trait::async_trait]
pub trait QueueStore: Send + Sync + 'static {
    /// A short name for health output and logs (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// The most items (waiting and leased) the queue holds.
    fn capacity(&self) -> u64;

    /// Is the backend reachable?
    async fn ping(&self) -> Result<(), StoreError>;

    /// Appends the batch in order, or refuses all of it: paused, or it does not fit.
    async fn enqueue(&self, events: Vec<RequestEvent>) -> Result<Enqueued, StoreError>;

    /// Leases up to `spec.max` items, oldest first, to `spec.consumer`, reclaiming expired
    /// leases first, waiting as `spec.wait` and `spec.linger` say. Works while paused.
    ///
    /// Must be cancel-safe while waiting: the HTTP layer drops the future on shutdown.
    /// Items leased by a dropped call come back when their lease expires.
    async fn claim(&self, spec: &ClaimSpec) -> Result<Vec<ClaimedItem>, StoreError>;

    /// Acks the items leased to `consumer`; others and unknown ids are ignored and not
    /// counted. Returns how many were acked.
    async fn ack(&self, consumer: &str, item_ids: &[String]) -> Result<usize, StoreError>;

    /// Depth, leases, totals and the consumers seen recently.
    async fn status(&self) -> Result<QueueStatus, StoreError>;

    /// Pauses or resumes ingest (claims and acks go on, so the queue drains).
    async fn set_paused(&self, paused: bool) -> Result<(), StoreError>;

    /// Up to `limit` items, oldest first, optionally only those in `state`.
    async fn items(
        &self,
        state: Option<ItemState>,
        limit: usize,
    ) -> Result<Vec<ItemInfo>, StoreError>;

    /// One item, waiting or leased; `None` once acked, purged or never queued.
    async fn item(&self, item_id: &str) -> Result<Option<ItemInfo>, StoreError>;

    /// Drops every waiting and dead-lettered item (leased ones stay with their
    /// consumers); returns how many.
    async fn purge(&self) -> Result<u64, StoreError>;
}
