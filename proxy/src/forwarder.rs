//! The event forwarder: takes events from the request threads' buffers (woken when one
//! holds a batch, or `flush_interval` after it last took some), records them to a
//! JSON-lines file when asked, and posts them to the ingestion broker. The batches (at
//! most `batch_size` events) come from the queue already written as request bodies.
//!
//! Its flush timer runs only while events come in: after an interval that brought none
//! it waits for the next event without one, so an idle proxy is never woken for
//! reporting.
//!
//! One batch is in flight at a time, so memory is bounded by the queue plus what one
//! drain took. A failed batch is retried briefly with backoff; when the broker stays
//! unreachable the batch is dropped and counted, and later batches get a single attempt
//! each until one succeeds, so an outage never stalls the queue for long.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use esper_protocol::error::refusal;
use esper_protocol::{ClientError, IngestionClient};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::metrics::{DropReason, Metrics};
use crate::queue::{Batch, EventQueue};
use crate::status::Status;

/// Attempts per batch while the broker is healthy.
const MAX_ATTEMPTS: u32 = 4;
/// First retry delay; doubles per attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait before a retry, even when the broker asks for more (`Retry-After`).
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Time allowed for sending what is still queued once traffic has stopped.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Appends every forwarded event to a file, one JSON object a line: the format
/// `esperctl policies test --events FILE` replays.
pub struct Recorder {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    line: Vec<u8>,
}

impl Recorder {
    /// Opens (creating, appending to) `path`.
    pub async fn open(path: PathBuf) -> std::io::Result<Recorder> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        Ok(Recorder {
            path,
            file: Some(file),
            line: Vec::new(),
        })
    }

    /// Writes `events`. After a write error (disk full, say) it logs once and stops
    /// recording: traffic and forwarding never wait on the recording.
    async fn write(&mut self, batches: &[Batch]) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        self.line.clear();
        for ev in batches.iter().flat_map(Batch::events) {
            self.line.extend_from_slice(ev);
            self.line.push(b'\n');
        }
        let written = async {
            file.write_all(&self.line).await?;
            file.flush().await
        };
        if let Err(e) = written.await {
            tracing::error!(path = %self.path.display(), error = %e, "cannot record events; recording stopped");
            self.file = None;
        }
    }
}

/// Sends queued events to the ingestion broker.
pub struct Forwarder {
    queue: Arc<EventQueue>,
    client: IngestionClient,
    flush_interval: Duration,
    recorder: Option<Recorder>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    /// The last batch was dropped after retries: the broker is presumed down.
    failing: bool,
    /// When a failure to deliver was last logged as a warning, while batches keep
    /// failing: a broker refusing every batch (a wrong token) would otherwise warn
    /// several times a second.
    warned: Option<Instant>,
}

/// How often a failure that goes on is warned of again.
const WARN_AGAIN: Duration = Duration::from_secs(60);

impl Forwarder {
    /// A forwarder draining `queue` into `client`.
    pub fn new(
        queue: Arc<EventQueue>,
        client: IngestionClient,
        flush_interval: Duration,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
    ) -> Forwarder {
        Forwarder {
            queue,
            client,
            flush_interval,
            recorder: None,
            metrics,
            status,
            failing: false,
            warned: None,
        }
    }

    /// Also records every event it takes to `recorder`.
    pub fn record(mut self, recorder: Recorder) -> Forwarder {
        self.recorder = Some(recorder);
        self
    }

