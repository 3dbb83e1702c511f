//! One evaluation loop: claim a batch, evaluate it, publish its enforced mitigations,
//! commit the state with the decisions' records for the control plane, acknowledge.
//!
//! Ordering is what makes the work at-least-once and idempotent: events are only marked
//! processed (committed) after their mitigations are published, and only acknowledged
//! after that. If publishing fails the state is rolled back and nothing is acknowledged,
//! so the events come back after the lease and are counted once, with their decisions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use esper_common::Shutdown;
use esper_protocol::ingestion::ClaimedItem;
use esper_protocol::{Decision, IngestionClient, MitigationClient, RequestEvent};
use tracing::Instrument;

use super::control::DecisionLog;
use super::policies::PolicyHandle;
use super::status::{Metrics, Status};
use crate::eval::{Evaluator, LogAppend, PolicySet};

/// Least time between the starts of two claims that brought nothing.
const MIN_EMPTY_CLAIM_SPACING: Duration = Duration::from_millis(100);

/// Everything the loops share.
pub(crate) struct Shared {
    pub worker_id: String,
    pub batch_size: usize,
    pub lease: Duration,
    pub claim_wait: Duration,
    pub evaluation_timeout: Duration,
    pub ingestion: IngestionClient,
    pub mitigation: MitigationClient,
    pub evaluator: Evaluator,
    pub policies: Arc<PolicyHandle>,
    /// The decision log's outbox, with a control plane to deliver it to.
    pub log: Option<Arc<DecisionLog>>,
    pub metrics: Metrics,
    pub status: Arc<Status>,
    /// `--memory-limit`: no new claims while it is exceeded.
    pub memory: Option<Arc<super::memory::MemoryGuard>>,
}

/// Exponential backoff between failed broker calls.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Runs one loop until shutdown; the batch in hand is finished first.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: Shutdown) {
    let mut backoff = Backoff::new();
    while !shutdown.is_triggered() {
        // Claiming before policies are loaded would acknowledge unevaluated events.
        if shared.policies.current().is_none() {
            shutdown.sleep(Duration::from_millis(100)).await;
            continue;
        }
        if shared.memory.as_ref().is_some_and(|m| m.over()) {
            shutdown.sleep(Duration::from_millis(200)).await;
            continue;
        }
        // While the mitigation broker fails, a batch's decisions cannot be published: a
        // claim would only be given back, and every lease that lapses counts as a
        // delivery attempt, so an outage of a few leases would send the events to the
        // dead-letter list. Claims wait until the broker is ready again.
        if shared.status.mitigation.last_error().is_some() {
            if shared.mitigation.ready().await {
                shared.status.mitigation.ok();
                tracing::info!("mitigation broker ready again; claiming");
            } else {
                shutdown.sleep(backoff.step()).await;
                continue;
            }
        }
        // The claim is not cut short by shutdown: items it leases are processed below.
        let asked = Instant::now();
        let claimed = shared
            .ingestion
            .claim(
                &shared.worker_id,
                shared.batch_size,
                shared.lease,
                shared.claim_wait,
            )
            .await;
        let items = match claimed {
            Ok(resp) => {
                shared.status.ingestion.ok();
                backoff.reset();
                resp.items
            }
            Err(e) => {
                shared.metrics.claim_errors.inc();
                shared.status.ingestion.failed(&e);
                tracing::warn!(error = %e, "claim failed");
                shutdown.sleep(backoff.step()).await;
                continue;
            }
        };
        if items.is_empty() {
            // A claim that did not wait (`claim_wait` 0, or a broker that caps waits at
            // 0) must not make the slot spin against the broker.
            if let Some(rest) = MIN_EMPTY_CLAIM_SPACING.checked_sub(asked.elapsed())
                && shutdown.sleep(rest).await
            {
                break;
            }
            continue;
        }
        // Read after the claim, which may have waited through a reload: events that
        // arrived after a new policy file took effect are judged by it.
        let Some(policies) = shared.policies.current() else {
            continue;
        };
        let started = Instant::now();
        // A span only for trace export: in logs it would prefix every line of the batch.
        let span = if esper_protocol::trace_context::exporting() {
            tracing::info_span!("engine.batch", events = items.len())
        } else {
            tracing::Span::none()
        };
        let done = process(&shared, &policies, items, &shutdown)
            .instrument(span)
            .await;
        shared
            .status
            .busy_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let outcome = if done { "acked" } else { "retried" };
        shared.metrics.batches.with_label_values(&[outcome]).inc();
        if !done {
            shutdown.sleep(backoff.step()).await;
        }
    }
}

