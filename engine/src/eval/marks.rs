//! The memory backend's record of processed event ids, and the undo logs of batches
//! in flight.
//!
//! Each id is remembered under the receipt of the batch that counted it. A receipt is
//! in flight until committed or rolled back, so committing a batch is one step per
//! batch, not one per event: the ids of committed batches are kept together, in
//! expiry order, until their TTL runs out or the set is full (then the oldest ids go
//! one by one, down to the capacity, as in the shared backends).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use super::state::{PolicyKey, Undo};

/// A hasher for keys that are already uniformly distributed 64-bit fingerprints.
#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = bytes
            .iter()
            .fold(self.0, |h, b| h.rotate_left(8) ^ u64::from(*b));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// What is known of an event id when a batch meets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Never seen (now marked in flight under the batch's receipt).
    New,
    /// Already in this batch, or processed by a committed batch.
    Done,
    /// In flight in another batch.
    Busy,
}

/// The ids of one committed batch.
struct Committed {
    expiry: i64,
    receipt: u64,
    keys: Vec<u64>,
    /// Keys before this one were already forgotten (the set was full).
    from: usize,
}

/// Most batches in flight whose undo logs are kept; beyond that the oldest log is
/// dropped (a worker has one or two in flight, so this only bounds a caller that
/// neither commits nor rolls back).
const MAX_LOGS: usize = 256;

/// One change to an entity's state, to take back on rollback.
pub(crate) struct Change {
    /// Index into the log's policies.
    pub policy: u32,
    /// The entity's fingerprint (its key in the policy's map).
    pub entity: u64,
    pub undo: Undo,
}

/// A batch's changes, in the order made.
#[derive(Default)]
pub(crate) struct UndoLog {
    pub receipt: u64,
    pub policies: Vec<PolicyKey>,
    pub changes: Vec<Change>,
}

#[derive(Default)]
pub(crate) struct Marks {
    /// Event id fingerprint -> receipt of the batch that counted it.
    ids: HashMap<u64, u64, BuildHasherDefault<Prehashed>>,
    /// Receipts applied and neither committed nor rolled back.
    in_flight: Vec<u64>,
    /// Committed batches, oldest first (the TTL is the same for all).
    committed: VecDeque<Committed>,
    /// Key vectors of expired batches, reused by the next commits.
    spare_keys: Vec<Vec<u64>>,
    logs: Vec<UndoLog>,
    spare_logs: Vec<UndoLog>,
    /// Ids forgotten early because the set was full.
    pub evictions: u64,
}

impl Marks {
    /// Starts a batch.
    pub fn begin(&mut self, receipt: u64) {
        if self.in_flight.len() >= MAX_LOGS {
            self.in_flight.remove(0);
        }
        self.in_flight.push(receipt);
    }

    /// Checks an id for the batch `receipt`, marking it in flight when new.
    pub fn check(&mut self, key: u64, receipt: u64) -> Seen {
        match self.ids.entry(key) {
            Entry::Vacant(slot) => {
                slot.insert(receipt);
                Seen::New
            }
            Entry::Occupied(seen) => {
                let r = *seen.get();
                if r != receipt && self.in_flight.contains(&r) {
                    Seen::Busy
                } else {
                    Seen::Done
                }
            }
        }
    }

    /// A log to record the batch's changes in (from the pool when possible).
    pub fn new_log(&mut self, receipt: u64) -> UndoLog {
        let mut log = self.spare_logs.pop().unwrap_or_default();
        log.receipt = receipt;
        log
    }

    /// Keeps a batch's log until it is committed or rolled back.
    pub fn keep_log(&mut self, log: UndoLog) {
        if self.logs.len() >= MAX_LOGS {
            let oldest = self.logs.remove(0);
            self.recycle(oldest);
        }
        self.logs.push(log);
    }

    fn recycle(&mut self, mut log: UndoLog) {
        log.policies.clear();
        log.changes.clear();
        self.spare_logs.push(log);
    }

    /// The batch's effects are published: its ids are processed until `expiry`. Keeps
    /// at most `capacity` ids, forgetting the oldest batches first.
    pub fn commit(&mut self, receipt: u64, keys: &[u64], expiry: i64, capacity: usize) {
        self.in_flight.retain(|r| *r != receipt);
        if let Some(i) = self.logs.iter().position(|l| l.receipt == receipt) {
            let log = self.logs.swap_remove(i);
            self.recycle(log);
        }
        // The receipt's keys are those this batch marked, and nothing but a rollback of
        // it unmarks them: no lookup per key.
        let mut own = self.spare_keys.pop().unwrap_or_default();
        own.extend_from_slice(keys);
        self.committed.push_back(Committed {
            expiry,
            receipt,
            keys: own,
            from: 0,
        });
        while self.ids.len() > capacity {
            let Some(oldest) = self.committed.front_mut() else {
                break;
            };
            while self.ids.len() > capacity && oldest.from < oldest.keys.len() {
                let key = oldest.keys[oldest.from];
                oldest.from += 1;
                if self.ids.get(&key) == Some(&oldest.receipt) {
                    self.ids.remove(&key);
                    self.evictions += 1;
                }
            }
            if oldest.from == oldest.keys.len()
                && let Some(done) = self.committed.pop_front()
            {
                self.forget(done);
            }
        }
    }

