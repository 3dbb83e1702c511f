//! The in-memory mitigation store: the embedded default (`esper dev`, single-node
//! deployments). Mitigations are indexed by id (ordered, so snapshot pages resume after
//! an id), by entity and by expiry; the change log is a bounded ring of the newest
//! changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::ops::Bound;

use chrono::{DateTime, Utc};
use esper_protocol::{Change, DeltaPage, EntityKey, Mitigation};
use parking_lot::RwLock;
use tokio::sync::watch;

use super::{ActivePage, Cursor, MitigationStore, Published, StoreError};

/// Active mitigations and their change log, in memory.
pub struct MemoryMitigations {
    retention: usize,
    state: RwLock<State>,
    /// Bumped on every appended change and every new generation.
    changed: watch::Sender<u64>,
}

struct State {
    generation: String,
    /// Sequence number of the newest change (0: none yet in this generation).
    head: u64,
    /// The newest changes, consecutive sequence numbers, oldest first.
    log: VecDeque<(u64, Change)>,
    by_id: BTreeMap<String, Mitigation>,
    by_entity: HashMap<EntityKey, BTreeSet<String>>,
    expiries: BTreeSet<(DateTime<Utc>, String)>,
}

impl MemoryMitigations {
    /// An empty store keeping the newest `retention` changes for the delta stream.
    pub fn new(retention: usize) -> MemoryMitigations {
        MemoryMitigations {
            retention: retention.max(1),
            state: RwLock::new(State::new()),
            changed: watch::channel(0).0,
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

fn newest_first(a: &Mitigation, b: &Mitigation) -> std::cmp::Ordering {
    b.created_at
        .cmp(&a.created_at)
        .then_with(|| a.id.cmp(&b.id))
}

impl State {
    fn new() -> State {
        State {
            generation: Cursor::new_generation(),
            head: 0,
            log: VecDeque::new(),
            by_id: BTreeMap::new(),
            by_entity: HashMap::new(),
            expiries: BTreeSet::new(),
        }
    }

    fn cursor_at(&self, seq: u64) -> String {
        Cursor {
            generation: self.generation.clone(),
            seq,
        }
        .to_string()
    }

    fn append(&mut self, change: Change, retention: usize) {
        self.head += 1;
        self.log.push_back((self.head, change));
        while self.log.len() > retention {
            self.log.pop_front();
        }
    }

    fn remove(&mut self, id: &str) -> Option<Mitigation> {
        let m = self.by_id.remove(id)?;
        self.expiries.remove(&(m.expires_at, m.id.clone()));
        if let Some(ids) = self.by_entity.get_mut(&m.entity) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_entity.remove(&m.entity);
            }
        }
        Some(m)
    }

    fn insert(&mut self, m: Mitigation) {
        self.remove(&m.id);
        self.expiries.insert((m.expires_at, m.id.clone()));
        self.by_entity
            .entry(m.entity.clone())
            .or_default()
            .insert(m.id.clone());
        self.by_id.insert(m.id.clone(), m);
    }

    fn active_of<'a>(
        &'a self,
        entity: &EntityKey,
        now: DateTime<Utc>,
    ) -> impl Iterator<Item = &'a Mitigation> + 'a {
        self.by_entity
            .get(entity)
            .into_iter()
            .flatten()
            .filter_map(|id| self.by_id.get(id))
            .filter(move |m| m.is_active(now))
    }

    /// Up to `limit` active mitigations with ids after `after`, by id, as a page of the
    /// snapshot at `cursor`; the first page (no `after`) counts them all.
    fn snapshot_page(
        &self,
        cursor: String,
        after: Option<&str>,
        limit: usize,
        now: DateTime<Utc>,
    ) -> DeltaPage {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut active = self
            .by_id
            .range::<str, _>((lower, Bound::Unbounded))
            .map(|(_, m)| m)
            .filter(|m| m.is_active(now));
        let changes: Vec<Change> = active
            .by_ref()
            .take(limit.max(1))
            .map(|m| Change::Upsert {
                mitigation: m.clone(),
            })
            .collect();
        let more = match (active.next(), changes.last()) {
            (Some(_), Some(Change::Upsert { mitigation })) => Some(mitigation.id.clone()),
            _ => None,
        };
        // A hint: entries that expired since the last sweep are counted too.
        let total = after.is_none().then_some(self.by_id.len() as u64);
        DeltaPage {
            cursor,
            snapshot: true,
            changes,
            more,
            total,
            restoring: false,
        }
    }

    /// The sequence number of `cursor` when it is of this generation and the changes
    /// after it are all retained (deltas can follow a snapshot taken there).
    fn resumable(&self, cursor: &str) -> Option<u64> {
        let c = Cursor::parse(cursor).filter(|c| c.generation == self.generation)?;
        self.after(c.seq, 0).map(|_| c.seq)
    }

    /// The changes after `seq`, or `None` when they are no longer all retained.
    fn after(&self, seq: u64, limit: usize) -> Option<DeltaPage> {
        if seq > self.head {
            return None;
        }
        if seq == self.head {
            return Some(DeltaPage {
                cursor: self.cursor_at(seq),
                snapshot: false,
                changes: Vec::new(),
                more: None,
                total: None,
                restoring: false,
            });
        }
        let first = self.log.front().map(|(s, _)| *s)?;
        if seq + 1 < first {
            return None;
        }
        let skip = usize::try_from(seq + 1 - first).ok()?;
        let changes: Vec<Change> = self
            .log
            .iter()
            .skip(skip)
            .take(limit)
            .map(|(_, c)| c.clone())
            .collect();
        let last = seq + changes.len() as u64;
        Some(DeltaPage {
            cursor: self.cursor_at(last),
            snapshot: false,
            changes,
            more: None,
            total: None,
            restoring: false,
        })
    }
}

