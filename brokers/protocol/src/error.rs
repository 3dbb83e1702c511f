//! The JSON error body every Esper HTTP service answers with on a 4xx or 5xx.

use serde::{Deserialize, Serialize};

/// `{"error": "queue_full", "message": "ingestion queue is full (1000000 items)"}`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Stable, machine-readable code (snake_case).
    pub error: String,
    /// Human-readable explanation; never contains internals such as SQL or stack traces.
    pub message: String,
}

/// The codes of the 503s a healthy service answers for state every instance over the
/// same store shares (the queue full or paused, the durable copy's outbox full, a broker
/// pushing back): a client given several instances does not move on for them, as it
/// does for any other 5xx.
pub mod refusal {
    /// The ingestion queue holds as many items as it may.
    pub const QUEUE_FULL: &str = "queue_full";
    /// Ingestion is paused (`esperctl queue pause`).
    pub const QUEUE_PAUSED: &str = "queue_paused";
    /// The mitigation broker's outbox to the control plane is full.
    pub const PERSISTENCE_BACKLOG: &str = "persistence_backlog";
    /// The control plane relays a broker's push-back.
    pub const BROKER_BUSY: &str = "broker_busy";

    /// Whether `code` is one of them.
    pub fn shared(code: &str) -> bool {
        [QUEUE_FULL, QUEUE_PAUSED, PERSISTENCE_BACKLOG, BROKER_BUSY].contains(&code)
    }
}
