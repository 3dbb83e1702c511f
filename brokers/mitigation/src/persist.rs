//! `PERSISTENCE_ENABLED`: the broker's durable copy in the control plane's decision log.
//!
//! Every publish, revoke and clear is queued in a bounded outbox, in order, and a
//! background task delivers it, retrying with backoff while the control plane is down.
//! Over a Redis store the outbox is a list in Redis, appended in the same script as the
//! write it records ([`Journal`]): it survives a broker crash or restart, and one broker
//! instance at a time (the holder of a lease in Redis) delivers it for all of them. Over
//! the memory store it is in memory, like the store. What a full outbox does is the
//! operator's choice ([`WhenFull`]): refuse the write with 503 so publishers retry
//! (nothing lost), or drop the oldest entries (counted). A broker that starts on an
//! empty store restores the mitigations still in force from the log, retrying until the
//! control plane answers.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use esper_common::health::ComponentHealth;
use esper_common::shutdown::Shutdown;
use esper_protocol::{
    ClientError, Decision, DecisionLogClient, DecisionMode, DecisionRevoke, EntityKey, Mitigation,
    Origin, PageMark, Recorded, record_in_halves,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedRwLockReadGuard, RwLock};

use crate::config::{Config, WhenFull};
use crate::metrics::Metrics;
use crate::store::{
    Claim, Cursor, Journal, LogAppend, Logged, MitigationStore, RestorePage, StoreError, Write,
    apply,
};

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
/// How long a delivery lease on a shared outbox lasts unless renewed: how soon another
/// instance takes over from one that died. Renewed at every delivery, it outlasts one
/// call to the control plane (10 s at most) with room to spare, so a holder never sends
/// after another has taken over.
const LEASE: Duration = Duration::from_secs(30);
/// How long a restore's mark in a shared store stands unless renewed (at every attempt
/// and page): long enough to outlast flushing the outbox before the first page.
const RESTORE_MARK: Duration = Duration::from_secs(300);
/// How often an instance over a shared store looks for a restore another instance left
/// half-way.
const ORPHAN_CHECK: Duration = Duration::from_secs(10);
/// How often an instance looks at a shared outbox that other instances also append to.
const SHARED_POLL: Duration = Duration::from_secs(1);

/// One write waiting for the decision log (as stored in a shared outbox, JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry {
    Record(Box<Decision>),
    Revoke(DecisionRevoke),
}

/// What one delivery sends: a run of decisions, or one revocation.
enum Delivery {
    Records(Vec<Decision>),
    Revoke(DecisionRevoke),
}

/// How one delivery went.
enum Sent {
    /// In the log, or refused for good (counted): either way done with.
    Done,
    /// The control plane is unavailable: try again later.
    Retry,
}

/// How far a flush got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flushed {
    /// The outbox is empty.
    Drained,
    /// Another instance delivers the shared outbox; this many entries wait in it.
    Standby(usize),
    /// The control plane (or the store holding the outbox) is unavailable.
    Failed,
}

/// The outbox would overflow and the policy is [`WhenFull::Reject`].
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// Why a write through [`Persistence::write`] did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the durable copy's outbox is full")]
    Full,
    #[error(transparent)]
    Store(#[from] StoreError),
}

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
    /// The outbox when the store keeps none.
    queue: VecDeque<Entry>,
    /// The store's outbox: its length when last seen, and who delivers it when that is
    /// another instance.
    shared_pending: usize,
    delivered_by: Option<String>,
    restore: Restore,
    /// Writes made while the restore is pending.
    touched: Touched,
    /// The last delivery error, cleared by the next success (or once another instance
    /// delivers).
    last_error: Option<String>,
    /// The last restore error, cleared when the restore is done.
    restore_error: Option<String>,
}

/// Held by an API write from before its store change until it is queued: a restore
/// publishes a page only while no such write is between the two.
pub struct WritePermit {
    _held: OwnedRwLockReadGuard<()>,
}

/// The outbox and its delivery state, shared by the API and the delivery task.
pub struct Persistence {
    state: Mutex<State>,
    /// The store's own outbox (Redis); `None` keeps it in `state.queue`.
    journal: Option<Arc<dyn Journal>>,
    /// This instance's name on the shared outbox's lease.
    owner: String,
    /// API writes share it; a restore page takes it alone (see [`Touched`]).
    writes: Arc<RwLock<()>>,
    capacity: usize,
    when_full: WhenFull,
    notify: Notify,
    /// A follower found a restore due in the shared store: look for it at once rather
    /// than at the next periodic check.
    look_now: std::sync::atomic::AtomicBool,
    metrics: Metrics,
    client: DecisionLogClient,
}