    /// The batch's effects could not be published: forgets its ids and hands back its
    /// log (to undo, newest change first).
    pub fn rollback(&mut self, receipt: u64, keys: &[u64]) -> Option<UndoLog> {
        self.in_flight.retain(|r| *r != receipt);
        for key in keys {
            if self.ids.get(key) == Some(&receipt) {
                self.ids.remove(key);
            }
        }
        let i = self.logs.iter().position(|l| l.receipt == receipt)?;
        Some(self.logs.swap_remove(i))
    }

    /// Returns a log handed out by [`rollback`](Self::rollback) to the pool.
    pub fn done_with(&mut self, log: UndoLog) {
        self.recycle(log);
    }

    /// Forgets the ids of batches expired at `now_ms`; how many.
    pub fn expire(&mut self, now_ms: i64) -> usize {
        let mut removed = 0;
        while self.committed.front().is_some_and(|c| c.expiry <= now_ms) {
            if let Some(c) = self.committed.pop_front() {
                removed += self.forget(c);
            }
        }
        removed
    }

    fn forget(&mut self, mut batch: Committed) -> usize {
        let before = self.ids.len();
        for key in &batch.keys[batch.from..] {
            if self.ids.get(key) == Some(&batch.receipt) {
                self.ids.remove(key);
            }
        }
        batch.keys.clear();
        batch.from = 0;
        self.spare_keys.push(batch.keys);
        before - self.ids.len()
    }

    /// Remembered ids (processed and in flight).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Scratch states only: records an id a shared store already knows, as processed
    /// or (`busy`) in flight in another batch. Receipt 0 stands for that other batch
    /// (stores number receipts from 1), `u64::MAX` for a committed one.
    pub fn mark_known(&mut self, key: u64, busy: bool) {
        if busy {
            if !self.in_flight.contains(&0) {
                self.in_flight.push(0);
            }
            self.ids.insert(key, 0);
        } else {
            self.ids.insert(key, u64::MAX);
        }
    }

    /// Scratch states only: the log of the batch `receipt`, while it is in flight.
    pub fn log(&self, receipt: u64) -> Option<&UndoLog> {
        self.logs.iter().find(|l| l.receipt == receipt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_new_busy_or_done() {
        let mut m = Marks::default();
        m.begin(1);
        assert_eq!(m.check(10, 1), Seen::New);
        assert_eq!(m.check(10, 1), Seen::Done, "twice in one batch");
        m.begin(2);
        assert_eq!(m.check(10, 2), Seen::Busy, "batch 1 is in flight");
        assert_eq!(m.check(11, 2), Seen::New);
        m.commit(1, &[10], 100, 10);
        assert_eq!(m.check(10, 3), Seen::Done);
        assert!(m.rollback(2, &[11]).is_none(), "no log was kept");
        assert_eq!(m.len(), 1);
        m.begin(4);
        assert_eq!(m.check(11, 4), Seen::New, "a rolled back id counts again");
    }

    #[test]
    fn expiry_and_capacity_forget_the_oldest_ids_first() {
        let mut m = Marks::default();
        for (r, keys) in [(1u64, vec![1, 2]), (2, vec![3]), (3, vec![4, 5])] {
            m.begin(r);
            for k in &keys {
                assert_eq!(m.check(*k, r), Seen::New);
            }
            m.commit(r, &keys, r as i64 * 10, 4);
        }
        // Five ids over a capacity of four: the oldest one went.
        assert_eq!((m.len(), m.evictions), (4, 1));
        m.begin(9);
        assert_eq!(m.check(1, 9), Seen::New);
        assert!(m.rollback(9, &[1]).is_none());
        // The rest of the first batch and the second expire.
        assert_eq!(m.expire(20), 2);
        assert_eq!(m.len(), 2);
        m.begin(10);
        assert_eq!(m.check(3, 10), Seen::New);
        assert_eq!(m.check(4, 10), Seen::Done);
    }

    #[test]
    fn logs_are_kept_until_commit_or_rollback() {
        let mut m = Marks::default();
        m.begin(1);
        let mut log = m.new_log(1);
        log.changes.push(Change {
            policy: 0,
            entity: 7,
            undo: Undo::Weight {
                bucket: 1,
                weight: 1.0,
            },
        });
        m.keep_log(log);
        let back = m.rollback(1, &[]).map(|l| l.changes.len());
        assert_eq!(back, Some(1));
        m.begin(2);
        let log = m.new_log(2);
        m.keep_log(log);
        m.commit(2, &[], 0, 10);
        assert!(m.logs.is_empty());
    }
}
