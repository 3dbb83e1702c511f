//! The mitigation store behind the broker's HTTP API. One trait, so the in-memory store
//! and a Redis store (keys with expiry plus a change stream) can serve the same
//! endpoints; the HTTP layer only ever holds an `Arc<dyn MitigationStore>`.

mod cursor;
mod memory;
mod redis;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use esper_protocol::outbox::Claim;
use esper_protocol::{DeltaPage, EntityKey, Mitigation};
use tokio::sync::watch;

pub use cursor::Cursor;
pub use memory::MemoryMitigations;
pub use redis::RedisMitigations;

/// The store could not do its job (a backend down, a timeout). The HTTP layer answers
/// 503 `store_unavailable` and logs the detail.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("mitigation store unavailable: {0}")]
    Unavailable(String),
}

/// The outcome of a publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// Mitigations that took effect (stored, replaced, or removed by an expired upsert).
    pub accepted: usize,
    /// The stream position after this publish.
    pub cursor: String,
}

/// A filtered, limited view of the active mitigations.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivePage {
    /// Newest first (by `created_at`, then id).
    pub mitigations: Vec<Mitigation>,
    /// All active mitigations matching the filter, limit aside.
    pub total: usize,
}

/// Active mitigations, their lookups, and the change log that feeds the delta stream.
///
/// Every upsert and revoke appends a change with the next sequence number; the log keeps
/// the newest changes only. Expired mitigations are invisible to readers at once and are
/// dropped by [`sweep`](MitigationStore::sweep) without a change (followers expire them
/// themselves). A clear starts a new generation, which turns every earlier cursor stale.
#[async_trait::async_trait]
pub trait MitigationStore: Send + Sync + 'static {
    /// A short name for health output and logs (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Is the backend reachable?
    async fn ping(&self) -> Result<(), StoreError>;

    /// Upserts each mitigation by id, in order. An identical re-publish changes nothing;
    /// an already expired mitigation is ignored, or removes the stored one of that id.
    async fn publish(&self, mitigations: Vec<Mitigation>) -> Result<Published, StoreError>;

    /// Active mitigations, optionally only of one entity kind (`ip`, `cidr`, ...).
    async fn active(&self, kind: Option<&str>, limit: usize) -> Result<ActivePage, StoreError>;

    /// Active mitigations of `entity`; for an `ip:` key also those of networks that
    /// cover the address.
    async fn for_entity(&self, entity: &EntityKey) -> Result<Vec<Mitigation>, StoreError>;

    /// Revokes one mitigation; returns 1 when an active one was revoked, else 0.
    async fn revoke_id(&self, id: &str) -> Result<usize, StoreError>;

    /// Revokes every mitigation of exactly this entity; returns how many were active.
    async fn revoke_entity(&self, entity: &EntityKey) -> Result<usize, StoreError>;

    /// Drops everything and starts a new generation; returns how many were active.
    async fn clear(&self) -> Result<usize, StoreError>;

    /// Starts a new generation of the change stream over the same mitigations, so every
    /// follower takes one whole snapshot: after a restore, followers that added a
    /// partial snapshot to what they held drop what the store no longer holds (revoked
    /// meanwhile), which no change could tell them.
    async fn rebase(&self) -> Result<(), StoreError>;

    /// Up to `limit` changes after `cursor`, with the cursor of the last one. A missing,
    /// malformed, foreign or too old cursor gets the first page of a snapshot instead:
    /// up to `limit` active mitigations as upserts, by id, with the current cursor and,
    /// when more follow, `more` (the last id) for [`snapshot_page`](Self::snapshot_page).
    async fn changes(&self, cursor: Option<&str>, limit: usize) -> Result<DeltaPage, StoreError>;

    /// The next page of the snapshot whose pages carry `cursor`: up to `limit` active
    /// mitigations whose ids sort (bytewise) after `after`, with `cursor` and `more` as
    /// in [`changes`](Self::changes). Ids are unique and ordered, so an entry present
    /// through the whole snapshot is on exactly one page; one added, changed or removed
    /// meanwhile is also in the changes after `cursor`. When the changes after `cursor`
    /// are no longer all retained (or it is from another generation), the answer is the
    /// first page of a new snapshot, with the current cursor.
    async fn snapshot_page(
        &self,
        cursor: &str,
        after: &str,
        limit: usize,
    ) -> Result<DeltaPage, StoreError>;

    /// A receiver marked changed whenever a change is appended or the generation changes,
    /// for long-polls. Subscribe (and mark seen) before reading, to miss nothing.
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// Drops expired mitigations; returns how many.
    async fn sweep(&self) -> Result<usize, StoreError>;

    /// Active mitigations by action name (`block`, `throttle`, `tarpit`, `log`).
    async fn counts(&self) -> Result<BTreeMap<&'static str, u64>, StoreError>;

    /// The store's own outbox for the decision log, when it keeps one as durable as
    /// itself (Redis); `None` leaves the outbox to the broker's memory.
    fn journal(self: Arc<Self>) -> Option<Arc<dyn Journal>> {
        None
    }
}

