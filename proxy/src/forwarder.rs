//! The event forwarder: drains the bounded queue into batches (`batch_size` events or
//! `flush_interval`, whichever comes first) and posts them to the ingestion broker.
//!
//! One batch is in flight at a time, so memory is bounded by the queue plus one batch. A
//! failed batch is retried briefly with backoff; when the broker stays unreachable the
//! batch is dropped and counted, and later batches get a single attempt each until one
//! succeeds, so an outage never stalls the queue for long.

use std::sync::Arc;
use std::time::Duration;

use esper_protocol::{ClientError, IngestionClient, RequestEvent};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::metrics::{DropReason, Metrics};
use crate::status::Status;

/// Attempts per batch while the broker is healthy.
const MAX_ATTEMPTS: u32 = 4;
/// First retry delay; doubles per attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait before a retry, even when the broker asks for more (`Retry-After`).
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Time allowed for sending what is still queued once traffic has stopped.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Sends queued events to the ingestion broker.
pub struct Forwarder {
    rx: mpsc::Receiver<RequestEvent>,
    client: IngestionClient,
    batch_size: usize,
    flush_interval: Duration,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    /// The last batch was dropped after retries: the broker is presumed down.
    failing: bool,
}

impl Forwarder {
    /// A forwarder draining `rx` into `client`.
    pub fn new(
        rx: mpsc::Receiver<RequestEvent>,
        client: IngestionClient,
        batch_size: usize,
        flush_interval: Duration,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
    ) -> Forwarder {
        Forwarder {
            rx,
            client,
            batch_size: batch_size.max(1),
            flush_interval,
            metrics,
            status,
            failing: false,
        }
    }

    /// Runs until `finish` turns true (traffic has stopped, so nothing more is coming)
    /// or every sender is gone; then sends what is left, for at most `FINAL_FLUSH`.
    pub async fn run(mut self, mut finish: watch::Receiver<bool>) {
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            tokio::select! {
                biased;
                n = self.rx.recv_many(&mut batch, self.batch_size) => if n == 0 { break },
                _ = finish.wait_for(|f| *f) => break,
            }
            let deadline = Instant::now() + self.flush_interval;
            while batch.len() < self.batch_size {
                let room = self.batch_size - batch.len();
                tokio::select! {
                    n = self.rx.recv_many(&mut batch, room) => if n == 0 { break },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = finish.wait_for(|f| *f) => break,
                }
            }
            self.deliver(&mut batch).await;
        }
        self.final_flush(batch).await;
    }

    async fn final_flush(mut self, mut batch: Vec<RequestEvent>) {
        self.rx.close();
        // Once stopping, one attempt per batch: nobody should wait on a dead broker.
        self.failing = true;
        let flush = async {
            loop {
                while batch.len() < self.batch_size {
                    match self.rx.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
                self.deliver(&mut batch).await;
            }
        };
        if tokio::time::timeout(FINAL_FLUSH, flush).await.is_err() {
            let mut left = batch.len() as u64;
            while self.rx.try_recv().is_ok() {
                left += 1;
            }
            self.metrics.drop_events(DropReason::Shutdown, left);
            tracing::warn!(
                dropped = left,
                "events still queued at shutdown were dropped"
            );
        }
    }

    /// Sends `batch` (emptying it) with retries, counting what is sent or dropped.
    async fn deliver(&mut self, batch: &mut Vec<RequestEvent>) {
        let n = batch.len() as u64;
        let attempts = if self.failing { 1 } else { MAX_ATTEMPTS };
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            match self.client.ingest_slice(batch).await {
                Ok(_) => break Ok(()),
                Err(e) if !e.is_transient() || attempt >= attempts => break Err(e),
                Err(e) => {
                    let wait = match &e {
                        ClientError::Backpressure {
                            retry_after: Some(after),
                            ..
                        } => *after,
                        _ => backoff,
                    };
                    tokio::time::sleep(wait.min(MAX_BACKOFF)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        batch.clear();
        match outcome {
            Ok(()) => {
                self.metrics.events_sent.inc_by(n);
                self.status.ingest_result(Ok(()));
                if self.failing {
                    tracing::info!(
                        url = self.client.url(),
                        "ingestion broker accepts events again"
                    );
                }
                self.failing = false;
            }
            Err(e) => {
                let reason = if e.is_transient() {
                    DropReason::SendFailed
                } else {
                    DropReason::Rejected
                };
                self.metrics.drop_events(reason, n);
                self.status.ingest_result(Err(e.to_string()));
                if !self.failing {
                    tracing::warn!(error = %e, dropped = n, "cannot deliver events to the ingestion broker");
                } else {
                    tracing::debug!(error = %e, dropped = n, "ingestion broker still unavailable");
                }
                self.failing = e.is_transient();
            }
        }
    }
}