impl Persistence {
    /// An empty outbox for `config` (persistence enabled), kept in `journal` when the
    /// store offers one.
    pub fn new(
        config: &Config,
        metrics: Metrics,
        journal: Option<Arc<dyn Journal>>,
    ) -> Persistence {
        Persistence {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                shared_pending: 0,
                delivered_by: None,
                restore: Restore::NotNeeded,
                touched: Touched::default(),
                last_error: None,
                restore_error: None,
            }),
            journal,
            // Unique even if two instances were given one NODE_ID by mistake.
            owner: format!(
                "{}-{}",
                config
                    .node_id
                    .clone()
                    .unwrap_or_else(|| std::process::id().to_string()),
                Cursor::new_generation()
            ),
            writes: Arc::new(RwLock::new(())),
            capacity: config.persistence_outbox.max(1),
            when_full: config.persistence_when_full,
            notify: Notify::new(),
            look_now: std::sync::atomic::AtomicBool::new(false),
            metrics,
            client: DecisionLogClient::new(&config.control_url, config.control_token.clone()),
        }
    }

    /// The token sent to the control plane; a reload replaces it.
    /// Whether a snapshot served now may lack mitigations in force: a restore from the
    /// decision log is pending here, or due in the shared store (its data was lost;
    /// this instance or another restores it).
    pub async fn restoring(&self) -> bool {
        {
            let st = self.state.lock();
            // Cleared meanwhile: what is left to restore was cleared too, and the
            // snapshot after a clear is whole.
            if st.touched.cleared {
                return false;
            }
            if st.restore == Restore::Pending {
                return true;
            }
        }
        let Some(journal) = &self.journal else {
            return false;
        };
        match journal.restore_due().await {
            Ok(due) => {
                if due {
                    self.look_now
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    self.notify.notify_one();
                }
                due
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot tell whether a restore is due");
                false
            }
        }
    }

    pub fn control_token(&self) -> &esper_protocol::Token {
        self.client.token()
    }

    /// The control plane the records go to; a reload replaces it.
    pub fn control_endpoints(&self) -> &esper_protocol::Endpoints {
        self.client.endpoints()
    }

    /// Refuses a write of `n` entries up front when an outbox in memory cannot take them
    /// and the policy is to reject (so the store is not changed for a write the log would
    /// miss; the store's own outbox checks in the write itself). Concurrent writes may
    /// push a memory outbox past its capacity by what they carry. The permit is held
    /// until the write is queued.
    pub async fn admit(&self, n: usize) -> Result<WritePermit, Full> {
        if self.journal.is_none()
            && self.when_full == WhenFull::Reject
            && self.state.lock().queue.len().saturating_add(n) > self.capacity
        {
            self.metrics.persistence_rejected.inc();
            return Err(Full);
        }
        Ok(WritePermit {
            _held: self.writes.clone().read_owned().await,
        })
    }

    /// Applies `write` to `store` and queues its entries for the log: in the same step
    /// when the store keeps the outbox, else right after. Returns what the write changed
    /// and, for a publish, the stream position after it.
    pub async fn write(
        &self,
        store: &dyn MitigationStore,
        write: Write<'_>,
    ) -> Result<(usize, Option<String>), WriteError> {
        let Some(journal) = &self.journal else {
            let outcome = apply(store, write).await?;
            self.queue(write);
            return Ok(outcome);
        };
        let mut entries = Vec::new();
        for entry in entries_of(write) {
            entries.push(serde_json::to_string(&entry).map_err(|e| {
                StoreError::Unavailable(format!("cannot encode an outbox entry: {e}"))
            })?);
        }
        let log = LogAppend {
            entries,
            capacity: self.capacity,
            drop_oldest: self.when_full == WhenFull::DropOldest,
        };
        // Noted first: a write whose answer is lost (a Redis timeout) may have happened,
        // and a note only keeps a restore away from what it names.
        self.note(write);
        match journal.write(write, &log).await? {
            Logged::Full => {
                self.metrics.persistence_rejected.inc();
                Err(WriteError::Full)
            }
            Logged::Done {
                changed,
                cursor,
                dropped,
                pending,
            } => {
                if dropped > 0 {
                    self.dropped_for_room(dropped);
                }
                self.seen_shared(pending);
                self.notify.notify_one();
                Ok((changed, cursor))
            }
        }
    }

    /// Notes and queues in memory what `write` logs.
    fn queue(&self, write: Write<'_>) {
        self.note(write);
        self.push(entries_of(write));
    }

    /// Notes a write for a pending restore (nothing once it is done). The notes are
    /// bounded by the outbox's capacity: past it (a control plane down for long while
    /// the broker keeps taking writes) the rest of the restore is given up, as after a
    /// clear, rather than risk bringing back something revoked meanwhile; the engine
    /// publishes again what is still going on.
    fn note(&self, write: Write<'_>) {
        let mut st = self.state.lock();
        if st.restore != Restore::Pending || st.touched.cleared {
            return;
        }
        let t = &mut st.touched;
        match write {
            Write::Publish(ms) => t.ids.extend(ms.iter().map(|m| m.id.clone())),
            Write::RevokeId(id) => {
                t.ids.insert(id.to_string());
            }
            Write::RevokeEntity(entity) => {
                t.entities.insert(entity.clone());
            }
            Write::Clear => t.cleared = true,
        }
        let noted = t.ids.len() + t.entities.len();
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

    fn push(&self, entries: impl IntoIterator<Item = Entry>) {
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
                self.dropped_for_room(over);
            }
        }
        self.metrics.persistence_pending.set(st.queue.len() as i64);
        drop(st);
        self.notify.notify_one();
    }

    fn dropped_for_room(&self, n: usize) {
        self.metrics
            .persistence_dropped
            .with_label_values(&["full"])
            .inc_by(n as u64);
        tracing::warn!(
            dropped = n,
            "persistence outbox full; oldest entries dropped from the durable copy"
        );
    }

    /// What the store's outbox held when last seen.
    fn seen_shared(&self, pending: usize) {
        self.state.lock().shared_pending = pending;
        self.metrics.persistence_pending.set(pending as i64);
    }

    /// Entries waiting for the control plane (in a shared outbox: written through any
    /// instance, as last seen).
    pub fn pending(&self) -> usize {
        let st = self.state.lock();
        match self.journal {
            Some(_) => st.shared_pending,
            None => st.queue.len(),
        }
    }

    /// The health component `decision_log` (never required: the broker serves without).
    pub fn health(&self) -> ComponentHealth {
        let pending = self.pending();
        let st = self.state.lock();
        let restore = match st.restore {
            Restore::NotNeeded => "nothing to restore".to_string(),
            Restore::Pending => "restore pending".to_string(),
            Restore::Done(n) => format!("{n} mitigations restored"),
        };
        let kept = match (&self.journal, &st.delivered_by) {
            (None, _) => String::new(),
            (Some(_), None) => format!(" in the store's outbox (delivered by {})", self.owner),
            (Some(_), Some(by)) => {
                format!(" in the store's outbox (delivered by another instance, {by})")
            }
        };
        let mut detail = format!(
            "{pending} entries waiting{kept} for {}; {restore}",
            self.client.url()
        );
        let full = pending >= self.capacity;
        if full {
            detail.push_str("; the outbox is full");
        }
        for e in [&st.last_error, &st.restore_error].into_iter().flatten() {
            detail.push_str("; last error: ");
            detail.push_str(e);
        }
        let healthy = st.last_error.is_none()
            && st.restore_error.is_none()
            && st.restore != Restore::Pending
            && !full;
        ComponentHealth::new("decision_log", healthy, false, detail)
    }

    /// Takes the next delivery from the memory outbox: a run of decisions, or one
    /// revocation.
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

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        self.metrics.persistence_errors.inc();
        let pending = self.pending();
        let mut st = self.state.lock();
        if st.last_error.is_none() {
            tracing::warn!(error = %e, pending, "{what}; will retry");
        }
        st.last_error = Some(e.to_string());
    }

    fn succeeded(&self) {
        let pending = self.pending();
        let mut st = self.state.lock();
        if st.last_error.take().is_some() {
            tracing::info!(pending, "durable copy delivering again");
        }
    }

    /// Sends one delivery (a batch of decisions counts as its decisions).
    async fn send(&self, delivery: &Delivery) -> Sent {
        let out = match delivery {
            Delivery::Records(decisions) => {
                record_in_halves(decisions, |part| self.client.record(part)).await
            }
            Delivery::Revoke(r) => match self.client.revoke(r).await {
                Ok(_) => Recorded {
                    logged: 1,
                    ..Recorded::default()
                },
                Err(e) if e.is_transient() || e.is_setup_refusal() => Recorded {
                    stopped: Some(e),
                    ..Recorded::default()
                },
                Err(e) => Recorded {
                    refused: 1,
                    refusal: Some(e),
                    ..Recorded::default()
                },
            },
        };
        if let Some(e) = &out.refusal {
            self.refused(out.refused, e);
        }
        match out.stopped {
            // Refused for this broker's own setup (its token, its URL), not for what it
            // sends: kept for when that is fixed, or for an instance set up right.
            Some(e) => {
                self.failed("cannot deliver to the decision log", &e);
                Sent::Retry
            }
            None => {
                self.metrics.persistence_sent.inc_by(out.logged as u64);
                if out.logged > 0 {
                    self.succeeded();
                }
                Sent::Done
            }
        }
    }

    fn refused(&self, n: usize, e: &ClientError) {
        self.metrics
            .persistence_dropped
            .with_label_values(&["refused"])
            .inc_by(n as u64);
        tracing::error!(error = %e, dropped = n, "the control plane refused a write to the decision log; dropped");
    }

    /// Puts an undelivered entry back at the front of the memory outbox, ahead of newer
    /// ones (a requeued entry is never dropped for being over capacity: it was admitted
    /// already).
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

    /// Sends everything queued, or stands by while another instance does.
    async fn flush(&self) -> Flushed {
        match &self.journal {
            Some(journal) => self.flush_shared(&**journal).await,
            None => self.flush_memory().await,
        }
    }

    async fn flush_memory(&self) -> Flushed {
        while let Some(delivery) = self.take() {
            let sent = self.send(&delivery).await;
            if let Sent::Retry = sent {
                self.requeue(delivery);
                return Flushed::Failed;
            }
            self.metrics.persistence_pending.set(self.pending() as i64);
        }
        Flushed::Drained
    }

    /// Delivers the store's outbox while this instance holds its lease, removing each
    /// delivery's entries once the log has them (a crash in between sends them again,
    /// which the log takes as the same decisions and revocations).
    async fn flush_shared(&self, journal: &dyn Journal) -> Flushed {
        loop {
            let entries = match journal.claim(&self.owner, LEASE, SEND_BATCH).await {
                Ok(Claim::Held { by, pending }) => {
                    self.seen_shared(pending);
                    let mut st = self.state.lock();
                    st.delivered_by = Some(by);
                    // Another instance's deliveries are its own to report.
                    st.last_error = None;
                    return Flushed::Standby(pending);
                }
                Ok(Claim::Mine { pending, entries }) => {
                    self.seen_shared(pending);
                    self.state.lock().delivered_by = None;
                    entries
                }
                Err(e) => {
                    self.failed("cannot read the outbox in the store", &e);
                    return Flushed::Failed;
                }
            };
            if entries.is_empty() {
                // Nothing failing: an error reading the outbox is over.
                self.succeeded();
                return Flushed::Drained;
            }
            for (numbers, delivery) in deliveries(entries, &self.metrics) {
                if let Some(d) = &delivery
                    && let Sent::Retry = self.send(d).await
                {
                    // Another instance may fare better (its own network path, its own
                    // token); the entries stay first in line for whoever claims next.
                    if let Err(e) = journal.release(&self.owner).await {
                        tracing::debug!(error = %e, "cannot give up the outbox's lease");
                    }
                    return Flushed::Failed;
                }
                match journal.ack(&self.owner, &numbers, LEASE).await {
                    Ok((true, pending)) => self.seen_shared(pending),
                    Ok((false, pending)) => {
                        tracing::warn!(
                            "lost the outbox's delivery lease; another instance goes on"
                        );
                        self.seen_shared(pending);
                        // Named by the next claim.
                        self.state.lock().delivered_by = Some("unknown".into());
                        return Flushed::Standby(pending);
                    }
                    Err(e) => {
                        self.failed("cannot update the outbox in the store", &e);
                        return Flushed::Failed;
                    }
                }
            }
        }
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
                    .map(|d| cap_policy_expiry(d.mitigation, cache_ttl))
                    .filter(|m| m.expires_at > now && st.touched.allows(m))
                    .collect()
            };
            // A shared store also holds back what other instances touched.
            restored += match &self.journal {
                None => {
                    store
                        .publish(mitigations)
                        .await
                        .map_err(|e| e.to_string())?
                        .accepted
                }
                Some(journal) => match journal
                    .restore_page(&self.owner, RESTORE_MARK, &mitigations)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    RestorePage::Published(n) => n,
                    RestorePage::Cleared => return Ok(restored),
                    RestorePage::Lapsed => {
                        return Err("the restore's mark in the store ran out; \
                                    starting over"
                            .into());
                    }
                },
            };
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