    /// Runs until `finish` turns true (traffic has stopped, so nothing more is coming);
    /// then sends what is left, for at most `FINAL_FLUSH`.
    pub async fn run(mut self, mut finish: watch::Receiver<bool>) {
        let mut pending = Vec::new();
        // When what came in since the last drain is due; none while parked (measured: the
        // timer ticking through idle time cost 1.4 ms of CPU a second, 20 wake-ups).
        let mut due = Some(Instant::now() + self.flush_interval);
        loop {
            let timer = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = finish.wait_for(|f| *f) => break,
                _ = self.queue.ready() => {}
                _ = timer => {}
            }
            let drained_at = Instant::now();
            self.queue.drain_into(&mut pending);
            if pending.is_empty() {
                if self.queue.park() {
                    due = None;
                    continue;
                }
                self.queue.drain_into(&mut pending);
            }
            due = Some(drained_at + self.flush_interval);
            self.send_all(&mut pending).await;
        }
        self.final_flush(pending).await;
    }

    /// Records and delivers `pending` (emptying it).
    async fn send_all(&mut self, pending: &mut Vec<Batch>) {
        if pending.is_empty() {
            return;
        }
        if let Some(r) = self.recorder.as_mut() {
            r.write(pending).await;
        }
        for batch in pending.drain(..) {
            self.deliver(batch).await;
        }
    }

    async fn final_flush(mut self, mut pending: Vec<Batch>) {
        self.queue.close();
        // Once stopping, one attempt per batch: nobody should wait on a dead broker.
        self.failing = true;
        self.queue.drain_into(&mut pending);
        let mut left: u64 = pending.iter().map(|b| b.len() as u64).sum();
        let flush = async {
            if let Some(r) = self.recorder.as_mut() {
                r.write(&pending).await;
            }
            for batch in pending {
                let n = batch.len() as u64;
                self.deliver(batch).await;
                left -= n;
            }
        };
        if tokio::time::timeout(FINAL_FLUSH, flush).await.is_err() {
            self.metrics.drop_events(DropReason::Shutdown, left);
            tracing::warn!(
                dropped = left,
                "events still queued at shutdown were dropped"
            );
        }
    }

    /// Sends `batch` with retries, counting what is sent or dropped.
    async fn deliver(&mut self, batch: Batch) {
        // A span only for trace export: in logs it would prefix every line about it.
        let span = if esper_protocol::trace_context::exporting() {
            tracing::info_span!("proxy.ship_events", events = batch.len())
        } else {
            tracing::Span::none()
        };
        self.ship(batch).instrument(span).await;
    }

    async fn ship(&mut self, batch: Batch) {
        let n = batch.len() as u64;
        let body = batch.into_body();
        let attempts = if self.failing { 1 } else { MAX_ATTEMPTS };
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            match self.client.ingest_body(body.clone()).await {
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
        // The client is done with its copy once the answer is in: the buffer is ours
        // again, for the request threads' next batch.
        if let Ok(unique) = body.try_into_mut() {
            self.queue.recycle(Vec::from(unique));
        }
        match outcome {
            Ok(()) => {
                self.metrics.events_sent.inc_by(n);
                self.status.ingest_result(Ok(()));
                if self.warned.take().is_some() {
                    tracing::info!(
                        url = self.client.url(),
                        "ingestion broker accepts events again"
                    );
                }
                self.failing = false;
            }
            Err(e) => {
                let reason = drop_reason(&e);
                self.metrics.drop_events(reason, n);
                self.status.ingest_result(Err(e.to_string()));
                if self.warned.is_none_or(|at| at.elapsed() >= WARN_AGAIN) {
                    tracing::warn!(error = %e, dropped = n, "cannot deliver events to the ingestion broker");
                    self.warned = Some(Instant::now());
                } else {
                    tracing::debug!(error = %e, dropped = n, "ingestion broker still failing");
                }
                self.failing = e.is_transient();
            }
        }
    }
}

/// Why a batch that could not be delivered was dropped: the broker's queue pushing back
/// (full or paused), the broker or its store failing, or a refusal for good.
fn drop_reason(e: &ClientError) -> DropReason {
    match e {
        ClientError::Backpressure { code, .. }
            if code == refusal::QUEUE_FULL || code == refusal::QUEUE_PAUSED =>
        {
            DropReason::Backpressure
        }
        // A broker whose store is down (`store_unavailable`) answers 503 with a wait too:
        // a failure to send, not a queue saying no.
        e if e.is_transient() => DropReason::SendFailed,
        _ => DropReason::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_told_apart_by_the_brokers_answer() {
        let pushed = |code: &str| ClientError::Backpressure {
            code: code.into(),
            message: "busy".into(),
            retry_after: Some(std::time::Duration::from_secs(1)),
        };
        assert_eq!(drop_reason(&pushed("queue_full")), DropReason::Backpressure);
        assert_eq!(
            drop_reason(&pushed("queue_paused")),
            DropReason::Backpressure
        );
        assert_eq!(
            drop_reason(&pushed("store_unavailable")),
            DropReason::SendFailed
        );
        let refused = ClientError::Api {
            status: 400,
            code: "invalid_body".into(),
            message: String::new(),
        };
        assert_eq!(drop_reason(&refused), DropReason::Rejected);
    }
}
