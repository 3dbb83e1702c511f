//! The worker's side of the control plane: fetching the active policies, sending
//! decisions to the durable log (through the state's outbox, so enforcement never waits
//! for the control plane and a worker's crash loses none), and heartbeats.

use std::sync::Arc;
use std::time::Duration;

use esper_common::Shutdown;
use esper_protocol::{
    ClientError, Decision, DecisionBatch, Endpoints, Resend, RevocationMark, RevokedDecisions,
    ServiceClient, Token, WorkerHeartbeat, record_in_halves,
};
use serde::de::IgnoredAny;
use tokio::sync::Notify;

use super::status::{Metrics, Status};
use crate::eval::{Claim, LogAppend, Logged, StateBackend};
use crate::policy::ActivePolicies;

/// Decisions per `POST /api/v1/decisions`.
const SEND_BATCH: usize = 1000;

/// Client of the control plane's worker-facing endpoints.
#[derive(Clone, Debug)]
pub struct ControlClient {
    service: ServiceClient,
}

impl ControlClient {
    /// The worker's client: at most `max_idle` idle connections, trusting the CA
    /// certificates in PEM file `ca` when given; `endpoints` and `token` are shared with
    /// the caller, who may replace them.
    pub fn for_worker(
        endpoints: Endpoints,
        token: Token,
        ca: Option<&std::path::Path>,
        max_idle: usize,
    ) -> Result<ControlClient, String> {
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(max_idle);
        let builder = match ca {
            Some(ca) => esper_protocol::trust_ca(builder, ca)?,
            None => builder,
        };
        let http = builder
            .build()
            .map_err(|e| format!("cannot build the control plane client: {e}"))?;
        Ok(ControlClient {
            service: ServiceClient::with_http(http, endpoints, token),
        })
    }

    /// `GET /api/v1/policies/active`.
    pub async fn active_policies(&self) -> Result<ActivePolicies, ClientError> {
        self.service.get("/api/v1/policies/active").await
    }

    /// `GET /api/v1/decisions/revocations`: a page of the policy decisions revoked after
    /// `after`, in the order revoked, and the mark to go on from.
    pub async fn revocations(
        &self,
        after: Option<&RevocationMark>,
        limit: usize,
    ) -> Result<RevokedDecisions, ClientError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(mark) = after {
            query.push(("after", mark.to_query()));
        }
        let rb = self
            .service
            .req(reqwest::Method::GET, "/api/v1/decisions/revocations")
            .query(&query);
        self.service.send(rb, Resend::Unanswered).await
    }

    /// `POST /api/v1/decisions`: the log takes ids it has as the same decisions.
    pub async fn record_decisions(&self, decisions: &[Decision]) -> Result<(), ClientError> {
        let body = DecisionBatch {
            decisions: decisions.to_vec(),
        };
        self.service
            .post::<_, IgnoredAny>("/api/v1/decisions", &body, Resend::Unanswered)
            .await
            .map(|_| ())
    }

    /// `POST /api/v1/workers/heartbeat`: `true` when the control plane asks this worker
    /// to drain (`esperctl workers drain`).
    pub async fn heartbeat(&self, beat: &WorkerHeartbeat) -> Result<bool, ClientError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            drain: bool,
        }
        // The control plane tells a drain in every answer until a beat says `draining`,
        // so a repeat after an answer that was lost is told it too.
        self.service
            .post::<_, Answer>("/api/v1/workers/heartbeat", beat, Resend::Unanswered)
            .await
            .map(|a| a.drain)
    }
}

/// How long a worker may deliver the decision outbox without renewing its claim; each
/// claim and acknowledgement renews it. Well above a delivery's client timeout.
const LEASE: Duration = Duration::from_secs(30);
/// How often the outbox is looked at besides this worker's own commits: workers over a
/// shared state share its outbox, and one of them delivers what the others wrote.
const POLL: Duration = Duration::from_secs(1);

/// Delivers the decision records the state's commits appended to its outbox (so a
/// worker that dies, or a control plane that is away, loses none that the state kept)
/// to the control plane's log. Enforcement never waits for it: records are committed
/// with the batch and sent after, in the order committed; a full outbox drops its
/// oldest. Workers over one shared state take turns under a lease, one delivering at a
/// time; the log takes a record sent twice (after a crash between sending and removing
/// it) as the same decision.
pub(crate) struct DecisionLog {
    state: Arc<dyn StateBackend>,
    owner: String,
    capacity: usize,
    notify: Notify,
    metrics: Metrics,
}

impl DecisionLog {
    /// The outbox of `state`, delivered as `owner` (the worker id), holding at most
    /// `capacity` records.
    pub fn new(
        state: Arc<dyn StateBackend>,
        owner: String,
        capacity: usize,
        metrics: Metrics,
    ) -> DecisionLog {
        DecisionLog {
            state,
            owner,
            capacity: capacity.max(1),
            notify: Notify::new(),
            metrics,
        }
    }

