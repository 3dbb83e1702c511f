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