/// Processes one claimed batch; `false` when it was left for redelivery.
async fn process(
    shared: &Shared,
    policies: &PolicySet,
    mut items: Vec<ClaimedItem>,
    shutdown: &Shutdown,
) -> bool {
    let claimed_at = Instant::now();
    // In time order: a proxy's threads report one client's requests in separate
    // batches, so the claim may hold them out of order, and a sequence is matched in
    // the order its events are evaluated. The sort is stable for equal times.
    items.sort_by_key(|i| i.event.timestamp);
    let (item_ids, events): (Vec<String>, Vec<RequestEvent>) =
        items.into_iter().map(|i| (i.item_id, i.event)).unzip();
    let now = shared.evaluator.clock().now();
    let timer = Instant::now();
    let evaluated = tokio::time::timeout(
        shared.evaluation_timeout,
        shared.evaluator.evaluate(policies, &events, now),
    )
    .await;
    shared
        .metrics
        .evaluation_duration
        .observe(timer.elapsed().as_secs_f64());
    let eval = match evaluated {
        Ok(Ok(eval)) => {
            shared.status.state.ok();
            eval
        }
        Ok(Err(e)) => {
            shared.status.state.failed(&e);
            shared
                .metrics
                .evaluation_failures
                .with_label_values(&["state"])
                .inc();
            tracing::warn!(error = %e, events = events.len(), "evaluation failed; the batch will be redelivered");
            return false;
        }
        Err(_) => {
            // A store that stopped answering shows as timeouts, not errors.
            shared.status.state.failed(format!(
                "{}: a batch's evaluation timed out after {:?}",
                shared.evaluator.state().name(),
                shared.evaluation_timeout
            ));
            shared
                .metrics
                .evaluation_failures
                .with_label_values(&["timeout"])
                .inc();
            tracing::warn!(timeout = ?shared.evaluation_timeout, events = events.len(), "evaluation timed out; the batch will be redelivered");
            return false;
        }
    };

    let mitigations = eval.mitigations();
    if !mitigations.is_empty() {
        let count = mitigations.len();
        let mut backoff = Backoff::new();
        loop {
            match shared.mitigation.publish(mitigations.clone()).await {
                Ok(_) => {
                    shared.status.mitigation.ok();
                    shared.metrics.published.inc_by(count as u64);
                    break;
                }
                Err(e) => {
                    shared.metrics.publish_errors.inc();
                    shared.status.mitigation.failed(&e);
                    // Retry while the lease leaves room; then give the batch back.
                    let wait = backoff.step();
                    let lease_left = shared.lease.saturating_sub(claimed_at.elapsed());
                    if !e.is_transient() || shutdown.is_triggered() || wait * 4 > lease_left {
                        tracing::warn!(error = %e, mitigations = count, "publish failed; the batch will be redelivered");
                        if let Err(e) = shared.evaluator.rollback(&eval).await {
                            tracing::error!(error = %e, "cannot roll back the batch's state");
                        }
                        return false;
                    }
                    tracing::warn!(error = %e, retry_in = ?wait, "publish failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    // The decisions' records are committed with the batch: none is lost once its
    // events count as processed, and none is logged for a batch that will be decided
    // again.
    let records = match &shared.log {
        Some(_) => records_of(&eval.decisions),
        None => Vec::new(),
    };
    let append = match &shared.log {
        Some(log) => log.records(&records),
        None => LogAppend::default(),
    };
    match shared.evaluator.commit_with(&eval, append, now).await {
        Ok(logged) => {
            if let (Some(log), false) = (&shared.log, records.is_empty()) {
                log.committed(logged);
            }
        }
        Err(e) => {
            // Mitigations are out; redelivery may decide them again, which is harmless.
            tracing::error!(error = %e, "cannot commit the batch's state; the batch will be redelivered");
            return false;
        }
    }
    shared
        .status
        .events_total
        .fetch_add(eval.evaluated as u64, Ordering::Relaxed);
    shared
        .status
        .decisions_total
        .fetch_add(eval.decisions.len() as u64, Ordering::Relaxed);
    for d in &eval.decisions {
        tracing::info!(
            policy = d.policy_id.as_deref().unwrap_or(""),
            entity = %d.mitigation.entity,
            action = %d.mitigation.action,
            mode = ?d.mode,
            summary = %d.mitigation.reason.summary,
            "decision"
        );
    }
    shared
        .metrics
        .observe_state(shared.evaluator.state().as_ref());
    // Items whose event another batch is still working on stay unacknowledged.
    let item_ids: Vec<String> = item_ids
        .into_iter()
        .zip(&eval.busy)
        .filter(|(_, busy)| !**busy)
        .map(|(id, _)| id)
        .collect();
    if !item_ids.is_empty() {
        ack(shared, item_ids).await;
    }
    true
}

/// Decisions as the outbox's records (JSON).
fn records_of(decisions: &[Decision]) -> Vec<String> {
    decisions
        .iter()
        .filter_map(|d| match serde_json::to_string(d) {
            Ok(text) => Some(text),
            Err(e) => {
                tracing::error!(error = %e, id = %d.id, "cannot write a decision for the log");
                None
            }
        })
        .collect()
}

/// Acknowledges, with a few quick retries. Items whose ack is lost come back after the
/// lease and are skipped as duplicates.
async fn ack(shared: &Shared, item_ids: Vec<String>) {
    let mut backoff = Backoff::new();
    for attempt in 1..=3 {
        match shared
            .ingestion
            .ack(&shared.worker_id, item_ids.clone())
            .await
        {
            Ok(_) => return,
            Err(e) => {
                shared.metrics.ack_errors.inc();
                shared.status.ingestion.failed(&e);
                if attempt == 3 || !e.is_transient() {
                    tracing::warn!(error = %e, items = item_ids.len(), "ack failed; the items will be redelivered and skipped as duplicates");
                    return;
                }
                tokio::time::sleep(backoff.step()).await;
            }
        }
    }
}
