//! `PERSISTENCE_ENABLED`: the broker's durable copy in the control plane's decision log.
//!
//! Every publish, revoke and clear is queued in a bounded outbox, in order, and a
//! background task delivers it, retrying with backoff while the control plane is down.
//! What a full outbox does is the operator's choice ([`WhenFull`]): refuse the write
//! with 503 so publishers retry (nothing lost), or drop the oldest entries (counted).
//! A broker that starts on an empty store restores the mitigations still in force from
//! the log, retrying until the control plane answers.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use esper_common::health::ComponentHealth;
use esper_common::shutdown::Shutdown;
use esper_protocol::{
    ClientError, Decision, DecisionLogClient, DecisionMode, DecisionRevoke, EntityKey, Mitigation,
    Origin, PageMark,
};
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedRwLockReadGuard, RwLock};

use crate::config::{Config, WhenFull};
use crate::metrics::Metrics;
use crate::store::MitigationStore;

/// `decided_by` / `revoked_by` of what this broker logs (the control plane lets a
/// worker's own record of the same decision replace it).
pub const LOGGED_BY: &str = "mitigation-broker";
/// Most decisions in one delivery.
const SEND_BATCH: usize = 500;
/// Decisions per page when restoring.
const RESTORE_PAGE: usize = 1000;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long shutdown waits for the outbox to drain.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// One write waiting for the decision log.
#[derive(Clone, Debug, PartialEq)]
enum Entry {
    Record(Box<Decision>),
    Revoke(DecisionRevoke),
}

/// What one delivery sends: a run of decisions, or one revocation.
enum Delivery {
    Records(Vec<Decision>),
    Revoke(DecisionRevoke),
}

/// The outbox would overflow and the policy is [`WhenFull::Reject`].
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// Where restoring stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restore {
    /// The store held mitigations at start-up: nothing to restore.
    NotNeeded,
    Pending,
    Done(usize),
}

/// What the API changed while a restore was pending. The log may not know it yet when
/// a page is read (the outbox is flushed before the restore begins, not during it), so
/// the restore must not bring back what was revoked meanwhile, nor overwrite what was
/// published meanwhile with the log's older copy.
#[derive(Default)]
struct Touched {
    ids: HashSet<String>,
    entities: HashSet<EntityKey>,
    cleared: bool,
}

impl Touched {
    fn allows(&self, m: &Mitigation) -> bool {
        !self.cleared && !self.ids.contains(&m.id) && !self.entities.contains(&m.entity)
    }
}

struct State {
    queue: VecDeque<Entry>,
    restore: Restore,
    /// Writes made while the restore is pending.
    touched: Touched,
    /// The last delivery or restore error, cleared by the next success.
    last_error: Option<String>,
}

/// Held by an API write from before its store change until it is queued: a restore
/// publishes a page only while no such write is between the two.
pub struct WritePermit {
    _held: OwnedRwLockReadGuard<()>,
}

/// The outbox and its delivery state, shared by the API and the delivery task.
pub struct Persistence {
    state: Mutex<State>,
    /// API writes share it; a restore page takes it alone (see [`Touched`]).
    writes: Arc<RwLock<()>>,
    capacity: usize,
    when_full: WhenFull,
    notify: Notify,
    metrics: Metrics,
    client: DecisionLogClient,
}

