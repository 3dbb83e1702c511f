//! The worker's side of the control plane: fetching the active policies, sending
//! decisions to the durable log (through a bounded outbox, so enforcement never waits
//! for the control plane), and heartbeats.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use esper_common::Shutdown;
use esper_protocol::client::decode;
use esper_protocol::{
    ClientError, Decision, DecisionBatch, RevocationMark, RevokedDecisions, WorkerHeartbeat,
};
use parking_lot::Mutex;
use serde::de::{DeserializeOwned, IgnoredAny};
use tokio::sync::Notify;

use super::status::{Metrics, Status};
use crate::policy::ActivePolicies;

/// Decisions per `POST /api/v1/decisions`.
const SEND_BATCH: usize = 1000;

/// Client of the control plane's worker-facing endpoints.
#[derive(Clone, Debug)]
pub struct ControlClient {
    url: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ControlClient {
    /// `url` like `http://127.0.0.1:8080`; `token` is the control plane's bearer token.
    pub fn new(url: &str, token: Option<String>) -> ControlClient {
        let http = Self::builder()
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        ControlClient {
            url: url.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http,
        }
    }

    /// The worker's client: at most `max_idle` idle connections, trusting the CA
    /// certificates in PEM file `ca` when given.
    pub fn for_worker(
        url: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
        max_idle: usize,
    ) -> Result<ControlClient, String> {
        let builder = Self::builder().pool_max_idle_per_host(max_idle);
        let builder = match ca {
            Some(ca) => esper_protocol::trust_ca(builder, ca)?,
            None => builder,
        };
        let http = builder
            .build()
            .map_err(|e| format!("cannot build the control plane client: {e}"))?;
        Ok(ControlClient {
            http,
            ..ControlClient::new(url, token)
        })
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
    }

    async fn send<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let rb = esper_protocol::trace_context::traced(rb);
        let rb = match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        };
        let resp = rb.send().await.map_err(|source| ClientError::Transport {
            url: self.url.clone(),
            source,
        })?;
        decode(&self.url, resp).await
    }

    /// `GET /api/v1/policies/active`.
    pub async fn active_policies(&self) -> Result<ActivePolicies, ClientError> {
        self.send(
            self.http
                .get(format!("{}/api/v1/policies/active", self.url)),
        )
        .await
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
        self.send(
            self.http
                .get(format!("{}/api/v1/decisions/revocations", self.url))
                .query(&query),
        )
        .await
    }

    /// `POST /api/v1/decisions`.
    pub async fn record_decisions(&self, decisions: &[Decision]) -> Result<(), ClientError> {
        let body = DecisionBatch {
            decisions: decisions.to_vec(),
        };
        self.send::<IgnoredAny>(
            self.http
                .post(format!("{}/api/v1/decisions", self.url))
                .json(&body),
        )
        .await
        .map(|_| ())
    }

    /// `POST /api/v1/workers/heartbeat`.
    pub async fn heartbeat(&self, beat: &WorkerHeartbeat) -> Result<(), ClientError> {
        self.send::<IgnoredAny>(
            self.http
                .post(format!("{}/api/v1/workers/heartbeat", self.url))
                .json(beat),
        )
        .await
        .map(|_| ())
    }
}

/// Decisions on their way to the control plane's log: bounded, oldest dropped first.
pub(crate) struct Outbox {
    queue: Mutex<VecDeque<Decision>>,
    capacity: usize,
    notify: Notify,
    metrics: Metrics,
}

impl Outbox {
    pub fn new(capacity: usize, metrics: Metrics) -> Outbox {
        Outbox {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            notify: Notify::new(),
            metrics,
        }
    }

    /// Queues decisions; never waits.
    pub fn push(&self, decisions: Vec<Decision>) {
        if decisions.is_empty() {
            return;
        }
        let mut q = self.queue.lock();
        q.extend(decisions);
        self.trim(&mut q);
        drop(q);
        self.notify.notify_one();
    }

    fn trim(&self, q: &mut VecDeque<Decision>) {
        let over = q.len().saturating_sub(self.capacity);
        if over > 0 {
            q.drain(..over);
            self.metrics.decisions_dropped.inc_by(over as u64);
            tracing::warn!(
                dropped = over,
                "decision outbox is full; oldest decisions dropped from the log"
            );
        }
        self.metrics.decisions_pending.set(q.len() as i64);
    }