#[async_trait::async_trait]
impl MitigationStore for MemoryMitigations {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn publish(&self, mitigations: Vec<Mitigation>) -> Result<Published, StoreError> {
        let now = Utc::now();
        let mut st = self.state.write();
        let head_before = st.head;
        let mut accepted = 0;
        for m in mitigations {
            if !m.is_active(now) {
                // An expired upsert of a stored mitigation ends it early; of an unknown
                // one, it is nothing.
                if st.remove(&m.id).is_some() {
                    st.append(Change::Remove { id: m.id }, self.retention);
                    accepted += 1;
                }
                continue;
            }
            accepted += 1;
            if st.by_id.get(&m.id) == Some(&m) {
                continue;
            }
            st.insert(m.clone());
            st.append(Change::Upsert { mitigation: m }, self.retention);
        }
        let cursor = st.cursor_at(st.head);
        let appended = st.head != head_before;
        drop(st);
        if appended {
            self.notify();
        }
        Ok(Published { accepted, cursor })
    }

    async fn active(&self, kind: Option<&str>, limit: usize) -> Result<ActivePage, StoreError> {
        let now = Utc::now();
        let st = self.state.read();
        let mut matching: Vec<&Mitigation> = st
            .by_id
            .values()
            .filter(|m| m.is_active(now) && kind.is_none_or(|k| m.entity.kind() == k))
            .collect();
        let total = matching.len();
        matching.sort_by(|a, b| newest_first(a, b));
        Ok(ActivePage {
            mitigations: matching.into_iter().take(limit).cloned().collect(),
            total,
        })
    }

    async fn for_entity(&self, entity: &EntityKey) -> Result<Vec<Mitigation>, StoreError> {
        let now = Utc::now();
        let st = self.state.read();
        let mut found: Vec<Mitigation> = st.active_of(entity, now).cloned().collect();
        if let EntityKey::Ip(ip) = entity {
            let bits = match ip {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            for len in 0..=bits {
                if let Some(net) = EntityKey::network(*ip, len) {
                    found.extend(st.active_of(&net, now).cloned());
                }
            }
        }
        found.sort_by(newest_first);
        Ok(found)
    }

    async fn revoke_id(&self, id: &str) -> Result<usize, StoreError> {
        let now = Utc::now();
        let mut st = self.state.write();
        let Some(m) = st.remove(id) else {
            // Passed on all the same: a follower may hold it from before this store was
            // emptied (a restart, a restore under way) and learns of it no other way.
            st.append(Change::Remove { id: id.to_string() }, self.retention);
            drop(st);
            self.notify();
            return Ok(0);
        };
        if !m.is_active(now) {
            return Ok(0);
        }
        st.append(Change::Remove { id: m.id }, self.retention);
        drop(st);
        self.notify();
        Ok(1)
    }

    async fn revoke_entity(&self, entity: &EntityKey) -> Result<usize, StoreError> {
        let now = Utc::now();
        let mut st = self.state.write();
        let ids: Vec<String> = st
            .by_entity
            .get(entity)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        let mut revoked = 0;
        for id in ids {
            if let Some(m) = st.remove(&id)
                && m.is_active(now)
            {
                st.append(Change::Remove { id }, self.retention);
                revoked += 1;
            }
        }
        drop(st);
        if revoked > 0 {
            self.notify();
        }
        Ok(revoked)
    }

    async fn clear(&self) -> Result<usize, StoreError> {
        let now = Utc::now();
        let mut st = self.state.write();
        let active = st.by_id.values().filter(|m| m.is_active(now)).count();
        *st = State::new();
        drop(st);
        self.notify();
        Ok(active)
    }

    async fn rebase(&self) -> Result<(), StoreError> {
        let mut st = self.state.write();
        st.generation = Cursor::new_generation();
        st.head = 0;
        st.log.clear();
        drop(st);
        self.notify();
        Ok(())
    }

    async fn changes(&self, cursor: Option<&str>, limit: usize) -> Result<DeltaPage, StoreError> {
        let st = self.state.read();
        let page = cursor
            .and_then(Cursor::parse)
            .filter(|c| c.generation == st.generation)
            .and_then(|c| st.after(c.seq, limit));
        Ok(
            page.unwrap_or_else(|| {
                st.snapshot_page(st.cursor_at(st.head), None, limit, Utc::now())
            }),
        )
    }

    async fn snapshot_page(
        &self,
        cursor: &str,
        after: &str,
        limit: usize,
    ) -> Result<DeltaPage, StoreError> {
        let st = self.state.read();
        let now = Utc::now();
        Ok(match st.resumable(cursor) {
            Some(seq) => st.snapshot_page(st.cursor_at(seq), Some(after), limit, now),
            None => st.snapshot_page(st.cursor_at(st.head), None, limit, now),
        })
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        let now = Utc::now();
        let mut st = self.state.write();
        let mut dropped = 0;
        while st.expiries.first().is_some_and(|(t, _)| *t <= now) {
            let Some((_, id)) = st.expiries.pop_first() else {
                break;
            };
            if st.by_id.get(&id).is_some_and(|m| !m.is_active(now)) {
                st.remove(&id);
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    async fn counts(&self) -> Result<BTreeMap<&'static str, u64>, StoreError> {
        let now = Utc::now();
        let st = self.state.read();
        let mut counts = BTreeMap::new();
        for m in st.by_id.values().filter(|m| m.is_active(now)) {
            *counts.entry(m.action.name()).or_insert(0) += 1;
        }
        Ok(counts)
    }
}