/// How far ahead of this clock a decision's creation may be and still count as given:
/// hosts in sync disagree by milliseconds, and a retry must get the same cap.
const CLOCK_SLACK: chrono::Duration = chrono::Duration::seconds(5);

/// Brings a policy decision's expiry within `cache_ttl` of its creation (0: no cap).
///
/// Counted from `created_at`, not from arrival, so a publish retried after a timeout
/// stores the same expiry (no new delta) and a restore gives the cap it had when first
/// published. A creation stamped more than [`CLOCK_SLACK`] ahead of this clock counts
/// from there, so a skewed clock cannot stretch the cap by more.
pub fn cap_policy_expiry(mut m: Mitigation, cache_ttl: Duration) -> Mitigation {
    if m.origin == Origin::Policy && !cache_ttl.is_zero() {
        let ttl = chrono::Duration::from_std(cache_ttl).unwrap_or(chrono::Duration::MAX);
        let latest = Utc::now() + CLOCK_SLACK;
        if let Some(cap) = m.created_at.min(latest).checked_add_signed(ttl) {
            m.expires_at = m.expires_at.min(cap);
        }
    }
    m
}

/// What `write` logs: the decisions of the mitigations it publishes, or one revocation.
/// A mitigation published already expired ends whatever the store held under its id, so
/// it is logged as that id's revocation: a restore must not bring back the copy before.
fn entries_of(write: Write<'_>) -> Vec<Entry> {
    let revoke = |id: Option<&str>, entity: Option<&EntityKey>, all: bool| {
        vec![Entry::Revoke(DecisionRevoke {
            id: id.map(str::to_string),
            entity: entity.cloned(),
            all,
            revoked_at: Utc::now(),
            revoked_by: LOGGED_BY.into(),
        })]
    };
    match write {
        Write::Publish(ms) => {
            let now = Utc::now();
            ms.iter()
                .flat_map(|m| {
                    if m.expires_at > now {
                        vec![Entry::Record(Box::new(decision_of(m)))]
                    } else {
                        revoke(Some(&m.id), None, false)
                    }
                })
                .collect()
        }
        Write::RevokeId(id) => revoke(Some(id), None, false),
        Write::RevokeEntity(entity) => revoke(None, Some(entity), false),
        Write::Clear => revoke(None, None, true),
    }
}