    /// A batch's decisions as the records its commit appends.
    pub fn records<'a>(&self, entries: &'a [String]) -> LogAppend<'a> {
        LogAppend {
            entries,
            capacity: self.capacity,
        }
    }

    /// Notes what a commit appended, and wakes the delivery.
    pub fn committed(&self, logged: Logged) {
        if logged.dropped > 0 {
            self.metrics.decisions_dropped.inc_by(logged.dropped as u64);
            tracing::warn!(
                dropped = logged.dropped,
                "decision outbox is full; oldest decisions dropped from the log"
            );
        }
        self.metrics.decisions_pending.set(logged.pending as i64);
        self.notify.notify_one();
    }

    /// Sends what the outbox holds; `false` when it must be tried again later. With
    /// `shutdown`, stops after the batch in hand once it fires: other workers may keep
    /// the shared outbox from ever being empty.
    async fn flush(
        &self,
        client: &ControlClient,
        status: &Status,
        shutdown: Option<&Shutdown>,
    ) -> bool {
        let mut first_read = None;
        loop {
            if shutdown.is_some_and(|s| s.is_triggered()) {
                return true;
            }
            // The outbox is in the state: its reads tell the state's health too, more
            // often than cleanups and clock readings do while no batch comes.
            let claimed = self.state.claim_log(&self.owner, LEASE, SEND_BATCH).await;
            match &claimed {
                Ok(_) => status.state_check.ok(),
                Err(e) => status.state_check.failed(e),
            }
            let entries = match claimed {
                Ok(Claim::Held { pending, .. }) => {
                    self.metrics.decisions_pending.set(pending as i64);
                    return true;
                }
                Ok(Claim::Mine { pending, entries }) => {
                    self.metrics.decisions_pending.set(pending as i64);
                    entries
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the decision outbox; will retry");
                    return false;
                }
            };
            if entries.is_empty() {
                return true;
            }
            let numbers: Vec<u64> = entries.iter().map(|(n, _)| *n).collect();
            // Acknowledged as holder, yet read again: the acknowledgement removed
            // nothing. Sending them over and over in a tight loop helps no one; back off
            // and let an operator look.
            if first_read.replace(numbers[0]) == Some(numbers[0]) {
                tracing::error!(
                    number = numbers[0],
                    "delivered decisions stay in the outbox after their acknowledgement"
                );
                return false;
            }
            let decisions: Vec<Decision> = entries
                .iter()
                .filter_map(|(_, text)| match serde_json::from_str(text) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        self.metrics.decisions_dropped.inc();
                        tracing::error!(error = %e, "an unreadable record in the decision outbox; dropped");
                        None
                    }
                })
                .collect();
            if !decisions.is_empty() {
                let out = record_in_halves(&decisions, async |part: Vec<Decision>| {
                    client.record_decisions(&part).await
                })
                .await;
                if let Some(e) = out.stopped {
                    self.metrics.control_errors.inc();
                    status.control.failed(&e);
                    tracing::warn!(error = %e, pending = entries.len(), "cannot send decisions to the control plane; will retry");
                    // Another worker may reach the control plane: it delivers now.
                    if let Err(e) = self.state.release_log(&self.owner).await {
                        tracing::warn!(error = %e, "cannot give up the decision outbox's lease");
                    }
                    return false;
                }
                if let Some(e) = out.refusal {
                    self.metrics.control_errors.inc();
                    self.metrics.decisions_dropped.inc_by(out.refused as u64);
                    status.control.failed(&e);
                    tracing::error!(error = %e, dropped = out.refused, "control plane refused decisions; dropped");
                } else {
                    status.control.ok();
                }
            }
            match self.state.ack_log(&self.owner, &numbers, LEASE).await {
                Ok((mine, pending)) => {
                    self.metrics.decisions_pending.set(pending as i64);
                    // A lease that ran out meanwhile: the next holder delivers the rest.
                    if !mine {
                        return true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove delivered decisions from the outbox; will retry");
                    return false;
                }
            }
        }
    }

    /// Delivers as records are committed and as other workers' appear, backing off
    /// while the control plane or the state is away. Once `shutdown` fires (the worker
    /// triggers it when its last batch is committed), a delivery in progress is
    /// dropped, one last flush gets at most `final_flush`, and the lease is given up for
    /// the workers that stay.
    pub async fn run(
        self: Arc<Self>,
        client: ControlClient,
        status: Arc<Status>,
        shutdown: Shutdown,
        final_flush: Duration,
    ) {
        let mut backoff = Duration::from_millis(500);
        'deliver: loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
            loop {
                // A control plane that accepts and never answers would hold a request
                // for the client's whole timeout; shutdown does not wait for it. A
                // record sent but not yet removed is sent again, as after a crash.
                let delivered = tokio::select! {
                    biased;
                    _ = shutdown.wait() => break 'deliver,
                    done = self.flush(&client, &status, Some(&shutdown)) => done,
                };
                if delivered {
                    break;
                }
                if shutdown.sleep(backoff).await {
                    break 'deliver;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            backoff = Duration::from_millis(500);
        }
        if tokio::time::timeout(final_flush, self.flush(&client, &status, None))
            .await
            .is_err()
        {
            tracing::warn!(
                "decisions not sent to the control plane before shutdown; they stay in the outbox"
            );
        }
        if let Err(e) = self.state.release_log(&self.owner).await {
            tracing::warn!(error = %e, "cannot give up the decision outbox's lease");
        }
    }
}