impl Persistence {
    /// An empty outbox for `config` (persistence enabled).
    pub fn new(config: &Config, metrics: Metrics) -> Persistence {
        Persistence {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                restore: Restore::NotNeeded,
                touched: Touched::default(),
                last_error: None,
            }),
            writes: Arc::new(RwLock::new(())),
            capacity: config.persistence_outbox.max(1),
            when_full: config.persistence_when_full,
            notify: Notify::new(),
            metrics,
            client: DecisionLogClient::new(&config.control_url, config.control_token.clone()),
        }
    }

    /// Refuses a write of `n` entries up front when the outbox cannot take them and the
    /// policy is to reject (so the store is not changed for a write the log would miss).
    /// Concurrent writes may push the outbox past its capacity by what they carry. The
    /// permit is held until the write is queued.
    pub async fn admit(&self, n: usize) -> Result<WritePermit, Full> {
        if self.when_full == WhenFull::Reject
            && self.state.lock().queue.len().saturating_add(n) > self.capacity
        {
            self.metrics.persistence_rejected.inc();
            return Err(Full);
        }
        Ok(WritePermit {
            _held: self.writes.clone().read_owned().await,
        })
    }

    /// Queues the decisions of published mitigations (expired ones are left out).
    pub fn published(&self, mitigations: &[Mitigation]) {
        self.touch(|t| t.ids.extend(mitigations.iter().map(|m| m.id.clone())));
        let now = Utc::now();
        let entries = mitigations
            .iter()
            .filter(|m| m.expires_at > now)
            .map(|m| Entry::Record(Box::new(decision_of(m))));
        self.push(entries);
    }

    /// Queues a revocation by id or entity.
    pub fn revoked(&self, id: Option<&str>, entity: Option<&EntityKey>) {
        self.touch(|t| {
            t.ids.extend(id.map(str::to_string));
            t.entities.extend(entity.cloned());
        });
        self.push(std::iter::once(Entry::Revoke(DecisionRevoke {
            id: id.map(str::to_string),
            entity: entity.cloned(),
            all: false,
            revoked_at: Utc::now(),
            revoked_by: LOGGED_BY.into(),
        })));
    }

    /// Queues a clear: every decision in force is revoked.
    pub fn cleared(&self) {
        self.touch(|t| t.cleared = true);
        self.push(std::iter::once(Entry::Revoke(DecisionRevoke {
            all: true,
            revoked_at: Utc::now(),
            revoked_by: LOGGED_BY.into(),
            ..DecisionRevoke::default()
        })));
    }

    /// Notes a write for a pending restore (nothing once it is done). The notes are
    /// bounded by the outbox's capacity: past it (a control plane down for long while
    /// the broker keeps taking writes) the rest of the restore is given up, as after a
    /// clear, rather than risk bringing back something revoked meanwhile; the engine
    /// publishes again what is still going on.
    fn touch(&self, note: impl FnOnce(&mut Touched)) {
        let mut st = self.state.lock();
        if st.restore != Restore::Pending || st.touched.cleared {
            return;
        }
        note(&mut st.touched);
        let noted = st.touched.ids.len() + st.touched.entities.len();
        if noted > self.capacity {
            st.touched = Touched {
                cleared: true,
                ..Touched::default()
            };
            tracing::warn!(
                noted,
                limit = self.capacity,
                "more writes during the pending restore than persistence_outbox; \
                 the rest of the restore is given up"
            );
        }
    }

    fn push(&self, entries: impl Iterator<Item = Entry>) {
        let mut st = self.state.lock();
        let before = st.queue.len();
        st.queue.extend(entries);
        if st.queue.len() == before {
            return;
        }
        if self.when_full == WhenFull::DropOldest {
            let over = st.queue.len().saturating_sub(self.capacity);
            if over > 0 {
                st.queue.drain(..over);
                self.metrics
                    .persistence_dropped
                    .with_label_values(&["full"])
                    .inc_by(over as u64);
                tracing::warn!(
                    dropped = over,
                    "persistence outbox full; oldest entries dropped from the durable copy"
                );
            }
        }
        self.metrics.persistence_pending.set(st.queue.len() as i64);
        drop(st);
        self.notify.notify_one();
    }

    /// Entries waiting for the control plane.
    pub fn pending(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// The health component `decision_log` (never required: the broker serves without).
    pub fn health(&self) -> ComponentHealth {
        let st = self.state.lock();
        let restore = match st.restore {
            Restore::NotNeeded => "nothing to restore".to_string(),
            Restore::Pending => "restore pending".to_string(),
            Restore::Done(n) => format!("{n} mitigations restored"),
        };
        let mut detail = format!(
            "{} entries waiting for {}; {restore}",
            st.queue.len(),
            self.client.url()
        );
        if let Some(e) = &st.last_error {
            detail.push_str("; last error: ");
            detail.push_str(e);
        }
        let healthy = st.last_error.is_none() && st.restore != Restore::Pending;
        ComponentHealth::new("decision_log", healthy, false, detail)
    }

    /// Takes the next delivery: a run of decisions, or one revocation.
    fn take(&self) -> Option<Delivery> {
        let mut st = self.state.lock();
        if let Entry::Revoke(_) = st.queue.front()? {
            return match st.queue.pop_front() {
                Some(Entry::Revoke(r)) => Some(Delivery::Revoke(r)),
                _ => None,
            };
        }
        let mut run = Vec::new();
        while run.len() < SEND_BATCH && matches!(st.queue.front(), Some(Entry::Record(_))) {
            if let Some(Entry::Record(d)) = st.queue.pop_front() {
                run.push(*d);
            }
        }
        Some(Delivery::Records(run))
    }

    fn failed(&self, what: &str, e: &ClientError) {
        self.metrics.persistence_errors.inc();
        let mut st = self.state.lock();
        if st.last_error.is_none() {
            tracing::warn!(error = %e, pending = st.queue.len(), "{what}; will retry");
        }
        st.last_error = Some(e.to_string());
    }

    fn succeeded(&self) {
        let mut st = self.state.lock();
        if st.last_error.take().is_some() {
            tracing::info!(pending = st.queue.len(), "decision log reachable again");
        }
    }

    /// Delivers one entry (a batch of decisions counts as its decisions); `false` when
    /// the control plane is unavailable (the entry is back at the front).
    async fn deliver(&self, entry: Delivery) -> bool {
        let (result, n) = match &entry {
            Delivery::Records(decisions) => {
                (self.client.record(decisions.clone()).await, decisions.len())
            }
            Delivery::Revoke(r) => (self.client.revoke(r).await.map(|_| ()), 1),
        };
        match result {
            Ok(()) => {
                self.metrics.persistence_sent.inc_by(n as u64);
                self.succeeded();
                true
            }
            Err(e) if e.is_transient() => {
                self.failed("cannot reach the decision log", &e);
                self.requeue(entry);
                false
            }
            Err(e) => {
                self.metrics
                    .persistence_dropped
                    .with_label_values(&["refused"])
                    .inc_by(n as u64);
                tracing::error!(error = %e, dropped = n, "the control plane refused a write to the decision log; dropped");
                true
            }
        }
    }

    /// Puts an undelivered entry back at the front, ahead of newer ones (a requeued
    /// entry is never dropped for being over capacity: it was admitted already).
    fn requeue(&self, entry: Delivery) {
        let mut st = self.state.lock();
        match entry {
            Delivery::Records(run) => {
                for d in run.into_iter().rev() {
                    st.queue.push_front(Entry::Record(Box::new(d)));
                }
            }
            Delivery::Revoke(r) => st.queue.push_front(Entry::Revoke(r)),
        }
        self.metrics.persistence_pending.set(st.queue.len() as i64);
    }

    /// Sends everything queued; `false` when the control plane is unavailable.
    async fn flush(&self) -> bool {
        while let Some(entry) = self.take() {
            let ok = self.deliver(entry).await;
            self.metrics.persistence_pending.set(self.pending() as i64);
            if !ok {
                return false;
            }
        }
        true
    }

    /// Publishes again every decision still in force in the log; returns how many.
    async fn restore(
        &self,
        store: &dyn MitigationStore,
        cache_ttl: Duration,
    ) -> Result<usize, String> {
        let mut mark: Option<PageMark> = None;
        let mut restored = 0;
        loop {
            let page = self
                .client
                .active_page(mark.as_ref(), RESTORE_PAGE)
                .await
                .map_err(|e| e.to_string())?;
            let last = page.last().map(PageMark::after);
            let full = page.len() >= RESTORE_PAGE;
            let now = Utc::now();
            // No API write between its store change and its note while this page is
            // filtered and published.
            let _alone = self.writes.write().await;
            let mitigations: Vec<Mitigation> = {
                let st = self.state.lock();
                if st.touched.cleared {
                    // Cleared meanwhile: what is left to restore was cleared too.
                    return Ok(restored);
                }
                page.into_iter()
                    .filter(|d| d.mode == DecisionMode::Enforce)
                    .map(|d| cap_from_creation(d.mitigation, cache_ttl))
                    .filter(|m| m.expires_at > now && st.touched.allows(m))
                    .collect()
            };
            restored += store
                .publish(mitigations)
                .await
                .map_err(|e| e.to_string())?
                .accepted;
            if !full {
                return Ok(restored);
            }
            mark = last;
        }
    }
}