/// Groups numbered entries of the store's outbox into deliveries, each with the number
/// of its last entry: runs of decisions, single revocations. An unreadable entry (none
/// is ever written) is counted and comes out as a `None` delivery: nothing to send, but
/// removed all the same.
fn deliveries(entries: Vec<(u64, String)>, metrics: &Metrics) -> Vec<(Vec<u64>, Option<Delivery>)> {
    let mut out: Vec<(Vec<u64>, Option<Delivery>)> = Vec::new();
    for (n, body) in entries {
        match serde_json::from_str::<Entry>(&body) {
            Ok(Entry::Record(d)) => match out.last_mut() {
                Some((numbers, Some(Delivery::Records(run)))) if run.len() < SEND_BATCH => {
                    run.push(*d);
                    numbers.push(n);
                }
                _ => out.push((vec![n], Some(Delivery::Records(vec![*d])))),
            },
            Ok(Entry::Revoke(r)) => out.push((vec![n], Some(Delivery::Revoke(r)))),
            Err(e) => {
                metrics
                    .persistence_dropped
                    .with_label_values(&["unreadable"])
                    .inc();
                tracing::error!(error = %e, entry = n, "unreadable entry in the outbox; dropped");
                out.push((vec![n], None));
            }
        }
    }
    out
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
    // Other instances append to a shared outbox without waking this one.
    let poll = p.journal.as_ref().map(|_| SHARED_POLL);
    let mut backoff = MIN_BACKOFF;
    let mut orphans_checked: Option<tokio::time::Instant> = None;
    loop {
        let look_now = p.look_now.swap(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(journal) = &p.journal
            && (look_now || orphans_checked.is_none_or(|t| t.elapsed() >= ORPHAN_CHECK))
        {
            orphans_checked = Some(tokio::time::Instant::now());
            take_over_orphaned(&p, &**journal).await;
        }
        // Marked before the flush: a write through another instance either is in the
        // outbox flushed next or is noted for the restore.
        let pending = p.state.lock().restore == Restore::Pending;
        let mut marked = Ok(None);
        if let Some(journal) = &p.journal
            && pending
        {
            marked = journal
                .begin_restore(&p.owner, RESTORE_MARK)
                .await
                .map(Some);
        }
        // The outbox goes first, so revocations made since start-up are in the log
        // before the log is read back.
        let flushed = p.flush().await;
        let mut ok = flushed != Flushed::Failed;
        let mut drained = matches!(flushed, Flushed::Drained | Flushed::Standby(0));
        // In a shared outbox, the entries written before the mark are enough: later
        // ones are noted, and other instances may keep the outbox from ever emptying.
        if let (Ok(Some(before)), Some(journal), false) = (&marked, &p.journal, drained) {
            match journal.outbox_head().await {
                Ok(head) => drained = head.is_none_or(|n| n > *before),
                Err(e) => {
                    ok = false;
                    p.failed("cannot read the outbox in the store", &e);
                }
            }
        }
        if let Err(e) = &marked {
            ok = false;
            p.metrics.persistence_errors.inc();
            p.state.lock().restore_error = Some(format!("cannot mark the restore: {e}"));
        }
        if drained && marked.is_ok() && pending {
            // A stop does not wait for the log's next page: a restore left half-way is
            // taken up again (see `take_over_orphaned`).
            let restored = tokio::select! {
                r = p.restore(&*store, cache_ttl) => r,
                _ = shutdown.wait() => break,
            };
            match restored {
                Ok(n) => {
                    p.metrics.persistence_restored.inc_by(n as u64);
                    {
                        let mut st = p.state.lock();
                        st.restore = Restore::Done(n);
                        st.touched = Touched::default();
                        st.restore_error = None;
                    }
                    if let Some(journal) = &p.journal
                        && let Err(e) = journal.end_restore(&p.owner, true).await
                    {
                        tracing::debug!(error = %e, "cannot remove the restore's mark; it runs out by itself");
                    }
                    tracing::info!(
                        restored = n,
                        "mitigations in force restored from the decision log"
                    );
                    // Followers that added a snapshot taken while restoring to what they
                    // held take a whole one now: what was revoked meanwhile, unknown to
                    // the store, left them with no change to tell.
                    if let Err(e) = store.rebase().await {
                        tracing::warn!(error = %e, "cannot start a new generation after the restore; followers keep what they added until it expires");
                    }
                }
                Err(e) => {
                    ok = false;
                    p.metrics.persistence_errors.inc();
                    let mut st = p.state.lock();
                    if st.restore_error.is_none() {
                        tracing::warn!(error = %e, "cannot restore from the decision log yet; will retry");
                    }
                    st.restore_error = Some(e);
                }
            }
        }
        if ok {
            backoff = MIN_BACKOFF;
            let polled = async {
                match poll {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = p.notify.notified() => {}
                _ = polled => {}
                _ = shutdown.wait() => break,
            }
        } else {
            if shutdown.sleep(backoff).await {
                break;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    let last = tokio::time::timeout(FINAL_FLUSH, p.flush()).await;
    match &p.journal {
        Some(journal) => {
            // Another instance (or this one's successor) goes on at once.
            if let Err(e) = journal.release(&p.owner).await {
                tracing::warn!(error = %e, "cannot give up the outbox's delivery lease; it runs out by itself");
            }
            let pending = p.state.lock().restore == Restore::Pending;
            // Unfinished, it stays due: the next instance to look takes it over.
            if pending && let Err(e) = journal.end_restore(&p.owner, false).await {
                tracing::debug!(error = %e, "cannot remove the restore's mark; it runs out by itself");
            }
            let left = p.pending();
            if last != Ok(Flushed::Drained) && left > 0 {
                tracing::info!(
                    pending = left,
                    "entries stay in the store's outbox for the next delivery"
                );
            }
        }
        None => {
            let left = p.pending();
            if last != Ok(Flushed::Drained) && left > 0 {
                tracing::error!(
                    lost = left,
                    "decision log unreachable at shutdown; these writes are not in the durable copy"
                );
            }
        }
    }
}

/// Takes over a restore that an instance over the same store began and left half-way
/// (killed, or stopped): the store then holds part of what is in force, so it is not
/// empty, and a start-up alone would not restore it.
async fn take_over_orphaned(p: &Persistence, journal: &dyn Journal) {
    if p.state.lock().restore == Restore::Pending {
        return;
    }
    match journal.restore_orphaned().await {
        Ok(true) => {
            let mut st = p.state.lock();
            if st.restore != Restore::Pending {
                st.restore = Restore::Pending;
                st.touched = Touched::default();
                tracing::warn!(
                    "a restore from the decision log is due in the store: its data was lost \
                     (flushed, or Redis restarted without persistence), or an instance that \
                     stopped left a restore half-way; restoring"
                );
            }
        }
        Ok(false) => {}
        Err(e) => {
            tracing::debug!(error = %e, "cannot check for a restore left half-way");
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
        Persistence::new(&config, Metrics::new().unwrap(), None)
    }

    #[test]
    fn the_outbox_lease_holder_is_named_by_node_id_and_unique() {
        let named = |node_id: Option<&str>| {
            let config = Config {
                node_id: node_id.map(str::to_string),
                ..Config::default()
            };
            Persistence::new(&config, Metrics::new().unwrap(), None).owner
        };
        let (a, b) = (named(Some("broker-1")), named(Some("broker-1")));
        assert!(a.starts_with("broker-1-"), "{a}");
        assert_ne!(a, b, "one NODE_ID given twice still names two holders");
        let pid = std::process::id().to_string();
        assert!(named(None).starts_with(&format!("{pid}-")));
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
        p.queue(Write::RevokeId(&a.id));
        assert!(p.state.lock().touched.allows(&a));
        p.state.lock().restore = Restore::Pending;
        p.queue(Write::RevokeId(&a.id));
        p.queue(Write::RevokeEntity(&b.entity));
        {
            let st = p.state.lock();
            assert!(!st.touched.allows(&a) && !st.touched.allows(&b));
            assert!(st.touched.allows(&c));
        }
        p.queue(Write::Publish(std::slice::from_ref(&c)));
        assert!(!p.state.lock().touched.allows(&c));
        p.queue(Write::Clear);
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
        p.queue(Write::Publish(&ms));
        {
            let st = p.state.lock();
            assert!(!st.touched.cleared);
            assert_eq!(st.touched.ids.len(), 3);
        }
        // One more than the outbox holds: the restore is given up and the notes freed.
        p.queue(Write::RevokeEntity(&mitigation("192.0.2.4").entity));
        let st = p.state.lock();
        assert!(st.touched.cleared);
        assert!(st.touched.ids.is_empty() && st.touched.entities.is_empty());
        assert!(!st.touched.allows(&mitigation("192.0.2.9")));
    }

    #[tokio::test]
    async fn reject_refuses_what_does_not_fit_and_counts_it() {
        let p = outbox(3, WhenFull::Reject);
        assert!(p.admit(3).await.is_ok());
        p.queue(Write::Publish(&[
            mitigation("192.0.2.1"),
            mitigation("192.0.2.2"),
        ]));
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
        p.queue(Write::Publish(&ms));
        p.queue(Write::Clear);
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
        p.queue(Write::Publish(&[a.clone(), b.clone(), expired.clone()]));
        p.queue(Write::RevokeId(&a.id));
        p.queue(Write::Publish(std::slice::from_ref(&c)));
        assert_eq!(
            p.pending(),
            5,
            "an expired mitigation is logged as its id's end"
        );

        let first = p.take().unwrap();
        let Delivery::Records(run) = &first else {
            panic!("decisions first")
        };
        let ids: Vec<_> = run.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, [a.id.as_str(), b.id.as_str()]);
        assert_eq!(run[0].decided_by, LOGGED_BY);
        assert_eq!(run[0].decided_at, a.created_at);
        p.requeue(first);
        assert_eq!(p.pending(), 5);
        assert!(matches!(p.take(), Some(Delivery::Records(r)) if r.len() == 2));
        assert!(
            matches!(p.take(), Some(Delivery::Revoke(r)) if r.id.as_deref() == Some(expired.id.as_str()) && !r.all)
        );
        assert!(
            matches!(p.take(), Some(Delivery::Revoke(r)) if r.id.as_deref() == Some(a.id.as_str()))
        );
        assert!(matches!(p.take(), Some(Delivery::Records(r)) if r[0].id == c.id));
        assert!(p.take().is_none());
    }

    #[test]
    fn a_shared_outbox_is_delivered_in_runs_and_unreadable_entries_are_passed_over() {
        let metrics = Metrics::new().unwrap();
        let (a, b, c) = (
            mitigation("192.0.2.1"),
            mitigation("192.0.2.2"),
            mitigation("192.0.2.3"),
        );
        let encode = |e: &Entry| serde_json::to_string(e).unwrap();
        let mut bodies: Vec<String> = entries_of(Write::Publish(&[a.clone(), b.clone()]))
            .iter()
            .chain(&entries_of(Write::RevokeId(&a.id)))
            .chain(&entries_of(Write::Publish(std::slice::from_ref(&c))))
            .map(encode)
            .collect();
        bodies.insert(3, "{not an entry".into());
        bodies.push("garbage".into());
        let numbered: Vec<(u64, String)> = (1..).zip(bodies).collect();
        let out = deliveries(numbered, &metrics);
        let shape: Vec<(Vec<u64>, String)> = out
            .iter()
            .map(|(n, d)| {
                let what = match d {
                    Some(Delivery::Records(run)) => run
                        .iter()
                        .map(|d| d.id.clone())
                        .collect::<Vec<_>>()
                        .join(","),
                    Some(Delivery::Revoke(r)) => format!("revoke {}", r.id.clone().unwrap()),
                    None => "unreadable".into(),
                };
                (n.clone(), what)
            })
            .collect();
        assert_eq!(
            shape,
            [
                (vec![1, 2], format!("{},{}", a.id, b.id)),
                (vec![3], format!("revoke {}", a.id)),
                (vec![4], "unreadable".into()),
                (vec![5], c.id.clone()),
                (vec![6], "unreadable".into()),
            ]
        );
        let unreadable = metrics
            .persistence_dropped
            .with_label_values(&["unreadable"])
            .get();
        assert_eq!(unreadable, 2);
    }

    #[test]
    fn policy_decisions_are_capped_from_their_creation() {
        let ttl = Duration::from_secs(60);
        let mut m = mitigation("192.0.2.1");
        m.created_at = Utc::now() - chrono::Duration::seconds(100);
        m.expires_at = m.created_at + chrono::Duration::seconds(3600);
        let capped = cap_policy_expiry(m.clone(), ttl);
        assert_eq!(
            capped.expires_at,
            m.created_at + chrono::Duration::seconds(60)
        );
        // The same decision sent again is capped alike, so a retry stores nothing new.
        assert_eq!(cap_policy_expiry(m.clone(), ttl), capped);
        assert_eq!(cap_policy_expiry(m.clone(), Duration::ZERO), m);
        // A creation stamped far ahead of this clock counts from a few seconds ahead.
        m.created_at = Utc::now() + chrono::Duration::seconds(600);
        m.expires_at = m.created_at + chrono::Duration::seconds(3600);
        let limit = Utc::now() + chrono::Duration::seconds(66);
        assert!(cap_policy_expiry(m.clone(), ttl).expires_at <= limit);
        let short_lived = Mitigation {
            expires_at: Utc::now() + chrono::Duration::seconds(10),
            ..m.clone()
        };
        assert_eq!(cap_policy_expiry(short_lived.clone(), ttl), short_lived);
        for origin in [Origin::Manual, Origin::List] {
            m.origin = origin;
            assert_eq!(cap_policy_expiry(m.clone(), ttl), m);
        }
    }
}
