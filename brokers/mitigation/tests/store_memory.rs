//! The mitigation-store suite against the memory store.

mod support;

use std::sync::Arc;

use esper_mitigation::MemoryMitigations;
use support::store_suite::{SUITE_RETENTION, mitigation_store_suite};

#[tokio::test]
async fn memory_store_passes_the_store_suite() {
    mitigation_store_suite(Arc::new(MemoryMitigations::new(SUITE_RETENTION))).await;
}