/// The log entry of a published mitigation, as this broker knows it.
fn decision_of(m: &Mitigation) -> Decision {
    Decision {
        id: m.id.clone(),
        mitigation: m.clone(),
        mode: DecisionMode::Enforce,
        policy_id: m.reason.policy_id.clone(),
        policy_version: None,
        counted: None,
        threshold: None,
        window_secs: None,
        decided_by: LOGGED_BY.into(),
        decided_at: m.created_at,
    }
}

/// A restored policy decision keeps the `cache_ttl` cap it had when first published
/// (counted from its creation, not from the restart).
fn cap_from_creation(mut m: Mitigation, cache_ttl: Duration) -> Mitigation {
    if m.origin == Origin::Policy && !cache_ttl.is_zero() {
        let ttl = chrono::Duration::from_std(cache_ttl).unwrap_or(chrono::Duration::MAX);
        if let Some(cap) = m.created_at.checked_add_signed(ttl) {
            m.expires_at = m.expires_at.min(cap);
        }
    }
    m
}

/// Restores (when `restore_needed`) and then delivers the outbox until `shutdown`;
/// on shutdown, one bounded last flush.
pub async fn run(
    p: Arc<Persistence>,
    store: Arc<dyn MitigationStore>,
    cache_ttl: Duration,
    restore_needed: bool,
    shutdown: Shutdown,
) {
    if restore_needed {
        p.state.lock().restore = Restore::Pending;
    }
    let mut backoff = MIN_BACKOFF;
    loop {
        // The outbox goes first, so revocations made since start-up are in the log
        // before the log is read back.
        let mut ok = p.flush().await;
        if ok && p.state.lock().restore == Restore::Pending {
            match p.restore(&*store, cache_ttl).await {
                Ok(n) => {
                    p.metrics.persistence_restored.inc_by(n as u64);
                    let mut st = p.state.lock();
                    st.restore = Restore::Done(n);
                    st.touched = Touched::default();
                    drop(st);
                    p.succeeded();
                    tracing::info!(
                        restored = n,
                        "mitigations in force restored from the decision log"
                    );
                }
                Err(e) => {
                    ok = false;
                    p.metrics.persistence_errors.inc();
                    let mut st = p.state.lock();
                    if st.last_error.is_none() {
                        tracing::warn!(error = %e, "cannot restore from the decision log yet; will retry");
                    }
                    st.last_error = Some(e);
                }
            }
        }
        if ok {
            backoff = MIN_BACKOFF;
            tokio::select! {
                _ = p.notify.notified() => {}
                _ = shutdown.wait() => break,
            }
        } else {
            if shutdown.sleep(backoff).await {
                break;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    match tokio::time::timeout(FINAL_FLUSH, p.flush()).await {
        Ok(true) => {}
        _ => {
            let left = p.pending();
            if left > 0 {
                tracing::error!(
                    lost = left,
                    "decision log unreachable at shutdown; these writes are not in the durable copy"
                );
            }
        }
    }
}

/// Was the store empty at start-up (so the log's copy should be restored)?
pub async fn store_is_empty(store: &dyn MitigationStore) -> Result<bool, crate::StoreError> {
    Ok(store.counts().await?.values().all(|n| *n == 0))
}

#[cfg(test)]
mod tests {
    use esper_protocol::{Action, Reason};

    use super::*;

    fn mitigation(ip: &str) -> Mitigation {
        Mitigation::new(
            format!("ip:{ip}").parse().unwrap(),
            Action::Block,
            Duration::from_secs(600),
            Origin::Policy,
            Reason::default(),
        )
    }

    fn outbox(capacity: usize, when_full: WhenFull) -> Persistence {
        let config = Config {
            persistence_enabled: true,
            persistence_outbox: capacity,
            persistence_when_full: when_full,
            ..Config::default()
        };
        Persistence::new(&config, Metrics::new().unwrap())
    }

    #[test]
    fn writes_during_a_pending_restore_are_remembered_and_kept_from_it() {
        let p = outbox(100, WhenFull::Reject);
        let (a, b, c) = (
            mitigation("192.0.2.1"),
            mitigation("192.0.2.2"),
            mitigation("192.0.2.3"),
        );
        // Nothing is noted while no restore is pending.
        p.revoked(Some(&a.id), None);
        assert!(p.state.lock().touched.allows(&a));
        p.state.lock().restore = Restore::Pending;
        p.revoked(Some(&a.id), None);
        p.revoked(None, Some(&b.entity));
        {
            let st = p.state.lock();
            assert!(!st.touched.allows(&a) && !st.touched.allows(&b));
            assert!(st.touched.allows(&c));
        }
        p.published(std::slice::from_ref(&c));
        assert!(!p.state.lock().touched.allows(&c));
        p.cleared();
        assert!(p.state.lock().touched.cleared);
    }

    #[test]
    fn the_notes_of_a_pending_restore_are_bounded_by_the_outbox() {
        let p = outbox(3, WhenFull::DropOldest);
        p.state.lock().restore = Restore::Pending;
        let ms: Vec<_> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .map(|ip| mitigation(ip))
            .collect();
        p.published(&ms);
        {
            let st = p.state.lock();
            assert!(!st.touched.cleared);
            assert_eq!(st.touched.ids.len(), 3);
        }
        // One more than the outbox holds: the restore is given up and the notes freed.
        p.revoked(None, Some(&mitigation("192.0.2.4").entity));
        let st = p.state.lock();
        assert!(st.touched.cleared);
        assert!(st.touched.ids.is_empty() && st.touched.entities.is_empty());
        assert!(!st.touched.allows(&mitigation("192.0.2.9")));
    }

    #[tokio::test]
    async fn reject_refuses_what_does_not_fit_and_counts_it() {
        let p = outbox(3, WhenFull::Reject);
        assert!(p.admit(3).await.is_ok());
        p.published(&[mitigation("192.0.2.1"), mitigation("192.0.2.2")]);
        assert!(p.admit(1).await.is_ok());
        assert!(matches!(p.admit(2).await, Err(Full)));
        assert_eq!(p.metrics.persistence_rejected.get(), 1);
        assert_eq!(p.metrics.persistence_pending.get(), 2);
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest_and_counts_the_rest() {
        let p = outbox(2, WhenFull::DropOldest);
        assert!(p.admit(10).await.is_ok());
        let ms: Vec<_> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .map(|ip| mitigation(ip))
            .collect();
        p.published(&ms);
        p.cleared();
        assert_eq!(p.pending(), 2);
        let dropped = p.metrics.persistence_dropped.with_label_values(&["full"]);
        assert_eq!(dropped.get(), 2);
        match p.take() {
            Some(Delivery::Records(run)) => assert_eq!(run[0].id, ms[2].id),
            _ => panic!("expected the newest decision first"),
        }
        assert!(matches!(p.take(), Some(Delivery::Revoke(r)) if r.all));
    }

    #[test]
    fn deliveries_keep_order_and_a_failed_one_goes_back_in_front() {
        let p = outbox(100, WhenFull::Reject);
        let (a, b, c) = (
            mitigation("192.0.2.1"),
            mitigation("192.0.2.2"),
            mitigation("192.0.2.3"),
        );
        let mut expired = mitigation("192.0.2.9");
        expired.expires_at = Utc::now() - chrono::Duration::seconds(1);
        p.published(&[a.clone(), b.clone(), expired]);
        p.revoked(Some(&a.id), None);
        p.published(std::slice::from_ref(&c));
        assert_eq!(p.pending(), 4, "expired mitigations are not logged");

        let first = p.take().unwrap();
        let Delivery::Records(run) = &first else {
            panic!("decisions first")
        };
        let ids: Vec<_> = run.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, [a.id.as_str(), b.id.as_str()]);
        assert_eq!(run[0].decided_by, LOGGED_BY);
        assert_eq!(run[0].decided_at, a.created_at);
        p.requeue(first);
        assert_eq!(p.pending(), 4);
        assert!(matches!(p.take(), Some(Delivery::Records(r)) if r.len() == 2));
        assert!(
            matches!(p.take(), Some(Delivery::Revoke(r)) if r.id.as_deref() == Some(a.id.as_str()))
        );
        assert!(matches!(p.take(), Some(Delivery::Records(r)) if r[0].id == c.id));
        assert!(p.take().is_none());
    }

    #[test]
    fn restored_policy_decisions_keep_their_cap_from_creation() {
        let mut m = mitigation("192.0.2.1");
        m.created_at = Utc::now() - chrono::Duration::seconds(100);
        m.expires_at = m.created_at + chrono::Duration::seconds(3600);
        let capped = cap_from_creation(m.clone(), Duration::from_secs(60));
        assert_eq!(
            capped.expires_at,
            m.created_at + chrono::Duration::seconds(60)
        );
        m.origin = Origin::Manual;
        assert_eq!(cap_from_creation(m.clone(), Duration::from_secs(60)), m);
    }
}
