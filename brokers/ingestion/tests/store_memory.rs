//! The queue-store suite against the memory queue.

mod support;

use std::sync::Arc;

use esper_ingestion::MemoryQueue;
use support::store_suite::{
    SUITE_CAPACITY, SUITE_MAX_ATTEMPTS, many_lapsed_leases_go_out_before_new_items,
    queue_store_suite,
};

#[tokio::test]
async fn memory_queue_passes_the_store_suite() {
    queue_store_suite(Arc::new(MemoryQueue::with_max_attempts(
        SUITE_CAPACITY,
        SUITE_MAX_ATTEMPTS,
    )))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_queue_passes_the_store_suite_on_many_threads() {
    queue_store_suite(Arc::new(MemoryQueue::with_max_attempts(
        SUITE_CAPACITY,
        SUITE_MAX_ATTEMPTS,
    )))
    .await;
}

#[tokio::test]
async fn many_lapsed_leases_go_out_before_new_items_from_memory() {
    many_lapsed_leases_go_out_before_new_items(Arc::new(MemoryQueue::new(5_000))).await;
}