/// A write to the store, for [`Journal::write`].
#[derive(Clone, Copy, Debug)]
pub enum Write<'a> {
    Publish(&'a [Mitigation]),
    RevokeId(&'a str),
    RevokeEntity(&'a EntityKey),
    Clear,
}

/// Applies `write` to `store`: what it changed (accepted or revoked mitigations), and a
/// publish's stream position.
pub async fn apply(
    store: &dyn MitigationStore,
    write: Write<'_>,
) -> Result<(usize, Option<String>), StoreError> {
    Ok(match write {
        Write::Publish(ms) => {
            let p = store.publish(ms.to_vec()).await?;
            (p.accepted, Some(p.cursor))
        }
        Write::RevokeId(id) => (store.revoke_id(id).await?, None),
        Write::RevokeEntity(entity) => (store.revoke_entity(entity).await?, None),
        Write::Clear => (store.clear().await?, None),
    })
}

/// What a write appends to the outbox, in the same atomic step.
#[derive(Clone, Debug)]
pub struct LogAppend {
    /// Encoded entries, in order (opaque to the store).
    pub entries: Vec<String>,
    /// Most entries the outbox holds.
    pub capacity: usize,
    /// Past `capacity`, drop the oldest entries (else refuse the whole write).
    pub drop_oldest: bool,
}

/// The outcome of a journaled write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Logged {
    /// The write took effect and its entries are in the outbox.
    Done {
        /// What the write changed: accepted mitigations, or revoked ones.
        changed: usize,
        /// A publish's stream position after it.
        cursor: Option<String>,
        /// Oldest entries dropped to make room.
        dropped: usize,
        /// Entries in the outbox after the write.
        pending: usize,
    },
    /// Nothing was changed: the outbox could not take the entries.
    Full,
}

/// An outbox for the decision log kept in the store itself, appended in the same atomic
/// step as the write it records (so a crash loses neither or both), shared by every
/// broker instance over the store. One instance at a time delivers it, in order, under
/// a lease it renews as it goes; another takes over when the lease runs out.
#[async_trait::async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Applies `write` and appends `log`, or neither.
    async fn write(&self, write: Write<'_>, log: &LogAppend) -> Result<Logged, StoreError>;

    /// Takes or renews the delivery lease for `owner` and reads up to `limit` of the
    /// oldest entries.
    async fn claim(&self, owner: &str, lease: Duration, limit: usize) -> Result<Claim, StoreError>;

    /// While `owner` holds the lease: removes the entries numbered `delivered` (as
    /// claimed) and renews it. Returns whether `owner` held it (else nothing is
    /// removed), and the entries left.
    async fn ack(
        &self,
        owner: &str,
        delivered: &[u64],
        lease: Duration,
    ) -> Result<(bool, usize), StoreError>;

    /// Gives up the lease (another instance may deliver at once).
    async fn release(&self, owner: &str) -> Result<(), StoreError>;

    /// Marks `owner` as restoring for `lease` (renewed by each page). From then on every
    /// write through any instance notes what it touches. Returns the number of the
    /// outbox's last entry: the writes the notes miss are the entries up to it, which
    /// must reach the log before it is read.
    async fn begin_restore(&self, owner: &str, lease: Duration) -> Result<u64, StoreError>;

    /// The number of the outbox's first entry (`None` when it is empty).
    async fn outbox_head(&self) -> Result<Option<u64>, StoreError>;

    /// Publishes what of a page read from the log no write noted since the mark, while
    /// `owner`'s mark stands (renewed).
    async fn restore_page(
        &self,
        owner: &str,
        lease: Duration,
        mitigations: &[Mitigation],
    ) -> Result<RestorePage, StoreError>;

    /// Takes `owner`'s mark away; the notes go with the last mark. A restore that did
    /// not `finish` (its instance stops half-way) stays due: see
    /// [`Journal::restore_orphaned`].
    async fn end_restore(&self, owner: &str, finished: bool) -> Result<(), StoreError>;

    /// A restore was begun and neither finished nor superseded by a clear, and no
    /// instance's mark stands: its restorer stopped half-way (killed, or shut down), so
    /// the store holds part of what is in force and another instance should restore.
    async fn restore_orphaned(&self) -> Result<bool, StoreError>;

    /// A restore is due: begun and not finished, or asked for by the store itself when
    /// it found its data gone (a Redis flushed, or restarted without persistence).
    async fn restore_due(&self) -> Result<bool, StoreError>;
}

/// What became of a restore page in a shared store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestorePage {
    /// Published this many (the rest was touched since the mark).
    Published(usize),
    /// Everything was cleared since the mark (or more was touched than is noted): the
    /// rest of the restore is given up.
    Cleared,
    /// The mark ran out before the page came (writes since may be unnoted): begin again.
    Lapsed,
}