    fn take(&self) -> Vec<Decision> {
        let mut q = self.queue.lock();
        let n = q.len().min(SEND_BATCH);
        let out = q.drain(..n).collect();
        self.metrics.decisions_pending.set(q.len() as i64);
        out
    }

    /// Puts back a batch that could not be sent, ahead of newer decisions.
    fn requeue(&self, batch: Vec<Decision>) {
        let mut q = self.queue.lock();
        for d in batch.into_iter().rev() {
            q.push_front(d);
        }
        self.trim(&mut q);
    }

    pub fn len(&self) -> usize {
        self.queue.lock().len()
    }

    /// Sends what is queued; `false` when the control plane could not take it.
    async fn flush(&self, client: &ControlClient, status: &Status) -> bool {
        loop {
            let batch = self.take();
            if batch.is_empty() {
                return true;
            }
            match client.record_decisions(&batch).await {
                Ok(()) => status.control.ok(),
                Err(e) if e.is_transient() => {
                    self.metrics.control_errors.inc();
                    status.control.failed(&e);
                    tracing::warn!(error = %e, pending = batch.len(), "cannot send decisions to the control plane; will retry");
                    self.requeue(batch);
                    return false;
                }
                Err(e) => {
                    self.metrics.control_errors.inc();
                    self.metrics.decisions_dropped.inc_by(batch.len() as u64);
                    status.control.failed(&e);
                    tracing::error!(error = %e, dropped = batch.len(), "control plane refused decisions; dropped");
                }
            }
        }
    }

    /// Sends decisions as they come, backing off while the control plane is away.
    /// After shutdown, one last flush gets at most `final_flush`.
    pub async fn run(
        self: Arc<Self>,
        client: ControlClient,
        status: Arc<Status>,
        shutdown: Shutdown,
        final_flush: Duration,
    ) {
        let mut backoff = Duration::from_millis(500);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                _ = self.notify.notified() => {}
            }
            while !self.flush(&client, &status).await {
                if shutdown.sleep(backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            backoff = Duration::from_millis(500);
        }
        if self.len() > 0
            && tokio::time::timeout(final_flush, self.flush(&client, &status))
                .await
                .is_err()
        {
            tracing::warn!(
                pending = self.len(),
                "decisions not sent to the control plane before shutdown"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use esper_protocol::{Action, DecisionMode, Mitigation, Origin, Reason};
    use prometheus::Registry;

    use super::*;

    fn decision(n: u32) -> Decision {
        let m = Mitigation::new(
            format!("ip:10.0.0.{n}").parse().unwrap(),
            Action::Block,
            Duration::from_secs(60),
            Origin::Policy,
            Reason::default(),
        );
        Decision {
            id: m.id.clone(),
            decided_at: m.created_at,
            mitigation: m,
            mode: DecisionMode::Enforce,
            policy_id: None,
            policy_version: None,
            counted: None,
            threshold: None,
            window_secs: None,
            decided_by: "w".into(),
        }
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_and_counts() {
        let metrics = Metrics::new(&Registry::new());
        let outbox = Outbox::new(3, metrics.clone());
        outbox.push((1..=4).map(decision).collect());
        assert_eq!(outbox.len(), 3);
        assert_eq!(metrics.decisions_dropped.get(), 1);
        let batch = outbox.take();
        assert_eq!(batch[0].mitigation.entity.to_string(), "ip:10.0.0.2");
        outbox.push(vec![decision(5), decision(6)]);
        // A batch that could not be sent goes back ahead of newer ones, within the bound.
        outbox.requeue(batch);
        assert_eq!(metrics.decisions_dropped.get(), 3);
        let kept: Vec<String> = outbox
            .take()
            .iter()
            .map(|d| d.mitigation.entity.to_string())
            .collect();
        assert_eq!(kept, ["ip:10.0.0.4", "ip:10.0.0.5", "ip:10.0.0.6"]);
        assert_eq!(metrics.decisions_pending.get(), 0);
    }
}
